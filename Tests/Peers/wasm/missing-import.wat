;; Imports a function no host provides.
(module
  (import "env" "kuasar_nope" (func $nope))
  (func (export "_start") (call $nope)))
