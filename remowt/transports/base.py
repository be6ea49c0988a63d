"""The transport interface: a bidirectional byte stream, nothing more."""

from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence


class Transport(abc.ABC):
    """Moves bytes to and from the peer. Framing and meaning live above it.

    Reads never block: :meth:`wait_readable` is the one place to wait, and
    only the link's reader thread reads and waits. ``write`` is
    called by one writer at a time (the link serialises them). ``close`` may
    be called from any thread, any number of times, and wakes every waiter.
    """

    name: str = "transport"

    @abc.abstractmethod
    def read(self, size: int) -> Optional[bytes]:
        """At most ``size`` bytes that are there now; None if none yet; ``b""`` at end or after close."""

    @abc.abstractmethod
    def wait_readable(self, timeout: Optional[float]) -> bool:
        """Wait until :meth:`read` would not return None; False if ``timeout`` passed first."""

    def expect(self, count: int) -> None:
        """A hint: reading is worth waking for only once ``count`` bytes are there (or the stream ended).

        The link gives how much the frame it is gathering still lacks, so a
        transport that can count what it holds may let :meth:`wait_readable`
        sleep until then. Ignoring it is always correct.
        """
        return None

    def on_arrival(self, read_here: Callable[[], Optional[bool]]) -> None:
        """An offer: the thread that brings data in may call ``read_here()`` rather than wake the reader.

        For a transport that has a thread of its own receiving (paramiko's),
        this saves a thread switch per message. ``read_here`` reads and
        dispatches on the calling thread unless the reader thread is at it
        (then it returns None and the reader must be woken as usual); it
        returns False when the link ended, and then too the reader must be
        woken. Frames handled there may send: :meth:`write` without
        ``block`` from that thread must not wait. Ignoring the offer is
        always correct.
        """
        return None

    #: Whether a thread other than the reader may wait for data itself (:meth:`wait_for_caller`).
    callers_wait = False

    #: Where callers cannot wait for data themselves: how long one expecting a quick answer polls for it
    #: (yielding the CPU) before it sleeps, since waking a sleeping thread costs as much (0: it sleeps at once).
    caller_spin = 0.0

    def wait_for_caller(self, timeout: Optional[float], data: bool = True) -> Optional[bool]:
        """For a caller that reads for itself: wait until :meth:`read` may have data or :meth:`wake_caller`.

        True: there may be data; False: ``timeout`` passed or it was woken; None: the transport closed.
        Without ``data``, only :meth:`wake_caller` (or the close) ends the wait.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fd a caller can wait on")

    def wake_caller(self) -> None:
        """End the current (or the next) :meth:`wait_for_caller` with False."""
        raise NotImplementedError(f"{type(self).__name__} has no fd a caller can wait on")

    def nudge(self) -> None:
        """End the reader's current (or next) :meth:`wait_readable` now, so it looks again at what to do."""
        return None

    @abc.abstractmethod
    def write(self, data: memoryview, block: bool) -> int:
        """Write a prefix of ``data``; return its length.

        With ``block=False`` never wait: return 0 when nothing can be written
        now. With ``block=True`` write at least one byte or raise ``OSError``.
        """

    def writev(self, buffers: Sequence[memoryview], block: bool) -> int:
        """Write a prefix of the concatenated ``buffers`` (not empty), as :meth:`write` does."""
        return self.write(buffers[0], block)

    #: Writes of at most this many bytes are all or nothing (0: none is), so an interrupt cannot cut one.
    atomic_write = 0

    #: Whether reading less than is there costs no more than reading it all (so payloads can be read apart).
    small_reads = False

    #: Whether :meth:`splice_from` works on this transport.
    splices = False

    def splice_from(self, fd: int, count: int, block: bool) -> int:
        """Move up to ``count`` bytes, all waiting in pipe ``fd``, into the transport without copying them.

        Returns how many moved; waits (or not) as :meth:`write` does.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot splice")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the transport; the peer sees end of stream."""

    def stderr_tail(self) -> str:
        """The last lines the peer process wrote to stderr, for error messages ("" when there is none)."""
        return ""
