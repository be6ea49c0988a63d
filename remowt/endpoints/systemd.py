"""The systemd service: units of the serving node's system manager, or of its user's ``--user`` manager.

Served by the agent and the privileged agent alike: the unprivileged agent
manages what its user may (its ``--user`` manager, and reads of the system
manager); a system unit's start, stop or enable is the privileged agent's,
and systemd's refusal says so (:class:`~remowt.errors.AccessDenied`).

It drives ``systemctl`` and ``systemd-run`` with machine-readable output
(``list-units -o json``, ``show`` as ``key=value`` lines), not D-Bus: the
target then needs no D-Bus library (the agent is remowt and msgspec only),
``systemctl`` already waits for a job and reports its result, and the
``--user`` manager is one option. Each call runs one such command in the
worker pool, bounded by its timeout; every name reaches the command after
``--`` (never as an option). The journal is ``journalctl -o json``'s output,
read by the caller through the subprocess service (see
:mod:`remowt.user.systemd`).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
from typing import Dict, List, Literal, Optional, Set, Tuple

import msgspec

from ..errors import AccessDenied, BadArguments, NoSuchUnit, SystemdError
from ..protocol.service import Service, rpc
from ..runtime.real_subprocess import Popen as LocalPopen
from .watchdog import Watchdog

Verb = Literal["start", "stop", "restart", "reload", "try-restart", "reload-or-restart"]
#: systemctl's words for a job that did not end ``done`` (systemd 252, ``bus-wait-for-jobs.c``; checked against
#: the strings of its libsystemd-shared), by job result.
_JOB_RESULTS = (
    ("canceled", re.compile(r"^Job for \S+ canceled\.", re.M)),
    ("timeout", re.compile(r"^Job for \S+ timed out\.", re.M)),
    ("dependency", re.compile(r"^A dependency job for \S+ failed\.", re.M)),
    ("invalid", re.compile(r"^\S+ is not active, cannot reload\.", re.M)),
    ("assert", re.compile(r"^Assertion failed on job for \S+\.", re.M)),
    ("unsupported", re.compile(r"^Operation on or unit type of \S+ not supported", re.M)),
    ("collected", re.compile(r"^Queued job for \S+ was garbage collected\.", re.M)),
    ("once", re.compile(r"^Unit \S+ was started already once", re.M)),
    ("failed", re.compile(r"^Job for \S+ failed", re.M)),
)
_NOT_FOUND = re.compile(r"Unit (file )?\S+ (not found|does not exist|not loaded)")
_DENIED = re.compile(r"Access denied|Interactive authentication required|Permission denied")
MAX_NAME = 256


class UnitState(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One unit as ``systemctl list-units`` lists it."""

    unit: str
    load: str
    active: str
    sub: str
    description: str = ""


class JobSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``systemctl VERB UNIT``, waiting for the job at most ``timeout`` seconds; ``user``: the ``--user`` manager."""

    verb: Verb
    unit: str
    timeout: float = 90.0
    user: bool = False


class JobOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a job ended: ``result`` is systemd's job result (``done``, ``failed``, ``timeout``, ``dependency`` …).

    ``unit_result`` is the unit's ``Result`` afterwards (``success``,
    ``exit-code``, ``signal`` …; empty once the unit was unloaded, as a
    stopped transient unit is), ``active`` its ``ActiveState``, and
    ``message`` what systemctl said (empty for ``done``).
    """

    unit: str
    verb: str
    result: str
    unit_result: str
    active: str
    message: str = ""


class TransientSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``systemd-run --unit=UNIT``: ``argv`` as a transient service in its own cgroup, outliving the caller.

    ``properties`` are unit properties (``-p NAME=VALUE``), ``env`` the
    service's environment, ``cwd`` its working directory; ``collect``
    unloads the unit once it ended, even failed.
    """

    unit: str
    argv: List[str]
    properties: Dict[str, str] = {}
    env: Dict[str, str] = {}
    cwd: Optional[str] = None
    description: Optional[str] = None
    collect: bool = False
    user: bool = False
    timeout: float = 30.0


class SystemdApi(Service, namespace=60):
    """Units of the serving node's systemd (``user``: its user's ``--user`` manager)."""

    @rpc(1)
    def list_units(self, patterns: List[str], all: bool, user: bool) -> List[UnitState]:
        """The units loaded (``all``: also inactive ones) whose names match ``patterns`` (none: every unit)."""
        raise NotImplementedError

    @rpc(2)
    def properties(self, unit: str, names: List[str], user: bool) -> Dict[str, str]:
        """``unit``'s properties as ``systemctl show`` gives them (``names``: only those); NoSuchUnit if not found."""
        raise NotImplementedError

    @rpc(3)
    def job(self, spec: JobSpec) -> JobOutcome:
        """Run the job and wait for its result (a ``TimeoutError`` past ``spec.timeout``: systemd keeps the job)."""
        raise NotImplementedError

    @rpc(4)
    def enable(self, units: List[str], enable: bool, now: bool, user: bool) -> None:
        """``systemctl enable`` (``enable`` False: ``disable``) the units; ``now``: start (stop) them too."""
        raise NotImplementedError

    @rpc(5)
    def daemon_reload(self, user: bool) -> None:
        """``systemctl daemon-reload``: the manager reads its unit files again."""
        raise NotImplementedError

    @rpc(6)
    def run(self, spec: TransientSpec) -> None:
        """Start ``spec.argv`` as the transient service ``spec.unit`` (returns once it started)."""
        raise NotImplementedError


def check_unit_name(name: str) -> str:
    """``name`` if it can be a unit name (or pattern), else ``BadArguments`` saying why."""
    if not name or len(name) > MAX_NAME or name.startswith("-") or any(c in name for c in "\0\n/"):
        rule = f"1 to {MAX_NAME} characters, no '/', NUL, newline or leading '-'"
        raise BadArguments(f"not a unit name: {name!r} ({rule})")
    return name


def manager_env(user: bool) -> Dict[str, str]:
    """The environment systemctl needs: for ``--user``, the user's runtime dir (SystemdError if there is none)."""
    env = dict(os.environ)
    env["SYSTEMD_COLORS"] = "0"
    env["LC_ALL"] = "C.UTF-8"  # the messages _JOB_RESULTS and _error read, untranslated
    env["SYSTEMD_PAGER"] = ""
    if user:
        runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        if not os.path.exists(os.path.join(runtime, "systemd", "private")):
            raise SystemdError(f"uid {os.getuid()} has no --user manager (no {runtime}/systemd/private)")
        env["XDG_RUNTIME_DIR"] = runtime
    return env


class Systemd(SystemdApi):
    """The agent's implementation: one systemctl per call, killed if the agent shuts down meanwhile.

    ``watchdog`` (the agent process has one) kills a systemctl still running if the agent dies outright.
    """

    def __init__(self, watchdog: Optional[Watchdog] = None) -> None:
        self._watchdog = watchdog
        self._lock = threading.Lock()
        self._running: Set[LocalPopen] = set()
        self._closed = False

    def list_units(self, patterns: List[str], all: bool, user: bool) -> List[UnitState]:
        names = [check_unit_name(p) for p in patterns]
        argv = ["list-units", "--no-legend", "--plain", "-o", "json", *(["--all"] if all else []), "--", *names]
        out = self._systemctl(argv, user, 30.0, names[0] if len(names) == 1 else "")
        try:
            return msgspec.json.decode(out or "[]", type=List[UnitState])
        except msgspec.DecodeError as e:
            raise SystemdError(f"systemctl list-units gave what is not its JSON: {e}") from None

    def properties(self, unit: str, names: List[str], user: bool) -> Dict[str, str]:
        check_unit_name(unit)
        for name in names:
            if not name.isalnum():
                raise BadArguments(f"not a property name: {name!r}")
        asked = ["-p", ",".join([*names, "LoadState"])] if names else []
        out = self._systemctl(["show", *asked, "--", unit], user, 30.0, unit)
        values = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
        if values.get("LoadState") == "not-found":
            raise NoSuchUnit(f"unit {unit} not found")
        return {key: value for key, value in values.items() if not names or key in names}

    def job(self, spec: JobSpec) -> JobOutcome:
        check_unit_name(spec.unit)
        _check_timeout(spec.timeout)
        argv = ["systemctl", *_scope(spec.user), "--no-ask-password", spec.verb, "--job-mode=replace", "--", spec.unit]
        returncode, _, err = self._run(argv, spec.user, spec.timeout, spec.unit)
        result = "done"
        if returncode != 0:
            result = next((name for name, pattern in _JOB_RESULTS if pattern.search(err)), "")
            if not result:
                raise _error(f"systemctl {spec.verb} {spec.unit}", err, spec.unit)
        try:
            state = self.properties(spec.unit, ["Result", "ActiveState"], spec.user)
        except NoSuchUnit:  # unloaded once stopped (a transient unit): what is not loaded is inactive
            state = {"ActiveState": "inactive"}
        message = "" if result == "done" else err.strip()
        return JobOutcome(
            unit=spec.unit,
            verb=spec.verb,
            result=result,
            unit_result=state.get("Result", ""),
            active=state.get("ActiveState", ""),
            message=message,
        )

    def enable(self, units: List[str], enable: bool, now: bool, user: bool) -> None:
        names = [check_unit_name(u) for u in units]
        if not names:
            raise BadArguments("no unit to enable or disable")
        verb = "enable" if enable else "disable"
        self._systemctl([verb, *(["--now"] if now else []), "--", *names], user, 90.0, names[0])

    def daemon_reload(self, user: bool) -> None:
        self._systemctl(["daemon-reload"], user, 90.0, "")

    def run(self, spec: TransientSpec) -> None:
        check_unit_name(spec.unit)
        _check_timeout(spec.timeout)
        if not spec.argv:
            raise BadArguments("a transient unit needs a command (argv is empty)")
        options = [f"--unit={spec.unit}", "--quiet", "--no-ask-password"]
        options += [f"--property={name}={value}" for name, value in spec.properties.items()]
        options += [f"--setenv={name}={value}" for name, value in spec.env.items()]
        options += [f"--working-directory={spec.cwd}"] if spec.cwd is not None else []
        options += [f"--description={spec.description}"] if spec.description is not None else []
        options += ["--collect"] if spec.collect else []
        if any("\n" in option for option in options):
            raise BadArguments("a transient unit's properties, environment, cwd and description must be one line each")
        argv = ["systemd-run", *_scope(spec.user), *options, "--", *spec.argv]
        returncode, _, err = self._run(argv, spec.user, spec.timeout, spec.unit)
        if returncode != 0:
            raise _error(f"systemd-run --unit={spec.unit}", err, spec.unit)

    def _systemctl(self, argv: List[str], user: bool, timeout: float, unit: str) -> str:
        """``systemctl ARGV``'s output; its failure as the error it stands for."""
        returncode, out, err = self._run(["systemctl", *_scope(user), "--no-ask-password", *argv], user, timeout, unit)
        if returncode != 0:
            raise _error(f"systemctl {argv[0]}", err, unit)
        return out

    def _run(self, argv: List[str], user: bool, timeout: float, unit: str) -> Tuple[int, str, str]:
        """Run ``argv`` within ``timeout`` s; its exit status, output and error output (a TimeoutError past it)."""
        env = manager_env(user)
        try:
            process = LocalPopen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError:
            raise SystemdError(f"{argv[0]} is not installed here: is this a systemd machine?") from None
        if self._watchdog is not None:
            self._watchdog.watch(process.pid)  # its own session: its group is its pid
        with self._lock:
            closed = self._closed
            self._running.add(process)
        try:
            if closed:
                process.kill()
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                what = f"{' '.join(argv[:2])} {unit}".strip()
                raise TimeoutError(
                    errno.ETIMEDOUT, f"{what} did not end within {timeout:g} s (systemd keeps the job)"
                ) from None
        finally:
            with self._lock:
                self._running.discard(process)
            if self._watchdog is not None:
                self._watchdog.forget(process.pid)
        return process.returncode, out, err

    def close(self) -> None:
        """The agent is shutting down: kill every systemctl still running (their callers get ConnectionLost)."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for process in running:
            process.kill()


def _scope(user: bool) -> List[str]:
    return ["--user"] if user else []


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise BadArguments(f"a timeout must be > 0 seconds, got {timeout!r}")


def _error(what: str, err: str, unit: str) -> SystemdError:
    """The error systemctl's message ``err`` stands for: NoSuchUnit, AccessDenied, else SystemdError."""
    text = err.strip().splitlines()[0] if err.strip() else "no message"
    if _DENIED.search(err):
        hint = " (a system unit is the privileged agent's: use conn.privileged.systemd)"
        return AccessDenied(f"{what}: {text}{hint}")
    if _NOT_FOUND.search(err):
        return NoSuchUnit(f"{what}: {text}" if unit else text)
    return SystemdError(f"{what}: {text}")
