"""The sshd fixtures work with the real OpenSSH client: key and password logins, ProxyJump, killed sessions."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from typing import Dict, List, Optional

import pytest
from _util import proc_gone, wait_until
from sshd import SshServer

pytestmark = pytest.mark.timeout(30)

SSH = "/usr/bin/ssh"


def ssh(
    server: SshServer,
    alias: str,
    command: str,
    *options: str,
    stdin: Optional[bytes] = None,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` on ``alias`` from ``server.ssh_config`` with the real ssh client in batch mode."""
    argv = [SSH, "-F", server.ssh_config, "-o", "BatchMode=yes", *options, alias, command]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=20, env=env)


def askpass_env(tmp_path: os.PathLike[str], answer: str) -> Dict[str, str]:
    """An environment in which ssh asks ``SSH_ASKPASS`` (answering ``answer``) instead of a terminal."""
    script = os.path.join(os.fspath(tmp_path), "askpass")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\necho '{answer}'\n")
    os.chmod(script, 0o700)
    return {**os.environ, "SSH_ASKPASS": script, "SSH_ASKPASS_REQUIRE": "force"}


def direct_options(server: SshServer, key: str) -> List[str]:
    """Options for connecting to ``server`` without its ssh_config, with only ``key``."""
    return [
        "-F", "/dev/null",
        "-p", str(server.port),
        "-i", key,
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
    ]  # fmt: skip


def test_key_login_as_root(sshd: SshServer) -> None:
    result = ssh(sshd, "remowt-test-root", "id -un")
    assert (result.returncode, result.stdout) == (0, b"root\n"), result.stderr


def test_key_login_as_test_user(sshd: SshServer) -> None:
    result = ssh(sshd, "remowt-test-host", "id -un")
    assert (result.returncode, result.stdout) == (0, f"{sshd.test_user}\n".encode()), result.stderr


def test_test_user_client_copies(sshd: SshServer) -> None:
    """The test user's own copies of the client files log in when ssh runs as that user."""
    config = os.path.join(sshd.test_user_client_dir, "ssh_config")
    user = pwd.getpwnam(sshd.test_user)
    result = subprocess.run(
        [SSH, "-F", config, "-o", "BatchMode=yes", "remowt-test-host", "id -un"],
        capture_output=True,
        timeout=20,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env={"HOME": user.pw_dir, "PATH": os.environ["PATH"]},
    )
    assert (result.returncode, result.stdout) == (0, f"{sshd.test_user}\n".encode()), result.stderr


def test_host_key_attributes(sshd: SshServer) -> None:
    result = subprocess.run(
        ["/usr/bin/ssh-keygen", "-l", "-E", "sha256", "-F", f"[127.0.0.1]:{sshd.port}", "-f", sshd.known_hosts],
        capture_output=True,
        check=True,
    )
    assert sshd.host_key_fingerprint.startswith("SHA256:")
    assert sshd.host_key_fingerprint.encode() in result.stdout
    assert sshd.host_key_type == "ssh-ed25519"


def test_encrypted_key_needs_its_passphrase(sshd: SshServer, tmp_path: os.PathLike[str]) -> None:
    options = direct_options(sshd, sshd.encrypted_client_key)
    batch = ssh(sshd, f"{sshd.test_user}@127.0.0.1", "true", *options)
    assert batch.returncode == 255
    assert b"Permission denied" in batch.stderr

    argv = [SSH, *options, "-o", "PasswordAuthentication=no", f"{sshd.test_user}@127.0.0.1", "id -un"]
    env = askpass_env(tmp_path, sshd.key_passphrase)
    asked = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, env=env)
    assert (asked.returncode, asked.stdout) == (0, f"{sshd.test_user}\n".encode()), asked.stderr


def test_password_login(sshd: SshServer, tmp_path: os.PathLike[str]) -> None:
    argv = [
        SSH, "-F", "/dev/null", "-p", str(sshd.port),
        "-o", f"UserKnownHostsFile={sshd.known_hosts}",
        "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password",
        f"{sshd.test_user}@127.0.0.1", "id -un",
    ]  # fmt: skip
    env = askpass_env(tmp_path, sshd.test_password)
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, env=env)
    assert (result.returncode, result.stdout) == (0, f"{sshd.test_user}\n".encode()), result.stderr


def test_proxy_jump(sshd: SshServer, sshd_jump: SshServer) -> None:
    result = ssh(sshd_jump, "remowt-behind-jump", "id -un")
    assert (result.returncode, result.stdout) == (0, f"{sshd.test_user}\n".encode()), result.stderr
    # The jump sshd logged the forward, written before the target even authenticated the client.
    assert f"server_request_direct_tcpip: originator 127.0.0.1 port 65535, target 127.0.0.1 port {sshd.port}" in (
        sshd_jump.log_text()
    )


def test_kill_sessions_ends_a_running_session(private_sshd: SshServer) -> None:
    argv = [SSH, "-F", private_sshd.ssh_config, "-o", "BatchMode=yes", "remowt-test-host", "echo $$; exec sleep 100"]
    client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    remote_pid = int(client.stdout.readline())
    try:
        killed = private_sshd.kill_sessions()
        assert killed
        assert client.wait(timeout=5) == 255
        assert private_sshd.session_pids() == set()
        # The listener survives: a new session works.
        result = ssh(private_sshd, "remowt-test-host", "true")
        assert result.returncode == 0, result.stderr
    finally:
        client.kill()
        client.communicate()
        os.kill(remote_pid, signal.SIGKILL)
    assert wait_until(lambda: proc_gone(remote_pid), 5)


def test_sudo_with_password_over_ssh(sshd: SshServer) -> None:
    result = ssh(sshd, "remowt-test-host", "sudo -S -k id -u", stdin=sshd.test_password.encode() + b"\n")
    assert (result.returncode, result.stdout) == (0, b"0\n"), result.stderr


def test_remote_python3(sshd: SshServer) -> None:
    command = "command -v python3; python3 -c 'import sys; print(sys.version_info >= (3, 9))'"
    result = ssh(sshd, "remowt-test-host", command)
    assert (result.returncode, result.stdout) == (0, b"/usr/bin/python3\nTrue\n"), result.stderr
