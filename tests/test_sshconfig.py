"""ssh config resolution and known_hosts checking: pure code, no network."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import paramiko
import pytest

from remowt.errors import HostKeyError, SshError
from remowt.transports import hostkeys
from remowt.transports.sshconfig import Jump, jump_target, load_config, parse_jumps, resolve

pytestmark = pytest.mark.timeout(30)

CONFIG = """
Host web1
    HostName 10.1.2.3
    Port 2222
    User deploy
    IdentityFile ~/.ssh/web1_key
    ProxyJump bastion
    ConnectTimeout 7
    ServerAliveInterval 11
    ServerAliveCountMax 2
    UserKnownHostsFile /tmp/kh1 /tmp/kh2
    StrictHostKeyChecking accept-new

Host bastion
    HostName 10.0.0.1
    User jumper
    IdentityFile /keys/bastion

Host viacmd
    ProxyCommand nc %h %p
"""


@pytest.fixture
def config() -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_text(CONFIG)


def test_config_entry_is_honoured(config: paramiko.SSHConfig) -> None:
    target = resolve("web1", config)
    assert (target.hostname, target.port, target.user) == ("10.1.2.3", 2222, "deploy")
    assert target.identity_files == [os.path.expanduser("~/.ssh/web1_key")]
    assert target.proxy_jump == [Jump("bastion")]
    assert target.connect_timeout == 7
    assert (target.keepalive_interval, target.keepalive_count) == (11, 2)
    assert target.known_hosts == ["/tmp/kh1", "/tmp/kh2"]
    assert target.host_key_policy == "accept-new"
    assert target.known_hosts_name == "[10.1.2.3]:2222"


def test_arguments_win_over_the_config(config: paramiko.SSHConfig) -> None:
    target = resolve("web1", config, port=22, user="me", key_filename="/k", host_key_policy="reject")
    assert (target.port, target.user, target.identity_files, target.host_key_policy) == (22, "me", ["/k"], "reject")
    assert target.identities_only
    assert target.known_hosts_name == "10.1.2.3"
    assert resolve("alice@web1", config).user == "alice"


def test_jump_targets_use_their_own_entry(config: paramiko.SSHConfig) -> None:
    via = resolve("web1", config)
    hop = jump_target(via, config)
    assert (hop.hostname, hop.user, hop.identity_files, hop.proxy_jump) == ("10.0.0.1", "jumper", ["/keys/bastion"], [])
    chained = resolve("web1", paramiko.SSHConfig.from_text("Host web1\n  ProxyJump a,u@b:2200\n"))
    last = jump_target(chained, config)
    assert (last.hostname, last.user, last.port, last.proxy_jump) == ("b", "u", 2200, [Jump("a")])


def test_proxy_command_tokens_are_expanded(config: paramiko.SSHConfig) -> None:
    assert resolve("viacmd", config).proxy_command == "nc viacmd 22"


@pytest.mark.parametrize(
    ("spec", "jumps"),
    [
        ("none", []),
        ("h", [Jump("h")]),
        ("u@h:22,ssh://v@[::1]:2022", [Jump("h", "u", 22), Jump("::1", "v", 2022)]),
    ],
)
def test_parse_jumps(spec: str, jumps: list) -> None:
    assert parse_jumps(spec) == jumps


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: resolve("", c), "bad host name"),
        (lambda c: resolve("-oProxyCommand=x", c), "bad host name"),
        (lambda c: resolve("web1", c, port=70000), "out of range"),
        (lambda c: parse_jumps("h:port"), "not a number"),
        (lambda c: resolve("x", paramiko.SSHConfig.from_text("Host x\n  Port abc\n")), "not a number"),
        (lambda c: load_config("/nonexistent/ssh_config"), "does not exist"),
    ],
)
def test_bad_input_is_named(config: paramiko.SSHConfig, call: object, message: str) -> None:
    with pytest.raises(SshError, match=message):
        call(config)  # type: ignore[operator]


def test_bad_policy_is_a_value_error(config: paramiko.SSHConfig) -> None:
    with pytest.raises(ValueError, match="host_key_policy must be one of"):
        resolve("web1", config, host_key_policy="trust-me")


def test_host_keys(tmp_path: Path) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path, "a"))
    other = paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path, "b"))
    known = str(tmp_path / "known_hosts")
    name = "[127.0.0.1]:2222"

    def check(key: paramiko.PKey, policy: str) -> object:
        return hostkeys.check(hostkeys.lookup(name, [known]), key, policy)

    with pytest.raises(HostKeyError, match="is not known") as unknown:
        check(key, "reject")
    assert unknown.value.fingerprint == hostkeys.fingerprint(key)
    assert unknown.value.fingerprint.startswith("SHA256:") and "ssh-ed25519" in str(unknown.value)
    assert check(key, "accept-new") == known
    assert check(key, "reject") is None
    for policy in ("reject", "accept-new"):
        with pytest.raises(HostKeyError, match="CHANGED") as changed:
            check(other, policy)
        assert hostkeys.fingerprint(other) in str(changed.value) and hostkeys.fingerprint(key) in str(changed.value)
        assert f"{known}:1" in str(changed.value)
    assert check(other, "insecure-accept-any") is None
    assert Path(known).read_text().count("\n") == 1


def test_hash_known_hosts_is_read() -> None:
    config = paramiko.SSHConfig.from_text("Host hashed\n    HashKnownHosts yes\n")
    assert resolve("hashed", config).hash_known_hosts
    assert not resolve("plain", config).hash_known_hosts


def _keygen(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)
