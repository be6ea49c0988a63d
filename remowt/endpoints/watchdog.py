"""The agent's watchdog: a process that kills the agent's children when the agent dies, however it dies.

An agent that is SIGKILLed (the OOM killer does that) cannot kill its
children itself. So at start the agent starts a shell that waits, in a
session of its own, for the end of a pipe whose other end only the agent
holds. They share a table (a memfd) with one counter per possible process
group id: the agent counts up the group of every child it would kill on
disconnect when it starts it, and down when it forgets the child. That is a
store in memory: no system call, nothing that wakes the watchdog. When the
agent dies the pipe ends, and the shell runs Python to kill every group still
counted (:func:`kill_counted`). At a clean exit the agent kills them itself
and tells the shell to stand down.

A shell that waits costs a few hundred KiB; a fork of the agent would hold
megabytes of the agent's memory, copied as the agent writes to it. And a
process rather than ``PR_SET_PDEATHSIG``: that signal reaches only the child
itself (not a grandchild in its group), fires when the *thread* that forked
exits, is cleared by a set-user-ID exec or a change of user, and needs a
``preexec_fn``, which costs every spawn CPython's fast vfork path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import select
import signal
import subprocess
import sys
import threading
from typing import Iterator, List, Optional, Tuple

from ..runtime.deadline import poll_timeout

log = logging.getLogger("remowt.watchdog")
#: One counter per possible process group id: Linux's pids stay below 2**22 (PID_MAX_LIMIT).
#: Only the pages of ids in use take memory.
TABLE_SIZE = 1 << 22
_CHUNK = 1 << 18
_NONZERO = re.compile(rb"[^\0]")
_STAND_DOWN = b"stand-down\n"
#: The watchdog: ignore the signals a group or a terminal gets; exit when told to stand down; at the
#: pipe's end, exec the killer. (``read`` returns non-zero at the end: the line then is empty.)
_SCRIPT = 'trap "" HUP INT QUIT TERM; read -r word; [ "$word" = stand-down ] && exit 0; exec "$@"'


class Watchdog:
    """The agent's end: :meth:`watch` and :meth:`forget` process groups; :meth:`close` at a clean exit."""

    def __init__(self, process: subprocess.Popen[bytes], pipe: int, table_fd: int, table: mmap.mmap) -> None:
        self.process = process
        self._pipe = pipe
        self._table_fd = table_fd
        self._table = table
        self._lock = threading.Lock()

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if this process dies before :meth:`forget` is called as often."""
        if not 1 < pgid < TABLE_SIZE:
            log.warning("process group %d is beyond the watchdog's table: it may outlive a killed agent", pgid)
            return
        with self._lock:  # a count, not a flag: an old, unreleased child may have had the same pid
            self._table[pgid] = min(self._table[pgid] + 1, 255)

    def forget(self, pgid: int) -> None:
        """Leave process group ``pgid`` alone (once it is forgotten as often as it was watched)."""
        if 1 < pgid < TABLE_SIZE:
            with self._lock:
                self._table[pgid] = max(self._table[pgid] - 1, 0)

    def close(self, timeout: float) -> None:
        """Kill the groups still counted, as the watchdog would, then let it go (waiting at most ``timeout`` s)."""
        if self._pipe < 0:
            return
        kill_counted(self._table_fd)
        with contextlib.suppress(OSError):  # else it is gone already
            os.write(self._pipe, _STAND_DOWN)
        os.close(self._pipe)
        os.close(self._table_fd)
        self._pipe = self._table_fd = -1
        if _exited(self.process.pid, timeout):
            self.process.wait()
        else:
            log.warning("watchdog %d did not exit within %g s", self.process.pid, timeout)


def _exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exits within ``timeout`` seconds (a pidfd wakes us at once: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds (Linux before 5.3): assume it does, and let wait() wait
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(poll_timeout(timeout)))
    finally:
        os.close(fd)


def start_watchdog() -> Optional[Watchdog]:
    """Start the watchdog; None (said in the log) if that fails."""
    from ..deploy.local import python_command  # here: the killer, which imports this module, needs none of it
    from ..runtime.real_subprocess import Popen as LocalPopen

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
            process = LocalPopen(
                ["/bin/sh", "-c", _SCRIPT, "remowt-watchdog", *python_command(__name__, str(table_fd))],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                pass_fds=(table_fd,),
                start_new_session=True,  # no terminal's signals, and out of the agent's group
            )
        except OSError:
            for fd in (table_fd, write_fd):
                os.close(fd)
            raise
        finally:
            os.close(read_fd)
    except (AttributeError, OSError) as e:  # no memfd_create (Linux before 3.17), no memory, no process
        log.warning("no watchdog (%s): children may outlive a killed agent", e)
        return None
    return Watchdog(process, write_fd, table_fd, table)


def main() -> None:
    """The killer that the watchdog runs once the agent is gone: ``python -c ... TABLE_FD``."""
    kill_counted(int(sys.argv[1]))


def kill_counted(fd: int) -> None:
    """Kill every process group whose count in table ``fd`` is not zero."""
    for pgid in _counted(fd):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


def _counted(fd: int) -> List[int]:
    """The process groups whose count in table ``fd`` is not zero (read, not mapped: holes stay holes)."""
    found: List[int] = []
    for start, end in _written(fd):
        for offset in range(start, end, _CHUNK):
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            found += [offset + match.start() for match in _NONZERO.finditer(chunk)]
    return found


def _written(fd: int) -> Iterator[Tuple[int, int]]:
    """The (start, end) of each part of table ``fd`` ever written: the rest is holes, which read as zeros."""
    offset = 0
    while offset < TABLE_SIZE:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # not "no data after offset": this kernel cannot tell, read it all
                yield offset, TABLE_SIZE
            return
        offset = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, offset
