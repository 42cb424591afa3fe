#!/bin/bash
# Instructions per operation, user space, counted by valgrind (callgrind): a measure of
# what each layer costs that the machine's noise does not move. plexus-bench times rows
# in nanoseconds, which is what users see; this counts what the code executes, so two
# builds can be compared to the instruction.
#
#   scripts/instructions-per-op.sh [benchmark] [backend,...] [adapter,...]
#   scripts/instructions-per-op.sh nop-1 raw-io_uring,io_uring raw,callback
#
# Benchmarks whose step is a fixed batch only: nop-1, nop-32, pingpong (per round trip),
# timers (64 per step: 32 fired, 32 cancelled),
# file-qd1, file-qd32. Every row runs under callgrind for 200 ms of (slowed) time; the
# count is the step's inclusive instructions over its operations, the runner's timing
# excluded. The kernel's share of a syscall is not counted (callgrind sees user space).
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
bench=${1:-nop-1}
backends=${2:-raw-io_uring,io_uring,raw-epoll,epoll,raw-poll,poll}
adapters=${3:-raw,callback}
case $bench in
    nop-1|pingpong|file-qd1) per_step=1 ;;
    nop-32|file-qd32) per_step=32 ;;
    timers) per_step=64 ;;
    *) echo "instructions-per-op: $bench has no fixed batch per step; use nop-1, nop-32, pingpong, timers, file-qd1 or file-qd32" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "instructions-per-op: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
cd "$(dirname "$0")/.."
swift build -c release --product plexus-bench >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# valgrind 3.19 cannot read the DWARF this toolchain writes; symbols are enough.
objcopy --strip-debug "$(swift build -c release --show-bin-path)/plexus-bench" "$work/plexus-bench"

for backend in ${backends//,/ }; do
    for adapter in ${adapters//,/ }; do
        [[ $backend == raw-* && $adapter != raw ]] && continue
        out="$work/$backend.$adapter.out"
        if ! valgrind --tool=callgrind --callgrind-out-file="$out" "$work/plexus-bench" --benchmarks "$bench" \
            --backends "$backend" --adapters "$adapter" --no-baselines --quiet --duration 200ms --warmup 50ms \
            --repetitions 1 >"$work/log" 2>&1; then
            echo "instructions-per-op: $bench $backend $adapter failed:" >&2; tail -5 "$work/log" >&2; exit 1
        fi
        python3 - "$out" "$per_step" "$bench" "$backend" "$adapter" <<'EOF'
import re, sys
path, per_step, bench, backend, adapter = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
# A benchmark body's step(): $s11PlexusBench<n><Class>C4stepSiyKF (not its witness thunk).
step = re.compile(r'^\$s11PlexusBench\d+\w+C4stepSiyKF$')
names, inclusive, calls = {}, {}, {}
fn = cfn = None
after_call = False
for line in open(path):
    m = re.match(r'(c?fn)=\((\d+)\)(?: (.*))?', line)
    if m:
        kind, ident, name = m.groups()
        if name: names[ident] = name.strip()
        if kind == 'fn': fn = ident
        else: cfn = ident
        continue
    m = re.match(r'calls=(\d+)', line)
    if m:
        calls[cfn] = calls.get(cfn, 0) + int(m.group(1))
        after_call = True
        continue
    parts = line.split()
    if len(parts) >= 2 and re.match(r'^([+-]?\d+|\*|0x[0-9a-f]+)$', parts[0]) and parts[-1].isdigit():
        # A cost line: the function's own cost, or (right after calls=) a call's inclusive cost.
        inclusive[fn] = inclusive.get(fn, 0) + int(parts[-1])
        after_call = False
bodies = [i for i, n in names.items() if step.match(n) and calls.get(i)]
if len(bodies) != 1:
    sys.exit(f"instructions-per-op: expected one benchmark step, found {[names[i] for i in bodies]}")
body = bodies[0]
ops = calls[body] * per_step
print(f"{bench:9} {backend:13} {adapter:9} {inclusive[body] / ops:8.0f} instructions/op  ({ops} ops)")
EOF
    done
done
