#!/usr/bin/env bash
# Restore of a checkpoint from a peer over tcp between two network namespaces (a veth pair),
# next to iperf3 on the same veth in the same run:
#
#   sudo scripts/ckpt-peer-bench.sh [SIZE_GIB] [DIR]     (default: 1, target/ckpt-peer-bench)
#
# 1. `nixl-ckpt bench DIR --keep` leaves a checkpoint of SIZE_GIB (4 regions) in DIR.
# 2. iperf3 from namespace b to namespace a: one stream, then 4 (-P 4), 5 s each.
# 3. `nixl-ckpt serve DIR` in namespace a; in namespace b `nixl-ckpt verify nixl://A:PORT`
#    (restore_mapped: manifest, every region READ into fresh memory, every chunk checked);
#    the second restore with `--warm` also restores again into the memory it has just filled
#    (no fresh pages: the figure to set next to nixl-bench's READ, which reuses its buffers);
#    then the same with the restorer's tcp backend opening 4 and 8 connections to the peer
#    (`--tcp-conns`; the default is 2).
# 4. A node daemon (`nixl-agent serve`, pool of SIZE + 64 MiB) in namespace a holding the
#    checkpoint (`nixl-ckpt serve DIR --daemon SOCK`), and the same restore from b.
#
# 5. The first touch of SIZE_GIB of fresh memory (`dd bs=SIZE` of /dev/zero: the kernel faults
#    in and zeroes the buffer as it fills it): a restore lands in memory it has just mapped and
#    pays this too, while iperf3 and nixl-bench reuse buffers they touched long ago. On a VM that
#    returns freed memory to its host (virtio-balloon free page reporting), the first touch is a
#    host fault as well.
# 6. The tcp backend's own READ of 8 MiB blocks with and without TLS (`nixl-bench --backend tcp
#    --tls both`, its own namespace pair): the restores above run over TLS (agents with a shared
#    secret), iperf3 does not.
#
# Prints one JSON object per row, with the load average when it was taken. Needs root, ip
# (iproute2) and iperf3.
set -euo pipefail
gib=${1:-1}
dir=${2:-target/ckpt-peer-bench}
for p in ip iperf3 python3; do
    command -v "$p" >/dev/null || { echo "needs $p" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
cargo build --release -q -p nixl-checkpoint -p nixl-agent -p nixl-benches --bin nixl-bench --bin nixl-ckpt --bin nixl-agent
ckpt=$PWD/target/release/nixl-ckpt
agentbin=$PWD/target/release/nixl-agent
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
a=ckbA$$ b=ckbB$$
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    "$ckpt" rm "$dir/ckpt" -q >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add "va$$" type veth peer name "vb$$"
ip link set "va$$" netns "$a"
ip link set "vb$$" netns "$b"
ip -n "$a" addr add 10.77.$(($$ % 200)).1/24 dev "va$$"
ip -n "$b" addr add 10.77.$(($$ % 200)).2/24 dev "vb$$"
for n in "$a" "$b"; do ip -n "$n" link set lo up; done
ip -n "$a" link set "va$$" up
ip -n "$b" link set "vb$$" up
A=10.77.$(($$ % 200)).1
export NIXL_SECRET="ckpt-peer-bench-$$-$RANDOM$RANDOM"
load() { cut -d' ' -f1-3 /proc/loadavg; }

"$ckpt" bench "$dir/ckpt" --size "${gib}GiB" --regions 4 --chunk 8MiB --keep --json --quiet >/dev/null

row() { # name json-from-verify-or-iperf
    python3 - "$1" "$2" "$(load)" <<'PY'
import json, sys
name, raw, load = sys.argv[1:4]
v = json.loads(raw)
if "end" in v:  # iperf3
    gbps = v["end"]["sum_received"]["bits_per_second"] / 8e9
else:
    gbps = v["bytes"] / v["seconds"] / 1e9
print(json.dumps({"row": name, "gbps": round(gbps, 3), "loadavg": load}))
if v.get("warm_seconds"):
    print(json.dumps({"row": name + ", then again into the same (touched) memory",
                      "gbps": round(v["bytes"] / v["warm_seconds"] / 1e9, 3), "loadavg": load}))
PY
}

ip netns exec "$a" iperf3 -s -B "$A" -D --logfile "$work/iperf.log" --pidfile "$work/iperf.pid"
sleep 0.5
pids+=("$(cat "$work/iperf.pid")")
row "iperf3, 1 stream" "$(ip netns exec "$b" iperf3 -c "$A" -t 5 -J)"
row "iperf3, 4 streams" "$(ip netns exec "$b" iperf3 -c "$A" -t 5 -P 4 -J)"

# A peer holding it: nixl-ckpt serve.
ip netns exec "$a" "$ckpt" serve "$dir/ckpt" --listen "$A:0" --json -q >"$work/serve.out" &
pids+=($!)
for _ in $(seq 600); do grep -q '"uri"' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
uri=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["uri"])' "$work/serve.out")
row "nixl-ckpt serve -> restore" "$(ip netns exec "$b" "$ckpt" verify "$uri" --json -q)"
row "nixl-ckpt serve -> restore, again" "$(ip netns exec "$b" "$ckpt" verify "$uri" --json -q --warm)"
# The restorer with more tcp connections to the peer than the backend's default (2).
for conns in 4 8; do
    row "nixl-ckpt serve -> restore, again, $conns tcp connections" \
        "$(ip netns exec "$b" "$ckpt" verify "$uri" --json -q --warm --tcp-conns "$conns")"
done

# The daemon's pool holding it.
pool=$(( (gib << 30) + (64 << 20) ))
cat >"$work/agent.toml" <<TOML
backends = ["tcp"]
[auth]
secret = "$NIXL_SECRET"
[tcp]
listen = "$A:0"
[daemon]
control_socket = "$work/agent.sock"
http_listen = "$A:0"
pool_size = $pool
TOML
ip netns exec "$a" "$agentbin" serve --config "$work/agent.toml" 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 300); do
    "$agentbin" status --socket "$work/agent.sock" --json 2>/dev/null | grep -q '"ready": *true' && break
    sleep 0.1
done
placed=$("$ckpt" serve "$dir/ckpt" --daemon "$work/agent.sock" --name bench --json -q)
duri=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["uri"])' "$placed")
row "daemon pool -> restore" "$(ip netns exec "$b" "$ckpt" verify "$duri" --json -q)"
row "daemon pool -> restore, again" "$(ip netns exec "$b" "$ckpt" verify "$duri" --json -q --warm)"
"$ckpt" unserve bench --daemon "$work/agent.sock" -q >/dev/null
ddout=$(ip netns exec "$b" dd if=/dev/zero of=/dev/null bs="${gib}G" count=1 2>&1 | tail -1)
python3 - "$ddout" "$(load)" "$gib" <<'PY'
import json, re, sys
out, load, gib = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = re.search(r"copied, ([0-9.]+) s", out)
row = {"row": f"first touch of {gib} GiB of fresh memory (dd)", "loadavg": load}
if m:
    row["gbps"] = round((gib << 30) / float(m.group(1)) / 1e9, 3)
else:
    row["dd"] = out
print(json.dumps(row))
PY
echo "{\"row\": \"nixl-bench tcp READ 8 MiB x 4, plain and TLS (below)\", \"loadavg\": \"$(load)\"}"
"$PWD/target/release/nixl-bench" --backend tcp --tls both --op read --block-sizes 8MiB --batch 4 \
    --seconds 2 2>&1 | grep -E "^ *[0-9]+[KMG]iB|connections:" || true
