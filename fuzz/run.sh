#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer's coverage instrumentation (the flags cargo-fuzz
# passes, so cargo-fuzz itself is not needed) and runs each for SECONDS (default 20) from the
# corpus in fuzz/corpus/<target> (created if missing). Needs a nightly toolchain. Exits non-zero
# on the first target that crashes, leaving the input in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh            # every target, 20 s each
#   fuzz/run.sh 120 tcp_wire
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-20}
shift || true
TARGETS=${*:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^nixl-fuzz$')}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
# An explicit --target keeps RUSTFLAGS off the build scripts (as cargo-fuzz does).
HOST=$(rustc +nightly -vV | sed -n 's/^host: //p')
cargo +nightly build --release --bins --target "$HOST"
BIN="$CARGO_TARGET_DIR/$HOST/release"
for t in $TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== fuzz $t for ${SECS}s"
    "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 |
        grep -E "^(#[0-9]+ +DONE|INFO: Running|==|SUMMARY|stat::number_of_executed_units|Done [0-9]+ runs)" || true
    # libFuzzer exits non-zero on a crash; PIPESTATUS keeps it through the grep.
    rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        echo "fuzz: $t FAILED (exit $rc); the input is in fuzz/artifacts/$t/"
        exit 1
    fi
done
echo "fuzz: every target ran ${SECS}s without a failure:" $TARGETS
