# SPDX-License-Identifier: Apache-2.0
"""``nixl``: NIXL's Python API on top of nixl-rs.

    from nixl._api import nixl_agent, nixl_agent_config

See ``nixl._api`` for the API and the README's "Python package" section for installing it.
"""

from ._api import (
    DEFAULT_COMM_PORT,
    nixl_agent,
    nixl_agent_config,
    nixl_backend_handle,
    nixl_prepped_dlist_handle,
    nixl_thread_sync_t,
    nixl_xfer_handle,
)
from ._bindings import __version__

__all__ = [
    "DEFAULT_COMM_PORT",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
    "__version__",
]
