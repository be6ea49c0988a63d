"""Output is never silently lost: a result is complete only when every output reached its end.

A lost link before an output's end raises ``ConnectionLost`` (even when the
exit, which is not flow-controlled, arrived first); a failed local write of
copied output reaches the child as EPIPE or the caller as the error; neither
is ever reported as success.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterator, List

import pytest
from _util import make_connection, wait_until
from sshd import SshServer
from test_cli import REMOWT

import remowt
from remowt.errors import ConnectionLost
from remowt.transports.loopback import LoopbackTransport
from remowt.user.popen import INHERIT_GRACE

pytestmark = pytest.mark.timeout(30)

SIZE = 5_000_000  # more than a stream window (4 MiB): the rest waits in the agent for credit
KILLS_ITS_AGENT = f"head -c {SIZE} /dev/zero; (sleep 0.3; kill -KILL $PPID) & exit 0"  # the grandchild holds stdout


def _connect(kind: str, request: pytest.FixtureRequest) -> remowt.Remowt:
    if kind == "ssh":
        sshd: SshServer = request.getfixturevalue("sshd")
        return remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config)
    return make_connection(kind)


@pytest.fixture(params=["loopback", "local", "ssh"])
def connection(request: pytest.FixtureRequest) -> Iterator[remowt.Remowt]:
    conn = _connect(request.param, request)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(params=["loopback", "ssh"])
def copying_connection(request: pytest.FixtureRequest) -> Iterator[remowt.Remowt]:
    """A connection whose children's output is copied over the link (a local agent's goes into our fds as it is)."""
    conn = _connect(request.param, request)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(params=["local", "ssh"])
def agent_connection(request: pytest.FixtureRequest) -> Iterator[remowt.Remowt]:
    """A connection whose agent is a process of its own (its children can kill it)."""
    conn = _connect(request.param, request)
    try:
        yield conn
    finally:
        conn.close()


def cut(connection: remowt.Remowt) -> None:
    """End the link as a crash would: the loopback transport closes, else the agent is killed."""
    transport = connection.link.transport
    if isinstance(transport, LoopbackTransport):
        transport.close()
    else:
        os.kill(connection.info().pid, signal.SIGKILL)


def drain(fd: int) -> None:
    """Read ``fd`` to its end, then close it."""
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def test_communicate_raises_when_the_link_dies_before_the_output_ends(copying_connection: remowt.Remowt) -> None:
    connection = copying_connection
    process = connection.Popen(["head", "-c", str(SIZE), "/dev/zero"], stdout=remowt.PIPE)
    assert process.wait(10) == 0  # the exit overtook the output, which waits for credit nobody gave
    cut(connection)
    with pytest.raises(ConnectionLost):
        process.communicate(timeout=10)


def test_wait_raises_when_copied_output_is_cut_off(copying_connection: remowt.Remowt) -> None:
    connection = copying_connection
    read_end, write_end = os.pipe()
    try:
        process = connection.Popen(["head", "-c", str(SIZE), "/dev/zero"], stdout=write_end)
        assert process._process is not None
        assert process._process.wait(10) == 0  # the exit arrived; the output waits for our full pipe
        cut(connection)
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            process.wait(10)
        assert time.monotonic() - start < INHERIT_GRACE  # at once, not after the grace for grandchildren
        assert process.wait(0) == 0  # raised once; the status stays
    finally:
        os.close(write_end)
        drain(read_end)  # what did arrive is still written


@pytest.mark.parametrize("call", ["run", "check_output", "copied"])
def test_a_result_without_the_end_of_its_output_raises(agent_connection: remowt.Remowt, call: str) -> None:
    argv = ["sh", "-c", KILLS_ITS_AGENT]
    if agent_connection.fd_sender is not None:  # the output went into our pipe as it was written: it is whole
        if call == "copied":
            with open(os.devnull, "wb") as null:
                assert agent_connection.run(argv, stdout=null, timeout=20).returncode == 0
        else:
            assert len(agent_connection.run(argv, capture_output=True, timeout=20).stdout) == SIZE
        return
    with pytest.raises(ConnectionLost):
        if call == "run":
            agent_connection.run(argv, capture_output=True, timeout=20)
        elif call == "check_output":
            agent_connection.check_output(argv, timeout=20)
        else:
            read_end, write_end = os.pipe()
            reader = threading.Thread(target=drain, args=(read_end,))
            reader.start()
            try:
                agent_connection.run(argv, stdout=write_end, timeout=20)
            finally:
                os.close(write_end)
                reader.join(10)


def test_link_lost_during_spawns_with_copied_outputs(
    agent_connection: remowt.Remowt, caplog: pytest.LogCaptureFixture
) -> None:
    # The link-closed hook and each failed spawn both end the outputs: their fd copies must be closed
    # once (a second close fails with EBADF, in the spawn or in the hook, or closes a file opened
    # meanwhile). Which of the two comes first is a race: four spawns make the double close likely.
    agent = agent_connection.info().pid
    spawns = 4
    outcome: List[BaseException] = []

    def spawn() -> None:
        try:
            agent_connection.Popen(["true"], stdout=null, stderr=null)
        except BaseException as e:
            outcome.append(e)

    with open(os.devnull, "wb") as null:
        os.kill(agent, signal.SIGSTOP)
        threads = [threading.Thread(target=spawn) for _ in range(spawns)]
        for thread in threads:
            thread.start()
        try:  # every spawn waits for its answer
            assert wait_until(lambda: agent_connection.children.count() == spawns, 10)
        finally:
            os.kill(agent, signal.SIGKILL)
        for thread in threads:
            thread.join(10)
    assert len(outcome) == spawns and all(isinstance(e, ConnectionLost) for e in outcome), outcome
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_failed_local_write_is_never_success(connection: remowt.Remowt) -> None:
    if connection.fd_sender is not None:  # a local agent's child has the fd itself: its own writes fail
        with open("/dev/full", "wb") as full:
            assert connection.run(["head", "-c", "100M", "/dev/zero"], stdout=full).returncode == 1
            assert connection.run(["sh", "-c", "echo oops >&2"], stderr=full).returncode != 0
        return
    with open("/dev/full", "wb") as full:
        # the child writes on after the first failed write: it gets EPIPE, as from a reader that went away
        assert connection.run(["head", "-c", "100M", "/dev/zero"], stdout=full).returncode == -signal.SIGPIPE
        # the child was done before the write failed: the call raises the error
        with pytest.raises(OSError) as failed:
            connection.run(["echo", "hello"], stdout=full)
        assert failed.value.errno == errno.ENOSPC and "stdout" in str(failed.value)
        with pytest.raises(OSError) as failed:
            connection.run(["sh", "-c", "echo oops >&2"], stderr=full)
        assert failed.value.errno == errno.ENOSPC and "stderr" in str(failed.value)
        # either way, as long as the child wrote more than its pipes hold
        try:
            assert connection.run(["head", "-c", "1M", "/dev/zero"], stdout=full).returncode != 0
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_reader_that_went_away_ends_the_child_at_once(connection: remowt.Remowt) -> None:
    read_end, write_end = os.pipe()
    process = connection.Popen(["yes"], stdout=write_end)
    os.close(write_end)
    assert os.read(read_end, 2) == b"y\n"
    os.close(read_end)
    start = time.monotonic()
    assert process.wait(10) == -signal.SIGPIPE
    assert time.monotonic() - start < INHERIT_GRACE / 2


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_cli_yes_into_head_ends_at_once(where: str, request: pytest.FixtureRequest) -> None:
    target = ["local"]
    if where == "ssh":
        target = ["ssh", "-F", request.getfixturevalue("sshd").ssh_config, "remowt-test-host"]
    start = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -1', "-", *REMOWT, *target, "--", "yes"],
        capture_output=True,
        timeout=25,
    )
    assert (result.returncode, result.stdout, result.stderr) == (128 + signal.SIGPIPE, b"y\n", b"")
    assert time.monotonic() - start < INHERIT_GRACE + (3 if where == "ssh" else 0)  # ssh: login and deploy


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_cli_output_that_cannot_be_written_is_an_error(where: str, request: pytest.FixtureRequest) -> None:
    target = ["local"]
    if where == "ssh":
        target = ["ssh", "-F", request.getfixturevalue("sshd").ssh_config, "remowt-test-host"]
    with open("/dev/full", "wb") as full:
        echo = subprocess.run([*REMOWT, *target, "--", "echo", "hi"], stdout=full, stderr=subprocess.PIPE, timeout=25)
        head = subprocess.run([*REMOWT, *target, "--", "head", "-c", "1M", "/dev/zero"], stdout=full, timeout=25)
    if where == "local":  # the child writes to /dev/full itself, as it would run locally
        assert echo.returncode == 1 and b"No space left on device" in echo.stderr, echo.stderr
        assert head.returncode == 1
    else:  # the output is copied: writing it here fails, and the command exits 255 with the reason, as ssh does
        assert echo.returncode == 255 and b"No space left on device" in echo.stderr, echo.stderr
        assert head.returncode in (255, 128 + signal.SIGPIPE)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, remowt
    connection = remowt.connect_local()
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (100 << 20),) * 2)
    try:
        connection.run(["head", "-c", "1000M", "/dev/zero"], capture_output=True, timeout=10)
    except BaseException as e:
        print(type(e).__name__)
    """
)


def test_memory_error_in_communicate_reaches_the_caller() -> None:
    # 100 MiB more address space than connected: collecting 1000 MB of output fails, in a reader thread
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=25, env=env)
    assert result.stdout == "MemoryError\n", result.stderr
