"""KeyboardInterrupts at random moments leave the connection serving and leak nothing.

The interrupts are real: SIGALRM from ``signal.setitimer`` at a random 0.1-3 ms,
whose handler raises KeyboardInterrupt in the main thread wherever it is, as a
Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import threading
from types import FrameType
from typing import Callable, Iterator, List, Optional

import pytest
from _util import agent_children, children_of, fd_count, make_connection, thread_names, wait_until

import remowt
from remowt import PIPE

Operation = Callable[[remowt.Remowt], object]


def _run_true(conn: remowt.Remowt) -> object:
    return conn.run(["true"])


def _communicate(conn: remowt.Remowt) -> object:
    return conn.run(["cat"], input=b"x" * 200_000, capture_output=True)


def _wait(conn: remowt.Remowt) -> object:
    with conn.Popen(["sleep", "0.002"]) as proc:
        return proc.wait()


def _check_output(conn: remowt.Remowt) -> object:
    return conn.check_output(["head", "-c", "300000", "/dev/zero"])


def _popen_pipes(conn: remowt.Remowt) -> object:
    with conn.Popen(["sh", "-c", "cat; echo err >&2"], stdin=PIPE, stdout=PIPE, stderr=PIPE) as proc:
        return proc.communicate(b"some input\n")


OPERATIONS: List[Operation] = [_run_true, _communicate, _wait, _check_output, _popen_pipes]


class Interrupter:
    """Raises KeyboardInterrupt in the main thread after a delay, like a Ctrl-C at a random moment."""

    def __init__(self) -> None:
        self.armed = False
        self.delivered = 0

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.armed:
            self.armed = False
            self.delivered += 1
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupter]:
        previous = signal.signal(signal.SIGALRM, self._handler)
        try:
            yield self
        finally:
            self.disarm()
            signal.signal(signal.SIGALRM, previous)

    def arm(self, delay: float) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, delay)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is, or arose while handling, a KeyboardInterrupt.

    CPython's own ``threading`` is not interrupt-safe everywhere: an interrupt
    inside ``Thread.start()`` can surface as ``RuntimeError: release unlocked
    lock`` raised while handling it.
    """
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def soak(conn: remowt.Remowt, iterations: int, seed: int, operations: List[Operation] = OPERATIONS) -> int:
    """Run the operations with interrupts at random moments; returns how many operations were interrupted."""
    rng = random.Random(seed)
    interrupted = 0
    with Interrupter().installed() as interrupter:
        for i in range(iterations):
            try:
                try:
                    interrupter.arm(rng.uniform(0.0001, 0.003))
                    operations[i % len(operations)](conn)
                finally:
                    interrupter.armed = False  # an attribute store: no interrupt can come before it
            except BaseException as e:
                if not _caused_by_interrupt(e):
                    raise
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
    return interrupted


def _connection(request: pytest.FixtureRequest, kind: str) -> remowt.Remowt:
    if kind == "ssh":
        return remowt.connect("remowt-test-host", ssh_config=request.getfixturevalue("sshd").ssh_config)
    return make_connection(kind)


def answers_within(conn: remowt.Remowt, seconds: float) -> bool:
    """Whether the agent answers a ping within ``seconds`` (asked from a thread, so a wedge cannot hang the test)."""
    answered = threading.Event()

    def ping() -> None:
        conn.ping()
        answered.set()

    threading.Thread(target=ping, daemon=True).start()
    return answered.wait(seconds)


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        words = f.read().split(b"\0")
        return f"{pid} {b' '.join(words).decode(errors='replace')[:100]}"
    return f"{pid} (gone)"


def _fd_names() -> List[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            names.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
    return names


def _agent_children(conn: remowt.Remowt) -> int:
    """How many processes the agent still has as children (0 for an agent that is not on this machine)."""
    info = conn.info()
    if info.pid == os.getpid():  # loopback: the agent is this process
        return 0
    return len(agent_children(info.pid))


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("seed", range(7))
def test_interrupted_communicate_leaves_the_connection_serving(seed: int) -> None:
    """Interrupts every 0.1-3 ms during communicate(): afterwards ping is answered at once (it was not, 3 in 7)."""
    with remowt.connect_local() as conn:
        interrupted = soak(conn, 100, seed, [_communicate])
        assert interrupted > 10, "too few interrupts landed to test anything"
        assert answers_within(conn, 1.0)


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["loopback", "local", "ssh"])
def test_soak_random_interrupts(request: pytest.FixtureRequest, kind: str) -> None:
    """2000 operations with interrupts at random moments: the connection answers and nothing leaked."""
    with _connection(request, kind) as warm:  # imports and caches made once are not leaks
        soak(warm, 20, seed=1)
    gc.collect()
    threads = set(thread_names())
    fds = fd_count()
    fd_names = _fd_names()
    children = children_of(os.getpid())  # the session's sshd, when it is the ssh case

    with _connection(request, kind) as conn:
        interrupted = soak(conn, 2000, seed=2)
        assert interrupted > 200, f"only {interrupted} interrupts landed"
        assert answers_within(conn, 1.0)
        assert conn.run(["echo", "still here"], capture_output=True, timeout=10).stdout == b"still here\n"
        assert wait_until(lambda: _agent_children(conn) == 0, 10), "the agent still has children"

    def settled() -> bool:
        gc.collect()
        return set(thread_names()) <= threads and fd_count() <= fds and children_of(os.getpid()) <= children

    assert wait_until(settled, 10), (
        f"threads left: {sorted(set(thread_names()) - threads)}, fds: {fd_count() - fds} more "
        f"{sorted(set(_fd_names()) - set(fd_names))}, "
        f"children: {[_cmdline(pid) for pid in sorted(children_of(os.getpid()) - children)]}"
    )
    assert threading.main_thread().is_alive()
