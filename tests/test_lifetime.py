"""Who outlives whom: the client dying, the agent dying or going silent, keep_on_disconnect."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest
from _util import Family, connect_routers, kill_quietly, proc_alive, proc_gone, proc_state, reap_quietly, wait_until

import remowt
from remowt import PIPE
from remowt.endpoints.control import Control, ControlApi
from remowt.endpoints.subprocess import SpawnOptions
from remowt.errors import ConnectionLost
from remowt.rpc.keepalive import Sender
from remowt.rpc.router import Router

REPO = os.path.dirname(os.path.dirname(os.path.abspath(remowt.__file__)))

CLIENT = textwrap.dedent(
    """
    import json, sys, threading
    import remowt
    from remowt.endpoints.subprocess import SpawnOptions

    conn = remowt.connect_local(**json.loads(sys.argv[1]))
    plain = conn.spawn(["sleep", "1000"])
    kept = conn.spawn(["sleep", "1000"], SpawnOptions(keep_on_disconnect=True))
    group = conn.spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=remowt.PIPE)
    line = b""
    while not line.endswith(b"\\n"):
        piece = group.stdout.read(100, timeout=30)
        if not piece:
            sys.exit("no grandchild pid")
        line += piece
    print(json.dumps({
        "agent": conn.info().pid,
        "children": [plain.pid, group.pid],
        "grandchildren": [int(line)],
        "kept": kept.pid,
    }), flush=True)
    threading.Event().wait()
    """
)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line from ``proc.stdout`` within ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"no line from the client script within {timeout} s (got {data!r})"
            if selector.select(left):
                piece = os.read(fd, 4096)
                assert piece, f"client script exited early (got {data!r})"
                data += piece
    return data


def start_client(**connect: object) -> subprocess.Popen[bytes]:
    """The client script in a process of its own, connecting with ``connect_local(**connect)``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(connect)], stdout=subprocess.PIPE, env=env)


def end_client(client: subprocess.Popen[bytes], pids: List[int]) -> None:
    """Kill the client script and whatever it left."""
    kill_quietly(client.pid)
    client.wait(10)
    if client.stdout is not None:
        client.stdout.close()
    for pid in pids:
        kill_quietly(pid)


@pytest.mark.timeout(60)
def test_killing_the_client_kills_agent_and_children() -> None:
    client = start_client()
    everyone: List[int] = []
    try:
        report = json.loads(read_line(client, 30))
        pids = [report["agent"], *report["children"], *report["grandchildren"]]
        everyone = [*pids, report["kept"]]
        assert len(set(everyone)) == 5
        assert all(proc_alive(pid) for pid in everyone), {pid: proc_alive(pid) for pid in everyone}
        client.send_signal(signal.SIGKILL)
        assert client.wait(10) == -signal.SIGKILL
        # the agent sees its stdin close, kills its children's process groups and exits
        gone = wait_until(lambda: all(proc_gone(pid) for pid in pids), 10)
        assert gone, {pid: "alive" for pid in pids if proc_alive(pid)}
        assert proc_alive(report["kept"])
    finally:
        end_client(client, everyone)


@pytest.mark.timeout(60)
def test_keep_on_disconnect(conn: remowt.Remowt) -> None:
    kept = conn.spawn(["sleep", "1000"], SpawnOptions(keep_on_disconnect=True))
    dropped = conn.spawn(["sleep", "1000"])
    group = conn.spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=PIPE)
    assert group.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        piece = group.stdout.read(100, timeout=10)
        assert piece
        line += piece
    grandchild = int(line)
    assert all(proc_alive(p) for p in (kept.pid, dropped.pid, group.pid, grandchild))
    try:
        conn.close()
        assert wait_until(lambda: proc_gone(dropped.pid) and proc_gone(group.pid) and proc_gone(grandchild), 10)
        assert proc_alive(kept.pid)
        # and it stays alive: the connection is over, nothing is left to kill it
        time_closed = time.monotonic()
        assert wait_until(lambda: time.monotonic() - time_closed > 0.2, 1)
        assert proc_alive(kept.pid)
    finally:
        kill_quietly(kept.pid)
    assert wait_until(lambda: proc_gone(kept.pid), 10)
    reap_quietly(kept.pid)  # our own child on the loopback transport


@pytest.mark.timeout(60)
def test_close_kills_children(conn: remowt.Remowt) -> None:
    procs = [conn.spawn(["sleep", "1000"]) for _ in range(3)]
    reader = conn.spawn(["sleep", "1000"], stdin=PIPE, stdout=PIPE, stderr=PIPE)
    pids = [p.pid for p in [*procs, reader]]
    conn.close()
    assert wait_until(lambda: all(proc_gone(pid) for pid in pids), 10)
    conn.close()  # closing twice is fine
    with pytest.raises(ConnectionLost):
        conn.spawn(["true"])


@pytest.mark.timeout(60)
def test_agent_death_fails_everything_promptly() -> None:
    conn = remowt.connect_local()
    orphans: List[int] = []
    try:
        agent = conn.info().pid
        waiter = conn.spawn(["sleep", "1000"])
        reader = conn.spawn(["sleep", "1000"], stdout=PIPE)
        orphans = [waiter.pid, reader.pid]
        outcomes: Dict[str, Tuple[BaseException, float]] = {}
        started = {"wait": threading.Event(), "read": threading.Event()}

        def blocked(name: str) -> None:
            started[name].set()
            try:
                if name == "wait":
                    waiter.wait()
                else:
                    assert reader.stdout is not None
                    reader.stdout.read(100)
            except BaseException as e:
                outcomes[name] = (e, time.monotonic())
            else:
                outcomes[name] = (AssertionError(f"{name} returned normally"), time.monotonic())

        threads = [threading.Thread(target=blocked, args=(name,), daemon=True) for name in started]
        for thread in threads:
            thread.start()
        assert all(event.wait(10) for event in started.values())
        # both are blocked (or about to be): neither has anything to return
        assert not outcomes
        killed_at = time.monotonic()
        os.kill(agent, signal.SIGKILL)
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive(), "a blocked call is still blocked after the agent died"
        for name, (error, when) in outcomes.items():
            assert isinstance(error, ConnectionLost), f"{name}: {error!r}"
            assert when - killed_at < 1.0, f"{name} took {when - killed_at:.3f} s to fail"
        with pytest.raises(ConnectionLost):
            conn.ping()
        with pytest.raises(ConnectionLost):
            waiter.wait(timeout=1)
        with pytest.raises(ConnectionLost):
            conn.spawn(["true"])
    finally:
        conn.close()
        for pid in orphans:  # the agent's watchdog kills them (test_killed_agent_takes_its_children)
            kill_quietly(pid)
    assert wait_until(lambda: all(proc_gone(pid) for pid in orphans), 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stopped", [False, True], ids=["killed", "stopped-then-killed"])
def test_killed_agent_takes_its_children(stopped: bool) -> None:
    conn = remowt.connect_local()
    family: Optional[Family] = None
    try:
        agent = conn.info().pid
        family = Family(conn)
        if stopped:
            os.kill(agent, signal.SIGSTOP)
            assert wait_until(lambda: proc_state(agent) == "T", 10)
        os.kill(agent, signal.SIGKILL)  # as the OOM killer does: no chance to clean up
        assert family.doomed_gone(10), f"alive: {family.alive()}"
        assert proc_alive(family.kept), "a child spawned with keep_on_disconnect outlives its agent"
    finally:
        conn.close()
        if family is not None:
            family.kill()


@pytest.mark.timeout(60)
def test_agent_of_a_stopped_client_ends_itself_and_its_children() -> None:
    client = start_client(agent_keepalive=0.2)
    pids: List[int] = []
    try:
        report = json.loads(read_line(client, 30))
        doomed = [report["agent"], *report["children"], *report["grandchildren"]]
        pids = [*doomed, report["kept"]]
        os.kill(client.pid, signal.SIGSTOP)  # its link stays open, and silent
        gone = wait_until(lambda: all(proc_gone(pid) for pid in doomed), 10)
        assert gone, {pid: "alive" for pid in doomed if proc_alive(pid)}
        assert proc_alive(report["kept"])
    finally:
        end_client(client, pids)


@pytest.mark.timeout(60)
def test_an_idle_connection_keeps_its_agent() -> None:
    # keepalives every 0.1 s when idle; the agent gives up after 6 silent intervals
    with remowt.connect_local(agent_keepalive=0.1, agent_keepalive_count=6) as conn:
        agent = conn.info().pid
        child = conn.spawn(["sleep", "1000"])
        threading.Event().wait(1.2)  # idle, for twice what the agent would wait without keepalives
        assert conn.ping() >= 0
        assert proc_alive(agent) and proc_alive(child.pid)


@pytest.mark.timeout(60)
def test_keepalives_are_sent_only_when_nothing_else_was() -> None:
    user, agent = Router("user"), Router("agent")
    agent.register(Control("agent"))
    link, _ = connect_routers(user, agent)
    ping = ControlApi.methods["ping"]
    args = ping.encode_args((), {})
    sent: List[float] = []
    sender = Sender(link, 0.5, lambda: sent.append(time.monotonic()))  # type: ignore[arg-type]
    try:
        sender.start()
        assert len(sent) == 1, "the first one goes at once: it tells the agent the interval"
        busy_until = time.monotonic() + 1.1
        while time.monotonic() < busy_until:  # traffic more than once an interval: no keepalive needed
            user.notify("agent", ControlApi.namespace, ping.number, args)
            threading.Event().wait(0.01)
        assert len(sent) == 1, f"{len(sent) - 1} keepalives on a busy link"
        assert wait_until(lambda: len(sent) >= 2, 5), "idle, the link gets keepalives"
    finally:
        sender.stop()
        user.close()
        agent.close()


def test_bad_keepalive_settings_are_refused() -> None:
    for bad in (-1, float("nan"), float("inf"), "15", True):
        with pytest.raises(ValueError, match="agent_keepalive must be a number of seconds"):
            remowt.connect_local(agent_keepalive=bad)  # type: ignore[arg-type]
    for count in (1, 2.5, None):
        with pytest.raises(ValueError, match="agent_keepalive_count must be an integer of at least 2"):
            remowt.connect_local(agent_keepalive_count=count)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_watchdog_counts_each_group_as_often_as_it_was_watched() -> None:
    from remowt.endpoints.watchdog import start_watchdog

    watchdog = start_watchdog()
    assert watchdog is not None
    twice, forgotten = (subprocess.Popen(["sleep", "1000"], start_new_session=True) for _ in range(2))
    try:
        watchdog.watch(twice.pid)
        watchdog.watch(twice.pid)  # an exited, unreleased child had this pid too
        watchdog.forget(twice.pid)
        watchdog.watch(forgotten.pid)
        watchdog.forget(forgotten.pid)
        watchdog.close(10)  # a clean end kills what is still counted
        assert twice.wait(10) == -signal.SIGKILL
        assert forgotten.poll() is None
        assert watchdog.process.returncode == 0, "told to stand down, the watchdog exits without killing"
    finally:
        for child in (twice, forgotten):
            child.kill()
            child.wait(10)
