"""An in-memory transport pair: two routers in one process, for tests and teaching."""

from __future__ import annotations

import collections
import sys
import threading
from typing import Deque, Optional, Tuple

from ..runtime.waiting import Gate, wait_on
from .base import Transport

#: Bytes one direction holds before its writer must wait (a socket's buffers bound it the same way).
CAPACITY = 8 << 20


class _Pipe:
    """One direction: a byte queue of at most :data:`CAPACITY` bytes (one write of any size fits when empty)."""

    def __init__(self) -> None:
        self.chunks: Deque[bytes] = collections.deque()
        self.size = 0
        self.lock = threading.Lock()
        self.gate = Gate()  # readers waiting for bytes
        self.room = Gate()  # writers waiting for room
        self.closed = False


class LoopbackTransport(Transport):
    """One end of an in-memory byte pipe pair."""

    name = "loopback"
    atomic_write = sys.maxsize  # one append, or none

    def __init__(self, inbound: _Pipe, outbound: _Pipe) -> None:
        self._in = inbound
        self._out = outbound

    def read(self, size: int) -> Optional[bytes]:
        pipe = self._in
        with pipe.lock:
            if not pipe.chunks:
                return b"" if pipe.closed else None
            chunk = pipe.chunks.popleft()
            if len(chunk) > size:
                pipe.chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            pipe.size -= len(chunk)
            pipe.room.open()
            return chunk

    def wait_readable(self, timeout: Optional[float]) -> bool:
        pipe = self._in
        with pipe.lock:
            if pipe.chunks or pipe.closed:
                return True
            waiter = pipe.gate.enlist()
        wait_on(waiter, timeout)
        return bool(pipe.chunks) or pipe.closed

    def write(self, data: memoryview, block: bool) -> int:
        """All of ``data`` or, when the queue is full, nothing (``block``: wait for room)."""
        pipe = self._out
        while True:
            with pipe.lock:
                if pipe.closed:
                    raise BrokenPipeError("loopback peer is closed")
                if not pipe.size or pipe.size + len(data) <= CAPACITY:
                    pipe.gate.open()  # first: an interrupt may lose the bytes, never strand them unseen
                    pipe.chunks.append(bytes(data))
                    pipe.size += len(data)
                    return len(data)
                if not block:
                    return 0
                waiter = pipe.room.enlist()
            wait_on(waiter)

    def close(self) -> None:
        """Close both directions; what was sent here and not read is dropped, as a socket's close drops it."""
        for pipe in (self._in, self._out):
            with pipe.lock:
                pipe.closed = True
                pipe.gate.open()
                pipe.room.open()
        with self._in.lock:
            self._in.chunks.clear()
            self._in.size = 0


def pair() -> Tuple[LoopbackTransport, LoopbackTransport]:
    """Two connected transports: what one writes, the other reads."""
    a_to_b, b_to_a = _Pipe(), _Pipe()
    return LoopbackTransport(b_to_a, a_to_b), LoopbackTransport(a_to_b, b_to_a)
