"""File objects and fd pumps over streams: what Popen's stdio is made of.

``PIPE`` becomes a raw file object over the stream (wrapped in the usual
buffered and text layers); an inherited or given fd becomes a pump thread
that copies between that fd and the stream, as the child would have read or
written it directly if it were local.
"""

from __future__ import annotations

import io
import os
import select
import stat
import threading
from typing import Optional

from .errors import ConnectionLost
from .streams import MAX_CHUNK, Stream


class StreamReader(io.RawIOBase):
    """A readable raw file over the receiving side of a stream."""

    def __init__(self, stream: Stream, name: str) -> None:
        super().__init__()
        self.stream = stream
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read1(self, size: int = -1) -> bytes:
        """At most ``size`` bytes as soon as any are there."""
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
            os.close(self._wake_r)

    def stop(self) -> None:
        """Stop copying (the child exited): what was not read stays in the fd."""
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
            os.close(self._wake_w)
            self._wake_w = -1
        self._thread.join()


class StreamToFd:
    """Copies a stream into a local fd until EOF."""

    def __init__(self, stream: Stream, fd: int) -> None:
        self.stream = stream
        self.fd = fd
        self._thread = threading.Thread(target=self._run, name=f"remowt-fd{fd}-out", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.stream.read(MAX_CHUNK)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
        except (OSError, ConnectionLost):
            pass
        finally:
            self.stream.close()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until everything was copied; False if still copying after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
