#!/usr/bin/env bash
# Hardware smoke test for the cuda, gds and rdma backends: a preflight of the host, then the
# hardware tests in the order that surfaces problems fastest, each with a one-line verdict and
# its log kept.
#
#   scripts/hw-smoke.sh                  build the test binaries with cargo, then run everything
#   scripts/hw-smoke.sh --bin DIR        use prebuilt binaries DIR/{cuda,gds,rdma,vram,nixl-bench}
#                                        (vram: nixl-checkpoint's test of VRAM checkpoints)
#                                        (a GPU host without a Rust toolchain)
#   scripts/hw-smoke.sh --keep-going     run every stage even after a failure (first contact)
#   scripts/hw-smoke.sh --logs DIR       where the logs go (default: a new folder under /tmp)
#   scripts/hw-smoke.sh --bench          also measure nixl-bench's cuda rows (VMM and legacy)
#
# HW_STAGE_TIMEOUT (seconds, default 300) bounds each stage.
# RDMA stages run when an RDMA device is present (NIXL_TEST_RDMA_DEVICE overrides the choice).
# Exit status: 0 when no stage failed (skips are listed), 1 on the first failure (or, with
# --keep-going, when any stage failed); the last lines name the log to read.
set -uo pipefail

BIN=""
KEEP=0
BENCH=0
LOGS=""
while [ $# -gt 0 ]; do
    case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --keep-going) KEEP=1; shift ;;
    --bench) BENCH=1; shift ;;
    --logs) LOGS="$2"; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "hw-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
ROOT=$(pwd)
[ -n "$LOGS" ] || LOGS=$(mktemp -d /tmp/nixl-hw-smoke.XXXXXX)
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# ---------------------------------------------------------------------------------------------
# Preflight: facts about the host, never fatal on their own (the stages say what breaks).
# ---------------------------------------------------------------------------------------------
preflight() {
    local log="$LOGS/preflight.log"
    {
        echo "== host"; uname -a; nproc; free -g | head -2
        echo "== nvidia-smi"
        nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,compute_mode \
            --format=csv 2>&1 || echo "nvidia-smi: not available"
        nvidia-smi topo -m 2>&1 | head -20
        echo "== kernel module"
        cat /proc/driver/nvidia/version 2>&1 | head -3
        for m in nvidia nvidia_uvm nvidia_peermem nvidia_fs ib_core mlx5_ib; do
            if [ -d "/sys/module/$m" ]; then echo "module $m: loaded"; else echo "module $m: absent"; fi
        done
        echo "== limits"
        echo "ulimit -l (memlock, KiB): $(ulimit -l)   ulimit -n (files): $(ulimit -n) hard $(ulimit -Hn)"
        echo "== rdma"
        if command -v ibv_devinfo >/dev/null; then ibv_devinfo -l 2>&1; else echo "ibv_devinfo: not installed"; fi
        ls /sys/class/infiniband 2>&1
        for g in /sys/class/infiniband/*/ports/*/gid_attrs/types/*; do
            [ -e "$g" ] || continue
            t=$(cat "$g" 2>/dev/null) || continue
            [ -n "$t" ] && echo "$g: $t"
        done 2>/dev/null | head -20
        echo "== libraries"
        ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1|libcufile\.so|libibverbs\.so\.1|libnvidia-ml\.so\.1' || true
        echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    } >"$log" 2>&1
    # The driver's version and every symbol the cuda backend resolves (from driver/sys.rs's table).
    python3 - "$ROOT/transports/src/cuda/driver/sys.rs" >>"$log" 2>&1 <<'EOF'
import ctypes, re, sys
src = open(sys.argv[1]).read()
table = src[src.index("api! {"):]
table = table[: table.index("\n}\n")]
syms = re.findall(r'"(cu[A-Za-z0-9_]+)"\s*\(', table)
try:
    lib = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"libcuda.so.1: not loadable: {e}")
    sys.exit(0)
v = ctypes.c_int(0)
print("cuInit:", lib.cuInit(0), " cuDriverGetVersion:", lib.cuDriverGetVersion(ctypes.byref(v)), v.value)
missing = [s for s in syms if not hasattr(lib, s)]
print(f"driver symbols: {len(syms) - len(missing)} of {len(syms)} present" + (f"; MISSING: {missing}" if missing else ""))
for s in ("cuMemGetHandleForAddressRange", "cuFlushGPUDirectRDMAWrites"):
    print(f"optional {s}: {'present' if hasattr(lib, s) else 'absent'}")
n = ctypes.c_int(0)
lib.cuDeviceGetCount(ctypes.byref(n))
for d in range(n.value):
    dev = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(dev), d)
    def attr(a):
        x = ctypes.c_int(-1)
        r = lib.cuDeviceGetAttribute(ctypes.byref(x), a, dev)
        return x.value if r == 0 else f"err{r}"
    # CUdevice_attribute: 102 VMM supported, 103 POSIX fd handles, 110 GPUDirect RDMA with
    # CUDA VMM, 116 GPUDirect RDMA, 124 dmabuf, 128 fabric handles (CUDA 12.3+).
    print(f"device {d}: vmm {attr(102)} posix_fd {attr(103)} gdr {attr(116)} "
          f"gdr_vmm {attr(110)} dmabuf {attr(124)} fabric {attr(128)}")
EOF
    # Where pip's nvidia-cufile puts libcufile, when the system has none.
    if ! ldconfig -p 2>/dev/null | grep -q 'libcufile\.so\.0'; then
        local d
        d=$(python3 -c 'import nvidia.cufile, os; print(os.path.join(list(nvidia.cufile.__path__)[0], "lib"))' 2>/dev/null) || d=""
        if [ -n "$d" ] && [ -d "$d" ]; then
            export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "libcufile from pip: $d (added to LD_LIBRARY_PATH)" >>"$log"
        fi
    fi
    say "preflight: $(grep -E '^driver symbols|^cuInit' "$log" | tr '\n' ' ')"
    say "preflight: $(grep -E '^device 0' "$log")  ulimit -l $(ulimit -l) -n $(ulimit -n)"
    say "preflight: log $log"
}

# ---------------------------------------------------------------------------------------------
# Test binaries: prebuilt (--bin) or built here.
# ---------------------------------------------------------------------------------------------
declare -A EXE
find_binaries() {
    if [ -n "$BIN" ]; then
        for t in cuda gds rdma vram nixl-bench; do EXE[$t]="$BIN/$t"; done
        return
    fi
    local json="$LOGS/build.json"
    if ! { cargo test --release -p nixl-transports --test cuda --test gds --test rdma --no-run \
        --message-format=json && cargo test --release -p nixl-checkpoint --test vram --no-run \
        --message-format=json; } >"$json" 2>"$LOGS/build.log"; then
        say "FAIL build: cargo test --no-run (log $LOGS/build.log)"
        exit 1
    fi
    for t in cuda gds rdma vram; do
        EXE[$t]=$(grep -o "\"executable\":\"[^\"]*/$t-[0-9a-f]*\"" "$json" | tail -1 | cut -d'"' -f4)
    done
    if [ "$BENCH" = 1 ]; then
        cargo build --release -p nixl-bench --bin nixl-bench 2>>"$LOGS/build.log" || true
        EXE[nixl-bench]="$ROOT/target/release/nixl-bench"
    fi
}

# stage NAME BINARY FILTER [ENV...]: runs the named tests of one binary, one at a time, exact
# names. A test that printed `SKIP:` is a skip, not a pass.
stage() {
    local name=$1 exe=$2 filter=$3
    shift 3
    local log="$LOGS/$name.log"
    if [ ! -x "$exe" ]; then
        say "FAIL $name: no test binary at $exe"
        FAILED=1
        [ "$KEEP" = 1 ] || finish
        return
    fi
    local t0=$SECONDS rc
    env "$@" NIXL_LOG="${NIXL_LOG:-debug}" RUST_BACKTRACE=1 timeout "${HW_STAGE_TIMEOUT:-300}" \
        "$exe" $filter --exact --nocapture --test-threads=1 >"$log" 2>&1
    rc=$?
    local dt=$((SECONDS - t0))
    local skips
    skips=$(grep -c 'SKIP:' "$log")
    if [ $rc -ne 0 ]; then
        local why
        why=$(grep -m1 -E "panicked at|FAILED|Error|error" "$log" | cut -c1-200)
        [ $rc = 124 ] && why="timed out after ${HW_STAGE_TIMEOUT:-300} s"
        say "FAIL $name (${dt}s): $why"
        say "     log: $log"
        FAILED=1
        [ "$KEEP" = 1 ] || finish
    elif [ "$skips" -gt 0 ]; then
        say "SKIP $name (${dt}s): $(grep -m1 -o 'SKIP:.*' "$log" | cut -c1-200)"
    else
        say "PASS $name (${dt}s)"
    fi
}

finish() {
    say ""
    if [ $FAILED = 0 ]; then say "hw-smoke: no failure (logs: $LOGS)"; else say "hw-smoke: FAILED (read the log named by the first FAIL line; all logs: $LOGS)"; fi
    exit $FAILED
}

preflight
find_binaries

GPU=(NIXL_TEST_CUDA=1)
stage cuda-probe "${EXE[cuda]}" gpu_probe_finds_a_device "${GPU[@]}"
stage cuda-register "${EXE[cuda]}" gpu_register_vmm_and_legacy_memory "${GPU[@]}"
stage cuda-one-process "${EXE[cuda]}" gpu_copy_between_two_agents_in_one_process "${GPU[@]}"
stage cuda-two-processes "${EXE[cuda]}" gpu_two_processes_legacy_and_vmm_ipc "${GPU[@]}"
stage cuda-staged-tcp "${EXE[cuda]}" gpu_staged_vram_to_a_dram_peer "${GPU[@]}"
# cuFile refuses tmpfs: its files go on the disk (NIXL_TEST_GDS_DIR overrides).
GDSDIR=${NIXL_TEST_GDS_DIR:-/var/tmp}
stage gds-staged-uring "${EXE[gds]}" gpu_vram_to_file_staged_over_uring "${GPU[@]}"
stage gds-choice "${EXE[gds]}" gpu_vram_to_file_takes_the_best_path_and_says_which "${GPU[@]}" NIXL_TEST_GDS_DIR="$GDSDIR"
stage gds-cufile "${EXE[gds]}" gpu_vram_to_file_through_cufile "${GPU[@]}" NIXL_TEST_GDS_DIR="$GDSDIR"
stage gds-cufile-compat "${EXE[gds]}" gpu_vram_to_file_through_cufile_compat_mode "${GPU[@]}" NIXL_TEST_GDS_DIR="$GDSDIR"
stage ckpt-vram "${EXE[vram]}" gpu_vram_regions_save_restore_and_recorded_addresses "${GPU[@]}"
stage ckpt-vram-manifest "${EXE[vram]}" vram_region_in_a_manifest_needs_the_driver "${GPU[@]}"
stage ckpt-vram-gds "${EXE[vram]}" gpu_vram_regions_through_gds "${GPU[@]}" NIXL_TEST_GDS_DIR="$GDSDIR"
if [ "${NIXL_TEST_CUDA_FABRIC:-}" = 1 ]; then
    stage cuda-fabric "${EXE[cuda]}" gpu_two_processes_fabric_handles "${GPU[@]}" NIXL_TEST_CUDA_FABRIC=1
fi

RDEV=${NIXL_TEST_RDMA_DEVICE:-$(ls /sys/class/infiniband 2>/dev/null | head -1)}
if [ -n "$RDEV" ]; then
    stage rdma-layout "${EXE[rdma]}" verbs_layout
    stage rdma-probe "${EXE[rdma]}" probe_with_the_real_library NIXL_TEST_RDMA_DEVICE="$RDEV"
    stage rdma-dram "${EXE[rdma]}" hardware_write_and_read_with_notifications NIXL_TEST_RDMA_DEVICE="$RDEV"
    stage rdma-vram-dmabuf "${EXE[rdma]}" hardware_vram_through_dmabuf NIXL_TEST_RDMA_DEVICE="$RDEV" "${GPU[@]}"
else
    say "SKIP rdma: no RDMA device (/sys/class/infiniband is empty or missing)"
fi

if [ "$BENCH" = 1 ]; then
    b="${EXE[nixl-bench]}"
    for mem in vmm legacy; do
        log="$LOGS/bench-cuda-$mem.log"
        timeout 300 "$b" --backend cuda --cuda-mem "$mem" --block-sizes 4KiB,64KiB,1MiB,16MiB,256MiB \
            --seconds 1 --compare --verify >"$log" 2>&1
        rc=$?
        if [ $rc = 0 ]; then say "PASS bench-cuda-$mem (log $log)"; cat "$log"
        elif [ $rc = 2 ]; then say "SKIP bench-cuda-$mem: $(tail -1 "$log" | cut -c1-200)"
        else say "FAIL bench-cuda-$mem (rc $rc): $(tail -1 "$log" | cut -c1-200)"; FAILED=1; [ "$KEEP" = 1 ] || finish; fi
    done
fi
finish
