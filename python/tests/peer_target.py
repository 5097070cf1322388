# SPDX-License-Identifier: Apache-2.0
"""The target side of test_two_processes.py, run as its own process (not collected by pytest).

Usage: peer_target.py NAME INITIATOR PORT_FILE SIZE
Listens (port 0), writes its port to PORT_FILE, waits for INITIATOR's metadata, sends it the
descriptors of its buffer (first half: a known pattern; second half: zeros), waits for the
notification b"written", checks the second half, answers b"verified:<ok>", then waits to be
killed.
"""

import sys

import numpy as np

from nixl._api import nixl_agent, nixl_agent_config
from target_side import serve

name, initiator, port_file, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
agent = nixl_agent(name, nixl_agent_config(True, True, 0))
buf = np.zeros(size, dtype=np.uint8)
half = size // 2
buf[:half] = (np.arange(half) * 7 + 3).astype(np.uint8)
agent.register_memory(buf)
want = (np.arange(half) * 13 + 5).astype(np.uint8)
descs = agent.get_xfer_descs(buf)
serve(agent, initiator, port_file, descs, lambda: np.array_equal(buf[half:], want))
