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
from typing import Callable, Dict, List, Optional

from .deadline import lock_timeout

# Waiters whose thread does not sleep on them but polls an fd (a link's leader), with how to wake it.
_pollers: Dict[threading.Lock, Callable[[], None]] = {}


def wake_on_release(waiter: threading.Lock, wake: Callable[[], None]) -> None:
    """Call ``wake()`` when a :class:`Gate` releases ``waiter``: its thread waits elsewhere (see :func:`forget`)."""
    _pollers[waiter] = wake


def forget(waiter: threading.Lock) -> None:
    """Undo :func:`wake_on_release`."""
    _pollers.pop(waiter, None)


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
            if _pollers:
                wake = _pollers.get(waiter)
                if wake is not None:
                    wake()


def wait_on(waiter: threading.Lock, timeout: Optional[float] = None) -> bool:
    """Wait until ``waiter`` is released (its gate opened); False if ``timeout`` seconds passed first."""
    return waiter.acquire(True, lock_timeout(timeout))


#: How to wait on a gate's waiter: :func:`wait_on`, or a way that reads what will release it (a link's).
WaitOn = Callable[[threading.Lock, Optional[float]], bool]


def owns(lock: threading.RLock) -> bool:
    """Whether this thread holds ``lock``: how a way out that an interrupt may have cut anywhere knows."""
    owned: bool = lock._is_owned()  # type: ignore[attr-defined]  # the C RLock's, as threading.Condition uses it
    return owned


def held_elsewhere(lock: threading.RLock) -> bool:
    """Whether another thread holds ``lock``."""
    if lock.acquire(False):
        lock.release()
        return False
    return True


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

    def wait(self, timeout: Optional[float] = None, how: WaitOn = wait_on) -> bool:
        """Wait until set (with ``how``); False if ``timeout`` seconds passed first."""
        with self._lock:
            if self._set:
                return True
            waiter = self._gate.enlist()
        how(waiter, timeout)
        return self._set
