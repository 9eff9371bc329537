"""Hand the heap's free pages back to the operating system between layers (`checkpoint.CheckpointReader` calls it before every read).

A layer-by-layer pass frees and allocates tensors of the same few sizes once per layer. glibc
serves large blocks with mmap only until a freed one raises its dynamic threshold (up to
32 MiB); from then on they come from the heap, whose free pages stay resident and fragment,
so the resident set creeps up with depth although nothing is kept. `trim_heap` (glibc's
``malloc_trim(0)``, measured 0.02 ms here) returns them; a no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries
        return None


def trim_heap() -> None:
    """Return free heap memory to the system (glibc), so the resident set is what is in use."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
