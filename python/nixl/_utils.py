# SPDX-License-Identifier: Apache-2.0
"""Helpers NIXL's examples use: raw host buffers and byte checks (through ctypes).

They trust their caller as NIXL's do: an address must come from ``malloc_passthru`` (and be
freed once), and a size must not exceed the buffer.
"""

import ctypes

from ._bindings import nixlInvalidParamError, nixlMismatchError

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]

__all__ = ["ba_buf", "free_passthru", "malloc_passthru", "verify_transfer"]


def malloc_passthru(size: int) -> int:
    """``malloc(size)``: the address (0 when it failed)."""
    return _libc.malloc(max(int(size), 1)) or 0


def free_passthru(addr: int) -> None:
    """``free(addr)`` of an address from ``malloc_passthru`` (0 is a no-op)."""
    _libc.free(int(addr))


def _addr(a: int) -> int:
    if not a:
        raise nixlInvalidParamError("address 0")
    return int(a)


def ba_buf(addr: int, size: int) -> None:
    """Fills ``size`` bytes at ``addr`` with 0xba."""
    ctypes.memset(_addr(addr), 0xBA, int(size))


def verify_transfer(a: int, b: int, size: int) -> None:
    """Checks that ``size`` bytes at ``a`` and ``b`` are equal; raises ``nixlMismatchError``
    naming the first byte that differs."""
    x = ctypes.string_at(_addr(a), int(size))
    y = ctypes.string_at(_addr(b), int(size))
    if x != y:
        i = next(i for i in range(len(x)) if x[i] != y[i])
        raise nixlMismatchError(f"byte {i} differs: {x[i]:#04x} != {y[i]:#04x}")
