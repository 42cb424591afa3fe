#!/usr/bin/env bash
# Runs the whole suite on every backend in three more configurations:
#
#   release   swift test -c release                       (scratch .build-release)
#   asan      swift test --sanitize=address               (scratch .build-asan)
#   tsan      swift test --sanitize=thread                (scratch .build-tsan)
#
# each once per PLEXUS_BACKEND in io_uring epoll poll (the unset run is `make test`'s).
# A sanitizer report fails the run even when every test passed: ASan aborts on its
# first report (halt_on_error), TSan is run with halt_on_error=1 and its output is also
# grepped for "WARNING: ThreadSanitizer" (a report in a child process or one printed
# before the exit code is set still counts).
#
# LeakSanitizer is off: the test runner's own allocations are reported as leaks at
# exit, so `swift test --sanitize=address` would exit 1 with every test
# passing. Plexus's memory is checked by the suite itself (pendingCount, fd counts, the
# load test's RSS bound) and ASan still catches use-after-free, overflows and
# double frees.
#
# TSan suppressions: scripts/tsan.supp, each entry commented with why it is not a bug.
# PLEXUS_SANITIZER=release|asan|tsan tells the tests which run this is (under TSan the
# first symbolized report, even a suppressed one, starts llvm-symbolizer, whose two pipes
# the fd-leak check must not blame on the test that happened to be running).
#
# Usage: scripts/ci-sanitizers.sh [release] [asan] [tsan]   (default: all three)
# Environment: BACKENDS="io_uring epoll poll", SWIFT=path/to/swift, TEST_FLAGS=--no-parallel
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
    export PATH="/opt/swift/usr/bin:$PATH"
fi
SWIFT=${SWIFT:-swift}
BACKENDS=${BACKENDS:-io_uring epoll poll}
TEST_FLAGS=${TEST_FLAGS:---no-parallel}
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(release asan tsan)

logdir=${SANITIZER_LOGS:-$root/.build-sanitizer-logs}
mkdir -p "$logdir"
failed=()
start_all=$(date +%s)

now() { date +%s; }

for config in "${configs[@]}"; do
    case "$config" in
        # @testable import needs -enable-testing, which release builds leave out by default.
        release) flags=(-c release -Xswiftc -enable-testing); scratch=.build-release ;;
        asan)    flags=(--sanitize=address); scratch=.build-asan ;;
        tsan)    flags=(--sanitize=thread); scratch=.build-tsan ;;
        *) echo "ci-sanitizers: unknown configuration '$config' (release, asan, tsan)" >&2; exit 2 ;;
    esac
    echo "=== $config: build (--scratch-path $scratch)"
    t0=$(now)
    if ! "$SWIFT" build --build-tests "${flags[@]}" --scratch-path "$scratch"; then
        failed+=("$config:build")
        continue
    fi
    echo "=== $config: built in $(( $(now) - t0 ))s"
    for backend in $BACKENDS; do
        log="$logdir/$config-$backend.log"
        echo "=== $config: PLEXUS_BACKEND=$backend (log: $log)"
        t1=$(now)
        env PLEXUS_BACKEND="$backend" \
            ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0" \
            PLEXUS_SANITIZER="$config" \
            TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/scripts/tsan.supp" \
            "$SWIFT" test --skip-build "${flags[@]}" --scratch-path "$scratch" $TEST_FLAGS >"$log" 2>&1
        rc=$?
        tail -n 3 "$log"
        reports=$(grep -c -E "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:" "$log")
        echo "=== $config $backend: exit $rc, $reports sanitizer report(s), $(( $(now) - t1 ))s"
        if [ "$rc" -ne 0 ] || [ "$reports" -ne 0 ]; then
            failed+=("$config:$backend")
            grep -n -A 30 -E "WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error:" "$log" | head -n 120
            grep -E "✘|failed" "$log" | head -n 40
        fi
    done
done

echo "=== ci-sanitizers: ${configs[*]} on $BACKENDS in $(( $(now) - start_all ))s"
if [ ${#failed[@]} -ne 0 ]; then
    echo "=== ci-sanitizers: FAILED: ${failed[*]}"
    exit 1
fi
echo "=== ci-sanitizers: passed"
