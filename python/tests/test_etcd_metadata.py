# SPDX-License-Identifier: Apache-2.0
"""The central metadata store: ``send_local_metadata()``, ``fetch_remote_metadata(name)`` and
``invalidate_local_metadata()`` with no address go through a real etcd server (started here)
when ``NIXL_ETCD_ENDPOINTS`` is set, as with NIXL; without it, or with etcd out of reach, they
raise a clear error. Skips (visibly) where no etcd binary is installed, unless
``NIXL_REQUIRE_ETCD=1``."""

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import wait_done

from nixl._api import nixl_agent, nixl_agent_config
from nixl._bindings import nixlBackendError, nixlNotSupportedError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def etcd(tmp_path):
    binary = os.environ.get("NIXL_ETCD_BIN") or shutil.which("etcd")
    if not binary:
        why = "etcd not installed (Debian package etcd-server; or set NIXL_ETCD_BIN)"
        if os.environ.get("NIXL_REQUIRE_ETCD") == "1":
            pytest.fail(f"NIXL_REQUIRE_ETCD=1 but {why}")
        pytest.skip(why)
    client, peer = free_port(), free_port()
    url, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(tmp_path / "etcd.log", "wb")
    p = subprocess.Popen(
        [binary, "--name", "t", "--data-dir", str(tmp_path / "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
         "--initial-cluster", f"t={purl}"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    end = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if b"true" in r.read():
                    break
        except OSError:
            pass
        assert p.poll() is None, (tmp_path / "etcd.log").read_text()
        assert time.monotonic() < end, "etcd did not come up in 20 s"
        time.sleep(0.05)
    try:
        yield url
    finally:
        p.kill()
        p.wait()
        log.close()


def wait_loaded(agent, peer, timeout=10.0):
    end = time.monotonic() + timeout
    while not agent.check_remote_metadata(peer):
        assert time.monotonic() < end, f"{peer} was not loaded from etcd"
        time.sleep(0.01)


def test_without_a_metadata_server_the_error_says_what_to_do(name, monkeypatch):
    monkeypatch.delenv("NIXL_ETCD_ENDPOINTS", raising=False)
    a = nixl_agent(name(), nixl_agent_config(backends=["UCX"]))
    for call in (a.send_local_metadata, lambda: a.fetch_remote_metadata("x"),
                 a.invalidate_local_metadata):
        with pytest.raises(nixlNotSupportedError, match="NIXL_ETCD_ENDPOINTS"):
            call()


def test_etcd_out_of_reach_is_a_backend_error_in_bounded_time(name, monkeypatch):
    monkeypatch.setenv("NIXL_ETCD_ENDPOINTS", f"127.0.0.1:{free_port()}")
    a = nixl_agent(name(), nixl_agent_config(backends=["UCX"]))
    t = time.monotonic()
    with pytest.raises(nixlBackendError, match="etcd"):
        a.send_local_metadata()
    assert time.monotonic() - t < 30


def test_metadata_through_etcd(etcd, name, monkeypatch):
    monkeypatch.setenv("NIXL_ETCD_ENDPOINTS", etcd)
    monkeypatch.setenv("NIXL_ETCD_NAMESPACE", f"/nixl-test-{os.getpid()}")
    a = nixl_agent(name("init"), nixl_agent_config(backends=["UCX"]))
    b = nixl_agent(name("target"), nixl_agent_config(backends=["UCX"]))
    src = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    a.register_memory(src)
    b.register_memory(dst)

    # Published, fetched by name, used: every byte checked, the notification after the data.
    b.send_local_metadata()
    a.send_local_metadata()
    a.fetch_remote_metadata(b.name)
    wait_loaded(a, b.name)
    b.fetch_remote_metadata(a.name)
    wait_loaded(b, a.name)
    h = a.initialize_xfer("WRITE", a.get_xfer_descs(src), a.get_xfer_descs(dst), b.name, b"etcd")
    a.transfer(h)
    wait_done(a, h)
    end = time.monotonic() + 10
    while not b.check_remote_xfer_done(a.name, b"etcd"):
        assert time.monotonic() < end, "no notification"
        time.sleep(0.001)
    assert np.array_equal(src, dst)

    # Fetched before it is published: loaded when it appears.
    c = nixl_agent(name("late"), nixl_agent_config(backends=["UCX"]))
    a.fetch_remote_metadata(c.name)
    assert not a.check_remote_metadata(c.name)
    c.send_local_metadata()
    wait_loaded(a, c.name)

    # Invalidated: the key is gone (a fresh look finds nothing), published again: back.
    assert a.agent.etcd_fetch(b.name, 0) is True
    b.invalidate_local_metadata()
    assert a.agent.etcd_fetch(b.name, 0) is False
    b.invalidate_local_metadata()  # not published: no error
    b.send_local_metadata()
    assert a.agent.etcd_fetch(b.name, 0) is True

    # Partial metadata is not kept in etcd: a clear error.
    with pytest.raises(nixlNotSupportedError, match="whole metadata"):
        b.send_partial_agent_metadata(None)
