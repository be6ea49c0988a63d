"""An in-memory transport pair: two routers in one process, for tests and teaching."""

from __future__ import annotations

import collections
import threading
from typing import Deque, Optional, Tuple

from .base import Transport


class _Pipe:
    """One direction: an unbounded byte queue with a closed flag."""

    def __init__(self) -> None:
        self.chunks: Deque[bytes] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False


class LoopbackTransport(Transport):
    """One end of an in-memory byte pipe pair."""

    name = "loopback"

    def __init__(self, inbound: _Pipe, outbound: _Pipe) -> None:
        self._in = inbound
        self._out = outbound

    def read(self, size: int) -> Optional[bytes]:
        pipe = self._in
        with pipe.cond:
            if not pipe.chunks:
                return b"" if pipe.closed else None
            chunk = pipe.chunks.popleft()
            if len(chunk) > size:
                pipe.chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            return chunk

    def wait_readable(self, timeout: Optional[float]) -> bool:
        pipe = self._in
        with pipe.cond:
            return pipe.cond.wait_for(lambda: bool(pipe.chunks) or pipe.closed, timeout)

    def write(self, data: memoryview, block: bool) -> int:
        pipe = self._out
        with pipe.cond:
            if pipe.closed:
                raise BrokenPipeError("loopback peer is closed")
            pipe.chunks.append(bytes(data))
            pipe.cond.notify_all()
        return len(data)

    def close(self) -> None:
        for pipe in (self._in, self._out):
            with pipe.cond:
                pipe.closed = True
                pipe.cond.notify_all()


def pair() -> Tuple[LoopbackTransport, LoopbackTransport]:
    """Two connected transports: what one writes, the other reads."""
    a_to_b, b_to_a = _Pipe(), _Pipe()
    return LoopbackTransport(b_to_a, a_to_b), LoopbackTransport(a_to_b, b_to_a)
