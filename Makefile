# tidevm: build, test and demo entry points. `make test` and `make demo` work
# on a fresh Debian bookworm machine after `make deps` (which .ci/run calls).
CARGO ?= cargo
BUILD_DIR ?= build
TIDEVM_BIN ?= target/release/tidevm

.PHONY: all deps guest l1 build test demo lint clean-images

all: build

deps:
	bash guest/install-deps.sh

guest:
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

clean-images:
	rm -rf $(BUILD_DIR)/guest $(BUILD_DIR)/l1 $(BUILD_DIR)/unpacked
