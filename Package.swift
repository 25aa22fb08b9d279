// swift-tools-version:6.0
import PackageDescription

// The runtime: one C shim module for what Swift cannot call, one library with the
// layers of ../shared/DESIGN.md, one executable that only parses arguments and wires.
// Benchmarks live in perf/ as their own package so this build never pays for them.
let package = Package(
    name: "kuasar",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "kuasar", targets: ["kuasar"]),
        .executable(name: "kuasar-keeper", targets: ["kuasar-keeper"]),
        .library(name: "Runtime", targets: ["Runtime"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.28.0"),
        // HPACK only (RFC 7541, Huffman, dynamic table): its encoder and decoder are
        // plain values, used on our loop thread; no NIO event loop is ever started.
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.46.0"),
        // The configuration file (toml++ underneath); its tests' own dependency is never fetched.
        .package(url: "https://github.com/LebJe/TOMLKit", exact: "0.6.0"),
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
        .target(
            name: "Runtime",
            dependencies: [
                "CShims",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ]),
        // The daemon's parent (CShims/keeper.c): C only, so it costs ~100 kB, not a runtime.
        .executableTarget(name: "kuasar-keeper", dependencies: ["CShims"]),
        .executableTarget(
            name: "kuasar",
            dependencies: [
                "Runtime",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(
            name: "RuntimeTests",
            dependencies: [
                "Runtime", "CShims",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)
