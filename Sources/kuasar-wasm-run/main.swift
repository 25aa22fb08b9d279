#if canImport(Glibc)
import Glibc
#endif
import KuasarWasmKit

// A wasm container's process: one module, then exit with its status (see WasmRunner).
//
// A WASI preview 1 module cannot handle a signal. As a namespace's PID 1 (`kuasar run`,
// a pod without a shared pid namespace) the kernel would drop SIGTERM and friends, whose
// action is the default, so `kill` would do nothing: there, they end the runner with the
// shell's status for them (128 + the signal), as containerd reports a signalled exit.
if getpid() == 1 {
    for sig in [SIGTERM, SIGINT, SIGHUP, SIGQUIT] {
        signal(sig) { _exit(128 + $0) }
    }
}
exit(WasmRunner.main(Array(CommandLine.arguments.dropFirst()), name: "kuasar-wasm-run"))
