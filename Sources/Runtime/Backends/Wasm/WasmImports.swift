#if canImport(Glibc)
import Glibc
#endif
import KuasarSystem
import KuasarWire

/// What the daemon checks of a module at Create, before any engine runs it: the header,
/// that every section fits in the file (a truncated download is named as such), and that
/// every import is a WASI preview 1 function — the only host either engine provides — so
/// `env.foo` fails Create, naming the import, instead of the runner failing at Start.
/// Reads only section headers and the import section (a few kB), through `pread`.
public enum WasmImports {
    /// `wasi_snapshot_preview1`'s functions (also served under the older `wasi_unstable`).
    public static let preview1: Set<String> = [
        "args_get", "args_sizes_get", "environ_get", "environ_sizes_get", "clock_res_get", "clock_time_get",
        "fd_advise", "fd_allocate", "fd_close", "fd_datasync", "fd_fdstat_get", "fd_fdstat_set_flags",
        "fd_fdstat_set_rights", "fd_filestat_get", "fd_filestat_set_size", "fd_filestat_set_times", "fd_pread",
        "fd_prestat_get", "fd_prestat_dir_name", "fd_pwrite", "fd_read", "fd_readdir", "fd_renumber", "fd_seek",
        "fd_sync", "fd_tell", "fd_write", "path_create_directory", "path_filestat_get", "path_filestat_set_times",
        "path_link", "path_open", "path_readlink", "path_remove_directory", "path_rename", "path_symlink",
        "path_unlink_file", "poll_oneoff", "proc_exit", "proc_raise", "sched_yield", "random_get",
        "sock_accept", "sock_recv", "sock_send", "sock_shutdown",
    ]

    /// More sections than any toolchain writes (each is a read at Create).
    public static let maxSections = 10_000

    public struct Import: Equatable, Sendable {
        public var module: String
        public var name: String
        /// 0 function, 1 table, 2 memory, 3 global, 4 tag.
        public var kind: UInt8
    }

    /// Does the file at `fd` start with the wasm magic (the entrypoint test)?
    public static func hasMagic(_ fd: Int32) -> Bool {
        var b = [UInt8](repeating: 0, count: 4)
        return pread(fd, &b, 4, 0) == 4 && b == [0, 0x61, 0x73, 0x6d]
    }

    /// Checks the module in `fd` (`name` in messages) and returns its imports; throws
    /// InvalidArgument naming what is wrong.
    @discardableResult
    public static func check(_ fd: Int32, name: String) throws -> [Import] {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw RPCError(.invalidArgument, "module \(name): \(Errno.current)") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw RPCError(.invalidArgument, "module \(name) is not a regular file") }
        guard st.st_size <= WasmModuleFile.maxBytes else {
            throw RPCError(.invalidArgument, "module \(name) is \(st.st_size >> 20) MiB: more than the \(WasmModuleFile.maxBytes >> 20) MiB a module may be")
        }
        let size = Int(st.st_size)
        var header = [UInt8](repeating: 0, count: 8)
        let n = pread(fd, &header, 8, 0)
        try WasmModuleFile.check(Array(header.prefix(max(n, 0))), path: name)
        var offset = 8
        var imports: [Import] = []
        var sections = 0
        while offset < size {
            // A module of empty sections would keep the daemon's loop reading headers: a real
            // one has a dozen or two (custom ones included).
            sections += 1
            guard sections <= maxSections else {
                throw RPCError(.invalidArgument, "module \(name) has more than \(maxSections) sections: not a module a compiler writes")
            }
            var head = [UInt8](repeating: 0, count: 6)
            let got = pread(fd, &head, 6, off_t(offset))
            guard got > 1 else { throw truncated(name, at: offset) }
            var r = Reader(Array(head.prefix(got)))
            let id = try r.byte(name)
            let length = Int(try r.leb(name))
            let start = offset + r.position
            guard length <= size - start else {
                throw RPCError(.invalidArgument, "module \(name) is truncated: section \(id) at byte \(offset) needs \(length) bytes, the file has \(size - start) left")
            }
            if id == 2 {
                var body = [UInt8](repeating: 0, count: length)
                guard pread(fd, &body, length, off_t(start)) == length else { throw truncated(name, at: start) }
                imports = try parseImports(body, name: name)
            }
            offset = start + length
        }
        for i in imports {
            let wasi = i.module == "wasi_snapshot_preview1" || i.module == "wasi_unstable"
            if !(wasi && i.kind == 0 && preview1.contains(i.name)) {
                let what = ["function", "table", "memory", "global", "tag"][Int(min(i.kind, 4))]
                throw RPCError(.invalidArgument, "module \(name) imports \(what) \(i.module).\(i.name), which no engine here provides (WASI preview 1 functions only)")
            }
        }
        return imports
    }

    static func truncated(_ name: String, at offset: Int) -> RPCError {
        RPCError(.invalidArgument, "module \(name) is truncated at byte \(offset)")
    }

    static func parseImports(_ body: [UInt8], name: String) throws -> [Import] {
        var r = Reader(body)
        let count = try r.leb(name)
        guard count <= UInt32(body.count) else { throw RPCError(.invalidArgument, "module \(name): import section claims \(count) imports in \(body.count) bytes") }
        var out: [Import] = []
        for _ in 0..<count {
            let module = try r.name(name), field = try r.name(name)
            let kind = try r.byte(name)
            switch kind {
            case 0: _ = try r.leb(name)
            case 1: _ = try r.byte(name); try r.limits(name)
            case 2: try r.limits(name)
            case 3: _ = try r.byte(name); _ = try r.byte(name)
            case 4: _ = try r.byte(name); _ = try r.leb(name)
            default: throw RPCError(.invalidArgument, "module \(name): import \(module).\(field) has unknown kind \(kind)")
            }
            out.append(Import(module: module, name: field, kind: kind))
        }
        return out
    }

    struct Reader {
        let bytes: [UInt8]
        var position = 0
        init(_ bytes: [UInt8]) { self.bytes = bytes }

        mutating func byte(_ name: String) throws -> UInt8 {
            guard position < bytes.count else { throw RPCError(.invalidArgument, "module \(name) is malformed: a section ends early") }
            defer { position += 1 }
            return bytes[position]
        }

        mutating func leb(_ name: String) throws -> UInt32 {
            var v: UInt32 = 0
            for shift in stride(from: 0, to: 35, by: 7) {
                let b = try byte(name)
                v |= UInt32(b & 0x7f) << UInt32(shift)
                if b & 0x80 == 0 { return v }
            }
            throw RPCError(.invalidArgument, "module \(name) is malformed: a LEB128 number longer than 5 bytes")
        }

        mutating func name(_ module: String) throws -> String {
            let n = Int(try leb(module))
            guard n <= bytes.count - position else { throw RPCError(.invalidArgument, "module \(module) is malformed: a name runs past its section") }
            defer { position += n }
            return String(decoding: bytes[position..<position + n], as: UTF8.self)
        }

        mutating func limits(_ name: String) throws {
            let flags = try byte(name)
            _ = try leb(name)
            if flags & 1 != 0 { _ = try leb(name) }
        }
    }
}
