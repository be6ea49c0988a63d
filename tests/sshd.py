"""A real OpenSSH sshd for tests: 127.0.0.1, a free port, its own config, keys and logs in a temp dir.

``SshServer`` runs ``/usr/sbin/sshd`` as a child of the test process and writes the client material
the tests need: a known_hosts file with its host key and an ssh_config with host aliases. The
client keys (``ClientKeys``, one unencrypted and one encrypted) are authorized for root and for
the unprivileged test user that ``scripts/setup-test-host.sh`` creates. Everything a client reads
exists twice: owned by root (``known_hosts``, ``ssh_config``, ``client_key``...) for clients run by
the tests as root, and owned by the test user under ``test_user_client_dir`` for clients run as
that user (ssh refuses private keys and configs that other users can read or write).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Set

from _util import children_of, kill_quietly, proc_gone, wait_until

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
PRIVSEP_DIR = "/run/sshd"
TEST_USER = "remowt-test"
TEST_PASSWORD = "remowt-test-password"
KEY_PASSPHRASE = "key-passphrase"
SETUP_HINT = "run `bash scripts/setup-test-host.sh` as root to install and configure it"
START_TIMEOUT = 10.0


class SshdUnavailable(RuntimeError):
    """This machine lacks what the sshd fixture needs (sshd, ssh-keygen, the test user, root)."""


def check_host() -> None:
    """Raise ``SshdUnavailable`` naming what is missing for a test sshd on this machine."""
    for tool in (SSHD, SSH_KEYGEN):
        if not os.access(tool, os.X_OK):
            raise SshdUnavailable(f"{tool} is not installed: {SETUP_HINT}")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        raise SshdUnavailable(f"the test user {TEST_USER!r} does not exist: {SETUP_HINT}") from None
    if os.geteuid() != 0:
        raise SshdUnavailable("the test sshd must be started as root (it logs in several users)")


def _keygen(path: str, passphrase: str, comment: str, key_type: str = "ed25519") -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", key_type, "-N", passphrase, "-C", comment, "-f", path],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _public_key(path: str) -> str:
    """The ``type base64`` part of the public key next to private key ``path``."""
    with open(path + ".pub") as f:
        key_type, blob = f.read().split()[:2]
    return f"{key_type} {blob}"


def fingerprint(public_key: str) -> str:
    """The ``SHA256:...`` fingerprint of a ``type base64`` public key, as ssh-keygen -l shows it."""
    digest = hashlib.sha256(base64.b64decode(public_key.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(path: str, text: str, mode: int = 0o644, owner: Optional[pwd.struct_passwd] = None) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _exe(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _host_entry(alias: str, server: SshServer, user: str, proxy_jump: Optional[str] = None) -> Dict[str, str]:
    """The ssh_config options of ``alias``: ``user`` on ``server``, through ``proxy_jump`` if given."""
    entry = {"Host": alias, "HostName": server.host, "Port": str(server.port), "User": user}
    if proxy_jump is not None:
        entry["ProxyJump"] = proxy_jump
    return entry


class ClientKeys:
    """Client key pairs in ``directory``: ``client_key`` (no passphrase), ``encrypted_client_key``."""

    def __init__(self, directory: str) -> None:
        check_host()
        self.directory = directory
        self.client_key = os.path.join(directory, "id_ed25519")
        self.encrypted_client_key = os.path.join(directory, "id_ed25519_encrypted")
        self.key_passphrase = KEY_PASSPHRASE
        _keygen(self.client_key, "", "remowt-test-client")
        _keygen(self.encrypted_client_key, KEY_PASSPHRASE, "remowt-test-client-encrypted")

    def authorized_keys(self) -> str:
        """An authorized_keys text holding both public keys."""
        return "".join(_public_key(key) + "\n" for key in (self.client_key, self.encrypted_client_key))


class SshServer:
    """One sshd on 127.0.0.1 with aliases ``alias`` (as the test user) and ``root_alias`` (as root).

    ``with SshServer(keys) as server:`` starts it and stops it (removing its directory) at the end.

    ``log_level`` is sshd's LogLevel; DEBUG1 also logs forwarded (direct-tcpip) connections.
    ``host_key_types`` are the ssh-keygen types of its host keys (``ed25519``, ``rsa``, ``ecdsa``); the
    first is ``host_key``, the one in ``known_hosts``.

    Attributes: host, port, host_key_type, host_key (``type base64``), host_key_fingerprint,
    host_keys (every host key, ``type base64``, by ssh key type such as ``ssh-rsa``),
    known_hosts, ssh_config, client_key, encrypted_client_key, key_passphrase, test_user,
    test_password, test_user_client_dir (copies owned by the test user: id_ed25519,
    id_ed25519_encrypted, known_hosts, ssh_config), log_file, directory.
    """

    def __init__(
        self,
        keys: ClientKeys,
        alias: str = "remowt-test-host",
        root_alias: str = "remowt-test-root",
        log_level: str = "VERBOSE",
        host: str = "127.0.0.1",
        netns: Optional[str] = None,
        host_key_types: Sequence[str] = ("ed25519",),
    ) -> None:
        check_host()
        self.log_level = log_level
        self.alias = alias
        self.root_alias = root_alias
        self.host = host
        self.netns = netns  # run sshd inside this network namespace (listening on ``host`` there)
        self.port = 0
        self.test_user = TEST_USER
        self.test_password = TEST_PASSWORD
        self.key_passphrase = keys.key_passphrase
        self._user = pwd.getpwnam(TEST_USER)
        self._process: Optional[subprocess.Popen[bytes]] = None
        self.directory = tempfile.mkdtemp(prefix="remowt-sshd-")
        os.chmod(self.directory, 0o755)  # sshd reads authorized_keys as the user logging in
        self.log_file = os.path.join(self.directory, "sshd.log")
        self.known_hosts = os.path.join(self.directory, "known_hosts")
        self.ssh_config = os.path.join(self.directory, "ssh_config")
        self.client_key = keys.client_key
        self.encrypted_client_key = keys.encrypted_client_key
        self.test_user_client_dir = os.path.join(self.directory, "client-" + TEST_USER)
        self._known_hosts_lines: List[str] = []
        self._config_entries: List[Dict[str, str]] = []

        self._host_key_paths = [os.path.join(self.directory, f"ssh_host_{kind}_key") for kind in host_key_types]
        for kind, path in zip(host_key_types, self._host_key_paths):
            _keygen(path, "", "remowt-test-host-key", kind)
        self.host_keys = {key.split()[0]: key for key in map(_public_key, self._host_key_paths)}
        self.host_key = _public_key(self._host_key_paths[0])
        self.host_key_type = self.host_key.split()[0]
        self.host_key_fingerprint = fingerprint(self.host_key)

        authorized = os.path.join(self.directory, "authorized_keys")
        os.mkdir(authorized, 0o755)
        for user in ("root", TEST_USER):
            _write(os.path.join(authorized, user), keys.authorized_keys())
        os.mkdir(self.test_user_client_dir, 0o700)
        os.chown(self.test_user_client_dir, self._user.pw_uid, self._user.pw_gid)
        for key in (keys.client_key, keys.encrypted_client_key):
            for suffix, mode in (("", 0o600), (".pub", 0o644)):
                copy = os.path.join(self.test_user_client_dir, os.path.basename(key) + suffix)
                shutil.copyfile(key + suffix, copy)
                os.chmod(copy, mode)
                os.chown(copy, self._user.pw_uid, self._user.pw_gid)

    def __enter__(self) -> SshServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def known_hosts_line(self) -> str:
        """This server's known_hosts line: ``[127.0.0.1]:PORT ssh-ed25519 AAAA...``."""
        return f"[{self.host}]:{self.port} {self.host_key}"

    def _prefix(self) -> List[str]:
        """What runs sshd inside the network namespace, if it has one."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self) -> None:
        """Start sshd on a free port and wait until it accepts connections."""
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        for _attempt in range(3):  # another process may take the free port before sshd binds it
            self.port = _free_port()
            config = os.path.join(self.directory, "sshd_config")
            _write(config, self._sshd_config(), 0o600)
            with open(self.log_file, "ab") as log:
                self._process = subprocess.Popen(
                    [*self._prefix(), SSHD, "-D", "-E", self.log_file, "-f", config],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if self._wait_listening():
                self._known_hosts_lines = [self.known_hosts_line]
                self._config_entries = [
                    _host_entry(self.alias, self, TEST_USER),
                    _host_entry(self.root_alias, self, "root"),
                ]
                self._write_client_files()
                return
        raise RuntimeError(f"sshd did not start on {self.host}; its log {self.log_file}:\n{self.log_text()}")

    def _wait_listening(self) -> bool:
        """True once the port accepts connections; False if sshd exits first."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.005)
        self._process.kill()
        self._process.wait()
        return False

    def _sshd_config(self) -> str:
        # UsePAM no: key and password logins check /etc/shadow directly, with no PAM session modules
        # (pam_loginuid and friends) that fail in containers. AcceptEnv is not set: no variables.
        host_keys = "".join(f"HostKey {path}\n" for path in self._host_key_paths)
        return f"""\
ListenAddress {self.host}
Port {self.port}
{host_keys}PidFile {os.path.join(self.directory, "sshd.pid")}
AuthorizedKeysFile {os.path.join(self.directory, "authorized_keys", "%u")}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
LogLevel {self.log_level}
"""

    def add_behind(self, target: SshServer, alias: str = "remowt-behind-jump") -> None:
        """Add ``alias``: ``target`` as the test user, reached with ProxyJump through this server."""
        self._known_hosts_lines.append(target.known_hosts_line)
        self._config_entries.append(_host_entry(alias, target, TEST_USER, proxy_jump=self.alias))
        self._write_client_files()

    def _write_client_files(self) -> None:
        """known_hosts and ssh_config, for root here and for the test user in its own directory."""
        known_hosts = "".join(line + "\n" for line in self._known_hosts_lines)
        for directory, key, owner in (
            (self.directory, self.client_key, None),
            (self.test_user_client_dir, os.path.join(self.test_user_client_dir, "id_ed25519"), self._user),
        ):
            known_hosts_path = os.path.join(directory, "known_hosts")
            _write(known_hosts_path, known_hosts, 0o644, owner)
            common = {
                "IdentityFile": key,
                "IdentitiesOnly": "yes",
                "UserKnownHostsFile": known_hosts_path,
                "GlobalKnownHostsFile": "/dev/null",
                "StrictHostKeyChecking": "yes",
            }
            blocks = []
            for entry in self._config_entries:
                lines = [f"Host {entry['Host']}"]
                lines += [f"    {name} {value}" for name, value in entry.items() if name != "Host"]
                lines += [f"    {name} {value}" for name, value in common.items()]
                blocks.append("\n".join(lines) + "\n")
            _write(os.path.join(directory, "ssh_config"), "\n".join(blocks), 0o600, owner)

    def log_text(self) -> str:
        """Everything sshd logged so far."""
        with open(self.log_file, errors="replace") as f:
            return f.read()

    def session_pids(self) -> Set[int]:
        """The per-connection sshd processes (all sshd descendants of the listener, not the listener)."""
        if self._process is None:
            return set()
        found: Set[int] = set()
        stack = list(children_of(self._process.pid))
        while stack:
            pid = stack.pop()
            if _exe(pid) == SSHD:
                found.add(pid)
            stack.extend(children_of(pid))
        return found

    def kill_sessions(self, timeout: float = 5.0) -> Set[int]:
        """SIGKILL every connection's sshd processes, like a dead session; the listener stays.

        Processes the sessions started (shells, agents) are not killed: they see their stdio close.
        Returns the killed pids once they have all exited.
        """
        pids = self.session_pids()
        for pid in pids:
            kill_quietly(pid, signal.SIGKILL)
        if not wait_until(lambda: all(proc_gone(pid) for pid in pids), timeout):
            raise RuntimeError(f"sshd session processes survived SIGKILL: {sorted(pids)}")
        return pids

    def stop(self) -> None:
        """Kill the sessions, stop the listener and remove the temporary directory."""
        if self._process is not None:
            self.kill_sessions()
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)
