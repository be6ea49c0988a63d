"""Keeping signal handlers out of the few places where an interrupt would lose something.

Python runs signal handlers in the main thread, between any two bytecodes: a
KeyboardInterrupt can strike right after ``os.dup`` returned and before its
result was stored, and the fd is lost for good. Such steps run in
:func:`without_interrupts`, with the asynchronous signals blocked in the
calling thread. A signal that comes meanwhile waits in the kernel and its
handler runs as soon as they are unblocked.

That holds only if no other thread takes the signal instead (the kernel gives
a process's signal to any thread that does not block it, and the handler then
runs in the main thread all the same). So every thread remowt starts is
started by :func:`start`, with those signals blocked for good: they go to the
main thread, where Python handles them anyway.
"""

from __future__ import annotations

import importlib
import signal
import threading
from typing import AbstractSet, Callable, Iterable, TypeVar

T = TypeVar("T")

# Signals the kernel raises for the faulting thread itself are left alone.
_SYNCHRONOUS = {
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
    signal.SIGKILL,
    signal.SIGSTOP,
}
ASYNCHRONOUS = frozenset(signal.valid_signals()) - _SYNCHRONOUS
# The C function itself: signal.pthread_sigmask turns each answer into a set of enums (~0.1 ms a call).
sigmask: Callable[[int, Iterable[int]], AbstractSet[int]] = importlib.import_module("_signal").pthread_sigmask


_MAIN_THREAD = threading.main_thread().ident

# Held by a thread of remowt's while it has the asynchronous signals unblocked (a fork, so that the child has them
# unblocked too): a signal taken by such a thread still has its handler run in the main thread, so the main thread
# must not be in a critical section meanwhile.
_unblocked = threading.RLock()


def without_interrupts(action: Callable[[], T]) -> T:
    """Run ``action()`` with the asynchronous signals blocked in this thread; their handlers run after it.

    ``action`` must not wait for long: a Ctrl-C waits for it, and so does
    every fork of another thread (:func:`with_interrupts`). In any thread but
    the main one it is simply called: Python runs handlers only in the main
    thread, so nothing can strike elsewhere.
    """
    if threading.get_ident() != _MAIN_THREAD:
        return action()
    before = sigmask(signal.SIG_BLOCK, ())  # only asks: an interrupt before the change leaves nothing to undo
    try:
        sigmask(signal.SIG_BLOCK, ASYNCHRONOUS)
        with _unblocked:
            # pthread_sigmask runs the handlers of signals that came before (taken by a thread that had them
            # unblocked): they raise here, before the action, never inside it.
            sigmask(signal.SIG_BLOCK, ())
            return action()
    finally:
        sigmask(signal.SIG_SETMASK, before)


def with_interrupts(action: Callable[[], T]) -> T:
    """Run ``action()`` with the asynchronous signals unblocked in this thread (a child forked now inherits that)."""
    with _unblocked:
        before = sigmask(signal.SIG_BLOCK, ())
        try:
            sigmask(signal.SIG_UNBLOCK, ASYNCHRONOUS)
            return action()
        finally:
            sigmask(signal.SIG_SETMASK, before)


def start(thread: threading.Thread) -> threading.Thread:
    """Start ``thread`` with the asynchronous signals blocked in it for good (it inherits this thread's mask).

    Starting it cannot be interrupted either: ``Thread.start`` interrupted at
    the wrong moment leaves a thread that never runs listed as alive.
    """
    without_interrupts(thread.start)
    return thread
