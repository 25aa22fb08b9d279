import SwiftProtobuf
import KuasarSystem
import KuasarReactor

/// Protobuf encode/decode with failures already in wire-status form, so every RPC
/// surface reports a bad message the same way.
package enum MessageCoding {
    /// A failure to encode is our bug: Internal, naming the type.
    package static func encode<M: SwiftProtobuf.Message>(_ message: M) -> Result<[UInt8], RPCError> {
        do { return .success(try message.serializedBytes()) } catch {
            return .failure(RPCError(.internal, "cannot encode \(M.protoMessageName): \(error)"))
        }
    }

    /// A failure to decode is reported with `code` (InvalidArgument for a request,
    /// Internal for a peer's answer), naming where and what.
    package static func decode<M: SwiftProtobuf.Message, Bytes: SwiftProtobufContiguousBytes>(
        _ type: M.Type, from bytes: Bytes, code: RPCCode, context: String
    ) -> Result<M, RPCError> {
        do { return .success(try M(serializedBytes: bytes)) } catch {
            return .failure(RPCError(code, "\(context): cannot decode \(M.protoMessageName): \(error)"))
        }
    }
}
