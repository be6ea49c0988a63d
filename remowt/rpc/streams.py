"""Byte streams multiplexed over links, with credit-based flow control.

Each stream has a window: the sender may have at most that many bytes that
the receiver has not yet consumed. The receiver returns credit as its reader
takes bytes, so a slow reader holds at most one window in memory and never
blocks the link it shares with other streams and calls.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Tuple, Union

from ..errors import ConnectionLost, ProtocolError
from ..protocol import wire
from ..runtime.deadline import Deadline
from ..runtime.waiting import Gate, wait_on
from .link import Spliced

if TYPE_CHECKING:
    from .router import PeerBudget, Router

DEFAULT_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 16 * 1024 * 1024  # the most a peer may ask a stream's receiver to hold
MAX_CHUNK = 256 * 1024
StreamKey = Tuple[str, int]
Buffer = Union[bytes, bytearray, memoryview]
Chunk = Union[bytes, memoryview]


def as_bytes(chunk: Chunk) -> bytes:
    """``chunk`` as bytes: not copied when it is bytes, or a view of all of a bytes object."""
    if isinstance(chunk, bytes):
        return chunk
    whole = chunk.obj
    if type(whole) is bytes and chunk.contiguous and chunk.nbytes == len(whole):
        return whole
    return bytes(chunk)


class Stream:
    """One end of a bidirectional byte stream between two router addresses."""

    def __init__(self, router: Router, peer: str, opener: str, sid: int, window: int, one_way: bool = False) -> None:
        self.router = router
        self.peer = peer
        self.key: StreamKey = (opener, sid)
        self.sid = sid
        self.window = window
        self._from_opener = opener == router.address
        # A stream the peer opened is accepted once local code asks for it (Router.accept_stream); until then
        # what arrives on it is charged to the budget of the link it came over (see Router.hold_unaccepted).
        self.accepted = self._from_opener
        self.charged = 0
        self.budget: Optional[PeerBudget] = None
        self._lock = threading.Lock()
        self._gate = Gate()  # readers and writers waiting for data, credit or the end
        self._chunks: Deque[Chunk] = collections.deque()
        self._buffered = 0
        self._unacked = 0
        self._remote_eof = one_way  # a one-way stream's opener only writes: the peer never will
        self._credit = window
        self._sent_eof = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self._listener: Optional[Callable[[Chunk], None]] = None
        self._listener_ended = False
        self._on_writable: Optional[Callable[[], None]] = None

    def __repr__(self) -> str:
        return f"<Stream {self.key[0]}#{self.sid} with {self.peer}>"

    @functools.cached_property
    def _framer(self) -> wire.DataFramer:
        return wire.DataFramer(self.router.address, self.peer, self.sid, self._from_opener)

    # --- reading -------------------------------------------------------

    def read(self, size: int = -1, timeout: Optional[float] = None) -> bytes:
        """Up to ``size`` bytes as soon as any are there (all until EOF if ``size < 0``).

        Returns ``b""`` at end of stream; raises ``ConnectionLost`` if the link
        died and ``TimeoutError`` if ``timeout`` passed with nothing to return.
        """
        if size < 0:
            return self.readall(timeout)
        return as_bytes(self.read_chunk(size, timeout))

    def read_chunk(self, size: int, timeout: Optional[float] = None) -> Chunk:
        """What :meth:`read` returns for ``size`` >= 0, but as it arrived: maybe a memoryview of its frame."""
        if size == 0:
            return b""
        deadline: Optional[Deadline] = None  # made only when there is something to wait for
        while True:
            with self._lock:
                if self._chunks:
                    chunk = self._chunks.popleft()
                    if len(chunk) > size:
                        rest = memoryview(chunk)
                        self._chunks.appendleft(rest[size:])
                        chunk = rest[:size]
                    self._buffered -= len(chunk)
                    credit = self._consumed(len(chunk))
                    break
                if self._remote_eof or self._closed:
                    return b""
                if self._error is not None:
                    raise self._error
                waiter = self._gate.enlist()
            if deadline is None:
                deadline = Deadline(timeout, "reading a remowt stream")
            wait_on(waiter, deadline.remaining())
        if credit:
            self._send(wire.Credit(self.router.address, self.peer, self.sid, self._from_opener, credit))
        return chunk

    def _readable(self) -> bool:
        return bool(self._chunks) or self._remote_eof or self._closed or self._error is not None

    def readall(self, timeout: Optional[float] = None) -> bytes:
        """Everything until end of stream."""
        deadline = Deadline(timeout, "reading a remowt stream")
        parts: List[Chunk] = []
        while True:
            chunk = self.read_chunk(MAX_CHUNK * 4, deadline.remaining())
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def readinto(self, buffer: memoryview, timeout: Optional[float] = None) -> int:
        """Fill a prefix of ``buffer``; return how many bytes (0 at end of stream)."""
        chunk = self.read_chunk(len(buffer), timeout)
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def _consumed(self, n: int) -> int:
        self._unacked += n
        if self._unacked >= self.window // 4 and not self._remote_eof:
            credit, self._unacked = self._unacked, 0
            return credit
        return 0

    @property
    def at_eof(self) -> bool:
        """True once the peer's EOF arrived and every byte was read."""
        with self._lock:
            return not self._chunks and (self._remote_eof or self._closed)

    # --- writing -------------------------------------------------------

    def write(self, data: Buffer, timeout: Optional[float] = None) -> int:
        """Send all of ``data``, waiting for credit; ``BrokenPipeError`` if the peer reset."""
        view = memoryview(data).cast("B")
        deadline: Optional[Deadline] = None  # made only when there is something to wait for
        total = len(view)
        while len(view):
            with self._lock:
                if self._error is not None:
                    raise self._error
                if self._closed or self._sent_eof:
                    raise ValueError("write to a closed remowt stream")
                n = min(self._credit, len(view), MAX_CHUNK)
                self._credit -= n
                if not n:
                    waiter = self._gate.enlist()
            if not n:
                if deadline is None:
                    deadline = Deadline(timeout, "writing to a remowt stream")
                wait_on(waiter, deadline.remaining())
                continue
            # the link sends the payload later, uncopied: only bytes are sure not to change meanwhile
            payload = view[:n] if isinstance(data, bytes) else bytes(view[:n])
            self.router.send_routed(self.peer, self._framer.header(n), payload)
            view = view[n:]
        return total

    @property
    def splices(self) -> bool:
        """Whether :meth:`splice_from` can send on this stream (the link towards the peer splices)."""
        return self.router.splices_to(self.peer)

    def splice_from(self, fd: int, count: int, on_sent: Callable[[bool], None]) -> None:
        """Send ``count`` bytes waiting in pipe ``fd``, moved by the kernel without passing through Python.

        Only where :attr:`splices`, and within :meth:`credit`.
        ``on_sent(ok)`` runs once the bytes left the pipe (``ok``) or never will.
        """
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._closed or self._sent_eof:
                raise ValueError("write to a closed remowt stream")
            if count > self._credit:
                raise ValueError(f"splicing {count} bytes into {self!r} exceeds its credit of {self._credit}")
            self._credit -= count
        if not self.router.send_routed(self.peer, self._framer.header(count), Spliced(fd, count, on_sent)):
            on_sent(False)

    def close_write(self) -> None:
        """Send end of stream; the peer reads ``b""`` after the bytes already sent."""
        with self._lock:
            if self._sent_eof or self._error is not None or self._closed:
                return
            self._sent_eof = True
        self._send(wire.Eof(self.router.address, self.peer, self.sid, self._from_opener))

    def receive_only(self) -> None:
        """End this side's direction without telling the peer, who opened the stream one-way."""
        with self._lock:
            self._sent_eof = True

    def close(self) -> None:
        """Abandon the stream: the peer's writes fail with ``BrokenPipeError``."""
        with self._lock:
            if self._closed:
                return
            finished = self._sent_eof and self._remote_eof
            quiet = self._error is not None
            self._closed = True
            self._chunks.clear()
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()
        self.router.forget_stream(self)
        if not finished and not quiet:
            self._send(wire.Reset(self.router.address, self.peer, self.sid, self._from_opener, "closed"))

    @property
    def ended(self) -> bool:
        """True once nothing more will arrive: EOF, reset, lost, or closed here."""
        return self._remote_eof or self._error is not None or self._closed

    @property
    def broken(self) -> bool:
        """True once the stream failed or was closed on this side."""
        return self._error is not None or self._closed

    @property
    def error(self) -> Optional[BaseException]:
        """Why the stream failed: ``ConnectionLost``, or ``BrokenPipeError`` when the peer reset it; else None."""
        return self._error

    def credit(self) -> int:
        """How many bytes :meth:`write` can send now without waiting (0 once failed or closed)."""
        with self._lock:
            if self._error is not None or self._closed or self._sent_eof:
                return 0
            return self._credit

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, as soon as there is credit or the stream has failed or closed."""
        with self._lock:
            ready = self._credit > 0 or self._error is not None or self._closed
            if not ready:
                self._on_writable = callback
        if ready:
            callback()

    def _take_writable_callback(self) -> Optional[Callable[[], None]]:
        callback, self._on_writable = self._on_writable, None
        return callback

    # --- push mode --------------------------------------------------------

    def deliver_to(self, listener: Callable[[Chunk], None]) -> None:
        """Hand every received chunk to ``listener`` instead of buffering it for :meth:`read`.

        ``listener`` runs on whichever thread reads the link, so it must not
        block; it gets ``b""`` once at the end (EOF, reset or lost link). The
        bytes count against the window until the consumer calls :meth:`ack`.
        """
        with self._lock:
            self._listener = listener
            pending = list(self._chunks)
            self._chunks.clear()
        for chunk in pending:
            listener(chunk)
        self._maybe_end_listener()

    def ack(self, amount: int) -> None:
        """Push mode: the consumer is done with ``amount`` delivered bytes; return the credit."""
        with self._lock:
            self._buffered -= amount
            credit = self._consumed(amount)
        if credit:
            self._send(wire.Credit(self.router.address, self.peer, self.sid, self._from_opener, credit))

    def _maybe_end_listener(self) -> None:
        with self._lock:
            listener = self._listener
            if listener is None or self._listener_ended or self._chunks:
                return
            if not (self._remote_eof or self._error is not None or self._closed):
                return
            self._listener_ended = True
        listener(b"")

    def _send(self, message: wire.StreamMessage) -> None:
        self.router.send_routed(message.dst, wire.encode(message))

    # --- events from the router (reader thread) -------------------------

    def on_data(self, data: Chunk) -> None:
        if not self.accepted and not self.router.hold_unaccepted(self, len(data)):
            return
        if isinstance(data, memoryview) and memoryview(data.obj).nbytes > 2 * data.nbytes:
            data = bytes(data)  # a view must not keep a much bigger buffer alive
        with self._lock:
            if self._closed:
                return
            if self._buffered + self._unacked + len(data) > self.window:
                raise ProtocolError(f"{self.peer} overran the window of {self!r}")
            self._buffered += len(data)
            listener = self._listener
            if listener is None:
                self._chunks.append(data)
                self._gate.open()
        if listener is not None:
            listener(data)

    def on_eof(self) -> None:
        with self._lock:
            self._remote_eof = True
            self._gate.open()
        self._maybe_end_listener()

    def on_credit(self, amount: int) -> None:
        with self._lock:
            if self._credit + amount > self.window:
                raise ProtocolError(f"{self.peer} returned credit beyond the window of {self!r}")
            self._credit += amount
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()

    def on_reset(self, reason: str) -> None:
        with self._lock:
            self._remote_eof = True
        self.fail(BrokenPipeError(f"remote end of {self!r} was closed ({reason})"))

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()
        self._maybe_end_listener()

    def abort(self, error: ProtocolError) -> None:
        """The peer broke the protocol on this stream: fail it here, reset it there."""
        self.fail(error)
        self._send(wire.Reset(self.router.address, self.peer, self.sid, self._from_opener, str(error)))

    def lost(self) -> None:
        self.fail(ConnectionLost(f"connection to {self.peer} lost"))

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._buffered
