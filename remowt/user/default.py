"""The default connection: what ``remowt.Popen`` uses when given none."""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .connection import Remowt

_lock = threading.Lock()
_connection: Optional[Remowt] = None


def default_connection() -> Remowt:
    """The shared connection, made on first use and closed at interpreter exit.

    With ``REMOWT_HOST`` set it is ``remowt.connect(REMOWT_HOST)`` (an ssh
    host or ``~/.ssh/config`` alias); otherwise a local agent on this machine.
    """
    global _connection
    with _lock:
        if _connection is None or _connection.closed:
            from .connect import connect, connect_local

            host = os.environ.get("REMOWT_HOST")
            _connection = connect(host) if host else connect_local()
        return _connection


def close_default_connection() -> None:
    """Close the shared connection if one was made."""
    global _connection
    with _lock:
        connection, _connection = _connection, None
    if connection is not None:
        connection.close()


atexit.register(close_default_connection)
