import KuasarSystem
import KuasarReactor
/// ttrpc framing: a 10-byte header — data length (u32 BE, at most 4 MiB), stream id
/// (u32 BE, odd when the client opened the stream), message type (u8), flags (u8) —
/// then the data. Pure bytes: nothing here touches a descriptor.
public enum TTRPC {
    public static let headerLength = 10
    public static let maxDataLength = 4 << 20

    public enum MessageType: UInt8, Sendable {
        case request = 1
        case response = 2
        case data = 3
    }

    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// The sender will send nothing more on this stream.
        public static let remoteClosed = Flags(rawValue: 0x1)
        /// A request that opens a stream the sender keeps sending on.
        public static let remoteOpen = Flags(rawValue: 0x2)
        /// A data frame that carries no message (as opposed to an empty one).
        public static let noData = Flags(rawValue: 0x4)
    }

    public struct Frame: Equatable, Sendable {
        public var streamID: UInt32
        public var type: UInt8
        public var flags: Flags
        public var payload: [UInt8]

        public init(streamID: UInt32, type: MessageType, flags: Flags = [], payload: [UInt8]) {
            self.streamID = streamID
            self.type = type.rawValue
            self.flags = flags
            self.payload = payload
        }

        init(streamID: UInt32, rawType: UInt8, flags: Flags, payload: [UInt8]) {
            self.streamID = streamID
            self.type = rawType
            self.flags = flags
            self.payload = payload
        }

        public var messageType: MessageType? { MessageType(rawValue: type) }
    }

    /// Appends the header for a frame of `length` data bytes to `out`.
    public static func appendHeader(to out: inout [UInt8], length: Int, streamID: UInt32, type: MessageType, flags: Flags) {
        precondition(length <= maxDataLength, "ttrpc frame of \(length) bytes exceeds 4 MiB")
        let l = UInt32(length)
        out.append(UInt8(l >> 24)); out.append(UInt8(truncatingIfNeeded: l >> 16))
        out.append(UInt8(truncatingIfNeeded: l >> 8)); out.append(UInt8(truncatingIfNeeded: l))
        out.append(UInt8(streamID >> 24)); out.append(UInt8(truncatingIfNeeded: streamID >> 16))
        out.append(UInt8(truncatingIfNeeded: streamID >> 8)); out.append(UInt8(truncatingIfNeeded: streamID))
        out.append(type.rawValue)
        out.append(flags.rawValue)
    }

    /// Header and body as one buffer, ready for the wire.
    public static func frame(streamID: UInt32, type: MessageType, flags: Flags = [], body: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(headerLength + body.count)
        appendHeader(to: &out, length: body.count, streamID: streamID, type: type, flags: flags)
        out += body
        return out
    }

    public static func encode(_ frame: Frame) -> [UInt8] {
        Self.frame(streamID: frame.streamID, type: MessageType(rawValue: frame.type) ?? .data, flags: frame.flags, body: frame.payload)
    }
}

/// What the decoder found in the bytes so far.
public enum TTRPCDecoded: Equatable, Sendable {
    case frame(TTRPC.Frame)
    /// A frame whose declared length exceeds 4 MiB. Its data is skipped as it arrives
    /// (the connection stays in sync); the peer gets ResourceExhausted for the stream.
    case oversized(streamID: UInt32, length: UInt32)
}

/// Turns a byte stream into frames. Memory is bounded: at most one frame's data
/// (≤ 4 MiB) plus one header is ever buffered; oversized data is dropped as it comes.
public struct TTRPCFrameDecoder: Sendable {
    private var input = InputBuffer()
    private var skipping = 0

    public init() {}

    /// Bytes buffered and not yet returned as frames.
    public var bufferedCount: Int { input.count }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        var rest = bytes
        if skipping > 0 {
            let n = min(skipping, rest.count)
            skipping -= n
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        }
        if !rest.isEmpty { input.append(rest) }
    }

    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// The next complete frame, or nil when more bytes are needed.
    public mutating func next() -> TTRPCDecoded? {
        guard input.count >= TTRPC.headerLength else { return nil }
        let length = UInt32(input[0]) << 24 | UInt32(input[1]) << 16 | UInt32(input[2]) << 8 | UInt32(input[3])
        let stream = UInt32(input[4]) << 24 | UInt32(input[5]) << 16 | UInt32(input[6]) << 8 | UInt32(input[7])
        let type = input[8]
        let flags = TTRPC.Flags(rawValue: input[9])
        if length > UInt32(TTRPC.maxDataLength) {
            // Drop what of its data is already here; skip the rest as it arrives.
            let here = min(input.count - TTRPC.headerLength, Int(length))
            input.consume(TTRPC.headerLength + here)
            skipping = Int(length) - here
            return .oversized(streamID: stream, length: length)
        }
        let total = TTRPC.headerLength + Int(length)
        guard input.count >= total else { return nil }
        let payload = Array(input.slice(TTRPC.headerLength..<total))
        input.consume(total)
        return .frame(TTRPC.Frame(streamID: stream, rawType: type, flags: flags, payload: payload))
    }
}
