"""The sans-IO core, driven by hand: a stream's flow control and ends, and the router's decisions.

No threads, no transports, no routers: events go into the plain objects of
remowt.protocol and what they say to do is checked as plain values.
"""

from __future__ import annotations

import ast
import pathlib
import threading
from typing import Any, Iterator, List, Optional, Tuple

import msgspec
import pytest

from remowt.errors import ConnectionLost, ProtocolError
from remowt.protocol import dispatch, wire
from remowt.protocol.budget import MAX_STREAMS, MAX_UNACCEPTED, PeerBudget
from remowt.protocol.routing import RouteTable
from remowt.protocol.service import Service, proxy, rpc
from remowt.protocol.streamstate import MAX_CHUNK, MAX_WINDOW, StreamState

USER, AGENT, PRIV = wire.USER, wire.AGENT, wire.AGENT_PRIVILEGED
P1 = wire.plugin(1)
BODY = bytes(100)  # a frame body, as far as routing decisions look at it
REMOWT = pathlib.Path(__file__).resolve().parent.parent / "remowt"


@pytest.fixture(autouse=True)
def no_threads() -> Iterator[None]:
    """Nothing here may start a thread (one that an earlier test left may end meanwhile)."""
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before


def receiver(window: int = 1000, one_way: bool = False) -> StreamState:
    """The agent's end of stream user#7, which the user opened."""
    return StreamState(AGENT, USER, USER, 7, window, one_way)


def sender(window: int = 1000) -> StreamState:
    """The user's end of stream user#7."""
    return StreamState(USER, AGENT, USER, 7, window)


def drain(state: StreamState, size: int = 1 << 20) -> Tuple[bytes, Optional[wire.Credit]]:
    """Take what is there (as a reader would) and report it consumed: the bytes and the credit to send."""
    chunk = state.take(size)
    assert chunk is not None
    return bytes(chunk), state.consumed(len(chunk))


# --- flow control: sending ----------------------------------------------


@pytest.mark.timeout(10)
def test_writes_take_credit_until_the_window_is_exhausted() -> None:
    state = sender(window=1000)
    assert state.sendable(600) == 600
    assert state.sendable(600) == 400
    assert state.sendable(1) == 0
    assert state.available() == 0
    assert not state.write_ready


@pytest.mark.timeout(10)
def test_one_write_frame_carries_at_most_a_chunk() -> None:
    state = sender(window=4 * MAX_CHUNK)
    assert state.sendable(10 * MAX_CHUNK) == MAX_CHUNK
    assert state.available() == 3 * MAX_CHUNK


@pytest.mark.timeout(10)
def test_returned_credit_lets_the_writer_go_on() -> None:
    state = sender(window=1000)
    assert state.sendable(1000) == 1000
    state.credit_received(250)
    assert state.write_ready
    assert state.sendable(1000) == 250


@pytest.mark.timeout(10)
def test_credit_beyond_the_window_is_a_protocol_error() -> None:
    state = sender(window=1000)
    state.sendable(100)
    state.credit_received(100)
    with pytest.raises(ProtocolError, match="returned credit beyond the window of <Stream user#7 with agent>"):
        state.credit_received(1)
    assert state.credit == 1000


@pytest.mark.timeout(10)
def test_splicing_reserves_all_or_nothing() -> None:
    state = sender(window=1000)
    assert not state.reserve(1001)
    assert state.credit == 1000
    assert state.reserve(1000)
    assert state.credit == 0


@pytest.mark.timeout(10)
def test_writing_after_the_end_or_a_close_fails() -> None:
    ended = sender()
    assert ended.close_write() == wire.Eof(USER, AGENT, 7, True)
    assert ended.close_write() is None  # said once
    with pytest.raises(ValueError, match="closed"):
        ended.sendable(1)
    assert ended.available() == 0
    closed = sender()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.reserve(1)


# --- flow control: receiving ---------------------------------------------


@pytest.mark.timeout(10)
def test_credit_is_returned_a_quarter_window_at_a_time() -> None:
    state = receiver(window=1000)
    assert state.received(b"a" * 100) is False  # queued for take()
    assert drain(state) == (b"a" * 100, None)  # 100 owed: less than a quarter window
    assert state.unacked == 100
    state.received(b"b" * 200)
    data, credit = drain(state)
    assert data == b"b" * 200
    assert credit == wire.Credit(AGENT, USER, 7, False, 300)
    assert (state.unacked, state.buffered) == (0, 0)


@pytest.mark.timeout(10)
def test_data_over_the_window_is_a_protocol_error() -> None:
    state = receiver(window=1000)
    state.received(b"x" * 1000)
    with pytest.raises(ProtocolError, match="user overran the window of <Stream user#7 with user>"):
        state.received(b"x")
    assert state.buffered == 1000


@pytest.mark.timeout(10)
def test_consumed_bytes_whose_credit_is_owed_still_count_against_the_window() -> None:
    state = receiver(window=1000)
    state.received(b"x" * 1000)
    chunk = state.take(100)
    assert chunk is not None and len(chunk) == 100
    assert state.consumed(100) is None  # under a quarter window: the credit is owed, not sent
    with pytest.raises(ProtocolError):
        state.received(b"x")
    assert state.take(2000) is not None
    assert state.consumed(900) == wire.Credit(AGENT, USER, 7, False, 1000)
    assert state.received(b"x" * 1000) is False


@pytest.mark.timeout(10)
def test_take_hands_out_at_most_size_bytes_in_order() -> None:
    state = receiver()
    state.received(b"0123456789")
    state.received(b"ab")
    first = state.take(4)
    assert isinstance(first, memoryview) and bytes(first) == b"0123"
    rest = state.take(100)
    assert rest is not None and bytes(rest) == b"456789"
    assert state.take(100) == b"ab"
    assert state.take(100) is None  # nothing yet: wait
    assert state.buffered == 12  # until consumed


@pytest.mark.timeout(10)
def test_push_mode_hands_over_what_waited_and_then_every_arrival() -> None:
    state = receiver()
    state.received(b"early")
    assert state.push() == [b"early"]
    assert state.received(b"meanwhile") is False  # came while "early" was handed over: it waits its turn
    assert state.push() == [b"meanwhile"]
    assert state.push() == []
    assert state.received(b"late") is True
    assert state.take(100) is None
    assert not state.end_due()
    state.eof_received()
    assert state.end_due()
    assert not state.end_due()  # the end is told once


# --- ends and resets -----------------------------------------------------


@pytest.mark.timeout(10)
def test_eof_comes_after_the_data_before_it() -> None:
    state = receiver()
    state.received(b"last")
    state.eof_received()
    assert not state.at_eof
    assert drain(state) == (b"last", None)
    assert state.at_eof
    assert state.take(100) == b""


@pytest.mark.timeout(10)
def test_no_credit_is_returned_once_the_peer_ended() -> None:
    state = receiver(window=1000)
    state.received(b"x" * 900)
    state.eof_received()
    assert drain(state) == (b"x" * 900, None)


@pytest.mark.timeout(10)
def test_data_after_eof_is_still_handed_out() -> None:
    """A writer thread may send what it had credit for after another thread's Eof went out."""
    state = receiver()
    state.eof_received()
    assert state.received(b"straggler") is False
    assert state.take(100) == b"straggler"
    assert state.take(100) == b""


@pytest.mark.timeout(10)
def test_a_reset_ends_reads_after_the_data_before_it_and_breaks_writes() -> None:
    state = receiver()
    state.received(b"before")
    state.reset_received("closed")
    assert state.ended and state.broken
    assert drain(state)[0] == b"before"
    assert state.take(100) == b""  # reads see the end
    with pytest.raises(BrokenPipeError, match=r"remote end of <Stream user#7 with user> was closed \(closed\)"):
        state.sendable(1)
    assert state.close() is None  # the peer knows: nothing to send


@pytest.mark.timeout(10)
def test_a_failure_is_raised_to_readers_once_nothing_is_left() -> None:
    state = receiver()
    state.received(b"kept")
    state.fail(ConnectionLost("gone"))
    state.fail(ConnectionLost("later"))  # the first failure is the one reported
    assert drain(state)[0] == b"kept"
    with pytest.raises(ConnectionLost, match="gone"):
        state.take(100)
    assert state.write_ready  # a waiting writer must wake up to its failure


@pytest.mark.timeout(10)
def test_data_after_a_local_close_is_dropped() -> None:
    state = receiver()
    state.received(b"unread")
    assert state.close() == wire.Reset(AGENT, USER, 7, False, "closed")
    assert state.close() is None  # closed once
    assert state.received(b"more") is False
    assert state.take(100) == b""
    assert state.buffered == 6  # the dropped bytes never counted


@pytest.mark.timeout(10)
def test_close_after_both_ends_sends_nothing() -> None:
    state = sender()
    assert state.close_write() is not None
    state.eof_received()
    assert state.close() is None


@pytest.mark.timeout(10)
def test_a_one_way_stream_never_reads_from_its_peer() -> None:
    state = StreamState(USER, AGENT, USER, 7, 1000, one_way=True)
    assert state.take(10) == b""
    assert state.sendable(10) == 10


@pytest.mark.timeout(10)
def test_an_abort_fails_here_and_resets_there() -> None:
    state = receiver()
    error = ProtocolError("bad")
    assert state.abort(error) == wire.Reset(AGENT, USER, 7, False, "bad")
    assert state.error is error


# --- the per-link budget -------------------------------------------------


@pytest.mark.timeout(10)
def test_a_budget_admits_streams_up_to_its_bound() -> None:
    budget = PeerBudget(AGENT)
    too_wide = MAX_WINDOW + 1
    assert budget.admit(too_wide) == f"opened a stream with a window of {too_wide} bytes (at most {MAX_WINDOW})"
    for _ in range(MAX_STREAMS):
        assert budget.admit(1000) is None
    assert budget.admit(1000) == f"opened more than {MAX_STREAMS} streams at once (with the nodes behind agent)"
    budget.stream_gone()
    assert budget.admit(1000) is None


@pytest.mark.timeout(10)
def test_a_budget_holds_unaccepted_bytes_up_to_its_bound() -> None:
    budget = PeerBudget(AGENT)
    assert budget.hold(MAX_UNACCEPTED - 1)
    assert not budget.hold(2)
    assert budget.unaccepted == MAX_UNACCEPTED - 1
    budget.release(MAX_UNACCEPTED - 1)
    assert budget.hold(2)


@pytest.mark.timeout(10)
def test_the_neighbours_excess_ends_the_link_and_anothers_resets_its_stream() -> None:
    budget = PeerBudget(AGENT)
    with pytest.raises(ProtocolError, match="agent too much"):
        budget.refusal(USER, AGENT, 3, "too much")
    assert budget.refusal(USER, P1, 3, "too much") == wire.Reset(USER, P1, 3, False, "too much")


# --- routing decisions -----------------------------------------------------


class Hop:
    """A link as the decisions see it."""

    __slots__ = ("name", "peer_max_frame")

    def __init__(self, name: str, peer_max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.name = name
        self.peer_max_frame = peer_max_frame

    def __repr__(self) -> str:
        return f"<Hop {self.name}>"


@pytest.fixture
def agent_routes() -> Tuple[RouteTable[Hop], Hop, Hop]:
    """The agent's table: the user over one link, the privileged agent (and plugin(1) behind it) over another."""
    routes: RouteTable[Hop] = RouteTable(AGENT)
    up, down = Hop("up"), Hop("down", peer_max_frame=wire.MIN_MAX_FRAME)
    routes.link_up(up, USER)
    routes.link_up(down, PRIV)
    routes.advertised(down, [(P1, 1)])
    return routes, up, down


def call(src: str, dst: str) -> wire.Call:
    return wire.Call(9, src, dst, 1, 1, msgspec.Raw(b"\x90"))


@pytest.mark.timeout(10)
def test_a_message_over_the_wrong_link_is_dropped(agent_routes: Tuple[RouteTable[Hop], Hop, Hop]) -> None:
    routes, up, down = agent_routes
    assert dispatch.decide(routes, down, call(USER, AGENT), BODY) is dispatch.DROP  # the user is reached over up
    assert dispatch.decide(routes, up, call(P1, AGENT), BODY) is dispatch.DROP
    assert dispatch.decide(routes, up, call("nobody", AGENT), BODY) is dispatch.DROP
    assert dispatch.decide(routes, up, call(AGENT, PRIV), BODY) is dispatch.DROP  # not from here either


@pytest.mark.timeout(10)
def test_messages_for_this_node_are_delivered_by_kind(agent_routes: Tuple[RouteTable[Hop], Hop, Hop]) -> None:
    routes, up, _ = agent_routes
    raw = msgspec.Raw(b"\xc0")
    expected: List[Tuple[Any, dispatch.Act]] = [
        (call(USER, AGENT), dispatch.CALL),
        (wire.Notify(USER, AGENT, 1, 1, raw), dispatch.NOTIFY),
        (wire.Reply(9, USER, AGENT, raw), dispatch.ANSWER),
        (wire.Fail(9, USER, AGENT, "internal", "boom"), dispatch.ANSWER),
        (wire.Open(USER, AGENT, 3, 1000), dispatch.OPEN),
        (wire.Data(USER, AGENT, 3, True, memoryview(b"x")), dispatch.STREAM),
        (wire.Credit(USER, AGENT, 3, True, 10), dispatch.STREAM),
        (wire.Eof(USER, AGENT, 3, True), dispatch.STREAM),
        (wire.Reset(USER, AGENT, 3, True, "closed"), dispatch.STREAM),
    ]
    for message, act in expected:
        assert dispatch.decide(routes, up, message, BODY) is act, message


@pytest.mark.timeout(10)
def test_messages_for_others_go_on_over_the_next_hop(agent_routes: Tuple[RouteTable[Hop], Hop, Hop]) -> None:
    routes, up, down = agent_routes
    assert dispatch.decide(routes, up, call(USER, PRIV), BODY) is down
    assert dispatch.decide(routes, up, call(USER, P1), BODY) is down
    assert dispatch.decide(routes, down, wire.Reply(9, P1, USER, msgspec.Raw(b"\xc0")), BODY) is up


@pytest.mark.timeout(10)
def test_a_call_nobody_can_reach_fails_as_unreachable(agent_routes: Tuple[RouteTable[Hop], Hop, Hop]) -> None:
    routes, up, _ = agent_routes
    decision = dispatch.decide(routes, up, call(USER, wire.plugin(5)), BODY)
    assert isinstance(decision, dispatch.Bounce)
    assert decision.answer == wire.Fail(9, AGENT, USER, "unreachable", "agent has no route to 'plugin(5)'")
    back = dispatch.decide(routes, up, call(USER, USER), BODY)  # its route leads back where it came from
    assert isinstance(back, dispatch.Bounce)
    assert back.answer == wire.Fail(9, AGENT, USER, "unreachable", "agent has no route to 'user'")


@pytest.mark.timeout(10)
def test_a_frame_too_big_for_the_next_link_is_bounced(agent_routes: Tuple[RouteTable[Hop], Hop, Hop]) -> None:
    routes, up, down = agent_routes
    size = wire.MIN_MAX_FRAME + 1
    decision = dispatch.decide(routes, up, call(USER, PRIV), memoryview(bytes(size)))
    assert isinstance(decision, dispatch.Bounce)
    why = f"agent cannot pass on {size} bytes: agent-privileged takes at most {wire.MIN_MAX_FRAME}"
    assert decision.answer == wire.Fail(9, AGENT, USER, "unreachable", why)
    assert dispatch.decide(routes, up, call(USER, PRIV), bytes(wire.MIN_MAX_FRAME)) is down
    piece = wire.Data(USER, PRIV, 3, True, memoryview(bytes(size)))  # read apart from its frame: goes on as it is
    assert dispatch.decide(routes, up, piece, piece) is down


@pytest.mark.timeout(10)
def test_what_a_bounced_message_is_answered() -> None:
    raw = msgspec.Raw(b"\xc0")
    why = "agent has no route to 'plugin(5)'"
    answers = [
        (wire.Reply(4, P1, USER, raw), wire.Fail(4, AGENT, USER, "unreachable", why)),
        (wire.Fail(4, P1, USER, "internal", "x"), wire.Fail(4, AGENT, USER, "unreachable", why)),
        (wire.Fail(4, P1, USER, "unreachable", "x"), None),  # never an answer to an answer about a lost route
        (wire.Notify(USER, P1, 1, 1, raw), None),
        (wire.Open(USER, P1, 3, 1000), wire.Reset(AGENT, USER, 3, False, "unreachable")),
        (wire.Data(USER, P1, 3, True, memoryview(b"x")), wire.Reset(AGENT, USER, 3, False, "unreachable")),
        (wire.Eof(USER, P1, 3, False), wire.Reset(AGENT, USER, 3, True, "unreachable")),
        (wire.Credit(USER, P1, 3, True, 10), None),
        (wire.Reset(USER, P1, 3, True, "closed"), None),
    ]
    for message, answer in answers:
        assert dispatch.bounce(AGENT, message, why) == answer, message


@pytest.mark.timeout(10)
def test_a_bounced_calls_failure_is_clipped() -> None:
    answer = dispatch.bounce(AGENT, call(USER, P1), "x" * (dispatch.MAX_FAIL_TEXT + 10))
    assert isinstance(answer, wire.Fail)
    assert answer.message == "x" * dispatch.MAX_FAIL_TEXT + "..."


@pytest.mark.timeout(10)
def test_stream_messages_find_their_stream_by_opener() -> None:
    assert dispatch.stream_key(AGENT, wire.Data(USER, AGENT, 3, True, memoryview(b""))) == (USER, 3)
    assert dispatch.stream_key(AGENT, wire.Credit(USER, AGENT, 3, False, 1)) == (AGENT, 3)


@pytest.mark.timeout(10)
def test_data_and_ends_on_an_unknown_stream_reset_it() -> None:
    data = wire.Data(USER, AGENT, 3, True, memoryview(b"x"))
    assert dispatch.no_such_stream(AGENT, data) == wire.Reset(AGENT, USER, 3, False, "no such stream")
    eof = wire.Eof(USER, AGENT, 3, False)
    assert dispatch.no_such_stream(AGENT, eof) == wire.Reset(AGENT, USER, 3, True, "no such stream")
    assert dispatch.no_such_stream(AGENT, wire.Credit(USER, AGENT, 3, True, 1)) is None
    assert dispatch.no_such_stream(AGENT, wire.Reset(USER, AGENT, 3, True, "closed")) is None  # no reset loops


@pytest.mark.timeout(10)
def test_only_the_callee_answers_but_any_router_may_say_unreachable() -> None:
    raw = msgspec.Raw(b"\xc0")
    assert dispatch.answers(wire.Reply(1, AGENT, USER, raw), AGENT)
    assert not dispatch.answers(wire.Reply(1, P1, USER, raw), AGENT)
    assert not dispatch.answers(wire.Fail(1, P1, USER, "internal", "x"), AGENT)
    assert dispatch.answers(wire.Fail(1, P1, USER, "unreachable", "x"), AGENT)


# --- services without a router ---------------------------------------------


class EchoApi(Service, namespace=400):
    @rpc(1)
    def echo(self, text: str) -> str: ...

    @rpc(2, oneway=True)
    def note(self, text: str) -> None: ...


class Answered:
    def __init__(self, result: bytes) -> None:
        self._result = result
        self.timeout: Optional[float] = None

    def result(self, timeout: Optional[float] = None) -> bytes:
        self.timeout = timeout
        return self._result


class RecordingCaller:
    """Answers every call with its first argument, and records what was sent."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, str, int, int, Any]] = []
        self.answer: Optional[Answered] = None

    def call(self, dst: str, ns: int, method: int, args: bytes, secret: bool = False) -> Answered:
        self.sent.append(("call", dst, ns, method, msgspec.msgpack.decode(args)))
        self.answer = Answered(wire.encode_value(msgspec.msgpack.decode(args)[0]))
        return self.answer

    def notify(self, dst: str, ns: int, method: int, args: bytes) -> None:
        self.sent.append(("notify", dst, ns, method, msgspec.msgpack.decode(args)))


@pytest.mark.timeout(10)
def test_a_proxy_calls_through_any_caller() -> None:
    caller = RecordingCaller()
    api = proxy(EchoApi, caller, AGENT, timeout=2.5)
    assert api.echo("hi") == "hi"
    assert caller.answer is not None and caller.answer.timeout == 2.5
    assert api.note(text="x") is None
    assert caller.sent == [("call", AGENT, 400, 1, ["hi"]), ("notify", AGENT, 400, 2, ["x"])]


# --- layers ----------------------------------------------------------------


def relative_imports(path: pathlib.Path) -> List[str]:
    """Every module ``path`` imports from within remowt, as a dotted name relative to the package (``rpc.link``)."""
    package = path.relative_to(REMOWT).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                found.append(".".join([*base, node.module] if node.module else base))
            elif node.module and node.module.startswith("remowt"):
                found.append(node.module.partition(".")[2])
        elif isinstance(node, ast.Import):
            found += [alias.name.partition(".")[2] for alias in node.names if alias.name.startswith("remowt")]
    return found


@pytest.mark.timeout(10)
def test_the_protocol_layer_imports_nothing_above_it() -> None:
    modules = sorted((REMOWT / "protocol").glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        for name in relative_imports(path):
            assert name == "errors" or name.startswith("protocol"), f"{path.name} imports {name}"


@pytest.mark.timeout(10)
def test_streams_do_not_import_the_router() -> None:
    names = relative_imports(REMOWT / "rpc" / "streams.py")
    assert "rpc.link" in names  # the check sees the imports
    assert not [name for name in names if name.startswith("rpc.router")]
