"""Byte streams multiplexed over links, with credit-based flow control.

Each stream has a window: the sender may have at most that many bytes that
the receiver has not yet consumed. The receiver returns credit as its reader
takes bytes, so a slow reader holds at most one window in memory and never
blocks the link it shares with other streams and calls.

What to do on each event is decided by :class:`~remowt.protocol.streamstate.StreamState`;
a :class:`Stream` guards it with a lock, lets readers and writers wait, and sends.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, List, Optional, Protocol, Union

from ..errors import ConnectionLost, ProtocolError
from ..protocol import wire
from ..protocol.budget import PeerBudget
from ..protocol.streamstate import DEFAULT_WINDOW, MAX_CHUNK, Chunk, StreamKey, StreamState
from ..runtime.deadline import Deadline
from ..runtime.waiting import Gate
from .link import Part, Spliced

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_CHUNK",
    "Buffer",
    "Chunk",
    "Stream",
    "StreamKey",
    "StreamRouter",
    "as_bytes",
]

Buffer = Union[bytes, bytearray, memoryview]


def as_bytes(chunk: Chunk) -> bytes:
    """``chunk`` as bytes: not copied when it is bytes, or a view of all of a bytes object."""
    if isinstance(chunk, bytes):
        return chunk
    whole = chunk.obj
    if type(whole) is bytes and chunk.contiguous and chunk.nbytes == len(whole):
        return whole
    return bytes(chunk)


class StreamRouter(Protocol):
    """What a stream needs from the router it belongs to (:class:`remowt.rpc.router.Router` is one)."""

    @property
    def address(self) -> str:
        """The router's own address."""

    def send_routed(self, dst: str, *parts: Part) -> bool:
        """Send a frame towards ``dst``; False if there is no route."""

    def wait_for(self, dst: str, waiter: threading.Lock, timeout: Optional[float] = None) -> bool:
        """Wait until ``waiter`` is released by what comes from ``dst``; False on ``timeout``."""

    def splices_to(self, dst: str) -> bool:
        """Whether frames towards ``dst`` may carry :class:`~remowt.rpc.link.Spliced` parts."""

    def forget_stream(self, stream: Stream) -> None:
        """The stream is closed here: nothing more is routed to it."""

    def hold_unaccepted(self, stream: Stream, size: int) -> bool:
        """Charge bytes that arrived before anyone accepted ``stream``; False when it was refused for them."""


class Stream:
    """One end of a bidirectional byte stream between two router addresses."""

    def __init__(
        self, router: StreamRouter, peer: str, opener: str, sid: int, window: int, one_way: bool = False
    ) -> None:
        self.router = router
        self.peer = peer
        self.key: StreamKey = (opener, sid)
        self.sid = sid
        self._state = StreamState(router.address, peer, opener, sid, window, one_way)
        # A stream the peer opened is accepted once local code asks for it (Router.accept_stream); until then
        # what arrives on it is charged to the budget of the link it came over (see Router.hold_unaccepted).
        self.accepted = self._state.from_opener
        self.charged = 0
        self.budget: Optional[PeerBudget] = None
        self._lock = threading.Lock()
        self._gate = Gate()  # readers and writers waiting for data, credit or the end
        self._listener: Optional[Callable[[Chunk], None]] = None
        self._on_writable: Optional[Callable[[], None]] = None

    def __repr__(self) -> str:
        return self._state.name

    @property
    def window(self) -> int:
        """The most bytes either side may have in flight that the other has not consumed."""
        return self._state.window

    @functools.cached_property
    def _framer(self) -> wire.DataFramer:
        state = self._state
        return wire.DataFramer(state.own, state.peer, state.sid, state.from_opener)

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
        state = self._state
        deadline: Optional[Deadline] = None  # made only when there is something to wait for
        while True:
            with self._lock:
                chunk = state.take(size)
                if chunk is not None:
                    credit = state.consumed(len(chunk))
                    break
                waiter = self._gate.enlist()
            if deadline is None:
                deadline = Deadline(timeout, "reading a remowt stream")
            self.router.wait_for(self.peer, waiter, deadline.remaining())
        if credit is not None:
            self._send(credit)
        return chunk

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

    @property
    def at_eof(self) -> bool:
        """True once the peer's EOF arrived and every byte was read."""
        with self._lock:
            return self._state.at_eof

    # --- writing -------------------------------------------------------

    def write(self, data: Buffer, timeout: Optional[float] = None) -> int:
        """Send all of ``data``, waiting for credit; ``BrokenPipeError`` if the peer reset."""
        view = memoryview(data).cast("B")
        state = self._state
        deadline: Optional[Deadline] = None  # made only when there is something to wait for
        total = len(view)
        while len(view):
            with self._lock:
                n = state.sendable(len(view))
                if not n:
                    waiter = self._gate.enlist()
            if not n:
                if deadline is None:
                    deadline = Deadline(timeout, "writing to a remowt stream")
                self.router.wait_for(self.peer, waiter, deadline.remaining())
                continue
            # the link sends the payload later, uncopied: only bytes are sure not to change meanwhile
            payload = view[:n] if isinstance(data, bytes) else bytes(view[:n])
            self.router.send_routed(self.peer, self._framer.header(n), payload)
            view = view[n:]
        return total

    def wait_credit(self, timeout: Optional[float] = None) -> int:
        """Wait until some credit is there and return how much (for :meth:`splice_from`); raises as :meth:`write`."""
        deadline: Optional[Deadline] = None
        while True:
            with self._lock:
                credit = self._state.writable_credit()
                if credit:
                    return credit
                waiter = self._gate.enlist()
            if deadline is None:
                deadline = Deadline(timeout, "waiting for credit on a remowt stream")
            self.router.wait_for(self.peer, waiter, deadline.remaining())

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
            if not self._state.reserve(count):
                raise ValueError(f"splicing {count} bytes into {self!r} exceeds its credit of {self._state.credit}")
        if not self.router.send_routed(self.peer, self._framer.header(count), Spliced(fd, count, on_sent)):
            on_sent(False)

    def close_write(self) -> None:
        """Send end of stream; the peer reads ``b""`` after the bytes already sent."""
        with self._lock:
            eof = self._state.close_write()
        if eof is not None:
            self._send(eof)

    def receive_only(self) -> None:
        """End this side's direction without telling the peer, who opened the stream one-way."""
        with self._lock:
            self._state.receive_only()

    def close(self) -> None:
        """Abandon the stream: the peer's writes fail with ``BrokenPipeError``."""
        with self._lock:
            if self._state.closed:
                return
            reset = self._state.close()
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()
        self.router.forget_stream(self)
        if reset is not None:
            self._send(reset)
        self._maybe_end_listener()

    @property
    def ended(self) -> bool:
        """True once nothing more will arrive: EOF, reset, lost, or closed here."""
        return self._state.ended

    @property
    def broken(self) -> bool:
        """True once the stream failed or was closed on this side."""
        return self._state.broken

    @property
    def error(self) -> Optional[BaseException]:
        """Why the stream failed: ``ConnectionLost``, or ``BrokenPipeError`` when the peer reset it; else None."""
        return self._state.error

    def credit(self) -> int:
        """How many bytes :meth:`write` can send now without waiting (0 once failed or closed)."""
        with self._lock:
            return self._state.available()

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, as soon as there is credit or the stream has failed or closed."""
        with self._lock:
            ready = self._state.write_ready
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
        block; it gets ``b""`` once at the end (EOF, reset, lost link, or
        :meth:`close` here, on the closing thread). The
        bytes count against the window until the consumer calls :meth:`ack`.
        """
        with self._lock:
            self._listener = listener
        while True:  # the link's thread may deliver meanwhile: chunks wait until those before them are handed out
            with self._lock:
                waiting = self._state.push()
            if not waiting:
                break
            for chunk in waiting:
                listener(chunk)
        self._maybe_end_listener()

    def ack(self, amount: int) -> None:
        """Push mode: the consumer is done with ``amount`` delivered bytes; return the credit."""
        with self._lock:
            credit = self._state.consumed(amount)
        if credit is not None:
            self._send(credit)

    def _maybe_end_listener(self) -> None:
        with self._lock:
            listener = self._listener if self._state.end_due() else None
        if listener is not None:
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
            if self._state.received(data):
                listener = self._listener
            else:
                listener = None
                self._gate.open()
        if listener is not None:
            listener(data)

    def on_eof(self) -> None:
        with self._lock:
            self._state.eof_received()
            self._gate.open()
        self._maybe_end_listener()

    def on_credit(self, amount: int) -> None:
        with self._lock:
            self._state.credit_received(amount)
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()

    def on_reset(self, reason: str) -> None:
        with self._lock:
            self._state.reset_received(reason)
        self._failed()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._state.fail(error)
        self._failed()

    def _failed(self) -> None:
        """Tell whoever waits on the stream (readers, writers, a writable callback, a consumer) that it failed."""
        with self._lock:
            self._gate.open()
            callback = self._take_writable_callback()
        if callback is not None:
            callback()
        self._maybe_end_listener()

    def abort(self, error: ProtocolError) -> None:
        """The peer broke the protocol on this stream: fail it here, reset it there."""
        with self._lock:
            reset = self._state.abort(error)
        self._failed()
        self._send(reset)

    def lost(self) -> None:
        self.fail(ConnectionLost(f"connection to {self.peer} lost"))

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._state.buffered
