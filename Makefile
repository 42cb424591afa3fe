# Plexus: the two commands that do all set-up on a fresh Debian machine with Swift.
#
#   make bench   build in release and run the main job: plexus-bench's table of every
#                benchmark on every backend and adapter, beside the raw baselines
#   make test    run the whole suite with PLEXUS_BACKEND unset, then with io_uring, epoll and poll,
#                then io_uring on the COOP_TASKRUN and plain rings of older kernels
#
# Both install Debian's liburing-dev first when it is missing (with sudo when not root);
# make test also installs redis-tools (redis-cli talks to plexus-ping in the tests).

SHELL := /bin/bash
SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The suite is one .serialized tree; --no-parallel keeps a suite added outside it serial too.
TEST_FLAGS ?= --no-parallel
BACKENDS := io_uring epoll poll
# io_uring again on the rings older kernels get (COOP_TASKRUN from 5.19, plain before),
# which a newer kernel runs when PLEXUS_IO_URING_SETUP names them.
OLDER_RING_SETUPS := coop-taskrun plain
# Such a run once hung now and then (docs/design.md): bounded, a hang fails it.
OLDER_RING_LIMIT := 900

.PHONY: bench test deps test-deps build-tests

deps:
	@dpkg -s liburing-dev >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y liburing-dev; }

# The tests also talk to plexus-ping with the real redis-cli.
test-deps: deps
	@dpkg -s redis-tools >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-tools; }

bench: deps
	$(SWIFT) build -c release --product plexus-bench
	$$($(SWIFT) build -c release --show-bin-path)/plexus-bench $(BENCH_FLAGS)

# Builds the tests and every executable (plexus-demo and plexus-nouring, which the
# fallback tests run from the directory of the test bundle).
build-tests: test-deps
	$(SWIFT) build --build-tests

# Every run happens even when one fails, so one `make test` shows all four; it fails at
# the end naming the runs that failed.
test: build-tests
	@failed=""; \
	echo "=== PLEXUS_BACKEND unset (every backend that starts here)"; \
	env -u PLEXUS_BACKEND $(SWIFT) test --skip-build $(TEST_FLAGS) || failed="$$failed unset"; \
	for backend in $(BACKENDS); do \
		echo "=== PLEXUS_BACKEND=$$backend"; \
		PLEXUS_BACKEND=$$backend $(SWIFT) test --skip-build $(TEST_FLAGS) || failed="$$failed $$backend"; \
	done; \
	for setup in $(OLDER_RING_SETUPS); do \
		echo "=== PLEXUS_BACKEND=io_uring PLEXUS_IO_URING_SETUP=$$setup (the ring an older kernel gets)"; \
		PLEXUS_BACKEND=io_uring PLEXUS_IO_URING_SETUP=$$setup timeout $(OLDER_RING_LIMIT) $(SWIFT) test --skip-build $(TEST_FLAGS) || failed="$$failed io_uring($$setup)"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== make test: FAILED with PLEXUS_BACKEND:$$failed"; exit 1; fi; \
	echo "=== make test: passed with PLEXUS_BACKEND unset, io_uring, epoll and poll, and io_uring on the rings of older kernels ($(OLDER_RING_SETUPS))"
