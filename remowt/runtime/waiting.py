"""Waiting that a KeyboardInterrupt cannot break.

A signal handler runs in the main thread between any two bytecodes, and so
may raise in the middle of ``threading.Condition.wait`` or
``Condition.__enter__`` (both Python code): the condition's lock is then left
held, or released twice, and the next thread to touch it (a link's reader,
say) blocks for good. So remowt's waiting is built from C-level locks only:
a waiter holds the state's lock only in ``with lock:`` blocks that do not
wait, and waits outside them on a lock of its own (:class:`Gate`). An
interrupt can then only leave a waiter enlisted, and the next opening of the
gate drops it.
"""

from __future__ import annotations

import threading
from typing import List, Optional

from .deadline import lock_timeout


class Gate:
    """Threads waiting for a change of some state that a lock guards.

    A waiter calls :meth:`enlist` with the state's lock held, leaves the
    ``with`` block, then waits with :func:`wait_on`; whoever changes the state
    calls :meth:`open` (with the state's lock held) to wake every waiter.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: List[threading.Lock] = []

    def enlist(self) -> threading.Lock:
        """A locked lock that the next :meth:`open` releases (call with the state's lock held)."""
        waiter = threading.Lock()
        waiter.acquire()
        self._waiting.append(waiter)
        return waiter

    def open(self) -> None:
        """Wake every enlisted waiter (call with the state's lock held).

        Each waiter leaves the list only after it was released, so an
        interrupted opening leaves the rest for the next one, never asleep.
        """
        waiting = self._waiting
        while waiting:
            waiter = waiting[-1]
            if waiter.locked():
                waiter.release()
            waiting.pop()


def wait_on(waiter: threading.Lock, timeout: Optional[float] = None) -> bool:
    """Wait until ``waiter`` is released (its gate opened); False if ``timeout`` seconds passed first."""
    return waiter.acquire(True, lock_timeout(timeout))


class Flag:
    """An event that a waiting main thread may be interrupted in without harm (unlike ``threading.Event``)."""

    __slots__ = ("_gate", "_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gate = Gate()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            self._gate.open()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until set; False if ``timeout`` seconds passed first."""
        with self._lock:
            if self._set:
                return True
            waiter = self._gate.enlist()
        wait_on(waiter, timeout)
        return self._set
