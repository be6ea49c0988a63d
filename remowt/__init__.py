"""remowt: run processes on another machine as if they were local, from plain blocking Python."""

from .client import DEVNULL, PIPE, STDOUT, Remowt, connect_local, loopback
from .errors import (
    BadArguments,
    ConnectionLost,
    InternalError,
    ProtocolError,
    RemoteError,
    RemowtError,
    UnknownMethod,
    Unreachable,
)
from .process import RemoteProcess

__version__ = "0.1.0"

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "BadArguments",
    "ConnectionLost",
    "InternalError",
    "ProtocolError",
    "RemoteError",
    "RemoteProcess",
    "Remowt",
    "RemowtError",
    "UnknownMethod",
    "Unreachable",
    "connect_local",
    "loopback",
]
