"""The wire protocol: messages as msgspec Structs, frames as length + msgpack.

Pure code: no threads, no sockets. A frame is a 4-byte big-endian body length
followed by the msgpack body; the body is one member of :data:`Message`.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, List, Optional, Tuple, Union

import msgspec

from ..errors import MessageTooLarge, ProtocolError

PROTOCOL_VERSION = 4  # 2: spawn argv, executable, cwd and env as bytes; 3: spawn takes passed fds; 4: and pass_fds
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
# A peer must take at least this (a Data frame of a whole 1 MiB pipe, a spawn with a long command line).
MIN_MAX_FRAME = 2 * 1024 * 1024
HEADER = struct.Struct(">I")

Positive = Annotated[int, msgspec.Meta(ge=1)]
Hops = Annotated[int, msgspec.Meta(ge=1, le=255)]
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

USER = "user"
AGENT = "agent"
AGENT_PRIVILEGED = "agent-privileged"
_PLUGIN = re.compile(r"plugin\((0|[1-9][0-9]{0,4})\)\Z")


def plugin(n: int) -> str:
    """The address of plugin number ``n``."""
    if not 0 <= n <= 65535:
        raise ValueError(f"plugin number must be in 0..65535, got {n}")
    return f"plugin({n})"


def check_address(address: str) -> str:
    """Return ``address`` if it is a valid remowt address, else raise ValueError."""
    if address in (USER, AGENT, AGENT_PRIVILEGED) or _PLUGIN.match(address):
        if address.startswith("plugin(") and int(address[7:-1]) > 65535:
            raise ValueError(f"plugin number out of range in address {address!r}")
        return address
    raise ValueError(f"invalid address {address!r}: expected 'user', 'agent', 'agent-privileged' or 'plugin(N)'")


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """First message on every link, in both directions."""

    version: int
    address: str
    max_frame: Positive


class Routes(msgspec.Struct, tag="routes", array_like=True):
    """The full set of addresses the sender can reach, with hop counts."""

    reachable: List[Tuple[str, Hops]]


class Call(msgspec.Struct, tag="call", array_like=True):
    """A request; ``args`` is a msgpack array decoded by the service."""

    id: Id
    src: str
    dst: str
    ns: int
    method: int
    args: msgspec.Raw


class Notify(msgspec.Struct, tag="notify", array_like=True):
    """A one-way request: no reply is sent."""

    src: str
    dst: str
    ns: int
    method: int
    args: msgspec.Raw


class Reply(msgspec.Struct, tag="reply", array_like=True):
    """The successful result of a :class:`Call`."""

    id: Id
    src: str
    dst: str
    result: msgspec.Raw


class Fail(msgspec.Struct, tag="fail", array_like=True):
    """A failed :class:`Call`; ``kind`` selects the exception on the caller."""

    id: Id
    src: str
    dst: str
    kind: str
    message: str
    errno: Optional[int] = None
    filename: Optional[str] = None


class Open(msgspec.Struct, tag="open", array_like=True):
    """Announce a stream; ``window`` is each side's initial receive credit."""

    src: str
    dst: str
    sid: Id
    window: Positive


class Data(msgspec.Struct, tag="data", array_like=True):
    """Stream bytes. ``from_opener`` tells which side's ``sid`` space it is.

    Decoded, ``data`` is a view of the frame it came in, not a copy.
    """

    src: str
    dst: str
    sid: Id
    from_opener: bool
    data: memoryview


class Credit(msgspec.Struct, tag="credit", array_like=True):
    """The receiver consumed ``amount`` bytes: the sender may send that much more."""

    src: str
    dst: str
    sid: Id
    from_opener: bool
    amount: Positive


class Eof(msgspec.Struct, tag="eof", array_like=True):
    """The sender will write no more on this stream."""

    src: str
    dst: str
    sid: Id
    from_opener: bool


class Reset(msgspec.Struct, tag="reset", array_like=True):
    """The sender abandoned the stream in both directions."""

    src: str
    dst: str
    sid: Id
    from_opener: bool
    reason: str


Body = Union[bytes, memoryview]
#: What :meth:`FrameReader.feed` gives: frame bodies, and (when it splits payloads) already decoded ``Data``.
Item = Union[bytes, memoryview, Data]
Routed = Union[Call, Notify, Reply, Fail, Open, Data, Credit, Eof, Reset]
StreamMessage = Union[Open, Data, Credit, Eof, Reset]
Message = Union[Hello, Routes, Call, Notify, Reply, Fail, Open, Data, Credit, Eof, Reset]

_encoder = msgspec.msgpack.Encoder()


def _decoder_or_fail() -> msgspec.msgpack.Decoder[Message]:
    """The message decoder, once msgspec is known to decode ``Data.data`` views correctly (0.20 and later)."""
    try:
        decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
        probe = decoder.decode(_encoder.encode(Data(USER, AGENT, 0, True, memoryview(b"ab"))))
        works = isinstance(probe, Data) and len(probe.data) == 2 and bytes(probe.data[1:]) == b"b"
    except TypeError:  # no memoryview support at all
        works = False
    if not works:
        raise ImportError(f"remowt needs msgspec 0.20 or later, this is msgspec {msgspec.__version__}")
    return decoder


_decoder = _decoder_or_fail()


def encode(message: Message) -> bytearray:
    """Encode ``message`` into one complete frame (header included)."""
    buf = bytearray(HEADER.size)
    _encoder.encode_into(message, buf, HEADER.size)
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return buf


class DataFramer:
    """Frames one stream's payloads as :class:`Data` messages without copying them.

    ``header(n)`` is the frame header and msgpack envelope that go on the
    wire right before ``n`` payload bytes (the payload's bin32 header last).
    """

    def __init__(self, src: str, dst: str, sid: int, from_opener: bool) -> None:
        empty = _encoder.encode(Data(src, dst, sid, from_opener, memoryview(b"")))
        self._envelope = empty[: -len(_EMPTY_BIN)]
        assert empty.endswith(_EMPTY_BIN)

    def header(self, size: int) -> bytes:
        envelope = self._envelope
        return HEADER.pack(len(envelope) + _BIN32.size + size) + envelope + _BIN32.pack(0xC6, size)


def data_frame(message: Data) -> Tuple[bytes, memoryview]:
    """``message`` as a frame head and its payload, the payload not copied."""
    framer = DataFramer(message.src, message.dst, message.sid, message.from_opener)
    return framer.header(len(message.data)), message.data


_EMPTY_BIN = b"\xc4\x00"
_BIN32 = struct.Struct(">BI")


def encode_value(value: object) -> bytes:
    """Encode a value (call arguments, a result) as msgpack."""
    return _encoder.encode(value)


def frame(body: Body) -> bytes:
    """Frame an already encoded body."""
    return HEADER.pack(len(body)) + body


def decode(body: Body) -> Message:
    """Decode one frame body, or raise :class:`ProtocolError` saying what is wrong."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"malformed message: {e}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"frame body is not valid msgpack: {e}") from None
    except RecursionError:
        raise ProtocolError("frame body is nested too deeply") from None


def too_large(frame: bytearray, limit: int, what: str) -> MessageTooLarge:
    """The error for an encoded ``frame`` (header included) that is over the peer's ``limit``."""
    size = len(frame) - HEADER.size
    message = f"{what} is {size} bytes encoded, more than the peer's frame limit of {limit} bytes"
    return MessageTooLarge(message, size=size, limit=limit)


class FrameReader:
    """Split a byte stream into frame bodies, enforcing the size limit.

    Bodies that lie whole inside one fed chunk come back as memoryviews of
    it, without copying. A frame split across chunks is gathered into a
    buffer of its own, allocated once its size is known, so each of its
    bytes is copied once.

    With ``split``, a :class:`Data` frame of at least that many bytes that a
    chunk does not hold whole is not gathered: its message is decoded at
    once and its payload comes out as it is fed, as ``Data`` messages each
    holding a piece of it (:attr:`payload_left` says how much is to come,
    so the reader can read exactly that, each piece then being a whole chunk).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, split: int = 0) -> None:
        if max_frame < 16:
            raise ValueError(f"max_frame must be at least 16 bytes, got {max_frame}")
        self.max_frame = max_frame
        self._split = split
        self._head = bytearray()
        self._body: Optional[bytearray] = None
        self._have = 0
        self._data: Optional[Data] = None
        self.payload_left = 0

    def feed(self, data: Body) -> List[Item]:
        """Take more bytes; return the complete frame bodies (and payload pieces) they finish."""
        out: List[Item] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        if self.payload_left:
            pos = self._piece(view, 0, end, out)
        if self._head:
            pos = min(HEADER.size - len(self._head), end)
            self._head += view[:pos]
            if len(self._head) < HEADER.size:
                return out
            self._start(HEADER.unpack(self._head)[0])
            self._head.clear()
        if self._body is not None:
            pos = self._gather(view, pos, out)
        while end - pos >= HEADER.size:
            size = self._check(HEADER.unpack_from(view, pos)[0])
            pos += HEADER.size
            if end - pos < size:
                if not (self._split and size >= self._split and self._split_data(view, pos, end, size, out)):
                    self._start(size)
                    self._gather(view, pos, out)
                return out
            out.append(view[pos : pos + size])
            pos += size
        if pos < end:
            self._head += view[pos:]
        return out

    def _split_data(self, view: memoryview, pos: int, end: int, size: int, out: List[Item]) -> bool:
        """Start splitting the ``size``-byte frame at ``pos``; False when it is no Data frame (or not known yet)."""
        bounds = _payload_bounds(view[pos:end], size)
        if bounds is None:
            return False
        bin_at, payload_at = bounds
        message = decode(bytes(view[pos : pos + bin_at]) + _EMPTY_BIN)
        if not isinstance(message, Data):
            return False
        self._data = message
        self.payload_left = size - payload_at
        self._piece(view, pos + payload_at, end, out)
        return True

    def _piece(self, view: memoryview, pos: int, end: int, out: List[Item]) -> int:
        """Give what ``view`` holds of the split payload as a ``Data``; return the position after it."""
        data = self._data
        assert data is not None
        take = min(self.payload_left, end - pos)
        if take:
            out.append(Data(data.src, data.dst, data.sid, data.from_opener, view[pos : pos + take]))
            self.payload_left -= take
            if not self.payload_left:
                self._data = None
        return pos + take

    def _start(self, size: int) -> None:
        self._body = bytearray(self._check(size))
        self._have = 0

    def _gather(self, view: memoryview, pos: int, out: List[Item]) -> int:
        """Copy what ``view`` holds of the frame being gathered; return the position after it."""
        body = self._body
        assert body is not None
        take = min(len(body) - self._have, len(view) - pos)
        body[self._have : self._have + take] = view[pos : pos + take]
        self._have += take
        if self._have == len(body):
            out.append(memoryview(body))
            self._body = None
        return pos + take

    def _check(self, size: int) -> int:
        if size > self.max_frame:
            raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self.max_frame} bytes")
        return size

    @property
    def missing(self) -> int:
        """Bytes still needed to finish the frame begun (1 between frames: any byte starts the next)."""
        if self.payload_left:
            return self.payload_left
        if self._body is not None:
            return len(self._body) - self._have
        return HEADER.size - len(self._head) if self._head else 1

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._head) + (HEADER.size + self._have if self._body is not None else 0)


_DATA_START = b"\x96\xa4data"  # a six-element array, then the tag: what DataFramer's envelopes begin with
_INT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_SIZES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _payload_bounds(head: memoryview, size: int) -> Optional[Tuple[int, int]]:
    """Where the payload's bin header and the payload start, if ``head`` begins a ``size``-byte Data body.

    None when it is not one, or the payload does not run to the body's end,
    or ``head`` is too short to tell.
    """
    if head[: len(_DATA_START)] != _DATA_START:
        return None
    pos = len(_DATA_START)
    try:
        for _ in range(2):  # src and dst
            kind = head[pos]
            if 0xA0 <= kind <= 0xBF:
                pos += 1 + (kind & 0x1F)
            elif kind == 0xD9:
                pos += 2 + head[pos + 1]
            else:
                return None
        kind = head[pos]  # sid
        if kind >= 0x80 and kind not in _INT_SIZES:
            return None
        pos += 1 + _INT_SIZES.get(kind, 0)
        if head[pos] not in (0xC2, 0xC3):  # from_opener
            return None
        bin_at = pos + 1
        width = _BIN_SIZES.get(head[bin_at])
        if width is None:
            return None
        length = int.from_bytes(head[bin_at + 1 : bin_at + 1 + width], "big")
    except IndexError:
        return None
    payload_at = bin_at + 1 + width
    if payload_at > len(head) or payload_at + length != size:
        return None
    return bin_at, payload_at
