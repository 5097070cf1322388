# SPDX-License-Identifier: Apache-2.0
"""The target side of test_two_processes.py, run as its own process (not collected by pytest).

Usage: peer_target.py NAME INITIATOR PORT_FILE SIZE
Listens (port 0), writes its port to PORT_FILE, waits for INITIATOR's metadata, sends it the
descriptors of its buffer (first half: a known pattern; second half: zeros), waits for the
notification b"written", checks the second half, answers b"verified:<ok>", then waits to be
killed.
"""

import sys
import time

import numpy as np

from nixl._api import nixl_agent, nixl_agent_config

name, initiator, port_file, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
agent = nixl_agent(name, nixl_agent_config(True, True, 0))
buf = np.zeros(size, dtype=np.uint8)
half = size // 2
buf[:half] = (np.arange(half) * 7 + 3).astype(np.uint8)
agent.register_memory(buf)
with open(port_file + ".tmp", "w") as f:
    f.write(str(agent.get_listen_port()))
import os  # noqa: E402

os.rename(port_file + ".tmp", port_file)

deadline = time.monotonic() + 30
while not agent.check_remote_metadata(initiator):
    assert time.monotonic() < deadline, "initiator's metadata never came"
    time.sleep(0.005)
agent.send_notif(initiator, agent.serialize_descs_safe(agent.get_xfer_descs(buf)))
while not agent.check_remote_xfer_done(initiator, b"written"):
    assert time.monotonic() < deadline, "no write came"
    time.sleep(0.001)
want = (np.arange(half) * 13 + 5).astype(np.uint8)
ok = bool(np.array_equal(buf[half:], want))
agent.send_notif(initiator, b"verified:%d" % ok)
while True:
    time.sleep(1)
