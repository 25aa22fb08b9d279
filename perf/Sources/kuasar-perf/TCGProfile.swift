#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Runtime

/// What a guest boot translates, to the agent's first answer: under TCG each piece of code
/// costs its translation the first time it runs, and the agent's own start is mostly that
/// (~6 ms of work natively, ~230 ms here). QEMU logs every block it translates
/// (`-d in_asm`); the blocks in the agent's address range (a static, non-PIE executable,
/// so its addresses are the ELF's) are put on the symbols of the unstripped agent
/// `make guest` linked, summed by module and function, and cut into phases where the
/// agent's main, its init and its server are first translated. A count, not a time: the
/// same image gives the same figures whatever the machine is doing, so a change to the
/// boot can be weighed without the ±150 ms that boots spread by here. (`make guest` folds
/// identical functions: a folded block is put on one of their names.)
/// Writes perf/results/agent-tcg.json. Needs `make guest` (.build/guest and
/// .build-static/release/kuasar-agent), QEMU, binutils' nm and `swift demangle`.
enum TCGProfile {
    struct Report: Codable {
        var date: String
        /// Guest instructions translated to the first answer: the agent's (what its first
        /// answer starts left out), the kernel's.
        var agentInstructions: Int
        var kernelInstructions: Int
        var agentBlocks: Int
        /// The agent's instructions by phase, in the order they start: before main (libc,
        /// the Swift runtime's and CAgentInit's constructors), main, GuestInit.run,
        /// Agent.run to its container engine, the engine and the services, serving and the
        /// first call; then what the first answer starts, not counted above.
        var phases: [Phase]
        /// By module (a Swift symbol's module, "Swift" for the standard library; "runtime"
        /// for the Swift runtime's C++; "C" for libc, libdispatch, the shims and CAgentInit).
        var byModule: [String: Int]
        /// The functions that translated most, demangled.
        var topFunctions: [Function]
    }
    struct Phase: Codable { var name: String; var instructions: Int }
    struct Function: Codable { var name: String; var instructions: Int }

    static let afterAnswer = "after the first answer (its timers)"

    /// `functionsFile`: every function of the path, by phase, written there for a closer look.
    static func run(functionsFile: String?) throws {
        let log = ContainerBenchmark.log
        let root = PodBenchmark.repositoryRoot
        let image = root + "/.build/guest", elf = root + "/.build-static/release/kuasar-agent"
        guard access(image + "/initrd.lz4", R_OK) == 0, access(elf, R_OK) == 0 else {
            log("agent-tcg: needs the guest image and its unstripped agent (make guest)")
            return
        }
        let work = AgentBenchmark.work + "-tcg"
        ContainerBenchmark.shIgnoringFailure("rm -rf \(work)")
        try FileManager.default.createDirectory(atPath: work + "/share", withIntermediateDirectories: true)
        defer { ContainerBenchmark.shIgnoringFailure("rm -rf \(work)") }
        let trace = work + "/in_asm.log"
        let vm = try AgentBenchmark.VM(initrd: image + "/initrd.lz4", image: image, dir: work, share: work + "/share",
                                       qemuOptions: ["-d", "in_asm,nochain", "-D", trace])
        let answer = AgentBenchmark.firstAnswer(vm, round: "the profiled boot")
        // SIGTERM: QEMU flushes its log as it exits.
        try? sendSignal(pidfd: vm.pidfd, SIGTERM)
        var info = siginfo_t()
        _ = waitid(P_PIDFD, id_t(vm.pidfd), &info, WEXITED)
        close(vm.pidfd)
        guard let answer else { return }
        answer.client.close()

        // The agent's functions, by address.
        var symbols: [(address: UInt64, name: String)] = []
        for line in try ContainerBenchmark.sh("nm -n --defined-only \(elf)").split(separator: "\n") {
            let f = line.split(separator: " ", maxSplits: 2)
            guard f.count == 3, "tTwW".contains(f[1]), let a = UInt64(f[0], radix: 16) else { continue }
            symbols.append((a, String(f[2])))
        }
        guard let low = symbols.first?.address, let high = symbols.last?.address else { log("agent-tcg: \(elf) has no symbols"); return }
        func symbol(_ a: UInt64) -> String {
            var lo = 0, hi = symbols.count - 1
            while lo < hi {
                let mid = (lo + hi + 1) / 2
                if symbols[mid].address <= a { lo = mid } else { hi = mid - 1 }
            }
            return symbols[lo].name
        }
        // The blocks in translation order: each one's first address and instruction count.
        var blocks: [(symbol: String, count: Int)] = []
        var kernel = 0, start: UInt64?, count = 0
        func endBlock() {
            guard let s = start else { return }
            if s >= low && s <= high + 4096 { blocks.append((symbol(s), count)) } else { kernel += count }
            start = nil
            count = 0
        }
        let text = try String(contentsOfFile: trace, encoding: .isoLatin1)
        for line in text.split(separator: "\n") {
            if line.hasPrefix("IN:") { endBlock(); continue }
            guard line.hasPrefix("0x"), let colon = line.firstIndex(of: ":"), let a = UInt64(line[line.index(line.startIndex, offsetBy: 2)..<colon], radix: 16) else { continue }
            if start == nil { start = a }
            count += 1
        }
        endBlock()

        let names = Array(Set(blocks.map(\.symbol)))
        let input = work + "/symbols.txt"
        try names.joined(separator: "\n").write(toFile: input, atomically: false, encoding: .utf8)
        let demangled = try ContainerBenchmark.sh("swift demangle --simplified --compact < \(input)").split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var readable: [String: String] = [:]
        for (i, n) in names.enumerated() where i < demangled.count { readable[n] = demangled[i] }
        func name(_ symbol: String) -> String { readable[symbol] ?? symbol }

        func module(_ mangled: String) -> String {
            if mangled.hasPrefix("$s") {
                let digits = mangled.dropFirst(2).prefix { $0.isNumber }
                // The standard library's own symbols name their module by substitution ($ss, $sS…).
                guard let n = Int(digits) else { return "Swift" }
                return String(mangled.dropFirst(2 + digits.count).prefix(n))
            }
            if mangled.hasPrefix("_Z") || mangled.hasPrefix("swift_") || mangled.hasPrefix("_swift") { return "runtime" }
            return "C"
        }
        // Phases: from where each marker is first translated.
        let markers: [(name: String, prefix: String)] = [("main", "main"), ("GuestInit.run", "static GuestInit.run("), ("Agent.run", "Agent.run()"),
                                                         ("engine and services", "ContainerEngine.init("), ("serving and the first call", "TTRPCServerConnection."),
                                                         // What the first answer starts (its timers): under the log's weight
                                                         // the host's first tries time out, and its first answer is a later one.
                                                         (afterAnswer, "Agent.flushBootLog()"), (afterAnswer, "Agent.finishBoot()")]
        var cuts: [(name: String, index: Int)] = [("before main", 0)]
        for m in markers {
            if let i = blocks.firstIndex(where: { name($0.symbol).hasPrefix(m.prefix) || name($0.symbol).hasPrefix("partial apply for " + m.prefix) }) {
                cuts.append((m.name, i))
            }
        }
        cuts.sort { $0.index < $1.index }
        // Each phase's blocks: to the next cut, and everything from the first answer's.
        var ranges: [(name: String, blocks: Range<Int>)] = []
        for (k, cut) in cuts.enumerated() {
            if cut.name == afterAnswer { ranges.append((cut.name, cut.index..<blocks.count)); break }
            ranges.append((cut.name, cut.index..<(k + 1 < cuts.count ? cuts[k + 1].index : blocks.count)))
        }
        let phases = ranges.map { r in Phase(name: r.name, instructions: blocks[r.blocks].reduce(0) { $0 + $1.count }) }
        let onPath = ranges.filter { $0.name != afterAnswer }
        let path = phases.filter { $0.name != afterAnswer }.reduce(0) { $0 + $1.instructions }
        // Modules and functions on the path to the first answer only, as its count.
        let pathEnd = onPath.last?.blocks.upperBound ?? 0
        var byModule: [String: Int] = [:], byFunction: [String: Int] = [:]
        for b in blocks[..<pathEnd] {
            byModule[module(b.symbol), default: 0] += b.count
            byFunction[name(b.symbol), default: 0] += b.count
        }
        if let functionsFile {
            var lines: [String] = []
            for r in onPath {
                var f: [String: Int] = [:]
                for b in blocks[r.blocks] { f[name(b.symbol), default: 0] += b.count }
                lines += f.sorted { $0.value > $1.value }.map { "\(r.name)\t\($0.value)\t\($0.key)" }
            }
            try (lines.joined(separator: "\n") + "\n").write(toFile: functionsFile, atomically: false, encoding: .utf8)
        }
        let report = Report(
            date: ISO8601DateFormatter().string(from: Date()),
            agentInstructions: path, kernelInstructions: kernel, agentBlocks: blocks.count,
            phases: phases, byModule: byModule,
            topFunctions: byFunction.sorted { $0.value > $1.value }.prefix(40).map { Function(name: $0.key, instructions: $0.value) })
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(report).write(to: URL(fileURLWithPath: root + "/perf/results/agent-tcg.json"))
        log("agent-tcg: translated to the first answer (at \(Int(answer.ms)) ms under the log's weight): the agent \(report.agentInstructions) guest instructions in \(report.agentBlocks) blocks, the kernel \(kernel)")
        log("agent-tcg: by phase: " + phases.map { "\($0.name) \($0.instructions)" }.joined(separator: ", "))
        log("agent-tcg: by module: " + byModule.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        for f in report.topFunctions.prefix(15) { log("agent-tcg:   \(f.instructions) \(f.name.prefix(140))") }
    }
}
