// swift-tools-version:6.1
import PackageDescription

// The runtime: one C shim module for what Swift cannot call, one target per layer of
// ../shared/DESIGN.md, one executable that only parses arguments and wires.
// Benchmarks live in perf/ as their own package so this build never pays for them.
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")
let protobuf: Target.Dependency = .product(name: "SwiftProtobuf", package: "swift-protobuf")
let hpack: Target.Dependency = .product(name: "NIOHPACK", package: "swift-nio-http2")
// A layer's members that the layers above use are `package` (not public API); what a
// layer keeps to itself stays internal, as Swift declares it by default.

let package = Package(
    name: "kuasar",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "kuasar", targets: ["kuasar"]),
        .executable(name: "kuasar-keeper", targets: ["kuasar-keeper"]),
        .executable(name: "kuasar-agent", targets: ["kuasar-agent"]),
        .executable(name: "kuasar-wasm-run", targets: ["kuasar-wasm-run"]),
        .library(name: "Runtime", targets: ["Runtime"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        // No traits: BinaryDelimitedStreams imports full Foundation, which every module
        // that imports SwiftProtobuf would then link (the guest agent too).
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.28.0", traits: []),
        // HPACK only (RFC 7541, Huffman, dynamic table): its encoder and decoder are
        // plain values, used on our loop thread; no NIO event loop is ever started.
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.46.0"),
        // The configuration file (toml++ underneath); its tests' own dependency is never fetched.
        .package(url: "https://github.com/LebJe/TOMLKit", exact: "0.6.0"),
        // The embedded WebAssembly engine (an interpreter; WASI preview 1). Heavy to build
        // (swift-syntax for its macros): only KuasarWasmKit depends on it.
        .package(url: "https://github.com/swiftwasm/WasmKit", exact: "0.4.2"),
    ],
    targets: [
        .systemLibrary(
            name: "CLibURing", pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]),
        .systemLibrary(
            name: "CLibSeccomp", pkgConfig: "libseccomp",
            providers: [.apt(["libseccomp-dev"])]),
        .target(
            name: "CShims",
            dependencies: ["CLibURing", "CLibSeccomp"],
            cSettings: [.define("_GNU_SOURCE")],
            linkerSettings: [.linkedLibrary("uring"), .linkedLibrary("seccomp")]),
        // The layers of ../shared/DESIGN.md, one target each (folders under Sources/Runtime),
        // so the compiler holds the import rules: only KuasarSystem and the reactor's
        // io_uring backend see CShims; the codecs know no container; the container engine
        // knows no RPC; each backend sees the sandbox seam, never another backend; only the
        // executable (and the Runtime umbrella, for tests and perf/) sees every backend.
        .target(name: "KuasarOCI", path: "Sources/Runtime/OCI"),
        .target(
            name: "KuasarSystem", dependencies: ["CShims", "KuasarOCI"], path: "Sources/Runtime/System"),
        .target(
            name: "KuasarReactor", dependencies: ["KuasarSystem", "CShims", logging], path: "Sources/Runtime/Reactor"),
        .target(
            name: "KuasarWire", dependencies: ["KuasarReactor", "KuasarSystem", logging, protobuf],
            path: "Sources/Runtime/Wire", exclude: ["GRPC", "Host"]),
        // The wire only the host speaks: containerd's sandbox Controller and its types, the
        // admin and health APIs, QMP. Apart so the guest agent, which serves the Task API
        // alone, does not link their messages (every conformance is kept by the linker).
        .target(
            name: "KuasarHostWire", dependencies: ["KuasarReactor", "KuasarSystem", "KuasarWire", logging, protobuf],
            path: "Sources/Runtime/Wire/Host"),
        // HTTP/2 and gRPC (containerd's sandbox Controller, health) apart from ttrpc: HPACK
        // brings swift-nio's modules, which the guest agent (ttrpc only) must not link.
        .target(
            name: "KuasarGRPC", dependencies: ["KuasarReactor", "KuasarSystem", "KuasarWire", logging, protobuf, hpack],
            path: "Sources/Runtime/Wire/GRPC"),
        .target(
            name: "KuasarContainer", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", logging],
            path: "Sources/Runtime/Container"),
        .target(
            name: "KuasarSandbox", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarContainer", logging, protobuf],
            path: "Sources/Runtime/Sandbox", exclude: ["Kinds"]),
        // The sandbox seam the kinds plug into (SandboxBackend, a Create as a kind sees it):
        // the daemon's alone — a Create carries containerd's CRI config (the host's wire),
        // so the guest agent, which links KuasarSandbox, does not link that.
        .target(
            name: "KuasarSandboxKinds", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarContainer", "KuasarSandbox", logging, protobuf],
            path: "Sources/Runtime/Sandbox/Kinds"),
        .target(
            name: "KuasarNamespace", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", logging, protobuf],
            path: "Sources/Runtime/Backends/Namespace"),
        .target(
            name: "KuasarExternal", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", logging, protobuf],
            path: "Sources/Runtime/Backends/External"),
        // microVM pods: one driver per VMM (QEMU/) behind the Hypervisor protocol.
        .target(
            name: "KuasarVM", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", logging, protobuf],
            path: "Sources/Runtime/Backends/VM"),
        // WebAssembly engines (the wasm kind's runner): Wasmtime through its C API, loaded
        // with dlopen at run time, so nothing here links an engine at build time.
        .target(
            name: "KuasarWasm", dependencies: ["KuasarSystem", "KuasarWire"],
            path: "Sources/Runtime/Backends/Wasm"),
        .target(
            name: "KuasarWasmKit", dependencies: ["KuasarWasm", "KuasarSystem", "KuasarWire", "CShims",
                                                  .product(name: "WasmKit", package: "WasmKit"), .product(name: "WasmKitWASI", package: "WasmKit")],
            path: "Sources/Runtime/Backends/WasmKit"),
        // The wasm kind: a namespace pod whose containers with a module entrypoint run it
        // through kuasar-wasm-run (opened by the daemon, executed by the container's child).
        .target(
            name: "KuasarWasmSandbox", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarSandbox", "KuasarWasm", logging],
            path: "Sources/Runtime/Backends/WasmSandbox"),
        // The Task service and the events publisher: the part of the API layer the guest
        // agent serves too, so it stays off TOMLKit and full Foundation (FoundationEssentials
        // only, like every layer below it): the agent's static binary stays small.
        .target(
            name: "KuasarTasks", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarContainer", "KuasarSandbox", logging, protobuf],
            path: "Sources/Runtime/Services/Task"),
        .target(
            name: "KuasarServices", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarGRPC", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", "KuasarTasks", logging, protobuf,
                                                  .product(name: "TOMLKit", package: "TOMLKit")],
            path: "Sources/Runtime/Services", exclude: ["Task"]),
        // What runs inside a VM as PID 1 (and, for tests and the task-server kind, as a
        // plain process with --listen): early init, the channels, the Task service on
        // the container engine, and the agent's own service (stdio streams, events).
        .target(
            name: "KuasarAgent", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarContainer", "KuasarSandbox", "KuasarTasks", logging, protobuf],
            path: "Sources/Runtime/Agent"),
        // Every layer at once, for the tests and the benchmarks (not for the daemon's code).
        .target(
            name: "Runtime", dependencies: ["KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarGRPC", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", "KuasarNamespace", "KuasarExternal", "KuasarVM", "KuasarWasm", "KuasarWasmKit", "KuasarWasmSandbox", "KuasarTasks", "KuasarServices", "KuasarAgent"],
            path: "Sources/Runtime/Exports"),
        // The daemon's parent (CShims/keeper.c): C only, so it costs ~100 kB, not a runtime.
        .executableTarget(name: "kuasar-keeper", dependencies: ["CShims"]),
        // A wasm container's process: the runner only (no argument parser, no Foundation).
        .executableTarget(name: "kuasar-wasm-run", dependencies: ["KuasarWasmKit"]),
        // The guest's PID 1 on its own: only the agent's layers, no argument parser, no
        // TOMLKit, no full Foundation, so `make guest` can link it statically and small.
        .executableTarget(name: "kuasar-agent", dependencies: ["KuasarAgent", "CAgentInit"]),
        // PID 1's start before the Swift runtime's: a C constructor (mounts, then the
        // channel's modules, cgroup2 and loopback on a thread), linked into the agent binary
        // and the tests only (it acts only as PID 1 of a fresh initramfs).
        .target(name: "CAgentInit", dependencies: ["CShims"], cSettings: [.define("_GNU_SOURCE")]),
        .executableTarget(
            name: "kuasar",
            dependencies: [
                "KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarGRPC", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", "KuasarNamespace", "KuasarExternal", "KuasarVM", "KuasarWasm", "KuasarWasmKit", "KuasarWasmSandbox", "KuasarTasks", "KuasarServices", "KuasarAgent",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(
            name: "RuntimeTests",
            dependencies: [
                "Runtime", "KuasarOCI", "KuasarSystem", "KuasarReactor", "KuasarWire", "KuasarHostWire", "KuasarGRPC", "KuasarContainer", "KuasarSandbox", "KuasarSandboxKinds", "KuasarNamespace", "KuasarExternal", "KuasarVM", "KuasarWasm", "KuasarWasmSandbox", "KuasarTasks", "KuasarServices", "KuasarAgent", "CShims", "CAgentInit",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)
