#if canImport(Glibc)
import Glibc
#endif
// Store.resourceLimiter is SPI in 0.4.2 (WasmKit marks it "consider making this public"): the
// only way to cap a module's memory growth.
@_spi(Fuzzing) import WasmKit
import WasmKitWASI
import KuasarWasm
import KuasarWire

/// WasmKit, the embedded engine: an interpreter linked into the binary, so the wasm kind
/// works on a machine with nothing else installed. Slower than Wasmtime's compiled code;
/// a module is parsed for each run (nothing to keep across runner processes).
public final class WasmKitEngine: WasmEngine {
    public let name = "wasmkit"
    /// The package version Package.swift pins.
    public let version = "0.4.2"

    public init() {}

    /// A memory cap: growth past it is refused (memory.grow answers -1), the module goes on.
    final class MemoryCap: ResourceLimiter, @unchecked Sendable {
        let bytes: Int
        init(bytes: Int) { self.bytes = bytes }
        func limitMemoryGrowth(to desired: Int) throws -> Bool { desired <= bytes }
    }

    public func run(_ run: WasmRun) throws -> WasmOutcome {
        let bytes = try WasmModuleFile.read(run.module)
        let module: Module
        do { module = try parseWasm(bytes: bytes) } catch {
            throw RPCError(.invalidArgument, "wasmkit: compile \(run.module): \(error)")
        }
        let wasi: WASIBridgeToHost
        do {
            wasi = try WASIBridgeToHost(args: run.args, environment: run.environment,
                                        preopens: run.preopens.map { WASIBridgeToHost.Preopen(guestPath: $0.guest, hostPath: $0.host) })
        } catch {
            throw RPCError(.failedPrecondition, "wasmkit: WASI preopens \(run.preopens.map { "\($0.guest)=\($0.host)" }): \(error)")
        }
        // The bridge must be closed before it goes, whatever happened.
        defer { try? wasi.close() }
        let store = Store(engine: Engine())
        if let limit = run.memoryLimit { store.resourceLimiter = MemoryCap(bytes: Int(limit)) }
        var imports = Imports()
        wasi.link(to: &imports, store: store)
        let instance: Instance
        do { instance = try module.instantiate(store: store, imports: imports) } catch {
            throw RPCError(.failedPrecondition, "wasmkit: link \(run.module): \(error)")
        }
        do {
            return .exited(Int32(bitPattern: try wasi.start(instance)))
        } catch let trap as Trap {
            return .trapped(trap.description)
        } catch {
            return .trapped("\(error)")
        }
    }
}
