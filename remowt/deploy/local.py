"""Starting remowt code in a fresh interpreter on this machine; the local transport is one such process.

Every remowt process that this one starts here (the local agent, the
privileged agent, sudo's askpass helper, the watchdog's killer) is started by
:func:`python_command`, from a checkout, an installed package or an unpacked
agent bundle alike.
"""

from __future__ import annotations

import os
import re
import sys
from typing import List, Optional

import msgspec

from ..transports.stdio import ChildTransport, spawn_framed_child
from .tree import PRIVILEGED, QUICK_EXIT

AGENT = "remowt.agent.main"
"""The agent's entry module: ``real-agent [--local] [--privileged]`` or ``askpass [PROMPT]``."""
PLUGINS = "remowt-plugins"
"""The directory of the plugins shipped with the agent, beside its ``remowt`` package (not importable as a name)."""
PLUGIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
"""What a plugin's name may be (a plain file name)."""
PYTHON_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What a Python plugin's name may be (an importable module)."""


def agent_pythonpath() -> List[str]:
    """The directories that hold remowt and msgspec: all the agent may import from."""
    assert msgspec.__file__ is not None
    remowt_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this module is in remowt/deploy
    dirs = [os.path.dirname(remowt_package)]
    msgspec_parent = os.path.dirname(os.path.dirname(os.path.abspath(msgspec.__file__)))
    if msgspec_parent not in dirs:
        dirs.append(msgspec_parent)
    return dirs


def python_command(entry: str, *args: str, python: Optional[str] = None, bytecode: bool = False) -> List[str]:
    """The command that runs module ``entry``'s ``main()`` with ``args`` as its ``sys.argv[1:]``.

    The interpreter (``python``, default this one) is isolated (``-I -S``: no
    environment, no user or site directories), imports only from
    :func:`agent_pythonpath` and, unless ``bytecode``, writes no bytecode
    there (``-B``: a deployed agent's tree is verified whole, so nothing may
    add to it, and root writes nothing into a user's installation).

    When ``main()`` returns, the process ends at once (:data:`QUICK_EXIT`);
    an exception or ``sys.exit`` ends it as usual.
    """
    bootstrap = f"import sys; sys.path[:0] = {agent_pythonpath()!r}; from {entry} import main; main(); {QUICK_EXIT}"
    return [python or sys.executable, "-I", "-S", *([] if bytecode else ["-B"]), "-c", bootstrap, *args]


def plugin_command(module: str, plugins: str, python: Optional[str] = None) -> List[str]:
    """The command that runs the Python plugin ``module`` (a module or package in ``plugins``) as ``__main__``.

    Run as :func:`python_command` runs the agent, with ``plugins`` importable
    after the agent's own code (so plugins shipped together share modules).
    """
    path = [*agent_pythonpath(), plugins]
    run = f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    bootstrap = f"import runpy, sys; sys.path[:0] = {path!r}; {run}"
    return [python or sys.executable, "-I", "-S", "-B", "-c", bootstrap]


def default_plugins_dir() -> str:
    """Where the agent finds the plugins shipped with it: :data:`PLUGINS` beside its ``remowt`` package.

    In a deployed tree (and root's verified copy of it) that is the tree's
    own directory, which the tree digest covers.
    """
    return os.path.join(agent_pythonpath()[0], PLUGINS)


def privileged_command(tree: Optional[str], *options: str) -> List[str]:
    """The command that starts the privileged agent, which the escalation tool runs as root.

    ``tree`` is the digest the client sent for a deployed agent (see
    :mod:`remowt.deploy.tree`): root copies the tree this agent runs from
    into a private directory of its own, verifies the copy against ``tree``
    and runs only that. Without one (a local agent runs the client's own
    installation), the agent's code is imported from where it is.
    """
    if tree is None:
        return python_command(AGENT, "real-agent", "--privileged", *options)
    [source] = agent_pythonpath()  # a deployed agent's remowt and msgspec are in its tree
    return [sys.executable, "-I", "-S", "-B", "-c", PRIVILEGED, source, tree, "real-agent", "--privileged", *options]


def agent_argv(python: Optional[str] = None, *options: str) -> List[str]:
    """The command that starts a local agent with ``options`` (``remowt.connect_local`` runs it).

    It runs this process's own installation as this user, and may cache its
    bytecode there as any import of it does: the agent imports modules this
    process never does (files, sockets, systemd …), which it would otherwise
    compile from source at every start (~50 ms of a ~85 ms start here).
    """
    return python_command(AGENT, "real-agent", "--local", *options, python=python, bytecode=True)


def start_local_agent(python: Optional[str] = None) -> ChildTransport:
    """Start an agent on this machine and return the transport to it."""
    return spawn_framed_child(agent_argv(python))
