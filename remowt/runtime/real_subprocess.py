"""The real ``subprocess.Popen``, taken before :func:`remowt.patch` can replace it.

remowt starts its own local processes (agents, children on the agent)
through this, so patching ``subprocess`` never makes remowt call itself.
A child starts with the signal mask of the thread that forked it, and
remowt's threads block the asynchronous signals (:mod:`remowt.runtime.interrupts`):
they are unblocked around the fork, so no child begins deaf to SIGTERM.
"""

import subprocess
from typing import Any

from .interrupts import with_interrupts

__all__ = ["Popen"]


class Popen(subprocess.Popen):  # type: ignore[type-arg]
    """``subprocess.Popen``, forking with the asynchronous signals unblocked."""

    def _execute_child(self, *args: Any, **kwargs: Any) -> None:
        with_interrupts(lambda: super(Popen, self)._execute_child(*args, **kwargs))  # type: ignore[misc]
