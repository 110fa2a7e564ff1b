"""Keep freed host memory in the process (glibc malloc), so CPU forwards stop page-faulting.

With glibc's defaults, a forward's large activations are served by `mmap` (or from the top
of the heap, which `free` trims back to the system), so every iteration maps fresh pages and
the kernel zeroes them again: on the 2-core development CPU that was 4-6 s of system time in
a short DeiT-S benchmark and up to a third of its bf16 throughput (README "CPU memory
allocator"). `keep_freed_memory` raises three glibc limits through `mallopt` so freed blocks
up to 32 MB are reused instead: the same effect as starting Python with
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456`.
The cost is that the process keeps its peak heap resident. Elsewhere (musl, macOS, Windows)
it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Dict, Optional

_logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h) and the values set: mmap only above 32 MB (glibc's
# upper limit for this threshold on 64-bit), never trim the heap top, grow it 256 MB at a time
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2 ** 31 - 1),
            "M_TOP_PAD": (M_TOP_PAD, 256 << 20)}


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> Dict[str, int]:
    """Apply `SETTINGS` with glibc's `mallopt`; returns the ones that took effect ({} elsewhere)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        _logger.debug("not glibc: malloc settings left as they are")
        return {}
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            _logger.warning("mallopt(%s, %d) was refused; that malloc setting stays at its default", name, value)
    return applied
