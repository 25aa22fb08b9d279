;; Never ends: Kill must stop it.
(module (func (export "_start") (loop $forever (br $forever))))
