"""Plugins: loaded by name (shipped with the agent) and by path, reached through the agent by a learned route.

The plugin is ``plugins/demo_plugin.py`` (remowt's Python SDK) serving
``plugins/demo_api.py``'s ``DemoApi``, shipped with each connection
(``plugins=``) on loopback, local and ssh. The ssh target is this machine
(as root over the test sshd; as the test user with sudo's password for the
privileged agent), so paths of the test are the target's too.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import pwd
import re
import signal
import stat
import subprocess
import sys
import tarfile
import threading
from typing import Dict, Iterator, List

import pytest
from _util import proc_gone, wait_until
from plugins.demo_api import BLOCK, DemoApi, DemoCallerApi, expected_bytes
from sshd import SshServer

import remowt
from remowt.deploy import bundle
from remowt.deploy.plugins import PluginSourceError, plugin_files
from remowt.endpoints.plugins import ADDRESS_ENV
from remowt.errors import BadArguments, ConnectionLost, PluginError
from remowt.rpc.streams import Stream
from remowt.user.plugins import Plugin

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "plugins", "demo_plugin.py")
SOURCES = [DEMO, os.path.join(HERE, "plugins", "demo_api.py")]
TEST_USER = "remowt-test"
TEST_PASSWORD = "remowt-test-password"
MIB = 1024 * 1024
KINDS = ["loopback", "local", "ssh"]
SEND_BYTES = DemoApi.methods["send_bytes"]

pytestmark = pytest.mark.timeout(120)


class Shouter(DemoCallerApi):
    def shout(self, text: str) -> str:
        return text.upper()


def connect(request: pytest.FixtureRequest, kind: str) -> remowt.Remowt:
    """A connection of ``kind`` shipping the demo plugins, serving ``DemoCallerApi`` on the user's router."""
    if kind == "loopback":
        conn = remowt.loopback(plugins=SOURCES)
    elif kind == "local":
        conn = remowt.connect_local(plugins=SOURCES)
    else:
        sshd: SshServer = request.getfixturevalue("sshd")
        conn = remowt.connect("remowt-test-root", ssh_config=sshd.ssh_config, plugins=SOURCES)
    conn.router.register(Shouter())
    return conn


@pytest.fixture(scope="module")
def shared() -> Iterator[Dict[str, remowt.Remowt]]:
    made: Dict[str, remowt.Remowt] = {}
    yield made
    for conn in made.values():
        conn.close()


@pytest.fixture(params=KINDS)
def conn(request: pytest.FixtureRequest, shared: Dict[str, remowt.Remowt]) -> remowt.Remowt:
    kind = request.param
    if kind not in shared or shared[kind].closed:
        shared[kind] = connect(request, kind)
    return shared[kind]


def load(conn: remowt.Remowt, how: str) -> Plugin:
    return conn.load_plugin("demo_plugin") if how == "name" else conn.load_plugin_path(DEMO)


def plugin_addresses(conn: remowt.Remowt) -> List[str]:
    return [address for address in conn.router.reachable() if address.startswith("plugin(")]


@pytest.mark.parametrize("how", ["name", "path"])
def test_a_plugin_is_reached_through_the_agent_by_a_learned_route(conn: remowt.Remowt, how: str) -> None:
    before = plugin_addresses(conn)
    with load(conn, how) as plugin:
        assert plugin.address not in before  # nobody configured it: the agent's announcement brought it
        assert conn.router.reachable()[plugin.address] == 2  # user → agent → plugin
        assert [link.peer for link in conn.router.links()] == ["agent"]  # no link of its own: a route through it
        demo = plugin.service(DemoApi)
        assert demo.echo(b"\x00hello\xff" * 1000) == b"\x00hello\xff" * 1000
        assert demo.whoami() == (os.getuid(), plugin.pid)
        info = plugin.info()
        assert (info.address, info.pid) == (plugin.address, plugin.pid)
        assert [p.address for p in conn.plugins()] == [plugin.address]
        assert plugin.loaded
    assert plugin.address not in conn.router.reachable()  # unload answers once the route is withdrawn
    assert conn.plugins() == []
    with pytest.raises(ConnectionLost, match=re.escape(f"connection from user to {plugin.address} was lost")):
        demo.noop()
    assert proc_gone(plugin.pid)


def test_the_launch_contract(conn: remowt.Remowt) -> None:
    """stdin/stdout are the link, the address is in the environment, and the agent's code is on PYTHONPATH."""
    with conn.load_plugin("demo_plugin") as plugin:
        environ = pathlib.Path(f"/proc/{plugin.pid}/environ").read_bytes().split(b"\0")
        assert f"{ADDRESS_ENV}={plugin.address}".encode() in environ
        assert any(line.startswith(b"PYTHONPATH=") for line in environ)


def read_pattern(stream: Stream, size: int) -> int:
    """Read ``send_bytes``'s pattern from ``stream``, checking every byte a block at a time; how many came."""
    done = 0
    while True:
        chunk = stream.read(BLOCK)
        assert stream.buffered <= stream.window  # flow control: never more than a window in flight
        if not chunk:
            return done
        while chunk:
            value = (done // BLOCK) % 256
            piece = chunk[: BLOCK - done % BLOCK]
            assert piece.count(value) == len(piece), f"wrong bytes in block {done // BLOCK}"
            done += len(piece)
            chunk = chunk[len(piece) :]
        assert done <= size


def test_a_plugin_streams_256_mib_to_the_user_under_flow_control(conn: remowt.Remowt) -> None:
    size = 256 * MIB + 12345
    with conn.load_plugin("demo_plugin") as plugin:
        stream = conn.router.open_stream(plugin.address)
        stream.close_write()
        call = conn.router.call(
            plugin.address, DemoApi.namespace, SEND_BYTES.number, SEND_BYTES.encode_args((stream.sid, size), {})
        )
        assert read_pattern(stream, size) == size
        call.result(30)
        small = conn.router.open_stream(plugin.address)
        small.close_write()
        plugin.service(DemoApi).send_bytes(small.sid, 3 * BLOCK + 7)  # small enough to fit the window
        assert small.readall(30) == expected_bytes(3 * BLOCK + 7)


def test_a_plugin_calls_back_the_users_service(conn: remowt.Remowt) -> None:
    with conn.load_plugin_path(DEMO) as plugin:
        assert plugin.service(DemoApi).ask_caller("hello") == "plugin heard HELLO"


def test_a_crash_fails_in_flight_calls_and_streams_at_once_and_the_plugin_loads_again(conn: remowt.Remowt) -> None:
    plugin = conn.load_plugin("demo_plugin")
    stream = conn.router.open_stream(plugin.address)
    stream.close_write()
    # in flight: a send that waits for credit nobody gives, and the crash itself, which never answers
    sending = conn.router.call(
        plugin.address, DemoApi.namespace, SEND_BYTES.number, SEND_BYTES.encode_args((stream.sid, 64 * MIB), {})
    )
    assert wait_until(lambda: stream.buffered >= stream.window, 30)
    crash_result: List[BaseException] = []
    crashing = threading.Thread(target=lambda: crash_result.append(_crash(plugin)))
    crashing.start()
    with pytest.raises(ConnectionLost):
        sending.result(30)
    crashing.join(30)
    assert len(crash_result) == 1 and isinstance(crash_result[0], ConnectionLost)
    with pytest.raises(ConnectionLost):
        stream.readall(30)
    assert conn.router.wait_unreachable(plugin.address, 30)
    assert conn.plugins() == []
    with pytest.raises(PluginError, match=rf"plugin\({plugin.number}\) is not loaded"):
        plugin.unload()
    with conn.load_plugin("demo_plugin") as again:
        assert again.address != plugin.address
        assert again.service(DemoApi).echo(b"back") == b"back"
    assert conn.ping() < 5


def _crash(plugin: Plugin) -> BaseException:
    try:
        plugin.service(DemoApi).crash(7)
    except BaseException as e:
        return e
    raise AssertionError("crash answered")


def test_the_plugins_stderr_reaches_the_clients_log(conn: remowt.Remowt, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="remowt.plugin")
    with conn.load_plugin("demo_plugin") as plugin:
        line = f"[{plugin.address}] demo plugin {plugin.address} starting"

        def logged() -> bool:
            return any(r.name == "remowt.plugin.demo_plugin" and r.getMessage() == line for r in caplog.records)

        assert wait_until(logged, 30)


def test_a_chatty_plugins_stderr_arrives_whole_and_in_order(
    conn: remowt.Remowt, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Far more lines than the host lets wait for the user (the plugin waits for room meanwhile)."""
    caplog.set_level(logging.WARNING, logger="remowt.plugin")
    chatty = tmp_path / "chatty"
    chatty.write_text(f"#!/bin/sh\nseq 1 5000 >&2\nexec {DEMO}\n")
    chatty.chmod(0o755)
    with conn.load_plugin_path(chatty) as plugin:

        def lines() -> List[str]:
            return [r.getMessage() for r in caplog.records if r.name == "remowt.plugin.chatty"]

        assert wait_until(lambda: len(lines()) >= 5001, 60)
        assert lines()[:5000] == [f"[{plugin.address}] {n}" for n in range(1, 5001)]


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("nope", PluginError, r"no plugin named 'nope' was shipped with agent \(shipped: demo_api, demo_plugin\)"),
        ("../demo_plugin", BadArguments, r"'\.\./demo_plugin' is not a plugin name"),
        ("", BadArguments, "is not a plugin name"),
        ("demo_api", PluginError, r"plugin demo_api exited with status 0 before its handshake"),
    ],
)
def test_bad_names_are_clear_errors(conn: remowt.Remowt, name: str, error: type, message: str) -> None:
    assert conn.shipped_plugins() == ["demo_api", "demo_plugin"]
    with pytest.raises(error, match=message):
        conn.load_plugin(name)
    assert conn.plugins() == []
    assert conn.ping() < 5


def test_bad_paths_are_clear_errors(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as raised:
        conn.load_plugin_path(missing)
    assert raised.value.filename == str(missing)
    plain = tmp_path / "plain.py"
    plain.write_text("print('never')\n")
    with pytest.raises(PermissionError) as refused:
        conn.load_plugin_path(plain)
    assert refused.value.filename == str(plain)
    with pytest.raises(BadArguments, match="must be absolute"):
        conn.load_plugin_path("plugins/demo_plugin.py")
    early = tmp_path / "early"
    early.write_text("#!/bin/sh\necho 'cannot start: no config' >&2\nexit 3\n")
    early.chmod(0o755)
    with pytest.raises(PluginError, match="exited with status 3 before its handshake; its stderr:\ncannot start: no"):
        conn.load_plugin_path(early)
    garbage = tmp_path / "garbage"
    garbage.write_text("#!/bin/sh\necho 'this is not a frame'\nexec sleep 60\n")
    garbage.chmod(0o755)
    with pytest.raises(
        PluginError, match=r"broke the protocol .*frame of 1952999795 bytes exceeds the limit.* before its handshake"
    ):
        conn.load_plugin_path(garbage)
    assert conn.plugins() == []
    assert conn.ping() < 5


def test_double_unload_is_a_clear_error(conn: remowt.Remowt) -> None:
    plugin = conn.load_plugin("demo_plugin")
    plugin.unload()
    with pytest.raises(PluginError, match=rf"plugin\({plugin.number}\) is not loaded on agent"):
        plugin.unload()


@pytest.mark.parametrize("kind", KINDS)
def test_closing_the_connection_ends_its_plugins(request: pytest.FixtureRequest, kind: str) -> None:
    """No plugin process is left; a local agent's staged copy of the plugins is removed (a target's cache stays)."""
    conn = connect(request, kind)
    with conn:
        pids = [conn.load_plugin("demo_plugin").pid, conn.load_plugin_path(DEMO).pid]
        assert not any(proc_gone(pid) for pid in pids)
        plugins_dir = shipped_dir(pids[0])
        assert plugins_dir.is_dir()
    assert wait_until(lambda: all(proc_gone(pid) for pid in pids), 30)
    assert plugins_dir.exists() == (kind == "ssh")


def shipped_dir(pid: int) -> pathlib.Path:
    """The directory of the shipped plugins that a plugin loaded by name runs from (its command line names it)."""
    command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    match = re.search(r"'([^']*/remowt-plugins[^'/]*)'", command)
    assert match is not None, command
    return pathlib.Path(match.group(1))


@pytest.mark.parametrize("kind", ["loopback", "local"])
def test_a_privileged_plugin_runs_as_root_here(request: pytest.FixtureRequest, kind: str) -> None:
    """The privileged agent of a local agent (root here: no prompt) gets the same staged plugins."""
    with connect(request, kind) as conn, conn.privileged.load_plugin("demo_plugin") as plugin:
        assert conn.router.reachable()[plugin.address] == 3  # user → agent → agent-privileged → plugin
        assert plugin.service(DemoApi).whoami()[0] == 0


def test_a_privileged_plugin_runs_as_root_over_ssh(sshd: SshServer) -> None:
    """As the test user with sudo's password: its own plugin has its uid, the privileged agent's has 0."""
    with remowt.connect(
        sshd.alias, ssh_config=sshd.ssh_config, prompter=lambda prompt: TEST_PASSWORD, plugins=SOURCES
    ) as conn:
        conn.escalation = "sudo"
        with conn.load_plugin("demo_plugin") as own:
            assert own.service(DemoApi).whoami()[0] == pwd.getpwnam(TEST_USER).pw_uid
        with conn.privileged.load_plugin("demo_plugin") as root:
            assert conn.router.reachable()[root.address] == 3
            assert root.service(DemoApi).whoami()[0] == 0
            assert conn.privileged.plugins()[0].address == root.address


def test_shipped_plugins_are_part_of_the_artifact_and_its_tree_digest(tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path / "bundle")
    bundle.build_local(directory, SOURCES)
    built = bundle.AgentBundle.from_dir(directory)
    platform = bundle.local_platform()
    with tarfile.open(fileobj=io.BytesIO(built.read_artifact(platform)), mode="r:gz") as tar:
        members = {member.name: member for member in tar}
    assert stat.S_IMODE(members["remowt-plugins/demo_plugin.py"].mode) == 0o755
    assert stat.S_IMODE(members["remowt-plugins/demo_api.py"].mode) == 0o644
    assert bundle.read_plugin_sources(directory) == SOURCES
    plain = bundle.AgentBundle.default()
    added = plain.with_plugins(SOURCES)
    assert added.trees[platform] != plain.trees[platform] and added.hashes[platform] != plain.hashes[platform]
    assert plain.with_plugins(SOURCES).hashes == added.hashes  # the same code, the same artifact
    bundle.build_local(directory, [])
    assert bundle.read_plugin_sources(directory) == []
    # Not compared by tree digest with ``plain``: two builds in different processes may marshal a .pyc differently.
    rebuilt = bundle.AgentBundle.from_dir(directory).read_artifact(platform)
    with tarfile.open(fileobj=io.BytesIO(rebuilt), mode="r:gz") as tar:
        assert not [member.name for member in tar if member.name.startswith("remowt-plugins")]


def test_bad_plugin_sources_are_refused_before_anything_is_shipped(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a program\n")
    package = tmp_path / "package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (data, r"is not executable \(chmod \+x it, or make it a \.py module\)"),
        (package, "is a directory without __main__.py"),
    ]
    for source, message in cases:
        with pytest.raises(PluginSourceError, match=message):
            plugin_files([source])
        with pytest.raises(PluginSourceError, match=message):
            remowt.loopback(plugins=[source])
    with pytest.raises(PluginSourceError, match="two plugin sources are named 'demo_plugin'"):
        plugin_files([DEMO, DEMO])


@pytest.mark.parametrize("how", ["timeout", "ctrl-c"])
def test_a_load_given_up_leaves_no_plugin_running(conn: remowt.Remowt, tmp_path: pathlib.Path, how: str) -> None:
    """A load whose caller stopped waiting (a timeout, Ctrl-C) is unloaded when it answers after all."""
    flag, pid_file = tmp_path / "go", tmp_path / "pid"
    slow = tmp_path / "slow"
    slow.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nwhile [ ! -e {flag} ]; do sleep 0.01; done\nexec {DEMO}\n")
    slow.chmod(0o755)

    def started() -> bool:
        return pid_file.exists() and pid_file.read_text().endswith("\n")

    if how == "timeout":
        with pytest.raises(TimeoutError, match=r"did not load plugin .*slow.* within 0\.5 s"):
            conn.load_plugin_path(slow, timeout=0.5)
    else:  # a Ctrl-C once the plugin runs, while the caller waits for the load
        interrupter = threading.Thread(target=lambda: wait_until(started, 30) and os.kill(os.getpid(), signal.SIGINT))
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            conn.load_plugin_path(slow)
        interrupter.join()
    assert wait_until(started, 30)
    pid = int(pid_file.read_text())
    flag.touch()
    assert wait_until(lambda: proc_gone(pid), 30)
    assert wait_until(lambda: conn.plugins() == [] and plugin_addresses(conn) == [], 30)
    assert conn.ping() < 5


def test_a_killed_agent_takes_its_plugins_with_it(request: pytest.FixtureRequest) -> None:
    conn = connect(request, "local")
    with conn:
        plugin = conn.load_plugin("demo_plugin")
        os.kill(conn.info().pid, signal.SIGKILL)
        assert wait_until(lambda: proc_gone(plugin.pid), 30)
        with pytest.raises(ConnectionLost):
            plugin.service(DemoApi).noop()


def test_remowt_bundle_build_ships_plugins(tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path / "bundle")
    built = run_bundle("build", "--dir", directory, "--plugin", SOURCES[0], "--plugin", SOURCES[1])
    assert built.returncode == 0, built.stderr
    listed = run_bundle("list", "--dir", directory)
    assert f"plugin demo_plugin: {DEMO}\n" in listed.stdout and "plugin demo_api: " in listed.stdout
    refused = run_bundle("build", "--dir", directory, "--plugin", str(tmp_path / "missing"))
    assert refused.returncode == 1
    assert refused.stderr == f"remowt: plugin source {tmp_path / 'missing'} does not exist\n"
    assert bundle.read_plugin_sources(directory) == SOURCES  # nothing changed
    assert run_bundle("build", "--dir", directory, "--no-plugins").returncode == 0
    assert "plugin " not in run_bundle("list", "--dir", directory).stdout


def run_bundle(*args: str) -> subprocess.CompletedProcess[str]:
    remowt_command = [sys.executable, "-m", "remowt", "bundle"]
    return subprocess.run([*remowt_command, *args], capture_output=True, text=True, timeout=120)


def test_a_tampered_plugin_in_the_targets_cache_is_replaced_by_the_one_sent(sshd: SshServer) -> None:
    """The tree digest covers the plugins: a changed plugin file in the cached agent is set aside and sent again."""
    with remowt.connect("remowt-test-root", ssh_config=sshd.ssh_config, plugins=SOURCES) as conn:
        cached = shipped_dir(conn.load_plugin("demo_plugin").pid) / "demo_plugin.py"
        original = cached.read_bytes()
    cached.write_bytes(b"raise SystemExit('tampered')\n" + original)
    conn = remowt.connect("remowt-test-root", ssh_config=sshd.ssh_config, plugins=SOURCES)
    with conn, conn.load_plugin("demo_plugin") as plugin:
        assert plugin.service(DemoApi).echo(b"sent") == b"sent"
    assert cached.read_bytes() == original


HIJACKER = """#!/usr/bin/env python3
import os
import threading

from remowt.endpoints.control import Control
from remowt.protocol import wire
from remowt.rpc.router import Router
from remowt.transports.stdio import take_stdio


class Hijacking(Control):
    def ping(self):  # announce other nodes' addresses, then answer: the answer follows on the same link
        routes = [("agent-privileged", 1), ("plugin(60000)", 1), ("user", 1)]
        router.links()[0].send(wire.encode(wire.Routes(routes)))


address = os.environ["REMOWT_PLUGIN_ADDRESS"]
router = Router(address)
router.register(Hijacking(address))
ended = threading.Event()
router.on_link_closed(lambda link, reason: ended.set())
router.add_link(take_stdio())
ended.wait()
"""


def test_a_plugin_cannot_take_other_addresses_by_announcing_them(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    """A plugin is a leaf: what it says it reaches is ignored, so calls for other nodes never go to it."""
    hijacker = tmp_path / "hijacker"
    hijacker.write_text(HIJACKER)
    hijacker.chmod(0o755)
    with conn.load_plugin_path(hijacker) as plugin:
        plugin.ping()  # the plugin announces before it answers
        reachable = conn.router.reachable()
        assert reachable[plugin.address] == 2
        assert "plugin(60000)" not in reachable and "agent-privileged" not in reachable
        assert conn.ping() < 5


def test_a_plugin_that_takes_another_address_is_refused(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    impostor = tmp_path / "impostor"
    impostor.write_text(HIJACKER.replace('os.environ["REMOWT_PLUGIN_ADDRESS"]', '"plugin(65000)"'))
    impostor.chmod(0o755)
    with pytest.raises(PluginError, match=r"said it is plugin\(65000\), not plugin\([0-9]+\)"):
        conn.load_plugin_path(impostor)
    assert conn.plugins() == [] and plugin_addresses(conn) == []


def test_a_recorded_plugin_source_that_is_gone_says_how_to_drop_it(tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path / "bundle")
    source = tmp_path / "tool"
    source.write_text("#!/bin/sh\nexit 0\n")
    source.chmod(0o755)
    bundle.build_local(directory, [source])
    source.unlink()
    with pytest.raises(bundle.BundleError) as raised:
        bundle.refresh(directory)
    assert str(raised.value) == (
        f"plugin source {source} does not exist; ship others with: "
        f"remowt bundle build --dir {directory} --plugin SRC ... (or --no-plugins)"
    )
    bundle.build_local(directory, [])
    bundle.refresh(directory)
