"""Exceptions raised by remowt."""

from __future__ import annotations

import errno as _errno
from typing import Optional, Tuple


class RemowtError(Exception):
    """Base class of every error remowt raises itself."""


class ProtocolError(RemowtError):
    """A peer sent something that is not valid remowt protocol."""


class ConnectionLost(RemowtError, ConnectionError):
    """The link a call or stream depended on is gone."""


class Unreachable(RemowtError):
    """No route is known to the destination address."""


class MessageTooLarge(RemowtError, ValueError):
    """A call or notification is bigger than the peer accepts (its frame limit); nothing was sent."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class RemoteError(RemowtError):
    """A call failed on the remote side; ``kind`` says how."""

    kind = "remote"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownMethod(RemoteError):
    """The remote side has no such namespace or method."""

    kind = "unknown-method"


class BadArguments(RemoteError):
    """The remote side could not validate the call's arguments."""

    kind = "bad-arguments"


class ResultTooLarge(RemoteError):
    """The remote handler's result is bigger than the caller accepts (its frame limit)."""

    kind = "result-too-large"


class InternalError(RemoteError):
    """The remote handler raised an unexpected exception."""

    kind = "internal"


class EscalationError(RemoteError):
    """Starting the privileged agent failed: no tool, failed authentication, or a cancelled prompt."""

    kind = "escalation"


class PluginError(RemoteError):
    """A plugin could not be loaded or unloaded: an unknown name, one that ended before its handshake, …"""

    kind = "plugin"


class SystemdError(RemoteError):
    """systemd refused or failed a request (the message is systemctl's, naming the unit)."""

    kind = "systemd"


class NoSuchUnit(SystemdError):
    """The unit (or unit file) does not exist."""

    kind = "no-such-unit"


class AccessDenied(SystemdError):
    """systemd refused the request to this user; the privileged agent (``conn.privileged.systemd``) may do it."""

    kind = "access-denied"


class JobFailed(SystemdError):
    """A job did not end ``done``: ``result`` is systemd's job result, ``unit_result`` the unit's ``Result``."""

    kind = "job-failed"

    def __init__(
        self, message: str, *, unit: str = "", verb: str = "", result: str = "", unit_result: str = ""
    ) -> None:
        super().__init__(message)
        self.unit = unit
        self.verb = verb
        self.result = result
        self.unit_result = unit_result


REMOTE_ERRORS = {
    cls.kind: cls
    for cls in (
        RemoteError,
        UnknownMethod,
        BadArguments,
        ResultTooLarge,
        InternalError,
        EscalationError,
        SystemdError,
        NoSuchUnit,
        AccessDenied,
        PluginError,
    )
}


def os_name_text(name: object) -> str:
    """A file name or argument as text that any peer can carry: bytes that are not UTF-8 written as ``\\xff``."""
    if isinstance(name, str):
        try:
            data = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no decoding made
            data = name.encode("utf-8", "backslashreplace")
    elif isinstance(name, bytes):
        data = name
    else:
        return str(name)
    return data.decode("utf-8", "backslashreplace")


def remote_os_error(errno: int, message: str, filename: Optional[str]) -> OSError:
    """Rebuild an ``OSError`` (with its subclass chosen by errno) raised remotely."""
    strerror = message or _errno.errorcode.get(errno, "error")
    if filename is None:
        return OSError(errno, strerror)
    return OSError(errno, strerror, filename)


class SshError(RemowtError):
    """Reaching or logging in to an ssh host failed; the message says why and what to do."""


class HostKeyError(SshError):
    """The host's key is unknown or differs from known_hosts; ``fingerprint`` is the offered key's SHA256."""

    def __init__(self, message: str, *, host: str, key_type: str, fingerprint: str) -> None:
        super().__init__(message)
        self.host = host
        self.key_type = key_type
        self.fingerprint = fingerprint


class AuthenticationError(SshError):
    """No authentication method was accepted; ``tried`` lists what was tried."""

    def __init__(self, message: str, *, tried: Tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tried = tried
