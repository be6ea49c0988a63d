"""Sockets through a connection: a real socket joined to a remote one, and forwards both ways (-L, -R).

Every server here is real and run by the test on this machine (the target
of loopback, local and ssh connections alike): an HTTP server on a unix
socket, an echo server on TCP, servers that stop reading or accepting.
"""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import hashlib
import http.client
import http.server
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from typing import IO, Callable, Dict, Iterator, List, Tuple

import pytest
from _util import CONNECTIONS, fd_count, shared_connection, thread_names, wait_until
from sshd import SshServer

import remowt

TEST_PASSWORD = "remowt-test-password"
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=list(CONNECTIONS))
def conn(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> remowt.Remowt:
    return shared_connection(request, connections, request.param)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHttp(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                return
            sock.sendall(data)


class _TcpEcho(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _UnixEcho(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def shared_dir() -> Iterator[pathlib.Path]:
    """A directory any user may enter (the ssh test user reaches sockets in it)."""
    with tempfile.TemporaryDirectory(prefix="remowt-sockets-") as name:
        os.chmod(name, 0o755)
        yield pathlib.Path(name)


@pytest.fixture
def http_socket(shared_dir: pathlib.Path) -> Iterator[str]:
    path = str(shared_dir / "http.sock")
    server = _UnixHttp(path, _Hello)
    os.chmod(path, 0o666)
    thread = _serve(server)
    yield path
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def echo_tcp() -> Iterator[Tuple[str, int]]:
    server = _TcpEcho(("127.0.0.1", 0), _Echo)
    thread = _serve(server)
    yield ("127.0.0.1", server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def echo_unix(shared_dir: pathlib.Path) -> Iterator[str]:
    path = str(shared_dir / "echo.sock")
    server = _UnixEcho(path, _Echo)
    thread = _serve(server)
    yield path
    server.shutdown()
    server.server_close()
    thread.join(10)


def _get(sock: socket.socket, path: str) -> Tuple[int, bytes]:
    client = http.client.HTTPConnection("remote")
    client.sock = sock
    try:
        client.request("GET", path)
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


def _exchange(sock: socket.socket, size: int = MIB) -> None:
    """Send ``size`` random bytes through an echo and check (sha256) that the same come back."""
    payload = os.urandom(size)

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    received = 0
    with sock:
        while True:
            chunk = sock.recv(256 * 1024)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
    sender.join(30)
    assert received == size
    assert digest.digest() == hashlib.sha256(payload).digest()


def _many(connect: Callable[[], socket.socket], count: int = 100) -> None:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(lambda: _exchange(connect())) for _ in range(count)]:
            future.result(timeout=50)


def _tcp(address: object) -> socket.socket:
    assert isinstance(address, tuple)
    return socket.create_connection(address, 10)


def _unix(address: object) -> socket.socket:
    assert isinstance(address, str)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    return sock


def test_http_through_connect_unix(conn: remowt.Remowt, http_socket: str) -> None:
    """http.client works on the socket connect_unix gives, again and again."""
    for number in range(3):
        sock = conn.connect_unix(http_socket)
        assert isinstance(sock, socket.socket)
        assert _get(sock, f"/page{number}") == (200, f"hello from /page{number}".encode())


def test_connect_failures_are_oserrors(conn: remowt.Remowt, shared_dir: pathlib.Path) -> None:
    """What the target's connect raised arrives as the same OSError subclass, naming the address."""
    with pytest.raises(FileNotFoundError) as missing:
        conn.connect_unix(shared_dir / "nothing.sock")
    assert (missing.value.errno, missing.value.filename) == (errno.ENOENT, str(shared_dir / "nothing.sock"))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as refused:
        conn.connect_tcp("127.0.0.1", port)
    assert refused.value.filename == f"127.0.0.1:{port}"
    assert conn.ping() < 5


def test_root_only_socket_is_refused_and_reached_through_privileged(
    sshd: SshServer, shared_dir: pathlib.Path, echo_unix: str
) -> None:
    """A 0600 root-owned socket: PermissionError for the ssh user, an echo as root through sudo."""
    os.chmod(echo_unix, 0o600)
    assert os.stat(echo_unix).st_uid == 0
    with remowt.connect(sshd.alias, ssh_config=sshd.ssh_config, prompter=lambda prompt: TEST_PASSWORD) as conn:
        conn.escalation = "sudo"
        assert conn.info().uid == pwd.getpwnam("remowt-test").pw_uid
        with pytest.raises(PermissionError) as refused:
            conn.connect_unix(echo_unix)
        assert (refused.value.errno, refused.value.filename) == (errno.EACCES, echo_unix)
        _exchange(conn.privileged.connect_unix(echo_unix), 256 * 1024)


def test_forward_local_carries_100_connections(conn: remowt.Remowt, echo_tcp: Tuple[str, int]) -> None:
    """-L, TCP here to TCP there: 100 concurrent connections, 1 MiB each way, checked."""
    with conn.forward_local(("127.0.0.1", 0), echo_tcp) as forward:
        _many(lambda: _tcp(forward.address))
    assert forward.connections == 0


def test_forward_remote_carries_100_connections(conn: remowt.Remowt, echo_unix: str) -> None:
    """-R, TCP there to a unix socket here: 100 concurrent connections, 1 MiB each way, checked."""
    with conn.forward_remote(("127.0.0.1", 0), echo_unix) as forward:
        assert isinstance(forward.address, tuple) and forward.address[1] > 0
        _many(lambda: _tcp(forward.address))


def test_forward_remote_to_the_runtime_dir(conn: remowt.Remowt, echo_tcp: Tuple[str, int]) -> None:
    """-R with no remote address: a private socket there, whose path is returned and removed at the end."""
    with conn.forward_remote(None, echo_tcp) as forward:
        path = forward.address
        assert isinstance(path, str)
        mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        assert stat.S_ISSOCK(os.stat(path).st_mode) and mode & 0o077 == 0
        _exchange(_unix(path))
        _exchange(conn.connect_unix(path))
    assert not os.path.exists(path)


def test_forward_local_unix_to_unix(conn: remowt.Remowt, shared_dir: pathlib.Path, http_socket: str) -> None:
    """-L LPATH:RPATH; the local socket file is removed at the end."""
    local = str(shared_dir / "local.sock")
    with conn.forward_local(local, http_socket) as forward:
        assert forward.address == local
        assert _get(_unix(local), "/unix") == (200, b"hello from /unix")
    assert not os.path.exists(local)


def test_a_stalled_server_blocks_no_other_stream(conn: remowt.Remowt, echo_tcp: Tuple[str, int]) -> None:
    """A server that neither reads nor accepts holds only its own senders: other connections and calls go on."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)  # never accepted, never read
        address = stalled.getsockname()
        sock = conn.connect_tcp(*address)
        progressed = threading.Event()
        sent = []

        def flood() -> None:
            chunk = b"x" * (256 * 1024)
            try:
                while True:
                    progressed.clear()
                    sent.append(sock.send(chunk))
                    progressed.set()
            except OSError:
                pass

        sock.settimeout(None)
        threading.Thread(target=flood, daemon=True).start()
        # the flood stops once every window and buffer on the way is full; then it waits
        assert wait_until(lambda: len(sent) > 4 and not progressed.wait(0.3), 20)
        stuck = sum(sent)
        _exchange(conn.connect_tcp(*echo_tcp), 4 * MIB)
        assert conn.ping() < 5
        assert sum(sent) == stuck
        sock.close()


def test_closing_a_forward_leaves_nothing(conn: remowt.Remowt, echo_tcp: Tuple[str, int]) -> None:
    """Connections left open at close end (the client sees its end); no listener, thread or fd stays."""
    for _ in range(2):  # what is made once and kept (imports, the events service) is made now
        with conn.forward_local(("127.0.0.1", 0), echo_tcp) as forward:
            _exchange(_tcp(forward.address))
    gc.collect()
    threads, names, fds = threading.active_count(), thread_names(), fd_count()
    with (
        conn.forward_local(("127.0.0.1", 0), echo_tcp) as local,
        conn.forward_remote(("127.0.0.1", 0), echo_tcp) as remote,
    ):
        open_ones = [_tcp(local.address), _tcp(remote.address)]
        for sock in open_ones:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        assert wait_until(lambda: local.connections == 1 and remote.connections == 1, 10)
    for sock in open_ones:
        sock.settimeout(10)
        assert sock.recv(4) == b""
        sock.close()
    for address in (local.address, remote.address):
        with pytest.raises(ConnectionRefusedError):
            _tcp(address)

    def back() -> bool:
        gc.collect()
        return threading.active_count() <= threads and fd_count() <= fds

    assert wait_until(back, 10), (sorted(set(thread_names()) - set(names)), fd_count() - fds)


def test_a_lost_link_ends_the_socket(echo_tcp: Tuple[str, int]) -> None:
    """The agent dies: the socket connect_tcp gave sees its end at once, nothing hangs."""
    with remowt.connect_local() as conn:
        sock = conn.connect_tcp(*echo_tcp)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        os.kill(conn.info().pid, signal.SIGKILL)
        sock.settimeout(20)
        assert sock.recv(4) == b""
        sock.close()


@pytest.fixture
def nix_daemon() -> Iterator[str]:
    """A real nix daemon (Debian's nix-bin) listening at a socket only root may reach (a 0700 directory)."""
    program = shutil.which("nix-daemon")
    if program is None:
        pytest.fail("nix-daemon is not installed: scripts/setup-test-host.sh installs nix-bin", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="remowt-nix-") as directory:
        path = os.path.join(directory, "socket")
        env = {**os.environ, "NIX_DAEMON_SOCKET_PATH": path}
        daemon = subprocess.Popen([program], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: os.path.exists(path), 20), "the nix daemon did not start"
            yield path
        finally:
            daemon.kill()
            daemon.wait(10)


def _nix_ping(store: str) -> str:
    argv = ["nix", "--extra-experimental-features", "nix-command", "store", "ping", "--store", f"unix://{store}"]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30, check=True)
    return done.stdout  # nix 2.8 tells the store on stderr


def test_nix_daemon_of_the_target_through_privileged(
    sshd: SshServer, shared_dir: pathlib.Path, nix_daemon: str
) -> None:
    """The target's root-only nix daemon socket, forwarded here through the privileged agent: nix talks to it."""
    with remowt.connect(sshd.alias, ssh_config=sshd.ssh_config, prompter=lambda prompt: TEST_PASSWORD) as conn:
        conn.escalation = "sudo"
        with pytest.raises(PermissionError):
            conn.connect_unix(nix_daemon)
        local = str(shared_dir / "nix.sock")
        with conn.forward_nix_daemon(local, nix_daemon) as forward:
            assert forward.node is conn.privileged
            assert re.search(r"^Version: \d", _nix_ping(local), re.M)


def _remowt(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "remowt", *args], stderr=subprocess.PIPE)


def _told(stream: IO[bytes], count: int) -> List[str]:
    """The first ``count`` lines remowt told on stderr."""
    return [stream.readline().decode().strip() for _ in range(count)]


def test_cli_forward_both_ways_until_interrupted(sshd: SshServer, echo_tcp: Tuple[str, int], echo_unix: str) -> None:
    """remowt forward -L and -R in ssh's syntax: each forward told on stderr, carried, ended by Ctrl-C (exit 0)."""
    specs = ["-L", f"127.0.0.1:0:127.0.0.1:{echo_tcp[1]}", "-R", f"127.0.0.1:0:{echo_unix}"]
    process = _remowt("forward", "-F", sshd.ssh_config, "remowt-test-root", *specs)
    try:
        assert process.stderr is not None
        told = _told(process.stderr, 2)
        ports = [int(re.search(r"127\.0\.0\.1:(\d+) ->", line).group(1)) for line in told]  # type: ignore[union-attr]
        assert told[0].startswith("remowt: -L ") and told[1].startswith("remowt: -R remowt-test-root ")
        for port in ports:
            _exchange(_tcp(("127.0.0.1", port)), 256 * 1024)
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                _tcp(("127.0.0.1", port))
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_cli_bad_forward_spec_is_a_usage_error(sshd: SshServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "remowt", "forward", "-F", sshd.ssh_config, "remowt-test-root", "-L", "80"],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert b"bad forwarding specification '80'" in result.stderr


def test_cli_nix_daemon(sshd: SshServer, nix_daemon: str) -> None:
    """remowt nix-daemon HOST: a local socket (its path told on stderr) where nix finds the target's daemon."""
    process = _remowt("nix-daemon", "-F", sshd.ssh_config, "remowt-test-root", "--remote-socket", nix_daemon)
    try:
        assert process.stderr is not None
        (line,) = _told(process.stderr, 1)
        match = re.search(r"nix --store unix://(\S+)$", line)
        assert match is not None, line
        assert "Version:" in _nix_ping(match.group(1))
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert not os.path.exists(match.group(1))
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
