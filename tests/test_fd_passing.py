"""A local agent's children get this process's fds as they are, and no fd stays open anywhere it should not."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from _util import fd_count, wait_until

import remowt
from remowt.errors import BadArguments, ConnectionLost
from remowt.transports.fdpass import FdReceiver, FdSender, socket_pair

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[FdSender, FdReceiver]]:
    ours, theirs = socket_pair()
    sender, receiver = FdSender(ours), FdReceiver(theirs.detach())
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def ended(read_fd: int) -> bool:
    """Whether every write end of the pipe ``read_fd`` reads from is closed (its read gives EOF at once)."""
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 1) == b""
    except BlockingIOError:
        return False


def test_a_batch_is_taken_by_its_token(pair: tuple[FdSender, FdReceiver]) -> None:
    sender, receiver = pair
    read_fd, write_fd = os.pipe()
    assert sender.try_send(7, [write_fd])
    os.close(write_fd)
    [received] = receiver.take(7, 1, timeout=5)
    os.write(received, b"through")
    os.close(received)
    assert os.read(read_fd, 10) == b"through" and ended(read_fd)
    os.close(read_fd)


def test_a_batch_that_never_comes_is_a_clear_error_and_a_late_one_is_closed(pair: tuple[FdSender, FdReceiver]) -> None:
    sender, receiver = pair
    with pytest.raises(BadArguments, match="spawn 3 did not arrive"):
        receiver.take(3, 1, timeout=0.1)
    read_fd, write_fd = os.pipe()
    assert sender.try_send(3, [write_fd])
    os.close(write_fd)
    with pytest.raises(BadArguments):  # taking another batch receives the late one: it is closed, not kept
        receiver.take(4, 1, timeout=0.1)
    assert ended(read_fd)
    os.close(read_fd)


def test_batches_nobody_took_are_closed_with_the_receiver(pair: tuple[FdSender, FdReceiver]) -> None:
    sender, receiver = pair
    read_fd, write_fd = os.pipe()
    assert sender.try_send(9, [write_fd, write_fd])
    os.close(write_fd)
    with pytest.raises(BadArguments, match="2 fds for 1"):  # a batch of the wrong size is closed too
        receiver.take(9, 1, timeout=5)
    assert ended(read_fd)
    assert sender.try_send(10, [read_fd])
    receiver.close()
    os.close(read_fd)


def agent_fds(conn: remowt.Remowt) -> int:
    return len(os.listdir(f"/proc/{conn.info().pid}/fd"))


def test_failed_spawns_leave_no_fd_here_or_in_the_agent() -> None:
    with remowt.connect_local() as conn:
        conn.run(["true"], capture_output=True)
        here, there = fd_count(), agent_fds(conn)
        for _ in range(20):
            with pytest.raises(FileNotFoundError):
                conn.Popen(["no-such-program-remowt-fdpass"], stdin=remowt.PIPE, stdout=remowt.PIPE)
            with pytest.raises(FileNotFoundError):
                conn.run(["true"], cwd="/no/such/dir", stdout=2)
        assert wait_until(lambda: (fd_count(), agent_fds(conn)) == (here, there), 10), (fd_count(), agent_fds(conn))


def test_a_node_without_an_fd_socket_refuses_passed_fds() -> None:
    with remowt.loopback() as conn:
        assert conn.fd_sender is None
        with pytest.raises(ValueError, match="cannot take this process's fds"):
            conn.spawn(["true"], passed={"stdout": 1})


def test_the_child_writes_into_our_pipe_itself() -> None:
    with remowt.connect_local() as conn:
        proc = conn.Popen(["sh", "-c", "stat -L -c %i /proc/$$/fd/1"], stdout=remowt.PIPE)
        assert proc.stdout is not None
        ours = os.fstat(proc.stdout.fileno()).st_ino
        out, _ = proc.communicate(timeout=10)
    assert int(out) == ours


def test_fds_that_cannot_be_sent_send_no_spawn_either() -> None:
    with remowt.connect_local() as conn:
        assert conn.fd_sender is not None
        conn.fd_sender.close()
        here = fd_count()
        with pytest.raises(ConnectionLost, match="closed"):
            conn.Popen(["echo", "never"], stdout=remowt.PIPE)
        assert fd_count() == here and conn.children.count() == 0
        quiet = {"stdin": remowt.DEVNULL, "stdout": remowt.DEVNULL, "stderr": remowt.DEVNULL}
        assert conn.run(["true"], **quiet).returncode == 0  # the connection serves on
