"""New ways to reach an agent, built only on the public seam: ``connect_command`` and ``connect_transport``."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
from typing import Iterator, Optional

import pytest

import remowt
from remowt.transports.base import Transport


@pytest.mark.timeout(120)
def test_an_agent_deployed_through_sh_c() -> None:
    """``sh -c LINE`` stands for docker exec, kubectl exec or the system ssh client: it runs the deploy line."""
    with remowt.connect_command(["sh", "-c"], description="sh -c") as conn:
        assert conn.description.startswith("sh -c pid ")
        assert conn.check_output(["echo", "through sh"]) == b"through sh\n"
        assert conn.info().pid != os.getpid()
        agent = conn.info().pid
    with pytest.raises(ProcessLookupError):
        os.kill(agent, 0)


@pytest.mark.timeout(30)
def test_a_command_that_fails_says_why() -> None:
    with pytest.raises(remowt.ConnectionLost, match="failed to start"):
        remowt.connect_command(["sh", "-c", "echo nope >&2; exit 3", "ignored"], deploy=False)
    with pytest.raises(ValueError, match="argv"):
        remowt.connect_command([])


class SocketTransport(Transport):
    """A transport over a connected socket: what a TCP or unix-socket way in would build on.

    Closing shuts the socket down, which wakes a reader or writer waiting on it;
    the socket itself (its fd) is its owner's to close, after the connection.
    """

    name = "socket"

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    def read(self, size: int) -> Optional[bytes]:
        try:
            return self._sock.recv(size)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def wait_readable(self, timeout: Optional[float]) -> bool:
        ready, _, _ = select.select([self._sock], [], [], timeout)
        return bool(ready)

    def write(self, data: memoryview, block: bool) -> int:
        while True:
            try:
                return self._sock.send(data)
            except BlockingIOError:
                if not block:
                    return 0
                select.select([], [self._sock], [])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def agent_socket() -> Iterator[socket.socket]:
    """Our end of a socketpair whose other end is the stdin and stdout of an agent (``python -m remowt.agent``)."""
    ours, theirs = socket.socketpair()
    repository = os.path.dirname(os.path.dirname(os.path.abspath(remowt.__file__)))
    env = dict(os.environ, PYTHONPATH=repository)
    agent = subprocess.Popen(
        [sys.executable, "-m", "remowt.agent", "real-agent", "--local"], stdin=theirs, stdout=theirs, env=env
    )
    theirs.close()
    try:
        yield ours
    finally:
        ours.close()
        agent.wait(10)


@pytest.mark.timeout(60)
def test_a_transport_of_ones_own(agent_socket: socket.socket) -> None:
    closed = []
    transport = SocketTransport(agent_socket)
    with remowt.connect_transport(transport, description="socketpair", on_close=[lambda: closed.append(True)]) as conn:
        assert conn.description == "socketpair"
        assert conn.run(["sh", "-c", "cat; echo done"], input=b"over a socket\n", capture_output=True).stdout == (
            b"over a socket\ndone\n"
        )
        assert conn.ping() < 5
    assert closed == [True]
