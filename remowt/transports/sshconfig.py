"""Where and how to reach an ssh host: ``~/.ssh/config`` merged with the caller's arguments.

Pure code: it reads the config file and the environment, nothing else.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import paramiko

from ..errors import SshError

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
HOST_KEY_POLICIES = ("reject", "accept-new", "insecure-accept-any")
DEFAULT_CONNECT_TIMEOUT = 15.0


@dataclass(frozen=True)
class Jump:
    """One ProxyJump hop as written: ``[user@]host[:port]``."""

    host: str
    user: Optional[str] = None
    port: Optional[int] = None


@dataclass
class SshTarget:
    """Everything needed to open one ssh connection."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: List[str] = field(default_factory=list)
    identities_only: bool = False
    proxy_jump: List[Jump] = field(default_factory=list)
    proxy_command: Optional[str] = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    keepalive_interval: float = 0.0
    keepalive_count: int = 3
    known_hosts: List[str] = field(default_factory=list)
    host_key_policy: str = "reject"
    hash_known_hosts: bool = False

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files use for this host: ``host`` or ``[host]:port``."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def parse_jumps(spec: str) -> List[Jump]:
    """Parse a ProxyJump value (``a,user@b:2222``); ``none`` means no jump."""
    if spec.strip().lower() == "none":
        return []
    jumps = []
    for part in spec.split(","):
        part = part.strip()
        if part.startswith("ssh://"):
            part = part[len("ssh://") :]
        user: Optional[str] = None
        port: Optional[int] = None
        if "@" in part:
            user, part = part.rsplit("@", 1)
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest.startswith(":"):
                port = _port(rest[1:], f"ProxyJump {spec!r}")
        elif part.count(":") == 1:
            host, port_text = part.split(":")
            port = _port(port_text, f"ProxyJump {spec!r}")
        else:
            host = part
        if not host:
            raise SshError(f"ProxyJump {spec!r} has an empty host")
        jumps.append(Jump(host, user or None, port))
    return jumps


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise SshError(f"{what}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise SshError(f"{what}: port {port} is out of range")
    return port


def _seconds(text: Optional[str], what: str, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SshError(f"ssh config {what} {text!r} is not a number of seconds") from None
    return value if value > 0 else default


def load_config(path: Optional[PathLike]) -> paramiko.SSHConfig:
    """The ssh config at ``path``, or ``~/.ssh/config`` if it exists, or an empty one."""
    if path is None:
        default = os.path.expanduser("~/.ssh/config")
        return paramiko.SSHConfig.from_path(default) if os.path.exists(default) else paramiko.SSHConfig()
    path = os.fspath(path)
    if not os.path.exists(path) or os.path.isdir(path):
        raise SshError(f"ssh config file {path!r} does not exist")
    try:
        return paramiko.SSHConfig.from_path(path)
    except Exception as e:
        raise SshError(f"cannot read ssh config {path!r}: {e}") from None


def resolve(
    host: str,
    config: paramiko.SSHConfig,
    *,
    port: Optional[int] = None,
    user: Optional[str] = None,
    key_filename: Union[PathLike, Sequence[PathLike], None] = None,
    known_hosts: Union[PathLike, Sequence[PathLike], None] = None,
    host_key_policy: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    keepalive_interval: Optional[float] = None,
) -> SshTarget:
    """Merge the config entry for ``host`` with explicit arguments (which win)."""
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise SshError(f"bad host name {host!r}")
    if "@" in host and user is None:
        user, host = host.rsplit("@", 1)
    entry = config.lookup(host)
    if port is not None:
        port = _port(str(port), f"host {host!r}")
    resolved_port = port or _port(entry.get("port", "22"), f"ssh config Port for {host!r}")
    identities = _paths(key_filename) if key_filename is not None else list(entry.get("identityfile", []))
    if not identities:
        identities = [os.path.expanduser(f"~/.ssh/{name}") for name in DEFAULT_IDENTITIES]
        identities = [p for p in identities if os.path.exists(p)]
    policy = host_key_policy or _policy_from_config(entry.get("stricthostkeychecking"))
    if policy not in HOST_KEY_POLICIES:
        raise ValueError(f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, got {policy!r}")
    if known_hosts is not None:
        known = _paths(known_hosts)
    elif "userknownhostsfile" in entry:
        known = [os.path.expanduser(p) for p in entry["userknownhostsfile"].split()]
    else:
        known = [os.path.expanduser("~/.ssh/known_hosts")]
    proxy_command = entry.get("proxycommand")
    if proxy_command is not None and proxy_command.strip().lower() == "none":
        proxy_command = None
    return SshTarget(
        alias=host,
        hostname=entry.get("hostname", host),
        port=resolved_port,
        user=user or entry.get("user") or getpass.getuser(),
        identity_files=identities,
        identities_only=key_filename is not None or entry.get("identitiesonly", "no").lower() == "yes",
        proxy_jump=parse_jumps(entry["proxyjump"]) if "proxyjump" in entry else [],
        proxy_command=proxy_command,
        connect_timeout=connect_timeout
        if connect_timeout is not None
        else _seconds(entry.get("connecttimeout"), "ConnectTimeout", DEFAULT_CONNECT_TIMEOUT),
        keepalive_interval=keepalive_interval
        if keepalive_interval is not None
        else _seconds(entry.get("serveraliveinterval"), "ServerAliveInterval", 0.0),
        keepalive_count=int(_seconds(entry.get("serveralivecountmax"), "ServerAliveCountMax", 3)),
        known_hosts=known,
        host_key_policy=policy,
        hash_known_hosts=entry.get("hashknownhosts", "no").lower() == "yes",
    )


def jump_target(via: SshTarget, config: paramiko.SSHConfig) -> SshTarget:
    """The last ProxyJump hop of ``via``: its own config entry with the hop's user and port.

    Earlier hops of the list become that hop's own jumps (``a,b`` reaches
    ``b`` through ``a``), as OpenSSH does.
    """
    jump = via.proxy_jump[-1]
    target = resolve(
        jump.host,
        config,
        port=jump.port,
        user=jump.user,
        known_hosts=via.known_hosts,
        host_key_policy=via.host_key_policy,
        connect_timeout=via.connect_timeout,
        keepalive_interval=via.keepalive_interval,
    )
    if len(via.proxy_jump) > 1:
        target.proxy_jump = via.proxy_jump[:-1]
        target.proxy_command = None
    return target


def _paths(value: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.path.expanduser(os.fspath(value))]
    return [os.path.expanduser(os.fspath(v)) for v in value]


def _policy_from_config(value: Optional[str]) -> str:
    """Map StrictHostKeyChecking to a policy; changed keys are refused under all of them."""
    if value is None:
        return "reject"
    value = value.lower()
    if value in ("accept-new", "no", "off"):
        return "accept-new"
    return "reject"
