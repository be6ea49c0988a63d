"""Real signals at a program that waits for a remote child: signal handlers, Ctrl-C, and the CLI killed.

The CLI runs in a process group of its own, so ``os.killpg`` hits it as a
terminal's Ctrl-C would hit a foreground job (and, before the local agent got a
session of its own, the agent with it). A real Ctrl-C is typed into a tmux pane.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Set, Tuple

import pytest
from _util import children_of, kill_quietly, proc_alive, proc_gone, wait_until
from sshd import SshServer

import remowt

pytestmark = pytest.mark.timeout(90)

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = ["sh", "-c", "echo $$; exec sleep 100"]
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TRIES = 50
AT_ONCE = 3


@pytest.fixture(params=["local", "ssh"])
def where(request: pytest.FixtureRequest) -> str:
    """Where the CLI and the client program connect: ``local``, or the test sshd's ssh_config."""
    if request.param == "local":
        return "local"
    sshd: SshServer = request.getfixturevalue("sshd")
    return sshd.ssh_config


def cli_argv(where: str) -> List[str]:
    if where == "local":
        return ["remowt", "local", "--"]
    return ["remowt", "ssh", "-F", where, "remowt-test-host", "--"]


# --- a signal handler in the library --------------------------------------------


@pytest.mark.timeout(30)
def test_handler_terminates_the_child_during_wait(any_conn: remowt.Remowt) -> None:
    process = any_conn.Popen(["sleep", "100"])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert process.wait(timeout=20) == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert any_conn.ping() < 5


@pytest.mark.timeout(30)
def test_signal_group_spares_the_agent(local_conn: remowt.Remowt) -> None:
    """A child put in the agent's own process group gets the signal alone: the agent is not in its job."""
    agent = local_conn.info().pid
    assert os.getpgid(agent) == agent  # the local agent leads a session (and group) of its own
    shell = local_conn.Popen(["sleep", "100"], process_group=agent)
    shell.signal_group(signal.SIGTERM)
    assert shell.wait(timeout=10) == -signal.SIGTERM
    assert local_conn.ping() < 5


# --- a library program interrupted: the connection still answers ---------------------


def start_client(how: str, where: str) -> Tuple[subprocess.Popen[str], int]:
    """The client program in a process group of its own, and the pid of its remote child (once it waits for it)."""
    program = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "interrupted_client.py"), how, where],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    assert program.stdout is not None
    lines = [program.stdout.readline()]
    if how == "wait":
        lines.append(program.stdout.readline())
    pids = [line for line in lines if line.strip().isdigit()]
    if not (len(pids) == 1 and set(lines) - set(pids) <= {"waiting\n"}):
        program.kill()
        raise AssertionError((lines, program.communicate(timeout=10)))
    return program, int(pids[0])


@pytest.mark.parametrize("how", ["wait", "run"])
def test_ctrl_c_in_a_library_program_leaves_the_connection_serving(how: str, where: str) -> None:
    """killpg(SIGINT), as a terminal sends it: KeyboardInterrupt; wait() leaves the child running, run() kills it."""
    program, child = start_client(how, where)
    try:
        os.killpg(program.pid, signal.SIGINT)
        out, err = program.communicate(timeout=20)
    finally:
        kill_quietly(child)
        kill_quietly(program.pid)
    lines = out.splitlines()
    assert program.returncode == 0, (out, err)
    assert lines[0] == "interrupted" and lines[1].startswith("ping ") and lines[-1] == "done", out
    if how == "wait":
        assert lines[2:4] == ["running True", f"returncode {-signal.SIGKILL}"], out
    assert wait_until(lambda: proc_gone(child), 1.0)


# --- the CLI killed by signals --------------------------------------------------------


def kill_cli(argv: List[str], sig: signal.Signals, group: bool) -> Optional[str]:
    """Start the CLI, signal it (or its process group) once the child runs; what went wrong, or None."""
    cli = subprocess.Popen(
        argv + CHILD, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0
    )
    assert cli.stdout is not None
    child = -1
    try:
        line = cli.stdout.readline()
        if not line.strip().isdigit():
            return f"no pid from the child: {line!r} {cli.communicate(timeout=10)}"
        child = int(line)
        sent = time.monotonic()
        (os.killpg if group else os.kill)(cli.pid, sig)
        _, err = cli.communicate(timeout=10)
        took = time.monotonic() - sent
        gone = proc_gone(child)
        target = "group" if group else "process"
        if (cli.returncode, gone, err) != (128 + sig, True, b"") or took > 1.0:
            return f"{sig.name} to the {target}: exit {cli.returncode}, child gone {gone}, {took:.2f} s, {err!r}"
        return None
    finally:
        kill_quietly(child)
        kill_quietly(cli.pid)
        cli.wait()


def test_cli_killed_by_signals(where: str) -> None:
    """INT, TERM and HUP, to the CLI and to its process group: 128+N, the child gone, within 1 s, every time."""
    argv = cli_argv(where)

    def one(i: int) -> Optional[str]:
        return kill_cli(argv, FORWARDED[i % 3], group=(i // 3) % 2 == 1)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        problems = [problem for problem in pool.map(one, range(TRIES)) if problem is not None]
    assert problems == []


@pytest.mark.timeout(30)
def test_cli_child_that_ignores_signals_is_killed_by_the_third() -> None:
    cli = subprocess.Popen(
        ["remowt", "local", "--", "sh", "-c", "trap '' INT TERM HUP; echo $$; exec sleep 100"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        process_group=0,
    )
    assert cli.stdout is not None
    child = int(cli.stdout.readline())
    try:
        for sig in (signal.SIGINT, signal.SIGHUP):
            os.kill(cli.pid, sig)
            with pytest.raises(subprocess.TimeoutExpired):
                cli.wait(0.3)
            assert proc_alive(child)
        os.kill(cli.pid, signal.SIGTERM)
        assert cli.wait(timeout=1) == 128 + signal.SIGTERM
        assert proc_gone(child)
    finally:
        kill_quietly(child)
        kill_quietly(cli.pid)
        cli.wait()


@pytest.mark.timeout(30)
def test_cli_signals_the_childs_process_group() -> None:
    """As a terminal does: a shell waiting for ``sleep`` would otherwise wait 100 s before it dies of the SIGINT."""
    cli = subprocess.Popen(
        ["remowt", "local", "--", "sh", "-c", "echo $$; sleep 100; echo after"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        process_group=0,
    )
    assert cli.stdout is not None
    shell = int(cli.stdout.readline())
    sleeps: Set[int] = set()
    try:
        assert wait_until(lambda: bool(sleeps.update(children_of(shell)) or sleeps), 10)
        os.kill(cli.pid, signal.SIGINT)
        assert cli.wait(timeout=1) == 128 + signal.SIGINT
        assert cli.stdout.read() == b""
        assert proc_gone(shell) and all(proc_gone(pid) for pid in sleeps)
    finally:
        for pid in (shell, *sleeps, cli.pid):
            kill_quietly(pid)
        cli.wait()


# --- a real Ctrl-C typed into a terminal ----------------------------------------------


Tmux = Callable[..., str]


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    """``tmux(*args)`` on a tmux server of this test's own, killed afterwards; returns tmux's output."""
    socket = f"remowt-test-{uuid.uuid4().hex[:12]}"

    def run(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", socket, *args], check=True, capture_output=True, text=True, timeout=10
        ).stdout

    try:
        yield run
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=10)


def ctrl_c_in_pane(tmux: Tmux, argv: List[str], until: str, ready: str = "") -> Tuple[int, str]:
    """Run ``argv`` in a pane, type Ctrl-C once its child printed its pid (and ``ready`` is on the screen too),
    and wait for ``until``: (pid, screen)."""
    line = " ".join(shlex.quote(word) for word in argv)
    environment = f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))}"
    tmux("new-session", "-d", "-s", "t", "-x", "200", "-y", "50", f"env {environment} {line}; echo exit=$?; sleep 60")

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "t")

    def child_pid() -> int:
        pids = [int(line) for line in screen().splitlines()[:2] if line.strip().isdigit()]
        return pids[0] if pids and ready in screen() else 0

    assert wait_until(lambda: child_pid() > 0, 20), screen()
    child = child_pid()
    try:
        tmux("send-keys", "-t", "t", "C-c")
        assert wait_until(lambda: until in screen(), 10), screen()
        return child, screen()
    finally:
        kill_quietly(child)


@pytest.mark.timeout(60)
def test_ctrl_c_typed_at_the_cli(tmux: Tmux) -> None:
    child, screen = ctrl_c_in_pane(tmux, ["remowt", "local", "--", *CHILD], "exit=")
    assert "exit=130" in screen, screen
    assert proc_gone(child)


@pytest.mark.timeout(60)
def test_ctrl_c_typed_at_a_library_program(tmux: Tmux) -> None:
    argv = [sys.executable, os.path.join(HERE, "interrupted_client.py"), "wait", "local"]
    child, screen = ctrl_c_in_pane(tmux, argv, "exit=", ready="waiting")
    lines = [line for line in screen.splitlines() if line.strip()]
    assert "interrupted" in screen and "running True" in lines and f"returncode {-signal.SIGKILL}" in lines, screen
    assert "done" in lines and "exit=0" in lines, screen
    assert proc_gone(child)
