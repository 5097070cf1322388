#!/usr/bin/env bash
# Checkpoint save/restore through `nixl-ckpt bench` next to fio sequential write/read of the
# same size, block size, queue depth and O_DIRECT flag, in the same directory, in the same run.
#
#   scripts/ckpt-bench.sh [DIR] [SIZE_GIB]      (default: target/ckpt-bench, 1)
#
# nixl-ckpt moves the bytes through the agent's `uring` backend, which splits them into 1 MiB
# operations kept 64 deep ([uring] defaults): fio runs with --bs=1M --iodepth=64
# --ioengine=io_uring. Save includes the final fsync (fio: --end_fsync=1); restore includes the
# checksum of every byte after it landed. Prints a JSON object with both and the ratios.
set -euo pipefail
dir=${1:-target/ckpt-bench}
gib=${2:-1}
mkdir -p "$dir"
cargo build --release -q -p nixl-checkpoint
fio_run() { # rw direct
    fio --name=ckpt --directory="$dir" --filename=fio.dat --size="${gib}G" --bs=1M --iodepth=64 \
        --ioengine=io_uring --direct="$2" --rw="$1" --end_fsync=1 --invalidate=1 \
        --output-format=json
}
for direct in 1 0; do
    w=$(fio_run write $direct)
    r=$(fio_run read $direct)
    rm -f "$dir/fio.dat"
    flag=""
    [ "$direct" = 0 ] && flag="--buffered"
    n=$(./target/release/nixl-ckpt bench "$dir/ckpt" --size "${gib}GiB" --regions 4 \
        --chunk 8MiB --changed 1 $flag --json --quiet)
    python3 - "$w" "$r" "$n" "$direct" <<'PY'
import json, sys
w, r, n = (json.loads(x) for x in sys.argv[1:4])
fw = w["jobs"][0]["write"]["bw_bytes"] / 1e9
fr = r["jobs"][0]["read"]["bw_bytes"] / 1e9
print(json.dumps({
    "direct": sys.argv[4] == "1",
    "bytes": n["bytes"],
    "save_gbps": round(n["save_gbps"], 3), "fio_write_gbps": round(fw, 3),
    "save_vs_fio": round(n["save_gbps"] / fw, 2),
    "restore_gbps": round(n["restore_gbps"], 3), "fio_read_gbps": round(fr, 3),
    "restore_vs_fio": round(n["restore_gbps"] / fr, 2),
    "incremental": n["incremental"],
    "full_save_s": round(n["save_s"], 3),
}))
PY
done
