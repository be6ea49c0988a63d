"""Credit-based flow control: a reader that stops reading holds at most a window, and blocks nothing else."""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest
from _util import proc_gone, rss_bytes, wait_until

import remowt
from remowt import PIPE

GIB = 1 << 30


def echo_works(conn: remowt.Remowt) -> None:
    proc = conn.spawn(["echo", "alive"], stdout=PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readall(timeout=10) == b"alive\n"
    assert proc.wait(timeout=10) == 0


def warm_up(conn: remowt.Remowt) -> None:
    """Move some bytes through a pipe first, so that lazily made threads and buffers exist before measuring."""
    proc = conn.spawn(["head", "-c", str(32 << 20), "/dev/zero"], stdout=PIPE)
    assert proc.stdout is not None
    total = 0
    while True:
        chunk = proc.stdout.read(1 << 20, timeout=30)
        if not chunk:
            break
        total += len(chunk)
    assert total == 32 << 20
    assert proc.wait(timeout=10) == 0
    echo_works(conn)
    conn.ping()


def stall(conn: remowt.Remowt) -> tuple[remowt.RemoteProcess, int]:
    """Start 1 GiB of output nobody reads; return once exactly a window's worth has arrived."""
    proc = conn.spawn(["head", "-c", str(GIB), "/dev/zero"], stdout=PIPE)
    assert proc.stdout is not None
    window = proc.stdout.window
    assert window == remowt.rpc.streams.DEFAULT_WINDOW
    assert wait_until(lambda: proc.stdout is not None and proc.stdout.buffered >= window, 30), (
        f"only {proc.stdout.buffered} of a {window} byte window arrived"
    )
    # a full window and no credit returned: nothing more can arrive
    assert proc.stdout.buffered == window
    return proc, window


def check_stalled_connection_still_works(conn: remowt.Remowt, proc: remowt.RemoteProcess, window: int) -> None:
    for _ in range(20):
        assert conn.ping() < 0.5
    echo_works(conn)
    assert proc.poll() is None  # the producer is blocked, not dead
    assert proc.stdout is not None
    assert proc.stdout.buffered == window


@pytest.fixture
def local() -> Iterator[remowt.Remowt]:
    with remowt.connect_local() as conn:
        yield conn


@pytest.mark.timeout(120)
def test_stalled_reader_memory_bound_local(local: remowt.Remowt) -> None:
    conn = local
    agent_pid = conn.info().pid
    assert agent_pid != os.getpid()
    warm_up(conn)
    agent_before, me_before = rss_bytes(agent_pid), rss_bytes(os.getpid())

    proc, window = stall(conn)
    check_stalled_connection_still_works(conn, proc, window)
    # stalled for a while longer (the agent keeps trying to pump): still nothing more
    time_stalled = time.monotonic()
    assert wait_until(lambda: time.monotonic() - time_stalled > 0.3, 1)
    assert proc.stdout is not None and proc.stdout.buffered == window
    agent_growth = rss_bytes(agent_pid) - agent_before
    my_growth = rss_bytes(os.getpid()) - me_before
    assert agent_growth < 6 * window, f"agent RSS grew by {agent_growth} bytes while stalled"
    assert my_growth < 6 * window, f"client RSS grew by {my_growth} bytes while stalled"

    # now read all of it, watching memory on both sides
    total = 0
    peak_agent, peak_me = 0, 0
    next_sample = 0
    while True:
        chunk = proc.stdout.read(1 << 20, timeout=30)
        if not chunk:
            break
        total += len(chunk)
        if total >= next_sample:
            peak_agent = max(peak_agent, rss_bytes(agent_pid) - agent_before)
            peak_me = max(peak_me, rss_bytes(os.getpid()) - me_before)
            next_sample += 64 << 20
    assert total == GIB
    assert proc.wait(timeout=30) == 0
    peak_agent = max(peak_agent, rss_bytes(agent_pid) - agent_before)
    peak_me = max(peak_me, rss_bytes(os.getpid()) - me_before)
    assert peak_agent < 6 * window, f"agent RSS grew by {peak_agent} bytes while streaming 1 GiB"
    assert peak_me < 6 * window, f"client RSS grew by {peak_me} bytes while streaming 1 GiB"
    conn.ping()


@pytest.mark.timeout(120)
def test_stalled_reader_memory_bound_loopback() -> None:
    with remowt.loopback() as conn:
        warm_up(conn)
        me_before = rss_bytes(os.getpid())
        proc, window = stall(conn)
        check_stalled_connection_still_works(conn, proc, window)
        growth = rss_bytes(os.getpid()) - me_before
        assert growth < 6 * window, f"RSS grew by {growth} bytes while stalled"
        pid = proc.pid
    # the connection closed with the producer still blocked: it was killed, not waited for forever
    assert wait_until(lambda: proc_gone(pid), 10)


@pytest.mark.timeout(60)
def test_two_streams_one_stalled(conn: remowt.Remowt) -> None:
    """A stalled stream does not slow a busy one on the same connection."""
    stalled, window = stall(conn)
    busy = conn.spawn(["head", "-c", str(64 << 20), "/dev/zero"], stdout=PIPE)
    assert busy.stdout is not None
    total = 0
    while True:
        chunk = busy.stdout.read(1 << 20, timeout=30)
        if not chunk:
            break
        total += len(chunk)
    assert total == 64 << 20
    assert busy.wait(timeout=10) == 0
    assert stalled.stdout is not None and stalled.stdout.buffered == window
    stalled.kill()
    assert stalled.wait(timeout=10) == -9


@pytest.mark.timeout(60)
def test_closing_a_stalled_stream_stops_the_producer(conn: remowt.Remowt) -> None:
    proc, _ = stall(conn)
    assert proc.stdout is not None
    proc.stdout.close()
    # the agent's pump sees the reset and closes the pipe: the producer dies of SIGPIPE
    assert proc.wait(timeout=10) == -13
    conn.ping()
