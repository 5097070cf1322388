# SPDX-License-Identifier: Apache-2.0
"""What the target processes of the two-process tests share (peer_target.py, torch_peer.py);
not collected by pytest."""

import os
import time


def serve(agent, initiator, port_file, descs, verify):
    """Writes the agent's listen port to `port_file` (renamed into place, so the reader never
    sees half of it), sends `initiator` the descriptors `descs` (safe format) once its metadata
    is here, waits for the notification b"written", answers b"verified:<verify()>", then waits
    to be killed."""
    with open(port_file + ".tmp", "w") as f:
        f.write(str(agent.get_listen_port()))
    os.rename(port_file + ".tmp", port_file)

    deadline = time.monotonic() + 30
    while not agent.check_remote_metadata(initiator):
        assert time.monotonic() < deadline, "initiator's metadata never came"
        time.sleep(0.005)
    agent.send_notif(initiator, agent.serialize_descs_safe(descs))
    while not agent.check_remote_xfer_done(initiator, b"written"):
        assert time.monotonic() < deadline, "no write came"
        time.sleep(0.001)
    agent.send_notif(initiator, b"verified:%d" % bool(verify()))
    while True:
        time.sleep(1)
