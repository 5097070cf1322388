# SPDX-License-Identifier: Apache-2.0
"""The target side of test_torch.py's two-process test, run as its own process (not collected).

Usage: torch_peer.py NAME INITIATOR PORT_FILE
Registers a 32x512 float32 tensor (rows 0..15: 0, 1, 2, ...; rows 16..31: zeros), listens (port
0), writes its port to PORT_FILE, sends INITIATOR its rows' descriptors (safe format) once its
metadata is here, waits for the notification b"written", checks that rows 16..31 hold the
negated first half, answers b"verified:<ok>", then waits to be killed.
"""

import sys

import torch

from nixl._api import nixl_agent, nixl_agent_config
from target_side import serve

name, initiator, port_file = sys.argv[1], sys.argv[2], sys.argv[3]
agent = nixl_agent(name, nixl_agent_config(True, True, 0))
t = torch.zeros((32, 512), dtype=torch.float32)
t[:16] = torch.arange(16 * 512, dtype=torch.float32).reshape(16, 512)
agent.register_memory(t)
rows = agent.get_xfer_descs([t[i, :] for i in range(32)])
serve(agent, initiator, port_file, rows, lambda: torch.equal(t[16:], -t[:16]))
