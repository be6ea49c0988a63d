"""Host key checking against known_hosts files, with explicit trust policies.

- ``reject`` (the default): only keys already in known_hosts are accepted.
- ``accept-new``: an unknown host's key is recorded and accepted (trust on
  first use); a key that differs from the recorded one is still refused.
- ``insecure-accept-any``: anything is accepted, with a warning in the log.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from typing import Dict, List, Optional

import paramiko

from ..errors import HostKeyError

log = logging.getLogger("remowt.ssh")


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of ``key``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_keys(name: str, files: List[str]) -> Dict[str, paramiko.PKey]:
    """The keys recorded for ``name`` (``host`` or ``[host]:port``) in ``files``, by key type."""
    found: Dict[str, paramiko.PKey] = {}
    for path in [*files, "/etc/ssh/ssh_known_hosts"]:
        if not os.path.isfile(path):
            continue
        keys = paramiko.HostKeys()
        try:
            keys.load(path)
        except (OSError, paramiko.SSHException) as e:
            log.warning("cannot read known_hosts file %s: %s", path, e)
            continue
        for key_type, key in (keys.lookup(name) or {}).items():
            found.setdefault(key_type, key)
    return found


def check(name: str, key: paramiko.PKey, files: List[str], policy: str) -> Optional[str]:
    """Accept ``key`` for ``name`` or raise :class:`HostKeyError`; return the file a new key was added to."""
    known = known_keys(name, files)
    offered = f"{key.get_name()} key {fingerprint(key)}"
    if known.get(key.get_name()) == key:
        return None
    if policy == "insecure-accept-any":
        log.warning("accepting %s for %s without checking (host_key_policy='insecure-accept-any')", offered, name)
        return None
    where = ", ".join(files) or "(no known_hosts file)"
    if known:
        recorded = "; ".join(f"{t} key {fingerprint(k)}" for t, k in known.items())
        raise HostKeyError(
            f"host key for {name} has CHANGED: the server offered {offered}, but {where} records {recorded}. "
            "Someone could be intercepting the connection. If the host's key really changed, remove the old "
            f"entry (ssh-keygen -R '{name}') and connect again.",
            host=name,
            key_type=key.get_name(),
            fingerprint=fingerprint(key),
        )
    if policy == "accept-new":
        path = files[0] if files else os.path.expanduser("~/.ssh/known_hosts")
        record(name, key, path)
        log.warning("permanently added %s for %s to %s", offered, name, path)
        return path
    raise HostKeyError(
        f"host {name} is not known: it offered {offered}, which is not in {where}. Check the fingerprint, then "
        "pass host_key_policy='accept-new' to trust it on first use, or add it to known_hosts.",
        host=name,
        key_type=key.get_name(),
        fingerprint=fingerprint(key),
    )


def record(name: str, key: paramiko.PKey, path: str) -> None:
    """Append ``key`` for ``name`` to the known_hosts file at ``path``."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    with open(path, "a", encoding="ascii") as f:
        if f.tell() and not _ends_with_newline(path):
            f.write("\n")
        f.write(line)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
