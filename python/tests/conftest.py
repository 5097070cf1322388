# SPDX-License-Identifier: Apache-2.0
import itertools
import os
import time

import pytest

_names = itertools.count()


@pytest.fixture
def name():
    """A fresh agent name per use (agents of one process must not collide)."""
    return lambda base="agent": f"{base}-{os.getpid()}-{next(_names)}"


def wait_done(agent, h, timeout=10.0):
    """Polls ``check_xfer_state`` until DONE (its exceptions propagate)."""
    end = time.monotonic() + timeout
    while agent.check_xfer_state(h) != "DONE":
        assert time.monotonic() < end, "transfer did not finish"
