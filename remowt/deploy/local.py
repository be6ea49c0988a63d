"""Starting remowt code in a fresh interpreter on this machine; the local transport is one such process.

Every remowt process that this one starts here (the local agent, the
privileged agent, sudo's askpass helper, the watchdog's killer) is started by
:func:`python_command`, from a checkout, an installed package or an unpacked
agent bundle alike.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import msgspec

from ..transports.stdio import ChildTransport, spawn_framed_child
from .tree import PRIVILEGED

AGENT = "remowt.agent.main"
"""The agent's entry module: ``real-agent [--local] [--privileged]`` or ``askpass [PROMPT]``."""


def agent_pythonpath() -> List[str]:
    """The directories that hold remowt and msgspec: all the agent may import from."""
    assert msgspec.__file__ is not None
    remowt_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this module is in remowt/deploy
    dirs = [os.path.dirname(remowt_package)]
    msgspec_parent = os.path.dirname(os.path.dirname(os.path.abspath(msgspec.__file__)))
    if msgspec_parent not in dirs:
        dirs.append(msgspec_parent)
    return dirs


def python_command(entry: str, *args: str, python: Optional[str] = None) -> List[str]:
    """The command that runs module ``entry``'s ``main()`` with ``args`` as its ``sys.argv[1:]``.

    The interpreter (``python``, default this one) is isolated (``-I -S``: no
    environment, no user or site directories), imports only from
    :func:`agent_pythonpath` and writes no bytecode there (``-B``: a deployed
    agent's tree is verified whole, so nothing may add to it).
    """
    bootstrap = f"import sys; sys.path[:0] = {agent_pythonpath()!r}; from {entry} import main; main()"
    return [python or sys.executable, "-I", "-S", "-B", "-c", bootstrap, *args]


def privileged_command(tree: Optional[str]) -> List[str]:
    """The command that starts the privileged agent, which the escalation tool runs as root.

    ``tree`` is the digest the client sent for a deployed agent (see
    :mod:`remowt.deploy.tree`): root copies the tree this agent runs from
    into a private directory of its own, verifies the copy against ``tree``
    and runs only that. Without one (a local agent runs the client's own
    installation), the agent's code is imported from where it is.
    """
    if tree is None:
        return python_command(AGENT, "real-agent", "--privileged")
    [source] = agent_pythonpath()  # a deployed agent's remowt and msgspec are in its tree
    return [sys.executable, "-I", "-S", "-B", "-c", PRIVILEGED, source, tree, "real-agent", "--privileged"]


def agent_argv(python: Optional[str] = None, *options: str) -> List[str]:
    """The command that starts a local agent with ``options`` (``remowt.connect_local`` runs it)."""
    return python_command(AGENT, "real-agent", "--local", *options, python=python)


def start_local_agent(python: Optional[str] = None) -> ChildTransport:
    """Start an agent on this machine and return the transport to it."""
    return spawn_framed_child(agent_argv(python))
