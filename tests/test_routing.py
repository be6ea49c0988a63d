"""Routers chained by hand over loopback pairs: learned routes, withdrawal, failures in flight."""

from __future__ import annotations

import threading
import time
from typing import Iterator, List

import msgspec
import pytest
from _util import connect_routers, handshake_raw, wait_until

from remowt.endpoints.control import Control, ControlApi
from remowt.errors import ConnectionLost, Unreachable
from remowt.protocol import wire
from remowt.protocol.service import Service, proxy, rpc
from remowt.rpc.router import Router, error_from_fail

P1, P2 = wire.plugin(1), wire.plugin(2)


class BlockerApi(Service, namespace=300):
    @rpc(1)
    def block(self, tag: str) -> str: ...


class Blocker(BlockerApi):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def block(self, tag: str) -> str:
        self.entered.set()
        self.release.wait(30)
        return tag


class Chain:
    """user — agent — plugin(1) — plugin(2), each with Control, plugin(2) also with Blocker."""

    def __init__(self) -> None:
        self.addresses = [wire.USER, wire.AGENT, P1, P2]
        self.routers = [Router(a) for a in self.addresses]
        for router in self.routers:
            router.register(Control(router.address))
        self.blocker = Blocker()
        self.routers[3].register(self.blocker)
        self.links = [connect_routers(a, b) for a, b in zip(self.routers, self.routers[1:])]

    @property
    def user(self) -> Router:
        return self.routers[0]

    def close(self) -> None:
        self.blocker.release.set()
        for router in self.routers:
            router.close()


@pytest.fixture
def chain() -> Iterator[Chain]:
    c = Chain()
    try:
        yield c
    finally:
        c.close()


@pytest.mark.timeout(30)
def test_routes_are_learned_through_the_chain(chain: Chain) -> None:
    assert chain.user.wait_reachable(P2, 10)
    assert chain.user.reachable() == {wire.AGENT: 1, P1: 2, P2: 3}
    assert chain.routers[3].wait_reachable(wire.USER, 10)
    assert chain.routers[3].reachable() == {P1: 1, wire.AGENT: 2, wire.USER: 3}
    info = proxy(ControlApi, chain.user, P2, timeout=10).info()
    assert info.address == P2
    proxy(ControlApi, chain.user, P2, timeout=10).ping()
    # and the other way round
    assert proxy(ControlApi, chain.routers[3], wire.USER, timeout=10).info().address == wire.USER


@pytest.mark.timeout(30)
def test_dropping_middle_link_withdraws_route_and_fails_pending_call(chain: Chain) -> None:
    assert chain.user.wait_reachable(P2, 10)
    call = proxy(BlockerApi, chain.user, P2)
    outcome: List[BaseException] = []
    failed = threading.Event()

    def caller() -> None:
        try:
            call.block("x")
        except BaseException as e:
            outcome.append(e)
        failed.set()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    assert chain.blocker.entered.wait(10), "the call never reached plugin(2)"
    assert not failed.is_set()

    agent_side, _ = chain.links[1]  # agent — plugin(1)
    start = time.monotonic()
    agent_side.close()  # type: ignore[attr-defined]
    assert chain.user.wait_unreachable(P2, 5)
    assert failed.wait(5), "the pending call did not fail"
    elapsed = time.monotonic() - start
    assert elapsed < 0.5, f"pending call failed only after {elapsed:.3f} s"
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost), outcome
    assert chain.user.wait_unreachable(P1, 5)
    assert chain.user.reachable() == {wire.AGENT: 1}
    # the part of the chain still connected still works
    proxy(ControlApi, chain.user, wire.AGENT, timeout=10).ping()
    # and the far side also lost the route back
    assert chain.routers[3].wait_unreachable(wire.USER, 5)
    assert chain.routers[3].reachable() == {P1: 1}


@pytest.mark.timeout(30)
def test_call_to_unreachable_address_fails_at_once(chain: Chain) -> None:
    assert chain.user.wait_reachable(P2, 10)
    start = time.monotonic()
    with pytest.raises(Unreachable) as info:
        proxy(ControlApi, chain.user, wire.plugin(9), timeout=10).ping()
    assert time.monotonic() - start < 0.1
    message = str(info.value)
    assert "plugin(9)" in message
    assert "user" in message
    # it says what is reachable
    assert "plugin(2)" in message
    with pytest.raises(Unreachable):
        chain.user.call(wire.plugin(9), 1, 1, wire.encode_value([]))


@pytest.mark.timeout(30)
def test_unreachable_from_a_middle_router() -> None:
    """A router asked to forward to an address it cannot reach answers the caller with Unreachable."""
    agent = Router(wire.AGENT)
    agent.register(Control(wire.AGENT))
    peer = None
    try:
        _, peer = handshake_raw(agent, wire.USER)
        peer.send_message(wire.Call(5, wire.USER, wire.plugin(5), 1, 1, msgspec.Raw(wire.encode_value([]))))
        fail = peer.wait_for(lambda m: isinstance(m, (wire.Reply, wire.Fail)), 10)
        assert isinstance(fail, wire.Fail), fail
        assert (fail.id, fail.src, fail.dst, fail.kind) == (5, wire.AGENT, wire.USER, "unreachable")
        assert "plugin(5)" in fail.message
        assert isinstance(error_from_fail(fail), Unreachable)
    finally:
        if peer is not None:
            peer.close()
        agent.close()


@pytest.mark.timeout(30)
def test_route_reappears_after_relink(chain: Chain) -> None:
    assert chain.user.wait_reachable(P2, 10)
    agent_side, _ = chain.links[1]
    agent_side.close()  # type: ignore[attr-defined]
    assert chain.user.wait_unreachable(P2, 5)
    # the far router hears of the close on its own reader thread: until then "agent" is still its peer
    assert chain.routers[2].wait_unreachable(wire.AGENT, 5)
    chain.links[1] = connect_routers(chain.routers[1], chain.routers[2])
    assert chain.user.wait_reachable(P2, 5)
    assert proxy(ControlApi, chain.user, P2, timeout=10).info().address == P2


@pytest.mark.timeout(30)
def test_duplicate_address_is_refused() -> None:
    user = Router(wire.USER)
    agent = Router(wire.AGENT)
    try:
        connect_routers(user, agent)
        # a second node calling itself "agent" cannot join
        with pytest.raises(Exception, match="already taken"):
            handshake_raw(user, wire.AGENT)
    finally:
        user.close()
        agent.close()


@pytest.mark.timeout(30)
def test_answer_from_wrong_node_is_ignored() -> None:
    """A reply to the user's call to the agent must come from the agent.

    plugin(7) is a raw peer behind the agent; it answers the user's pending call
    (call ids start at 1 on a fresh router) before the agent does.
    """
    user = Router(wire.USER)
    user.register(Control(wire.USER))
    agent = Router(wire.AGENT)
    agent.register(Control(wire.AGENT))
    blocker = Blocker()
    agent.register(blocker)
    peer = None
    try:
        connect_routers(user, agent)
        _, peer = handshake_raw(agent, wire.plugin(7))
        assert user.wait_reachable(wire.plugin(7), 10)
        pending = user.call(wire.AGENT, BlockerApi.namespace, 1, wire.encode_value(["real"]))
        assert blocker.entered.wait(10)
        forged = wire.Reply(1, wire.plugin(7), wire.USER, msgspec.Raw(wire.encode_value("forged")))
        peer.send_message(forged)
        # a round trip from plugin(7) to the user, behind the forged reply on the same path,
        # makes sure the user has processed the forged reply before the real one is released
        ping = wire.Call(2**40, wire.plugin(7), wire.USER, 1, 1, msgspec.Raw(wire.encode_value([])))
        peer.send_message(ping)
        reply = peer.wait_for(lambda m: isinstance(m, wire.Reply) and m.id == 2**40, 10)
        assert reply is not None
        blocker.release.set()
        assert msgspec.msgpack.decode(pending.result(10)) == "real"
    finally:
        blocker.release.set()
        if peer is not None:
            peer.close()
        user.close()
        agent.close()


@pytest.mark.timeout(60)
def test_stream_through_a_router_over_pipes_splits_and_forwards_payloads() -> None:
    """Over fd links big Data payloads are read apart from their frames; the middle router forwards the pieces."""
    routers = [Router(a) for a in (wire.USER, wire.AGENT, P1)]
    for router in routers:
        router.register(Control(router.address))
    try:
        for a, b in zip(routers, routers[1:]):
            connect_routers(a, b, fds=True)
        user, plugin = routers[0], routers[2]
        assert user.wait_reachable(P1, 10)
        sent = bytes(range(251)) * (3 * 4096 + 7)  # several windows, in frames big enough to split
        out = user.open_stream(P1)
        proxy(ControlApi, user, P1, timeout=10).ping()  # arrives after the Open: the stream is there now
        into = plugin.accept_stream(wire.USER, out.sid)
        writer = threading.Thread(target=lambda: (out.write(sent, timeout=30), out.close_write()), daemon=True)
        writer.start()
        got = into.readall(timeout=30)
        writer.join(30)
        assert got == sent
    finally:
        for router in routers:
            router.close()


@pytest.mark.timeout(30)
def test_push_mode_keeps_the_order_of_what_arrives_while_the_waiting_chunks_are_handed_over() -> None:
    """deliver_to runs on the consumer's thread while the link's thread delivers: no chunk overtakes another."""
    user, agent = Router(wire.USER), Router(wire.AGENT)
    agent.register(Control(agent.address))
    links = connect_routers(user, agent)
    try:
        out = user.open_stream(wire.AGENT)
        proxy(ControlApi, user, wire.AGENT, timeout=10).ping()  # arrives after the Open: the stream is there now
        into = agent.accept_stream(wire.USER, out.sid)
        for part in (b"one ", b"two "):
            out.write(part, timeout=10)
        assert wait_until(lambda: into.buffered == 8, 10)
        got: List[bytes] = []

        def listener(chunk: object) -> None:
            got.append(bytes(chunk))  # type: ignore[call-overload]
            if len(got) == 1:  # the link's thread brings more while the waiting chunks are being handed over
                out.write(b"late", timeout=10)
                assert wait_until(lambda: into.buffered == 12, 10)

        into.deliver_to(listener)
        assert wait_until(lambda: len(got) == 3, 10)
        assert b"".join(got) == b"one two late"
    finally:
        user.close()
        agent.close()
        for link in links:
            link.join(10)  # type: ignore[attr-defined]
