# SPDX-License-Identifier: Apache-2.0
"""Helpers NIXL's examples use: raw host buffers and byte checks.

These trust their caller as NIXL's do: an address must come from ``malloc_passthru`` (and be
freed once), and a size must not exceed the buffer.
"""

from ._bindings import ba_buf, free_passthru, malloc_passthru, verify_transfer

__all__ = ["ba_buf", "free_passthru", "malloc_passthru", "verify_transfer"]
