"""The local transport: the agent as a child process of this one, on framed stdio."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import msgspec

from ..transports.stdio import ChildTransport, spawn_framed_child


def agent_pythonpath() -> List[str]:
    """The directories that hold remowt and msgspec: all the agent may import from."""
    assert msgspec.__file__ is not None
    remowt_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this module is in remowt/deploy
    dirs = [os.path.dirname(remowt_package)]
    msgspec_parent = os.path.dirname(os.path.dirname(os.path.abspath(msgspec.__file__)))
    if msgspec_parent not in dirs:
        dirs.append(msgspec_parent)
    return dirs


def agent_argv(python: Optional[str] = None, *, privileged: bool = False) -> List[str]:
    """The command that starts a local agent: isolated (``-I -S``) with only what it needs on its path."""
    bootstrap = f"import sys; sys.path[:0] = {agent_pythonpath()!r}; from remowt.agent.main import main; main()"
    argv = [python or sys.executable, "-I", "-S", "-c", bootstrap, "real-agent", "--local"]
    if privileged:
        argv.append("--privileged")
    return argv


def start_local_agent(python: Optional[str] = None) -> ChildTransport:
    """Start an agent on this machine and return the transport to it."""
    return spawn_framed_child(agent_argv(python))
