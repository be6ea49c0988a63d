"""remowt: run processes on another machine as if they were local, from plain blocking Python.

``import remowt as subprocess`` works: ``Popen``, ``run``, ``call``,
``check_call``, ``check_output``, ``getoutput``, ``getstatusoutput``, the
constants and the exceptions mirror :mod:`subprocess`, and run through the
default connection (or the one given as ``connection=``).
"""

from .client import Remowt, connect_local, loopback
from .command import Command
from .default import default_connection
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
from .patching import patch
from .popen import (
    DEVNULL,
    PIPE,
    STDOUT,
    CalledProcessError,
    CompletedProcess,
    Popen,
    SubprocessError,
    TimeoutExpired,
    call,
    check_call,
    check_output,
    getoutput,
    getstatusoutput,
    run,
)
from .process import RemoteProcess

__version__ = "0.1.0"

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "BadArguments",
    "CalledProcessError",
    "Command",
    "CompletedProcess",
    "ConnectionLost",
    "InternalError",
    "Popen",
    "ProtocolError",
    "RemoteError",
    "RemoteProcess",
    "Remowt",
    "RemowtError",
    "SubprocessError",
    "TimeoutExpired",
    "UnknownMethod",
    "Unreachable",
    "call",
    "check_call",
    "check_output",
    "connect_local",
    "default_connection",
    "getoutput",
    "getstatusoutput",
    "loopback",
    "patch",
    "run",
]
