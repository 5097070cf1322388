# SPDX-License-Identifier: Apache-2.0
"""Runs the example scripts of ``python/examples`` (written against NIXL's Python API only, so
that they cover the paths NIXL's own examples take: basic and expanded two peers, partial
metadata, storage queries) as their own processes: the two peers in two processes over the
listen thread, the others in one process each. Each must exit 0 and print ``PASS``; their
output is shown when one fails.

The torch variant skips (visibly) where torch is not installed, unless ``NIXL_REQUIRE_TORCH=1``
or ``NIXL_REQUIRE_ALL=1``."""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TIMEOUT_S = 120


def script(name):
    return [sys.executable, os.path.join(EXAMPLES, name)]


def finish(proc, what):
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not end within {TIMEOUT_S} s; its output:\n{out}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}; its output:\n{out}"
    assert "PASS" in out, f"{what} did not print PASS; its output:\n{out}"
    return out


def spawn(args, cwd):
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torch_or_skip():
    if importlib.util.find_spec("torch") is None:
        why = "torch is not installed (python3 -m pip install torch; .ci/setup installs it)"
        if "1" in (os.environ.get("NIXL_REQUIRE_TORCH"), os.environ.get("NIXL_REQUIRE_ALL")):
            pytest.fail(f"NIXL_REQUIRE_TORCH=1 (or NIXL_REQUIRE_ALL=1) but {why}", pytrace=False)
        pytest.skip(why)


@pytest.mark.parametrize("memory", ["numpy", "torch"])
def test_two_peers_example_in_two_processes(tmp_path, memory):
    extra = []
    if memory == "torch":
        torch_or_skip()
        extra = ["--torch"]
    port_file = tmp_path / "port"
    target = spawn(script("two_peers.py") + ["--mode", "target", "--port", "0", "--port-out", str(port_file)]
                   + extra, tmp_path)
    try:
        end = time.monotonic() + 30
        while not port_file.exists():
            if target.poll() is not None:
                finish(target, "the target")
            assert time.monotonic() < end, "the target did not start listening"
            time.sleep(0.01)
        port = port_file.read_text()
        init = spawn(script("two_peers.py") + ["--mode", "initiator", "--ip", "127.0.0.1", "--port", port]
                     + extra, tmp_path)
        try:
            finish(init, "the initiator")
        finally:
            if init.poll() is None:
                init.kill()
        finish(target, "the target")
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_partial_metadata_example(tmp_path):
    finish(spawn(script("partial_metadata.py"), tmp_path), "partial_metadata.py")


def test_query_memory_example(tmp_path):
    out = finish(spawn(script("query_memory.py") + ["--dir", str(tmp_path)], tmp_path), "query_memory.py")
    assert "size 70000" in out, out
