"""Keep freed heap memory for the next push; give it back a few seconds later (glibc).

Every push is assembled in a buffer of its own size.  With glibc's defaults a buffer of
megabytes is handed back to the kernel the moment it is freed (munmap, or a trim of the
heap's top), so the next push faults every page of its buffer in again and the kernel
zeroes each one: in a storm of 5 MB pushes that was a quarter of the relay's CPU.
:func:`hold` raises glibc's mmap and trim thresholds so freed buffers are reused, and
:func:`releaser` returns what is held every few seconds (``malloc_trim``), so the
relay's idle RSS does not stay at a storm's peak.  Elsewhere (musl, macOS) both are
no-ops and the allocator keeps its own policy.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping
from typing import Any

from xdsfast.periodic import Periodic

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit hosts: buffers up to this size come from the
# heap and are reused; the heap's free top is kept up to the same size.
HOLD_BYTES = 32 << 20
# What an operator sets to tune glibc's malloc; when any is set, theirs is the policy.
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def operator_tuned(env: Mapping[str, str]) -> str | None:
    """The variable through which the operator tuned glibc's malloc, if any."""
    for name in MALLOC_ENV:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc, else None."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (AttributeError, OSError, ValueError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def supported() -> bool:
    """Whether this process allocates with glibc (the only allocator the policy knows)."""
    return _glibc() is not None


def hold(limit: int = HOLD_BYTES) -> bool:
    """Let freed buffers up to ``limit`` bytes stay in the heap for reuse; False if the
    allocator is not glibc or refused the setting."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, limit)
    )


def release() -> bool:
    """Give the heap's free pages back to the kernel; True if any went."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def releaser(interval: float) -> Periodic:
    """:func:`release` every ``interval`` seconds once started.

    Periodic rather than tied to traffic: a storm keeps its buffers between releases, and
    what a quiet relay holds is back with the kernel within one interval.
    """
    return Periodic(interval, release)
