import KuasarSystem
import KuasarReactor
import KuasarWire
/// HTTP/2 framing (RFC 9113 §4): a 9-byte header — length (24 bits), type, flags,
/// stream id (31 bits) — then the payload. Pure bytes: nothing here touches a descriptor.
public enum HTTP2 {
    public static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    public static let headerLength = 9
    public static let defaultMaxFrameSize = 16_384
    public static let maxWindow = Int(Int32.max)

    public enum FrameType: UInt8, Sendable {
        case data = 0, headers = 1, priority = 2, rstStream = 3, settings = 4, pushPromise = 5
        case ping = 6, goAway = 7, windowUpdate = 8, continuation = 9
    }

    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let endStream = Flags(rawValue: 0x1)
        public static let ack = Flags(rawValue: 0x1)
        public static let endHeaders = Flags(rawValue: 0x4)
        public static let padded = Flags(rawValue: 0x8)
        public static let priority = Flags(rawValue: 0x20)
    }

    public enum ErrorCode: UInt32, Sendable {
        case noError = 0, protocolError = 1, internalError = 2, flowControlError = 3, settingsTimeout = 4
        case streamClosed = 5, frameSizeError = 6, refusedStream = 7, cancel = 8, compressionError = 9
        case connectError = 10, enhanceYourCalm = 11, inadequateSecurity = 12, http11Required = 13
    }

    public enum Setting: UInt16, Sendable {
        case headerTableSize = 1, enablePush = 2, maxConcurrentStreams = 3, initialWindowSize = 4
        case maxFrameSize = 5, maxHeaderListSize = 6
    }

    public struct Frame: Sendable {
        public var type: UInt8
        public var flags: Flags
        public var streamID: UInt32
        public var payload: [UInt8]
        public var frameType: FrameType? { FrameType(rawValue: type) }
    }

    public static func appendFrame(to out: inout [UInt8], type: FrameType, flags: Flags = [], streamID: UInt32,
                                   payload: UnsafeRawBufferPointer) {
        let n = payload.count
        out.append(UInt8(truncatingIfNeeded: n >> 16)); out.append(UInt8(truncatingIfNeeded: n >> 8)); out.append(UInt8(truncatingIfNeeded: n))
        out.append(type.rawValue)
        out.append(flags.rawValue)
        appendU32(to: &out, streamID & 0x7FFF_FFFF)
        out.append(contentsOf: payload)
    }

    public static func appendFrame(to out: inout [UInt8], type: FrameType, flags: Flags = [], streamID: UInt32, payload: [UInt8] = []) {
        payload.withUnsafeBytes { appendFrame(to: &out, type: type, flags: flags, streamID: streamID, payload: $0) }
    }

    static func appendU32(to out: inout [UInt8], _ v: UInt32) {
        out.append(UInt8(v >> 24)); out.append(UInt8(truncatingIfNeeded: v >> 16))
        out.append(UInt8(truncatingIfNeeded: v >> 8)); out.append(UInt8(truncatingIfNeeded: v))
    }

    static func u32(_ b: ArraySlice<UInt8>) -> UInt32 {
        let i = b.startIndex
        return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }
}

/// A connection-level failure: GOAWAY with this code, then close.
public struct HTTP2ConnectionError: Error, Equatable, Sendable {
    public var code: HTTP2.ErrorCode
    public var reason: String
}

/// Splits the client's byte stream into the preface and frames. At most one frame
/// (bounded by the max frame size we advertised) is buffered.
public struct HTTP2FrameDecoder: Sendable {
    private var input = InputBuffer()
    private var prefaceSeen = false
    public var maxFrameSize: Int

    /// `expectPreface`: a server's decoder (the client opens with the preface); a
    /// client's decoder reads frames from the first byte.
    public init(maxFrameSize: Int = HTTP2.defaultMaxFrameSize, expectPreface: Bool = true) {
        self.maxFrameSize = maxFrameSize
        prefaceSeen = !expectPreface
    }

    public var bufferedCount: Int { input.count }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) { input.append(bytes) }

    public mutating func append(_ bytes: [UInt8]) { bytes.withUnsafeBytes { append($0) } }

    /// The next frame; nil when more bytes are needed. Throws for a bad preface or a
    /// frame over the size we allow.
    public mutating func next() throws(HTTP2ConnectionError) -> HTTP2.Frame? {
        if !prefaceSeen {
            let have = min(input.count, HTTP2.preface.count)
            guard input.slice(0..<have).elementsEqual(HTTP2.preface[..<have]) else {
                throw HTTP2ConnectionError(code: .protocolError, reason: "bad connection preface (not HTTP/2 prior knowledge)")
            }
            if have < HTTP2.preface.count { return nil }
            input.consume(HTTP2.preface.count)
            prefaceSeen = true
        }
        guard input.count >= HTTP2.headerLength else { return nil }
        let length = Int(input[0]) << 16 | Int(input[1]) << 8 | Int(input[2])
        if length > maxFrameSize {
            throw HTTP2ConnectionError(code: .frameSizeError, reason: "frame of \(length) bytes exceeds SETTINGS_MAX_FRAME_SIZE \(maxFrameSize)")
        }
        let total = HTTP2.headerLength + length
        guard input.count >= total else { return nil }
        let frame = HTTP2.Frame(type: input[3], flags: HTTP2.Flags(rawValue: input[4]),
                                streamID: HTTP2.u32(input.slice(5..<9)) & 0x7FFF_FFFF,
                                payload: Array(input.slice(HTTP2.headerLength..<total)))
        input.consume(total)
        return frame
    }
}
