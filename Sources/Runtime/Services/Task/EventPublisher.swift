#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer
import KuasarSandbox

/// Publishes task events to containerd's events service
/// (`containerd.services.events.ttrpc.v1.Events/Forward` at TTRPC_ADDRESS), in order:
/// one Forward in flight at a time, so TaskCreate → TaskStart → TaskExit → TaskDelete
/// reach containerd as they happened. A lost connection is re-dialled; the queue is
/// bounded (the oldest events go first, logged) so a containerd that never comes back
/// cannot grow the daemon without limit.
public final class EventPublisher {
    public static let maxQueued = 10_000
    let reactor: Reactor
    let path: String
    let logger: Logger
    private var client: TTRPCClient?
    private var queue: [Containerd_Services_Events_Ttrpc_V1_ForwardRequest] = []
    private var sending = false
    private var retryTimer: TimerID?
    public private(set) var published = 0
    public private(set) var dropped = 0

    public init(reactor: Reactor, address: String, logger: Logger) {
        self.reactor = reactor
        var p = address
        for prefix in ["unix://", "ttrpc+unix://"] where p.hasPrefix(prefix) { p = String(p.dropFirst(prefix.count)) }
        path = p
        self.logger = logger
    }

    /// containerd's Envelope of one event. The type URL containerd's typeurl gives a
    /// protobuf event is its full message name.
    public static func envelope<M: SwiftProtobuf.Message>(namespace: String, topic: String, _ event: M) -> Containerd_Services_Events_Ttrpc_V1_Envelope {
        var env = Containerd_Services_Events_Ttrpc_V1_Envelope()
        env.timestamp = Google_Protobuf_Timestamp(WallTime.now())
        env.namespace = namespace
        env.topic = topic
        var any = Google_Protobuf_Any()
        any.typeURL = M.protoMessageName
        any.value = (try? event.serializedData()) ?? Data()
        env.event = any
        return env
    }

    public func publish<M: SwiftProtobuf.Message>(namespace: String, topic: String, _ event: M) {
        publish(Self.envelope(namespace: namespace, topic: topic, event))
    }

    /// Forwards an envelope made elsewhere (a guest agent's event, relayed by its host).
    public func publish(_ envelope: Containerd_Services_Events_Ttrpc_V1_Envelope) {
        var req = Containerd_Services_Events_Ttrpc_V1_ForwardRequest()
        req.envelope = envelope
        if queue.count >= Self.maxQueued {
            queue.removeFirst()
            dropped += 1
            if dropped == 1 || dropped % 1000 == 0 { logger.warning("events: \(path) is not taking events; \(dropped) dropped so far") }
        }
        queue.append(req)
        pump()
    }

    public var pending: Int { queue.count }

    private func pump() {
        guard !sending, let next = queue.first, retryTimer == nil else { return }
        if client == nil || client!.isClosed {
            do {
                let c = try TTRPCClient.connect(reactor: reactor, path: path)
                c.onClose = { [weak self, weak c] _ in
                    guard let self, self.client === c else { return }
                    self.client = nil
                }
                client = c
            } catch {
                logger.debug("events: cannot reach \(path): \(error); retrying")
                retryLater()
                return
            }
        }
        sending = true
        client!.unary(service: "containerd.services.events.ttrpc.v1.Events", method: "Forward", next,
                      as: Google_Protobuf_Empty.self, timeoutNS: 10_000_000_000) { [weak self] result in
            guard let self else { return }
            self.sending = false
            switch result {
            case .success:
                self.queue.removeFirst()
                self.published += 1
                self.pump()
            case .failure(let e) where e.code == .unavailable || e.code == .deadlineExceeded:
                self.client?.close()
                self.client = nil
                self.retryLater()
            case .failure(let e):
                // containerd refused this event itself: keep the others flowing.
                self.logger.warning("events: \(next.envelope.topic) refused: \(e)")
                self.queue.removeFirst()
                self.pump()
            }
        }
    }

    private func retryLater() {
        guard retryTimer == nil else { return }
        retryTimer = reactor.schedule(afterNS: 200_000_000) { [weak self] in
            self?.retryTimer = nil
            self?.pump()
        }
    }

    public func close() {
        if let t = retryTimer { reactor.cancel(t); retryTimer = nil }
        client?.close()
        client = nil
    }
}
