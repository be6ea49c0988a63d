"""A caller that waits on a local agent's link reads it itself (the leader); the reader thread keeps off.

On fd transports the waiting caller polls the fd and dispatches what comes,
so the answer wakes only the thread that wants it. These tests hold the
parts of that bargain: the reader thread really stays asleep through a loop
of calls, frames that come while nobody waits are still read, a signal
handler and other threads that call meanwhile are answered, and the lead
survives interrupts.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Iterator, List, Optional

import pytest
from _util import make_connection, run_together, wait_until

import remowt
from remowt import PIPE
from remowt.rpc.streams import Stream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def conn() -> Iterator[remowt.Remowt]:
    connection = make_connection("local")
    try:
        yield connection
    finally:
        connection.close()


def test_the_reader_thread_sleeps_through_a_loop_of_calls(conn: remowt.Remowt) -> None:
    """The answers are read by the caller that waits for them: the reader thread neither polls nor reads the fd.

    (Before leaders it did both for every answer. Its context switches are no measure: waiting for the GIL
    while the leader's loop takes and drops it switches it hundreds of times without a read.)
    """
    (reader,) = [t for t in threading.enumerate() if t.name.startswith("remowt-read-user") and t.is_alive()]
    transport = conn.link.transport
    by_reader: List[str] = []

    def counted(name: str) -> Callable[..., object]:
        real = getattr(transport, name)

        def call(*args: object) -> object:
            if threading.current_thread() is reader:
                by_reader.append(name)
            return real(*args)

        return call

    conn.ping()
    transport.read = counted("read")  # type: ignore[method-assign]
    transport.wait_readable = counted("wait_readable")  # type: ignore[method-assign]
    try:
        for _ in range(2000):
            conn.ping()
    finally:
        del transport.read, transport.wait_readable  # type: ignore[attr-defined]
    # parked, the reader looks again once per LINGER at most, and only takes the fd back when leads stop
    assert len(by_reader) < 100, f"the reader thread polled or read the fd {len(by_reader)} times in 2000 calls"


def test_an_exit_that_comes_while_nobody_waits_is_read(conn: remowt.Remowt) -> None:
    with conn.Popen(["sh", "-c", "read line; exit 7"], stdin=PIPE) as proc:
        conn.ping()  # a leader: the reader thread is parked now
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        # poll() never waits: only the reader thread, back on the fd, can bring the exit in
        assert wait_until(lambda: proc.poll() is not None, timeout=10)
        assert proc.returncode == 7


def test_a_signal_handler_calls_while_its_thread_leads(conn: remowt.Remowt) -> None:
    answers: List[int] = []

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        answers.append(conn.info().pid)  # the main thread leads in wait(): the reader must answer this

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with conn.Popen(["sh", "-c", "read line"], stdin=PIPE) as proc:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            assert proc.stdin is not None

            def release() -> None:
                # The handler ran (in this thread's wait): let the child end.
                assert wait_until(lambda: bool(answers), timeout=10)
                proc.stdin.write(b"done\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]

            releaser = threading.Thread(target=release)
            releaser.start()
            assert proc.wait(timeout=20) == 0
            releaser.join()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert answers == [conn.info().pid]


def test_many_threads_wait_on_one_link_at_once(conn: remowt.Remowt) -> None:
    def calls(n: int) -> object:
        if n == 0:
            return conn.run(["cat"], input=b"x" * 3_000_000, capture_output=True).stdout == b"x" * 3_000_000
        for _ in range(300):
            conn.ping()
        return True

    assert run_together(calls, 8, timeout=50) == [True] * 8
    assert conn.router.pending_count() == 0


def test_streams_pumped_by_threads_of_their_own_carry_every_byte(conn: remowt.Remowt) -> None:
    """Writers and readers of several streams all lead in turn, and the reader thread takes turns too.

    (A leader whose answer the reader thread brought gave up the lead and still polled for the reader's wake:
    two such threads polled one poller, and ``RuntimeError: concurrent poll() invocation`` reached a write.)
    """
    block = bytes(range(256)) * 4096
    rounds, blocks = 20, 8

    def write(stdin: Stream, errors: List[BaseException]) -> None:
        try:
            for _ in range(blocks):
                stdin.write(block, timeout=20)
            stdin.close_write()
        except BaseException as e:
            errors.append(e)

    def pipe_through_cat(n: int) -> object:
        for _ in range(rounds):
            proc = conn.spawn(["cat"], stdin=PIPE, stdout=PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            errors: List[BaseException] = []
            writer = threading.Thread(target=write, args=(proc.stdin, errors))
            writer.start()
            received = 0
            while chunk := proc.stdout.read(1 << 20, timeout=20):
                received += len(chunk)
            writer.join(20)
            assert not errors, errors
            assert received == blocks * len(block)
            assert proc.wait(timeout=20) == 0
        return True

    assert run_together(pipe_through_cat, 4, timeout=50) == [True] * 4
