#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two peers, written against NIXL's Python API only (``nixl._api``): run the target, then the
initiator, in two processes.

    python3 two_peers.py --mode target --port 5555 [--port-out FILE] [--torch]
    python3 two_peers.py --mode initiator --ip 127.0.0.1 --port 5555 [--torch]

The target registers 16 blocks of 256 bytes (block i holds the byte i + 1), sends the initiator
its blocks' descriptors (NIXL's serialized form) once the initiator's metadata has arrived, and
waits for the initiator's transfers. The initiator:

1. fetches the target's metadata over its listen thread and sends its own;
2. READs every block with one request made from two descriptor lists (``initialize_xfer``);
3. prepares both sides once (``prep_xfer_dlist``) and makes four READs by index, remote blocks
   in reversed order within each group (``make_prepped_xfer``), posted together;
4. WRITEs a half of each of blocks 12..15 (two requests: one from a list of tuples, one from an
   Nx3 numpy array), posted together;
5. posts the four prepared READs again with new notifications;
6. waits for the target's verdict, then tears down (``release_*``, ``remove_remote_agent``,
   ``invalidate_local_metadata``, ``deregister_memory``).

Every byte is checked on both sides. With ``--torch`` the memory is a CPU tensor and the
descriptors come from lists of row tensors; without it, a numpy array with ``(addr, len, dev)``
tuples and Nx3 arrays. Prints ``PASS`` and exits 0 when everything checked out.
"""

import argparse
import sys
import time

import numpy as np

from nixl._api import nixl_agent, nixl_agent_config

BLOCKS = 16
BLOCK = 256
HALF = BLOCK // 2
DEADLINE_S = 60.0


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def until(what: str, cond) -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > end:
            fail(f"timed out waiting for {what}")
        time.sleep(0.001)


class Memory:
    """BLOCKS x BLOCK bytes: a torch tensor or a numpy array, with a uint8 view for checks."""

    def __init__(self, use_torch: bool, fill: int):
        self.torch = use_torch
        if use_torch:
            import torch

            self.obj = torch.full((BLOCKS, BLOCK), fill, dtype=torch.uint8)
            self.view = self.obj.numpy()
            self.addr = self.obj.data_ptr()
        else:
            self.obj = np.full((BLOCKS, BLOCK), fill, dtype=np.uint8)
            self.view = self.obj
            self.addr = self.obj.ctypes.data

    def register(self, agent):
        if self.torch:
            return agent.register_memory(self.obj)
        return agent.register_memory([(self.addr, self.obj.nbytes, 0, "")], "DRAM")

    def block_descs(self, agent):
        """One descriptor per block."""
        if self.torch:
            return agent.get_xfer_descs([self.obj[i, :] for i in range(BLOCKS)])
        return agent.get_xfer_descs([(self.addr + i * BLOCK, BLOCK, 0) for i in range(BLOCKS)], "DRAM")


def wait_all(agent, handles) -> None:
    pending = list(handles)
    end = time.monotonic() + DEADLINE_S
    while pending:
        for h in list(pending):
            st = agent.check_xfer_state(h)
            if st == "ERR":
                fail("a transfer ended in ERR")
            if st == "DONE":
                pending.remove(h)
        if time.monotonic() > end:
            fail("transfers did not finish")


def post_all(agent, handles, notifs=None) -> None:
    for k, h in enumerate(handles):
        st = agent.transfer(h, notifs[k]) if notifs else agent.transfer(h)
        if st == "ERR":
            fail("posting a transfer failed")


def target(args) -> None:
    agent = nixl_agent("target", nixl_agent_config(True, True, args.port))
    mem = Memory(args.torch, 0)
    for i in range(BLOCKS):
        mem.view[i, :] = i + 1
    reg = mem.register(agent)
    if not reg:
        fail("registration failed")
    if args.port_out:
        with open(args.port_out + ".tmp", "w") as f:
            f.write(str(agent.get_listen_port()))
        import os

        os.rename(args.port_out + ".tmp", args.port_out)

    until("the initiator's metadata", lambda: agent.check_remote_metadata("initiator"))
    agent.send_notif("initiator", agent.get_serialized_descs(mem.block_descs(agent)))
    agent.send_notif("initiator", b"layout %d" % mem.addr)

    want = {b"read all"} | {b"read %d" % s for s in range(4)} | {b"again %d" % s for s in range(4)}
    want |= {b"write 12-13", b"write 14-15"}
    got = set()

    def collect():
        for msg in agent.get_new_notifs().get("initiator", []):
            got.add(msg)
        return want <= got

    until("the initiator's notifications", collect)
    if got != want:
        fail(f"unexpected notifications: {sorted(got - want)}")
    # Blocks 12..15: one half each was written with 100 + block, the other half kept i + 1.
    ok = True
    for i in range(12, 16):
        first = i % 2 == 0  # the initiator writes the first half of even blocks
        w = slice(0, HALF) if first else slice(HALF, BLOCK)
        k = slice(HALF, BLOCK) if first else slice(0, HALF)
        ok &= bool(np.all(mem.view[i, w] == 100 + i)) and bool(np.all(mem.view[i, k] == i + 1))
    ok &= bool(all(np.all(mem.view[i, :] == i + 1) for i in range(12)))
    agent.send_notif("initiator", b"verified" if ok else b"wrong bytes")
    if not ok:
        fail("the written blocks hold the wrong bytes")
    # The initiator ends by invalidating its metadata here.
    until("the initiator's invalidation", lambda: not agent.check_remote_metadata("initiator"))
    agent.deregister_memory(reg)
    print("PASS target", flush=True)


def initiator(args) -> None:
    agent = nixl_agent("initiator", nixl_agent_config(True, True, 0))
    mem = Memory(args.torch, 0)
    reg = mem.register(agent)
    if not reg:
        fail("registration failed")
    agent.fetch_remote_metadata("target", args.ip, args.port)
    agent.send_local_metadata(args.ip, args.port)

    msgs = []

    def two():
        msgs.extend(agent.get_new_notifs().get("target", []))
        return len(msgs) >= 2

    until("the target's descriptors", two)
    remote = agent.deserialize_descs(msgs[0])
    raddr = int(msgs[1].split()[1])
    until("the target's metadata", lambda: agent.check_remote_metadata("target"))
    local = mem.block_descs(agent)
    if remote.descCount() != BLOCKS or local.descCount() != BLOCKS:
        fail(f"{remote.descCount()} remote, {local.descCount()} local descriptors")

    def check(rows, what, reversed_groups=False):
        for i in rows:
            # Prepared READs pair local blocks (s, s+4, s+8) with remote (s+8, s+4, s).
            src = (i + 8 if i < 4 else i - 8 if i >= 8 else i) if reversed_groups else i
            if not np.all(mem.view[i, :] == src + 1):
                fail(f"{what}: block {i} holds the wrong bytes")

    # 2. One READ of every block, from two descriptor lists.
    h = agent.initialize_xfer("READ", local, remote, "target", "read all")
    post_all(agent, [h])
    wait_all(agent, [h])
    check(range(BLOCKS), "READ of every block")
    agent.release_xfer_handle(h)
    mem.view[:] = 0

    # 3. Prepared lists, four READs by index (remote blocks in reversed order).
    lside = agent.prep_xfer_dlist("", local)
    rside = agent.prep_xfer_dlist("target", remote)
    reads = []
    for s in range(4):
        idx = [s, s + 4, s + 8]
        reads.append(agent.make_prepped_xfer("READ", lside, idx, rside, idx[::-1], b"read %d" % s))
    post_all(agent, reads)
    wait_all(agent, reads)
    check(range(12), "prepared READs", reversed_groups=True)

    # 4. WRITEs of one half of blocks 12..15: a list of tuples, then an Nx3 array.
    mem.view[12:, :] = np.arange(112, 116, dtype=np.uint8)[:, None]

    def half(i, base):
        off = 0 if i % 2 == 0 else HALF
        return (base + i * BLOCK + off, HALF, 0)

    w0 = agent.initialize_xfer("WRITE", agent.get_xfer_descs([half(12, mem.addr), half(13, mem.addr)], "DRAM"),
                               agent.get_xfer_descs([half(12, raddr), half(13, raddr)], "DRAM"),
                               "target", b"write 12-13")
    w1 = agent.initialize_xfer(
        "WRITE",
        agent.get_xfer_descs(np.array([half(14, mem.addr), half(15, mem.addr)], dtype=np.uint64), "DRAM"),
        agent.get_xfer_descs(np.array([half(14, raddr), half(15, raddr)], dtype=np.uint64), "DRAM"),
        "target", b"write 14-15")
    post_all(agent, [w0, w1])
    wait_all(agent, [w0, w1])

    # 5. The prepared READs again, with new notifications (no new preparation).
    mem.view[:12, :] = 0
    post_all(agent, reads, [b"again %d" % s for s in range(4)])
    wait_all(agent, reads)
    check(range(12), "prepared READs posted again", reversed_groups=True)

    # 6. The target's verdict, then the teardown.
    verdict = []

    def answer():
        verdict.extend(agent.get_new_notifs().get("target", []))
        return bool(verdict)

    until("the target's verdict", answer)
    if verdict[0] != b"verified":
        fail(f"the target says {verdict[0]!r}")
    for x in reads + [w0, w1]:
        agent.release_xfer_handle(x)
    agent.release_dlist_handle(lside)
    agent.release_dlist_handle(rside)
    agent.remove_remote_agent("target")
    if agent.check_remote_metadata("target"):
        fail("the target's metadata is still loaded after remove_remote_agent")
    agent.invalidate_local_metadata(args.ip, args.port)
    agent.deregister_memory(reg)
    print("PASS initiator", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["target", "initiator"], required=True)
    p.add_argument("--ip", default="127.0.0.1", help="the target's address (initiator)")
    p.add_argument("--port", type=int, default=5555, help="the target's listen port (0: any)")
    p.add_argument("--port-out", default="", help="target: write the listen port to this file")
    p.add_argument("--torch", action="store_true", help="torch CPU tensors instead of numpy")
    args = p.parse_args()
    (target if args.mode == "target" else initiator)(args)


if __name__ == "__main__":
    main()
