import KuasarSystem
/// The objects a server keeps alive while they serve (connections), by identity.
/// `takeAll` empties it first, so closing each element — which removes it again —
/// never mutates the set while it is being walked.
public struct LiveSet<Element: AnyObject> {
    private var items: [ObjectIdentifier: Element] = [:]

    public init() {}

    public var count: Int { items.count }
    public var all: Dictionary<ObjectIdentifier, Element>.Values { items.values }

    public mutating func insert(_ e: Element) { items[ObjectIdentifier(e)] = e }
    public mutating func remove(_ e: Element) { items[ObjectIdentifier(e)] = nil }

    public mutating func takeAll() -> [Element] {
        defer { items.removeAll() }
        return Array(items.values)
    }
}

/// Listening sockets that feed one server.
public struct ListenerGroup {
    private var listeners: [Listener] = []

    public init() {}

    /// Listens on a unix socket (0600) and hands every accepted connection to `accept`.
    public mutating func listen(reactor: Reactor, path: String, accept: @escaping Listener.AcceptHandler) throws(SystemError) {
        listeners.append(try Listener(reactor: reactor, fd: try Socket.listenUnix(path: path), onAccept: accept))
    }

    public mutating func close() {
        for l in listeners { l.close() }
        listeners.removeAll()
    }
}
