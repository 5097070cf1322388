# SPDX-License-Identifier: Apache-2.0
"""NIXL's Python API on nixl-rs, two agents in one process: every call, every byte checked."""

import gc
import os
import pickle
import time

import numpy as np
import pytest
from conftest import wait_done

import nixl
from nixl import _utils
from nixl._api import nixl_agent, nixl_agent_config
from nixl._bindings import (
    nixlCancelledError,
    nixlInvalidParamError,
    nixlMismatchError,
    nixlNoTelemetryError,
    nixlNotAllowedError,
    nixlNotFoundError,
    nixlNotSupportedError,
    nixlRegDList,
    nixlXferDList,
)
from nixl.logging import get_logger


def wait_notif(agent, peer, timeout=10.0):
    end = time.monotonic() + timeout
    while True:
        n = agent.get_new_notifs()
        if peer in n:
            return n[peer]
        assert time.monotonic() < end, "no notification"
        time.sleep(0.001)


@pytest.fixture
def pair(name):
    a = nixl_agent(name("init"), nixl_agent_config(backends=["UCX"], capture_telemetry=True))
    b = nixl_agent(name("target"), nixl_agent_config(backends=["UCX"]))
    return a, b


def test_module_layout():
    assert nixl.nixl_agent is nixl_agent and nixl.nixl_agent_config is nixl_agent_config
    assert get_logger("_api").name == "nixl.api"
    from nixl._api import nixlRemoteDisconnectError  # noqa: F401  (importable from both)
    from nixl._bindings import nixlBackendError, nixlTimeoutError

    assert issubclass(nixlTimeoutError, nixlBackendError)
    assert nixl.__version__


def test_construction_and_backends(name):
    with pytest.raises(ValueError):
        nixl_agent("")
    a = nixl_agent(name(), nixl_agent_config(backends=[]))
    plugins = a.get_plugin_list()
    for p in ["UCX", "POSIX", "GDS", "GDS_MT", "OBJ", "tcp", "shm"]:
        assert p in plugins
    assert "DRAM_SEG" in a.get_plugin_mem_types("UCX")
    assert "num_threads" in a.get_plugin_params("POSIX")
    assert a.get_plugin_params("nope") == {}
    assert a.get_backend_params("UCX") == {}
    a.create_backend("POSIX", {"num_threads": "2"})
    assert a.get_backend_params("POSIX")["num_threads"] == "2"
    assert "FILE_SEG" in a.get_backend_mem_types("POSIX")
    with pytest.raises(nixlNotSupportedError, match="Mooncake"):
        a.create_backend("Mooncake")
    with pytest.raises(nixlNotSupportedError, match="UCCL"):
        a.create_backend("UCCL")
    with pytest.raises(nixlNotFoundError):
        a.create_backend("NOPE")
    # Mooncake in a config is skipped with a warning, as NIXL skips missing plugins.
    b = nixl_agent(name(), nixl_agent_config(backends=["UCX", "Mooncake"]))
    assert list(b.backends) == ["UCX"]


def test_descriptor_shapes(name):
    a = nixl_agent(name())
    buf = np.zeros(4096, dtype=np.uint8)
    addr = buf.ctypes.data
    x = a.get_xfer_descs([(addr, 16, 0), (addr + 16, 32, 0)], "DRAM")
    assert isinstance(x, nixlXferDList) and len(x) == 2 and x[1] == (addr + 16, 32, 0)
    assert x[-1] == x[1] and x.getType() == nixl._bindings.DRAM_SEG
    rows = np.array([[addr, 16, 0], [addr + 16, 32, 0]], dtype=np.uint64)
    assert a.get_xfer_descs(rows, "DRAM") == x
    assert a.get_xfer_descs(rows) is None  # NIXL: a mem type is required (logged)
    r = a.get_reg_descs([(addr, 4096, 0, "meta")], "DRAM")
    assert isinstance(r, nixlRegDList) and r[0] == (addr, 4096, 0, "meta")
    assert a.get_reg_descs(buf)[0] == (addr, 4096, 0, "")
    # Nx4 rows (addr, len, dev, meta) for registration, with a mem type; never for transfers.
    quad = np.array([[addr, 16, 0, "m0"], [addr + 16, 32, 0, b"m1"], [addr + 48, 8, 0, None]],
                    dtype=object)
    rq = a.get_reg_descs(quad, "DRAM")
    assert [rq[i] for i in range(3)] == [(addr, 16, 0, "m0"), (addr + 16, 32, 0, "m1"),
                                         (addr + 48, 8, 0, "")]
    assert a.get_xfer_descs(quad, "DRAM") is None
    assert a.get_reg_descs(np.array([[addr, 16, 0, 5.5]], dtype=object), "DRAM") is None
    assert a.get_reg_descs(np.array([["x", 16, 0, ""]], dtype=object), "DRAM") is None
    assert a.get_xfer_descs(r) is None and a.get_reg_descs(x) is None
    assert a.get_xfer_descs([buf[:8], buf[8:24]])[1] == (addr + 8, 16, 0)
    with pytest.raises(IndexError):
        x[2]
    with pytest.raises(nixlInvalidParamError):
        nixlXferDList(nixl._bindings.DRAM_SEG, [(1, 2)])
    with pytest.raises(nixlInvalidParamError):
        nixlXferDList(9, [])
    with pytest.raises(nixlInvalidParamError):
        nixlXferDList(0, b"\x00" * 23)


def test_serialized_descs(name):
    a = nixl_agent(name())
    x = a.get_xfer_descs([(1, 2, 3), (4, 5, 6)], "VRAM")
    r = a.get_reg_descs([(1, 2, 3, "path")], "FILE")
    for d in (x, r):
        assert a.deserialize_descs(a.get_serialized_descs(d)) == d
        assert pickle.loads(pickle.dumps(d)) == d
        safe = a.serialize_descs_safe(d)
        assert a.deserialize_descs_safe(safe) == d
        assert a.deserialize_descs(safe) == d
    # The safe decoder refuses pickles and garbage, and never runs them.
    for bad in [pickle.dumps(x), b"", b"NIXLRSD1", a.serialize_descs_safe(x)[:-1], os.urandom(64)]:
        with pytest.raises(nixlInvalidParamError):
            a.deserialize_descs_safe(bad)


def test_register_deregister(name):
    a = nixl_agent(name())
    buf = np.zeros(1 << 16, dtype=np.uint8)
    reg = a.register_memory(buf)
    # Registering the same memory twice overlaps: an error, and nothing lost.
    with pytest.raises(nixlInvalidParamError, match="overlaps"):
        a.register_memory(buf)
    a.deregister_memory(reg)
    with pytest.raises(nixlNotFoundError):
        a.deregister_memory(reg)
    reg = a.register_memory([(buf.ctypes.data, 1024, 0, "")], "DRAM", backends=["UCX"])
    a.deregister_memory(reg)
    reg = a.register_memory(np.array([[buf.ctypes.data, 4096, 0]], dtype=np.uint64), "DRAM")
    a.deregister_memory(reg)
    with pytest.raises(nixlInvalidParamError):
        a.register_memory([(1, 2, 3)], "DRAM")  # registration wants 4-tuples
    with pytest.raises(nixlNotFoundError):
        a.register_memory(buf, backends=["POSIX"])  # not created


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_two_agents_transfer_every_byte(pair, op):
    a, b = pair
    size = 1 << 20
    rng = np.random.default_rng(1)
    mine = rng.integers(0, 256, size, dtype=np.uint8)
    theirs = rng.integers(0, 256, size, dtype=np.uint8)
    want_mine, want_theirs = mine.copy(), theirs.copy()
    ra, rb = a.register_memory(mine), b.register_memory(theirs)
    assert a.add_remote_agent(b.get_agent_metadata()) == b.name
    assert b.add_remote_agent(a.get_agent_metadata()) == a.name
    assert a.check_remote_metadata(b.name)
    # 256 blocks of 4 KiB, the remote ones in reverse order.
    blk = 4096
    local = [(mine.ctypes.data + i * blk, blk, 0) for i in range(256)]
    remote = [(theirs.ctypes.data + (255 - i) * blk, blk, 0) for i in range(256)]
    h = a.initialize_xfer(op, a.get_xfer_descs(local, "DRAM"), a.get_xfer_descs(remote, "DRAM"),
                          b.name, b"tag-1")
    assert a.transfer(h) in ("DONE", "PROC")
    wait_done(a, h)
    assert wait_notif(b, a.name) == [b"tag-1"]
    for i in range(256):
        src = want_mine if op == "WRITE" else want_theirs
        dst = theirs if op == "WRITE" else mine
        s = src[i * blk:(i + 1) * blk] if op == "WRITE" else src[(255 - i) * blk:(256 - i) * blk]
        d = dst[(255 - i) * blk:(256 - i) * blk] if op == "WRITE" else dst[i * blk:(i + 1) * blk]
        assert np.array_equal(s, d), f"block {i}"
    # Posted again with a new notification message.
    assert a.transfer(h, b"tag-2") in ("DONE", "PROC")
    wait_done(a, h)
    assert b.check_remote_xfer_done(a.name, b"tag") or wait_notif(b, a.name) == [b"tag-2"]
    t = a.get_xfer_telemetry(h)
    assert t.totalBytes == size and t.descCount == 256 and t.startTime > 0
    assert a.query_xfer_backend(h) == "UCX" and a.query_xfer_backend_rs(h) in ("local", "shm", "tcp")
    with pytest.raises(nixlNoTelemetryError):
        b_h = b.initialize_xfer("READ", b.get_xfer_descs(theirs[:16]), b.get_xfer_descs(mine[:16]), a.name)
        b.transfer(b_h)
        b.get_xfer_telemetry(b_h)
    a.release_xfer_handle(h)
    a.deregister_memory(ra)
    b.deregister_memory(rb)


def test_prepped_lists_with_numpy_indices(pair):
    a, b = pair
    n, blk = 4096, 64
    src = np.random.default_rng(2).integers(0, 256, n * blk, dtype=np.uint8)
    dst = np.zeros(n * blk, dtype=np.uint8)
    a.register_memory(src)
    rb = b.register_memory(dst)
    # Partial metadata: only the region of dst, sent as bytes.
    a.add_remote_agent(b.get_partial_agent_metadata(rb, True))
    assert a.check_remote_metadata(b.name, [(dst.ctypes.data, blk, 0)]) is False or True
    assert a.check_remote_metadata(b.name, a.get_xfer_descs([(dst.ctypes.data, blk, 0)], "DRAM"))
    assert not a.check_remote_metadata(b.name, a.get_xfer_descs([(src.ctypes.data, blk, 0)], "DRAM"))
    rows_l = np.stack([src.ctypes.data + np.arange(n, dtype=np.uint64) * blk,
                       np.full(n, blk, np.uint64), np.zeros(n, np.uint64)], axis=1)
    rows_r = np.stack([dst.ctypes.data + np.arange(n, dtype=np.uint64) * blk,
                       np.full(n, blk, np.uint64), np.zeros(n, np.uint64)], axis=1)
    lh = a.prep_xfer_dlist("NIXL_INIT_AGENT", rows_l, "DRAM")
    rh = a.prep_xfer_dlist(b.name, rows_r, "DRAM")
    perm = np.random.default_rng(3).permutation(n).astype(np.int32)
    h = a.make_prepped_xfer("WRITE", lh, np.arange(n, dtype=np.int32), rh, perm, b"prepped")
    a.transfer(h)
    wait_done(a, h)
    for i in range(0, n, 97):
        assert np.array_equal(src[i * blk:(i + 1) * blk], dst[perm[i] * blk:(perm[i] + 1) * blk])
    assert wait_notif(b, a.name) == [b"prepped"]
    # A new message makes the request again from its indices (read where Python keeps them).
    dst[:] = 0
    a.transfer(h, b"again")
    wait_done(a, h)
    for i in range(0, n, 89):
        assert np.array_equal(src[i * blk:(i + 1) * blk], dst[perm[i] * blk:(perm[i] + 1) * blk])
    assert wait_notif(b, a.name) == [b"again"]
    # Bad int32 arrays: a negative or too large index is an error naming it.
    good = np.array([0, 1], np.int32)
    for bad, why in ((np.array([0, -1], np.int32), "negative"),
                     (np.array([n, 0], np.int32), "out of range")):
        with pytest.raises(nixlInvalidParamError, match=why):
            a.make_prepped_xfer("WRITE", lh, bad, rh, good)
        with pytest.raises(nixlInvalidParamError, match=why):
            a.make_prepped_xfer("WRITE", lh, good, rh, bad)
    # Lists of ints work too; a bad index is an error naming it.
    h2 = a.make_prepped_xfer("WRITE", lh, [0, 1], rh, [1, 0])
    with pytest.raises(nixlInvalidParamError, match="out of range"):
        a.make_prepped_xfer("WRITE", lh, [n], rh, [0])
    with pytest.raises(nixlInvalidParamError):
        a.make_prepped_xfer("WRITE", lh, [-1], rh, [0])
    # Strided (Nx5) lists expand to their blocks.
    sh = a.prep_xfer_dlist("", np.array([[src.ctypes.data, blk, 0, blk, 4]], dtype=np.uint64), "DRAM")
    h3 = a.make_prepped_xfer("WRITE", sh, [3], rh, [0])
    a.transfer(h3)
    wait_done(a, h3)
    assert np.array_equal(dst[:blk], src[3 * blk:4 * blk])
    for x in (h, h2, h3):
        a.release_xfer_handle(x)
    a.release_dlist_handle(lh)
    with pytest.raises(nixlInvalidParamError, match="released"):
        a.make_prepped_xfer("WRITE", lh, [0], rh, [0])


def test_error_classes(pair):
    a, b = pair
    buf = np.zeros(8192, dtype=np.uint8)
    other = np.zeros(8192, dtype=np.uint8)
    a.register_memory(buf)
    b.register_memory(other)
    x = a.get_xfer_descs(buf[:4096])
    with pytest.raises(nixlNotFoundError, match="unknown peer"):
        a.initialize_xfer("READ", x, x, "nobody")
    a.add_remote_agent(b.get_agent_metadata())
    with pytest.raises(nixlMismatchError):
        a.initialize_xfer("READ", x, a.get_xfer_descs(other[:100]), b.name)
    with pytest.raises(nixlNotFoundError, match="not inside a region"):
        a.initialize_xfer("READ", x, x, b.name)  # our buffer is not b's
    with pytest.raises(nixlInvalidParamError):
        a.initialize_xfer("COPY", x, x, b.name)
    with pytest.raises(nixlInvalidParamError):
        a.add_remote_agent(b"garbage")
    h = a.initialize_xfer("READ", x, a.get_xfer_descs(other[:4096]), b.name)
    a.transfer(h)
    wait_done(a, h)
    h.release()
    with pytest.raises(nixlInvalidParamError, match="released"):
        a.transfer(h)
    a.remove_remote_agent(b.name)
    assert not a.check_remote_metadata(b.name)
    with pytest.raises(nixlNotFoundError):
        a.initialize_xfer("READ", x, a.get_xfer_descs(other[:4096]), b.name)
    with pytest.raises(nixlInvalidParamError, match="released"):
        a.estimate_xfer_cost(h)


def test_invalidate_local_metadata_removes_us_at_the_peer(name):
    """Over the listen threads: after ``invalidate_local_metadata`` the peer no longer lists us
    and its transfers to us raise nixlNotFoundError; a listener that takes no pushes refuses."""
    a = nixl_agent(name(), nixl_agent_config(True, True, 0))
    b = nixl_agent(name(), nixl_agent_config(True, True, 0))
    mine, theirs = np.zeros(4096, dtype=np.uint8), np.full(4096, 9, dtype=np.uint8)
    a.register_memory(mine)
    b.register_memory(theirs)
    port = b.get_listen_port()
    a.send_local_metadata("127.0.0.1", port)
    assert b.check_remote_metadata(a.name)
    h = b.initialize_xfer("WRITE", b.get_xfer_descs(theirs), b.get_xfer_descs(mine), a.name)
    b.transfer(h)
    wait_done(b, h)
    assert (mine == 9).all()

    a.invalidate_local_metadata("127.0.0.1", port)
    assert not b.check_remote_metadata(a.name)
    with pytest.raises(nixlNotFoundError):
        b.initialize_xfer("WRITE", b.get_xfer_descs(theirs), b.get_xfer_descs(mine), a.name)
    a.invalidate_local_metadata("127.0.0.1", port)  # nothing left there: not an error
    with pytest.raises(nixlNotSupportedError):
        a.invalidate_local_metadata()  # no central metadata server
    h.release()

    closed = nixl_agent(name(), nixl_agent_config(True, True, 0,
                                                  rs_config="[tcp]\naccept_pushes = false\n"))
    closed.add_remote_agent(a.get_agent_metadata())
    with pytest.raises(nixlNotAllowedError, match="accept_pushes"):
        a.invalidate_local_metadata("127.0.0.1", closed.get_listen_port())
    assert closed.check_remote_metadata(a.name)

    # A peer that is gone holds nothing of us: quiet, as NIXL's (asynchronous) call is.
    del b
    gc.collect()
    a.invalidate_local_metadata("127.0.0.1", port)


def test_abort_and_handles_dropped_in_any_order(name):
    a = nixl_agent(name())
    b = nixl_agent(name())
    size = 64 << 20
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    a.register_memory(src)
    b.register_memory(dst)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", a.get_xfer_descs(src), a.get_xfer_descs(dst), b.name,
                          backends=["tcp"])
    assert a.query_xfer_backend_rs(h) == "tcp"
    a.transfer(h)
    a.abort_xfer(h)
    try:
        state = a.check_xfer_state(h)
        assert state == "DONE"  # it may have finished before the abort
    except nixlCancelledError:
        pass
    # The agent goes first: the handle keeps what it needs alive, and releases cleanly.
    del a
    gc.collect()
    h.release()
    del h, b
    gc.collect()


def test_notifications_alone(pair):
    a, b = pair
    a.add_remote_agent(b.get_agent_metadata())
    b.add_remote_agent(a.get_agent_metadata())
    for i in range(10):
        a.send_notif(b.name, f"msg-{i}")
    got = []
    end = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < end:
        got += b.update_notifs().get(a.name, [])[len(got):]
    assert b.notifs[a.name] == [f"msg-{i}".encode() for i in range(10)]
    assert b.check_remote_xfer_done(a.name, b"msg-3")
    assert not b.check_remote_xfer_done(a.name, b"msg-3")
    assert b.check_remote_xfer_done(a.name, b"g-7", tag_is_prefix=False)
    with pytest.raises(nixlNotFoundError):
        a.send_notif("nobody", b"x")


def test_query_memory_and_utils(name, tmp_path):
    a = nixl_agent(name(), nixl_agent_config(False, False, 0, backends=[]))
    a.create_backend("POSIX", a.get_plugin_params("POSIX"))
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 123)
    res = a.query_memory([(0, 0, 0, str(f)), (0, 0, 0, str(tmp_path / "missing"))], "POSIX", "FILE")
    assert res[0]["size"] == "123" and res[1] is None
    with pytest.raises(ValueError):
        a.query_memory([(0, 0, 0, str(f))], "OBJ", "FILE")
    p = _utils.malloc_passthru(64)
    q = _utils.malloc_passthru(64)
    _utils.ba_buf(p, 64)
    _utils.ba_buf(q, 64)
    _utils.verify_transfer(p, q, 64)
    import ctypes

    ctypes.memset(q + 10, 0, 1)
    with pytest.raises(nixlMismatchError, match="byte 10"):
        _utils.verify_transfer(p, q, 64)
    _utils.free_passthru(p)
    _utils.free_passthru(q)


def test_file_transfer_through_posix(name, tmp_path):
    a = nixl_agent(name(), nixl_agent_config(backends=["UCX", "POSIX"]))
    path = tmp_path / "data.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        src = np.random.default_rng(4).integers(0, 256, 1 << 16, dtype=np.uint8)
        back = np.zeros_like(src)
        a.register_memory(src)
        a.register_memory(back)
        a.register_memory([(0, src.nbytes, fd, str(path))], "FILE")
        f = a.get_xfer_descs([(0, src.nbytes, fd)], "FILE")
        h = a.initialize_xfer("WRITE", a.get_xfer_descs(src), f, a.name)
        a.transfer(h)
        wait_done(a, h)
        h2 = a.initialize_xfer("READ", a.get_xfer_descs(back), f, a.name)
        a.transfer(h2)
        wait_done(a, h2)
        assert np.array_equal(src, back)
        assert a.query_xfer_backend(h) == "POSIX"
    finally:
        os.close(fd)


def test_estimate_xfer_cost(pair):
    """NIXL's shape (duration µs, margin µs, "ANALYTICAL_BACKEND"): from the backend's nominal
    figures before anything ran, then from the request's own measured posts, then for a new
    request from the fit over its backend's posts of several sizes."""
    a, b = pair
    src = np.ones(4 << 20, dtype=np.uint8)
    dst = np.zeros(4 << 20, dtype=np.uint8)
    a.register_memory(src)
    b.register_memory(dst)
    a.add_remote_agent(b.get_agent_metadata())

    def req(n):
        return a.initialize_xfer("WRITE", a.get_xfer_descs(src[:n]), a.get_xfer_descs(dst[:n]), b.name)

    h = req(1 << 20)
    d, m, method = a.estimate_xfer_cost(h)
    assert method == "ANALYTICAL_BACKEND" and isinstance(d, int) and isinstance(m, int)
    d2, m2, how = a.estimate_xfer_cost_detail(h)
    assert how == "CONFIGURED" and d2 == d > 0 and m2 == d  # nominal: a margin of 100 %
    a.transfer(h)
    wait_done(a, h)
    # One post measured: the estimate is that post's duration (as telemetry saw it).
    d, m, how = a.estimate_xfer_cost_detail(h)
    assert how == "MEASURED_REQUEST" and d == a.get_xfer_telemetry(h).xferDuration and m >= 1
    for n in (4096, 64 << 10, 4 << 20):
        g = req(n)
        for _ in range(3):
            a.transfer(g)
            wait_done(a, g)
    fresh = req(2 << 20)
    d, m, how = a.estimate_xfer_cost_detail(fresh)
    assert how == "MEASURED_BACKEND" and d >= 1 and m >= max(1, d // 10), (d, m)
    assert np.array_equal(src, dst)
