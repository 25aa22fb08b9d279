#if canImport(Glibc)
import Glibc
#endif
import KuasarWasmKit

// A wasm container's process: one module, then exit with its status (see WasmRunner).
exit(WasmRunner.main(Array(CommandLine.arguments.dropFirst()), name: "kuasar-wasm-run"))
