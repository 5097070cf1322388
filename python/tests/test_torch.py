# SPDX-License-Identifier: Apache-2.0
"""NIXL's Python API with torch tensors, as engines call it: descriptors from tensors and lists
of tensors, registration, READ and WRITE with notifications between two agents in one process
and in two processes (the second over the listen thread), prepared lists; every byte checked.

Skips (visibly) where torch is not installed, unless ``NIXL_REQUIRE_TORCH=1`` (set by
``.ci/run``, whose ``.ci/setup`` installs torch) or ``NIXL_REQUIRE_ALL=1``. The CUDA tensor
tests need a GPU that torch sees: they skip without one, whatever is required (hardware)."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import wait_done

if importlib.util.find_spec("torch") is None:
    _why = "torch is not installed (python3 -m pip install torch; .ci/setup installs it)"
    if "1" in (os.environ.get("NIXL_REQUIRE_TORCH"), os.environ.get("NIXL_REQUIRE_ALL")):
        pytest.fail(f"NIXL_REQUIRE_TORCH=1 (or NIXL_REQUIRE_ALL=1) but {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

import torch  # noqa: E402

import nixl  # noqa: E402
from nixl._api import nixl_agent, nixl_agent_config  # noqa: E402
from nixl._bindings import nixlInvalidParamError, nixlRegDList, nixlXferDList  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device visible to torch: CUDA tensor tests need a GPU (hardware, never forced)",
)


def notifs_from(agent, peer, timeout=20.0):
    end = time.monotonic() + timeout
    while True:
        got = agent.get_new_notifs().get(peer)
        if got:
            return got
        assert time.monotonic() < end, f"no notification from {peer}"
        time.sleep(0.001)


@pytest.fixture
def pair(name):
    a = nixl_agent(name("init"), nixl_agent_config(backends=["UCX"]))
    b = nixl_agent(name("target"), nixl_agent_config(backends=["UCX"]))
    return a, b


def test_descriptors_from_tensors(name):
    a = nixl_agent(name())
    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    r = a.get_reg_descs(t)
    assert isinstance(r, nixlRegDList) and r.getType() == nixl._bindings.DRAM_SEG
    assert r[0] == (t.data_ptr(), 256, 0, "")
    rows = a.get_xfer_descs([t[i, :] for i in range(8)])
    assert isinstance(rows, nixlXferDList) and len(rows) == 8
    assert [rows[i] for i in range(8)] == [(t.data_ptr() + 32 * i, 32, 0) for i in range(8)]
    # Every element size counts: bytes, not elements.
    for dtype, size in [(torch.uint8, 1), (torch.float16, 2), (torch.bfloat16, 2), (torch.int64, 8)]:
        x = torch.zeros(10, dtype=dtype)
        assert a.get_xfer_descs(x)[0] == (x.data_ptr(), 10 * size, 0)
    # A non-contiguous tensor (or a list holding one) has no single range: None, logged (NIXL).
    assert a.get_xfer_descs(t.t()) is None
    assert a.get_reg_descs([t[:, 0]]) is None
    with pytest.raises(nixlInvalidParamError):
        a.register_memory(t.t())
    # Serialized as NIXL does, and in our safe format.
    assert a.deserialize_descs(a.get_serialized_descs(rows)) == rows
    assert a.deserialize_descs_safe(a.serialize_descs_safe(rows)) == rows


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_tensor_rows_between_two_agents(pair, op):
    a, b = pair
    g = torch.Generator().manual_seed(7)
    mine = torch.randint(0, 1 << 15, (16, 1024), dtype=torch.int16, generator=g).to(torch.bfloat16)
    theirs = torch.randint(0, 1 << 15, (16, 1024), dtype=torch.int16, generator=g).to(torch.bfloat16)
    want_mine, want_theirs = mine.clone(), theirs.clone()
    ra, rb = a.register_memory(mine), b.register_memory(theirs)
    assert a.add_remote_agent(b.get_agent_metadata()) == b.name
    # Row i here with row 15 - i there.
    local = a.get_xfer_descs([mine[i, :] for i in range(16)])
    remote = b.get_xfer_descs([theirs[15 - i, :] for i in range(16)])
    h = a.initialize_xfer(op, local, remote, b.name, b"rows")
    assert a.transfer(h) in ("DONE", "PROC")
    wait_done(a, h)
    assert notifs_from(b, a.name) == [b"rows"]
    if op == "WRITE":
        assert torch.equal(theirs, want_mine.flip(0)) and torch.equal(mine, want_mine)
    else:
        assert torch.equal(mine, want_theirs.flip(0)) and torch.equal(theirs, want_theirs)
    a.release_xfer_handle(h)
    a.deregister_memory(ra)
    b.deregister_memory(rb)


def test_list_of_tensors_registered_and_prepped(pair):
    a, b = pair
    srcs = [torch.full((256,), float(i), dtype=torch.float32) for i in range(6)]
    dsts = [torch.zeros(256, dtype=torch.float32) for _ in range(6)]
    ra, rb = a.register_memory(srcs), b.register_memory(dsts)
    assert len(ra) == 6 and len(rb) == 6
    a.add_remote_agent(b.get_partial_agent_metadata(rb, True))
    assert a.check_remote_metadata(b.name, b.get_xfer_descs(dsts))
    lh = a.prep_xfer_dlist("", srcs)
    rh = a.prep_xfer_dlist(b.name, b.get_xfer_descs(dsts))
    # Lists of ints and int32 numpy arrays as indices: source i lands in destination 5 - i.
    h1 = a.make_prepped_xfer("WRITE", lh, [0, 1, 2], rh, [5, 4, 3], b"first")
    h2 = a.make_prepped_xfer("WRITE", lh, np.array([3, 4, 5], np.int32), rh,
                             np.array([2, 1, 0], np.int32), b"second")
    for h in (h1, h2):
        a.transfer(h)
    for h in (h1, h2):
        wait_done(a, h)
    for i in range(6):
        assert torch.equal(dsts[5 - i], srcs[i]), f"tensor {i}"
    got = []
    while len(got) < 2:
        got += notifs_from(b, a.name)
    assert sorted(got) == [b"first", b"second"]
    for h in (h1, h2):
        a.release_xfer_handle(h)
    a.release_dlist_handle(lh)
    a.release_dlist_handle(rh)
    a.deregister_memory(ra)
    b.deregister_memory(rb)


def test_tensors_between_two_processes(tmp_path, name):
    """The target registers a tensor and sends its rows' descriptors; this side READs them
    over the listen thread, then WRITEs its own rows back into the target's second half."""
    tname, iname = name("ttarget"), name("tinit")
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "torch_peer.py"), tname, iname,
                          str(port_file)])
    try:
        end = time.monotonic() + 30
        while not port_file.exists():
            assert p.poll() is None, "target exited early"
            assert time.monotonic() < end, "target did not start"
            time.sleep(0.01)
        port = int(port_file.read_text())
        a = nixl_agent(iname, nixl_agent_config(True, True, 0))
        t = torch.zeros((32, 512), dtype=torch.float32)
        a.register_memory(t)
        a.fetch_remote_metadata(tname, "127.0.0.1", port)
        a.send_local_metadata("127.0.0.1", port)
        remote = a.deserialize_descs_safe(notifs_from(a, tname)[0])
        assert len(remote) == 32
        while not a.check_remote_metadata(tname):
            time.sleep(0.001)
        # READ the first 16 rows, WRITE 16 rows of ours into the last 16.
        h = a.initialize_xfer("READ", a.get_xfer_descs([t[i, :] for i in range(16)]),
                              a.get_xfer_descs([remote[i] for i in range(16)], "DRAM"), tname)
        a.transfer(h)
        wait_done(a, h)
        want = torch.arange(16 * 512, dtype=torch.float32).reshape(16, 512)
        assert torch.equal(t[:16], want)
        t[16:] = -want
        w = a.initialize_xfer("WRITE", a.get_xfer_descs([t[16 + i, :] for i in range(16)]),
                              a.get_xfer_descs([remote[16 + i] for i in range(16)], "DRAM"),
                              tname, b"written")
        a.transfer(w)
        wait_done(a, w)
        assert notifs_from(a, tname) == [b"verified:1"]
        a.release_xfer_handle(h)
        a.release_xfer_handle(w)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


@CUDA
def test_cuda_tensor_descriptors(name):
    a = nixl_agent(name())
    dev = torch.cuda.device_count() - 1
    t = torch.ones((4, 1024), dtype=torch.float16, device=f"cuda:{dev}")
    r = a.get_reg_descs(t)
    assert r.getType() == nixl._bindings.VRAM_SEG and r[0] == (t.data_ptr(), 8192, dev, "")
    x = a.get_xfer_descs([t[i, :] for i in range(4)])
    assert x.getType() == nixl._bindings.VRAM_SEG and x[3] == (t.data_ptr() + 3 * 2048, 2048, dev)
    # One list, one device: a CPU tensor among CUDA ones is refused (None, logged).
    assert a.get_xfer_descs([t[0, :], torch.zeros(1024, dtype=torch.float16)]) is None


@CUDA
@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_cuda_tensor_with_host_tensor_between_two_agents(pair, op):
    a, b = pair
    gpu = torch.arange(1 << 16, dtype=torch.int32, device="cuda:0")
    host = torch.zeros(1 << 16, dtype=torch.int32)
    if op == "READ":
        gpu, host = torch.zeros_like(gpu), torch.arange(1 << 16, dtype=torch.int32)
    want = (gpu if op == "WRITE" else host).cpu().clone()
    torch.cuda.synchronize()
    ra, rb = a.register_memory(gpu), b.register_memory(host)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer(op, a.get_xfer_descs(gpu), b.get_xfer_descs(host), b.name, b"gpu")
    a.transfer(h)
    wait_done(a, h)
    assert notifs_from(b, a.name) == [b"gpu"]
    assert torch.equal(gpu.cpu(), want) and torch.equal(host, want)
    a.release_xfer_handle(h)
    a.deregister_memory(ra)
    b.deregister_memory(rb)
