import Glibc
import Plexus
import SystemPackage
import Testing

// README-EXAMPLE-BEGIN
/// Writes `text` into a pipe and reads it back, through whichever backend `choice` starts.
func echoThroughPipe(_ text: String, using choice: BackendChoice) throws -> String {
    let selected = try choice.start()  // BackendSelectionError says what failed and what to do
    print(selected.summary)            // "backend io_uring (requested auto)"
    let backend = selected.backend
    let (readEnd, writeEnd) = try FileDescriptor.pipe()
    defer { try? readEnd.close(); try? writeEnd.close() }

    // An IOBuffer moves into its operation; the final completion hands it back.
    var written: Result<Int, PlexusError>?
    _ = backend.prepare(.write(writeEnd, IOBuffer(text)))
    try backend.wait(timeout: .seconds(5)) { completion in written = completion.value }
    _ = try written?.get()  // a PlexusError names the operation and the errno

    var received = ""
    _ = backend.prepare(.read(readEnd, IOBuffer(capacity: 4096)))
    try backend.wait(timeout: .seconds(5)) { completion in
        var completion = completion
        received = completion.takeBuffer()?.string ?? ""
    }
    return received
}

// let text = try echoThroughPipe("hello", using: .fromEnvironment())  // PLEXUS_BACKEND
// README-EXAMPLE-END

extension PlexusTests {
    /// The README's example compiles (it is this file) and works on every backend.
    @Suite struct ReadmeExample {
        @Test(arguments: Backends.kinds)
        func `the README example echoes through a pipe`(kind: BackendKind) throws {
            _ = try Backends.start(kind)  // skips a backend that cannot start here
            let text = try echoThroughPipe("hello, plexus", using: BackendChoice(rawValue: kind.rawValue)!)
            #expect(text == "hello, plexus")
        }

        @Test func `the README shows this example verbatim`() throws {
            let source = readWholeFile(#filePath)
            let file = #filePath
            let root = try #require(file.range(of: "/Tests/PlexusTests/")).lowerBound
            let readme = readWholeFile(String(file[..<root]) + "/README.md")
            func between(_ text: String) -> String? {
                guard let begin = text.range(of: "// README-EXAMPLE-BEGIN\n"),
                      let end = text.range(of: "// README-EXAMPLE-END", range: begin.upperBound..<text.endIndex)
                else { return nil }
                return String(text[begin.upperBound..<end.lowerBound])
            }
            let example = try #require(between(source))
            #expect(readme.contains(example), "README.md must contain the example of ReadmeExampleTests.swift verbatim")
        }
    }
}
