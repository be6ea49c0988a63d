"""File objects and fd pumps over streams: what Popen's stdio is made of.

``PIPE`` becomes a raw file object over the stream (wrapped in the usual
buffered and text layers); an inherited or given fd is copied to or from the
stream, as the child would have read or written it directly if it were
local: input by a :class:`FdToStream` thread, output by the connection's
:class:`FdWriter` for that fd.
"""

from __future__ import annotations

import collections
import io
import os
import select
import stat
import threading
from typing import Deque, Optional, Set, Tuple

from .errors import ConnectionLost
from .streams import MAX_CHUNK, Stream


class StreamReader(io.RawIOBase):
    """A readable raw file over the receiving side of a stream."""

    def __init__(self, stream: Stream, name: str) -> None:
        super().__init__()
        self.stream = stream
        self.name = name
        self.touched = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        self.touched = True
        view = memoryview(buffer).cast("B")
        data = self.stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read1(self, size: int = -1) -> bytes:
        """At most ``size`` bytes as soon as any are there."""
        self.touched = True
        return self.stream.read(MAX_CHUNK if size < 0 else size)

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
        super().close()


class StreamWriter(io.RawIOBase):
    """A writable raw file over the sending side of a stream; closing it sends EOF."""

    def __init__(self, stream: Stream, name: str) -> None:
        super().__init__()
        self.stream = stream
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        return self.stream.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.stream.close_write()
            finally:
                self.stream.close()
        super().close()


def is_devnull(fd: int) -> bool:
    """True if ``fd`` is /dev/null, so inheriting it needs no pump."""
    try:
        mine, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(mine.st_mode) and mine.st_rdev == null.st_rdev


class FdToStream:
    """Copies a local fd into a stream until EOF, or until stopped."""

    def __init__(self, fd: int, stream: Stream) -> None:
        self.fd = fd
        self.stream = stream
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"remowt-fd{fd}-in", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while all(fd != self._wake_r for fd, _ in poller.poll()):
                data = os.read(self.fd, MAX_CHUNK)
                if not data:
                    self.stream.close_write()
                    break
                self.stream.write(data)
        except (OSError, ConnectionLost, ValueError):
            pass
        finally:
            self.stream.close()

    def stop(self) -> None:
        """Stop copying (the child exited): what was not read stays in the fd."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_w)
        os.close(self._wake_r)
        self._wake_w = self._wake_r = -1


class FdSink:
    """One stream's bytes on their way to a local fd; ``done`` is set when all were written."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.done = threading.Event()

    def finish(self) -> None:
        self.stream.close()
        self.done.set()


class FdWriter:
    """Writes pushed stream chunks to one local fd, in order, on a thread of its own.

    Chunks arrive on the thread that reads the link, which must not block,
    so they are queued here; the bytes count against their stream's window
    until written. The thread lingers a while for more work, then ends; a
    stream that ends with nothing to write never needs it.
    """

    LINGER = 2.0

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._queue: Deque[Tuple[FdSink, bytes]] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def attach(self, stream: Stream) -> FdSink:
        """Send everything ``stream`` receives to this fd."""
        sink = FdSink(stream)
        stream.deliver_to(lambda data: self._push(sink, data))
        return sink

    def _push(self, sink: FdSink, data: bytes) -> None:
        with self._cond:
            if data or self._queue or self._thread is not None:
                self._queue.append((sink, data))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"remowt-fd{self.fd}", daemon=True)
                    self._thread.start()
                self._cond.notify()
                return
        sink.finish()

    def _run(self) -> None:
        broken: Set[FdSink] = set()
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait_for(lambda: bool(self._queue) or self._closed, self.LINGER)
                if not self._queue:
                    self._thread = None
                    return
                sink, data = self._queue.popleft()
            if not data:
                broken.discard(sink)
                sink.finish()
                continue
            if sink not in broken:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.fd, view) :]
                except OSError:
                    broken.add(sink)
                    sink.stream.close()
                    continue
                sink.stream.ack(len(data))

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join()
