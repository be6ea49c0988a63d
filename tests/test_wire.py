"""The wire format: framing, decoding, and the hello handshake."""

from __future__ import annotations

import struct
import threading
from typing import Dict, List

import msgspec
import pytest
from _util import RawPeer
from hypothesis import given, settings
from hypothesis import strategies as st

from remowt.errors import ProtocolError
from remowt.protocol import wire
from remowt.rpc import streams
from remowt.rpc.router import Router
from remowt.transports import loopback

SAMPLES: List[wire.Message] = [
    wire.Hello(wire.PROTOCOL_VERSION, wire.AGENT, wire.DEFAULT_MAX_FRAME),
    wire.Routes([(wire.USER, 1), (wire.plugin(3), 2)]),
    wire.Call(1, wire.USER, wire.AGENT, 1, 2, msgspec.Raw(wire.encode_value([1, "two"]))),
    wire.Notify(wire.USER, wire.AGENT, 10, 5, msgspec.Raw(wire.encode_value([3]))),
    wire.Reply(1, wire.AGENT, wire.USER, msgspec.Raw(wire.encode_value({"a": [1, 2]}))),
    wire.Fail(2, wire.AGENT, wire.USER, "os-error", "No such file", 2, "/x"),
    wire.Open(wire.USER, wire.AGENT, 4, 1024),
    wire.Data(wire.USER, wire.AGENT, 4, True, b"\x00\x01" * 1000),
    wire.Credit(wire.AGENT, wire.USER, 4, False, 512),
    wire.Eof(wire.USER, wire.AGENT, 4, True),
    wire.Reset(wire.AGENT, wire.USER, 4, False, "closed"),
]


def encoded_stream() -> bytes:
    return b"".join(bytes(wire.encode(m)) for m in SAMPLES)


def roundtrip(message: wire.Message) -> wire.Message:
    frame = bytes(wire.encode(message))
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    return wire.decode(frame[4:])


@pytest.mark.timeout(30)
def test_every_message_round_trips() -> None:
    for message in SAMPLES:
        back = roundtrip(message)
        assert type(back) is type(message)
        assert msgspec.msgpack.encode(back) == msgspec.msgpack.encode(message)


@pytest.mark.timeout(30)
def test_frame_helper_matches_encode() -> None:
    for message in SAMPLES:
        frame = bytes(wire.encode(message))
        assert wire.frame(frame[4:]) == frame


@pytest.mark.timeout(30)
def test_frame_reader_byte_by_byte() -> None:
    data = encoded_stream()
    reader = wire.FrameReader()
    bodies = []
    for i in range(len(data)):
        bodies.extend(bytes(b) for b in reader.feed(data[i : i + 1]))
    assert [wire.decode(b) for b in bodies] == [roundtrip(m) for m in SAMPLES]
    assert reader.pending == 0


@pytest.mark.timeout(30)
def test_frame_reader_all_at_once() -> None:
    reader = wire.FrameReader()
    bodies = reader.feed(encoded_stream())
    assert len(bodies) == len(SAMPLES)
    assert reader.pending == 0


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_frame_reader_any_split(cuts: List[int]) -> None:
    data = encoded_stream()
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    reader = wire.FrameReader()
    bodies = []
    for piece in pieces:
        # the reader may hand out views of what it was fed: copy before the next feed
        bodies.extend(bytes(b) for b in reader.feed(piece))
    assert b"".join(wire.frame(b) for b in bodies) == data
    assert reader.pending == 0


BIG = 300


def split_stream() -> List[wire.Message]:
    """Messages with Data frames big enough to split (as DataFramer and as encode write them), and others."""
    framer = wire.DataFramer(wire.AGENT, wire.plugin(7), 2**40, False)
    payload = bytes(range(256)) * 2
    return [
        *SAMPLES,
        wire.Data(wire.AGENT, wire.USER, 5, False, memoryview(b"x" * BIG)),
        wire.decode(bytes(framer.header(len(payload)))[4:] + payload),
        wire.Call(3, wire.USER, wire.AGENT, 1, 2, msgspec.Raw(wire.encode_value(b"y" * BIG))),
        wire.Data(wire.USER, wire.AGENT_PRIVILEGED, 200, True, memoryview(b"z" * (BIG + 70000))),
        wire.Eof(wire.USER, wire.AGENT, 4, True),
    ]


def merged(messages: List[wire.Message]) -> List[object]:
    """The messages with consecutive Data of one stream joined, as comparable values."""
    out: List[object] = []
    for message in messages:
        if isinstance(message, wire.Data):
            key = (message.src, message.dst, message.sid, message.from_opener)
            if out and isinstance(out[-1], tuple) and out[-1][0] == key:
                out[-1] = (key, out[-1][1] + bytes(message.data))
                continue
            out.append((key, bytes(message.data)))
        else:
            out.append(msgspec.msgpack.encode(message))
    return out


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=75000), max_size=20))
def test_frame_reader_splits_big_data_payloads(cuts: List[int]) -> None:
    messages = split_stream()
    data = b"".join(bytes(wire.encode(m)) for m in messages)
    points = sorted({min(c, len(data)) for c in cuts})
    reader = wire.FrameReader(split=BIG)
    got: List[wire.Message] = []
    for a, b in zip([0, *points], [*points, len(data)]):
        for item in reader.feed(data[a:b]):
            if isinstance(item, wire.Data):
                got.append(wire.Data(item.src, item.dst, item.sid, item.from_opener, memoryview(bytes(item.data))))
            else:
                got.append(wire.decode(bytes(item)))
    assert merged(got) == merged(messages)
    assert reader.pending == 0 and reader.payload_left == 0


@pytest.mark.timeout(30)
def test_split_payload_read_exactly_is_handed_out_whole() -> None:
    framer = wire.DataFramer(wire.AGENT, wire.USER, 9, False)
    payload = b"p" * 1000
    frame = bytes(framer.header(len(payload))) + payload
    reader = wire.FrameReader(split=BIG)
    (first,) = reader.feed(frame[:100])
    assert isinstance(first, wire.Data) and bytes(first.data) == payload[: 100 - len(frame) + len(payload)]
    rest = frame[100:]
    assert reader.payload_left == len(rest)
    (second,) = reader.feed(rest)
    assert isinstance(second, wire.Data) and second.data.obj is rest and second.data.nbytes == len(rest)
    assert streams.as_bytes(second.data) is rest


@pytest.mark.timeout(30)
def test_data_frame_matches_encode() -> None:
    message = wire.Data(wire.USER, wire.plugin(3), 2**33, True, memoryview(b"abc" * 100))
    head, payload = wire.data_frame(message)
    assert payload is message.data
    (body,) = wire.FrameReader().feed(head + bytes(payload))
    assert msgspec.msgpack.encode(wire.decode(body)) == msgspec.msgpack.encode(message)


@pytest.mark.timeout(30)
def test_frame_reader_does_not_split_a_data_frame_of_the_wrong_length() -> None:
    body = bytes(wire.encode(wire.Data(wire.AGENT, wire.USER, 1, False, memoryview(b"q" * 1000))))[4:]
    bad = body + b"extra"  # the payload no longer runs to the end of the body
    reader = wire.FrameReader(split=BIG)
    assert reader.feed(wire.frame(bad)[:200]) == []
    (item,) = reader.feed(wire.frame(bad)[200:])
    assert not isinstance(item, wire.Data)
    with pytest.raises(ProtocolError):
        wire.decode(item)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("split", [0, BIG])
def test_frame_reader_missing_is_what_the_frame_begun_lacks(split: int) -> None:
    frame = bytes(wire.encode(wire.Data(wire.AGENT, wire.USER, 1, False, memoryview(b"m" * 1000))))
    reader = wire.FrameReader(split=split)
    assert reader.missing == 1
    reader.feed(frame[:2])
    assert reader.missing == 2
    reader.feed(frame[2:100])
    assert reader.missing == len(frame) - 100
    reader.feed(frame[100:])
    assert reader.missing == 1


@pytest.mark.timeout(30)
def test_frame_reader_pending_counts_partial_frames() -> None:
    frame = bytes(wire.encode(SAMPLES[2]))
    reader = wire.FrameReader()
    assert reader.feed(frame[:2]) == []
    assert reader.pending == 2
    assert reader.feed(frame[2:10]) == []
    assert reader.pending == 10
    assert [bytes(b) for b in reader.feed(frame[10:])] == [frame[4:]]
    assert reader.pending == 0


@pytest.mark.timeout(30)
def test_empty_frame_is_a_frame() -> None:
    reader = wire.FrameReader()
    assert [bytes(b) for b in reader.feed(b"\x00\x00\x00\x00")] == [b""]
    with pytest.raises(ProtocolError):
        wire.decode(b"")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("split", [False, True])
def test_oversize_frame(split: bool) -> None:
    reader = wire.FrameReader(max_frame=1000)
    ok = struct.pack(">I", 1000) + b"\x00" * 1000
    assert [bytes(b) for b in reader.feed(ok)] == [b"\x00" * 1000]
    header = struct.pack(">I", 1001)
    with pytest.raises(ProtocolError) as info:
        if split:
            reader.feed(header[:3])
            reader.feed(header[3:])
        else:
            reader.feed(header + b"\x00" * 10)
    message = str(info.value)
    assert "1001" in message
    assert "1000" in message


@pytest.mark.timeout(30)
def test_oversize_frame_default_limit() -> None:
    reader = wire.FrameReader()
    with pytest.raises(ProtocolError, match=str(wire.DEFAULT_MAX_FRAME)):
        reader.feed(struct.pack(">I", 2**32 - 1))


@pytest.mark.timeout(30)
def test_frame_reader_rejects_tiny_limit() -> None:
    with pytest.raises(ValueError):
        wire.FrameReader(max_frame=4)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\xa5hel", b"\x91\xa1\xff", b"\x94\xa5\x80\x00\x00\x00\x00"],
    ids=["reserved-byte", "truncated-array", "huge-array", "truncated-str", "invalid-utf8", "invalid-utf8-tag"],
)
def test_undecodable_body(body: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"msgpack|malformed"):
        wire.decode(body)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "value",
    [
        ["call", 1],  # too short
        ["call", "one", "user", "agent", 1, 1, []],  # id of the wrong type
        ["nosuchtag", 1, 2],  # unknown tag
        {"type": "call"},  # a map, not an array
        42,  # not a container at all
        ["hello", 1, "agent", 0],  # max_frame must be positive
        ["routes", [["user", -1]]],  # hop counts are positive
        ["credit", "user", "agent", 1, True, 0],  # credit must grant something
        ["data", "user", "agent", -1, True, b""],  # negative stream id
        ["call", 2**63, "user", "agent", 1, 1, []],  # id out of range
    ],
)
def test_wrong_shape_message(value: object) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        wire.decode(msgspec.msgpack.encode(value))


@pytest.mark.timeout(30)
def test_trailing_garbage_in_body() -> None:
    body = bytes(wire.encode(SAMPLES[3]))[4:] + b"\x00"
    with pytest.raises(ProtocolError):
        wire.decode(body)


@pytest.mark.timeout(30)
def test_addresses() -> None:
    for good in ("user", "agent", "agent-privileged", "plugin(0)", "plugin(65535)"):
        assert wire.check_address(good) == good
    for bad in ("", "User", "plugin(65536)", "plugin(01)", "plugin(-1)", "plugin()", "agent ", "plugin(1)x"):
        with pytest.raises(ValueError):
            wire.check_address(bad)
    assert wire.plugin(12) == "plugin(12)"
    with pytest.raises(ValueError):
        wire.plugin(65536)


def attach_raw(router: Router, first_bytes: bytes, timeout: float = 10) -> tuple[BaseException, RawPeer]:
    """Have ``router`` add a link whose peer (the test) sends ``first_bytes``; return what add_link raised."""
    router_end, test_end = loopback.pair()
    peer = RawPeer(test_end)
    peer.send(first_bytes)
    outcome: Dict[str, BaseException] = {}
    done = threading.Event()

    def add() -> None:
        try:
            router.add_link(router_end, timeout=timeout)
        except BaseException as e:
            outcome["error"] = e
        done.set()

    threading.Thread(target=add, daemon=True).start()
    assert done.wait(timeout + 5)
    assert "error" in outcome, "add_link accepted a bad hello"
    return outcome["error"], peer


@pytest.mark.timeout(30)
def test_version_mismatch_in_hello() -> None:
    router = Router(wire.USER)
    try:
        hello = wire.Hello(999, wire.AGENT, wire.DEFAULT_MAX_FRAME)
        error, peer = attach_raw(router, bytes(wire.encode(hello)))
        assert isinstance(error, ProtocolError), repr(error)
        message = str(error)
        assert "999" in message
        assert str(wire.PROTOCOL_VERSION) in message
        # the router sent its own hello first, then closed the link
        ours = peer.next_message(10)
        assert isinstance(ours, wire.Hello)
        assert (ours.version, ours.address) == (wire.PROTOCOL_VERSION, wire.USER)
        assert peer.eof.wait(10)
        assert router.links() == []
        peer.close()
    finally:
        router.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "first, match",
    [
        (wire.Routes([]), "expected hello"),
        (wire.Hello(wire.PROTOCOL_VERSION, "nobody", wire.DEFAULT_MAX_FRAME), "bad hello"),
        (wire.Hello(wire.PROTOCOL_VERSION, wire.USER, wire.DEFAULT_MAX_FRAME), "already taken"),
    ],
    ids=["not-hello", "bad-address", "own-address"],
)
def test_bad_hello(first: wire.Message, match: str) -> None:
    router = Router(wire.USER)
    try:
        error, peer = attach_raw(router, bytes(wire.encode(first)))
        assert isinstance(error, ProtocolError), repr(error)
        assert match in str(error)
        peer.close()
    finally:
        router.close()


@pytest.mark.timeout(30)
def test_garbage_instead_of_hello() -> None:
    router = Router(wire.USER)
    try:
        error, peer = attach_raw(router, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        assert isinstance(error, ProtocolError), repr(error)
        error, peer2 = attach_raw(router, struct.pack(">I", 2**31))
        assert isinstance(error, ProtocolError), repr(error)
        assert "exceeds" in str(error)
        peer.close()
        peer2.close()
    finally:
        router.close()


@pytest.mark.timeout(30)
def test_silent_peer_times_out() -> None:
    router = Router(wire.USER)
    try:
        error, peer = attach_raw(router, b"", timeout=0.2)
        assert "handshake" in str(error)
        peer.close()
    finally:
        router.close()
