"""Contenders of the ssh groups: remowt, paramiko, execnet and mitogen against the run's one sshd.

Same shape as :mod:`contenders`: each function (or the factory it returns) is
a context manager that sets up, yields one iteration of work, and tears down.
Everyone logs in to :mod:`ssh_server`'s sshd as the test user (alias
``remowt-test-host``): remowt and paramiko with the client key, execnet and
mitogen through the ``ssh`` command with the same ssh_config.

The paramiko contenders are the reference a hand-written paramiko program
would reach: TCP_NODELAY on the socket (without it every round trip waits for
delayed ACKs) and aes128-gcm, the cipher remowt negotiates too.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, Tuple

import ssh_server
from contenders import CHUNK, NOOP_PLUGIN, execnet_echo, head_argv, plugin_calls, read_stdout
from harness import Factory, Operation, Then

#: paramiko then negotiates aes128-gcm@openssh.com (disabling a name it does not know is harmless).
NOT_AES128_GCM = (
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "3des-cbc",
    "aes256-gcm@openssh.com",
)
ECHO_PAYLOAD = b"0123456789abcdef"  # 16 bytes
TIMEOUT = 30.0


# --- connecting -----------------------------------------------------------------


def remowt_connect() -> Any:
    """A remowt connection to the test host (a ``remowt.Remowt``)."""
    import remowt

    return remowt.connect(ssh_server.ALIAS, ssh_config=ssh_server.server().ssh_config)


def paramiko_client() -> Any:
    """A ``paramiko.SSHClient`` logged in to the test host: TCP_NODELAY, aes128-gcm, host key checked."""
    import paramiko

    server = ssh_server.server()
    sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        client.load_host_keys(server.known_hosts)  # the default policy rejects unknown keys
        client.connect(
            server.host,
            server.port,
            username=server.test_user,
            key_filename=server.client_key,
            sock=sock,
            look_for_keys=False,
            allow_agent=False,
            timeout=TIMEOUT,
            disabled_algorithms={"ciphers": list(NOT_AES128_GCM)},
        )
    except BaseException:
        sock.close()
        raise
    return client


def paramiko_exec_true(client: Any) -> None:
    """``exec_command("true")`` on ``client``, wait for its exit status, close the channel."""
    _, stdout, _ = client.exec_command("true", timeout=TIMEOUT)
    channel = stdout.channel
    status = channel.recv_exit_status()
    channel.close()
    if status != 0:
        raise RuntimeError(f"true exited {status} over paramiko")


def execnet_spec() -> str:
    return f"ssh=-F {ssh_server.server().ssh_config} {ssh_server.ALIAS}//python=python3"


def mitogen_ssh(router: Any) -> Any:
    """A mitogen context on the test host, started through ``router``."""
    return router.ssh(
        hostname=ssh_server.ALIAS,
        ssh_args=["-F", ssh_server.server().ssh_config],
        python_path="python3",
        connect_timeout=TIMEOUT,
    )


@contextlib.contextmanager
def mitogen_router() -> Iterator[Any]:
    """A mitogen router on its own broker, shut down at the end."""
    import mitogen.master

    broker = mitogen.master.Broker()
    try:
        yield mitogen.master.Router(broker)
    finally:
        broker.shutdown()
        broker.join()


@contextlib.contextmanager
def remowt_ssh_connect() -> Iterator[Operation]:
    """``remowt.connect`` until the agent answers (deployed by the first, warm-up, connect; then cached)."""

    def connect() -> Then:
        return Then(None, remowt_connect().close)

    yield connect


@contextlib.contextmanager
def paramiko_connect_exec() -> Iterator[Operation]:
    """paramiko connect + auth, then one ``exec_command("true")`` until its exit status."""

    def connect() -> Then:
        client = paramiko_client()
        try:
            paramiko_exec_true(client)
        except BaseException:
            client.close()
            raise
        return Then(None, client.close)

    yield connect


@contextlib.contextmanager
def execnet_ssh_start() -> Iterator[Operation]:
    """``execnet.makegateway("ssh=...")``: returns once the remote interpreter answered the bootstrap."""
    import execnet

    spec = execnet_spec()

    def start() -> Then:
        return Then(None, execnet.makegateway(spec).exit)

    yield start


@contextlib.contextmanager
def mitogen_ssh_start() -> Iterator[Operation]:
    """mitogen ``router.ssh(...)``: returns once the remote interpreter is up and connected."""
    with mitogen_router() as router:

        def start() -> Then:
            context = mitogen_ssh(router)
            return Then(None, lambda: context.shutdown(wait=True))

        yield start


# --- spawn + wait -----------------------------------------------------------------


@contextlib.contextmanager
def remowt_ssh_spawn_true() -> Iterator[Operation]:
    """``conn.spawn(["true"]).wait()`` on an open ssh connection."""
    with remowt_connect() as conn:

        def spawn() -> None:
            proc = conn.spawn(["true"])
            if proc.wait(timeout=TIMEOUT) != 0:
                raise RuntimeError(f"true exited {proc.returncode}")

        yield spawn


@contextlib.contextmanager
def remowt_ssh_run_true() -> Iterator[Operation]:
    """``conn.run(["true"], check=True)`` (the subprocess drop-in) on an open ssh connection."""
    with remowt_connect() as conn:
        yield lambda: conn.run(["true"], check=True)


@contextlib.contextmanager
def paramiko_exec_true_open() -> Iterator[Operation]:
    """paramiko ``exec_command("true")`` + ``recv_exit_status()`` on an open connection."""
    with paramiko_client() as client:
        yield lambda: paramiko_exec_true(client)


# --- no-op round trips --------------------------------------------------------------


@contextlib.contextmanager
def remowt_ssh_ping() -> Iterator[Operation]:
    """``conn.ping()`` over ssh."""
    with remowt_connect() as conn:
        yield conn.ping


@contextlib.contextmanager
def remowt_ssh_plugin_ping() -> Iterator[Operation]:
    """``plugin.ping()`` over ssh: a no-op call to plugin(n), through the agent."""
    import remowt

    conn = remowt.connect(ssh_server.ALIAS, ssh_config=ssh_server.server().ssh_config, plugins=[NOOP_PLUGIN])
    with plugin_calls(conn, "ping") as call:
        yield call


@contextlib.contextmanager
def remowt_ssh_plugin_noop() -> Iterator[Operation]:
    """``NoopApi.noop()`` of plugin(n) over ssh, through the agent."""
    import remowt

    conn = remowt.connect(ssh_server.ALIAS, ssh_config=ssh_server.server().ssh_config, plugins=[NOOP_PLUGIN])
    with plugin_calls(conn, "noop") as call:
        yield call


@contextlib.contextmanager
def paramiko_cat_echo() -> Iterator[Operation]:
    """16 bytes sent to an exec'd ``cat`` and the same 16 read back, on one paramiko channel."""
    with paramiko_client() as client:
        channel = client.get_transport().open_session(timeout=TIMEOUT)
        channel.settimeout(TIMEOUT)
        channel.exec_command("cat")
        size = len(ECHO_PAYLOAD)

        def echo() -> None:
            channel.sendall(ECHO_PAYLOAD)
            got = b""
            while len(got) < size:
                data = channel.recv(size - len(got))
                if not data:
                    raise RuntimeError("cat closed its stdout during the echo")
                got += data
            if got != ECHO_PAYLOAD:
                raise RuntimeError(f"cat echoed {got!r}")

        try:
            yield echo
        finally:
            channel.close()


@contextlib.contextmanager
def execnet_ssh_echo() -> Iterator[Operation]:
    """execnet ssh gateway; one send + receive of 16 bytes on an echoing channel."""
    with execnet_echo(execnet_spec(), ECHO_PAYLOAD) as echo:
        yield echo


@contextlib.contextmanager
def mitogen_ssh_call() -> Iterator[Operation]:
    """mitogen ssh context; ``context.call(noop)``."""
    from mitogen_target import noop

    with mitogen_router() as router:
        context = mitogen_ssh(router)
        try:
            yield lambda: context.call(noop)
        finally:
            context.shutdown(wait=True)


# --- stdout throughput ----------------------------------------------------------------


def remowt_ssh_stdout(size: int) -> Factory:
    """A factory reading ``size`` bytes of a remote ``head``'s stdout through remowt, 1 MiB per read."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        with remowt_connect() as conn:
            yield lambda: read_stdout(conn, size)

    return factory


def paramiko_channel_read(size: int, window_size: int) -> Factory:
    """A factory reading the same ``head`` on a paramiko channel (``window_size``): ``recv(1 MiB)`` until EOF.

    Each transfer gets a fresh connection (made untimed, after the previous one):
    paramiko re-keys after 512 MiB and can stall when a re-key meets a channel
    close (paramiko issue 822), which would hang the baseline, not measure it.
    """
    command = shlex.join(head_argv(size))

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        state: Dict[str, Any] = {"client": paramiko_client()}

        def reconnect() -> None:
            state["client"].close()
            state["client"] = paramiko_client()

        def read_all() -> Then:
            channel = state["client"].get_transport().open_session(window_size=window_size, timeout=TIMEOUT)
            channel.settimeout(TIMEOUT)
            channel.exec_command(command)
            total = 0
            while True:
                data = channel.recv(CHUNK)
                if not data:
                    break
                total += len(data)
            status = channel.recv_exit_status()
            channel.close()
            if status != 0 or total != size:
                raise RuntimeError(f"read {total} bytes (expected {size}), exit status {status}")
            return Then(total, reconnect)

        try:
            yield read_all
        finally:
            state["client"].close()

    return factory


# --- keystroke echo through a terminal ----------------------------------------------------------

#: The remote program: on a terminal without line editing or echo, ``cat`` writes back each key as it comes.
ECHO_PROGRAM = "stty -icanon -echo; echo ready; exec cat"


def _keystroke(write: Callable[[bytes], object], read: Callable[[int], bytes]) -> Operation:
    """One key typed, the same key read back."""

    def keystroke() -> None:
        write(b"x")
        got = read(1)
        if got != b"x":
            raise RuntimeError(f"the terminal echoed {got!r}")

    return keystroke


@contextlib.contextmanager
def _keystrokes(process: Any) -> Iterator[Operation]:
    """Keystrokes into ``process`` (a Popen of ``ECHO_PROGRAM`` with stdin and stdout pipes), killed afterwards."""
    try:
        seen = b""
        while not seen.endswith(b"ready\r\n"):
            data = process.stdout.read(1)
            if not data:
                raise RuntimeError(f"the terminal ended before it was ready: {seen!r}")
            seen += data
        yield _keystroke(process.stdin.write, process.stdout.read)
    finally:
        process.kill()
        process.wait(TIMEOUT)


@contextlib.contextmanager
def remowt_ssh_keystroke() -> Iterator[Operation]:
    """``conn.Popen(..., pty=True)`` over ssh: a key written to its stdin, read back from its stdout."""
    import remowt

    with remowt_connect() as conn:
        argv = ["sh", "-c", ECHO_PROGRAM]
        with _keystrokes(conn.Popen(argv, pty=True, stdin=remowt.PIPE, stdout=remowt.PIPE, bufsize=0)) as keystroke:
            yield keystroke


@contextlib.contextmanager
def openssh_tt_keystroke() -> Iterator[Operation]:
    """OpenSSH's client, ``ssh -tt HOST``: a key written to its stdin, read back from its stdout."""
    import subprocess

    server = ssh_server.server()
    argv = ["ssh", "-tt", "-F", server.ssh_config, ssh_server.ALIAS, ECHO_PROGRAM]
    with _keystrokes(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)) as keystroke:
        yield keystroke


# --- one forwarded TCP connection: remowt's forward_local against ssh -L -----------------------

Endpoint = Tuple[str, int]


# The source runs in a process of its own, as a server on the target would: in this one it would share the GIL
# with remowt's client (paramiko's thread, the forward's pumps), which ssh -L, a process of its own, never does.
_SOURCE = """
import socket, socketserver, sys
size, chunk = int(sys.argv[1]), int(sys.argv[2])
block = bytes(min(size, chunk))
class Source(socketserver.BaseRequestHandler):
    def handle(self):
        left = size
        try:
            while left:
                left -= self.request.send(block[: min(left, len(block))])
        except OSError:
            pass  # a probe that connects and goes at once
server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Source)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def tcp_source(size: int) -> Iterator[Endpoint]:
    """A TCP server here, in a process of its own, sending ``size`` zero bytes per connection."""
    argv = [sys.executable, "-c", _SOURCE, str(size), str(CHUNK)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            yield ("127.0.0.1", int(process.stdout.readline()))
        finally:
            process.kill()


def read_connection(address: Endpoint, size: int) -> int:
    """Connect to ``address`` and read until EOF; the bytes read (``size`` or it raises)."""
    with socket.create_connection(address, TIMEOUT) as sock:
        total = 0
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            total += len(data)
    if total != size:
        raise RuntimeError(f"read {total} bytes through the forward, expected {size}")
    return total


@contextlib.contextmanager
def remowt_forward(target: Endpoint) -> Iterator[Endpoint]:
    """``conn.forward_local`` of a free port here to ``target`` as the test host reaches it."""
    with remowt_connect() as conn, conn.forward_local(("127.0.0.1", 0), target) as forward:
        address = forward.address
        assert isinstance(address, tuple)
        yield address


@contextlib.contextmanager
def openssh_forward(target: Endpoint) -> Iterator[Endpoint]:
    """``ssh -N -L`` (OpenSSH's client, aes128-gcm as remowt) of a free port here to ``target``."""
    server = ssh_server.server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"127.0.0.1:{port}:{target[0]}:{target[1]}"
    options = ["-o", "ExitOnForwardFailure=yes", "-c", "aes128-gcm@openssh.com"]
    argv = ["ssh", "-F", server.ssh_config, "-N", *options, "-L", spec, ssh_server.ALIAS]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # ready once it listens
            try:
                socket.create_connection(("127.0.0.1", port), TIMEOUT).close()
                break
            except ConnectionRefusedError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ssh -L {spec} did not start (exit status {process.poll()})") from None
                time.sleep(0.02)
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait()


def forward_read(forward: Callable[[Endpoint], Any], size: int) -> Factory:
    """A factory reading ``size`` bytes from a source through ``forward``, one connection per transfer."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        with tcp_source(size) as source, forward(source) as address:
            yield lambda: read_connection(address, size)

    return factory


def first_byte(address: Endpoint) -> None:
    """Connect to ``address`` and wait for the server's first byte (its end is not waited for)."""
    with socket.create_connection(address, TIMEOUT) as sock:
        if sock.recv(1) != b"\0":
            raise RuntimeError("no byte came through the forward")


def forward_connect(forward: Callable[[Endpoint], Any]) -> Factory:
    """A factory timing one connection through ``forward``: connect until the server's first byte, then close."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        with tcp_source(1) as source, forward(source) as address:
            yield lambda: first_byte(address)

    return factory
