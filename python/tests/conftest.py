# SPDX-License-Identifier: Apache-2.0
import itertools
import os

import pytest

_names = itertools.count()


@pytest.fixture
def name():
    """A fresh agent name per use (agents of one process must not collide)."""
    return lambda base="agent": f"{base}-{os.getpid()}-{next(_names)}"
