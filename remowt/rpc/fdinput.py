"""A stream copied into an fd (a child's stdin, a socket) by the thread that reads the link, where it arrives.

Each chunk that arrives is written to the fd without waiting, right where it
arrives: a key typed into a remote terminal reaches the program, and a
forwarded connection's bytes reach its socket, without another thread being
woken. What the fd does not take at once waits in a queue that a thread of
this input's own writes as the fd takes it, and its credit goes back to the
sender only once written, so a reader that stops reading stops its sender
as it would locally. An fd that no longer takes bytes (a child that closed
its stdin, a socket whose peer is gone) resets the stream (the sender gets
``BrokenPipeError``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import threading
from typing import Callable, Deque, Optional

from ..runtime.interrupts import start
from .streams import Chunk, Stream

log = logging.getLogger("remowt.fdinput")


class FdInput:
    """Copies ``stream`` into ``fd`` (ours, closed at the end); ``on_thread`` is told of each waiting thread started.

    ``on_end`` runs once at the end, before ``fd`` is closed (a socket shuts its write side there).
    ``write`` writes without waiting (raising ``BlockingIOError`` when ``fd`` is full); without it,
    ``fd`` is made non-blocking and written with ``os.write``.
    """

    def __init__(
        self,
        stream: Stream,
        fd: int,
        name: str,
        on_thread: Callable[[threading.Thread], None],
        on_end: Optional[Callable[[], None]] = None,
        write: Optional[Callable[[memoryview], int]] = None,
    ) -> None:
        self._stream = stream
        self._fd = fd
        self._name = name
        self._on_thread = on_thread
        self._on_end = on_end
        self._lock = threading.Lock()
        self._queue: Deque[memoryview] = collections.deque()
        self._waiting = False  # a thread writes the queue: arrivals join it
        self._ended = False  # the stream ended: close once the queue is written
        self._closed = False
        if write is None:
            os.set_blocking(fd, False)
        self._write_now = write or functools.partial(os.write, fd)
        stream.close_write()
        stream.deliver_to(self._arrived)

    def _arrived(self, chunk: Chunk) -> None:
        """A chunk (``b""``: the end) from the link's reader thread: write it now, or queue it; never wait."""
        view = memoryview(chunk)
        with self._lock:
            if self._closed:
                return
            if not view:
                self._ended = True
            if self._waiting:
                if view:
                    self._queue.append(view)
                return
        if not view:
            self._close()
            return
        written = self._write(view)
        if written is None:
            return
        if written < len(view):
            with self._lock:
                self._queue.append(view[written:])
                self._waiting = True
            thread = threading.Thread(target=self._write_queue, name=f"remowt-{self._name}", daemon=True)
            self._on_thread(thread)
            start(thread)

    def _write(self, view: memoryview) -> Optional[int]:
        """Write what ``fd`` takes now and return the credit; None when it no longer takes bytes (all closed)."""
        try:
            written = self._write_now(view)
        except BlockingIOError:
            return 0
        except OSError as e:  # EPIPE: a closed stdin or a peer gone; EIO: a terminal gone
            log.debug("%s: no longer read (%s)", self._name, e)
            self._close()
            return None
        self._stream.ack(written)
        return written

    def _write_queue(self) -> None:
        """The waiting thread: write the queue as the fd takes it, until it is empty (or the fd fails)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._queue:
                    self._waiting = False
                    ended = self._ended
                    break
                view = self._queue.popleft()
            while view:
                poller.poll()
                written = self._write(view)
                if written is None:
                    return
                view = view[written:]
        if ended:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
        if self._on_end is not None:
            self._on_end()
        os.close(self._fd)
        self._stream.close()
