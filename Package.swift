// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "Plexus",
    products: [
        .library(name: "Plexus", targets: ["Plexus"]),
        .executable(name: "plexus-demo", targets: ["plexus-demo"]),
        .executable(name: "plexus-nouring", targets: ["plexus-nouring"]),
        .executable(name: "plexus-bench", targets: ["plexus-bench"]),
        .executable(name: "plexus-ping", targets: ["plexus-ping"]),
        .executable(name: "plexus-grep", targets: ["plexus-grep"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // The thin C layer: liburing, epoll, poll, eventfd, timerfd and what Swift cannot import.
        .target(
            name: "CPlexus",
            path: "CShims",
            linkerSettings: [.linkedLibrary("uring")]
        ),
        .target(
            name: "Plexus",
            dependencies: [
                "CPlexus",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "HeapModule", package: "swift-collections"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "plexus-demo",
            dependencies: ["Plexus"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // Runs a command under a seccomp filter that denies io_uring_setup, as Docker's default profile does.
        .executableTarget(name: "plexus-nouring"),
        // Counts every malloc in the process that links it (interposes the malloc family).
        .target(name: "CPlexusMallocCounter"),
        // The benchmark bodies, raw shim baselines and the runner: used by plexus-bench and the tests.
        .target(
            name: "PlexusBench",
            dependencies: [
                "Plexus",
                "CPlexus",
                "CPlexusMallocCounter",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "plexus-bench",
            dependencies: [
                "PlexusBench",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // A RESP server answering PING, measured against redis-server with redis-benchmark.
        .executableTarget(
            name: "plexus-ping",
            dependencies: ["Plexus", "CPlexus"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // grep through the loop and a MessageQueue.
        .executableTarget(
            name: "plexus-grep",
            dependencies: ["Plexus", "CPlexus"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .testTarget(
            name: "PlexusTests",
            dependencies: ["Plexus", "CPlexus", .product(name: "SystemPackage", package: "swift-system"),
                           "PlexusBench"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
