#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Querying storage, written against NIXL's Python API only: an agent with the POSIX backend
asks about files named in FILE descriptors' meta field.

    python3 query_memory.py [--dir DIR]

Writes three files of different sizes under DIR (a new temporary directory by default), creates
the POSIX backend from its default parameters (``get_plugin_params``, ``create_backend``), and
calls ``query_memory`` with four ``(0, 0, 0, path)`` descriptors: the three files and a path that
does not exist. Each existing file's answer must give its size, the missing one ``None``. Prints
``PASS`` and exits 0 when everything checked out.
"""

import argparse
import os
import shutil
import sys
import tempfile

from nixl._api import nixl_agent, nixl_agent_config


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="", help="where to write the files (default: a temp dir)")
    args = p.parse_args()
    own = not args.dir
    where = tempfile.mkdtemp(prefix="nixl-query-") if own else args.dir
    try:
        paths = []
        for i, size in enumerate([10, 4096, 70000]):
            path = os.path.join(where, f"file-{i}.bin")
            with open(path, "wb") as f:
                f.write(bytes([i]) * size)
            paths.append((path, size))
        missing = os.path.join(where, "not-there.bin")

        agent = nixl_agent("query-example", nixl_agent_config(False, False, 0, backends=[]))
        if "POSIX" not in agent.get_plugin_list():
            fail(f"no POSIX plugin in {agent.get_plugin_list()}")
        agent.create_backend("POSIX", agent.get_plugin_params("POSIX"))
        descs = [(0, 0, 0, paths[0][0]), (0, 0, 0, paths[1][0]), (0, 0, 0, missing), (0, 0, 0, paths[2][0])]
        resp = agent.query_memory(descs, "POSIX", mem_type="FILE")
        if len(resp) != 4:
            fail(f"{len(resp)} answers for 4 descriptors")
        want = [paths[0][1], paths[1][1], None, paths[2][1]]
        for i, (got, size) in enumerate(zip(resp, want)):
            if size is None:
                if got is not None:
                    fail(f"descriptor {i}: a missing file has an answer {got!r}")
                continue
            if got is None or int(got.get("size", -1)) != size:
                fail(f"descriptor {i}: {got!r}, want size {size}")
            print(f"descriptor {i}: size {got['size']}, mode {got.get('mode')}, mtime {got.get('mtime')}")
        del agent
        print("PASS", flush=True)
    finally:
        if own:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
