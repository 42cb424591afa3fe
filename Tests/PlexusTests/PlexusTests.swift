import Testing

/// The root of the whole suite. Every other suite is nested in it (in extensions), so
/// `.serialized` applies to all of it: fd counts are process-wide, and the leak check
/// needs tests that do not overlap. `.checksFileDescriptors` compares /proc/self/fd
/// before and after every test case.
@Suite(.serialized, .checksFileDescriptors)
struct PlexusTests {}
