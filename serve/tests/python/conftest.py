"""Deployments of `nixl-serve up` for the tests: each a real process tree on this host, found
through `NIXL_SERVE_BIN` (set by serve/tests/pytest.rs to the binary cargo built)."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest


class Deployment:
    def __init__(self, *args):
        self.args = list(args)
        self.proc = subprocess.Popen(
            [os.environ["NIXL_SERVE_BIN"], "up", "--listen", "127.0.0.1:0", "--json", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"nixl-serve up {args} printed nothing (exit {self.proc.wait(5)})")
        self.info = json.loads(line)
        self.url = self.info["url"]
        self.base_url = self.url + "/v1"

    def workers(self, role=None):
        return [p for p in self.info["processes"]
                if p["role"] != "frontend" and (role is None or p["role"] == role)]

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # No orphans: every child is gone.
        for p in self.info["processes"]:
            assert not alive(p["pid"]), f"{p['role']} {p['pid']} outlived nixl-serve up"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(url, name):
    """The value of an unlabelled sample `name` in a worker's /metrics."""
    for line in get(url + "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def labelled(url, name, label):
    for line in get(url + "/metrics").splitlines():
        if line.startswith(f"{name}{{{label}}} "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.fixture(scope="session")
def deployments():
    made = {}

    def make(*args):
        if args not in made:
            made[args] = Deployment(*args)
        return made[args]

    yield make
    for d in made.values():
        d.close()
