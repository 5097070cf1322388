#!/usr/bin/env bash
# Weight-streaming benchmark: one origin and N replicas as network namespaces on one bridge,
# every host's egress rate-limited with tbf (a NIC, as in a fleet). For each N: the time until
# every replica holds verified weights and the origin's egress bytes (tx bytes of its veth),
# with fan-out (`pull --serve`, replicas find each other through etcd) and with every replica
# reading from the origin only; and one replica reading from S3 (moto behind the origin's link)
# and from local disk with a cold cache.
#
#   sudo [CHUNK=bytes] [STREAMS=1] [ORIGIN_STREAMS=1] [MODES="fanout origin"] weight-streamer/bench/fanout.sh [RATE_MBIT] [MODEL_MIB] [N...]
#   (defaults: 500 Mbit/s, 512 MiB, N = 1 2 4 8; needs root, iproute2, etcd, python3 with
#   safetensors/numpy, moto[server] for the S3 row, a release build of nixl-weights)
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${1:-500}; MIB=${2:-512}; shift $(( $# > 2 ? 2 : $# )) || true
NS_LIST=${*:-"1 2 4 8"}
BIN=$PWD/target/release/nixl-weights
W=$(mktemp -d /tmp/nxw-bench.XXXX)
P=nxwb$$
export NIXL_SECRET=bench-secret
MAXN=0; for n in $NS_LIST; do (( n > MAXN )) && MAXN=$n; done
HOSTS=$((MAXN + 1))
cleanup() {
    for i in $(seq 0 $MAXN); do ip netns pids $P-h$i 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
    for i in $(seq 0 $MAXN); do ip netns del $P-h$i 2>/dev/null || true; done
    ip netns del $P-hub 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
ip netns add $P-hub
ip -n $P-hub link add br0 type bridge
ip -n $P-hub link set br0 up
for i in $(seq 0 $MAXN); do
    ip netns add $P-h$i
    ip -n $P-h$i link set lo up
    ip link add v$P$i type veth peer name eth0 netns $P-h$i
    ip link set v$P$i netns $P-hub
    ip -n $P-hub link set v$P$i master br0 up
    ip -n $P-h$i addr add 10.77.0.$((i + 1))/24 dev eth0
    ip -n $P-h$i link set eth0 up
    # Egress of every host limited to RATE (a burst of ~1 ms, at least 64 KiB).
    burst=$(( RATE * 1000000 / 8 / 1000 )); (( burst < 65536 )) && burst=65536
    ip netns exec $P-h$i tc qdisc replace dev eth0 root tbf rate ${RATE}mbit burst $burst latency 50ms
done
sleep 1
addr() { echo 10.77.0.$(( $1 + 1 )); }
tx() { ip netns exec $P-h0 cat /sys/class/net/eth0/statistics/tx_bytes; }

echo "== model: $MIB MiB (Python safetensors)" >&2
python3 weight-streamer/tests/make_model.py "$W/model" big "$MIB" >/dev/null
BYTES=$(du -cb "$W"/model/*.safetensors | tail -1 | cut -f1)
# etcd in the origin's namespace.
ip netns exec $P-h0 etcd --name b --data-dir "$W/etcd" \
    --listen-client-urls http://$(addr 0):2379 --advertise-client-urls http://$(addr 0):2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster b=http://127.0.0.1:2380 >/dev/null 2>&1 &
ETCD=http://$(addr 0):2379
sleep 2
ip netns exec $P-h0 $BIN serve "$W/model" --name m --listen $(addr 0):7000 --etcd $ETCD --json --chunk-size ${CHUNK:-8388608} > "$W/origin.json" &
for _ in $(seq 100); do [ -s "$W/origin.json" ] && break; sleep 0.2; done

# One run: N replicas at once; MODE fanout (etcd, --serve) or origin (--source origin only).
run() {
    local n=$1 mode=$2 pids=() t0 t1 tx0 tx1
    rm -rf "$W"/out*; tx0=$(tx); t0=$(date +%s.%N)
    for i in $(seq 1 $n); do
        if [ $mode = fanout ]; then
            ip netns exec $P-h$i $BIN pull m --out "$W/out$i" --serve --json --etcd $ETCD --streams ${STREAMS:-1} --origin-streams ${ORIGIN_STREAMS:-1} \
                --listen $(addr $i):7000 > "$W/r$i.json" 2>"$W/e$i.log" &
        else
            ip netns exec $P-h$i $BIN pull m --out "$W/out$i" --json --source $(addr 0):7000 \
                --listen $(addr $i):7000 > "$W/r$i.json" 2>"$W/e$i.log" &
        fi
        pids+=($!)
    done
    # Done when every replica printed its summary (a --serve replica goes on serving).
    for i in $(seq 1 $n); do
        until grep -q '"verified":true' "$W/r$i.json" 2>/dev/null; do
            kill -0 ${pids[$((i - 1))]} 2>/dev/null || { echo "replica $i failed" >&2; cat "$W/r$i.json" "$W/e$i.log" >&2; exit 1; }
            sleep 0.05
        done
    done
    t1=$(date +%s.%N); tx1=$(tx)
    [ -n "${BENCH_DEBUG:-}" ] && for i in $(seq 1 $n); do
        python3 -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
o = sum(v for k, v in r['sources'].items() if k == sys.argv[2] or '-src-' in k)
print(f'replica {sys.argv[3]}: {r[\"seconds\"]:.2f} s, from the origin {o / r[\"bytes\"]:.2f} of the model, dropped {r[\"dropped\"]}')
" "$W/r$i.json" "$(addr 0):7000" $i >&2 || true
    done
    for p in "${pids[@]}"; do kill $p 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    python3 - "$n" "$mode" "$t0" "$t1" "$tx0" "$tx1" "$BYTES" "$RATE" <<'PY'
import sys
n, mode, t0, t1, x0, x1, b, rate = sys.argv[1:]
n = int(n); t = float(t1) - float(t0); eg = int(x1) - int(x0); b = int(b)
link = int(rate) * 1e6 / 8
print(f"| {n} | {mode} | {t:.2f} | {b / link:.2f} | {t / (b / link):.2f} | {eg / b:.2f} |")
PY
    sleep 1
}
echo "| N | mode | seconds to all verified | one model at the link rate, s | ratio | origin egress / model |"
echo "|---:|---|---:|---:|---:|---:|"
for mode in ${MODES:-fanout origin}; do
    for n in $NS_LIST; do run $n $mode; done
done
[ -n "${MODES:-}" ] && exit 0

# One replica from local disk, cold cache (the model's pages dropped with fadvise).
python3 -c "
import os, sys, glob
for f in glob.glob(sys.argv[1] + '/*'):
    fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
" "$W/model"
$BIN pull m --out "$W/outdisk" --json --fallback "$W/model" --listen 127.0.0.1:0 > "$W/disk.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'| 1 | local disk (cold, verified, written) | {r[\"seconds\"]:.2f} | | | 0 |')" "$W/disk.json"

# S3: moto in the origin's namespace, behind the origin's link; one replica.
if python3 -c 'import moto.server, boto3' 2>/dev/null; then
    ip netns exec $P-h0 python3 -m moto.server -H $(addr 0) -p 5000 >/dev/null 2>&1 &
    sleep 3
    export AWS_ENDPOINT_URL=http://$(addr 0):5000 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1
    ip netns exec $P-h0 python3 -c "
import boto3, sys, os
s3 = boto3.client('s3'); s3.create_bucket(Bucket='weights')
for f in os.listdir(sys.argv[1]): s3.upload_file(os.path.join(sys.argv[1], f), 'weights', 'm/' + f)
" "$W/model"
    $BIN pull m --out "$W/outm" --json --source $(addr 0):7000 --listen 127.0.0.1:0 >/dev/null 2>&1 || true
    rm -rf "$W"/out1; tx0=$(tx); t0=$(date +%s.%N)
    ip netns exec $P-h1 $BIN pull m --out "$W/out1" --json --fallback s3://weights/m/ \
        --manifest "$W/outdisk/.nixl-weights-manifest" --listen $(addr 1):7001 > "$W/s3.json"
    t1=$(date +%s.%N); tx1=$(tx)
    python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); b=int(sys.argv[5]); print(f'| 1 | S3 (moto behind the origin link) | {t:.2f} | {b/(int(sys.argv[6])*1e6/8):.2f} | {t/(b/(int(sys.argv[6])*1e6/8)):.2f} | {(int(sys.argv[4])-int(sys.argv[3]))/b:.2f} |')" $t0 $t1 $tx0 $tx1 $BYTES $RATE
fi
