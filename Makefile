# tidevm: build, test and demo entry points. `make test` and `make demo` work
# on a fresh Debian bookworm machine: they run `make deps` (apt, through sudo
# unless root) when a tool they need is missing. `make deps` alone installs
# everything, QEMU included.
CARGO ?= cargo
BUILD_DIR ?= build
TIDEVM_BIN ?= target/release/tidevm

.PHONY: all deps deps-if-needed guest l1 build test demo lint fuzz-smoke clean-images

all: build

deps:
	bash guest/install-deps.sh

# The guest images need zstd, xz, cpio, gzip, modinfo and file; the metrics
# tests need prometheus and promtool; QEMU is needed only for the nested lane,
# i.e. when the CPU has no vmx/svm.
deps-if-needed:
	@missing=""; \
	for tool in zstd xz cpio gzip modinfo file prometheus promtool; do \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if ! grep -qwE 'vmx|svm' /proc/cpuinfo && ! command -v qemu-system-x86_64 >/dev/null 2>&1; then \
		missing="$$missing qemu-system-x86_64(nested-lane)"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "tidevm: missing:$$missing; running make deps"; \
		$(MAKE) deps; \
	fi

guest: deps-if-needed
	bash guest/build-guest.sh

l1: guest
	bash guest/build-l1.sh

build:
	$(CARGO) build --release --workspace

test: guest l1 build
	$(CARGO) test --release --workspace

demo: guest l1 build
	$(CARGO) run --release -p tidevm-testlane --bin tidevm-demo -- --tidevm $(TIDEVM_BIN)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every fuzz target for a few seconds (fuzz/smoke.sh); SKIPPED without a nightly toolchain.
fuzz-smoke:
	bash fuzz/smoke.sh

clean-images:
	rm -rf $(BUILD_DIR)/guest $(BUILD_DIR)/l1 $(BUILD_DIR)/unpacked
