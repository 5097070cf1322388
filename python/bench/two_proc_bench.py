#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two-process transfer benchmark written against NIXL's Python API only (``nixl._api``), so
that the same script measures nixl-rs's ``nixl`` package and NVIDIA NIXL (``nixl-cu12``) side
by side: whichever ``nixl`` the interpreter imports is measured.

    python3 python/bench/two_proc_bench.py [--json] [--iters N] [--blocks 56000] [--sizes B ...]

The initiator starts the target as a child process (same interpreter and environment), fetches
its metadata over the listen thread, and for each size from 4 KiB to 64 MiB creates one request
and posts it again and again (post, poll check_xfer_state until DONE), WRITE and READ: the p50
latency of one post and the bandwidth. Then a prepared transfer of --blocks blocks of 1 KiB
(prep_xfer_dlist once, make_prepped_xfer with int32 index arrays, in a shuffled order): the time
to make the request and to move it. Every size's last transfer is checked byte by byte.

The 64 KiB-1 MiB rows move through page pinning (cross-memory copies, ours and UCX's), which
costs about twice as much over 4 KiB pages as over 2 MiB ones: numpy asks for transparent huge
pages for big arrays (``madvise``), and whether the kernel has them to give depends on the
machine's memory at the time. So the JSON gives ``anon_huge_kb`` of both processes (their
buffers' huge pages); ``--no-hugepages`` turns numpy's request off in both, for runs that are
comparable whatever the machine's state.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from nixl._api import nixl_agent, nixl_agent_config

MAX = 64 << 20
HUGE = 2 << 20
BLOCK = 1024


def anon_huge_kb() -> int:
    """This process's anonymous memory in transparent huge pages (kB; -1 when unknown)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def aligned_zeros(n: int) -> "np.ndarray":
    """`n` zero bytes starting on a 2 MiB boundary. numpy's big arrays start wherever mmap put
    them (16 bytes past a page, at a 4 KiB multiple decided by the process's earlier mappings,
    thread stacks included), so without this the first huge page of the buffer, the one every
    single transfer below 2 MiB uses, is in transparent huge pages or not by the luck of the
    process's layout: it moved the 256 KiB and 1 MiB rows by 2x between runs of the same
    implementation. Aligned, both implementations get whole huge pages where the kernel has them."""
    raw = np.zeros(n + HUGE, dtype=np.uint8)
    off = (-raw.ctypes.data) % HUGE
    return raw[off:off + n]


def no_hugepages() -> None:
    """Stops numpy from asking for transparent huge pages for its big arrays."""
    np.core.multiarray._set_madvise_hugepage(False)


def target(port_file: str, blocks: int, port: int) -> None:
    agent = nixl_agent("bench-target", nixl_agent_config(True, True, port))
    buf = aligned_zeros(max(MAX, blocks * BLOCK))
    buf[:] = (np.arange(buf.size) % 251).astype(np.uint8)
    agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    while not agent.check_remote_metadata("bench-init"):
        time.sleep(0.001)
    agent.send_notif("bench-init", b"%d %d %d" % (buf.ctypes.data, buf.nbytes, anon_huge_kb()))
    while not agent.check_remote_xfer_done("bench-init", b"bye"):
        time.sleep(0.01)


def wait(agent, h) -> None:
    while agent.check_xfer_state(h) != "DONE":
        pass


def run(args) -> dict:
    port_file = f"/tmp/nixl-bench-port-{os.getpid()}"
    child = subprocess.Popen(
        [sys.executable, __file__, "--target", port_file, "--blocks", str(args.blocks),
         "--port", str(args.port)] + (["--no-hugepages"] if args.no_hugepages else [])
    )
    try:
        while not os.path.exists(port_file):
            assert child.poll() is None, "target exited"
            time.sleep(0.01)
        port = int(open(port_file).read())
        os.unlink(port_file)
        agent = nixl_agent("bench-init", nixl_agent_config(True, True, args.init_port))
        local = aligned_zeros(max(MAX, args.blocks * BLOCK))
        agent.register_memory([(local.ctypes.data, local.nbytes, 0, "")], "DRAM")
        agent.fetch_remote_metadata("bench-target", "127.0.0.1", port)
        agent.send_local_metadata("127.0.0.1", port)
        while not agent.check_remote_metadata("bench-target"):
            time.sleep(0.001)
        notifs = {}
        while "bench-target" not in notifs:
            notifs = agent.get_new_notifs()
        raddr, rlen, target_huge_kb = map(int, notifs["bench-target"][0].split())
        pattern = (np.arange(rlen) % 251).astype(np.uint8)
        local[:] = pattern[: local.size]  # WRITEs keep the target's pattern as it is
        huge = {"init": anon_huge_kb(), "target": target_huge_kb}
        rows = []
        size = 4096
        while size <= MAX:
            if args.sizes and size not in args.sizes:
                size *= 4 if size < (1 << 20) else 8
                continue
            for op in ("WRITE", "READ"):
                lo = local.ctypes.data
                ld = agent.get_xfer_descs([(lo, size, 0)], "DRAM")
                rd = agent.get_xfer_descs([(raddr, size, 0)], "DRAM")
                h = agent.initialize_xfer(op, ld, rd, "bench-target", backends=args.backends)
                iters = max(3, min(args.iters, (2 << 30) // size))
                for _ in range(min(10, iters)):  # warm-up
                    agent.transfer(h)
                    wait(agent, h)
                lat = []
                t0 = time.perf_counter()
                for _ in range(iters):
                    s = time.perf_counter()
                    agent.transfer(h)
                    wait(agent, h)
                    lat.append(time.perf_counter() - s)
                total = time.perf_counter() - t0
                if op == "READ":  # one more READ into zeroed memory, checked
                    local[:size] = 0
                    agent.transfer(h)
                    wait(agent, h)
                    assert np.array_equal(local[:size], pattern[:size]), f"READ {size}: bytes differ"
                backend = agent.query_xfer_backend(h)
                if hasattr(agent, "query_xfer_backend_rs"):
                    backend += "/" + agent.query_xfer_backend_rs(h)
                agent.release_xfer_handle(h)
                rows.append({
                    "backend": backend,
                    "op": op, "bytes": size, "iters": iters,
                    "p50_us": float(np.median(lat) * 1e6),
                    "gbps": size * iters / total / 1e9,
                })
            size *= 4 if size < (1 << 20) else 8
        # Prepared blocks: 56,000 blocks of 1 KiB each side, indices shuffled.
        n = args.blocks
        lrows = np.stack([local.ctypes.data + np.arange(n, dtype=np.uint64) * BLOCK,
                          np.full(n, BLOCK, np.uint64), np.zeros(n, np.uint64)], axis=1)
        rrows = np.stack([raddr + np.arange(n, dtype=np.uint64) * BLOCK,
                          np.full(n, BLOCK, np.uint64), np.zeros(n, np.uint64)], axis=1)
        t = time.perf_counter()
        lp = agent.prep_xfer_dlist("NIXL_INIT_AGENT", lrows, "DRAM")
        rp = agent.prep_xfer_dlist("bench-target", rrows, "DRAM")
        prep_s = time.perf_counter() - t
        perm = np.random.default_rng(0).permutation(n).astype(np.int32)
        local[: n * BLOCK] = 0
        lidx = np.arange(n, dtype=np.int32)
        # The first request of the process (what the first batch of an engine pays), then
        # --makes more, each from a fresh permutation (an engine's next batch names new blocks),
        # each released: the wall time, the calling thread's CPU time (less sensitive to a loaded
        # machine) and the page faults (first touches of fresh memory: load-independent).
        rng = np.random.default_rng(1)
        makes = []
        for k in range(1 + args.makes):
            idx = perm if k == 0 else rng.permutation(n).astype(np.int32)
            f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
            t = time.perf_counter()
            hk = agent.make_prepped_xfer("READ", lp, lidx, rp, idx)
            wall = time.perf_counter() - t
            makes.append((wall * 1e3, (time.thread_time() - c0) * 1e3,
                          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
            if k == 0:
                h = hk
            else:
                agent.release_xfer_handle(hk)
        make_s, make_cpu_s, make_faults = makes[0][0] / 1e3, makes[0][1] / 1e3, makes[0][2]
        later = makes[1:] or makes
        lat = []
        for _ in range(5):
            t = time.perf_counter()
            agent.transfer(h)
            wait(agent, h)
            lat.append(time.perf_counter() - t)
        for i in range(0, n, 997):
            j = perm[i]
            assert np.array_equal(local[i * BLOCK:(i + 1) * BLOCK],
                                  pattern[j * BLOCK:(j + 1) * BLOCK]), f"block {i} differs"
        agent.release_xfer_handle(h)
        prepped = {"blocks": n, "block_bytes": BLOCK, "prep_ms": prep_s * 1e3,
                   "make_ms": make_s * 1e3, "make_cpu_ms": make_cpu_s * 1e3,
                   "make_faults": make_faults,
                   "makes": len(later),
                   "make_median_ms": float(np.median([m[0] for m in later])),
                   "make_median_cpu_ms": float(np.median([m[1] for m in later])),
                   "make_median_faults": float(np.median([m[2] for m in later])),
                   "xfer_p50_ms": float(np.median(lat) * 1e3),
                   "gbps": n * BLOCK / float(np.median(lat)) / 1e9}
        agent.send_notif("bench-target", b"bye")
        child.wait(timeout=30)
        impl = "nixl-rs" if hasattr(sys.modules[nixl_agent.__module__], "BACKEND_MAP") else "NIXL"
        return {"impl": impl, "rows": rows, "prepped": prepped, "anon_huge_kb": huge}
    finally:
        if child.poll() is None:
            child.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--iters", type=int, default=2000, help="posts per size (fewer for large ones)")
    p.add_argument("--blocks", type=int, default=56000, help="blocks of the prepared transfer")
    p.add_argument("--makes", type=int, default=8,
                   help="prepared requests made after the first (their median is reported)")
    p.add_argument("--port", type=int, default=15555, help="the target's listen port")
    p.add_argument("--init-port", type=int, default=15556, help="the initiator's listen port")
    p.add_argument("--backends", nargs="*", default=[], help="backends= of every request")
    p.add_argument("--sizes", type=int, nargs="*", default=[],
                   help="only these transfer sizes in bytes (of 4 KiB, 16 KiB, ... 64 MiB)")
    p.add_argument("--no-hugepages", action="store_true",
                   help="numpy asks for no transparent huge pages (both processes)")
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.no_hugepages:
        no_hugepages()
    if args.target:
        target(args.target, args.blocks, args.port)
        return
    res = run(args)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['impl']}: two processes, post + poll until DONE "
          f"(huge pages, kB: {res['anon_huge_kb']})")
    print(f"{'op':6} {'size':>9} {'p50 us':>9} {'GB/s':>7}  backend")
    for r in res["rows"]:
        print(f"{r['op']:6} {r['bytes']:>9} {r['p50_us']:>9.1f} {r['gbps']:>7.2f}  {r['backend']}")
    pp = res["prepped"]
    print(f"prepped READ {pp['blocks']} x {pp['block_bytes']} B: prep {pp['prep_ms']:.1f} ms, "
          f"make {pp['make_ms']:.1f} ms ({pp['make_cpu_ms']:.1f} ms CPU, {pp['make_faults']} page faults), "
          f"then {pp['make_median_ms']:.2f} ms ({pp['make_median_cpu_ms']:.2f} ms CPU, "
          f"{pp['make_median_faults']:.0f} faults; median of {pp['makes']}), transfer p50 {pp['xfer_p50_ms']:.2f} ms ({pp['gbps']:.2f} GB/s)")


if __name__ == "__main__":
    main()
