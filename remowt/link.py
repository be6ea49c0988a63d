"""A link: frames over one transport, with one reader thread and a writer backlog.

Senders write straight to the transport when nothing is queued and the
transport takes the bytes without waiting; whatever it cannot take at once
goes to a backlog that a writer thread drains. So no sender, and in
particular no reader thread, ever blocks on a slow peer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Optional, Union

from . import wire
from .errors import ProtocolError
from .transports.base import Transport

log = logging.getLogger("remowt.link")
READ_SIZE = 1024 * 1024
SERVE_GRACE = 0.005

Buffer = Union[bytes, bytearray, memoryview]


class Link:
    """Frames in and out of a transport. ``on_frame`` and ``on_close`` run on the reader thread."""

    def __init__(
        self,
        transport: Transport,
        on_frame: Callable[[Link, wire.Body], None],
        on_close: Callable[[Link, Optional[BaseException]], None],
        *,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        name: str = "link",
    ) -> None:
        self.transport = transport
        self.name = name
        self.peer: Optional[str] = None
        self.peer_max_frame = wire.DEFAULT_MAX_FRAME
        self._on_frame = on_frame
        self._on_close = on_close
        self._frames = wire.FrameReader(max_frame)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._backlog: List[memoryview] = []
        self._writer_busy = False
        self._closed = False
        self._eof = False
        self._read_turn = threading.Lock()
        self._servers_lock = threading.Lock()
        self._no_servers = threading.Condition(self._servers_lock)
        self._grace = threading.Condition(self._servers_lock)
        self._servers = 0
        self._served_since_aside = False
        self.close_reason: Optional[BaseException] = None
        self._reader = threading.Thread(target=self._read_loop, name=f"remowt-read-{name}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"remowt-write-{name}", daemon=True)

    def start(self) -> None:
        """Start the reader and writer threads."""
        self._writer.start()
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, frame: Buffer) -> None:
        """Queue one encoded frame; never waits for the peer."""
        view = memoryview(frame)
        with self._lock:
            if self._closed:
                return
            if self._backlog or self._writer_busy:
                self._backlog.append(view)
                return
            try:
                written = self.transport.write(view, block=False)
            except OSError as e:
                self._fail_locked(e)
            else:
                if written < len(view):
                    self._backlog.append(view[written:])
                    self._wakeup.notify()
                return
        self.transport.close()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._backlog and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
                chunks, self._backlog = self._backlog, []
                self._writer_busy = True
            try:
                for chunk in chunks:
                    while len(chunk):
                        chunk = chunk[self.transport.write(chunk, block=True) :]
            except OSError as e:
                with self._lock:
                    self._writer_busy = False
                    self._fail_locked(e)
                self.transport.close()
                return
            with self._lock:
                self._writer_busy = False

    def _fail_locked(self, error: BaseException) -> None:
        if self.close_reason is None:
            self.close_reason = error
        self._closed = True
        self._wakeup.notify_all()

    def _read_loop(self) -> None:
        while True:
            self._stand_aside()
            self.transport.wait_readable(None)
            with self._read_turn:
                if not self._read_available():
                    break
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        self.transport.close()
        self._on_close(self, self.close_reason)

    def _read_available(self) -> bool:
        """Read and dispatch what is there now (read turn held); False once the link is done."""
        if self._eof:
            return False
        try:
            while True:
                data = self.transport.read(READ_SIZE)
                if data is None:
                    return True
                if not data:
                    break
                for body in self._frames.feed(data):
                    self._on_frame(self, body)
        except ProtocolError as e:
            log.warning("closing %s: %s", self.name, e)
            self._set_reason(e)
        except Exception as e:  # a bug in a handler must not leave the link half-alive
            log.exception("closing %s after an unexpected error", self.name)
            self._set_reason(e)
        self._eof = True
        self.transport.close()
        return False

    def _stand_aside(self) -> None:
        """Let callers that read for themselves do so without this thread waking too.

        While a caller serves the link, this thread does not wait on the
        transport (two threads waking for one answer cost a GIL hand-off). It
        resumes once no caller has served for a short grace period, so
        callers in a loop keep the link to themselves; what arrives with no
        caller waiting is read at most ``SERVE_GRACE`` seconds late.
        """
        with self._servers_lock:
            while not self._closed:
                while self._servers and not self._closed:
                    self._no_servers.wait()
                if not self._served_since_aside:
                    return
                self._served_since_aside = False
                self._grace.wait(SERVE_GRACE)

    def _set_reason(self, error: BaseException) -> None:
        with self._lock:
            if self.close_reason is None:
                self.close_reason = error

    def serve_until(self, done: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Read on the calling thread until ``done()``, if no one else is reading.

        A caller waiting for its reply reads it itself instead of waiting for
        the reader thread to hand it over: one thread switch less per call.
        Returns False when it could not take the read turn or the link ended,
        so the caller falls back to waiting; raises TimeoutError on timeout.
        """
        if not self._read_turn.acquire(blocking=False):
            return False
        with self._servers_lock:
            self._servers += 1
            self._served_since_aside = True
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("timed out")
                if not self.transport.wait_readable(left):
                    continue
                if not self._read_available():
                    return False
            return True
        finally:
            with self._servers_lock:
                self._servers -= 1
                if not self._servers:
                    self._no_servers.notify()
            self._read_turn.release()

    def wake_servers(self) -> None:
        """Make threads serving the link re-check what they wait for (it changed off the link)."""
        with self._servers_lock:
            serving = self._servers > 0
        if serving:
            self.transport.interrupt()

    def close(self) -> None:
        """Close the transport; the reader thread then reports the close."""
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        with self._servers_lock:
            self._no_servers.notify_all()
            self._grace.notify_all()
        self.transport.close()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for both threads to finish."""
        for thread in (self._reader, self._writer):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)
