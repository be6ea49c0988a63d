"""Services: dispatch errors, argument validation, handler failures, declarations."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Iterator, List, Tuple

import msgspec
import pytest
from _util import connect_routers

import remowt
from remowt.endpoints.control import Control, ControlApi
from remowt.endpoints.subprocess import SubprocessApi
from remowt.errors import BadArguments, InternalError, RemoteError, UnknownMethod
from remowt.protocol import wire
from remowt.protocol.service import Service, proxy, rpc
from remowt.rpc.router import Router
from remowt.user.popen import CLOSED


class CalcApi(Service, namespace=200):
    @rpc(1)
    def add(self, a: int, b: int) -> int: ...

    @rpc(2)
    def explode(self, why: str) -> None: ...

    @rpc(3, inline=True)
    def explode_inline(self, why: str) -> None: ...

    @rpc(4, oneway=True)
    def record(self, value: int) -> None: ...

    @rpc(5)
    def caller(self) -> str: ...

    @rpc(6)
    def unencodable(self) -> int: ...

    @rpc(7, inline=True)
    def unencodable_inline(self) -> int: ...


class Calc(CalcApi):
    def __init__(self, router: Router) -> None:
        self.router = router
        self.recorded: List[int] = []
        self.got = threading.Event()

    def add(self, a: int, b: int) -> int:
        return a + b

    def explode(self, why: str) -> None:
        raise KeyError(why)

    def explode_inline(self, why: str) -> None:
        raise ZeroDivisionError(why)

    def record(self, value: int) -> None:
        self.recorded.append(value)
        self.got.set()

    def caller(self) -> str:
        return self.router.caller()

    def unencodable(self) -> int:
        return 2**64  # msgpack cannot carry it

    def unencodable_inline(self) -> int:
        return 2**64


@pytest.fixture
def pair() -> Iterator[Tuple[Router, Router, Calc]]:
    user = Router(wire.USER)
    user.register(Control(wire.USER))
    agent = Router(wire.AGENT)
    agent.register(Control(wire.AGENT))
    calc = Calc(agent)
    agent.register(calc)
    connect_routers(user, agent)
    try:
        yield user, agent, calc
    finally:
        user.close()
        agent.close()


def ping(router: Router, dst: str = wire.AGENT) -> None:
    proxy(ControlApi, router, dst, timeout=10).ping()


@pytest.mark.timeout(30)
def test_typed_call(pair: Tuple[Router, Router, Calc]) -> None:
    user, _, _ = pair
    calc = proxy(CalcApi, user, wire.AGENT, timeout=10)
    assert calc.add(2, 3) == 5
    assert calc.add(a=2, b=-3) == -1
    assert calc.caller() == wire.USER


@pytest.mark.timeout(30)
def test_oneway(pair: Tuple[Router, Router, Calc]) -> None:
    user, _, impl = pair
    assert proxy(CalcApi, user, wire.AGENT).record(7) is None
    assert impl.got.wait(10)
    assert impl.recorded == [7]


@pytest.mark.timeout(30)
def test_unknown_namespace_and_method(pair: Tuple[Router, Router, Calc]) -> None:
    user, _, _ = pair
    with pytest.raises(UnknownMethod, match="namespace 999"):
        user.call(wire.AGENT, 999, 1, wire.encode_value([])).result(10)
    with pytest.raises(UnknownMethod, match="method 99"):
        user.call(wire.AGENT, CalcApi.namespace, 99, wire.encode_value([])).result(10)
    ping(user)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [["x", 2], [1], [1, 2, 3], [], {"a": 1, "b": 2}, None, [1.5, 2]],
    ids=["str", "too-few", "too-many", "none", "map", "nil", "float"],
)
def test_bad_arguments(pair: Tuple[Router, Router, Calc], args: object) -> None:
    user, _, _ = pair
    with pytest.raises(BadArguments, match="add"):
        user.call(wire.AGENT, CalcApi.namespace, 1, wire.encode_value(args)).result(10)
    ping(user)


@pytest.mark.timeout(30)
def test_invalid_utf8_argument_is_bad_arguments(pair: Tuple[Router, Router, Calc]) -> None:
    user, _, _ = pair
    # explode(why: str) with a one-byte string that is not UTF-8
    with pytest.raises(BadArguments, match="explode"):
        user.call(wire.AGENT, CalcApi.namespace, 2, b"\x91\xa1\xff").result(10)
    ping(user)


@pytest.mark.timeout(30)
def test_bad_arguments_through_proxy(pair: Tuple[Router, Router, Calc]) -> None:
    user, _, _ = pair
    calc = proxy(CalcApi, user, wire.AGENT, timeout=10)
    with pytest.raises(BadArguments):
        calc.add("two", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        calc.add(1)  # type: ignore[call-arg]  # caught before sending
    assert calc.add(1, 1) == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["explode", "explode_inline"])
def test_handler_exception_is_internal_error(pair: Tuple[Router, Router, Calc], method: str) -> None:
    user, _, _ = pair
    calc = proxy(CalcApi, user, wire.AGENT, timeout=10)
    expected = "KeyError" if method == "explode" else "ZeroDivisionError"
    for _ in range(3):
        with pytest.raises(InternalError, match=expected) as info:
            getattr(calc, method)("kaboom")
        assert "kaboom" in str(info.value)
        assert isinstance(info.value, RemoteError)
    # the link survived
    ping(user)
    assert calc.add(40, 2) == 42
    assert all(not link.closed for link in user.links())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["unencodable", "unencodable_inline"])
def test_unencodable_result_is_internal_error(pair: Tuple[Router, Router, Calc], method: str) -> None:
    """A result that cannot be encoded is a handler failure like any other: the caller gets an answer."""
    user, _, _ = pair
    calc = proxy(CalcApi, user, wire.AGENT, timeout=5)
    with pytest.raises(InternalError, match="OverflowError"):
        getattr(calc, method)()
    ping(user)
    assert all(not link.closed for link in user.links())


@pytest.mark.timeout(30)
def test_duplicate_method_numbers_rejected() -> None:
    with pytest.raises(ValueError, match="share number 1"):

        class Twice(Service, namespace=201):
            @rpc(1)
            def one(self) -> None: ...

            @rpc(1)
            def other(self) -> None: ...


@pytest.mark.timeout(30)
def test_declaration_checks() -> None:
    with pytest.raises(TypeError, match="annotation"):

        class NoHint(Service, namespace=202):
            @rpc(1)
            def f(self, x) -> None: ...  # type: ignore[no-untyped-def]

    with pytest.raises(TypeError, match="return type"):

        class NoReturn(Service, namespace=203):
            @rpc(1)
            def f(self, x: int): ...  # type: ignore[no-untyped-def]

    for name, source in (("Star", "def f(self, *x: int) -> None: ..."), ("Kw", "def f(self, *, x: int) -> None: ...")):
        namespace: dict = {}
        exec(source, namespace)
        with pytest.raises(TypeError, match="plain positional"):
            type(name, (Service,), {"f": rpc(1)(namespace["f"])}, namespace=204)

    with pytest.raises(ValueError):
        rpc(70000)

    with pytest.raises(ValueError):

        class BadNamespace(Service, namespace=-1):
            pass


@pytest.mark.timeout(30)
def test_register_checks(pair: Tuple[Router, Router, Calc]) -> None:
    _, agent, _ = pair
    with pytest.raises(ValueError, match="already served"):
        agent.register(Calc(agent))
    with pytest.raises(TypeError):
        agent.register(object())

    class Partial(CalcApi):
        def add(self, a: int, b: int) -> int:
            return 0

    other = Router(wire.USER)
    try:
        with pytest.raises(TypeError, match="does not implement"):
            other.register(Partial())
    finally:
        other.close()


# --- the same failures against the real agent, on both transports ------------


@pytest.mark.timeout(30)
def test_agent_unknown_namespace_and_method(conn: remowt.Remowt) -> None:
    with pytest.raises(UnknownMethod):
        conn.router.call(conn.address, 999, 1, wire.encode_value([])).result(10)
    with pytest.raises(UnknownMethod):
        conn.router.call(conn.address, SubprocessApi.namespace, 99, wire.encode_value([])).result(10)
    conn.ping()


@pytest.mark.timeout(30)
def test_agent_bad_arguments(conn: remowt.Remowt) -> None:
    # send_signal(handle: int, signum: int) with strings
    with pytest.raises(BadArguments):
        conn.router.call(conn.address, SubprocessApi.namespace, 4, wire.encode_value(["a", "b"])).result(10)
    # spawn with a spec missing its required fields
    with pytest.raises(BadArguments):
        conn.router.call(conn.address, SubprocessApi.namespace, 1, wire.encode_value([{"argv": ["true"]}])).result(10)
    # a spec with an unknown field
    spec = {"handle": 10**6, "argv": ["true"], "bogus": 1}
    with pytest.raises(BadArguments):
        conn.router.call(conn.address, SubprocessApi.namespace, 1, wire.encode_value([spec])).result(10)
    # args that are not even an array
    with pytest.raises(BadArguments):
        conn.router.call(conn.address, SubprocessApi.namespace, 3, msgspec.msgpack.encode("x")).result(10)
    conn.ping()


@pytest.mark.timeout(30)
def test_agent_refuses_bad_spawn_arguments(conn: remowt.Remowt) -> None:
    # the agent's Popen raises ValueError for a NUL byte: the caller's mistake, not a crash
    with pytest.raises(BadArguments, match="embedded null byte"):
        conn.spawn(["echo", "a\0b"], stdout=remowt.PIPE)
    assert conn.ping() < 5
    proc = conn.spawn(["echo", "still here"], stdout=remowt.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readall(timeout=10) == b"still here\n"
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(30)
def test_closed_stdio(conn: remowt.Remowt) -> None:
    """CLOSED: the child's fd is there, but reading or writing it fails with EBADF, as on a closed fd."""
    script = "cat 2>&1; echo $?; echo x >&2 || echo stderr failed"
    proc = conn.spawn(["sh", "-c", script], stdin=CLOSED, stdout=remowt.PIPE, stderr=CLOSED)
    assert proc.stdout is not None
    assert proc.stdout.readall(timeout=10) == b"cat: -: Bad file descriptor\n1\nstderr failed\n"
    assert proc.wait(timeout=10) == 0
    for closed in (["stdin", "stdin"], ["fd3"]):
        spec = {"handle": 10**6, "argv": [b"true"], "closed": closed}
        with pytest.raises(BadArguments, match="closed"):
            conn.router.call(conn.address, SubprocessApi.namespace, 1, wire.encode_value([spec])).result(10)
    with pytest.raises(ValueError, match="CLOSED"):
        conn.spawn(["true"], stdin=remowt.STDOUT)
    assert conn.ping() < 5


def test_the_agents_lazy_services_are_the_declared_namespaces() -> None:
    from remowt.agent import main
    from remowt.endpoints.editor import FileEditApi
    from remowt.endpoints.escalate import EscalateApi
    from remowt.endpoints.fs import FsApi
    from remowt.endpoints.plugins import PluginsApi
    from remowt.endpoints.sockets import SocketsApi
    from remowt.endpoints.systemd import SystemdApi

    declared = (EscalateApi, FileEditApi, FsApi, SocketsApi, PluginsApi, SystemdApi)
    lazy = (main.ESCALATE, main.FILE_EDITS, main.FILES, main.SOCKETS, main.PLUGINS, main.SYSTEMD)
    assert [api.namespace for api in declared] == list(lazy)


def test_the_agent_starts_without_importing_the_services_few_connections_use() -> None:
    """Every connect waits for the agent's start-up: escalation, files, sockets, the editor, plugins and systemd
    load later, and fd passing (the socket module) only in a local agent."""
    program = "import sys, remowt.agent.main; print(' '.join(sorted(sys.modules)))"
    modules = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout.split()
    lazy = {f"remowt.endpoints.{name}" for name in ("escalate", "editor", "fs", "sockets", "plugins", "systemd")}
    assert not (lazy | {"remowt.transports.fdpass", "socket"}) & set(modules)


def test_after_stop_loading_no_lazy_service_is_made_and_one_being_made_is_waited_for() -> None:
    """Agent.shutdown stops the loading first, so that every service made is one it closes."""
    making, release, made = threading.Event(), threading.Event(), []

    def make() -> object:
        making.set()
        release.wait(10)
        made.append(1)
        return Control("agent")

    user, agent = Router("user"), Router("agent")
    agent.register_lazy(ControlApi.namespace, make)
    agent.register_lazy(SubprocessApi.namespace, make)
    connect_routers(user, agent)
    try:
        first = threading.Thread(target=lambda: proxy(ControlApi, user, "agent", 10).ping())
        first.start()
        assert making.wait(10)
        stopped = threading.Event()
        stopper = threading.Thread(target=lambda: (agent.stop_loading(), stopped.set()))
        stopper.start()
        assert not stopped.wait(0.2), "stop_loading returned while a service was being made"
        release.set()
        stopper.join(10)
        first.join(10)
        assert stopped.is_set() and made == [1]
        with pytest.raises(UnknownMethod):
            proxy(SubprocessApi, user, "agent", 10).send_signal(1, 0)
        assert made == [1]
    finally:
        release.set()
        user.close()
        agent.close()


def test_a_lazy_service_is_made_at_its_first_call_once_and_a_failing_one_fails_only_its_calls() -> None:
    made: List[int] = []

    def make() -> object:
        made.append(1)
        return Control("agent")

    def broken() -> object:
        raise ImportError("no such module")

    user, agent = Router("user"), Router("agent")
    agent.register_lazy(ControlApi.namespace, make)
    agent.register_lazy(SubprocessApi.namespace, broken)
    with pytest.raises(ValueError, match="already served"):
        agent.register_lazy(ControlApi.namespace, make)
    connect_routers(user, agent)
    try:
        assert made == []
        control = proxy(ControlApi, user, "agent", 10)
        for _ in range(3):
            control.ping()
        assert made == [1]
        with pytest.raises(UnknownMethod):
            proxy(SubprocessApi, user, "agent", 10).send_signal(1, 0)
        control.ping()  # the link goes on
    finally:
        user.close()
        agent.close()
