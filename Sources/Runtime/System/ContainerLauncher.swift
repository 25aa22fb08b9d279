#if canImport(Glibc)
import Glibc
#endif
import CShims
import KuasarOCI

/// A child that has been cloned and waits on its sync socket: first for 'G' (go), then,
/// for a container's init, for 'S' (start) after it reported ready.
@frozen public struct LaunchedChild: ~Copyable {
    public let pid: pid_t
    public var pidfd: OwnedFD
    public var sync: OwnedFD
}

/// Where the child runs: a new container (its own root and namespaces from the spec) or
/// an exec into a running one.
public enum LaunchTarget {
    case initProcess(rootfs: String)
    /// Joins every namespace `namespaces` lists of the process behind `pidfd`.
    case exec(pidfd: Int32, namespaces: UInt64)
}

/// What a container's child executes instead of `process.args[0]` looked up in its root:
/// a program the parent opened on the host (the wasm kind's runner, run by the host's
/// dynamic loader), so the container's root cannot stand in for it. `fds` are the
/// parent's descriptors the child gets at these numbers (above stdio), the loader's
/// library directories and the runner among them; their owner keeps them open.
public struct HostProgram {
    public var fd: Int32
    public var argv: [String]
    public var env: [String]
    public var fds: [(from: Int32, to: Int32)]

    public init(fd: Int32, argv: [String], env: [String], fds: [(from: Int32, to: Int32)]) {
        self.fd = fd
        self.argv = argv
        self.env = env
        self.fds = fds
    }
}

/// Turns an OCI spec into the attr the C child runs (CShims' container.c) and clones it.
/// Everything that allocates — JSON, path lookups, the seccomp filter — happens here in
/// the parent; the child only makes system calls.
public enum ContainerLauncher {
    /// The size of one report on a child's sync socket (CShims' ks_child_report).
    public static let childReportSize = MemoryLayout<ks_child_report>.size

    public static let defaultDevices: [OCISpec.Device] = [
        .init(type: "c", path: "/dev/null", major: 1, minor: 3, fileMode: 0o666, uid: 0, gid: 0),
        .init(type: "c", path: "/dev/zero", major: 1, minor: 5, fileMode: 0o666, uid: 0, gid: 0),
        .init(type: "c", path: "/dev/full", major: 1, minor: 7, fileMode: 0o666, uid: 0, gid: 0),
        .init(type: "c", path: "/dev/tty", major: 5, minor: 0, fileMode: 0o666, uid: 0, gid: 0),
        .init(type: "c", path: "/dev/urandom", major: 1, minor: 9, fileMode: 0o666, uid: 0, gid: 0),
        .init(type: "c", path: "/dev/random", major: 1, minor: 8, fileMode: 0o666, uid: 0, gid: 0),
    ]

    /// Clones the child. `stdio` maps parent fds to 0/1/2; with `console` the child makes
    /// a pty in the container instead and sends its master back.
    public static func launch(
        spec: OCISpec, process: OCISpec.Process, target: LaunchTarget, bundle: String,
        stdio: [(from: Int32, to: Int32)], console: Bool, cgroup: Cgroup?, selfPidNamespace: Int32,
        program: HostProgram? = nil
    ) throws -> LaunchedChild {
        let arena = CArena()
        defer { arena.free() }
        var attr = ks_container_attr()
        var openedFDs: [Int32] = []
        defer { for fd in openedFDs { _ = Glibc.close(fd) } }

        // The process.
        let args = process.args ?? []
        attr.path = arena.string(args[0])
        attr.argv = arena.stringArray(program?.argv ?? args)
        attr.exec_fd = program?.fd ?? -1
        var env = program?.env ?? process.env ?? []
        if !env.contains(where: { $0.hasPrefix("PATH=") }) {
            env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        }
        if process.terminal == true && !env.contains(where: { $0.hasPrefix("TERM=") }) { env.append("TERM=xterm") }
        attr.envp = arena.stringArray(env)
        attr.cwd = arena.string(process.cwd)
        let fds = (console ? [] : stdio) + (program?.fds ?? [])
        attr.fds = arena.array(fds.map { ks_fd_map(from: $0.from, to: $0.to) })
        attr.fd_count = Int32(fds.count)
        attr.create_console = console ? 1 : 0
        attr.uid = process.user.uid
        attr.gid = process.user.gid
        let gids = process.user.additionalGids ?? []
        attr.gids = arena.array(gids)
        attr.gid_count = Int32(gids.count)
        attr.umask = process.user.umask.map { Int32($0) } ?? 0o022
        if let caps = process.capabilities {
            attr.has_caps = 1
            attr.cap_bounding = CapabilityNames.mask(caps.bounding)
            attr.cap_effective = CapabilityNames.mask(caps.effective)
            attr.cap_permitted = CapabilityNames.mask(caps.permitted)
            attr.cap_inheritable = CapabilityNames.mask(caps.inheritable)
            attr.cap_ambient = CapabilityNames.mask(caps.ambient)
        }
        let rlimits = (process.rlimits ?? []).compactMap { r in
            Rlimits.resource(r.type).map { ks_rlimit(resource: $0, soft: r.soft, hard: r.hard) }
        }
        attr.rlimits = arena.array(rlimits)
        attr.rlimit_count = Int32(rlimits.count)
        if let o = process.oomScoreAdj { attr.has_oom_score_adj = 1; attr.oom_score_adj = Int32(o) }
        attr.no_new_privs = process.noNewPrivileges == true ? 1 : 0
        if let seccomp = spec.linux?.seccomp {
            let bpf = try exportSeccomp(seccomp)
            attr.seccomp_filter = UnsafeRawPointer(arena.array(bpf))
            attr.seccomp_len = UInt16(bpf.count / 8)
        }
        attr.cgroup_fd = -1
        attr.setns_pidfd = -1
        attr.sync_fd = -1
        attr.parent_sync_fd = -1

        var joinPidNamespace: Int32 = -1
        switch target {
        case .exec(let pidfd, let namespaces):
            attr.setns_pidfd = pidfd
            attr.setns_pidfd_flags = Int32(truncatingIfNeeded: namespaces & ~NamespaceFlag.pid)
            if namespaces & NamespaceFlag.pid != 0 { joinPidNamespace = pidfd }
            if let dir = cgroup?.unifiedDirectory {
                let fd = try sys("open", dir) { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
                openedFDs.append(fd)
                attr.cgroup_fd = fd
            }
        case .initProcess(let rootfs):
            var joins: [(fd: Int32, type: Int32)] = []
            for ns in spec.linux?.namespaces ?? [] {
                let flag = NamespaceFlag.flag(ns.type)
                if let path = ns.path {
                    let fd = try sys("open namespace", path) { open(path, O_RDONLY | O_CLOEXEC) }
                    openedFDs.append(fd)
                    if ns.type == "pid" { joinPidNamespace = fd; continue }
                    // The user namespace goes first: the others are owned by it.
                    if ns.type == "user" { joins.insert((fd, Int32(flag)), at: 0) } else { joins.append((fd, Int32(flag))) }
                } else {
                    attr.clone_flags |= flag
                }
            }
            attr.join_fds = arena.array(joins.map(\.fd))
            attr.join_types = arena.array(joins.map(\.type))
            attr.join_count = Int32(joins.count)
            if let dir = cgroup?.unifiedDirectory {
                let fd = try sys("open", dir) { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
                openedFDs.append(fd)
                attr.cgroup_fd = fd
            }
            // A cgroup namespace's root is the cgroup its creator is in: with v1 (no
            // CLONE_INTO_CGROUP) that is only right once the child has joined its cgroups.
            if cgroup?.mode == .v1, !attrCreatesUserNamespace(spec: spec, target: target), attr.clone_flags & NamespaceFlag.flag("cgroup") != 0 {
                attr.clone_flags &= ~NamespaceFlag.flag("cgroup")
                attr.late_cgroupns = 1
            }
            if attr.clone_flags & NamespaceFlag.mount != 0 {
                try planRootfs(spec: spec, rootfs: rootfs, bundle: bundle, cgroup: cgroup, attr: &attr, arena: arena)
            }
            let hasUTS = spec.linux?.namespaces?.contains { $0.type == "uts" } ?? false
            if hasUTS, let h = spec.hostname, !h.isEmpty { attr.hostname = arena.string(h) }
            if hasUTS, let d = spec.domainname, !d.isEmpty { attr.domainname = arena.string(d) }
            let sysctls = (spec.linux?.sysctl ?? [:]).sorted { $0.key < $1.key }
            attr.sysctls = arena.array(sysctls.map { ks_sysctl(key: arena.string($0.key), value: arena.string($0.value)) })
            attr.sysctl_count = Int32(sysctls.count)
            attr.wait_for_start = 1
        }

        let pairParts = try Socket.pair()
        attr.sync_fd = pairParts.second.rawValue
        attr.parent_sync_fd = pairParts.first.rawValue
        var pid: pid_t = 0, pidfd: Int32 = -1
        let rc: Int32
        if joinPidNamespace >= 0 {
            // setns(CLONE_NEWPID) changes where our next child is born, not where we
            // are: clone into the target's pid namespace, then point back at our own.
            let joined = ks_setns(joinPidNamespace, Int32(NamespaceFlag.pid))
            if joined < 0 {
                pairParts.first.close(); pairParts.second.close()
                throw SystemError("setns(pid)", nil, errno: Errno(rawValue: -joined))
            }
            rc = ks_container_clone(&attr, &pid, &pidfd)
            _ = ks_setns(selfPidNamespace, Int32(NamespaceFlag.pid))
        } else {
            rc = ks_container_clone(&attr, &pid, &pidfd)
        }
        pairParts.second.close()
        if rc < 0 {
            pairParts.first.close()
            throw SystemError("clone3", args[0], errno: Errno(rawValue: -rc))
        }
        return LaunchedChild(pid: pid, pidfd: OwnedFD(adopting: pidfd), sync: OwnedFD(adopting: pairParts.first.take()))
    }

    /// Whether the child is cloned into a new user namespace (its cgroup namespace is then
    /// made at clone time, and its v1 cgroups joined before it does anything).
    package static func attrCreatesUserNamespace(spec: OCISpec, target: LaunchTarget) -> Bool {
        guard case .initProcess = target else { return false }
        return spec.linux?.namespaces?.contains { $0.type == "user" && $0.path == nil } ?? false
    }

    static func planRootfs(
        spec: OCISpec, rootfs: String, bundle: String, cgroup: Cgroup?, attr: inout ks_container_attr, arena: CArena
    ) throws {
        attr.rootfs = arena.string(rootfs)
        attr.rootfs_readonly = spec.root?.readonly == true ? 1 : 0
        if let p = spec.linux?.rootfsPropagation { attr.rootfs_propagation = MountOptions.propagation(p) ?? 0 }
        var ops: [ks_mount_op] = []
        var mountsDev = false
        for m in spec.mounts ?? [] {
            let options = m.options ?? []
            var flags: UInt = 0, clear: UInt = 0, propagation: UInt = 0
            var data: [String] = []
            var recursiveRO = false
            for o in options {
                if o == "rro" { recursiveRO = true; continue }
                if let p = MountOptions.propagation(o) { propagation = p; continue }
                if let f = MountOptions.flag(o) { flags |= f.set; clear |= f.clear } else { data.append(o) }
            }
            flags &= ~clear
            let isBind = m.type == "bind" || flags & MountOptions.BIND != 0
            if m.destination == "/dev" { mountsDev = true }
            if m.type == "cgroup" || m.type == "cgroup2" {
                ops += cgroupMounts(m.destination, readOnly: flags & MountOptions.RDONLY != 0, cgroup: cgroup,
                                    ownNamespace: attr.clone_flags & NamespaceFlag.cgroup != 0, arena: arena)
                continue
            }
            var op = ks_mount_op()
            op.target = arena.string(m.destination)
            if isBind {
                var source = m.source ?? ""
                if !source.hasPrefix("/") { source = bundle + "/" + source }
                var st = stat()
                guard stat(source, &st) == 0 else { throw SystemError("stat bind source", source, errno: .current) }
                op.source = arena.string(source)
                op.flags = MountOptions.BIND | (flags & MountOptions.REC)
                op.remount_flags = flags & ~(MountOptions.BIND | MountOptions.REC | MountOptions.REMOUNT)
                op.target_is_file = (st.st_mode & S_IFMT) == S_IFDIR ? 0 : 1
            } else {
                op.source = arena.string(m.source ?? m.type ?? "none")
                op.fstype = arena.string(m.type ?? "none")
                op.flags = flags
                if !data.isEmpty { op.data = arena.string(data.joined(separator: ",")) }
            }
            op.propagation = propagation
            op.recursive_ro = recursiveRO ? 1 : 0
            ops.append(op)
        }
        attr.mounts = arena.array(ops)
        attr.mount_count = Int32(ops.count)

        var devices = mountsDev ? defaultDevices : []
        for d in spec.linux?.devices ?? [] {
            devices.removeAll { $0.path == d.path }
            devices.append(d)
        }
        let cdevs = devices.map { d -> ks_device in
            let typeBits: UInt32
            switch d.type {
            case "b": typeBits = UInt32(S_IFBLK)
            case "p": typeBits = UInt32(S_IFIFO)
            default: typeBits = UInt32(S_IFCHR)
            }
            return ks_device(path: arena.string(d.path), mode: typeBits | ((d.fileMode ?? 0o666) & 0o7777),
                             major: UInt32(d.major ?? 0), minor: UInt32(d.minor ?? 0), uid: d.uid ?? 0, gid: d.gid ?? 0)
        }
        attr.devices = arena.array(cdevs)
        attr.device_count = Int32(cdevs.count)
        attr.setup_dev = mountsDev ? 1 : 0
        let masked = spec.linux?.maskedPaths ?? []
        attr.masked = arena.constStringArray(masked)
        attr.masked_count = Int32(masked.count)
        let ro = spec.linux?.readonlyPaths ?? []
        attr.readonly = arena.constStringArray(ro)
        attr.readonly_count = Int32(ro.count)
    }

    /// A `cgroup` mount: cgroup2 when the container has its own cgroup namespace on a v2
    /// host; otherwise the container's own cgroup directories bound in, so it sees its
    /// limits and nothing of its neighbours.
    static func cgroupMounts(_ dest: String, readOnly: Bool, cgroup: Cgroup?, ownNamespace: Bool, arena: CArena) -> [ks_mount_op] {
        let ro = readOnly ? MountOptions.RDONLY : 0
        let common = MountOptions.NOSUID | MountOptions.NODEV | MountOptions.NOEXEC
        guard let cgroup else { return [] }
        if cgroup.mode == .v2 {
            var op = ks_mount_op()
            op.target = arena.string(dest)
            if ownNamespace {
                op.source = arena.string("cgroup2"); op.fstype = arena.string("cgroup2"); op.flags = common | ro
            } else {
                op.source = arena.string(cgroup.dirs[""]!); op.flags = MountOptions.BIND; op.remount_flags = common | ro
            }
            return [op]
        }
        var tmp = ks_mount_op()
        tmp.target = arena.string(dest)
        tmp.source = arena.string("tmpfs")
        tmp.fstype = arena.string("tmpfs")
        tmp.flags = common
        tmp.data = arena.string("mode=755")
        var ops = [tmp]
        for controller in cgroup.order {
            guard let dir = cgroup.dirs[controller] else { continue }
            var b = ks_mount_op()
            b.target = arena.string(dest + "/" + controller)
            b.source = arena.string(dir)
            b.flags = MountOptions.BIND
            b.remount_flags = common | ro
            ops.append(b)
        }
        return ops
    }

    /// Builds the BPF program with libseccomp (in the parent: it allocates).
    static func exportSeccomp(_ s: OCISpec.Seccomp) throws -> [UInt8] {
        guard let def = SeccompNames.action(s.defaultAction, errno: s.defaultErrnoRet) else {
            throw SpecError("linux.seccomp.defaultAction", "unknown action \"\(s.defaultAction)\"")
        }
        let arena = CArena()
        defer { arena.free() }
        let arches = (s.architectures ?? []).compactMap { SeccompNames.arch($0) }
        var rules: [ks_seccomp_rule] = []
        for sc in s.syscalls ?? [] {
            guard let action = SeccompNames.action(sc.action, errno: sc.errnoRet) else { continue }
            let args = (sc.args ?? []).map { a in
                ks_seccomp_arg(index: a.index, op: SeccompNames.op(a.op) ?? 4, value: a.value, value2: a.valueTwo ?? 0)
            }
            let cargs = arena.array(args)
            for name in sc.names {
                rules.append(ks_seccomp_rule(name: arena.string(name), action: action, args: cargs, arg_count: Int32(args.count)))
            }
        }
        var errbuf = [CChar](repeating: 0, count: 128)
        let fd = arches.withUnsafeBufferPointer { a in
            rules.withUnsafeBufferPointer { r in
                ks_seccomp_export(def, a.baseAddress, Int32(a.count), r.baseAddress, Int32(r.count), &errbuf, errbuf.count)
            }
        }
        if fd < 0 {
            let name = String(decoding: errbuf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw SpecError("linux.seccomp.syscalls", "libseccomp refused \(name.isEmpty ? "the filter" : "the rule for \(name)"): \(Errno(rawValue: -fd))")
        }
        defer { _ = close(fd) }
        var size = stat()
        _ = fstat(fd, &size)
        var out = [UInt8](repeating: 0, count: Int(size.st_size))
        _ = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        return out
    }
}
