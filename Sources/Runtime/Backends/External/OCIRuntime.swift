#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import KuasarSystem
import KuasarReactor
import KuasarWire

/// An OCI runtime's command line (runc, crun, runsc, youki), each call a child process
/// watched on the loop — never a blocking wait — with a deadline. A call that fails
/// answers with what the runtime said: its `--log` JSON lines (the last error), else
/// the last line of its stderr.
public final class OCIRuntime {
    public let name: String
    public let path: String
    /// Its --root: where it keeps its containers' state.
    public let root: String
    public let extraArgs: [String]
    let supervisor: ProcessSupervisor
    let reactor: Reactor
    let logger: Logger
    /// Where each call's stderr and --log go (under the daemon's root).
    let workDir: String
    private var seq = 0
    /// A call that takes longer is killed (SIGKILL) and fails with DeadlineExceeded.
    public var deadlineNS: UInt64 = 30_000_000_000

    public init(name: String, path: String, root: String, extraArgs: [String], workDir: String,
                supervisor: ProcessSupervisor, reactor: Reactor, logger: Logger) {
        self.name = name
        self.path = path
        self.root = root
        self.extraArgs = extraArgs
        self.workDir = workDir
        self.supervisor = supervisor
        self.reactor = reactor
        self.logger = logger
    }

    /// Why the runtime cannot be used, or nil.
    public var unavailableReason: String? {
        access(path, X_OK) == 0 ? nil : "\(path) is not an executable file (\(Errno.current))"
    }

    /// The --root of one pod's containers: container ids are the runtime's keys, and two
    /// pods (or two containerd namespaces) may use the same one.
    public func root(of sandboxID: String) -> String { root + "/" + sandboxID }

    /// Runs `<path> --root R [--log L --log-format json] <extra> <args>` with `stdio` as
    /// its fds 0–2 (nil: /dev/null, stderr to a file we read back); `done` gets its stdout
    /// (a file too) on exit 0, else the error naming what it said.
    /// `context` ("pause c2") leads the message of a failure.
    public func run(_ args: [String], root: String? = nil, stdio: [(from: Int32, to: Int32)]? = nil, deadlineNS: UInt64? = nil,
                    context: String? = nil, done reply: @escaping (Result<String, RPCError>) -> Void) {
        let done = context.map { c in { (r: Result<String, RPCError>) in reply(r.mapError { RPCError($0.code, "\(c): \($0.message)") }) } } ?? reply
        seq += 1
        let base = "\(workDir)/call-\(seq)"
        let outPath = base + ".out", errPath = base + ".err", logPath = base + ".log"
        let what = "\(name) \(args.first ?? "")"
        var opened: [Int32] = []
        func cleanup() {
            for fd in opened { _ = close(fd) }
            opened.removeAll()
        }
        func removeFiles() { for p in [outPath, errPath, logPath] { unlink(p) } }
        do {
            try makeDirectories(workDir, mode: 0o700)
            let null = try sys("open", "/dev/null") { open("/dev/null", O_RDWR | O_CLOEXEC) }
            opened.append(null)
            let out = try sys("open", outPath) { open(outPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            opened.append(out)
            let err = try sys("open", errPath) { open(errPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            opened.append(err)
            var spec = ProcessSpec(executable: path, arguments: [path, "--root", root ?? self.root, "--log", logPath, "--log-format", "json"] + extraArgs + args)
            spec.fdMap = stdio ?? [(null, 0), (out, 1), (err, 2)]
            var timer: TimerID?
            var timedOut = false
            let limit = deadlineNS ?? self.deadlineNS
            let pid = try supervisor.spawn(spec) { [weak self] status in
                if let timer { self?.reactor.cancel(timer) }
                let said = OCIRuntime.lastError(log: logPath, stderr: errPath)
                let stdout = (try? Files.readString(outPath)) ?? ""
                removeFiles()
                if timedOut {
                    done(.failure(RPCError(.deadlineExceeded, "\(what): no answer after \(limit / 1_000_000_000) s; killed\(said.isEmpty ? "" : ": " + said)")))
                } else if status == .exited(0) {
                    done(.success(stdout))
                } else {
                    done(.failure(RPCError(.internal, "\(what) \(status)\(said.isEmpty ? "" : ": " + said)")))
                }
            }
            cleanup()
            timer = reactor.schedule(afterNS: limit) { [weak self] in
                timedOut = true
                try? self?.supervisor.signal(pid, SIGKILL)
            }
        } catch {
            cleanup()
            removeFiles()
            done(.failure(RPCError(.failedPrecondition, "\(what): cannot run \(path): \(error)")))
        }
    }

    /// The newest runtime-spec version the runtime takes: `features`' ociVersionMax, else
    /// the "spec: X" line of `--version` (crun's), else nil (unknown: specs go as they are).
    /// Asked once, on first use.
    private(set) var specVersion: String??
    private var specVersionWaiters: [(String?) -> Void] = []

    public func withSpecVersion(_ body: @escaping (String?) -> Void) {
        if let known = specVersion { body(known); return }
        specVersionWaiters.append(body)
        guard specVersionWaiters.count == 1 else { return }
        func finish(_ v: String?) {
            specVersion = .some(v)
            let waiters = specVersionWaiters
            specVersionWaiters.removeAll()
            for w in waiters { w(v) }
        }
        run(["features"], deadlineNS: 10_000_000_000) { [weak self] result in
            if case .success(let out) = result,
               let obj = (try? JSONSerialization.jsonObject(with: Data(out.utf8))) as? [String: Any],
               let max = obj["ociVersionMax"] as? String {
                finish(max)
                return
            }
            self?.run(["--version"], deadlineNS: 10_000_000_000) { result in
                guard case .success(let out) = result,
                      let line = out.split(separator: "\n").first(where: { $0.hasPrefix("spec: ") }) else { finish(nil); return }
                finish(line.dropFirst("spec: ".count).trimmingWhitespace)
            }
        }
    }

    /// `version` if the runtime takes it; else (a newer minor than it knows) the
    /// runtime's own: older runtimes refuse a newer ociVersion outright, and ignore the
    /// fields they do not know.
    static func version(_ version: String, within max: String?) -> String {
        guard let max else { return version }
        func majorMinor(_ v: String) -> (Int, Int)? {
            let p = v.split(whereSeparator: { $0 == "." || $0 == "-" }).prefix(2).compactMap { Int($0) }
            return p.count == 2 ? (p[0], p[1]) : nil
        }
        guard let a = majorMinor(version), let b = majorMinor(max), a.0 == b.0, a.1 > b.1 else { return version }
        return max
    }

    /// The last error the runtime logged (`{"level":"error","msg":...}`), else the last
    /// non-empty line of its stderr.
    static func lastError(log: String, stderr: String) -> String {
        if let text = try? Files.readString(log) {
            for line in text.split(separator: "\n").reversed() {
                guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                      let msg = obj["msg"] as? String else { continue }
                let level = obj["level"] as? String ?? "error"
                if level == "error" || level == "fatal" || level == "warning" { return String(msg.prefix(500)) }
            }
        }
        let err = (try? Files.readString(stderr)) ?? ""
        return err.split(separator: "\n").last.map { String($0.prefix(500)) } ?? ""
    }
}
