#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target and runs each for a few seconds
# (FUZZ_SMOKE_SECONDS, default 7: about a minute for all of them, plus the build).
# Fails on any crash, leak, timeout or invariant violation. Needs a nightly toolchain;
# without one it says SKIPPED and exits 0. Installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SMOKE_SECONDS:-7}

if ! command -v rustup >/dev/null 2>&1 || ! cargo +nightly --version >/dev/null 2>&1; then
	echo "=================================================================="
	echo "SKIPPED: fuzz smoke needs a nightly toolchain (rustup toolchain install nightly)"
	echo "=================================================================="
	exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
	echo "fuzz smoke: installing cargo-fuzz"
	cargo install --locked cargo-fuzz
fi

cargo +nightly fuzz build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for target in $(cargo +nightly fuzz list); do
	mkdir -p "$work/$target"
	corpora=("$work/$target")
	# Seed inputs kept in the repository are read, never written.
	if [ -d "corpus/$target" ]; then
		corpora+=("corpus/$target")
	fi
	echo "fuzz smoke: $target for ${seconds}s"
	if ! cargo +nightly fuzz run "$target" "${corpora[@]}" -- \
		-max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
		-artifact_prefix="$work/" >"$work/$target.log" 2>&1; then
		tail -n 40 "$work/$target.log"
		failed+=("$target")
		mkdir -p artifacts/smoke
		cp "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-* artifacts/smoke/ 2>/dev/null || true
	else
		grep -E '^stat::number_of_executed_units|^SKIPPED' "$work/$target.log" || true
	fi
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz smoke FAILED: ${failed[*]} (inputs in fuzz/artifacts/smoke/)"
	exit 1
fi
echo "fuzz smoke: all targets ran without a crash"
