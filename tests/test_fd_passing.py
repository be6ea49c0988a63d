"""A local agent's children get this process's fds as they are, and no fd stays open anywhere it should not."""

from __future__ import annotations

import os
import sys
import threading
from functools import partial
from typing import Iterator

import pytest
from _util import fd_count, read_now, wait_until

import remowt
from remowt.endpoints.subprocess import SpawnOptions, move_off_targets, place_fds
from remowt.errors import BadArguments, ConnectionLost
from remowt.runtime.real_subprocess import Popen as LocalPopen
from remowt.transports.fdpass import MAX_FDS, FdReceiver, FdSender, socket_pair

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


def test_closing_the_receiver_ends_a_take_that_waits(pair: tuple[FdSender, FdReceiver]) -> None:
    """A spawn waiting for fds that never come (its caller was interrupted after the call) fails as soon as the
    agent shuts down, rather than holding a worker, and the shutdown, until its timeout (it held both 10 s)."""
    _, receiver = pair
    failed: list[BaseException] = []
    started = threading.Event()

    def take() -> None:
        started.set()
        try:
            receiver.take(5, 1, timeout=60)
        except BaseException as e:
            failed.append(e)

    taker = threading.Thread(target=take)
    taker.start()
    assert started.wait(10)
    assert not wait_until(lambda: not taker.is_alive(), 0.2)  # it waits for the batch
    receiver.close()
    taker.join(5)
    assert not taker.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], ConnectionLost), failed


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


def test_a_batch_takes_up_to_scm_max_fd(pair: tuple[FdSender, FdReceiver]) -> None:
    sender, receiver = pair
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        assert sender.try_send(11, [null] * MAX_FDS)
        received = receiver.take(11, MAX_FDS, timeout=5)
        assert len(set(received)) == MAX_FDS
        for fd in received:
            os.close(fd)
        with pytest.raises(ValueError, match="at most 253"):
            sender.try_send(12, [null] * (MAX_FDS + 1))
    finally:
        os.close(null)


def test_the_agent_knows_who_started_it(pair: tuple[FdSender, FdReceiver]) -> None:
    _, receiver = pair
    assert receiver.peer_pid() == os.getpid()


def test_fds_are_placed_in_the_child_even_where_another_ones_source_is() -> None:
    # the agent gets the fds at numbers of its own, which may be other fds' targets: each target but the first and
    # the last is where the fd for the next target was received, so placing them in turn would overwrite a source
    # before its placement; the first fd is at its own target (a dup2 onto itself would leave it close-on-exec)
    made = [os.pipe() for _ in range(6)]
    received = [os.dup(write_fd) for _, write_fd in made]
    targets = [received[0], *received[2:], max(received) + 1]
    inherited = dict(zip(targets, received))
    move_off_targets(inherited)
    placements = tuple((fd, target) for target, fd in inherited.items())
    script = "import os, sys\nfor fd in sys.argv[1:]: os.write(int(fd), fd.encode())"
    try:
        child = LocalPopen(
            [sys.executable, "-c", script, *map(str, targets)],
            close_fds=False,
            preexec_fn=partial(place_fds, placements),
        )
        assert child.wait(10) == 0
        assert [read_now(read_fd) for read_fd, _ in made] == [str(target).encode() for target in targets]
    finally:
        for fd in [*inherited.values(), *(fd for pair in made for fd in pair)]:
            os.close(fd)


def test_pass_fds_the_agent_refuses_are_closed_there() -> None:
    with remowt.connect_local() as conn:
        conn.run(["true"])
        there = agent_fds(conn)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            for targets in ([1], [null, null]):
                with pytest.raises(BadArguments, match="pass_fds must be distinct fd numbers above 2"):
                    conn.spawn(["true"], SpawnOptions(pass_fds=targets))
            with pytest.raises(FileNotFoundError):
                conn.Popen(["no-such-program-remowt-fdpass"], pass_fds=[null])
        finally:
            os.close(null)
        assert wait_until(lambda: agent_fds(conn) == there, 10), agent_fds(conn)


def test_pass_fds_on_a_terminal_are_refused() -> None:
    with remowt.connect_local() as conn, pytest.raises(ValueError, match="a child on a terminal"):
        conn.Popen(["true"], pty=True, stdout=remowt.PIPE, pass_fds=[2])


def test_more_fds_than_a_message_carries_is_a_clear_error() -> None:
    with remowt.connect_local() as conn:
        conn.run(["true"])
        many = [os.open(os.devnull, os.O_RDONLY) for _ in range(MAX_FDS + 1)]
        try:
            for fd in many:
                os.set_inheritable(fd, True)
            here, there = fd_count(), agent_fds(conn)
            for kwargs in ({"pass_fds": many}, {"close_fds": False}):
                with pytest.raises(ValueError, match="fds to hand the child: at most 253 go in one message"):
                    conn.run(["true"], **kwargs)
            assert (fd_count(), agent_fds(conn), conn.children.count()) == (here, there, 0)
            assert conn.run(["true"], pass_fds=many[: MAX_FDS - 3]).returncode == 0  # the stdio's 3 and these: 253
        finally:
            for fd in many:
                os.close(fd)
