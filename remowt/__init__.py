"""remowt: run processes on another machine as if they were local, from plain blocking Python.

``import remowt as subprocess`` works: ``Popen``, ``run``, ``call``,
``check_call``, ``check_output``, ``getoutput``, ``getstatusoutput``, the
constants and the exceptions mirror :mod:`subprocess`, and run through the
default connection (or the one given as ``connection=``).

Names are imported on first use, so the agent, which imports only the
modules it serves, does not pay for the client side at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:
    from .endpoints.subprocess import Terminal
    from .errors import (
        AccessDenied,
        BadArguments,
        ConnectionLost,
        EscalationError,
        InternalError,
        JobFailed,
        MessageTooLarge,
        NoSuchUnit,
        PluginError,
        ProtocolError,
        RemoteError,
        RemowtError,
        ResultTooLarge,
        SystemdError,
        UnknownMethod,
        Unreachable,
    )
    from .user.command import Command
    from .user.connect import connect, connect_command, connect_local, connect_transport, loopback
    from .user.connection import Remowt
    from .user.default import default_connection
    from .user.node import Node
    from .user.patching import patch
    from .user.popen import (
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
    from .user.process import RemoteProcess

from .version import __version__ as __version__

_HOMES: Dict[str, str] = {
    "Remowt": "user.connection",
    "Node": "user.node",
    **dict.fromkeys(["connect", "connect_command", "connect_local", "connect_transport", "loopback"], "user.connect"),
    "Command": "user.command",
    "default_connection": "user.default",
    **dict.fromkeys(
        [
            "AccessDenied",
            "BadArguments",
            "ConnectionLost",
            "EscalationError",
            "InternalError",
            "JobFailed",
            "MessageTooLarge",
            "NoSuchUnit",
            "PluginError",
            "ProtocolError",
            "RemoteError",
            "RemowtError",
            "ResultTooLarge",
            "SystemdError",
            "UnknownMethod",
            "Unreachable",
        ],
        "errors",
    ),
    "patch": "user.patching",
    **dict.fromkeys(
        [
            "DEVNULL",
            "PIPE",
            "STDOUT",
            "CalledProcessError",
            "CompletedProcess",
            "Popen",
            "SubprocessError",
            "TimeoutExpired",
            "call",
            "check_call",
            "check_output",
            "getoutput",
            "getstatusoutput",
            "run",
        ],
        "user.popen",
    ),
    "RemoteProcess": "user.process",
    "Terminal": "endpoints.subprocess",
}

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "AccessDenied",
    "BadArguments",
    "CalledProcessError",
    "Command",
    "CompletedProcess",
    "ConnectionLost",
    "EscalationError",
    "InternalError",
    "JobFailed",
    "MessageTooLarge",
    "NoSuchUnit",
    "Node",
    "PluginError",
    "Popen",
    "ProtocolError",
    "RemoteError",
    "RemoteProcess",
    "Remowt",
    "RemowtError",
    "ResultTooLarge",
    "SubprocessError",
    "SystemdError",
    "Terminal",
    "TimeoutExpired",
    "UnknownMethod",
    "Unreachable",
    "call",
    "check_call",
    "check_output",
    "connect",
    "connect_command",
    "connect_local",
    "connect_transport",
    "default_connection",
    "getoutput",
    "getstatusoutput",
    "loopback",
    "patch",
    "run",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'remowt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
