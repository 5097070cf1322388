#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Partial metadata, written against NIXL's Python API only: a target agent sends an
initiator the metadata of part of its registered memory at a time.

    python3 partial_metadata.py [--target-port 0] [--init-port 0]

Two agents in one process, both with a listen thread. The target registers two groups of ten
256-byte buffers (``malloc_passthru``, registration descriptors as ``(addr, len, dev, meta)``
tuples); the initiator registers ten. The target sends the metadata of the first group only
(``send_partial_agent_metadata`` to the initiator's listener): a READ of the first group works
and its notification reaches the target (``check_remote_xfer_done``); a request naming the
second group raises ``nixlNotFoundError``. After the second group's metadata is sent, a READ of
it works too. Every byte is checked; then the teardown (``remove_remote_agent``,
``deregister_memory``, ``free_passthru``). Prints ``PASS`` and exits 0 when everything checked out.
"""

import argparse
import ctypes
import sys
import time

import nixl._utils as nixl_utils
from nixl._api import nixl_agent, nixl_agent_config
from nixl._bindings import nixlNotFoundError

BUF = 256
COUNT = 10
DEADLINE_S = 30.0


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def buffers(fill_from: int, addrs: list) -> list:
    rows = []
    for k in range(COUNT):
        a = nixl_utils.malloc_passthru(BUF)
        if not a:
            fail("malloc_passthru failed")
        ctypes.memset(a, (fill_from + k) % 256, BUF)
        addrs.append(a)
        rows.append((a, BUF, 0, "example"))
    return rows


def wait_for_metadata(init, descs, whose: str) -> None:
    """Waits until the initiator has the target's metadata of `descs` (`whose`: for the error)."""
    end = time.monotonic() + DEADLINE_S
    while not init.check_remote_metadata("target", descs):
        if time.monotonic() > end:
            fail(f"{whose} metadata never arrived")
        time.sleep(0.001)


def read_and_check(init, target, local, remote, remote_rows, notif: bytes) -> None:
    h = init.initialize_xfer("READ", local, remote, "target", notif)
    if init.transfer(h) == "ERR":
        fail("posting the READ failed")
    init_done = target_done = False
    end = time.monotonic() + DEADLINE_S
    while not (init_done and target_done):
        if not init_done:
            st = init.check_xfer_state(h)
            if st == "ERR":
                fail("the READ ended in ERR")
            init_done = st == "DONE"
        if not target_done:
            target_done = target.check_remote_xfer_done("initiator", notif)
        if time.monotonic() > end:
            fail(f"READ {notif!r}: initiator done {init_done}, target notified {target_done}")
    for k in range(COUNT):
        got = ctypes.string_at(local[k][0], BUF)
        want = ctypes.string_at(remote_rows[k][0], BUF)
        if got != want:
            fail(f"READ {notif!r}: buffer {k} differs")
    init.release_xfer_handle(h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-port", type=int, default=0, help="the target's listen port (0: any)")
    p.add_argument("--init-port", type=int, default=0, help="the initiator's listen port (0: any)")
    args = p.parse_args()
    ip = "127.0.0.1"

    target = nixl_agent("target", nixl_agent_config(True, True, args.target_port))
    addrs: list = []
    rows1 = buffers(1, addrs)
    rows2 = buffers(101, addrs)
    reg1 = target.get_reg_descs(rows1, "DRAM")
    reg2 = target.get_reg_descs(rows2, "DRAM")
    xfer1, xfer2 = reg1.trim(), reg2.trim()
    if target.register_memory(reg1) is None or target.register_memory(reg2) is None:
        fail("target registration failed")

    init = nixl_agent("initiator", nixl_agent_config(True, True, args.init_port))
    init_port = args.init_port or init.get_listen_port()
    init_rows = buffers(201, addrs)
    init_reg = init.get_reg_descs(init_rows, "DRAM")
    init_xfer = init_reg.trim()
    if init.register_memory(init_reg) is None:
        fail("initiator registration failed")

    # The first group's metadata only.
    target.send_partial_agent_metadata(reg1, True, ["UCX"], ip, init_port)
    wait_for_metadata(init, xfer1, "the first group's")
    read_and_check(init, target, init_xfer, xfer1, rows1, b"group 1")

    # The second group is not described yet.
    if init.check_remote_metadata("target", xfer2):
        fail("the second group is described before its metadata was sent")
    try:
        init.initialize_xfer("READ", init_xfer, xfer2, "target", b"group 2")
    except nixlNotFoundError:
        pass
    else:
        fail("a request naming memory whose metadata was not sent was accepted")

    target.send_partial_agent_metadata(reg2, True, ["UCX"], ip, init_port)
    wait_for_metadata(init, xfer2, "the second group's")
    read_and_check(init, target, init_xfer, xfer2, rows2, b"group 2")
    # The first group is still described.
    read_and_check(init, target, init_xfer, xfer1, rows1, b"group 1 again")

    init.remove_remote_agent("target")
    if init.check_remote_metadata("target"):
        fail("the target's metadata is still loaded after remove_remote_agent")
    target.deregister_memory(reg1)
    target.deregister_memory(reg2)
    init.deregister_memory(init_reg)
    del init
    del target
    for a in addrs:
        nixl_utils.free_passthru(a)
    print("PASS", flush=True)


if __name__ == "__main__":
    main()
