"""Every blocking call takes a timeout and honours it: a stopped agent, a dead network, a stalling ssh server.

The agent is stopped with a real SIGSTOP (the tests run as root, so the ssh
agent of the test user can be stopped too), the network is cut in a network
namespace (``sshd_in_netns``), and the stalling server is paramiko's server
side on 127.0.0.1 that authenticates and then never answers one step.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type

import paramiko
import pytest
from _util import agent_children, wait_until
from sshd import SshServer
from test_ssh import sshd_in_netns  # noqa: F401  (a fixture)

import remowt
from remowt.deploy.remote import DeployError
from remowt.errors import SshError
from remowt.runtime.deadline import KILL_GRACE, Deadline, lock_timeout, poll_timeout

pytestmark = pytest.mark.timeout(60)
MARGIN = 1.5  # what a loaded two-CPU machine may add to a timeout


def returns_within(seconds: float, call: Callable[[], Any]) -> Tuple[Any, Optional[BaseException]]:
    """Run ``call`` on a thread; fail unless it returns or raises within ``seconds``. Returns (result, error)."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return box.get("result"), box.get("error")


def raises_within(seconds: float, error: Type[BaseException], call: Callable[[], Any]) -> BaseException:
    result, raised = returns_within(seconds, call)
    assert isinstance(raised, error), f"expected {error.__name__}, got {raised!r} (result {result!r})"
    return raised


# --- Deadline ------------------------------------------------------------------------------


def test_deadline() -> None:
    assert Deadline(None).remaining() is None and Deadline(None).left() is None
    deadline = Deadline(0.05, "the test")
    assert 0 < deadline.remaining() <= 0.05  # type: ignore[operator]
    assert deadline.shorter(10.0) <= 0.05 and deadline.shorter(0.01) == 0.01
    time.sleep(0.06)
    assert deadline.expired() and deadline.left() == 0.0
    with pytest.raises(TimeoutError, match=r"the test did not finish within 0\.05 s"):
        deadline.remaining()
    assert Deadline(-1).expired()
    paused = Deadline(0.05)
    with paused.paused():
        time.sleep(0.06)
        assert not paused.expired()
    assert not paused.expired()


def test_lock_and_poll_timeouts() -> None:
    assert lock_timeout(None) == -1 and lock_timeout(-2.0) == 0.0 and lock_timeout(0.25) == 0.25
    assert poll_timeout(None) is None and poll_timeout(-2.0) == 0 and poll_timeout(0.0) == 0
    assert poll_timeout(0.0001) == 1 and poll_timeout(0.25) == 250  # rounded up: no wait ends early


# --- a stopped agent ---------------------------------------------------------------------


class Stopped:
    """SIGSTOP the agent of ``conn``, and SIGCONT it when asked or at the end."""

    def __init__(self, conn: remowt.Remowt) -> None:
        self.pid = conn.info().pid
        self.stopped = False

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        assert wait_until(lambda: _state(self.pid) == "T", 5)

    def cont(self) -> None:
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)
            self.stopped = False


def _state(pid: int) -> Optional[str]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


@pytest.fixture
def local_agent() -> Iterator[Tuple[remowt.Remowt, Stopped]]:
    conn = remowt.connect_local()
    agent = Stopped(conn)
    try:
        yield conn, agent
    finally:
        agent.cont()
        conn.close()


def _check_calls_time_out(conn: remowt.Remowt, agent: Stopped) -> None:
    """With the agent stopped, every call ends at its timeout; once it continues, the connection serves."""
    agent.stop()
    started = time.monotonic()
    raises_within(1 + MARGIN, remowt.TimeoutExpired, lambda: conn.run(["true"], timeout=1))
    assert time.monotonic() - started >= 1.0
    raises_within(0.5 + MARGIN, TimeoutError, lambda: conn.ping(timeout=0.5))
    raises_within(0.5 + MARGIN, TimeoutError, lambda: conn.info(timeout=0.5))
    raises_within(0.5 + MARGIN, TimeoutError, lambda: conn.Popen(["true"], spawn_timeout=0.5))
    raises_within(0.5 + MARGIN, TimeoutError, lambda: conn.spawn(["true"], timeout=0.5))
    assert conn.router.pending_count() == 3  # the spawns, whose children must be killed when they start
    agent.cont()
    conn.ping(timeout=10)  # late answers were dropped or acted on; the link serves
    assert wait_until(lambda: conn.router.pending_count() == 0, 10)
    assert wait_until(lambda: not agent_children(agent.pid), 10), "a child whose spawn timed out still runs"
    assert conn.run(["echo", "ok"], capture_output=True, timeout=10).stdout == b"ok\n"


@pytest.mark.timeout(40)
def test_calls_to_a_stopped_local_agent_time_out(local_agent: Tuple[remowt.Remowt, Stopped]) -> None:
    _check_calls_time_out(*local_agent)


@pytest.mark.timeout(40)
def test_run_whose_agent_stops_during_the_run_times_out(local_agent: Tuple[remowt.Remowt, Stopped]) -> None:
    conn, agent = local_agent
    # once its input arrives (so the spawn was answered), the child stops its parent, the agent: the kill
    # after the timeout gets no answer either, and the input (more than a window) cannot all be sent
    agent.stopped = True
    stops_its_agent = ["sh", "-c", "head -c1 >/dev/null; kill -STOP $PPID; exec sleep 30"]
    started = time.monotonic()
    raises_within(
        1 + KILL_GRACE + MARGIN,
        remowt.TimeoutExpired,
        lambda: conn.run(stops_its_agent, input=b"x" * (8 << 20), capture_output=True, timeout=1),
    )
    assert time.monotonic() - started >= 1.0
    raises_within(1 + MARGIN, remowt.TimeoutExpired, lambda: conn.call(["sleep", "30"], timeout=1))  # the spawn
    agent.cont()
    assert wait_until(lambda: not agent_children(agent.pid), 10), "the child of a timed-out run was not killed"
    assert conn.run(["echo", "ok"], capture_output=True, timeout=10).stdout == b"ok\n"
    assert wait_until(lambda: conn.router.pending_count() == 0, 10)


@pytest.mark.timeout(30)
def test_privileged_start_times_out_with_a_stopped_agent(local_agent: Tuple[remowt.Remowt, Stopped]) -> None:
    conn, agent = local_agent
    agent.stop()
    raises_within(1 + MARGIN, TimeoutError, lambda: conn.privileged.start(timeout=1))
    raises_within(1 + MARGIN, TimeoutError, lambda: conn.privileged.ping(timeout=1))
    assert conn.router.pending_count() == 0
    agent.cont()
    assert conn.privileged.ping(timeout=20) >= 0


@pytest.mark.timeout(40)
def test_calls_to_a_stopped_ssh_agent_time_out(sshd: SshServer) -> None:
    conn = remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config)
    agent = Stopped(conn)
    try:
        _check_calls_time_out(conn, agent)
        agent.stop()
        returns_within(CLOSE_BOUND, conn.close)
    finally:
        agent.cont()
        conn.close()


CLOSE_BOUND = 6.0 + MARGIN


# --- a dead network -----------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_calls_over_a_dead_network_time_out(
    sshd_in_netns: Tuple[SshServer, Callable[[], None]],  # noqa: F811
) -> None:
    server, silence = sshd_in_netns
    conn = remowt.connect("remowt-test-host", ssh_config=server.ssh_config)
    try:
        conn.ping()
        silence()
        raises_within(1 + MARGIN, remowt.TimeoutExpired, lambda: conn.run(["true"], timeout=1))
        raises_within(0.5 + MARGIN, TimeoutError, lambda: conn.ping(timeout=0.5))
        raises_within(1 + MARGIN, TimeoutError, lambda: conn.spawn(["true"], timeout=1))
        returns_within(CLOSE_BOUND, conn.close)
    finally:
        conn.close()


# --- a stalling ssh server ----------------------------------------------------------------


class StallingServer(paramiko.ServerInterface):
    """Accepts any password, then never answers the step named ``stall_at``."""

    def __init__(self, stall_at: str, release: threading.Event) -> None:
        self.stall_at = stall_at
        self.release = release

    def _stall(self, step: str) -> None:
        if step == self.stall_at:
            self.release.wait()

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        self._stall("auth")
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        self._stall("channel")
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self._stall("exec")
        return True  # "deploy": the command "runs" and never says a word


@pytest.fixture(scope="module")
def host_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


@pytest.fixture
def stalling_server(host_key: paramiko.PKey) -> Iterator[Callable[[str], int]]:
    """``start(step)`` listens on 127.0.0.1 for one ssh client and stalls at ``step``; returns the port."""
    release = threading.Event()
    transports = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def start(step: str) -> int:
        def serve() -> None:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transports.append(transport)
            transport.add_server_key(host_key)
            transport.start_server(server=StallingServer(step, release))

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    try:
        yield start
    finally:
        release.set()
        listener.close()
        for transport in transports:
            transport.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("step", ["auth", "channel", "exec", "deploy"])
def test_connect_to_a_stalling_server_times_out(
    stalling_server: Callable[[str], int], step: str, tmp_path: Any
) -> None:
    port = stalling_server(step)

    def connect() -> remowt.Remowt:
        return remowt.connect(
            "127.0.0.1",
            port=port,
            user="someone",
            password="secret",
            key_filename=[],
            ssh_config=os.devnull,
            known_hosts=str(tmp_path / "known_hosts"),
            host_key_policy="accept-new",
            connect_timeout=1.0,
        )

    started = time.monotonic()
    error = raises_within(1.0 + MARGIN, DeployError if step == "deploy" else SshError, connect)
    assert time.monotonic() - started >= 0.9
    assert any(words in str(error) for words in ("timed out", "no answer", "did not answer")), error
