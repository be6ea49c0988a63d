"""The agent's watchdog: a process that kills the agent's children when the agent dies, however it dies.

An agent that is SIGKILLed (the OOM killer does that) cannot kill its
children itself. So the agent forks this process at start, before it has a
thread. They share a table (a memfd) with one counter per possible
process group id: the agent counts up the group of every child it would
kill on disconnect when it starts it, and down when it forgets the child;
a store in memory, no system call, nothing that wakes the watchdog. The
watchdog only waits for the end of a pipe whose other end the agent holds:
when the agent exits or is killed, the pipe ends, and the watchdog kills
every group still counted and exits.

A process rather than ``PR_SET_PDEATHSIG``: that signal reaches only the
child itself (not a grandchild in its group), fires when the *thread* that
forked exits, is cleared by a set-user-ID exec or a change of user, and
needs a ``preexec_fn``, which costs every spawn CPython's fast vfork path.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import select
import signal
import threading
import time
from typing import List, NoReturn, Optional

log = logging.getLogger("remowt.watchdog")
#: One counter per possible process group id: Linux's pids stay below 2**22 (PID_MAX_LIMIT).
#: Only the pages of ids in use take memory.
TABLE_SIZE = 1 << 22
_CHUNK = 1 << 18
_NONZERO = re.compile(rb"[^\0]")
#: Signals the watchdog ignores: a Ctrl-C, a hangup or a TERM sent to the agent's group must not end it first.
_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT)


class Watchdog:
    """The agent's end: :meth:`watch` and :meth:`forget` process groups; :meth:`close` at a clean exit."""

    def __init__(self, pid: int, fd: int, table: mmap.mmap) -> None:
        self.pid = pid
        self._fd = fd
        self._table = table
        self._lock = threading.Lock()

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget` is called as often."""
        if not 0 < pgid < TABLE_SIZE:
            log.warning("process group %d is beyond the watchdog's table: it may outlive a killed agent", pgid)
            return
        with self._lock:  # a count, not a flag: an old, unreleased child may have had the same pid
            self._table[pgid] = min(self._table[pgid] + 1, 255)

    def forget(self, pgid: int) -> None:
        """Leave process group ``pgid`` alone (once it is forgotten as often as it was watched)."""
        if 0 < pgid < TABLE_SIZE:
            with self._lock:
                self._table[pgid] = max(self._table[pgid] - 1, 0)

    def close(self, timeout: float) -> None:
        """End the watchdog (it kills what is still counted) and reap it, waiting at most ``timeout`` seconds."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if not _wait_exit(self.pid, timeout):
            log.warning("watchdog %d did not exit within %g s", self.pid, timeout)


def start_watchdog() -> Optional[Watchdog]:
    """Fork the watchdog; None (said in the log) if that fails. Call while this process has one thread."""
    try:
        table_fd = os.memfd_create("remowt-watchdog")
        try:
            os.ftruncate(table_fd, TABLE_SIZE)
            table = mmap.mmap(table_fd, TABLE_SIZE)
            read_fd, write_fd = os.pipe()
        except OSError:
            os.close(table_fd)
            raise
        try:
            pid = os.fork()
        except OSError:
            for fd in (table_fd, read_fd, write_fd):
                os.close(fd)
            raise
    except (AttributeError, OSError) as e:  # no memfd_create (Linux before 3.17), no memory, no process
        log.warning("no watchdog (%s): children may outlive a killed agent", e)
        return None
    if pid == 0:
        _serve(read_fd, table_fd)
    os.close(read_fd)
    os.close(table_fd)
    return Watchdog(pid, write_fd, table)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Reap child ``pid``, waiting at most ``timeout`` seconds; False if it is still running."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here: poll
        deadline = time.monotonic() + timeout
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            return False
    finally:
        os.close(fd)
    os.waitpid(pid, 0)
    return True


def _serve(read_fd: int, table_fd: int) -> NoReturn:
    """The watchdog process: wait for the pipe's end, then kill the groups still counted."""
    status = 1
    try:
        _isolate(read_fd, table_fd)
        while os.read(0, 1):  # nothing is ever written: this is the wait for the agent's end
            pass
        for pgid in _counted(3):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        status = 0
    finally:
        os._exit(status)


def _counted(fd: int) -> List[int]:
    """The process groups whose count in table ``fd`` is not zero (read, not mapped: holes stay holes)."""
    found: List[int] = []
    for offset in range(0, TABLE_SIZE, _CHUNK):
        chunk = os.pread(fd, _CHUNK, offset)
        found += [offset + match.start() for match in _NONZERO.finditer(chunk)]
    return found


def _isolate(read_fd: int, table_fd: int) -> None:
    """Keep only the pipe (fd 0), stderr and the table (fd 3); take a group of its own; ignore terminal signals."""
    os.dup2(read_fd, 0)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(table_fd, 3)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # a signal to the agent's group (kill -9 -PGID) must leave someone to clean up
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write("remowt-watchdog")
