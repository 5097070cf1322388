# SPDX-License-Identifier: Apache-2.0
"""Two processes over the listen thread: metadata fetched and sent on the tcp listener, READ
and WRITE with notifications (every byte checked), then the peer is killed and the next post
raises nixlRemoteDisconnectError in bounded time."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import wait_done

from nixl._api import nixl_agent, nixl_agent_config
from nixl._bindings import nixlBackendError, nixlNotAllowedError, nixlNotFoundError, nixlRemoteDisconnectError

HERE = os.path.dirname(os.path.abspath(__file__))


def notif_from(agent, peer, timeout=20.0):
    end = time.monotonic() + timeout
    while True:
        msgs = agent.update_notifs().get(peer)
        if msgs:
            return msgs.pop(0)
        assert time.monotonic() < end, f"no notification from {peer}"
        time.sleep(0.002)


def start_target(tmp_path, name, env=None):
    tname, iname = name("target"), name("init")
    port_file = tmp_path / "port"
    size = 8 << 20
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "peer_target.py"), tname, iname, str(port_file), str(size)],
        env=env,
    )
    end = time.monotonic() + 30
    while not port_file.exists():
        assert p.poll() is None, "target exited early"
        assert time.monotonic() < end, "target did not start"
        time.sleep(0.01)
    return tname, iname, int(port_file.read_text()), size, p


@pytest.fixture
def target(tmp_path, name):
    t = start_target(tmp_path, name)
    yield t
    if t[4].poll() is None:
        t[4].kill()
    t[4].wait(timeout=10)


def test_listener_with_a_secret_refuses_a_wrong_one(tmp_path, name):
    env = dict(os.environ, NIXL_SECRET="the right secret")
    tname, iname, port, size, proc = start_target(tmp_path, name, env)
    try:
        wrong = nixl_agent(iname, nixl_agent_config(True, True, 0, secret="a wrong secret"))
        start = time.monotonic()
        with pytest.raises(nixlNotAllowedError, match="secret"):
            wrong.fetch_remote_metadata(tname, "127.0.0.1", port)
        assert time.monotonic() - start < 5, "a refusal is final: no retries until the deadline"
        assert not wrong.check_remote_metadata(tname)
        del wrong
        right = nixl_agent(iname, nixl_agent_config(True, True, 0, secret="the right secret"))
        right.fetch_remote_metadata(tname, "127.0.0.1", port)
        assert right.check_remote_metadata(tname)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("backend", [None, "tcp"])
def test_two_processes_read_write_then_dead_peer(target, backend):
    tname, iname, port, size, proc = target
    agent = nixl_agent(iname, nixl_agent_config(True, True, 0))
    half = size // 2
    local = np.zeros(size, dtype=np.uint8)
    local[half:] = (np.arange(half) * 13 + 5).astype(np.uint8)
    agent.register_memory(local)

    # A name that does not match the listener's agent is refused (and nothing stays loaded).
    with pytest.raises(nixlNotFoundError, match="is '"):
        agent.fetch_remote_metadata("someone-else", "127.0.0.1", port)
    agent.fetch_remote_metadata(tname, "127.0.0.1", port)
    assert agent.check_remote_metadata(tname)
    agent.send_local_metadata("127.0.0.1", port)

    remote = agent.deserialize_descs_safe(notif_from(agent, tname))
    (raddr, rlen, rdev) = remote[0]
    assert rlen == size
    backends = [backend] if backend else []

    # READ the first half and check every byte.
    r = agent.initialize_xfer("READ", agent.get_xfer_descs([(local.ctypes.data, half, 0)], "DRAM"),
                              agent.get_xfer_descs([(raddr, half, rdev)], "DRAM"), tname,
                              backends=backends)
    if backend:
        assert agent.query_xfer_backend_rs(r) == backend
    agent.transfer(r)
    wait_done(agent, r)
    assert np.array_equal(local[:half], (np.arange(half) * 7 + 3).astype(np.uint8))

    # WRITE the second half with a notification; the target checks it and answers.
    w = agent.initialize_xfer("WRITE",
                              agent.get_xfer_descs([(local.ctypes.data + half, half, 0)], "DRAM"),
                              agent.get_xfer_descs([(raddr + half, half, rdev)], "DRAM"), tname,
                              b"written", backends=backends)
    agent.transfer(w)
    wait_done(agent, w)
    assert notif_from(agent, tname) == b"verified:1"

    # The peer dies: the next post fails with nixlRemoteDisconnectError, in bounded time.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    start = time.monotonic()
    with pytest.raises(nixlRemoteDisconnectError):
        agent.transfer(r)
        while agent.check_xfer_state(r) != "DONE":
            assert time.monotonic() - start < 15, "no error 15 s after the peer died"
            time.sleep(0.001)
    assert time.monotonic() - start < 15
    agent.release_xfer_handle(r)
    agent.release_xfer_handle(w)


def test_listen_port_in_use_is_an_error(name):
    import socket

    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    try:
        with pytest.raises(nixlBackendError, match="listen thread"):
            nixl_agent(name(), nixl_agent_config(True, True, s.getsockname()[1])).get_agent_metadata()
    finally:
        s.close()
