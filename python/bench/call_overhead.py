#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""What the Python layer (``nixl._api``) adds per call over the Rust binding (``nixl._bindings``)
it calls, in one process: ``check_xfer_state`` of a finished request, and ``transfer`` + one
``check_xfer_state`` of a 4 KiB request between two agents of the process (``local`` backend).

    python3 python/bench/call_overhead.py [--json] [--n 200000]
"""

import argparse
import json
import time

import numpy as np

from nixl._api import nixl_agent


def per_call(f, n: int) -> float:
    for _ in range(min(n, 2000)):
        f()
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed by other work on the machine
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--n", type=int, default=200000)
    args = p.parse_args()
    a, b = nixl_agent("overhead-a"), nixl_agent("overhead-b")
    x, y = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    a.register_memory(x)
    b.register_memory(y)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", a.get_xfer_descs(x), a.get_xfer_descs(y), "overhead-b")
    raw = h._handle
    a.transfer(h)
    while a.check_xfer_state(h) != "DONE":
        pass
    rows = {
        "check_xfer_state_api_ns": per_call(lambda: a.check_xfer_state(h), args.n),
        "state_binding_ns": per_call(lambda: raw.state(), args.n),
        "transfer_check_api_ns": per_call(lambda: (a.transfer(h), a.check_xfer_state(h)), args.n),
        "post_state_binding_ns": per_call(lambda: (raw.post(), raw.state()), args.n),
    }
    if args.json:
        print(json.dumps(rows))
        return
    for k, v in rows.items():
        print(f"{k:28} {v:8.0f}")
    print(f"API layer adds {rows['check_xfer_state_api_ns'] - rows['state_binding_ns']:.0f} ns to "
          f"check_xfer_state and {rows['transfer_check_api_ns'] - rows['post_state_binding_ns']:.0f} ns "
          "to transfer + check_xfer_state")


if __name__ == "__main__":
    main()
