"""One thread for the agent's children: exits through pidfds, output pipes into streams.

Reading a child's stdout or stderr needs no thread of its own: the loop reads
a pipe only while its stream has credit, parks it when the credit runs out,
and takes it back when the reader returns credit. A child that writes
faster than its reader reads waits in its own pipe, as it would locally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from typing import Callable, Dict, List, Optional, Protocol

from ..errors import ConnectionLost
from ..streams import MAX_CHUNK, Stream

log = logging.getLogger("remowt.childio")


class Child(Protocol):
    """What the loop needs of a child: its pid, and a way to reap it without blocking."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> Optional[int]: ...

    def wait(self) -> int: ...


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
        self._outputs: Dict[int, Stream] = {}
        self._fallback: List[threading.Thread] = []
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    # --- from any thread ---------------------------------------------------

    def watch_exit(self, child: Child) -> None:
        """Report ``child``'s exit to ``on_exit`` (from the loop thread)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            fd = pidfd_open(child.pid) if pidfd_open is not None else -1
        except OSError:
            fd = -1
        if fd < 0:
            thread = threading.Thread(target=self._wait_one, args=(child,), name="remowt-wait", daemon=True)
            self._fallback.append(thread)
            thread.start()
            return
        with self._lock:
            self._exits[fd] = child
            self._epoll.register(fd, select.EPOLLIN)
            self._ensure_thread()

    def pump(self, fd: int, stream: Stream) -> None:
        """Copy pipe ``fd`` into ``stream`` until EOF; the loop owns and closes ``fd``."""
        os.set_blocking(fd, False)
        with self._lock:
            self._outputs[fd] = stream
            self._epoll.register(fd, select.EPOLLIN)
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
            for fd in self._exits:
                os.close(fd)
            for fd, stream in self._outputs.items():
                os.close(fd)
                stream.close()
            self._exits.clear()
            self._outputs.clear()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="remowt-childio", daemon=True)
            self._thread.start()

    def _wait_one(self, child: Child) -> None:
        child.wait()
        self._on_exit(child)

    def _resume(self, fd: int) -> None:
        with self._lock:
            if fd in self._outputs and not self._stopped:
                self._epoll.register(fd, select.EPOLLIN)

    # --- the loop thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                if fd == self._wake_r:
                    return
                with self._lock:
                    child = self._exits.get(fd)
                    stream = self._outputs.get(fd)
                if child is not None:
                    self._reap(fd, child)
                elif stream is not None:
                    self._pump_once(fd, stream)

    def _reap(self, fd: int, child: Child) -> None:
        if child.poll() is None:
            return
        with self._lock:
            del self._exits[fd]
            self._epoll.unregister(fd)
        os.close(fd)
        self._on_exit(child)

    def _pump_once(self, fd: int, stream: Stream) -> None:
        credit = stream.credit()
        if credit <= 0:
            if stream.broken:
                self._end_output(fd, stream)
            else:
                with self._lock:
                    self._epoll.unregister(fd)
                stream.when_writable(lambda: self._resume(fd))
            return
        try:
            data = os.read(fd, min(credit, MAX_CHUNK))
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("reading child pipe %d failed: %s", fd, e)
            data = b""
        try:
            if data:
                stream.write(data)
                return
            stream.close_write()
        except (BrokenPipeError, ConnectionLost, ValueError):
            pass
        self._end_output(fd, stream)

    def _end_output(self, fd: int, stream: Stream) -> None:
        with self._lock:
            del self._outputs[fd]
            with contextlib.suppress(FileNotFoundError):
                self._epoll.unregister(fd)
        os.close(fd)
        stream.close()
