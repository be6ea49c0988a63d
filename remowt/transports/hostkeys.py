"""Host key checking against known_hosts files, as OpenSSH judges them, with explicit trust policies.

- ``reject`` (the default): only keys already in known_hosts are accepted.
- ``accept-new``: an unknown host's key is recorded and accepted (trust on
  first use); a key that differs from the recorded ones is still refused.
- ``insecure-accept-any``: anything is accepted, with a warning in the log.

Under every policy, a key that a matching ``@revoked`` line names is refused.

The files are read line by line (``man sshd``, SSH_KNOWN_HOSTS FILE FORMAT);
a line that cannot be parsed is skipped with a warning naming it, as OpenSSH
skips it. Host fields are comma lists of patterns (``*`` and ``?``
wildcards, ``!`` negations) or ``|1|salt|hash`` hashed names. A
``[host]:port`` name with no key recorded falls back to the lines of
``host`` (OpenSSH's "checking without port identifier"). Keys are compared
as key blobs, so an RSA key recorded as ``ssh-rsa`` matches the server's key
whichever ``rsa-sha2-*`` signature the session uses. ``@cert-authority``
lines are skipped: paramiko does not verify host certificates.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import paramiko
from paramiko.pkey import UnknownKeyType

from ..errors import HostKeyError

log = logging.getLogger("remowt.ssh")

GLOBAL_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
MARKERS = (REVOKED, CERT_AUTHORITY)
HASH_MAGIC = "|1|"
SHA1_SIZE = hashlib.sha1().digest_size
CERT_SUFFIX = "-cert-v01@openssh.com"
# The signature algorithms a key type is offered under: an ``ssh-rsa`` key is used with SHA-2 signatures.
ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}


@dataclass(frozen=True)
class Entry:
    """One valid known_hosts line: where it is, its marker (or ``""``), its host field and its key."""

    path: str
    line: int
    marker: str
    hosts: str
    key_type: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        """``ssh-ed25519 key SHA256:... (FILE:LINE)``."""
        return f"{self.key_type} key {blob_fingerprint(self.blob)} ({self.where})"


@dataclass
class KnownHosts:
    """What the known_hosts files say about one host name.

    ``entries`` are the lines that match the name; for a ``[host]:port``
    name, ``fallback`` are the other lines that match the bare ``host``,
    whose keys OpenSSH accepts when no key is recorded for ``[host]:port``.
    """

    name: str
    files: List[str]
    entries: List[Entry] = field(default_factory=list)
    fallback: List[Entry] = field(default_factory=list)
    hashed_files: Set[str] = field(default_factory=set)

    def marked(self, marker: str) -> List[Entry]:
        return [entry for entry in self.entries if entry.marker == marker]

    def consulted(self, marker: str) -> List[Entry]:
        """The lines with ``marker`` that decide: the host's, and the bare host's when no key is recorded."""
        lines = self.entries if self.marked("") else [*self.entries, *self.fallback]
        return [entry for entry in lines if entry.marker == marker]

    def revoked(self, blob: bytes) -> Optional[Entry]:
        """The ``@revoked`` line that names this key, if any."""
        return next((entry for entry in self.consulted(REVOKED) if entry.blob == blob), None)

    def recorded(self, blob: bytes) -> bool:
        """Whether this key is recorded for the host (or, when none is, for the bare host)."""
        return any(entry.blob == blob for entry in self.consulted(""))

    def algorithms(self) -> Set[str]:
        """The host key algorithms of the recorded keys, to be preferred in the handshake (as OpenSSH does)."""
        types = {entry.key_type for entry in self.marked("")}
        return {algorithm for t in types for algorithm in ALGORITHMS.get(t, (t,))}


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of ``key``."""
    return blob_fingerprint(key.asbytes())


def blob_fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def lookup(name: str, files: Sequence[str]) -> KnownHosts:
    """Read ``files`` (then the global files) and keep the lines whose host field matches ``name`` (or its host)."""
    known = KnownHosts(name, list(files))
    bare = re.fullmatch(r"\[(.*)\]:\d+", name)
    for path in [*files, *GLOBAL_FILES]:
        for entry in read_file(path):
            if entry.hosts.startswith(HASH_MAGIC):
                known.hashed_files.add(path)
            if host_matches(name, entry.hosts):
                known.entries.append(entry)
            elif bare and host_matches(bare.group(1), entry.hosts):
                known.fallback.append(entry)
    for entry in known.marked(CERT_AUTHORITY):
        log.info(
            "%s: @cert-authority line for %s skipped: remowt cannot verify host certificates "
            "(paramiko does not), so the host must be known by its own key",
            entry.where,
            name,
        )
    return known


def read_file(path: str) -> Iterator[Entry]:
    """The valid lines of the known_hosts file at ``path`` (none if it does not exist); bad lines are logged."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("cannot read known_hosts file %s: %s", path, e)
        return
    for number, text in enumerate(lines, 1):
        try:
            entry = parse_line(text, path, number)
        except ValueError as e:
            log.warning("%s:%d: bad known_hosts line skipped: %s", path, number, e)
            continue
        if entry is not None:
            yield entry


def parse_line(text: str, path: str, number: int) -> Optional[Entry]:
    """The entry on one known_hosts line; None for a blank or comment line; ``ValueError`` saying what is bad."""
    fields = text.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = ""
    if fields[0].startswith("@"):
        marker = fields.pop(0)
        if marker not in MARKERS:
            raise ValueError(f"unknown marker {marker!r}")
    if len(fields) < 3:
        raise ValueError("expected [marker] hosts key-type base64-key [comment]")
    hosts, key_type, data = fields[:3]
    if hosts.startswith("|"):
        _hashed_name(hosts)
    return Entry(path, number, marker, hosts, *_key(key_type, data))


def _key(key_type: str, data: str) -> Tuple[str, bytes]:
    """The type and canonical blob of the key written as ``key_type data``; ``ValueError`` if it is not one."""
    try:
        blob = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ValueError(f"the key is not valid base64: {data[:20]!r}...") from None
    blob_type = _blob_type(blob)
    if blob_type != _plain_type(key_type):
        raise ValueError(f"the key is of type {blob_type!r}, not {key_type!r}")
    if blob_type.endswith(CERT_SUFFIX):
        return blob_type, blob  # recorded, as OpenSSH has it, but never equal to a host key paramiko gets
    try:
        key = paramiko.PKey.from_type_string(blob_type, blob)
    except UnknownKeyType:
        return blob_type, blob  # a type paramiko lacks (ssh-dss): recorded, never offered
    except Exception as e:  # what each key class raises for bad key material differs
        raise ValueError(f"not a valid {blob_type} key: {e or type(e).__name__}") from None
    if key.asbytes() != blob:  # paramiko pads a truncated blob with zeros and ignores trailing bytes
        raise ValueError(f"not a valid {blob_type} key: truncated, or with trailing bytes")
    return key.get_name(), blob


def _blob_type(blob: bytes) -> str:
    """The key type a public key blob starts with; ``ValueError`` if it does not start with one."""
    size = int.from_bytes(blob[:4], "big")
    name = blob[4 : 4 + size]
    if len(blob) < 4 or len(name) < size or not name.isascii():
        raise ValueError("the key is not an ssh public key blob")
    return name.decode("ascii")


def _plain_type(key_type: str) -> str:
    """The key type behind a signature algorithm name (``rsa-sha2-512`` is an ``ssh-rsa`` key)."""
    return next((t for t, algorithms in ALGORITHMS.items() if key_type in algorithms), key_type)


def _hashed_name(hosts: str) -> Tuple[bytes, bytes]:
    """Salt and HMAC-SHA1 of a hashed host field ``|1|salt|hash``; ``ValueError`` if it is malformed."""
    parts = hosts.split("|")
    if len(parts) == 4 and parts[:2] == ["", "1"]:
        with contextlib.suppress(binascii.Error):
            salt, digest = (base64.b64decode(part, validate=True) for part in parts[2:])
            if len(salt) == len(digest) == SHA1_SIZE:
                return salt, digest
    raise ValueError(f"bad hashed host name {hosts!r}")


def host_matches(name: str, hosts: str) -> bool:
    """Whether the host field ``hosts`` names ``name``: a hashed name, or a pattern list none of whose negations match.

    ``name`` is ``host`` or ``[host]:port``; names are compared without case.
    """
    name = name.lower()
    if hosts.startswith("|"):
        salt, digest = _hashed_name(hosts)
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
    matched = False
    for pattern in hosts.lower().split(","):
        negated = pattern.startswith("!")
        if _wildcard_match(name, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


def _wildcard_match(name: str, pattern: str) -> bool:
    """OpenSSH's pattern match: ``*`` is any run of characters, ``?`` any one; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


def hash_name(name: str, salt: Optional[bytes] = None) -> str:
    """``name`` as a hashed known_hosts host field (``|1|salt|hash``), with a new salt unless one is given."""
    salt = os.urandom(SHA1_SIZE) if salt is None else salt
    digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return f"{HASH_MAGIC}{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def check(known: KnownHosts, key: paramiko.PKey, policy: str, *, hash_names: bool = False) -> Optional[str]:
    """Accept ``key`` for ``known.name`` or raise :class:`HostKeyError`; return the file a new key was added to.

    A new key is written hashed when ``hash_names`` (HashKnownHosts) or when
    the file already holds hashed names.
    """
    blob = key.asbytes()
    revoked = known.revoked(blob)
    if revoked is not None:
        raise _revoked(known, key, revoked)
    if known.recorded(blob):
        return None
    if policy == "insecure-accept-any":
        log.warning(
            "accepting %s for %s without checking (host_key_policy='insecure-accept-any')", _offered(key), known.name
        )
        return None
    if known.marked(""):
        raise _changed(known, key)
    if policy == "accept-new":
        path = known.files[0] if known.files else os.path.expanduser("~/.ssh/known_hosts")
        record(known.name, key, path, hashed=hash_names or path in known.hashed_files)
        log.warning("permanently added %s for %s to %s", _offered(key), known.name, path)
        return path
    raise _unknown(known, key)


def _offered(key: paramiko.PKey) -> str:
    return f"{key.get_name()} key {fingerprint(key)}"


def _error(known: KnownHosts, key: paramiko.PKey, message: str) -> HostKeyError:
    return HostKeyError(message, host=known.name, key_type=key.get_name(), fingerprint=fingerprint(key))


def _revoked(known: KnownHosts, key: paramiko.PKey, entry: Entry) -> HostKeyError:
    return _error(
        known,
        key,
        f"host key for {known.name} is REVOKED: the server offered {_offered(key)}, which {entry.where} marks "
        "@revoked. Someone may be using a stolen key to impersonate the host, so it is refused under every "
        "policy. Do not connect; ask the host's administrator for its new key.",
    )


def _changed(known: KnownHosts, key: paramiko.PKey) -> HostKeyError:
    recorded = known.marked("")
    note = ""
    if all(entry.key_type != key.get_name() for entry in recorded):
        note = f" (none of type {key.get_name()}: the server offered no recorded type that remowt can use)"
    files = sorted({entry.path for entry in recorded})
    remove = "; ".join(f"ssh-keygen -f '{path}' -R '{known.name}'" for path in files)
    return _error(
        known,
        key,
        f"host key for {known.name} has CHANGED: the server offered {_offered(key)}, but known_hosts records "
        f"{'; '.join(entry.describe() for entry in recorded)}{note}. Someone could be intercepting the "
        f"connection. If the host's key really changed, remove the old entries ({remove}) and connect again.",
    )


def _unknown(known: KnownHosts, key: paramiko.PKey) -> HostKeyError:
    where = ", ".join(known.files) or "(no known_hosts file)"
    authorities = ", ".join(entry.where for entry in known.marked(CERT_AUTHORITY))
    note = ""
    if authorities:
        note = f" Its @cert-authority lines ({authorities}) cannot be used: remowt does not verify host certificates."
    return _error(
        known,
        key,
        f"host {known.name} is not known: it offered {_offered(key)}, which is not in {where}.{note} Check the "
        "fingerprint, then pass host_key_policy='accept-new' to trust it on first use, or add it to known_hosts.",
    )


def record(name: str, key: paramiko.PKey, path: str, *, hashed: bool = False) -> None:
    """Append ``key`` for ``name`` to the known_hosts file at ``path``, the name hashed if ``hashed``."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    host = hash_name(name) if hashed else name.lower()
    line = f"{host} {key.get_name()} {key.get_base64()}\n"
    with open(path, "a", encoding="ascii") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")
        f.write(line)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
