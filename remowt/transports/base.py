"""The transport interface: a bidirectional byte stream, nothing more."""

from __future__ import annotations

import abc


class Transport(abc.ABC):
    """Moves bytes to and from the peer. Framing and meaning live above it.

    ``read`` is called from one reader thread only; ``write`` from one writer
    at a time (the link serialises them). ``close`` may be called from any
    thread, any number of times, and must make a blocked ``read`` return.
    """

    name: str = "transport"

    @abc.abstractmethod
    def read(self, size: int) -> bytes:
        """Block until some bytes arrive; return at most ``size``; ``b""`` at end."""

    @abc.abstractmethod
    def write(self, data: memoryview, block: bool) -> int:
        """Write a prefix of ``data``; return its length.

        With ``block=False`` never wait: return 0 when nothing can be written
        now. With ``block=True`` write at least one byte or raise ``OSError``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the transport; the peer sees end of stream."""
