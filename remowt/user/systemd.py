"""``conn.systemd``: a node's systemd, with typed results and errors (see :mod:`remowt.endpoints.systemd`).

``conn.systemd`` manages the system manager as the agent's user may (list,
properties, its own ``--user`` manager through ``.user``);
``conn.privileged.systemd`` as root. A refusal is
:class:`~remowt.errors.AccessDenied`, whose message says to use
``conn.privileged``; a job that does not end ``done`` is
:class:`~remowt.errors.JobFailed` with systemd's job result.

The journal is ``journalctl -o json`` run on the node through the subprocess
service: its flow control, its kill on close and on a lost link are the
subprocess service's (:class:`Journal`).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence

import msgspec

from ..endpoints.systemd import JobOutcome, JobSpec, SystemdApi, TransientSpec, UnitState, Verb, check_unit_name
from ..errors import ConnectionLost, JobFailed, SystemdError
from . import popen as _popen

if TYPE_CHECKING:
    from .node import Node

__all__ = ["JobOutcome", "Journal", "JournalEntry", "Systemd", "UnitState", "UnitStatus"]
#: What a call that is not a job waits for beyond its own timeout: the round trip.
MARGIN = 10.0


class UnitStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A unit at a glance (``systemctl status``'s first lines), from its properties."""

    unit: str
    description: str
    load: str
    active: str
    sub: str
    result: str
    main_pid: int
    unit_file_state: str
    fragment_path: str


_STATUS = {
    "description": "Description",
    "load": "LoadState",
    "active": "ActiveState",
    "sub": "SubState",
    "result": "Result",
    "main_pid": "MainPID",
    "unit_file_state": "UnitFileState",
    "fragment_path": "FragmentPath",
}


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One journal entry: its ``message`` (text; bytes that are not UTF-8 replaced), when, who, and every field."""

    message: str
    realtime_us: int
    priority: int
    pid: int
    unit: str
    cursor: str
    fields: Dict[str, Any]


class Systemd:
    """A node's systemd manager (``user``: its user's ``--user`` manager); ``conn.systemd``."""

    def __init__(self, node: Node, user: bool = False) -> None:
        self.node = node
        self.is_user = user

    def __repr__(self) -> str:
        return f"<Systemd {'--user ' if self.is_user else ''}of {self.node.description}>"

    @property
    def user(self) -> Systemd:
        """The ``--user`` manager of the node's user (a ``SystemdError`` at first use if it has none)."""
        return Systemd(self.node, user=True)

    def _api(self, timeout: Optional[float]) -> SystemdApi:
        """The service's proxy, waiting for an answer ``timeout`` s and the round trip (None: call_timeout)."""
        call_timeout = self.node.call_timeout
        if timeout is None or call_timeout is None:
            return self.node.service(SystemdApi, call_timeout)
        return self.node.service(SystemdApi, timeout + max(call_timeout, MARGIN))

    def units(self, *patterns: str, all: bool = False) -> List[UnitState]:
        """The units loaded (``all``: inactive ones too) matching the glob ``patterns`` (none: every unit)."""
        return self._api(None).list_units(list(patterns), all, self.is_user)

    def properties(self, unit: str, *names: str) -> Dict[str, str]:
        """``unit``'s properties as text (``names``: only those); ``NoSuchUnit`` if systemd has none by that name."""
        return self._api(None).properties(unit, list(names), self.is_user)

    def status(self, unit: str) -> UnitStatus:
        """``unit`` at a glance; ``NoSuchUnit`` if it does not exist."""
        values = self.properties(unit, "Id", *_STATUS.values())
        main_pid = values.get("MainPID", "0")
        fields: Dict[str, Any] = {field: values.get(name, "") for field, name in _STATUS.items()}
        fields["main_pid"] = int(main_pid) if main_pid.isdigit() else 0
        return UnitStatus(unit=values.get("Id") or unit, **fields)

    def job(self, verb: Verb, unit: str, timeout: float = 90.0) -> JobOutcome:
        """Run ``systemctl VERB UNIT`` and wait for the job (``timeout`` s; then ``TimeoutError``, the job goes on).

        A job that does not end ``done`` raises :class:`~remowt.errors.JobFailed`.
        """
        outcome = self._api(timeout).job(JobSpec(verb=verb, unit=unit, timeout=timeout, user=self.is_user))
        if outcome.result != "done":
            raise JobFailed(
                f"{verb} {unit}: job {outcome.result} (unit result {outcome.unit_result}): "
                + (outcome.message.splitlines() or ["no message"])[0],
                unit=unit,
                verb=verb,
                result=outcome.result,
                unit_result=outcome.unit_result,
            )
        return outcome

    def start(self, unit: str, timeout: float = 90.0) -> JobOutcome:
        """Start ``unit`` and wait for the job; see :meth:`job`."""
        return self.job("start", unit, timeout)

    def stop(self, unit: str, timeout: float = 90.0) -> JobOutcome:
        """Stop ``unit`` and wait for the job; see :meth:`job`."""
        return self.job("stop", unit, timeout)

    def restart(self, unit: str, timeout: float = 90.0) -> JobOutcome:
        """Restart ``unit`` and wait for the job; see :meth:`job`."""
        return self.job("restart", unit, timeout)

    def reload(self, unit: str, timeout: float = 90.0) -> JobOutcome:
        """Reload ``unit``'s configuration and wait for the job; see :meth:`job`."""
        return self.job("reload", unit, timeout)

    def enable(self, *units: str, now: bool = False) -> None:
        """Enable the units' unit files (``now``: start them too)."""
        self._api(90.0).enable(list(units), True, now, self.is_user)

    def disable(self, *units: str, now: bool = False) -> None:
        """Disable the units' unit files (``now``: stop them too)."""
        self._api(90.0).enable(list(units), False, now, self.is_user)

    def daemon_reload(self) -> None:
        """Have the manager read its unit files again."""
        self._api(90.0).daemon_reload(self.is_user)

    def run(
        self,
        argv: Sequence[str],
        *,
        unit: Optional[str] = None,
        properties: Optional[Mapping[str, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        description: Optional[str] = None,
        collect: bool = False,
        timeout: float = 30.0,
    ) -> str:
        """``systemd-run``: ``argv`` as a transient service in a cgroup of its own; its unit name.

        systemd runs it, not the agent: it outlives the connection, and a new
        connection finds it by name. ``unit`` None: ``remowt-run-<random>.service``.
        """
        name = unit or f"remowt-run-{secrets.token_hex(6)}.service"
        spec = TransientSpec(
            unit=name,
            argv=list(argv),
            properties=dict(properties or {}),
            env=dict(env or {}),
            cwd=cwd,
            description=description,
            collect=collect,
            user=self.is_user,
            timeout=timeout,
        )
        self._api(timeout).run(spec)
        return name

    def scope(self, argv: Sequence[str], *, unit: Optional[str] = None, **popen_kwargs: Any) -> _popen.Popen:
        """``systemd-run --scope``: ``argv`` as the node's child (a :class:`~remowt.user.popen.Popen`) in its own scope.

        The scope is a cgroup of its own, named ``unit`` (None:
        ``remowt-scope-<random>.scope``); the process is a child like any
        other (its stdio, its wait, killed when the connection ends).
        """
        name = check_unit_name(unit or f"remowt-scope-{secrets.token_hex(6)}.scope")
        options = ["--scope", "--quiet", "--no-ask-password", f"--unit={name}"]
        command = ["systemd-run", *self._manager_flag(), *options, "--", *argv]
        return self.node.Popen(command, **popen_kwargs)

    def journal(self, unit: str, *, lines: Optional[int] = None, follow: bool = False) -> Journal:
        """``unit``'s journal entries (the last ``lines``; None: all), and with ``follow`` new ones until closed."""
        check_unit_name(unit)
        if lines is not None and lines < 0:
            raise ValueError(f"lines must be >= 0, got {lines}")
        argv = ["journalctl", "-o", "json", "--no-pager", "--quiet"]
        argv += [f"--user-unit={unit}" if self.is_user else f"--unit={unit}"]
        argv += [f"--lines={lines}"] if lines is not None else []
        argv += ["--follow"] if follow else []
        return Journal(self.node.Popen(argv, stdout=_popen.PIPE, stderr=_popen.PIPE, bufsize=0), unit)

    def _manager_flag(self) -> List[str]:
        return ["--user"] if self.is_user else []


class Journal:
    """Journal entries as they come (iterate); a context manager. :meth:`close` ends a follow at once.

    The caller's thread waits on the output stream of ``journalctl`` on the
    node: a Ctrl-C stops the waiting only (closing ends journalctl), a lost
    link ends the iteration with ``ConnectionLost``. One thread reads; any
    thread may close.
    """

    def __init__(self, process: _popen.Popen, unit: str) -> None:
        self.process = process
        self.unit = unit
        self._buffer = b""
        self._lock = threading.Lock()
        self._reading = False
        self._closing = False
        self._pipes_closed = False

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[JournalEntry]:
        while True:
            entry = self.next_entry()
            if entry is None:
                return
            yield entry

    def next_entry(self) -> Optional[JournalEntry]:
        """The next entry, waiting for it; None at the end (journalctl ended: no follow, or closed)."""
        with self._lock:
            if self._closing:
                return None
            self._reading = True
        try:
            return self._next_entry()
        finally:
            with self._lock:
                self._reading = False
                close_pipes = self._closing
            if close_pipes:  # close() came meanwhile and left the pipes to this reader
                self._close_pipes()

    def _next_entry(self) -> Optional[JournalEntry]:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = stdout.read(65536)
            if not chunk:
                self._ended()
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return _entry(line)

    def _ended(self) -> None:
        """journalctl's output ended: a failure of journalctl (not a close) is a SystemdError with what it said."""
        returncode = self.process.wait()
        if returncode > 0:
            assert self.process.stderr is not None
            said = self.process.stderr.read().decode(errors="replace").strip()
            raise SystemdError(f"journalctl for {self.unit} failed ({returncode}): {said or 'no message'}")

    def close(self) -> None:
        """End journalctl (if it still runs): a reader waiting in :meth:`next_entry` gets None."""
        with self._lock:
            self._closing = True
            reading = self._reading
        with contextlib.suppress(ConnectionLost):  # the link went, and journalctl with it
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        if not reading:
            self._close_pipes()

    def _close_pipes(self) -> None:
        with self._lock:
            if self._pipes_closed:
                return
            self._pipes_closed = True
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def _text(value: Any) -> str:
    """A journal field's value as text: journalctl writes a non-UTF-8 value as a list of byte values."""
    if isinstance(value, list):
        return bytes(v for v in value if isinstance(v, int)).decode(errors="replace")
    return "" if value is None else str(value)


def _number(value: Any) -> int:
    text = _text(value)
    return int(text) if text.isdigit() else 0


def _entry(line: bytes) -> JournalEntry:
    try:
        fields = msgspec.json.decode(line, type=Dict[str, Any])
    except msgspec.DecodeError as e:
        raise SystemdError(f"journalctl wrote a line that is not JSON ({e}): {line[:200]!r}") from None
    return JournalEntry(
        message=_text(fields.get("MESSAGE")),
        realtime_us=_number(fields.get("__REALTIME_TIMESTAMP")),
        priority=_number(fields.get("PRIORITY", "6")),
        pid=_number(fields.get("_PID")),
        unit=_text(fields.get("UNIT") or fields.get("USER_UNIT") or fields.get("_SYSTEMD_UNIT")),
        cursor=_text(fields.get("__CURSOR")),
        fields=fields,
    )
