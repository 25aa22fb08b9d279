// Every layer of the runtime in one import, for the tests and the benchmarks in perf/.
// The daemon's own code never imports this: each layer imports only what it may use.
@_exported import KuasarOCI
@_exported import KuasarSystem
@_exported import KuasarReactor
@_exported import KuasarWire
@_exported import KuasarHostWire
@_exported import KuasarGRPC
@_exported import KuasarContainer
@_exported import KuasarSandbox
@_exported import KuasarSandboxKinds
@_exported import KuasarNamespace
@_exported import KuasarVM
@_exported import KuasarWasm
@_exported import KuasarWasmKit
@_exported import KuasarWasmSandbox
@_exported import KuasarExternal
@_exported import KuasarServices
@_exported import KuasarTasks
@_exported import KuasarAgent
