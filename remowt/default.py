"""The default connection: what ``remowt.Popen`` uses when given none."""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING, Optional

from .errors import RemowtError

if TYPE_CHECKING:
    from .client import Remowt

_lock = threading.Lock()
_connection: Optional[Remowt] = None


def default_connection() -> Remowt:
    """The shared connection, made on first use and closed at interpreter exit.

    It is a local agent on this machine. ``REMOWT_HOST`` names a host to use
    instead; that needs the ssh transport, which this version does not have,
    so a set ``REMOWT_HOST`` is an error rather than silently ignored.
    """
    global _connection
    with _lock:
        if _connection is None or _connection.closed:
            host = os.environ.get("REMOWT_HOST")
            if host:
                raise RemowtError(f"REMOWT_HOST={host!r} is set, but this remowt has no ssh transport yet")
            from .client import connect_local

            _connection = connect_local()
        return _connection


def close_default_connection() -> None:
    """Close the shared connection if one was made."""
    global _connection
    with _lock:
        connection, _connection = _connection, None
    if connection is not None:
        connection.close()


atexit.register(close_default_connection)
