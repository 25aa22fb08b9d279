import Runtime
#if canImport(Glibc)
import Glibc
#endif

/// One client process, `inFlight` messages of `size` bytes outstanding at all times,
/// for `seconds`. Non-blocking with poll(2) so it never deadlocks against a server
/// that applies back-pressure. Round trip = send of a message → its last byte back.
struct EchoResult: Codable {
    var server: String
    var size: Int
    var inFlight: Int
    var messages: Int
    var seconds: Double
    var perSecond: Double
    var p50us: Double
    var p99us: Double
    var serverCPUPercent: Double = 0
    var serverCPUusPerMessage: Double = 0
}

enum EchoClient {
    static func run(socket: String, size: Int, inFlight: Int, seconds: Double, server: String) throws -> EchoResult {
        // The client owns this raw descriptor for the whole function.
        let raw = try Socket.connectUnix(path: socket).take()
        defer { close(raw) }
        // Everything queued goes out in one write: the client must cost less than any
        // server it measures, or it measures itself.
        let outBuffer = [UInt8](repeating: 0x5A, count: size * inFlight)
        var sendTimes = [UInt64](repeating: 0, count: inFlight + 1)  // ring of send times
        var head = 0, tail = 0
        var outstanding = 0
        var toSend = 0        // bytes of queued messages not yet written
        var received = 0      // bytes of the current incoming message
        var latencies: [UInt32] = []
        latencies.reserveCapacity(2_000_000)
        var buf = [UInt8](repeating: 0, count: 256 * 1024)

        func now() -> UInt64 {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        }
        func queueMessage() {
            sendTimes[tail] = now()
            tail = (tail + 1) % sendTimes.count
            outstanding += 1
            toSend += size
        }
        for _ in 0..<inFlight { queueMessage() }

        let start = now()
        let end = start + UInt64(seconds * 1e9)
        var done = 0
        var stopping = false
        while !(stopping && outstanding == 0) {
            var p = pollfd(fd: raw, events: Int16(POLLIN) | (toSend > 0 ? Int16(POLLOUT) : 0), revents: 0)
            if poll(&p, 1, 5000) <= 0 { throw SystemError("poll", "echo server stalled", errno: .ETIMEDOUT) }
            if p.revents & Int16(POLLOUT) != 0 {
                while toSend > 0 {
                    let n = outBuffer.withUnsafeBytes { write(raw, $0.baseAddress!, min(toSend, $0.count)) }
                    if n <= 0 { break }
                    toSend -= n
                }
            }
            if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let n = buf.withUnsafeMutableBytes { read(raw, $0.baseAddress, $0.count) }
                if n == 0 { throw SystemError("read", "echo server closed", errno: .ECONNRESET) }
                if n > 0 {
                    var left = n
                    let t = now()
                    while left > 0 {
                        let take = min(left, size - received)
                        received += take
                        left -= take
                        if received == size {
                            received = 0
                            latencies.append(UInt32(min(t - sendTimes[head], UInt64(UInt32.max))))
                            head = (head + 1) % sendTimes.count
                            outstanding -= 1
                            done += 1
                            if t < end { queueMessage() } else { stopping = true }
                        }
                    }
                }
            }
        }
        let elapsed = Double(now() - start) / 1e9
        latencies.sort()
        func pct(_ q: Double) -> Double {
            latencies.isEmpty ? 0 : Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * q))]) / 1000
        }
        return EchoResult(server: server, size: size, inFlight: inFlight, messages: done, seconds: elapsed,
                          perSecond: Double(done) / elapsed, p50us: pct(0.50), p99us: pct(0.99))
    }
}
