import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
/// The wire status of the engine's errors: mapped here, where the container engine
/// meets the wire (the engine itself knows nothing of RPC).
extension ContainerError: RPCStatusConvertible {
    public var rpcError: RPCError {
        switch kind {
        case .notFound: return RPCError(.notFound, message)
        case .alreadyExists: return RPCError(.alreadyExists, message)
        case .invalid: return RPCError(.invalidArgument, message)
        case .failedPrecondition: return RPCError(.failedPrecondition, message)
        case .failed: return RPCError(errno.map { RPCCode(errno: $0) } ?? .internal, message)
        }
    }
}

extension SpecError: RPCStatusConvertible {
    public var rpcError: RPCError { RPCError(.invalidArgument, description) }
}
