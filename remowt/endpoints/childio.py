"""One thread for the agent's children: exits through pidfds, output pipes into streams.

Reading a child's stdout or stderr needs no thread of its own: the loop reads
a pipe only while its stream has credit, parks it when the credit runs out,
and takes it back when the reader returns credit. A child that writes
faster than its reader reads waits in its own pipe, as it would locally.
Where the link allows, the bytes go from the child's pipe into the link by
splice(2) and never pass through Python. A :class:`LazyOutput` pipe gets its
stream only once there is output (or its child exits with the pipe still
open): a child that writes nothing costs no stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
import termios
import threading
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple, Union

from ..errors import ConnectionLost, Unreachable
from ..rpc.link import held_sends
from ..rpc.streams import MAX_CHUNK, Stream
from ..runtime.interrupts import start

log = logging.getLogger("remowt.childio")
_OUTPUT = select.EPOLLIN | select.EPOLLONESHOT
_FIONREAD = struct.Struct("i")
SPLICE_CHUNK = 1024 * 1024  # at most this much in one spliced frame: what a pipe holds
ROUNDS = 4  # rounds of events gathered into one write at most (more would delay what is held)


class Child(Protocol):
    """What the loop needs of a child: its pid, and a way to reap it without blocking."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> Optional[int]: ...

    def wait(self) -> int: ...


class LazyOutput:
    """An output whose stream is opened on first need; every :meth:`open` gives the same stream."""

    def __init__(self, opener: Callable[[], Stream]) -> None:
        self._opener = opener
        self._lock = threading.Lock()
        self._stream: Optional[Stream] = None

    def open(self) -> Stream:
        """The stream, opened now unless it was already (``Unreachable`` or ``ConnectionLost`` if it cannot be)."""
        with self._lock:
            if self._stream is None:
                self._stream = self._opener()
            return self._stream


Output = Union[Stream, LazyOutput]


class ChildIO:
    """The loop; other threads hand it work with :meth:`watch_exit` and :meth:`pump`.

    It waits in epoll, which takes new fds from any thread while the loop is
    waiting, so handing it work never wakes it: on a spawn path every thread
    switch counts.
    """

    def __init__(self, on_exit: Callable[[Child], None]) -> None:
        self._on_exit = on_exit
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._lock = threading.Lock()
        self._exits: Dict[int, Child] = {}
        self._outputs: Dict[int, Output] = {}
        self._read_only: Set[int] = set()  # outputs that are not pipes: never spliced
        self._lazy: Dict[int, List[Tuple[int, LazyOutput]]] = {}  # a child's lazy outputs, by its pid
        self._fallback: List[threading.Thread] = []
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._ends = 0  # outputs ended and children reaped so far (the loop's hint to gather a round)

    # --- from any thread ---------------------------------------------------

    def watch_exit(self, child: Child) -> None:
        """Report ``child``'s exit to ``on_exit`` (from the loop thread)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            fd = pidfd_open(child.pid) if pidfd_open is not None else -1
        except OSError:
            fd = -1
        if fd < 0:
            # Its exit is reported from another thread: its outputs must be open before it is.
            with self._lock:
                lazy = self._lazy.pop(child.pid, [])
            for _, output in lazy:
                with contextlib.suppress(ConnectionLost, Unreachable):  # the loop ends that output
                    output.open()
            thread = threading.Thread(target=self._wait_one, args=(child,), name="remowt-wait", daemon=True)
            self._fallback.append(thread)
            start(thread)
            return
        with self._lock:
            self._exits[fd] = child
            self._epoll.register(fd, select.EPOLLIN)
            self._ensure_thread()

    def pump(self, fd: int, stream: Output, pid: int = 0, splice: bool = True) -> None:
        """Copy pipe ``fd`` into ``stream`` until EOF; the loop owns and closes ``fd``.

        A :class:`LazyOutput` is opened at the first output, or before the exit
        of child ``pid`` (watched after this call) is reported if the pipe is still open then.
        Without ``splice`` (``fd`` is no pipe: a terminal's master) the bytes are read and sent.
        """
        os.set_blocking(fd, False)
        with self._lock:
            if not splice:
                self._read_only.add(fd)
            self._outputs[fd] = stream
            if isinstance(stream, LazyOutput):
                self._lazy.setdefault(pid, []).append((fd, stream))
            self._epoll.register(fd, _OUTPUT)
            self._ensure_thread()

    def stop(self, timeout: float) -> None:
        """End the loop and release every fd it holds."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        os.write(self._wake_w, b"x")
        if thread is not None:
            thread.join(timeout)
        for thread in self._fallback:
            thread.join(timeout)
        with self._lock:
            exits, self._exits = self._exits, {}
            outputs, self._outputs = self._outputs, {}
            self._read_only.clear()
        for fd in exits:
            os.close(fd)
        for fd, output in outputs.items():
            if isinstance(output, Stream):
                output.close()
            os.close(fd)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="remowt-childio", daemon=True)
            start(self._thread)

    def _wait_one(self, child: Child) -> None:
        child.wait()
        self._on_exit(child)

    def _arm(self, fd: int) -> None:
        """Wait for output on ``fd`` again: outputs are one-shot, re-armed once handled."""
        with self._lock:
            if fd in self._outputs and not self._stopped:
                self._epoll.modify(fd, _OUTPUT)

    # --- the loop thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            events = self._epoll.poll()
            with held_sends():  # what one round of events sends goes out in one write
                # A child's exit ends its pipes and then its pidfd: when a round saw
                # an end, what became ready meanwhile joins it, so the peer wakes once.
                for more in range(ROUNDS - 1, -1, -1):
                    ends = self._ends
                    if not self._handle(events):
                        return
                    if not more or self._ends == ends:
                        break
                    os.sched_yield()  # an exiting child woken out of this CPU goes on ending its fds
                    events = self._epoll.poll(0)  # every event taken is handled: outputs are one-shot
                    if not events:
                        break

    def _handle(self, events: List[Tuple[int, int]]) -> bool:
        """Handle one round of epoll events; False when told to stop."""
        for fd, mask in events:
            if fd == self._wake_r:
                return False
            with self._lock:
                child = self._exits.get(fd)
                stream = self._outputs.get(fd)
            if child is not None:
                self._reap(fd, child)
            elif stream is not None:
                self._pump_once(fd, stream, bool(mask & select.EPOLLIN))
        return True

    def _reap(self, fd: int, child: Child) -> None:
        if child.poll() is None:
            return
        with self._lock:
            del self._exits[fd]
            self._epoll.unregister(fd)
        os.close(fd)
        self._ends += 1
        self._settle(child.pid)
        self._on_exit(child)

    def _settle(self, pid: int) -> None:
        """Before child ``pid``'s exit is reported: open its lazy outputs that may still bring output."""
        with self._lock:
            lazy = self._lazy.pop(pid, [])
        for fd, output in lazy:
            with self._lock:
                if self._outputs.get(fd) is not output:  # opened or ended already
                    continue
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            events = poller.poll(0)
            if events and not events[0][1] & select.POLLIN:  # its end, with nothing written
                self._end_output(fd, output)
            else:  # output waits, or someone else (a grandchild) still holds the pipe
                self._open(fd, output)

    def _open(self, fd: int, output: LazyOutput) -> Optional[Stream]:
        """The stream of a lazy output, now in its place; None (the output ended) if it cannot be opened."""
        try:
            stream = output.open()
        except (ConnectionLost, Unreachable):
            self._end_output(fd, output)
            return None
        with self._lock:
            if self._outputs.get(fd) is output:
                self._outputs[fd] = stream
        return stream

    def _pump_once(self, fd: int, output: Output, readable: bool) -> None:
        """Move what pipe ``fd`` holds into its stream; without ``readable`` it can only be its end."""
        if isinstance(output, LazyOutput):
            if not readable:  # the end, with nothing written: no stream needed
                self._end_output(fd, output)
                return
            opened = self._open(fd, output)
            if opened is None:
                return
            stream = opened
        else:
            stream = output
        credit = stream.credit()
        if credit <= 0:
            if stream.broken:
                self._end_output(fd, stream)
            else:
                stream.when_writable(lambda: self._arm(fd))
            return
        if readable and stream.splices and fd not in self._read_only:
            count = min(_available(fd), credit, SPLICE_CHUNK)
            if count:  # else end of output, or nothing after all: the read says which
                try:
                    stream.splice_from(fd, count, lambda sent: self._spliced(fd, stream, sent))
                except (BrokenPipeError, ConnectionLost, ValueError):
                    self._end_output(fd, stream)
                return
        try:
            data = os.read(fd, min(credit, MAX_CHUNK))
        except BlockingIOError:
            self._arm(fd)
            return
        except OSError as e:
            log.debug("reading child pipe %d failed: %s", fd, e)
            data = b""
        try:
            if data:
                stream.write(data)
                self._arm(fd)
                return
            stream.close_write()
        except (BrokenPipeError, ConnectionLost, ValueError):
            pass
        self._end_output(fd, stream)

    def _spliced(self, fd: int, stream: Stream, sent: bool) -> None:
        if sent:
            self._arm(fd)
        else:  # the link is gone
            self._end_output(fd, stream)

    def _end_output(self, fd: int, output: Output) -> None:
        with self._lock:
            if self._outputs.pop(fd, None) is None:  # stop() got there first
                return
            self._read_only.discard(fd)
            self._epoll.unregister(fd)
        if isinstance(output, Stream):
            output.close()  # before the fd number can be reused: a callback it runs must not arm another pipe
        os.close(fd)
        self._ends += 1


def _available(fd: int) -> int:
    """How many bytes wait in pipe ``fd``."""
    value: int = _FIONREAD.unpack(fcntl.ioctl(fd, termios.FIONREAD, bytes(_FIONREAD.size)))[0]
    return value
