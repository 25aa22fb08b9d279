import Testing
@testable import Runtime
#if canImport(Glibc)
import Glibc
#endif

extension AllTests {
@Suite struct AcceptStormTests {
    /// 1,000 clients connect at once; every one is accepted, served and closed.
    @Test(arguments: BackendKind.allCases)
    func thousandConnections(kind: BackendKind) throws {
        let dir = "/tmp/kuasar-test-\(getpid())-accept"
        let path = dir + "/storm.sock"
        try withReactor(kind) { reactor in
            let listenFD = try Socket.listenUnix(path: path)
            var served = 0
            var open: [Connection] = []
            let listener = try Listener(reactor: reactor, fd: listenFD) { fd in
                let conn = Connection(reactor: reactor, fd: fd)
                conn.onRead = { c, bytes in
                    c.write(bytes)  // echo
                    served += 1
                }
                try? conn.start()
                open.append(conn)
            }
            var clients: [Int32] = []
            for _ in 0..<1000 {
                clients.append(try Socket.connectUnix(path: path).take())
            }
            try spin(reactor, "1000 accepts") { listener.acceptedCount == 1000 }
            for c in clients { #expect(writeRaw(c, [42]) == 1) }
            try spin(reactor, "1000 echoes") { served == 1000 }
            for c in clients {
                let fd = OwnedFD(adopting: c)
                #expect(try fd.readExactly(1) == [42])
                fd.close()
            }
            try spin(reactor, "1000 hang-ups") { open.allSatisfy { $0.state == .closed } }
            listener.close()
            unlink(path)
        }
        rmdir(dir)
    }
}
}
