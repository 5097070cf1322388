#!/usr/bin/env bash
# The serving stack under load: `nixl-serve up` with the KV-aware router next to round-robin,
# same seed, same arrivals, same prompts, in the same run.
#
#   scripts/serve-bench.sh            (environment: see the defaults below)
#
# For each topology (TOPOS: `disagg` = --prefill 1 --decode 2, the issue's shape, where the only
# choice is the decode worker, by load; `disagg2` = --prefill 2 --decode 2, where the prefill
# worker is chosen by overlap; `agg` = --aggregated --workers 3) and each router (kv, round-robin) it starts a deployment, runs nixl-loadgen
# with the shared-prefix workload and then the unique one (Poisson arrivals at RATE/s, REQUESTS
# requests, SEED), reads the frontend's and the workers' /metrics before and after each
# workload, and stops it. It prints one row per (topology, workload, router): TTFT and ITL
# p50/p99 (client side), tokens/s, requests/s, errors, the cache hit rate (frontend: prompt
# tokens served from a prefix cache / prompt tokens, over that workload), and in `disagg` the
# KV handoff (decode workers: pull start to landed, mean) as a share of the mean TTFT (frontend),
# next to a memcpy of the same bytes (one core, scattered 4 KiB pieces: nixl-loadgen
# --memcpy-bytes). Handoff bytes = prompt blocks × tokens per block × KV_BYTES_PER_TOKEN (the
# reference model: 2 layers × 4 KV heads × 16 dims × K and V × 4 bytes = 1024).
# JSON=1 prints the rows as JSON lines too.
set -euo pipefail
REQUESTS=${REQUESTS:-96}
RATE=${RATE:-4}
SEED=${SEED:-1}
# 20 system prompts of 32 blocks: more than one worker's 512 blocks hold, fewer than three do.
PROMPTS=${PROMPTS:-20}
PREFIX=${PREFIX:-512}
SUFFIX=${SUFFIX:-32}
MAX_TOKENS=${MAX_TOKENS:-32}
STEP_DELAY_MS=${STEP_DELAY_MS:-0}
PORT=${PORT:-18731}
TOPOS=${TOPOS:-"disagg disagg2 agg"}
TPB=${TPB:-16}
KV_BYTES_PER_TOKEN=${KV_BYTES_PER_TOKEN:-1024}
ROUTERS=${ROUTERS:-"kv round-robin"}

cd "$(dirname "$0")/.."
cargo build --release -q -p nixl-serve -p nixl-benches --bin nixl-serve --bin nixl-loadgen
bin=./target/release
work=$(mktemp -d)
up_pid=""
cleanup() {
    if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# metrics URL... > FILE: the /metrics of each URL, each prefixed by "# URL <url>".
snapshot() {
    local f=$1
    shift
    : >"$f"
    for u in "$@"; do
        echo "# URL $u" >>"$f"
        curl -sf --max-time 5 "$u/metrics" >>"$f" || echo "# FAILED $u" >>"$f"
    done
}

for topo in $TOPOS; do
    case $topo in
    disagg) shape=(--prefill 1 --decode 2) ;;
    disagg2) shape=(--prefill 2 --decode 2) ;;
    agg) shape=(--aggregated --workers 3) ;;
    *) echo "serve-bench: unknown topology $topo (disagg, disagg2, agg)" >&2; exit 2 ;;
    esac
    for router in $ROUTERS; do
        "$bin/nixl-serve" up "${shape[@]}" --router "$router" --listen "127.0.0.1:$PORT" \
            --step-delay-ms "$STEP_DELAY_MS" --json >"$work/up.json" 2>"$work/up.err" &
        up_pid=$!
        for _ in $(seq 1 600); do
            [ -s "$work/up.json" ] && break
            kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.err" >&2; exit 1; }
            sleep 0.2
        done
        [ -s "$work/up.json" ] || { echo "serve-bench: nixl-serve up did not start" >&2; exit 1; }
        url=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["url"])' "$work/up.json")
        mapfile -t workers < <(python3 -c '
import json, sys
for p in json.loads(open(sys.argv[1]).readline())["processes"]:
    if p["role"] in ("decode", "aggregated"):
        print(p["url"])' "$work/up.json")
        for _ in $(seq 1 100); do
            curl -sf --max-time 2 "$url/health" >/dev/null && break
            sleep 0.2
        done
        for wl in shared unique; do
            tag="$topo.$router.$wl"
            snapshot "$work/$tag.before" "$url" "${workers[@]}"
            "$bin/nixl-loadgen" --url "$url" --workload "$wl" --requests "$REQUESTS" \
                --rate "$RATE" --seed "$SEED" --prompts "$PROMPTS" --prefix-tokens "$PREFIX" \
                --suffix-tokens "$SUFFIX" --max-tokens "$MAX_TOKENS" --json \
                >"$work/$tag.load" || true
            snapshot "$work/$tag.after" "$url" "${workers[@]}"
        done
        kill -TERM "$up_pid"
        wait "$up_pid" || true
        up_pid=""
        sleep 0.5
    done
done

python3 - "$work" "$bin/nixl-loadgen" "$TPB" "$KV_BYTES_PER_TOKEN" "${JSON:-0}" "$TOPOS" "$ROUTERS" <<'PY'
import json, math, os, subprocess, sys
work, loadgen, tpb, kvb, as_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
topos, routers = sys.argv[6].split(), sys.argv[7].split()

def metrics(path):
    """{url: {sample: value}} of a snapshot file."""
    out, cur = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith("# URL "):
            cur = line[6:]
            out[cur] = {}
        elif line and not line.startswith("#") and cur is not None:
            k, _, v = line.rpartition(" ")
            try:
                out[cur][k] = float(v)
            except ValueError:
                pass
    return out

def delta(before, after, url, key):
    return after.get(url, {}).get(key, 0.0) - before.get(url, {}).get(key, 0.0)

memcpy_cache = {}
def memcpy_ms(nbytes):
    if nbytes not in memcpy_cache:
        r = subprocess.run([loadgen, "--url", "x", "--memcpy-bytes", str(nbytes)],
                           capture_output=True, text=True, check=True)
        memcpy_cache[nbytes] = json.loads(r.stdout)["median_ms"]
    return memcpy_cache[nbytes]

rows = []
for topo in topos:
    for wl in ("shared", "unique"):
        for router in routers:
            tag = f"{topo}.{router}.{wl}"
            try:
                load = json.load(open(os.path.join(work, tag + ".load")))
            except (OSError, ValueError):
                rows.append({"topology": topo, "workload": wl, "router": router, "failed": True})
                continue
            b, a = metrics(os.path.join(work, tag + ".before")), metrics(os.path.join(work, tag + ".after"))
            fe = next(iter(a))
            prompt = delta(b, a, fe, "nixl_serve_frontend_prompt_tokens_total")
            cached = delta(b, a, fe, "nixl_serve_frontend_cached_tokens_total")
            ttft_sum = delta(b, a, fe, "nixl_serve_time_to_first_token_seconds_sum")
            ttft_n = delta(b, a, fe, "nixl_serve_time_to_first_token_seconds_count")
            row = {
                "topology": topo, "workload": wl, "router": router,
                "requests": load["requests"], "errors": load["errors"],
                "ttft_p50_ms": load["ttft_ms"]["p50"], "ttft_p99_ms": load["ttft_ms"]["p99"],
                "itl_p50_ms": load["itl_ms"]["p50"], "itl_p99_ms": load["itl_ms"]["p99"],
                "tokens_per_s": load["tokens_per_s"], "requests_per_s": load["requests_per_s"],
                "cache_hit_rate": round(cached / prompt, 3) if prompt else None,
            }
            ok = load["ok"]
            if topo.startswith("disagg") and ttft_n > 0 and ok > 0:
                hs = sum(delta(b, a, u, "nixl_serve_handoff_seconds_sum") for u in a if u != fe)
                hn = sum(delta(b, a, u, "nixl_serve_handoff_seconds_count") for u in a if u != fe)
                if hn > 0:
                    mean_prompt = prompt / ttft_n
                    nbytes = int(math.ceil(mean_prompt / tpb) * tpb * kvb)
                    h_ms = hs / hn * 1e3
                    ttft_mean = ttft_sum / ttft_n * 1e3
                    row.update({
                        "handoff_ms": round(h_ms, 3),
                        "ttft_mean_ms": round(ttft_mean, 3),
                        "handoff_share_of_ttft": round(h_ms / ttft_mean, 3),
                        "handoff_bytes": nbytes,
                        "memcpy_same_bytes_ms": round(memcpy_ms(nbytes), 4),
                    })
            if load.get("error_samples"):
                row["error_samples"] = load["error_samples"]
            rows.append(row)

def f(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 1 else str(v))

cols = ["topology", "workload", "router", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
        "tokens_per_s", "requests_per_s", "errors", "cache_hit_rate", "handoff_ms",
        "handoff_share_of_ttft", "handoff_bytes", "memcpy_same_bytes_ms"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(f(r.get(c)) for c in cols) + " |")
for r in rows:
    for e in r.get("error_samples", []):
        print(f"error ({r['topology']}, {r['workload']}, {r['router']}): {e}")
if as_json:
    for r in rows:
        print(json.dumps(r))
PY
