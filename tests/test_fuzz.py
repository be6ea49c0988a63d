"""Fuzz an agent through a second link where the test itself is the peer plugin(7).

The peer sends a valid hello, then random bytes and mutated valid frames. After
each example the agent must still be there, its user link must still answer,
and the fuzz link must either answer a valid call or have been closed for a
protocol error (never for an unexpected exception).
"""

from __future__ import annotations

import itertools
import logging
import queue
import struct
import threading
from typing import Dict, List, Optional

import msgspec
import pytest
from _util import RawPeer, handshake_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remowt.agent.main import Agent
from remowt.endpoints.control import Control, ControlApi
from remowt.errors import ProtocolError
from remowt.protocol import wire
from remowt.protocol.service import proxy
from remowt.rpc.router import Router
from remowt.transports import loopback

FUZZ = wire.plugin(7)
MAX_FRAME = wire.DEFAULT_MAX_FRAME
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)

# Sources never claim to be the user or the agent: a peer that forges those can answer the
# user's own calls at random moments (see test_routing.test_answer_from_wrong_node_is_ignored),
# which would make this test's user-side check depend on timing.
SRC = st.sampled_from([FUZZ, FUZZ, FUZZ, wire.plugin(8), "nobody", "", "plugin(99999)"])
DST = st.sampled_from([wire.AGENT, wire.AGENT, wire.USER, FUZZ, wire.plugin(9), wire.AGENT_PRIVILEGED, "x"])
ADDRESS = st.sampled_from([wire.USER, wire.AGENT, FUZZ, wire.plugin(3), wire.plugin(9), "bad", ""])
# Answer ids stay clear of the ids the user router uses for its own calls (same reason as SRC).
ANSWER_ID = st.integers(min_value=2**32, max_value=2**64 - 1) | st.integers(min_value=-(2**63), max_value=-1)
ID = st.integers(min_value=0, max_value=5) | INT64
SID = st.integers(min_value=0, max_value=3) | INT64
NS = st.sampled_from([1, 10, 11, 0, 65535]) | INT64
METHOD = st.integers(min_value=0, max_value=8) | INT64
VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
RAW = st.one_of(
    VALUES.map(lambda v: msgspec.Raw(wire.encode_value(v))),
    st.binary(max_size=16).map(msgspec.Raw),  # not even msgpack: breaks the frame around it
)

MESSAGES = st.one_of(
    st.builds(wire.Hello, INT64, ADDRESS, INT64),
    st.builds(wire.Routes, st.lists(st.tuples(ADDRESS, st.integers(min_value=-3, max_value=300)), max_size=4)),
    st.builds(wire.Call, ID, SRC, DST, NS, METHOD, RAW),
    st.builds(wire.Notify, SRC, DST, NS, METHOD, RAW),
    st.builds(wire.Reply, ANSWER_ID, SRC, DST, RAW),
    st.builds(
        wire.Fail,
        ANSWER_ID,
        SRC,
        DST,
        st.sampled_from(["os-error", "internal", "unreachable", "bad-arguments", "unknown-method", "?"]),
        st.text(max_size=10),
        st.none() | INT64,
        st.none() | st.text(max_size=10),
    ),
    st.builds(wire.Open, SRC, DST, SID, st.integers(min_value=-1, max_value=2**20) | INT64),
    st.builds(wire.Data, SRC, DST, SID, st.booleans(), st.binary(max_size=64)),
    st.builds(wire.Credit, SRC, DST, SID, st.booleans(), st.integers(min_value=-1, max_value=2**20) | INT64),
    st.builds(wire.Eof, SRC, DST, SID, st.booleans()),
    st.builds(wire.Reset, SRC, DST, SID, st.booleans(), st.text(max_size=10)),
)


@st.composite
def chunks(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["raw", "frame", "frame", "frame", "truncated", "flipped", "substituted", "lying-header"])
    )
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=64))
    frame = bytes(wire.encode(draw(MESSAGES)))
    if kind == "frame":
        return frame
    if kind == "truncated":
        return frame[: draw(st.integers(min_value=0, max_value=len(frame) - 1))]
    if kind == "flipped":
        bit = draw(st.integers(min_value=0, max_value=len(frame) * 8 - 1))
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)
    if kind == "substituted":  # a byte of the body replaced, often inside a string: not UTF-8 any more
        changed = bytearray(frame)
        changed[draw(st.integers(min_value=4, max_value=len(frame) - 1))] = draw(st.integers(0x80, 0xFF))
        return bytes(changed)
    delta = draw(st.integers(min_value=-8, max_value=8))
    return struct.pack(">I", max(0, len(frame) - 4 + delta)) + frame[4:]


def padding_to_boundary(sent: bytes) -> bytes:
    """What to send so that the peer's frame reader is at a frame boundary again.

    Mirrors the framing of what was sent; a header over the limit makes the peer
    close, so nothing more is needed after it.
    """
    pos, end = 0, len(sent)
    while end - pos >= 4:
        (size,) = struct.unpack_from(">I", sent, pos)
        if size > MAX_FRAME:
            return b""
        if end - pos - 4 < size:
            return bytes(size - (end - pos - 4))
        pos += 4 + size
    if pos == end:
        return b""
    missing = 4 - (end - pos)
    (size,) = struct.unpack(">I", sent[pos:] + bytes(missing))
    return bytes(missing) if size > MAX_FRAME else bytes(missing + size)


class Harness:
    def __init__(self) -> None:
        self.agent = Agent()
        self.user = Router(wire.USER)
        self.user.register(Control(wire.USER))
        user_end, agent_end = loopback.pair()
        served = threading.Thread(target=self.agent.serve, args=(agent_end,), daemon=True)
        served.start()
        self.user_link = self.user.add_link(user_end, timeout=10)
        served.join(10)
        self.ids = itertools.count(2**62)
        self.fuzz_link: Optional[object] = None
        self.peer: Optional[RawPeer] = None

    def new_fuzz_link(self) -> None:
        self.drop_fuzz_link()
        self.fuzz_link, self.peer = handshake_raw(self.agent.router, FUZZ)

    def drop_fuzz_link(self) -> None:
        if self.peer is not None:
            self.peer.close()
            assert self.agent.router.wait_unreachable(FUZZ, 10)
            self.peer = None

    def check(self, sent: bytes) -> None:
        assert self.peer is not None
        self.peer.send(padding_to_boundary(sent))
        call_id = next(self.ids)
        ping = wire.Call(call_id, FUZZ, wire.AGENT, ControlApi.namespace, 1, msgspec.Raw(wire.encode_value([])))
        self.peer.send_message(ping)
        try:
            answer = self.peer.wait_for(lambda m: isinstance(m, (wire.Reply, wire.Fail)) and m.id == call_id, 10)
        except queue.Empty:
            raise AssertionError("the fuzz link is open but did not answer a valid call") from None
        if answer is None:  # the agent closed the link: only a protocol error is a reason to
            link = self.fuzz_link
            assert link is not None
            assert link.closed  # type: ignore[attr-defined]
            reason = link.close_reason  # type: ignore[attr-defined]
            assert isinstance(reason, ProtocolError), f"fuzz link closed by {reason!r}"
        else:
            assert isinstance(answer, wire.Reply), answer
            assert answer.src == wire.AGENT
        # the agent as a whole is fine
        assert not self.agent.upstream_lost.is_set()
        assert not self.user_link.closed
        proxy(ControlApi, self.user, wire.AGENT, timeout=5).ping()
        assert proxy(ControlApi, self.user, wire.AGENT, timeout=5).info().address == wire.AGENT

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.user.close()
        self.agent.shutdown()


class ErrorLog(logging.Handler):
    """Collects log records that say a link closed after an unexpected error (a crash, not a protocol error)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(120)
def test_fuzz_agent_links() -> None:
    harness = Harness()
    errors = ErrorLog()
    link_log = logging.getLogger("remowt.link")
    link_log.addHandler(errors)
    stats: Dict[str, int] = {"answered": 0, "closed": 0}
    try:

        @settings(
            max_examples=200,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(st.lists(chunks(), min_size=1, max_size=8))
        def one_example(pieces: List[bytes]) -> None:
            harness.new_fuzz_link()
            errors.records.clear()
            assert harness.peer is not None
            sent = b""
            for piece in pieces:
                harness.peer.send(piece)
                sent += piece
            harness.check(sent)
            stats["closed" if harness.peer.eof.is_set() else "answered"] += 1
            crashes = [r.getMessage() for r in errors.records if "unexpected" in r.getMessage()]
            assert not crashes, crashes

        one_example()
    finally:
        link_log.removeHandler(errors)
        harness.close()
    # the examples did both: some links survived the garbage, some were closed for it
    assert stats["answered"] > 0 and stats["closed"] > 0, stats
