#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// Which cgroup layout the host has. Hybrid hosts (v1 controllers plus an empty
/// cgroup2 at /sys/fs/cgroup/unified) are driven as v1: that is where the controllers are.
public enum CgroupMode: String, Sendable {
    case v1, v2
}

/// Resource limits in OCI terms (linux.resources), already validated.
public struct CgroupResources: Sendable, Equatable {
    public var memoryLimit: Int64?
    public var memoryReservation: Int64?
    /// memory+swap, as in the OCI spec; -1 is unlimited.
    public var memorySwap: Int64?
    public var cpuShares: UInt64?
    public var cpuQuota: Int64?
    public var cpuPeriod: UInt64?
    public var cpus: String?
    public var mems: String?
    public var pidsLimit: Int64?
    public var blkioWeight: UInt16?
    /// cgroup v2 files written as they are (linux.resources.unified).
    public var unified: [String: String] = [:]
    public init() {}
}

/// The host's cgroup hierarchies and where this process sits in them.
public struct CgroupHost: Sendable {
    public let mode: CgroupMode
    /// v1: controller name → (mount point, our own path in that hierarchy). v2: "" → ...
    let hierarchies: [String: (mount: String, own: String)]
    /// Controllers in mountinfo order (how runc binds them into a container, too).
    var order: [String] = []

    /// v1 controllers a container cgroup is made in (when the host has them).
    static let v1Controllers = ["memory", "cpu", "cpuacct", "cpuset", "pids", "blkio", "freezer", "devices", "name=systemd"]

    /// The cgroup2 hierarchy at `mount`, ours at `own` in it (its root for a guest's PID 1
    /// that mounted it, which knows so without `detect`).
    public static func unified(at mount: String, own: String = "/") -> CgroupHost {
        CgroupHost(mode: .v2, hierarchies: ["": (mount, own)], order: [""])
    }

    public static func detect() throws(SystemError) -> CgroupHost {
        var own: [String: String] = [:]
        for line in try Files.readString("/proc/self/cgroup").split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            for c in parts[1].split(separator: ",") { own[c == "name=systemd" ? "systemd" : String(c)] = String(parts[2]) }
            if parts[1].isEmpty { own[""] = String(parts[2]) }
        }
        var mounts: [String: String] = [:]
        var order: [String] = []
        var unifiedRoot: String?
        for line in try Files.readString("/proc/self/mountinfo").split(separator: "\n") {
            // ... mountpoint ... - fstype source superoptions
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { continue }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count > 4, right.count >= 3 else { continue }
            let point = Mounts.unescape(String(left[4]))
            if right[0] == "cgroup2" && point == "/sys/fs/cgroup" { unifiedRoot = point }
            if right[0] == "cgroup" {
                for opt in right[2].split(separator: ",") where v1Controllers.contains(String(opt)) {
                    let key = opt == "name=systemd" ? "systemd" : String(opt)
                    if mounts[key] == nil { order.append(key) }
                    mounts[key] = point
                }
            }
        }
        if let root = unifiedRoot {
            return unified(at: root, own: own[""] ?? "/")
        }
        var h: [String: (mount: String, own: String)] = [:]
        for (c, m) in mounts { h[c] = (m, own[c] ?? "/") }
        return CgroupHost(mode: .v1, hierarchies: h, order: order)
    }

    public var controllers: [String] { hierarchies.keys.sorted() }

    /// Our own cgroup's directory in one hierarchy: where every cgroup we make goes.
    func base(_ h: (mount: String, own: String)) -> String { h.mount + (h.own == "/" ? "" : h.own) }

    /// The cgroup `path` below our own cgroup in every hierarchy, as it is (nothing made).
    public func existing(_ path: String) -> Cgroup {
        let rel = "/" + path.split(separator: "/").joined(separator: "/")
        return Cgroup(mode: mode, path: rel, dirs: hierarchies.mapValues { base($0) + rel }, order: order)
    }

    /// The cgroup a process is in, in every hierarchy this host mounts (from
    /// /proc/<pid>/cgroup): where an external runtime put its container.
    public func cgroup(of pid: pid_t) -> Cgroup? {
        guard let text = try? Files.readString("/proc/\(pid)/cgroup") else { return nil }
        var dirs: [String: String] = [:]
        var path = ""
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            let p = String(parts[2])
            let keys: [String] = mode == .v2 ? (parts[1].isEmpty ? [""] : []) : parts[1].split(separator: ",").map { $0 == "name=systemd" ? "systemd" : String($0) }
            for key in keys {
                guard let h = hierarchies[key] else { continue }
                dirs[key] = h.mount + (p == "/" ? "" : p)
                path = p
            }
        }
        return dirs.isEmpty ? nil : Cgroup(mode: mode, path: path, dirs: dirs, order: order.filter { dirs[$0] != nil })
    }

    /// Creates (or opens) the cgroup `path` below our own cgroup in every hierarchy.
    public func create(_ path: String) throws(SystemError) -> Cgroup {
        let cgroup = existing(path)
        for (c, dir) in cgroup.dirs {
            try makeDirectories(dir, mode: 0o755)
            if c == "cpuset" { try Cgroup.inheritCpuset(dir, stopAt: base(hierarchies[c]!)) }
        }
        if mode == .v2 { try Cgroup.enableControllers(below: hierarchies[""]!.mount, to: cgroup.dirs[""]!) }
        return cgroup
    }
}

/// One cgroup: a directory per v1 hierarchy, or one cgroup2 directory.
public final class Cgroup: @unchecked Sendable {
    public let mode: CgroupMode
    public let path: String
    public let dirs: [String: String]
    /// The controllers of `dirs` in the host's mount order.
    public let order: [String]

    init(mode: CgroupMode, path: String, dirs: [String: String], order: [String]) {
        self.mode = mode
        self.path = path
        self.dirs = dirs
        self.order = order
    }

    /// The cgroup2 directory (for CLONE_INTO_CGROUP), nil on v1.
    public var unifiedDirectory: String? { mode == .v2 ? dirs[""] : nil }

    /// A new v1 cpuset cgroup starts with empty cpus/mems and refuses tasks: copy the
    /// parent's down each level that is still empty.
    static func inheritCpuset(_ dir: String, stopAt base: String) throws(SystemError) {
        var chain: [String] = []
        var d = dir
        while d.count > base.count {
            chain.append(d)
            guard let slash = d.lastIndex(of: "/") else { break }
            d = String(d[..<slash])
        }
        for level in chain.reversed() {
            let parent = String(level[..<level.lastIndex(of: "/")!])
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let mine = (try? Files.readString(level + "/" + f))?.trimmingWhitespace ?? ""
                if mine.isEmpty {
                    let theirs = try Files.readString(parent + "/" + f).trimmingWhitespace
                    try Files.write(level + "/" + f, theirs)
                }
            }
        }
    }

    static func enableControllers(below root: String, to dir: String) throws(SystemError) {
        // Each ancestor must delegate the controllers its children use.
        var levels: [String] = []
        var d = dir
        while d.count > root.count, let slash = d.lastIndex(of: "/") {
            d = String(d[..<slash])
            levels.append(d)
        }
        for level in levels.reversed() {
            let available = (try? Files.readString(level + "/cgroup.controllers"))?.split(separator: " ") ?? []
            let wanted = available.map { "+" + $0.trimmingWhitespace }.filter { ["+cpu", "+memory", "+pids", "+io", "+cpuset"].contains($0) }
            if !wanted.isEmpty { try? Files.write(level + "/cgroup.subtree_control", wanted.joined(separator: " ")) }
        }
    }

    /// A process moving `pid` into every v1 hierarchy of this cgroup (see
    /// ks_cgroup_join_start), so the caller's thread never waits for the RCU grace period
    /// a v1 migration costs. Watch `takeProcess()`; once it is reaped, `release()`. Exit
    /// status 0 means joined, anything else is the errno.
    public final class Join {
        public let pid: pid_t
        private var pidfd: Int32
        private var block: UnsafeMutableRawPointer?
        init(pid: pid_t, pidfd: Int32, block: UnsafeMutableRawPointer) { self.pid = pid; self.pidfd = pidfd; self.block = block }
        public func takeProcess() -> SpawnedProcess {
            defer { pidfd = -1 }
            return SpawnedProcess(pid: pid, pidfd: OwnedFD(adopting: pidfd))
        }
        public func release() {
            if let b = block { ks_cgroup_join_release(b) }
            block = nil
        }
        deinit {
            if pidfd >= 0 { _ = close(pidfd) }
        }
    }

    public func startJoin(pid: pid_t) throws(SystemError) -> Join {
        var fds: [Int32] = []
        defer { for fd in fds { _ = close(fd) } }
        for dir in dirs.values.sorted() {
            let path = dir + "/cgroup.procs"
            fds.append(try sys("open", path) { open(path, O_WRONLY | O_CLOEXEC) })
        }
        var child: pid_t = 0, pidfd: Int32 = -1
        guard let block = ks_cgroup_join_start(fds, Int32(fds.count), pid, &child, &pidfd) else {
            throw SystemError("clone", "cgroup joiner for \(pid)", errno: Errno.current)
        }
        return Join(pid: child, pidfd: pidfd, block: block)
    }

    public func add(pid: pid_t) throws(SystemError) {
        for dir in dirs.values { try Files.write(dir + "/cgroup.procs", "\(pid)") }
    }

    public func apply(_ r: CgroupResources) throws(SystemError) {
        switch mode {
        case .v1:
            if let mem = dirs["memory"] {
                if let v = r.memoryLimit { try Files.write(mem + "/memory.limit_in_bytes", "\(v)") }
                if let v = r.memoryReservation { try Files.write(mem + "/memory.soft_limit_in_bytes", "\(v)") }
                if let v = r.memorySwap, Files.exists(mem + "/memory.memsw.limit_in_bytes") {
                    try Files.write(mem + "/memory.memsw.limit_in_bytes", "\(v)")
                }
            }
            if let cpu = dirs["cpu"] {
                if let v = r.cpuShares { try Files.write(cpu + "/cpu.shares", "\(v)") }
                if let v = r.cpuPeriod { try Files.write(cpu + "/cpu.cfs_period_us", "\(v)") }
                if let v = r.cpuQuota { try Files.write(cpu + "/cpu.cfs_quota_us", "\(v)") }
            }
            if let cs = dirs["cpuset"] {
                if let v = r.cpus { try Files.write(cs + "/cpuset.cpus", v) }
                if let v = r.mems { try Files.write(cs + "/cpuset.mems", v) }
            }
            if let p = dirs["pids"], let v = r.pidsLimit { try Files.write(p + "/pids.max", v <= 0 ? "max" : "\(v)") }
            if let b = dirs["blkio"], let v = r.blkioWeight, Files.exists(b + "/blkio.weight") {
                try Files.write(b + "/blkio.weight", "\(v)")
            }
        case .v2:
            guard let d = dirs[""] else { return }
            if let v = r.memoryLimit { try Files.write(d + "/memory.max", v < 0 ? "max" : "\(v)") }
            if let v = r.memoryReservation { try Files.write(d + "/memory.low", "\(v)") }
            if let v = r.memorySwap, let limit = r.memoryLimit, Files.exists(d + "/memory.swap.max") {
                // OCI swap is memory+swap; cgroup2 limits swap alone.
                try Files.write(d + "/memory.swap.max", v < 0 ? "max" : "\(max(0, v - limit))")
            }
            if let shares = r.cpuShares {
                // The conversion runc and crun use: [2, 262144] shares onto [1, 10000] weight.
                let weight = 1 + ((max(2, min(shares, 262144)) - 2) * 9999) / 262142
                try Files.write(d + "/cpu.weight", "\(weight)")
            }
            if r.cpuQuota != nil || r.cpuPeriod != nil {
                let quota = r.cpuQuota.map { $0 < 0 ? "max" : "\($0)" } ?? "max"
                try Files.write(d + "/cpu.max", "\(quota) \(r.cpuPeriod ?? 100000)")
            }
            if let v = r.cpus { try Files.write(d + "/cpuset.cpus", v) }
            if let v = r.mems { try Files.write(d + "/cpuset.mems", v) }
            if let v = r.pidsLimit { try Files.write(d + "/pids.max", v <= 0 ? "max" : "\(v)") }
            if let v = r.blkioWeight, Files.exists(d + "/io.weight") {
                // blkio.weight's [10, 1000] onto io.weight's [1, 10000]; the OCI value is not
                // range-checked by clients, so clamp rather than underflow.
                let w = UInt32(min(max(v, 10), 1000))
                try Files.write(d + "/io.weight", "default \(1 + (w - 10) * 9999 / 990)")
            }
            for (k, v) in r.unified.sorted(by: { $0.key < $1.key }) {
                guard !k.contains("/") && !k.hasPrefix(".") else {
                    throw SystemError("cgroup unified key", k, errno: .EINVAL)
                }
                try Files.write(d + "/" + k, v)
            }
        }
    }

    /// Every process in the cgroup (the pids hierarchy on v1: it has them all).
    public func processes() -> [pid_t] {
        let dir = mode == .v2 ? dirs[""] : (dirs["pids"] ?? dirs["memory"] ?? dirs.values.first)
        guard let dir, let text = try? Files.readString(dir + "/cgroup.procs") else { return [] }
        return text.split(separator: "\n").compactMap { pid_t($0) }
    }

    public func freeze() throws(SystemError) { try setFrozen(true) }
    public func thaw() throws(SystemError) { try setFrozen(false) }

    func setFrozen(_ frozen: Bool) throws(SystemError) {
        switch mode {
        case .v1:
            guard let f = dirs["freezer"] else { throw SystemError("freezer", path, errno: .ENOSYS) }
            try Files.write(f + "/freezer.state", frozen ? "FROZEN" : "THAWED")
        case .v2:
            try Files.write(dirs[""]! + "/cgroup.freeze", frozen ? "1" : "0")
        }
    }

    /// The file whose change means "OOM kill happened": v2 memory.events (watched with
    /// inotify/poll), v1 memory.oom_control (registered through cgroup.event_control).
    public var oomEventsFile: String? {
        mode == .v2 ? dirs[""].map { $0 + "/memory.events" } : dirs["memory"].map { $0 + "/memory.oom_control" }
    }

    /// Reads counters for Stats: file name → value, memory.stat lines as "stat.<key>".
    public func counters() -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        func one(_ dir: String?, _ file: String, as name: String? = nil) {
            guard let dir, let t = try? Files.readString(dir + "/" + file) else { return }
            let s = t.trimmingWhitespace
            out[name ?? file] = s == "max" ? UInt64.max : UInt64(s)
        }
        func table(_ dir: String?, _ file: String, prefix: String) {
            guard let dir, let t = try? Files.readString(dir + "/" + file) else { return }
            for line in t.split(separator: "\n") {
                let kv = line.split(separator: " ")
                if kv.count == 2, let v = UInt64(kv[1]) { out[prefix + kv[0]] = v }
            }
        }
        switch mode {
        case .v1:
            let m = dirs["memory"]
            for f in ["memory.usage_in_bytes", "memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.failcnt",
                      "memory.memsw.usage_in_bytes", "memory.memsw.limit_in_bytes", "memory.memsw.max_usage_in_bytes",
                      "memory.kmem.usage_in_bytes", "memory.kmem.limit_in_bytes"] { one(m, f) }
            table(m, "memory.stat", prefix: "stat.")
            table(m, "memory.oom_control", prefix: "oom.")
            one(dirs["cpuacct"], "cpuacct.usage")
            table(dirs["cpuacct"], "cpuacct.stat", prefix: "cpuacct.")
            table(dirs["cpu"], "cpu.stat", prefix: "cpu.")
            one(dirs["pids"], "pids.current")
            one(dirs["pids"], "pids.max")
        case .v2:
            let d = dirs[""]
            for f in ["memory.current", "memory.max", "memory.swap.current", "memory.swap.max", "pids.current", "pids.max"] { one(d, f) }
            table(d, "memory.stat", prefix: "stat.")
            table(d, "memory.events", prefix: "events.")
            table(d, "cpu.stat", prefix: "cpu.")
        }
        return out
    }

    /// Per-CPU usage in ns (v1 cpuacct.usage_percpu).
    public func perCPUUsage() -> [UInt64] {
        guard mode == .v1, let d = dirs["cpuacct"], let t = try? Files.readString(d + "/cpuacct.usage_percpu") else { return [] }
        return t.split(separator: " ").compactMap { UInt64($0.trimmingWhitespace) }
    }

    /// Every directory of this cgroup and of the cgroups its processes made below it
    /// (systemd or a nested runtime in a container does), deepest first. Directory
    /// entries' types come from readdir: no stat per control file.
    public func directoryTree() -> [String] {
        var out: [String] = []
        func walk(_ dir: String) {
            for name in Files.subdirectories(dir) { walk(dir + "/" + name) }
            out.append(dir)
        }
        for dir in dirs.values { walk(dir) }
        return out.sorted { $0.count > $1.count }
    }

    /// SIGKILLs every process in the cgroup; `subtree`: in the cgroups below it too.
    public func killAll(subtree: Bool = false) {
        if mode == .v2, let d = dirs[""], (try? Files.write(d + "/cgroup.kill", "1")) != nil { return }
        guard subtree else {
            for pid in processes() { kill(pid, SIGKILL) }
            return
        }
        var pids = Set<pid_t>()
        for dir in directoryTree() {
            guard let text = try? Files.readString(dir + "/cgroup.procs") else { continue }
            pids.formUnion(text.split(separator: "\n").compactMap { pid_t($0) })
        }
        for pid in pids { kill(pid, SIGKILL) }
    }

    /// One pass at removing the cgroup's directories, deepest first; never waits. The
    /// usual case costs one rmdir per hierarchy; a directory that is busy is looked into
    /// for cgroups made below it, which go first. Right after the last exit the kernel
    /// may still answer EBUSY for a while: `busy` says so, and the caller tries again
    /// later (on a timer, not here).
    public func removeOnce() -> (busy: Bool, error: SystemError?) {
        var busy = false
        var firstError: SystemError?
        func remove(_ dir: String, descend: Bool) {
            if rmdir(dir) == 0 || Errno.current == .ENOENT { return }
            let e = Errno.current
            if e == .EBUSY && descend {
                let below = Files.subdirectories(dir)
                if !below.isEmpty {
                    for name in below { remove(dir + "/" + name, descend: true) }
                    remove(dir, descend: false)
                    return
                }
            }
            if e == .EBUSY { busy = true } else if firstError == nil { firstError = SystemError("rmdir", dir, errno: e) }
        }
        for dir in dirs.values.sorted(by: { $0.count > $1.count }) { remove(dir, descend: true) }
        return (busy, firstError)
    }
}

extension StringProtocol {
    /// Without spaces, tabs and newlines at either end. On UTF-8 bytes, not Characters:
    /// a guest's PID 1 calls it on its way to serving, where grapheme breaking run for the
    /// first time is translated code under TCG.
    package var trimmingWhitespace: String {
        var text = String(self)
        return text.withUTF8 { u in
            func blank(_ b: UInt8) -> Bool { b == 0x20 || b == 0x0A || b == 0x09 }
            var lo = 0, hi = u.count
            while lo < hi, blank(u[lo]) { lo += 1 }
            while hi > lo, blank(u[hi - 1]) { hi -= 1 }
            return String(decoding: UnsafeBufferPointer(rebasing: u[lo..<hi]), as: UTF8.self)
        }
    }
}

extension Cgroup {
    /// A descriptor that turns readable when the kernel OOM-kills in this cgroup:
    /// v1: an eventfd registered through cgroup.event_control on memory.oom_control;
    /// v2: an inotify watch on memory.events (read `oomKillCount` to tell a kill apart).
    public func oomNotifier() throws(SystemError) -> OwnedFD {
        switch mode {
        case .v1:
            guard let mem = dirs["memory"] else { throw SystemError("oom notifier", path, errno: .ENOSYS) }
            let efd = try EventFD.make()
            let control = mem + "/memory.oom_control"
            let ofd = open(control, O_RDONLY | O_CLOEXEC)
            guard ofd >= 0 else {
                let e = Errno.current
                efd.close()
                throw SystemError("open", control, errno: e)
            }
            defer { _ = close(ofd) }
            do { try Files.write(mem + "/cgroup.event_control", "\(efd.rawValue) \(ofd)") } catch {
                efd.close()
                throw error
            }
            return efd
        case .v2:
            let fd = try sys("inotify_init1") { inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC)) }
            let events = dirs[""]! + "/memory.events"
            guard inotify_add_watch(fd, events, UInt32(IN_MODIFY)) >= 0 else {
                let e = Errno.current
                _ = close(fd)
                throw SystemError("inotify_add_watch", events, errno: e)
            }
            return OwnedFD(adopting: fd)
        }
    }

    /// v2: memory.events oom_kill; v1: memory.oom_control oom_kill. One file read: this
    /// runs at every container create and every OOM wake-up.
    public var oomKillCount: UInt64 {
        let file = mode == .v2 ? dirs[""].map { $0 + "/memory.events" } : dirs["memory"].map { $0 + "/memory.oom_control" }
        guard let file, let text = try? Files.readString(file) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("oom_kill ") {
            return UInt64(line.dropFirst("oom_kill ".count)) ?? 0
        }
        return 0
    }
}
