"""Helpers shared by the tests: process inspection, bounded polling, raw protocol peers."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import remowt
from remowt.endpoints.subprocess import SpawnOptions
from remowt.protocol import wire
from remowt.rpc.router import Router

TRANSPORTS = ["loopback", "local"]

# The nodes the case tables run on: name -> factory of a connection. To add a transport, add one entry; a
# factory may take what it needs from other fixtures through ``request.getfixturevalue`` (an sshd, say) or
# call ``pytest.skip`` when it cannot run here. ssh is as root on this machine over a real sshd, so paths,
# files, fds and sockets of the test are the target's too.
CONNECTIONS: Dict[str, Callable[[Any], remowt.Remowt]] = {
    "loopback": lambda request: remowt.loopback(),
    "local": lambda request: remowt.connect_local(),
    "ssh": lambda request: remowt.connect("remowt-test-root", ssh_config=request.getfixturevalue("sshd").ssh_config),
}


def shared_connection(request: Any, connections: Dict[str, remowt.Remowt], kind: str) -> remowt.Remowt:
    """The module's connection of ``kind`` (the ``connections`` fixture), made on first use or if a test broke it."""
    connection = connections.get(kind)
    if connection is not None:
        try:
            connection.ping()
        except remowt.RemowtError:  # an earlier test broke it: start afresh
            connection.close()
            connection = None
    if connection is None:
        connection = connections[kind] = CONNECTIONS[kind](request)
    return connection


def make_connection(kind: str) -> remowt.Remowt:
    """A connection over the transport named ``kind``."""
    if kind == "loopback":
        return remowt.loopback()
    if kind == "local":
        return remowt.connect_local()
    raise ValueError(kind)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (for states that have no event)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def proc_state(pid: int) -> Optional[str]:
    """The state letter of ``pid`` from /proc (R, S, Z, ...), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name is in parentheses and may contain spaces: split after the last ')'
    return stat[stat.rindex(")") + 2]


def proc_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs: no /proc entry, or only a zombie waiting to be reaped."""
    return proc_state(pid) in (None, "Z")


def proc_alive(pid: int) -> bool:
    return not proc_gone(pid)


def rss_bytes(pid: int) -> int:
    """The resident set size of ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def memory_hits(pid: int, secrets: List[bytes]) -> List[str]:
    """Where any of ``secrets`` lies in the memory of ``pid`` (as root: /proc/<pid>/maps and mem), one entry a copy."""
    hits = []
    with open(f"/proc/{pid}/maps") as maps:
        regions = [line.split() for line in maps]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for fields in regions:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else "[anon]"
            if not fields[1].startswith("r") or name in ("[vvar]", "[vsyscall]"):
                continue
            try:
                data = os.pread(fd, end - start, start)
            except OSError:
                continue
            for secret in secrets:
                hits += [f"{secret!r} in {name}+{m.start():#x}" for m in re.finditer(re.escape(secret), data)]
    finally:
        os.close(fd)
    return hits


def children_of(pid: int) -> Set[int]:
    """Pids whose parent is ``pid`` (zombies included)."""
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.add(int(name))
    return out


def is_watchdog(pid: int) -> bool:
    """Whether ``pid`` is an agent's watchdog (remowt.endpoints.watchdog), which lives as long as its agent."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0remowt-watchdog\0" in f.read()
    except OSError:
        return False


def agent_children(pid: int) -> Set[int]:
    """The children the agent ``pid`` spawned and still has (its watchdog aside)."""
    return {child for child in children_of(pid) if not is_watchdog(child)}


def read_now(read_fd: int) -> bytes:
    """What pipe ``read_fd`` holds now, up to 100 bytes (b"" when nothing); it is left non-blocking."""
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 100)
    except BlockingIOError:
        return b""


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def kill_quietly(pid: int, sig: int = 9) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def reap_quietly(pid: int) -> None:
    """Reap ``pid`` if it is our child and not yet reaped by someone else."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def fd_pair() -> Tuple[object, object]:
    """Two FdTransports joined by a pair of OS pipes (the agent's kind of link)."""
    from remowt.transports.stdio import FdTransport

    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    return FdTransport(a_read, a_write), FdTransport(b_read, b_write)


def connect_routers(a: Router, b: Router, timeout: float = 10.0, fds: bool = False) -> Tuple[object, object]:
    """Link two routers over a fresh loopback pair (or ``fds``: OS pipes); returns (link at a, link at b)."""
    from remowt.transports import loopback

    ta, tb = fd_pair() if fds else loopback.pair()
    result: Dict[str, object] = {}

    def other_end() -> None:
        try:
            result["b"] = b.add_link(tb, timeout=timeout)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=other_end, daemon=True)
    thread.start()
    link_a = a.add_link(ta, timeout=timeout)
    thread.join(timeout)
    assert not thread.is_alive(), "the other end of the handshake did not finish"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return link_a, result["b"]


def transport_write_all(transport: object, data: bytes) -> None:
    """Write every byte of ``data`` to a raw transport (blocking)."""
    view = memoryview(data)
    while len(view):
        n = transport.write(view, True)  # type: ignore[attr-defined]
        view = view[n:]


def transport_read(transport: object, size: int) -> Optional[bytes]:
    """Blocking read from a raw transport, whichever read interface it has.

    Returns ``b""`` at end of stream. Works with transports whose ``read``
    blocks and with those that have ``wait_readable`` and a non-blocking ``read``.
    """
    wait_readable = getattr(transport, "wait_readable", None)
    while True:
        if wait_readable is not None:
            wait_readable(None)
        data = transport.read(size)  # type: ignore[attr-defined]
        if data is not None:
            return data


class RawPeer:
    """The test acting as a remowt node on one end of a transport: writes raw bytes, collects decoded frames."""

    def __init__(self, transport: object, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.transport = transport
        self.frames: queue.Queue[Optional[bytes]] = queue.Queue()
        self.eof = threading.Event()
        self._reader = wire.FrameReader(max_frame)
        self._thread = threading.Thread(target=self._run, name="raw-peer-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = transport_read(self.transport, 1 << 20)
                if not data:
                    break
                for body in self._reader.feed(data):
                    self.frames.put(body)
        finally:
            self.eof.set()
            self.frames.put(None)

    def send(self, data: bytes) -> None:
        # if the other side already closed, what it made of the bytes is checked separately
        with contextlib.suppress(OSError):
            transport_write_all(self.transport, data)

    def send_message(self, message: wire.Message) -> None:
        self.send(bytes(wire.encode(message)))

    def next_message(self, timeout: float) -> Optional[wire.Message]:
        """The next decoded message, or None at end of stream; raises queue.Empty on timeout."""
        body = self.frames.get(timeout=timeout)
        if body is None:
            self.frames.put(None)  # keep reporting EOF
            return None
        return wire.decode(body)

    def wait_for(self, match: Callable[[wire.Message], bool], timeout: float) -> Optional[wire.Message]:
        """Skip messages until one matches; None if the stream ended first; raises queue.Empty on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next_message(max(deadline - time.monotonic(), 0.0))
            if message is None or match(message):
                return message

    def close(self) -> None:
        self.transport.close()  # type: ignore[attr-defined]
        self._thread.join(10)


def handshake_raw(router: Router, address: str) -> Tuple[object, RawPeer]:
    """Attach a raw peer calling itself ``address`` to ``router``; returns (router's link, peer)."""
    from remowt.transports import loopback

    router_end, test_end = loopback.pair()
    peer = RawPeer(test_end)
    peer.send_message(wire.Hello(wire.PROTOCOL_VERSION, address, wire.DEFAULT_MAX_FRAME))
    link = router.add_link(router_end, timeout=10)
    hello = peer.next_message(10)
    assert isinstance(hello, wire.Hello), hello
    return link, peer


def thread_names() -> List[str]:
    return sorted(t.name for t in threading.enumerate())


def run_together(fn: Callable[[int], object], count: int, timeout: float) -> List[object]:
    """Call ``fn(0..count-1)`` on threads released together by a barrier; each result, or the exception raised."""
    barrier = threading.Barrier(count)
    results: Dict[int, object] = {}

    def run(n: int) -> None:
        barrier.wait(timeout)
        try:
            results[n] = fn(n)
        except BaseException as e:
            results[n] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"{fn} did not finish within {timeout} s"
    return [results[n] for n in range(count)]


def pypi_reachable() -> bool:
    """Whether pip can reach PyPI from here (tests that fetch wheels skip otherwise)."""
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


class Family:
    """Children of one agent: ``doomed`` ones must die with it, the ``kept`` one must not.

    Doomed: a child, and a child with a grandchild in its process group; kept: spawned with keep_on_disconnect.
    """

    def __init__(self, conn: remowt.Remowt, timeout: float = 30.0) -> None:
        plain = conn.spawn(["sleep", "1000"])
        group = conn.spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=remowt.PIPE)
        self.kept = conn.spawn(["sleep", "1000"], SpawnOptions(keep_on_disconnect=True)).pid
        assert group.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            piece = group.stdout.read(100, timeout=timeout)
            assert piece, f"no grandchild pid from {group.pid} (got {line!r})"
            line += piece
        self.doomed = [plain.pid, group.pid, int(line)]
        assert all(proc_alive(pid) for pid in [*self.doomed, self.kept])

    def doomed_gone(self, timeout: float) -> bool:
        return wait_until(lambda: all(proc_gone(pid) for pid in self.doomed), timeout)

    def alive(self) -> List[int]:
        return [pid for pid in [*self.doomed, self.kept] if proc_alive(pid)]

    def kill(self) -> None:
        """Kill whoever is left (cleanup)."""
        for pid in [*self.doomed, self.kept]:
            kill_quietly(pid)
