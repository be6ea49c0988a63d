"""Who outlives whom: the client dying, the agent dying, keep_on_disconnect."""

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
from typing import Dict, List, Tuple

import pytest
from _util import kill_quietly, proc_alive, proc_gone, reap_quietly, wait_until

import remowt
from remowt import PIPE
from remowt.errors import ConnectionLost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(remowt.__file__)))

CLIENT = textwrap.dedent(
    """
    import json, sys, threading
    import remowt

    conn = remowt.connect_local()
    plain = conn.spawn(["sleep", "1000"])
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


@pytest.mark.timeout(60)
def test_killing_the_client_kills_agent_and_children() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = subprocess.Popen([sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, env=env)
    pids: List[int] = []
    try:
        report = json.loads(read_line(client, 30))
        agent = report["agent"]
        pids = [agent, *report["children"], *report["grandchildren"]]
        assert len(set(pids)) == 4
        assert all(proc_alive(pid) for pid in pids), {pid: proc_alive(pid) for pid in pids}
        client.send_signal(signal.SIGKILL)
        assert client.wait(10) == -signal.SIGKILL
        # the agent sees its stdin close, kills its children's process groups and exits
        gone = wait_until(lambda: all(proc_gone(pid) for pid in pids), 10)
        assert gone, {pid: "alive" for pid in pids if proc_alive(pid)}
    finally:
        kill_quietly(client.pid)
        client.wait(10)
        if client.stdout is not None:
            client.stdout.close()
        for pid in pids:
            kill_quietly(pid)


@pytest.mark.timeout(60)
def test_keep_on_disconnect(conn: remowt.Remowt) -> None:
    kept = conn.spawn(["sleep", "1000"], keep_on_disconnect=True)
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
        # a SIGKILLed agent cannot clean up: its children are orphans now
        for pid in orphans:
            kill_quietly(pid)
    assert wait_until(lambda: all(proc_gone(pid) for pid in orphans), 10)
