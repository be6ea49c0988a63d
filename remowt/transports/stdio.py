"""Byte streams over a pair of file descriptors, and framed child processes.

The local agent, the privileged agent and plugins all speak the protocol on
their stdin/stdout; :func:`spawn_framed_child` starts such a child and
:class:`FdTransport` carries the bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import stat
import subprocess
import threading
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from ..runtime.deadline import poll_timeout
from ..runtime.interrupts import start
from ..runtime.real_subprocess import Popen as LocalPopen
from .base import Transport

PIPE_SIZE = 1024 * 1024
IOV_MAX = 1024
_splice: Optional[Callable[..., int]] = getattr(os, "splice", None)  # Linux, Python 3.10+
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
log = logging.getLogger("remowt.transport")


def dup_above_stdio(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered above 2, so that it can never pass for stdin, stdout or stderr.

    A process started with fd 0, 1 or 2 closed gets its next fds there: an
    agent's pipe on fd 0 would be taken for the caller's stdin and copied to a child.
    """
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def pipe_above_stdio() -> Tuple[int, int]:
    """``os.pipe()`` whose ends are numbered above 2."""
    read_fd, write_fd = os.pipe()
    try:
        return dup_above_stdio(read_fd), dup_above_stdio(write_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Ask the kernel for a larger pipe buffer; silently keep the old one if refused."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, setpipe, size)


class FdTransport(Transport):
    """Reads from one fd and writes to another; both are closed by :meth:`close`."""

    name = "fd"
    small_reads = True
    callers_wait = True

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wake_r, self._wake_w = pipe_above_stdio()
        self._read_poller = select.poll()  # the link's reader is the only thread that waits to read
        self._read_poller.register(read_fd, select.POLLIN)
        self._read_poller.register(self._wake_r, select.POLLIN)
        # Pipes, not eventfds (Python 3.10+): the agent runs on 3.9 too. A byte in one ends a wait:
        self._nudge_r, self._nudge_w = _wake_pipe()  # the reader's, so that it looks again at what to do
        self._read_poller.register(self._nudge_r, select.POLLIN)
        self._caller_r, self._caller_w = _wake_pipe()  # the caller's that reads for itself
        self._caller_poller = select.poll()  # one caller at a time waits (the link's leader)
        self._woken_poller = select.poll()  # the leader, while the reader has the turn
        for fd in (read_fd, self._wake_r, self._caller_r):
            self._caller_poller.register(fd, select.POLLIN)
            if fd != read_fd:
                self._woken_poller.register(fd, select.POLLIN)
        self._closed = False
        self._lock = threading.Lock()
        self._users = 0  # the reader's reads and waits, and writers, while they use the fds
        self._polling = False  # the one caller in wait_for_caller is at it (see there)
        mode = os.fstat(write_fd).st_mode
        self.splices = _splice is not None and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))
        self.atomic_write = select.PIPE_BUF if stat.S_ISFIFO(mode) else 0

    def _enter(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            self._close_if_unused_locked()

    def _close_if_unused_locked(self) -> None:
        """Close the fds once closed and nobody uses them (the lock held)."""
        if self._closed and not self._users and self._rfd >= 0 and not self._polling:
            self._close_fds()

    def _wait_writable(self) -> bool:
        """Wait until the write fd takes bytes; False when the transport was closed meanwhile."""
        poller = select.poll()
        poller.register(self._wfd, select.POLLOUT)
        poller.register(self._wake_r, select.POLLIN)
        return all(ready != self._wake_r for ready, _ in poller.poll())

    def read(self, size: int) -> Optional[bytes]:
        if not self._enter():
            return b""
        try:
            return os.read(self._rfd, min(size, PIPE_SIZE))  # a pipe holds no more
        except BlockingIOError:
            return None
        except OSError as e:
            log.debug("read failed: %s", e)
            return b""
        finally:
            self._leave()

    def wait_readable(self, timeout: Optional[float]) -> bool:
        if not self._enter():
            return True
        try:
            ready = self._read_poller.poll(poll_timeout(timeout))
            if any(fd == self._nudge_r for fd, _ in ready):
                _drain(self._nudge_r)
            return bool(ready)
        finally:
            self._leave()

    def nudge(self) -> None:
        self._signal(self._nudge_w)

    def wake_caller(self) -> None:
        self._signal(self._caller_w)

    def _signal(self, wake_w: int) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: it wakes all the same
                    os.write(wake_w, b"x")

    def wait_for_caller(self, timeout: Optional[float], data: bool = True) -> Optional[bool]:
        # Only the link's leader comes here, one thread at a time. It is not counted in and out as the reader
        # is, nor does it hold a lock: a signal handler (a Ctrl-C) runs at any call this thread makes, and a
        # finally that calls anything before giving a lock back could be cut there (a held lock kept the fds
        # open for good after the close, 3 runs in 6 of the interrupt soak). A flag is set before the closed
        # check (the close sets closed, then looks at the flag: one of them sees the other) and cleared first
        # thing in the finally, where no call comes before it.
        try:
            self._polling = True
            if self._closed:
                return None
            poller = self._caller_poller if data else self._woken_poller
            ready = [fd for fd, _ in poller.poll(poll_timeout(timeout))]
            if self._wake_r in ready:
                return None
            if self._caller_r in ready:
                _drain(self._caller_r)
                return False
            return bool(ready)
        finally:
            self._polling = False
            if self._closed:
                with self._lock:
                    self._close_if_unused_locked()

    def write(self, data: memoryview, block: bool) -> int:
        return self.writev((data,), block)

    def writev(self, buffers: Sequence[memoryview], block: bool) -> int:
        if not block:
            # Under the lock instead of counted in and out: a sender in the main thread may be
            # interrupted anywhere, and a count it never took back would keep the fds open for good.
            with self._lock:
                if self._closed:
                    raise BrokenPipeError("transport is closed")
                try:
                    return os.writev(self._wfd, buffers[:IOV_MAX])
                except BlockingIOError:
                    return 0
        if not self._enter():
            raise BrokenPipeError("transport is closed")
        try:
            while True:
                try:
                    return os.writev(self._wfd, buffers[:IOV_MAX])
                except BlockingIOError:
                    if not block:
                        return 0
                if not self._wait_writable():
                    raise BrokenPipeError("transport is closed")
        finally:
            self._leave()

    def splice_from(self, fd: int, count: int, block: bool) -> int:
        """Move what it can; with ``block``, all ``count`` bytes unless the transport closes meanwhile.

        A blocking move waits for room before each further splice: a full pipe
        drains a packet at a time (32 KiB through sshd), and trying first would
        raise, and catch, an ``EAGAIN`` for each.
        """
        assert _splice is not None
        if not self._enter():
            raise BrokenPipeError("transport is closed")
        total = 0
        try:
            while True:
                try:
                    moved = _splice(fd, self._wfd, count - total, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    if not block:
                        return 0
                else:
                    if not moved:
                        raise BrokenPipeError(f"pipe {fd} ended before the {count} bytes it held were moved")
                    total += moved
                    if total == count or not block:
                        return total
                if not self._wait_writable():
                    if total:
                        return total
                    raise BrokenPipeError("transport is closed")
        finally:
            self._leave()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.write(self._wake_w, b"x")
            self._close_if_unused_locked()  # again too: whoever used the fds at the first close may have left

    def _close_fds(self) -> None:
        fds = (
            self._rfd,
            self._wfd,
            self._wake_r,
            self._wake_w,
            self._nudge_r,
            self._nudge_w,
            self._caller_r,
            self._caller_w,
        )
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._rfd = self._wfd = self._wake_r = self._wake_w = -1
        self._nudge_r = self._nudge_w = self._caller_r = self._caller_w = -1


def _wake_pipe() -> Tuple[int, int]:
    """A pipe above stdio whose ends never block: a byte written wakes a ``poll`` on the other end."""
    read_fd, write_fd = pipe_above_stdio()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _drain(read_fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(read_fd, 4096)


class ChildTransport(FdTransport):
    """The stdio of a child process; closing it ends the child."""

    name = "child"

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        exit_timeout: float = 5.0,
        on_stderr: Optional[Callable[[str], None]] = None,
    ) -> None:
        assert process.stdout is not None and process.stdin is not None
        read_fd = dup_above_stdio(process.stdout.fileno())
        write_fd = dup_above_stdio(process.stdin.fileno())
        process.stdout.close()
        process.stdin.close()
        super().__init__(read_fd, write_fd)
        self.process = process
        self.exit_timeout = exit_timeout
        self.stderr_lines: List[str] = []
        self._on_stderr = on_stderr
        self._stderr_thread: Optional[threading.Thread] = None
        if process.stderr is not None:
            self._stderr_thread = threading.Thread(
                target=self._drain_stderr, name=f"remowt-stderr-{process.pid}", daemon=True
            )
            start(self._stderr_thread)

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr as err:
            for raw in err:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stderr_lines.append(line)
                del self.stderr_lines[:-50]
                if self._on_stderr is not None:
                    self._on_stderr(line)
                else:
                    log.info("[pid %d] %s", self.process.pid, line)

    def stderr_tail(self) -> str:
        """The last lines the child wrote to stderr (for error messages)."""
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=1.0)
        return "\n".join(self.stderr_lines)

    def close(self) -> None:
        super().close()
        try:
            self.process.wait(timeout=self.exit_timeout)
        except subprocess.TimeoutExpired:
            log.warning("child %d did not exit after its link closed; killing it", self.process.pid)
            self.process.kill()
            self.process.wait()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=self.exit_timeout)


def spawn_framed_child(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    capture_stderr: bool = True,
    pass_fds: Sequence[int] = (),
    exit_timeout: float = 5.0,
    on_stderr: Optional[Callable[[str], None]] = None,
) -> ChildTransport:
    """Start ``argv`` with framed stdio and return the transport that talks to it (it inherits ``pass_fds`` too).

    Closing the transport waits ``exit_timeout`` seconds for the child's exit, then kills it.
    ``on_stderr(line)`` takes each line of its stderr (on a thread of its own) instead of the log.

    The child runs in a session of its own: a terminal's Ctrl-C (or hangup), sent
    to the caller's whole process group, is for the caller to handle, not a way to
    kill its link.
    """
    process = LocalPopen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if capture_stderr else None,
        env=None if env is None else dict(env),
        cwd=cwd,
        bufsize=0,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,
    )
    assert process.stdin is not None and process.stdout is not None
    enlarge_pipe(process.stdin.fileno())
    enlarge_pipe(process.stdout.fileno())
    return ChildTransport(process, exit_timeout, on_stderr)


def take_stdio() -> FdTransport:
    """Keep stdin/stdout for the protocol (an agent's, a plugin's); fds 0 and 1 now go elsewhere, harmlessly.

    Pipes are enlarged: sshd gives 64 KiB ones, so output spliced into the link would wake this
    process every 64 KiB.
    """
    read_fd, write_fd = os.dup(0), os.dup(1)
    enlarge_pipe(read_fd)
    enlarge_pipe(write_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return FdTransport(read_fd, write_fd)
