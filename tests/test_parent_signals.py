"""A child that signals its parent signals the agent: a local agent passes it on to us, no agent dies of it."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Iterator, List

import pytest

import remowt
from remowt.endpoints.parent_signals import RELAYED
from remowt.errors import ConnectionLost

pytestmark = pytest.mark.timeout(30, method="thread")  # SIGALRM is one of the signals these tests catch

CALLS_ITS_PARENT = "import os, sys; os.kill(os.getppid(), int(sys.argv[1]))"


class Caught:
    """The signals of :data:`RELAYED` that this process gets, in order (a handler for each, on the main thread).

    The handler only writes to a pipe: it interrupts the main thread anywhere, inside a lock it holds too
    (an Event's, which deadlocked).
    """

    def __init__(self) -> None:
        self.signals: List[int] = []
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def handle(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        os.write(self._write, b"s")

    def wait(self, count: int, timeout: float = 10) -> List[int]:
        """The signals caught once there are ``count`` (fewer after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while (
            len(self.signals) < count and select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))[0]
        ):
            os.read(self._read, 64)
        return self.signals

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@pytest.fixture
def caught() -> Iterator[Caught]:
    catcher = Caught()
    previous = {signum: signal.signal(signum, catcher.handle) for signum in RELAYED}
    try:
        yield catcher
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        catcher.close()


def test_every_relayed_signal_reaches_the_caller(caught: Caught) -> None:
    with remowt.connect_local() as conn:
        for count, signum in enumerate(RELAYED, 1):
            assert conn.run([sys.executable, "-c", CALLS_ITS_PARENT, str(signum)]).returncode == 0
            assert caught.wait(count)[-1:] == [signum]
        assert caught.signals == RELAYED
        conn.ping()


def test_a_signal_sent_to_the_local_agent_by_anyone_reaches_the_caller(caught: Caught) -> None:
    with remowt.connect_local() as conn:
        os.kill(conn.info().pid, signal.SIGUSR2)
        assert caught.wait(1) == [signal.SIGUSR2]
        conn.ping()


def test_the_privileged_agent_takes_its_childrens_signals() -> None:
    with remowt.connect_local() as conn:
        privileged = conn.privileged
        assert privileged.info().uid == 0
        pid = privileged.info().pid
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
            assert privileged.run([sys.executable, "-c", CALLS_ITS_PARENT, str(signum)]).returncode == 0
        assert privileged.info().pid == pid  # the same agent serves on


def test_children_start_with_the_relayed_signals_at_their_default() -> None:
    script = "import signal; print(sum(signal.getsignal(s) is not signal.SIG_DFL for s in map(int, {})))"
    with remowt.connect_local() as conn:
        out = conn.check_output([sys.executable, "-c", script.format([int(signum) for signum in RELAYED])])
    assert out == b"0\n"


def test_sigterm_still_ends_the_agent() -> None:
    with remowt.connect_local() as conn:
        os.kill(conn.info().pid, signal.SIGTERM)
        with pytest.raises(ConnectionLost):
            conn.run(["sleep", "20"], timeout=10)
