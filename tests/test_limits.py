"""Bounded resources against oversized calls and hostile or broken peers.

The hostile peer is the test speaking the wire itself (a :class:`RawPeer`):
a second link of the client's router calling itself ``plugin(7)``, a fake
agent, or a fake client of a real local agent process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from typing import Any, Dict, Iterator, List, Tuple

import msgspec
import pytest
from _util import RawPeer, connect_routers, handshake_raw, rss_bytes, wait_until

import remowt
from remowt.deploy.bundle import AgentBundle, artifact_name, local_platform
from remowt.deploy.local import start_local_agent
from remowt.deploy.remote import MAGIC, DeployError, start_agent
from remowt.endpoints.control import Control, ControlApi
from remowt.endpoints.subprocess import SpawnOptions
from remowt.errors import BadArguments, MessageTooLarge, ProtocolError, ResultTooLarge, Unreachable
from remowt.protocol import wire
from remowt.protocol.service import Service, proxy, rpc
from remowt.rpc.router import Router
from remowt.transports import loopback
from remowt.transports.stdio import spawn_framed_child

HOSTILE = wire.plugin(7)
MiB = 1024 * 1024
TOO_BIG = 10 * MiB  # over the default frame limit of 8 MiB


@pytest.fixture
def hostile(conn: remowt.Remowt) -> Iterator[Tuple[Any, RawPeer]]:
    """A raw peer calling itself plugin(7), linked to the client's router beside the connection's agent."""
    link, peer = handshake_raw(conn.router, HOSTILE)
    try:
        yield link, peer
    finally:
        peer.close()


def closed_for(link: Any, peer: RawPeer, words: str) -> None:
    """The router closed ``link`` for a protocol error that says ``words``."""
    assert peer.eof.wait(10), "the link of the misbehaving peer is still open"
    assert wait_until(lambda: link.closed, 10)
    assert isinstance(link.close_reason, ProtocolError), repr(link.close_reason)
    assert words in str(link.close_reason)


def still_works(conn: remowt.Remowt) -> None:
    assert conn.run(["echo", "hi"], capture_output=True, timeout=20).stdout == b"hi\n"
    conn.ping()


def raw_ping(peer: RawPeer, src: str, dst: str, call_id: int) -> None:
    peer.send_message(wire.Call(call_id, src, dst, ControlApi.namespace, 1, msgspec.Raw(wire.encode_value([]))))


# --- oversized calls: a clear local error, the connection stays ---------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["argv", "env", "popen"])
def test_oversize_spawn_is_e2big_and_the_connection_stays(conn: remowt.Remowt, where: str) -> None:
    huge = "x" * TOO_BIG
    with pytest.raises(OSError) as e:
        if where == "argv":
            conn.spawn(["true", huge], stdin=remowt.PIPE, stdout=remowt.PIPE)
        elif where == "env":
            conn.spawn(["true"], SpawnOptions(env={"HUGE": huge}), stderr=remowt.PIPE)
        else:
            remowt.Popen(["echo", huge], stdout=remowt.PIPE, connection=conn)
    assert e.value.errno == errno.E2BIG, e.value
    assert "frame limit" in str(e.value)
    assert conn.router.stream_count() == 0
    still_works(conn)


@pytest.mark.timeout(30)
def test_oversize_spawn_sends_nothing() -> None:
    """A fake agent sees neither the spawn call nor the opens of its streams."""
    router = Router(wire.USER)
    link, peer = handshake_raw(router, wire.AGENT)
    conn = remowt.Remowt(router, link, description="fake agent")
    try:
        with pytest.raises(OSError) as e:
            conn.spawn(["true", "x" * TOO_BIG], stdin=remowt.PIPE, stdout=remowt.PIPE, stderr=remowt.PIPE)
        assert e.value.errno == errno.E2BIG
        router.notify(wire.AGENT, ControlApi.namespace, 1, wire.encode_value([]))
        message = peer.wait_for(lambda m: not isinstance(m, wire.Routes), 10)
        assert isinstance(message, wire.Notify), message  # the first thing after the routes
        assert router.stream_count() == 0
        assert not link.closed
    finally:
        conn.close()
        peer.close()


@pytest.mark.timeout(60)
def test_oversize_call_and_notify_raise_locally(conn: remowt.Remowt) -> None:
    args = wire.encode_value(["x" * TOO_BIG])
    with pytest.raises(MessageTooLarge, match=r"is \d+ bytes encoded, more than the peer's frame limit of 8388608"):
        conn.router.call(wire.AGENT, ControlApi.namespace, 1, args)
    with pytest.raises(MessageTooLarge):
        conn.router.notify(wire.AGENT, ControlApi.namespace, 1, args)
    assert not conn.link.closed
    still_works(conn)


class BigApi(Service, namespace=310):
    @rpc(1)
    def make(self, size: int) -> bytes: ...

    @rpc(2)
    def refuse(self, size: int) -> None: ...

    @rpc(3)
    def echo(self, data: bytes) -> int: ...

    @rpc(4)
    def same(self, value: Any) -> Any: ...


class Big(BigApi):
    def make(self, size: int) -> bytes:
        return bytes(size)

    def refuse(self, size: int) -> None:
        raise BadArguments("x" * size)

    def echo(self, data: bytes) -> int:
        return len(data)

    def same(self, value: Any) -> Any:
        return value


@pytest.fixture
def pair() -> Iterator[Tuple[Router, Router]]:
    """A user router linked to an agent router that serves :class:`Big`."""
    user, agent = Router(wire.USER), Router(wire.AGENT)
    agent.register(Control(wire.AGENT))
    agent.register(Big())
    connect_routers(user, agent)
    try:
        yield user, agent
    finally:
        user.close()
        agent.close()


@pytest.mark.timeout(30)
def test_oversize_result_is_a_failure_not_a_lost_link(pair: Tuple[Router, Router]) -> None:
    user, _ = pair
    big = proxy(BigApi, user, wire.AGENT, timeout=20)
    with pytest.raises(ResultTooLarge, match=r"the result of BigApi\.make is \d+ bytes encoded"):
        big.make(TOO_BIG)
    with pytest.raises(BadArguments) as e:  # a huge error message is cut, not a huge frame
        big.refuse(TOO_BIG)
    assert 1000 < len(str(e.value)) < 100_000
    assert big.make(10) == bytes(10)
    proxy(ControlApi, user, wire.AGENT, timeout=20).ping()


@pytest.mark.timeout(30)
def test_a_frame_too_big_for_the_next_link_is_not_forwarded() -> None:
    """user — agent — plugin(1), whose frame limit is smaller: the call fails, every link stays."""
    user, agent, plugin = Router(wire.USER), Router(wire.AGENT), Router(wire.plugin(1), max_frame=2 * MiB)
    plugin.register(Control(plugin.address))
    plugin.register(Big())
    try:
        user_link, _ = connect_routers(user, agent)
        agent_link, _ = connect_routers(agent, plugin)
        assert user.wait_reachable(plugin.address, 10)
        big = proxy(BigApi, user, plugin.address, timeout=20)
        with pytest.raises(Unreachable, match=r"agent cannot pass on \d+ bytes: plugin\(1\) takes at most 2097152"):
            big.echo(bytes(3 * MiB))
        assert big.echo(bytes(MiB)) == MiB
        assert not user_link.closed and not agent_link.closed  # type: ignore[attr-defined]
    finally:
        for router in (user, agent, plugin):
            router.close()


@pytest.mark.timeout(30)
def test_a_peer_that_takes_tiny_frames_is_refused() -> None:
    router = Router(wire.USER)
    router_end, test_end = loopback.pair()
    peer = RawPeer(test_end)
    try:
        peer.send_message(wire.Hello(wire.PROTOCOL_VERSION, wire.AGENT, 100))
        with pytest.raises(ProtocolError, match="frames of at most 100 bytes"):
            router.add_link(router_end, timeout=10)
    finally:
        peer.close()
        router.close()


# --- hostile peers: refused on their link, memory bounded, the other links fine -----------------


@pytest.mark.timeout(60)
def test_unsolicited_open_with_a_huge_window(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer]) -> None:
    link, peer = hostile
    before = rss_bytes(os.getpid())
    peer.send_message(wire.Open(HOSTILE, wire.USER, 1, 2**62))
    framer = wire.DataFramer(HOSTILE, wire.USER, 1, True)
    chunk = bytes(256 * 1024)
    for _ in range(256):  # 64 MiB, nobody reads it
        peer.send(framer.header(len(chunk)) + chunk)
        if peer.eof.is_set():
            break
    closed_for(link, peer, "window")
    assert rss_bytes(os.getpid()) - before < 32 * MiB
    still_works(conn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("from_behind", [False, True], ids=["neighbour", "node-behind"])
def test_data_on_streams_nobody_accepted(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer], from_behind: bool) -> None:
    """Each stream within its window, but many of them: what nobody asked for is bounded per link."""
    link, peer = hostile
    src = behind(conn, peer, 1)[0] if from_behind else HOSTILE
    before = rss_bytes(os.getpid())
    chunk = bytes(256 * 1024)
    for sid in range(16):  # 16 streams of 4 MiB: 64 MiB if nothing stopped it
        peer.send_message(wire.Open(src, wire.USER, sid, 4 * MiB))
        framer = wire.DataFramer(src, wire.USER, sid, True)
        peer.send(b"".join(framer.header(len(chunk)) + chunk for _ in range(16)))
        if peer.eof.is_set():
            break
    if from_behind:  # that node's streams are reset, the link stays
        reset = peer.wait_for(lambda m: isinstance(m, wire.Reset), 10)
        assert isinstance(reset, wire.Reset) and "on streams nobody here accepted" in reset.reason, reset
        assert not link.closed
    else:
        closed_for(link, peer, "on streams nobody here accepted")
    assert rss_bytes(os.getpid()) - before < 32 * MiB
    still_works(conn)


def flood_opens(peer: RawPeer, sources: List[str], dst: str, count: int, pid: int) -> int:
    """Send ``count`` Opens, from each of ``sources`` in turn, until the peer closes; the peak RSS growth of ``pid``."""
    start = peak = rss_bytes(pid)
    for first in range(0, count, 1000):
        opens = (wire.Open(sources[sid % len(sources)], dst, sid, 1) for sid in range(first, first + 1000))
        peer.send(b"".join(bytes(wire.encode(message)) for message in opens))
        try:
            peak = max(peak, rss_bytes(pid))
        except (AssertionError, FileNotFoundError, ProcessLookupError):  # the process ended
            break
        if peer.eof.is_set():
            break
    return peak - start


@pytest.mark.timeout(60)
def test_open_flood_at_the_client(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer]) -> None:
    link, peer = hostile
    growth = flood_opens(peer, [HOSTILE], wire.USER, 50_000, os.getpid())
    closed_for(link, peer, "opened more than 4096 streams at once")
    assert growth < 64 * MiB
    assert wait_until(lambda: conn.router.stream_count() == 0, 10)  # dropped as the link's close is handled
    still_works(conn)


def behind(conn: remowt.Remowt, peer: RawPeer, count: int) -> List[str]:
    """Have the hostile peer announce ``count`` nodes behind it; their addresses."""
    addresses = [wire.plugin(100 + n) for n in range(count)]
    peer.send_message(wire.Routes([(address, 1) for address in addresses]))
    assert wait_until(lambda: all(a in conn.router.reachable() for a in addresses), 10)
    return addresses


@pytest.mark.timeout(60)
def test_open_flood_from_nodes_behind_a_link(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer]) -> None:
    """The bound is per link, whatever addresses a peer announces; the excess of nodes behind it is reset."""
    link, peer = hostile
    addresses = behind(conn, peer, 3)
    growth = flood_opens(peer, addresses, wire.USER, 6000, os.getpid())  # 2000 each: too many together
    reset = peer.wait_for(lambda m: isinstance(m, wire.Reset), 10)
    assert isinstance(reset, wire.Reset) and "opened more than 4096 streams at once" in reset.reason, reset
    assert growth < 64 * MiB
    assert conn.router.stream_count() == 4096
    assert not link.closed
    still_works(conn)


@pytest.mark.timeout(60)
def test_open_flood_at_a_local_agent() -> None:
    """A fake client floods a real agent process with Opens: the agent refuses the link before it grows."""
    transport = start_local_agent()
    peer = RawPeer(transport)
    try:
        peer.send_message(wire.Hello(wire.PROTOCOL_VERSION, wire.USER, wire.DEFAULT_MAX_FRAME))
        assert isinstance(peer.next_message(10), wire.Hello)
        growth = flood_opens(peer, [wire.USER], wire.AGENT, 50_000, transport.process.pid)
        raw_ping(peer, wire.USER, wire.AGENT, 1)
        answer = peer.wait_for(lambda m: isinstance(m, (wire.Reply, wire.Fail)), 20)
        assert answer is None, "the agent answered after 50000 opens"
        assert growth < 64 * MiB
        assert wait_until(lambda: "opened more than 4096 streams at once" in transport.stderr_tail(), 10)
    finally:
        peer.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("from_behind", [False, True], ids=["neighbour", "node-behind"])
def test_credit_beyond_the_window(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer], from_behind: bool) -> None:
    link, peer = hostile
    src = behind(conn, peer, 1)[0] if from_behind else HOSTILE
    stream = conn.router.open_stream(src)
    peer.send_message(wire.Credit(src, wire.USER, stream.sid, False, 2**62))
    if from_behind:  # only that stream breaks
        reset = peer.wait_for(lambda m: isinstance(m, wire.Reset), 10)
        assert isinstance(reset, wire.Reset) and "credit beyond the window" in reset.reason, reset
        with pytest.raises(ProtocolError, match="credit beyond the window"):
            stream.write(b"x")
        assert not link.closed
    else:
        closed_for(link, peer, "credit beyond the window")
        assert wait_until(lambda: stream.broken, 10)
        with pytest.raises(remowt.ConnectionLost):
            stream.write(b"x")
    still_works(conn)


@pytest.mark.timeout(30)
def test_deep_nesting_is_a_protocol_error(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer]) -> None:
    link, peer = hostile
    ping = bytes(wire.encode(wire.Call(1, HOSTILE, wire.USER, ControlApi.namespace, 1, msgspec.Raw(b"\xc0"))))
    body = ping[4:-1] + b"\x91" * 1_000_000 + b"\xc0"
    peer.send(struct.pack(">I", len(body)) + body)
    closed_for(link, peer, "nested too deeply")
    still_works(conn)


def test_deeply_nested_arguments_and_results_are_malformed_not_a_crash() -> None:
    spec = BigApi.methods["same"]
    deep = b"\x91" * 1_000_000 + b"\xc0"
    with pytest.raises(msgspec.ValidationError, match="nested too deeply"):
        spec.decode_args(b"\x91" + deep)
    with pytest.raises(msgspec.ValidationError, match="nested too deeply"):
        spec.decode_result(deep)


# --- the bootstrap's report frames ------------------------------------------------------------


def printf_bytes(data: bytes) -> str:
    return "printf '" + "".join(f"\\{byte:03o}" for byte in data) + "'"


def boot_frame(message: Dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> AgentBundle:
    directory = str(tmp_path_factory.mktemp("tiny-bundle"))
    artifact = b"not really an agent"
    with open(os.path.join(directory, artifact_name(local_platform())), "wb") as f:
        f.write(artifact)
    with open(os.path.join(directory, "hashes"), "w") as f:
        f.write(f"{local_platform()} {hashlib.sha256(artifact).hexdigest()}\n")
    with open(os.path.join(directory, "trees"), "w") as f:
        f.write(f"{hashlib.sha256(artifact).hexdigest()} {'0' * 64}\n")  # never unpacked
    return AgentBundle.from_dir(directory)


def without(message: Dict[str, Any], field: str) -> Dict[str, Any]:
    return {k: v for k, v in message.items() if k != field}


READY = {"kind": "ready", "platform": "p", "python": "3", "executable": "x", "path": "/x", "note": ""}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "frames, field",
    [
        ([{"kind": "status", "installed": False}], "platform"),
        ([{"kind": "status", "platform": "p", "installed": True}, {**READY, "path": None}], "path"),
        (
            [{"kind": "status", "platform": "p", "installed": True}, {k: v for k, v in READY.items() if k != "note"}],
            "note",
        ),
    ],
    ids=["status-without-platform", "ready-with-a-bad-path", "ready-without-note"],
)
def test_a_boot_frame_missing_a_field_is_a_deploy_error(
    tiny_bundle: AgentBundle,
    frames: List[dict],
    field: str,  # type: ignore[type-arg]
) -> None:
    said = MAGIC + b"".join(boot_frame(frame) for frame in frames)
    transport = spawn_framed_child(["/bin/sh", "-c", printf_bytes(said) + "; exec sleep 30"])
    transport.exit_timeout = 0.2
    with pytest.raises(DeployError, match=f"malformed: .*{field}") as e:
        start_agent(transport, tiny_bundle, timeout=10)
    assert e.value.kind == "protocol"


@pytest.mark.timeout(30)
def test_deeply_nested_json_output_is_a_value_error() -> None:
    with remowt.loopback() as conn:
        deep = conn.cmd("python3").args(["-c", "print('[' * 100000 + ']' * 100000)"])
        with pytest.raises(ValueError, match="nested too deeply"):
            deep.run_value(Any)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_another_peer_cannot_speak_on_a_stream(conn: remowt.Remowt, hostile: Tuple[Any, RawPeer]) -> None:
    """A stream opened to the agent hears only the agent: a third node's Data or Reset on its id is refused."""
    link, peer = hostile
    proc = conn.spawn(["sh", "-c", "read line; echo got $line"], stdin=remowt.PIPE, stdout=remowt.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    for stream in (proc.stdout, proc.stdin):
        peer.send_message(wire.Data(HOSTILE, wire.USER, stream.sid, False, memoryview(b"forged\n")))
        peer.send_message(wire.Reset(HOSTILE, wire.USER, stream.sid, False, "forged"))
    answer = peer.wait_for(lambda m: isinstance(m, wire.Reset), 10)
    assert isinstance(answer, wire.Reset) and answer.reason == "no such stream", answer
    proc.stdin.write(b"hi\n")
    proc.stdin.close_write()
    assert proc.stdout.readall(timeout=20) == b"got hi\n"
    assert proc.wait(20) == 0
    assert not link.closed
