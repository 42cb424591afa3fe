// Placeholder until the backend lands: it refuses to start, so selection falls back.
public final class URingBackend: IOBackend {
    public var kind: BackendKind { .ioUring }
    public var capabilities: Capabilities { [] }
    public var pendingCount: Int { 0 }
    public var statistics: BackendStatistics { BackendStatistics() }
    public init(entries: UInt32 = 256) throws(PlexusError) {
        throw PlexusError(operation: "URingBackend.init", errno: .noFunction, message: "not built yet")
    }
    public func prepare(_ operation: consuming Operation) -> Token { fatalError() }
    public func submit() throws(PlexusError) -> Int { fatalError() }
    public func wait(timeout: Duration?, _ body: (consuming Completion) -> Void) throws(PlexusError) -> Int { fatalError() }
    public func cancelAll(_ body: (consuming Completion) -> Void) { fatalError() }
}
