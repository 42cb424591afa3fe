/// FIFO helpers for the small index arrays the backends queue records in (parked reads,
/// waiting writes, immediate results). They usually hold one element, and for one
/// `removeFirst` and `removeAll(keepingCapacity:)` take the general `replaceSubrange`
/// path, about 64 instructions each, twice per io_uring ping-pong round trip (callgrind).
extension Array where Element: BitwiseCopyable {
    /// `removeFirst()`, by `removeLast()` when it is the only element.
    @inline(__always)
    mutating func removeOldest() -> Element {
        count == 1 ? removeLast() : removeFirst()
    }

    /// `removeAll(keepingCapacity: true)`, by `removeLast()` for one or two elements.
    @inline(__always)
    mutating func empty() {
        switch count {
        case 0: break
        case 1: removeLast()
        case 2: removeLast(); removeLast()
        default: removeAll(keepingCapacity: true)
        }
    }
}
