"""The agent as its children's parent: a child that signals its parent signals the agent.

With subprocess, ``os.kill(os.getppid(), SIGUSR1)`` in a child reaches the
caller; here it reaches the agent, whom SIGUSR1's default action would kill
(and all its children with it). So the signals that kill by default and that
the agent has no use for get a handler: a local agent passes each on to the
process that started it (the caller, which gets it as subprocess's caller
would), an agent elsewhere takes it and does nothing.

The agent's own signals keep what they do: SIGINT, SIGTERM and SIGHUP end it
(the privileged agent takes SIGHUP), SIGQUIT dumps it, Python ignores
SIGPIPE, and the kernel's signals about the agent itself (faults, CPU and
file size limits) are left alone. A handler and not SIG_IGN: exec puts a
handled signal back to its default in the child, an ignored one would stay
ignored there.
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import List, Optional

RELAYED: List[int] = [
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
]
"""Signals a child may send its parent whose default action would kill the agent."""


def stand_in_for_the_caller(caller: Optional[int]) -> None:
    """Handle :data:`RELAYED` in this process: passed on to the process ``caller``, or (None) dropped.

    Call from the main thread (Python's handlers run there).
    """

    def relay(signum: int, frame: Optional[FrameType]) -> None:
        if caller is not None:
            with contextlib.suppress(OSError):  # the caller is gone: the agent is about to end too
                os.kill(caller, signum)

    for signum in RELAYED:
        signal.signal(signum, relay)
