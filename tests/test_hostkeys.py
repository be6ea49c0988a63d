"""known_hosts as OpenSSH judges it: the parser and matcher alone, then side by side with the real ssh client."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sshd import ClientKeys, SshServer

from remowt.errors import HostKeyError
from remowt.transports import hostkeys
from remowt.transports.hostkeys import Entry
from remowt.transports.ssh import open_session
from remowt.transports.sshconfig import resolve

pytestmark = pytest.mark.timeout(60)

NAME = "[10.0.0.1]:2222"


def _ed25519() -> paramiko.PKey:
    return _pkey(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))


def _rsa() -> paramiko.PKey:
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return _pkey(public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))


def _pkey(openssh: bytes) -> paramiko.PKey:
    key_type, data = openssh.decode().split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(data))


def _public(key: paramiko.PKey) -> str:
    """``type base64``, as a known_hosts line holds it."""
    return f"{key.get_name()} {key.get_base64()}"


def _check(path: Path, key: paramiko.PKey, policy: str = "reject", **kwargs: bool) -> Optional[str]:
    """remowt's verdict on ``key`` for ``NAME`` with the known_hosts file ``path``."""
    return hostkeys.check(hostkeys.lookup(NAME, [str(path)]), key, policy, **kwargs)


# --- the parser and matcher, no network ---


def test_parse_line() -> None:
    key = _ed25519()
    entry = hostkeys.parse_line(f"  {NAME},other {_public(key)} a comment  ", "kh", 7)
    assert entry == Entry("kh", 7, "", f"{NAME},other", "ssh-ed25519", key.asbytes())
    revoked = hostkeys.parse_line(f"@revoked * {_public(key)}", "kh", 1)
    assert revoked is not None and (revoked.marker, revoked.hosts) == ("@revoked", "*")
    authority = hostkeys.parse_line(f"@cert-authority *.example.org {_public(key)}", "kh", 1)
    assert authority is not None and authority.marker == "@cert-authority"
    for blank in ("", "   ", "# a comment", "  #indented comment"):
        assert hostkeys.parse_line(blank, "kh", 1) is None


def test_an_rsa_key_is_one_key_whatever_its_algorithm_name() -> None:
    key = _rsa()
    for written in ("ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"):
        entry = hostkeys.parse_line(f"host {written} {key.get_base64()}", "kh", 1)
        assert entry is not None and (entry.key_type, entry.blob) == ("ssh-rsa", key.asbytes())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("@bogus host {key}", "unknown marker"),
        ("@revoked host", "expected"),
        ("host ssh-ed25519", "expected"),
        ("host ssh-ed25519 AAAA!!notbase64", "base64"),
        ("host ssh-rsa {blob}", "not 'ssh-rsa'"),
        ("host ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "not a valid"),
        ("host ssh-ed25519 AAAA", "not an ssh public key"),
        ("|1|bad|hash {key}", "hashed host name"),
        ("|2|c2FsdA==|aGFzaA== {key}", "hashed host name"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: str, message: str) -> None:
    key = _ed25519()
    with pytest.raises(ValueError, match=message):
        hostkeys.parse_line(line.format(key=_public(key), blob=key.get_base64()), "kh", 1)


def test_keys_paramiko_lacks_are_recorded_keys(tmp_path: Path) -> None:
    blob = paramiko.Message()
    blob.add_string("ssh-dss")
    for _ in range(4):
        blob.add_mpint(7)
    path = tmp_path / "known_hosts"
    path.write_text(f"{NAME} ssh-dss {base64.b64encode(blob.asbytes()).decode()}\n")
    with pytest.raises(HostKeyError, match=f"CHANGED.*ssh-dss key .*{path}:1"):
        _check(path, _ed25519(), "accept-new")


@pytest.mark.parametrize(
    ("name", "hosts", "matches"),
    [
        ("example.org", "example.org", True),
        ("Example.ORG", "EXAMPLE.org", True),
        ("example.org", "a.net,example.org,b.net", True),
        ("example.org", "*.org", True),
        ("example.org", "*", True),
        ("example.org", "exampl?.org", True),
        ("example.org", "ex*e.net", False),
        ("axb", "a.b", False),  # only * and ? are special
        ("example.org", "*,!example.org", False),
        ("example.org", "!example.org,*", False),
        ("example.org", "!other.org,*", True),
        ("example.org", "!example.org", False),
        ("[10.0.0.1]:2222", "[10.0.0.1]:2222", True),
        ("[10.0.0.1]:2222", "10.0.0.1", False),
        ("[10.0.0.1]:2222", "[10.0.0.1]:22", False),
        ("[10.0.0.1]:2222", "[10.0.0.?]:*", True),
        ("10.0.0.1", "[10.0.0.1]:22", False),
    ],
)
def test_host_patterns(name: str, hosts: str, matches: bool) -> None:
    assert hostkeys.host_matches(name, hosts) is matches


def test_hashed_names() -> None:
    salt = os.urandom(20)
    hashed = hostkeys.hash_name("[10.0.0.1]:2222", salt)
    assert hashed == paramiko.HostKeys.hash_host("[10.0.0.1]:2222", base64.b64encode(salt).decode())
    assert hostkeys.host_matches("[10.0.0.1]:2222", hashed)
    assert not hostkeys.host_matches("[10.0.0.1]:2223", hashed)
    assert hostkeys.host_matches("EXAMPLE.org", hostkeys.hash_name("example.org"))


def test_bad_lines_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(
        f"# comment\n{NAME} ssh-ed25519 AAAA!!\n{NAME} {_public(key)}\n@cert-authority-typo * {_public(key)}\n"
    )
    with caplog.at_level(logging.WARNING, logger="remowt.ssh"):
        entries = list(hostkeys.read_file(str(path)))
    assert [entry.line for entry in entries] == [3]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and f"{path}:2: " in warnings[0] and f"{path}:4: " in warnings[1]
    assert _check(path, key) is None


def test_lookup_keeps_the_lines_of_the_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key, other = _ed25519(), _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(
        f"other.example {_public(other)}\n{hostkeys.hash_name(NAME)} {_public(key)}\n"
        f"@cert-authority * {_public(other)}\n@revoked * {_public(other)}\n"
    )
    with caplog.at_level(logging.INFO, logger="remowt.ssh"):
        known = hostkeys.lookup(NAME, [str(path)])
    assert [(entry.line, entry.marker) for entry in known.entries] == [(2, ""), (3, "@cert-authority"), (4, "@revoked")]
    assert known.hashed_files == {str(path)}
    assert known.algorithms() == {"ssh-ed25519"}
    assert any(f"{path}:3: @cert-authority" in record.getMessage() for record in caplog.records)


def test_a_port_with_no_keys_falls_back_to_the_bare_host(tmp_path: Path) -> None:
    key, other = _ed25519(), _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(f"10.0.0.1 {_public(key)}\n")
    assert _check(path, key) is None
    with pytest.raises(HostKeyError, match="is not known"):
        _check(path, other)
    path.write_text(f"{NAME} {_public(other)}\n10.0.0.1 {_public(key)}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        _check(path, key)
    path.write_text(f"@revoked 10.0.0.1 {_public(key)}\n10.0.0.1 {_public(key)}\n")
    with pytest.raises(HostKeyError, match="REVOKED"):
        _check(path, key, "accept-new")


def test_rotated_keys_of_one_type_are_all_accepted(tmp_path: Path) -> None:
    old, new = _ed25519(), _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(f"{NAME} {_public(old)}\n{NAME} {_public(new)}\n")
    assert _check(path, new) is None
    assert _check(path, old) is None


def test_rsa_recorded_as_ssh_rsa_matches_and_is_preferred(tmp_path: Path) -> None:
    key = _rsa()
    path = tmp_path / "known_hosts"
    path.write_text(f"{NAME} ssh-rsa {key.get_base64()}\n")
    assert hostkeys.lookup(NAME, [str(path)]).algorithms() == {"rsa-sha2-512", "rsa-sha2-256"}
    assert _check(path, key) is None


def test_revoked_key_is_refused_under_every_policy(tmp_path: Path) -> None:
    key = _ed25519()
    path = tmp_path / "known_hosts"
    text = f"{NAME} {_public(key)}\n@revoked * {_public(key)}\n"
    path.write_text(text)
    for policy in ("reject", "accept-new", "insecure-accept-any"):
        with pytest.raises(HostKeyError, match="REVOKED") as refused:
            _check(path, key, policy)
        assert f"{path}:2" in str(refused.value) and hostkeys.fingerprint(key) in str(refused.value)
        assert (refused.value.host, refused.value.key_type) == (NAME, "ssh-ed25519")
    assert path.read_text() == text


def test_changed_key_names_the_lines_and_what_to_do(tmp_path: Path) -> None:
    key, old, old_rsa = _ed25519(), _ed25519(), _rsa()
    path = tmp_path / "known_hosts"
    path.write_text(f"unrelated {_public(key)}\n{NAME} {_public(old)}\n")
    with pytest.raises(HostKeyError, match="CHANGED") as changed:
        _check(path, key, "accept-new")
    message = str(changed.value)
    assert f"ssh-ed25519 key {hostkeys.fingerprint(old)} ({path}:2)" in message
    assert hostkeys.fingerprint(key) in message and f"ssh-keygen -f '{path}' -R '{NAME}'" in message
    path.write_text(f"{NAME} {_public(old_rsa)}\n")  # as OpenSSH: a key of another type is a changed key too
    with pytest.raises(HostKeyError, match="none of type ssh-ed25519"):
        _check(path, key, "accept-new")


def test_unknown_host_mentions_unusable_cert_authorities(tmp_path: Path) -> None:
    key = _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(f"@cert-authority * {_public(_ed25519())}\n")
    with pytest.raises(HostKeyError, match="is not known") as unknown:
        _check(path, key)
    assert f"@cert-authority lines ({path}:1) cannot be used" in str(unknown.value)


@pytest.mark.parametrize(
    ("existing", "hash_names", "hashed"),
    [("", False, False), ("", True, True), ("plain.example {key}\n", False, False), ("{hashed} {key}\n", False, True)],
)
def test_accept_new_writes_hashed_names_where_wanted(
    tmp_path: Path, existing: str, hash_names: bool, hashed: bool
) -> None:
    key, other = _ed25519(), _ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(existing.format(key=_public(other), hashed=hostkeys.hash_name("other.example")))
    assert _check(path, key, "accept-new", hash_names=hash_names) == str(path)
    written = path.read_text().splitlines()[-1].split()
    assert written[1:] == _public(key).split()
    assert written[0].startswith("|1|") is hashed
    assert hostkeys.host_matches(NAME, written[0])
    assert _check(path, key) is None


# --- side by side with OpenSSH's ssh against a real sshd ---

Builder = Callable[[SshServer, Dict[str, str]], str]


@dataclass(frozen=True)
class Row:
    """A known_hosts content, whether ``ssh-keygen -H`` hashes it, and whether OpenSSH accepts the host."""

    text: Builder
    accepted: bool
    hashed: bool = False


def _name(server: SshServer, port_offset: int = 0) -> str:
    return f"[127.0.0.1]:{server.port + port_offset}"


def _ed(server: SshServer) -> str:
    return server.host_keys["ssh-ed25519"]


ROWS: Dict[str, Row] = {
    "exact-key": Row(lambda s, k: f"{_name(s)} {_ed(s)}\n", True),
    "rsa-recorded-as-ssh-rsa": Row(lambda s, k: f"{_name(s)} {s.host_keys['ssh-rsa']}\n", True),
    "rotated-second-key": Row(lambda s, k: f"{_name(s)} {k['ed25519']}\n{_name(s)} {_ed(s)}\n", True),
    "stale-key-of-other-type-beside": Row(lambda s, k: f"{_name(s)} {k['rsa']}\n{_name(s)} {_ed(s)}\n", True),
    "bad-base64-before": Row(lambda s, k: f"{_name(s)} ssh-ed25519 AAAA!!notbase64\n{_name(s)} {_ed(s)}\n", True),
    "unknown-marker-before": Row(lambda s, k: f"@bogus {_name(s)} {_ed(s)}\n{_name(s)} {_ed(s)}\n", True),
    "cert-authority-then-key": Row(lambda s, k: f"@cert-authority * {k['ca']}\n{_name(s)} {_ed(s)}\n", True),
    "cert-authority-only": Row(lambda s, k: f"@cert-authority * {k['ca']}\n", False),
    "revoked-right-key": Row(lambda s, k: f"@revoked * {_ed(s)}\n{_name(s)} {_ed(s)}\n", False),
    "revoked-other-key": Row(lambda s, k: f"@revoked * {k['ed25519']}\n{_name(s)} {_ed(s)}\n", True),
    "wildcard-star": Row(lambda s, k: f"* {_ed(s)}\n", True),
    "wildcard-question-mark": Row(lambda s, k: f"[127.0.0.?]:{s.port} {_ed(s)}\n", True),
    "negated-pattern-excludes-host": Row(lambda s, k: f"[127.0.0.1]:*,!{_name(s)} {_ed(s)}\n", False),
    "negated-pattern-of-other-host": Row(lambda s, k: f"!{_name(s, 1)},[127.0.0.1]:* {_ed(s)}\n", True),
    "hashed-entry": Row(lambda s, k: f"{_name(s)} {_ed(s)}\n", True, hashed=True),
    "hashed-entry-of-other-port": Row(lambda s, k: f"{_name(s, 1)} {_ed(s)}\n", False, hashed=True),
    "bracket-port-form-in-a-list": Row(lambda s, k: f"example.org,{_name(s)},10.9.8.7 {_ed(s)}\n", True),
    "bare-host-without-port": Row(lambda s, k: f"127.0.0.1 {_ed(s)}\n", True),
    "bare-host-with-wrong-key": Row(lambda s, k: f"127.0.0.1 {k['ed25519']}\n", False),
    "wrong-key-for-port-shadows-bare-host": Row(lambda s, k: f"{_name(s)} {k['ed25519']}\n127.0.0.1 {_ed(s)}\n", False),
    "revoked-for-bare-host-recorded-for-port": Row(
        lambda s, k: f"@revoked 127.0.0.1 {_ed(s)}\n{_name(s)} {_ed(s)}\n", True
    ),
    "revoked-for-bare-host-recorded-for-it": Row(
        lambda s, k: f"@revoked 127.0.0.1 {_ed(s)}\n127.0.0.1 {_ed(s)}\n", False
    ),
    "other-port": Row(lambda s, k: f"{_name(s, 1)} {_ed(s)}\n", False),
    "wrong-key": Row(lambda s, k: f"{_name(s)} {k['ed25519']}\n", False),
    "empty-file": Row(lambda s, k: "", False),
}


@pytest.fixture(scope="module")
def dual_sshd(ssh_client_keys: ClientKeys) -> Iterator[SshServer]:
    """An sshd with an ed25519 and an RSA host key."""
    with SshServer(ssh_client_keys, host_key_types=("ed25519", "rsa")) as server:
        yield server


@pytest.fixture(scope="module")
def spare_keys(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """Public keys (``type base64``) no server has, made by ssh-keygen: ``ed25519``, ``rsa`` and ``ca``."""
    directory = tmp_path_factory.mktemp("spare-keys")
    keys = {}
    for name, kind in (("ed25519", "ed25519"), ("rsa", "rsa"), ("ca", "ed25519")):
        path = directory / name
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True, timeout=30)
        keys[name] = " ".join(Path(f"{path}.pub").read_text().split()[:2])
    return keys


def _write(path: Path, text: str, hashed: bool = False) -> Path:
    path.write_text(text)
    if hashed:
        subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True, timeout=30)
        assert "|1|" in path.read_text()
    return path


def _ssh_accepts(server: SshServer, known_hosts: Path, strict: str = "yes") -> bool:
    """Whether OpenSSH's ssh logs in with ``known_hosts`` (and only that file) and StrictHostKeyChecking ``strict``."""
    options = {
        "BatchMode": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": strict,
        "IdentitiesOnly": "yes",
    }
    result = subprocess.run(
        [
            "ssh",
            "-F",
            os.devnull,
            *(f"-o{option}={value}" for option, value in options.items()),
            *("-i", server.client_key, "-p", str(server.port), f"{server.test_user}@127.0.0.1", "true"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 0:
        return True
    assert "Host key verification failed" in result.stderr, result.stderr
    return False


def _remowt_accepts(
    server: SshServer, known_hosts: Path, policy: str = "reject", config: Optional[paramiko.SSHConfig] = None
) -> bool:
    """Whether remowt's ssh session logs in with ``known_hosts`` under ``policy``."""
    config = config or paramiko.SSHConfig()
    target = resolve(
        "127.0.0.1",
        config,
        port=server.port,
        user=server.test_user,
        key_filename=server.client_key,
        known_hosts=str(known_hosts),
        host_key_policy=policy,
    )
    try:
        session = open_session(target, config)
    except HostKeyError as e:
        assert e.fingerprint in str(e) and e.host == _name(server)
        return False
    session.close()
    return True


@pytest.mark.parametrize("row", list(ROWS))
def test_remowt_accepts_exactly_when_ssh_does(
    row: str, dual_sshd: SshServer, spare_keys: Dict[str, str], tmp_path: Path
) -> None:
    case = ROWS[row]
    known_hosts = _write(tmp_path / "known_hosts", case.text(dual_sshd, spare_keys), case.hashed)
    content = known_hosts.read_text()
    ssh, remowt = _ssh_accepts(dual_sshd, known_hosts), _remowt_accepts(dual_sshd, known_hosts)
    assert (ssh, remowt) == (case.accepted, case.accepted), f"ssh {ssh}, remowt {remowt} for:\n{content}"
    assert known_hosts.read_text() == content


ACCEPT_NEW_ROWS: Dict[str, Row] = {
    "unknown-host": Row(lambda s, k: "", True),
    "hashed-file-of-other-hosts": Row(lambda s, k: f"other.example {k['ed25519']}\n", True, hashed=True),
    "revoked-key": Row(lambda s, k: f"@revoked * {s.host_key}\n", False),
    "wrong-key": Row(lambda s, k: f"{_name(s)} {k['ed25519']}\n", False),
    "only-a-key-of-another-type": Row(lambda s, k: f"{_name(s)} {k['rsa']}\n", False),
}


@pytest.mark.parametrize("row", list(ACCEPT_NEW_ROWS))
def test_accept_new_side_by_side(row: str, sshd: SshServer, spare_keys: Dict[str, str], tmp_path: Path) -> None:
    case = ACCEPT_NEW_ROWS[row]
    text = case.text(sshd, spare_keys)
    for_ssh = _write(tmp_path / "for_ssh", text, case.hashed)
    for_remowt = tmp_path / "for_remowt"
    shutil.copyfile(for_ssh, for_remowt)
    ssh, remowt = _ssh_accepts(sshd, for_ssh, "accept-new"), _remowt_accepts(sshd, for_remowt, "accept-new")
    assert (ssh, remowt) == (case.accepted, case.accepted), f"ssh {ssh}, remowt {remowt} for:\n{text}"
    if case.accepted:  # each recorded the key where the other finds it
        assert _ssh_accepts(sshd, for_remowt) and _remowt_accepts(sshd, for_ssh)


@pytest.mark.parametrize("how", ["file-has-hashed-names", "HashKnownHosts"])
def test_accept_new_into_a_hashed_file(how: str, sshd: SshServer, spare_keys: Dict[str, str], tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    config = paramiko.SSHConfig()
    if how == "HashKnownHosts":
        config = paramiko.SSHConfig.from_text("Host *\n    HashKnownHosts yes\n")
    else:
        _write(known_hosts, f"other.example {spare_keys['ed25519']}\n", hashed=True)
    assert not _ssh_accepts(sshd, known_hosts)
    assert _remowt_accepts(sshd, known_hosts, "accept-new", config)
    written = known_hosts.read_text().splitlines()[-1].split()
    assert written[0].startswith("|1|") and "127.0.0.1" not in known_hosts.read_text()
    assert written[1:] == sshd.host_key.split()
    assert _ssh_accepts(sshd, known_hosts)
