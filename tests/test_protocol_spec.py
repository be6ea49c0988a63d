"""docs/protocol.md stays true, and is enough: a plugin written from it alone passes the plugin tests.

The first half reads the spec: every example frame is checked both ways
against remowt's encoder and decoder, and the message layouts, limits, error
kinds and ControlApi methods against the code. The second half runs
tests/plugins/raw_msgpack_plugin.py (the standard library and msgpack, nothing
of remowt) through the same call and stream tests, linked straight to a
user-side router and loaded by path through a loopback, local and ssh agent.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import pathlib
import re
import subprocess
import sys
import threading
import typing
from typing import Any, Callable, Dict, Iterator, List, Tuple

import msgpack
import msgspec
import pytest
from _util import CONNECTIONS, RawPeer, proc_gone, shared_connection, wait_until
from plugins.demo_api import BLOCK, DemoApi, DemoCallerApi, expected_bytes

import remowt
from remowt.endpoints import plugins as plugin_host
from remowt.endpoints.control import ControlApi, NodeInfo
from remowt.errors import REMOTE_ERRORS, BadArguments, ConnectionLost, UnknownMethod
from remowt.protocol import budget, dispatch, routing, streamstate, wire
from remowt.protocol.service import proxy
from remowt.rpc import router as router_module
from remowt.rpc.router import Router, error_from_fail
from remowt.rpc.streams import Stream
from remowt.transports.stdio import ChildTransport, spawn_framed_child

HERE = pathlib.Path(__file__).parent
SPEC = (HERE.parent / "docs" / "protocol.md").read_text()
RAW_PLUGIN = HERE / "plugins" / "raw_msgpack_plugin.py"
ADDRESS = "plugin(7)"
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(60)


# --- the spec's text --------------------------------------------------------------------------------


def frame_examples() -> List[Tuple[Any, bytes]]:
    """Every ```frame block of the spec: (its first line as a Python literal, the frame its hex lines spell)."""
    examples = []
    for block in re.findall(r"^```frame\n(.*?)^```", SPEC, re.M | re.S):
        literal, *lines = block.splitlines()
        hex_text = "".join(line.split("#", 1)[0] for line in lines)
        examples.append((ast.literal_eval(literal), bytes.fromhex(hex_text)))
    return examples


def table_rows(section: str, first_column: str) -> List[List[str]]:
    """The cells of the table rows in the spec's ``## section`` whose first cell matches ``first_column`` (a regex)."""
    text = SPEC.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(first_column, cells[0]):
            rows.append(cells)
    return rows


EXAMPLES = frame_examples()
MESSAGES: Dict[str, type] = {cls.__struct_config__.tag: cls for cls in typing.get_args(wire.Message)}


def test_the_spec_shows_a_frame_of_every_kind_it_promises() -> None:
    tags = {literal[0] for literal, _ in EXAMPLES}
    assert {"hello", "routes", "call", "reply", "fail", "open", "data", "credit", "eof", "reset"} <= tags


@pytest.mark.parametrize(("literal", "frame"), EXAMPLES, ids=[f"{n}-{lit[0]}" for n, (lit, _) in enumerate(EXAMPLES)])
def test_example_frame_is_what_remowt_writes_and_reads(literal: Any, frame: bytes) -> None:
    (length,) = wire.HEADER.unpack_from(frame)
    body = frame[wire.HEADER.size :]
    assert length == len(body), "the length prefix counts the body"
    assert msgpack.unpackb(body) == literal, "the first line is the body as msgpack decodes it"
    message = wire.decode(body)
    assert isinstance(message, MESSAGES[literal[0]])
    if isinstance(message, wire.Data):
        head, payload = wire.data_frame(message)
        assert head + bytes(payload) == frame
    else:
        assert bytes(wire.encode(message)) == frame
    reader = wire.FrameReader()
    assert [bytes(b) for b in reader.feed(frame[:3]) + reader.feed(frame[3:])] == [body]


def test_the_message_table_lists_every_message_with_its_fields_in_order() -> None:
    layouts = {}
    for _, array, *_ in table_rows("Messages", r"`\w+`"):
        match = re.fullmatch(r'`\["(\w+)"((?:, \w+)*)\]`', array)
        if match is not None:
            layouts[match.group(1)] = [name for name in match.group(2).split(", ") if name]
    assert layouts == {tag: list(cls.__struct_fields__) for tag, cls in MESSAGES.items()}


def test_the_limits_table_is_the_code() -> None:
    code = {
        "PROTOCOL_VERSION": wire.PROTOCOL_VERSION,
        "DEFAULT_MAX_FRAME": wire.DEFAULT_MAX_FRAME,
        "MIN_MAX_FRAME": wire.MIN_MAX_FRAME,
        "MAX_HOPS": routing.MAX_HOPS,
        "DEFAULT_WINDOW": streamstate.DEFAULT_WINDOW,
        "MAX_WINDOW": streamstate.MAX_WINDOW,
        "MAX_CHUNK": streamstate.MAX_CHUNK,
        "MAX_STREAMS": budget.MAX_STREAMS,
        "MAX_UNACCEPTED": budget.MAX_UNACCEPTED,
        "MAX_FAIL_TEXT": dispatch.MAX_FAIL_TEXT,
        "HANDSHAKE_TIMEOUT": router_module.HANDSHAKE_TIMEOUT,
        "EXIT_TIMEOUT": plugin_host.EXIT_TIMEOUT,
        "MAX_LINE": plugin_host.MAX_LINE,
        "STDERR_WINDOW": plugin_host.STDERR_WINDOW,
    }
    assert plugin_host.HANDSHAKE_TIMEOUT == router_module.HANDSHAKE_TIMEOUT
    documented = {name.strip("`"): float(value) for name, value, _ in table_rows("Limits and constants", r"`[A-Z_]+`")}
    assert documented == code


def test_the_errors_table_says_what_each_kind_raises() -> None:
    rows = {kind.strip("`"): raised for kind, raised, _ in table_rows("Errors", r"`[a-z-]+`")}
    kinds = set(REMOTE_ERRORS) | {"os-error", "unreachable"}
    assert kinds <= set(rows)
    for kind in kinds:
        error = error_from_fail(wire.Fail(1, ADDRESS, wire.USER, kind, "text", errno.EPIPE, None))
        assert type(error).__name__ in rows[kind], kind
    assert isinstance(error_from_fail(wire.Fail(1, ADDRESS, wire.USER, "no-such-kind", "x")), remowt.RemoteError)


def test_the_control_api_table_is_the_declaration() -> None:
    rows = {int(number): name.strip("`") for number, name, *_ in table_rows("Services and values", r"\d+")}
    assert rows == {spec.number: attr for attr, spec in ControlApi.methods.items()}
    assert ControlApi.namespace == 1
    example = re.search(r"`NodeInfo` \(below\) encodes as\s+`(\{.*?\})`", SPEC, re.S)
    assert example is not None
    info = msgspec.msgpack.decode(msgpack.packb(ast.literal_eval(example.group(1))), type=NodeInfo)
    assert msgpack.unpackb(msgspec.msgpack.encode(info)) == ast.literal_eval(example.group(1))


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is new in Python 3.10")
def test_the_raw_plugin_imports_nothing_but_the_standard_library_and_msgpack() -> None:
    tree = ast.parse(RAW_PLUGIN.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"msgpack"}


# --- the raw plugin at work: linked straight to a user router, and loaded by path through an agent -------


class Shouter(DemoCallerApi):
    def shout(self, text: str) -> str:
        return text.upper()


class Reached:
    """A raw plugin as the tests reach it: the user's router that calls it, its proxy, its pid and uid."""

    def __init__(self, router: Router, address: str, pid: int, uid: int, end: Callable[[], None]) -> None:
        self.router = router
        self.address = address
        self.api = proxy(DemoApi, router, address, timeout=60)
        self.pid = pid
        self.uid = uid
        self.end = end


def linked_directly() -> Tuple[Reached, ChildTransport]:
    """The raw plugin started as a child here, its stdio a link of a user router that serves DemoCallerApi."""
    router = Router(wire.USER)
    router.register(Shouter())
    env = {**os.environ, "REMOWT_PLUGIN_ADDRESS": ADDRESS}
    transport = spawn_framed_child([sys.executable, str(RAW_PLUGIN)], env=env)
    router.add_link(transport, timeout=10)
    return Reached(router, ADDRESS, transport.process.pid, os.getuid(), router.close), transport


def loaded_through(conn: remowt.Remowt) -> Reached:
    """The raw plugin loaded by path on ``conn``'s agent (DemoCallerApi served on ``conn``'s router)."""
    with contextlib.suppress(ValueError):  # served already: the module's tests share the connection
        conn.router.register(Shouter())
    plugin = conn.load_plugin_path(str(RAW_PLUGIN))
    return Reached(conn.router, plugin.address, plugin.pid, conn.info().uid, lambda: plugin.__exit__(None, None, None))


@pytest.fixture(params=["direct", *CONNECTIONS])
def reached(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> Iterator[Reached]:
    """A fresh raw plugin: linked directly, or loaded through a loopback, local or ssh connection's agent."""
    if request.param == "direct":
        plugin, _ = linked_directly()
    else:
        plugin = loaded_through(shared_connection(request, connections, request.param))
    try:
        yield plugin
    finally:
        plugin.end()
    assert wait_until(lambda: proc_gone(plugin.pid), 10), "the plugin outlived its link"


def in_background(call: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``call`` on a thread; the returned function waits for it and gives its result (or raises its error)."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as e:
            outcome.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(60)
        assert outcome, "the call did not end"
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    return join


def receive_pattern(stream: Stream, size: int) -> None:
    """Read ``send_bytes``' pattern from ``stream`` to its end, checking every byte against a block of its value."""
    blocks: Dict[int, bytes] = {}
    got = 0
    while True:
        chunk = memoryview(stream.read_chunk(MIB, timeout=60))
        if not chunk:
            break
        at = 0
        while at < len(chunk):
            value = ((got + at) // BLOCK) % 256
            block = blocks.setdefault(value, bytes([value]) * BLOCK)
            take = min(BLOCK - (got + at) % BLOCK, len(chunk) - at)
            assert chunk[at : at + take] == block[:take], f"bytes from {got + at} are not {value}"
            at += take
        got += len(chunk)
    assert got == size


def read_stream(plugin: Reached, size: int, window: int = streamstate.DEFAULT_WINDOW) -> None:
    stream = plugin.router.open_stream(plugin.address, window)
    stream.close_write()  # it only reads
    sent = in_background(lambda: plugin.api.send_bytes(stream.sid, size))
    try:
        receive_pattern(stream, size)
    finally:
        stream.close()
    assert sent() is None


def test_calls(reached: Reached) -> None:
    api = reached.api
    assert api.noop() is None
    assert api.whoami() == (reached.uid, reached.pid)
    assert api.echo(b"") == b""
    assert api.echo(b"hi") == b"hi"
    big = os.urandom(MIB)
    assert api.echo(big) == big
    assert api.ask_caller("hello") == "plugin heard HELLO"
    assert proxy(ControlApi, reached.router, reached.address, timeout=10).info().address == reached.address


def test_failures_come_back_as_the_spec_says(reached: Reached) -> None:
    with pytest.raises(UnknownMethod, match="serves no method 99 in namespace 100"):
        reached.router.call(reached.address, DemoApi.namespace, 99, wire.encode_value([])).result(10)
    with pytest.raises(BadArguments, match=r"DemoApi\.echo"):
        reached.router.call(reached.address, DemoApi.namespace, 2, wire.encode_value([12])).result(10)
    with pytest.raises(BrokenPipeError, match="not open here"):
        reached.api.send_bytes(12345, 10)


def test_a_small_stream_is_the_pattern_byte_for_byte(reached: Reached) -> None:
    size = 3 * BLOCK + 1234
    stream = reached.router.open_stream(reached.address)
    stream.close_write()
    sent = in_background(lambda: reached.api.send_bytes(stream.sid, size))
    assert stream.readall(timeout=30) == expected_bytes(size)
    stream.close()
    assert sent() is None


def test_256_mib_under_flow_control(reached: Reached) -> None:
    read_stream(reached, 256 * MIB)
    assert reached.router.stream_count() == 0


def test_a_window_smaller_than_a_chunk_is_honoured(reached: Reached) -> None:
    read_stream(reached, 5 * BLOCK + 17, window=1000)


def test_a_reset_stops_the_sender_and_fails_its_call(reached: Reached) -> None:
    stream = reached.router.open_stream(reached.address)
    stream.close_write()
    sent = in_background(lambda: reached.api.send_bytes(stream.sid, 64 * MIB))
    assert stream.read_chunk(MIB, timeout=30)
    stream.close()
    with pytest.raises(BrokenPipeError, match="reset"):
        sent()
    assert reached.api.noop() is None


def test_bytes_written_to_the_plugin_get_their_credit_back(reached: Reached) -> None:
    stream = reached.router.open_stream(reached.address, window=BLOCK)
    stream.write(os.urandom(4 * MIB), timeout=30)  # 64 windows: only credit coming back lets it finish
    stream.close_write()
    stream.close()
    assert reached.api.noop() is None


def test_a_crash_fails_the_calls_and_streams_in_flight_at_once(reached: Reached) -> None:
    stream = reached.router.open_stream(reached.address)
    stream.close_write()
    waiting = in_background(lambda: reached.api.send_bytes(stream.sid, 64 * MIB))
    assert stream.read_chunk(MIB, timeout=30)
    with pytest.raises(ConnectionLost):
        reached.api.crash(3)
    with pytest.raises(ConnectionLost):
        waiting()
    with pytest.raises(ConnectionLost):
        while stream.read_chunk(MIB, timeout=30):
            pass
    assert reached.router.wait_unreachable(reached.address, 10)


@pytest.mark.parametrize("kind", list(CONNECTIONS))
def test_a_crashed_plugin_can_be_loaded_again(
    request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt], kind: str
) -> None:
    conn = shared_connection(request, connections, kind)
    first = loaded_through(conn)
    with pytest.raises(ConnectionLost):
        first.api.crash(3)
    again = loaded_through(conn)
    try:
        assert again.api.whoami() == (again.uid, again.pid)
    finally:
        again.end()


def test_the_plugin_exits_with_the_status_it_crashed_with() -> None:
    plugin, transport = linked_directly()
    with pytest.raises(ConnectionLost):
        plugin.api.crash(3)
    assert transport.process.wait(10) == 3
    plugin.end()


def test_the_plugin_exits_when_its_link_ends() -> None:
    plugin, transport = linked_directly()
    plugin.end()
    assert transport.process.wait(10) == 0


def raw_call(call_id: int, ns: int, method: int, args: List[Any]) -> wire.Call:
    return wire.Call(call_id, wire.USER, ADDRESS, ns, method, msgspec.Raw(wire.encode_value(args)))


def test_the_plugin_answers_frame_by_frame_as_the_spec_says() -> None:
    env = {**os.environ, "REMOWT_PLUGIN_ADDRESS": ADDRESS}
    transport = spawn_framed_child([sys.executable, str(RAW_PLUGIN)], env=env)
    peer = RawPeer(transport)
    try:
        assert peer.next_message(10) == wire.Hello(wire.PROTOCOL_VERSION, ADDRESS, wire.DEFAULT_MAX_FRAME)
        peer.send_message(wire.Hello(wire.PROTOCOL_VERSION, wire.USER, wire.DEFAULT_MAX_FRAME))
        assert peer.next_message(10) == wire.Routes([])
        peer.send_message(wire.Routes([]))
        peer.send_message(wire.Data(wire.USER, ADDRESS, 9, True, memoryview(b"abc")))
        assert peer.next_message(10) == wire.Reset(ADDRESS, wire.USER, 9, False, "no such stream")
        peer.send_message(wire.Eof(wire.USER, ADDRESS, 9, True))
        assert peer.next_message(10) == wire.Reset(ADDRESS, wire.USER, 9, False, "no such stream")
        peer.send_message(wire.Credit(wire.USER, ADDRESS, 9, True, 10))  # dropped: nothing comes back
        peer.send_message(wire.Reset(wire.USER, ADDRESS, 9, True, "closed"))  # dropped too
        peer.send_message(wire.Notify(wire.USER, ADDRESS, 100, 1, msgspec.Raw(wire.encode_value([]))))  # no answer
        peer.send_message(raw_call(2**63 - 1, 100, 1, []))
        reply = peer.next_message(10)
        assert reply == wire.Reply(2**63 - 1, ADDRESS, wire.USER, msgspec.Raw(b"\xc0"))
        peer.send_message(raw_call(4, 77, 1, []))
        fail = peer.next_message(10)
        assert isinstance(fail, wire.Fail) and (fail.id, fail.kind) == (4, "unknown-method")
        peer.send_message(wire.Open(wire.USER, ADDRESS, 5, 3))  # a window of 3 bytes
        peer.send_message(raw_call(6, 100, 4, [5, 5]))
        assert peer.next_message(10) == wire.Data(ADDRESS, wire.USER, 5, False, memoryview(b"\0\0\0"))
        peer.send_message(wire.Credit(wire.USER, ADDRESS, 5, True, 2))
        assert peer.next_message(10) == wire.Data(ADDRESS, wire.USER, 5, False, memoryview(b"\0\0"))
        assert peer.next_message(10) == wire.Eof(ADDRESS, wire.USER, 5, False)
        assert peer.next_message(10) == wire.Reply(6, ADDRESS, wire.USER, msgspec.Raw(b"\xc0"))
    finally:
        transport.close()
    assert transport.process.returncode == 0


def test_a_hello_of_another_version_ends_the_plugin() -> None:
    env = {**os.environ, "REMOWT_PLUGIN_ADDRESS": ADDRESS}
    hello = msgpack.packb(["hello", wire.PROTOCOL_VERSION + 1, wire.USER, wire.DEFAULT_MAX_FRAME])
    done = subprocess.run(
        [sys.executable, str(RAW_PLUGIN)],
        input=wire.HEADER.pack(len(hello)) + hello,
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 1
    assert b"expected a hello of version %d" % wire.PROTOCOL_VERSION in done.stderr
    assert done.stdout == bytes(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, ADDRESS, wire.DEFAULT_MAX_FRAME)))
