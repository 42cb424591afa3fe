/// A FIFO helper for the small index arrays the backends queue records in (parked reads,
/// waiting writes, the backlog). They usually hold one element, and for one
/// `removeFirst` takes the general `replaceSubrange` path, about 64 instructions, twice
/// per io_uring ping-pong round trip (callgrind).
extension Array where Element: BitwiseCopyable {
    /// `removeFirst()`, by `removeLast()` when it is the only element.
    @inline(__always)
    mutating func removeOldest() -> Element {
        count == 1 ? removeLast() : removeFirst()
    }
}
