"""One end of a stream as plain data: its flow control and its ends, with no threads, locks or I/O.

The sender may have at most a window of bytes that the receiver has not yet
consumed; the receiver returns credit as its consumer takes bytes.
:class:`StreamState` keeps one end's counts, flags and received chunks, and
answers each event (bytes arrived, the consumer took some, credit came back,
the peer's end or reset, a local end or close) with what to do: the message
to send, the bytes to hand out, or a :class:`ProtocolError` when the peer
broke the rules. :class:`remowt.rpc.streams.Stream` wraps it with a lock,
waits and sends.
"""

from __future__ import annotations

import collections
from typing import Deque, List, NoReturn, Optional, Tuple, Union

from ..errors import ProtocolError
from . import wire

DEFAULT_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 16 * 1024 * 1024  # the most a peer may ask a stream's receiver to hold
MAX_CHUNK = 256 * 1024  # the most one Data frame of a write carries
StreamKey = Tuple[str, int]  # (opener, sid)
Chunk = Union[bytes, memoryview]


class StreamState:
    """The state of one end of stream ``(opener, sid)`` between ``own`` and ``peer``.

    Sending: ``credit`` is what the peer may still take. Receiving: ``buffered``
    bytes arrived and are not consumed yet, ``unacked`` were consumed and their
    credit is still owed to the peer (returned a quarter window at a time).
    """

    __slots__ = (
        "buffered",
        "chunks",
        "closed",
        "credit",
        "error",
        "from_opener",
        "opener",
        "own",
        "peer",
        "push_ended",
        "pushing",
        "remote_eof",
        "sent_eof",
        "sid",
        "unacked",
        "window",
    )

    def __init__(self, own: str, peer: str, opener: str, sid: int, window: int, one_way: bool = False) -> None:
        self.own = own
        self.peer = peer
        self.opener = opener
        self.sid = sid
        self.from_opener = opener == own
        self.window = window
        self.credit = window
        self.buffered = 0
        self.unacked = 0
        self.chunks: Deque[Chunk] = collections.deque()  # received, waiting for take()
        self.remote_eof = one_way  # a one-way stream's opener only writes: the peer never will
        self.sent_eof = False
        self.closed = False  # closed on this side
        self.error: Optional[BaseException] = None  # why it failed: the peer's reset, a lost link, a broken rule
        self.pushing = False  # chunks go to the consumer as they arrive instead of waiting for take()
        self.push_ended = False  # the pushed-to consumer was told of the end

    @property
    def name(self) -> str:
        """How errors name the stream."""
        return f"<Stream {self.opener}#{self.sid} with {self.peer}>"

    # --- receiving ------------------------------------------------------

    def received(self, data: Chunk) -> bool:
        """``data`` arrived: True to hand it to the consumer now (push mode); False when it waits for
        :meth:`take` or is dropped (closed here). A :class:`ProtocolError` when it overruns the window."""
        if self.closed:
            return False
        size = len(data)
        if self.buffered + self.unacked + size > self.window:
            raise ProtocolError(f"{self.peer} overran the window of {self.name}")
        self.buffered += size
        if self.pushing:
            return True
        self.chunks.append(data)
        return False

    def take(self, size: int) -> Optional[Chunk]:
        """Up to ``size`` bytes as they arrived, ``b""`` at the end, or None when there is nothing yet.

        Raises the stream's error when it failed with nothing left to read. The
        bytes stay buffered until the caller reports them :meth:`consumed`.
        """
        chunks = self.chunks
        if chunks:
            chunk = chunks.popleft()
            if len(chunk) > size:
                rest = memoryview(chunk)
                chunks.appendleft(rest[size:])
                chunk = rest[:size]
            return chunk
        if self.remote_eof or self.closed:
            return b""
        if self.error is not None:
            raise self.error
        return None

    def consumed(self, size: int) -> Optional[wire.Credit]:
        """The consumer is done with ``size`` bytes: the credit to return now, once a quarter window is owed."""
        self.buffered -= size
        unacked = self.unacked + size
        if unacked and unacked >= self.window // 4 and not self.remote_eof:
            self.unacked = 0
            return wire.Credit(self.own, self.peer, self.sid, self.from_opener, unacked)
        self.unacked = unacked
        return None

    def push(self) -> List[Chunk]:
        """The chunks waiting, for the consumer; once none wait, chunks go to it as they arrive.

        Call it until it returns none: what arrives while the consumer takes the
        waiting chunks waits too, so no chunk overtakes another.
        """
        waiting = list(self.chunks)
        self.chunks.clear()
        self.pushing = not waiting
        return waiting

    def end_due(self) -> bool:
        """Push mode: True, once, when the consumer is to be told of the end (every chunk handed out first)."""
        if not self.pushing or self.push_ended or self.chunks or not self.ended:
            return False
        self.push_ended = True
        return True

    def eof_received(self) -> None:
        """The peer will send no more.

        Bytes that come after it are still taken: a peer's writer thread may
        send what it had credit for after another thread sent its Eof.
        """
        self.remote_eof = True

    def reset_received(self, reason: str) -> None:
        """The peer abandoned the stream: reads see the end, writes fail with ``BrokenPipeError``."""
        self.remote_eof = True
        self.fail(BrokenPipeError(f"remote end of {self.name} was closed ({reason})"))

    # --- sending --------------------------------------------------------

    def sendable(self, size: int) -> int:
        """Take credit for up to ``size`` bytes (at most :data:`MAX_CHUNK`) to send now; 0: wait for credit.

        Raises the stream's error, or ``ValueError`` once this side closed or ended its direction.
        """
        n = min(self.writable_credit(), size, MAX_CHUNK)
        self.credit -= n
        return n

    def writable_credit(self) -> int:
        """The credit there is now (maybe 0: wait); raises as :meth:`sendable` does."""
        if self.error is not None or self.closed or self.sent_eof:
            self._refuse_write()
        return self.credit

    def reserve(self, count: int) -> bool:
        """Take credit for exactly ``count`` bytes; False (nothing taken) when there is less.

        Raises as :meth:`sendable` does.
        """
        if count > self.writable_credit():
            return False
        self.credit -= count
        return True

    def _refuse_write(self) -> NoReturn:
        if self.error is not None:
            raise self.error
        raise ValueError("write to a closed remowt stream")

    def credit_received(self, amount: int) -> None:
        """The peer consumed ``amount`` bytes; a :class:`ProtocolError` when that takes credit past the window."""
        if self.credit + amount > self.window:
            raise ProtocolError(f"{self.peer} returned credit beyond the window of {self.name}")
        self.credit += amount

    def available(self) -> int:
        """How many bytes may be sent now (0 once failed, closed or ended here)."""
        if self.error is not None or self.closed or self.sent_eof:
            return 0
        return self.credit

    @property
    def write_ready(self) -> bool:
        """Whether a writer need not wait: there is credit, or the stream failed or closed."""
        return self.credit > 0 or self.error is not None or self.closed

    # --- ends -----------------------------------------------------------

    def close_write(self) -> Optional[wire.Eof]:
        """This side sends no more: the Eof to send (None when it ended, failed or closed already)."""
        if self.sent_eof or self.error is not None or self.closed:
            return None
        self.sent_eof = True
        return wire.Eof(self.own, self.peer, self.sid, self.from_opener)

    def receive_only(self) -> None:
        """End this side's direction without telling the peer, who opened the stream one-way."""
        self.sent_eof = True

    def close(self) -> Optional[wire.Reset]:
        """Abandon the stream here, dropping what waits to be read: the Reset to send, unless both
        directions had ended or the stream had failed (or it was closed already)."""
        if self.closed:
            return None
        finished = self.sent_eof and self.remote_eof
        self.closed = True
        self.chunks.clear()
        if finished or self.error is not None:
            return None
        return wire.Reset(self.own, self.peer, self.sid, self.from_opener, "closed")

    def fail(self, error: BaseException) -> None:
        """The stream failed (the first failure is the one reported)."""
        if self.error is None:
            self.error = error

    def abort(self, error: ProtocolError) -> wire.Reset:
        """The peer broke the protocol on this stream: it fails here, and the Reset tells the peer."""
        self.fail(error)
        return wire.Reset(self.own, self.peer, self.sid, self.from_opener, str(error))

    @property
    def ended(self) -> bool:
        """Nothing more will arrive: the peer's end, a failure, or closed here."""
        return self.remote_eof or self.error is not None or self.closed

    @property
    def broken(self) -> bool:
        """The stream failed or was closed on this side."""
        return self.error is not None or self.closed

    @property
    def at_eof(self) -> bool:
        """The end came and every byte was taken."""
        return not self.chunks and (self.remote_eof or self.closed)
