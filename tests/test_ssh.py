"""The ssh transport against a real OpenSSH sshd on 127.0.0.1 (see tests/sshd.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import paramiko
import pytest
from _util import Family, proc_alive, proc_gone, proc_state, wait_until
from sshd import ClientKeys, SshServer

import remowt
from remowt.errors import AuthenticationError, ConnectionLost, HostKeyError, SshError
from remowt.transports.ssh import ChannelTransport, ParamikoTransport

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def conn(sshd: SshServer) -> Iterator[remowt.Remowt]:
    with remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config) as connection:
        yield connection


def _direct(sshd: SshServer, **kwargs: object) -> remowt.Remowt:
    """A connection given by arguments alone, no ssh config."""
    kwargs.setdefault("port", sshd.port)
    kwargs.setdefault("user", sshd.test_user)
    kwargs.setdefault("key_filename", sshd.client_key)
    kwargs.setdefault("known_hosts", sshd.known_hosts)
    return remowt.connect("127.0.0.1", ssh_config=os.devnull, **kwargs)  # type: ignore[arg-type]


def test_runs_as_the_configured_user(conn: remowt.Remowt, sshd: SshServer) -> None:
    result = conn.run(["id", "-un"], capture_output=True, text=True, check=True)
    assert result.stdout == f"{sshd.test_user}\n"
    info = conn.info()
    assert info.uid == int(subprocess.check_output(["id", "-u", sshd.test_user]))
    assert conn.check_output("echo $0; exit 0", shell=True, text=True) == "/bin/sh\n"


def test_arguments_without_a_config(sshd: SshServer) -> None:
    with _direct(sshd) as connection:
        assert connection.check_output(["id", "-un"], text=True) == f"{sshd.test_user}\n"


def test_unknown_host_key_is_refused_then_accept_new_records_it(sshd: SshServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError) as refused:
        _direct(sshd, known_hosts=str(known))
    error = refused.value
    assert (error.host, error.key_type, error.fingerprint) == (
        f"[127.0.0.1]:{sshd.port}",
        sshd.host_key_type,
        sshd.host_key_fingerprint,
    )
    assert sshd.host_key_fingerprint in str(error) and "accept-new" in str(error)
    assert not known.exists()
    with _direct(sshd, known_hosts=str(known), host_key_policy="accept-new") as connection:
        connection.ping()
    assert known.read_text().split() == sshd.known_hosts_line.split()
    with _direct(sshd, known_hosts=str(known)) as connection:
        connection.ping()


def test_changed_host_key_is_refused_under_every_safe_policy(sshd: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {(tmp_path / 'other_key.pub').read_text()}")
    for policy in ("reject", "accept-new"):
        with pytest.raises(HostKeyError, match="CHANGED") as refused:
            _direct(sshd, known_hosts=str(known), host_key_policy=policy)
        assert refused.value.fingerprint == sshd.host_key_fingerprint
    with _direct(sshd, known_hosts=str(known), host_key_policy="insecure-accept-any") as connection:
        connection.ping()


def test_encrypted_key_asks_the_prompter(sshd: SshServer) -> None:
    asked: List[str] = []

    def prompter(text: str) -> str:
        asked.append(text)
        return sshd.key_passphrase

    with _direct(sshd, key_filename=sshd.encrypted_client_key, prompter=prompter) as connection:
        connection.ping()
    assert asked == [f"Enter passphrase for key '{sshd.encrypted_client_key}': "]


def test_auth_failure_names_what_was_tried(sshd: SshServer) -> None:
    with pytest.raises(AuthenticationError) as failed:
        _direct(sshd, key_filename=sshd.encrypted_client_key)
    assert "encrypted; no prompter" in str(failed.value) and "publickey" in str(failed.value)
    with pytest.raises(AuthenticationError, match="password") as wrong:
        _direct(sshd, key_filename=[], password="not-the-password")
    assert "password" in wrong.value.tried

    def cancel(text: str) -> str:
        raise EOFError("no passphrase")

    with pytest.raises(AuthenticationError, match="cancelled"):
        _direct(sshd, key_filename=sshd.encrypted_client_key, prompter=cancel)


def test_password_login(sshd: SshServer) -> None:
    with _direct(sshd, key_filename=[], password=sshd.test_password) as connection:
        assert connection.check_output(["whoami"], text=True) == f"{sshd.test_user}\n"


def test_a_key_login_does_not_ask_for_the_methods_first(sshd_jump: SshServer) -> None:
    """sshd answers the ``none`` method only after its failed-authentication delay: a key goes first."""

    def none_requests() -> int:
        request = f"userauth-request for user {sshd_jump.test_user} service ssh-connection method none"
        return sshd_jump.log_text().count(request)

    before = none_requests()
    with _direct(sshd_jump) as connection:
        assert connection.check_output(["echo", "in"], text=True) == "in\n"
    assert f"Accepted publickey for {sshd_jump.test_user}" in sshd_jump.log_text()
    assert none_requests() == before


def test_a_refused_key_then_the_password(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with _direct(sshd, key_filename=str(stranger), password=sshd.test_password) as connection:
        assert connection.check_output(["whoami"], text=True) == f"{sshd.test_user}\n"


class _PasswordOnly(paramiko.ServerInterface):
    """Allows the password alone, records what the client asked, and opens no channel."""

    def __init__(self) -> None:
        self.asked: List[str] = []

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_none(self, username: str) -> int:
        self.asked.append("none")
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        self.asked.append(f"password {password}")
        return paramiko.AUTH_SUCCESSFUL if password == "secret" else paramiko.AUTH_FAILED


@pytest.mark.timeout(30)
def test_a_server_without_publickey_gets_the_password_after_one_key(sshd: SshServer, tmp_path: Path) -> None:
    server = _PasswordOnly()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    served: List[paramiko.Transport] = []

    def serve() -> None:
        sock, _ = listener.accept()
        transport = paramiko.Transport(sock)
        served.append(transport)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key_file(sshd.client_key))
        transport.start_server(server=server)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(SshError, match="cannot open a channel"):
            remowt.connect(
                "127.0.0.1",
                port=listener.getsockname()[1],
                user="someone",
                password="secret",
                key_filename=[sshd.client_key, sshd.client_key],
                ssh_config=os.devnull,
                known_hosts=str(tmp_path / "known_hosts"),
                host_key_policy="accept-new",
                connect_timeout=10.0,
            )
    finally:
        listener.close()
        thread.join(10)
        for transport in served:
            transport.close()
    assert server.asked == ["password secret"]


def test_proxy_jump(sshd: SshServer, sshd_jump: SshServer) -> None:
    with remowt.connect("remowt-behind-jump", ssh_config=sshd_jump.ssh_config) as connection:
        assert connection.check_output(["id", "-un"], text=True) == f"{sshd.test_user}\n"
    assert f"target 127.0.0.1 port {sshd.port}" in sshd_jump.log_text()


def test_proxy_command(sshd: SshServer, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        Path(sshd.ssh_config).read_text()
        + f"\nHost via-command\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User {sshd.test_user}\n"
        f"    IdentityFile {sshd.client_key}\n    UserKnownHostsFile {sshd.known_hosts}\n"
        f"    ProxyCommand ssh -F {sshd.ssh_config} -W %h:%p {sshd.root_alias}\n"
    )
    with remowt.connect("via-command", ssh_config=str(config)) as connection:
        assert connection.check_output(["echo", "through a command"], text=True) == "through a command\n"


def test_connection_errors_are_clear(sshd: SshServer) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(SshError, match=f"cannot connect to 127.0.0.1:{port}"):
        _direct(sshd, port=port)
    with pytest.raises(SshError, match=r"cannot resolve host name 'no-such-host\.invalid'"):
        remowt.connect("no-such-host.invalid", ssh_config=os.devnull)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(SshError, match="handshake"):
            _direct(sshd, port=silent.getsockname()[1], connect_timeout=0.5)
    with socket.socket() as mute:  # a banner, then nothing: the packet reader's wait has the handshake's deadline
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        accepted: List[socket.socket] = []

        def greet() -> None:
            accepted.append(mute.accept()[0])
            accepted[0].sendall(b"SSH-2.0-mute\r\n")

        server = threading.Thread(target=greet, daemon=True)
        server.start()
        try:
            with pytest.raises(SshError, match="handshake"):
                _direct(sshd, port=mute.getsockname()[1], connect_timeout=0.5)
        finally:
            server.join(10)
            for sock in accepted:
                sock.close()


def test_missing_python_is_reported(sshd: SshServer) -> None:
    with pytest.raises(remowt.RemowtError, match="python-that-is-not-there"):
        remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config, python="python-that-is-not-there")


def test_concurrent_first_deploys(sshd: SshServer) -> None:
    cache = Path(f"/home/{sshd.test_user}/.cache/remowt")
    shutil.rmtree(cache, ignore_errors=True)
    barrier = threading.Barrier(3)
    results: List[object] = []

    def deploy() -> None:
        barrier.wait()
        try:
            with remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config) as connection:
                results.append(connection.check_output(["echo", "ok"], text=True))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=deploy) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert results == ["ok\n"] * 3
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] != []


def test_killed_session_fails_streams_and_calls(private_sshd: SshServer) -> None:
    connection = remowt.connect("remowt-test-host", ssh_config=private_sshd.ssh_config)
    try:
        process = connection.Popen(["cat", "/dev/zero"], stdout=remowt.PIPE)
        assert process.stdout is not None and len(process.stdout.read(1 << 20)) == 1 << 20
        agent_pid = connection.info().pid
        private_sshd.kill_sessions()
        with pytest.raises((ConnectionLost, OSError)):
            while process.stdout.read(1 << 20):
                pass
        with pytest.raises(ConnectionLost):
            connection.ping()
        assert wait_until(lambda: proc_gone(agent_pid), 10)
    finally:
        connection.close()


@pytest.mark.parametrize("how", ["killed", "stopped-then-killed", "group-killed"])
def test_killed_agent_takes_its_children(sshd: SshServer, how: str) -> None:
    connection = remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config)
    family: Optional[Family] = None
    try:
        agent = connection.info().pid
        family = Family(connection)
        if how == "stopped-then-killed":
            os.kill(agent, signal.SIGSTOP)
            assert wait_until(lambda: proc_state(agent) == "T", 10)
        if how == "group-killed":  # everything in the agent's process group dies at once, the watchdog not
            assert os.getpgid(agent) != os.getpgrp()
            os.killpg(os.getpgid(agent), signal.SIGKILL)
        else:
            os.kill(agent, signal.SIGKILL)  # as the OOM killer does: no chance to clean up
        assert family.doomed_gone(10), f"alive: {family.alive()}"
        assert proc_alive(family.kept), "a child spawned with keep_on_disconnect outlives its agent"
    finally:
        connection.close()
        if family is not None:
            family.kill()


def test_a_send_on_a_broken_connection_is_connection_lost(sshd: SshServer) -> None:
    connection = remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config)
    try:
        transport = connection.link.transport
        assert isinstance(transport, ChannelTransport)
        # Our side can no longer send, and paramiko has not noticed: its send raises EOFError.
        transport.channel.get_transport().sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionLost):
            connection.ping()
        with pytest.raises(ConnectionLost):
            connection.ping()
    finally:
        connection.close()


def test_two_gib_stream_over_one_connection(conn: remowt.Remowt) -> None:
    size = 2 << 30
    process = conn.spawn(["head", "-c", str(size), "/dev/zero"], stdout=remowt.PIPE)
    assert process.stdout is not None
    received = 0
    while True:
        chunk = process.stdout.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    assert (received, process.wait(10)) == (size, 0)
    assert conn.check_output(["echo", "still here"], text=True) == "still here\n"


@pytest.mark.timeout(120)
def test_channel_closes_during_rekeys_do_not_stall(sshd: SshServer) -> None:
    """paramiko issue 822: a channel close that arrives while keys are re-negotiated stalled the transport."""
    sock = socket.create_connection(("127.0.0.1", sshd.port))
    transport = ParamikoTransport(sock)
    try:
        transport.start_client(timeout=10)
        transport.auth_publickey(sshd.test_user, paramiko.Ed25519Key.from_private_key_file(sshd.client_key))
        transport.packetizer.REKEY_BYTES = 1 << 16  # re-key after every 64 KiB, so closes land inside re-keys
        transport.packetizer.REKEY_PACKETS = 1 << 20
        for _ in range(40):
            channel = transport.open_session(timeout=10)
            channel.exec_command("head -c 200000 /dev/zero")
            received = 0
            while True:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            assert received == 200000
            assert channel.status_event.wait(10) and channel.recv_exit_status() == 0
            channel.close()
    finally:
        transport.close()


@pytest.mark.timeout(120)
def test_frames_read_on_paramikos_thread_survive_rekeys(conn: remowt.Remowt) -> None:
    """paramiko's thread reads and dispatches frames (and never sends): pings, calls and data both ways,
    all at once, through a re-key every 64 KiB, arrive whole and in order."""
    transport = conn.link.transport
    assert isinstance(transport, ChannelTransport)
    session = transport.channel.get_transport()
    session.packetizer.REKEY_BYTES = 1 << 16
    kex_init, rekeys = session._send_kex_init, []
    session._send_kex_init = lambda: (rekeys.append(1), kex_init())[-1]  # type: ignore[method-assign]
    data = os.urandom(3 << 20)
    errors: List[BaseException] = []

    def pings() -> None:
        try:
            for _ in range(300):
                conn.ping()
        except BaseException as e:
            errors.append(e)

    pinger = threading.Thread(target=pings)
    pinger.start()
    echoed = conn.run(["cat"], input=data, capture_output=True, timeout=60).stdout
    pinger.join(60)
    assert not pinger.is_alive() and not errors, errors
    assert echoed == data
    assert len(rekeys) >= 2  # how many depends on how the packets fell (64 KiB each way): two at least
    assert conn.check_output(["echo", "still here"], text=True, timeout=20) == "still here\n"


def test_cli_ssh(sshd: SshServer, tmp_path: Path) -> None:
    result = subprocess.run(
        ["remowt", "ssh", "-F", sshd.ssh_config, "remowt-test-host", "--", "sh", "-c", "cat; echo err >&2; exit 7"],
        input=b"piped in\n",
        capture_output=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (7, b"piped in\n", b"err\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n    UserKnownHostsFile {sshd.known_hosts}\n")
    direct = subprocess.run(
        [
            "remowt",
            "ssh",
            "127.0.0.1",
            "-p",
            str(sshd.port),
            "-l",
            sshd.test_user,
            "-i",
            sshd.client_key,
            "-F",
            str(config),
            "--",
            "sh",
            "-c",
            "kill -TERM $$",
        ],
        capture_output=True,
        timeout=30,
    )
    assert direct.returncode == 128 + 15, direct.stderr
    unknown = subprocess.run(
        ["remowt", "ssh", "-p", str(sshd.port), "-F", os.devnull, "127.0.0.1", "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 255 and "is not known" in unknown.stderr
    assert sshd.host_key_fingerprint in unknown.stderr


def test_remowt_host_makes_the_default_connection(sshd: SshServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.ssh_config, home / ".ssh" / "config")
    script = "import remowt; print(remowt.check_output(['id', '-un'], text=True), end='')"
    env = {**os.environ, "HOME": str(home), "REMOWT_HOST": "remowt-test-host"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, f"{sshd.test_user}\n"), out.stderr


@pytest.mark.parametrize("options", ["noexec", "ro"])
def test_unusable_cache_falls_back_to_a_temporary_dir(
    sshd: SshServer, options: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Path(f"/home/{sshd.test_user}/.cache")
    cache.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0777", "tmpfs", str(cache)], check=True)
    try:
        with (
            caplog.at_level("WARNING", logger="remowt"),
            remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config) as connection,
        ):
            assert connection.check_output(["echo", "ok"], text=True) == "ok\n"
        assert any("temporary" in record.getMessage() for record in caplog.records), caplog.text
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@pytest.fixture
def sshd_in_netns(ssh_client_keys: ClientKeys) -> Iterator[Tuple[SshServer, Callable[[], None]]]:
    """An sshd in a network namespace of its own, behind a veth pair; the callable silences the link."""
    tag = f"{os.getpid() % 100000}"
    namespace, outside, inside = f"remowt-{tag}", f"rwo{tag}", f"rwi{tag}"
    prefix = f"10.213.{os.getpid() % 250}"

    def ip(*args: str, netns: bool = False) -> None:
        subprocess.run([*(["ip", "netns", "exec", namespace] if netns else []), "ip", *args], check=True)

    ip("netns", "add", namespace)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", namespace)
        ip("addr", "add", f"{prefix}.1/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("addr", "add", f"{prefix}.2/30", "dev", inside, netns=True)
        ip("link", "set", inside, "up", netns=True)
        server = SshServer(ssh_client_keys, host=f"{prefix}.2", netns=namespace)
        try:
            server.start()
            # packets to the sshd's address are dropped without an answer, as on a dead network
            yield server, lambda: ip("addr", "flush", "dev", inside, netns=True)
        finally:
            server.stop()
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], check=True)


@pytest.mark.timeout(30)
def test_dead_network_is_noticed_within_the_keepalive_interval(
    sshd_in_netns: Tuple[SshServer, Callable[[], None]],
) -> None:
    server, silence = sshd_in_netns
    connection = remowt.connect("remowt-test-host", ssh_config=server.ssh_config, keepalive_interval=1.0)
    try:
        process = connection.Popen(["sleep", "60"], stdout=remowt.PIPE)
        connection.ping()
        silence()
        started = time.monotonic()
        assert process.stdout is not None
        with pytest.raises((ConnectionLost, OSError)):
            process.stdout.read()
        with pytest.raises(ConnectionLost):
            connection.ping()
        assert time.monotonic() - started < 4.0
    finally:
        connection.close()


@pytest.mark.timeout(30)
def test_agent_cut_off_by_a_dead_network_ends_itself_and_its_children(
    sshd_in_netns: Tuple[SshServer, Callable[[], None]],
) -> None:
    server, silence = sshd_in_netns
    connection = remowt.connect("remowt-test-host", ssh_config=server.ssh_config, agent_keepalive=0.5)
    family: Optional[Family] = None
    try:
        agent = connection.info().pid
        family = Family(connection)
        silence()
        # no end of input ever reaches the agent: it ends itself after 3 silent intervals of 0.5 s
        assert wait_until(lambda: proc_gone(agent), 10), "the agent outlives a dead network"
        assert family.doomed_gone(5), f"alive: {family.alive()}"
        assert proc_alive(family.kept)
    finally:
        connection.close()
        if family is not None:
            family.kill()


def test_ssh_agent_keys(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh keys to fall back on
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", socket_path], stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: os.path.exists(socket_path), 10)
        monkeypatch.setenv("SSH_AUTH_SOCK", socket_path)
        with pytest.raises(AuthenticationError, match="tried: nothing"):
            _direct(sshd, key_filename=None)
        subprocess.run(["ssh-add", "-q", sshd.client_key], check=True, env={**os.environ, "SSH_AUTH_SOCK": socket_path})
        with _direct(sshd, key_filename=None) as connection:
            assert connection.check_output(["id", "-un"], text=True) == f"{sshd.test_user}\n"
    finally:
        agent.terminate()
        agent.wait(10)
