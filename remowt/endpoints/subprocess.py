"""The subprocess service: spawn, wait, poll and signal children on the target.

The caller names each child by a handle it chooses and opens the stdio
streams itself, so that nothing it needs can arrive before it is ready for
it. Exits are pushed to the caller's :class:`ProcessEventsApi` as they happen.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import msgspec
from msgspec.structs import force_setattr

from ..deploy.local import AGENT, python_command
from ..errors import BadArguments, ConnectionLost, Unreachable, os_name_text
from ..protocol.service import Service, proxy, rpc
from ..protocol.wire import USER
from ..rpc.fdinput import FdInput
from ..rpc.router import Router
from ..rpc.streams import Stream
from ..runtime.real_subprocess import Popen as LocalPopen
from ..transports.stdio import enlarge_pipe
from .childio import Child, ChildIO, LazyOutput
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..transports.fdpass import FdReceiver
    from . import editor

log = logging.getLogger("remowt.subprocess")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's number; fcntl names it from Python 3.10


OsName = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def os_bytes(value: object, what: str) -> bytes:
    """``value`` (str, bytes or a path) as the bytes the OS takes (``os.fsencode``); ``TypeError`` naming ``what``."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (str, os.PathLike)):
        return os.fsencode(value)
    raise TypeError(f"{what} must be str, bytes or a path-like object, got {type(value).__name__}")


class Terminal(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A pseudo-terminal for the child: its stdin, stdout and stderr, and its controlling terminal.

    The child leads a session of its own; ``term`` is its ``TERM``.
    """

    term: str = "xterm-256color"
    cols: int = 80
    rows: int = 24


class SpawnOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a child starts, in :class:`subprocess.Popen`'s terms: one set, from ``Popen`` through the node to the agent.

    ``executable``, ``cwd`` and ``env`` travel as bytes, as the OS takes them,
    so names that are not UTF-8 arrive unchanged; a ``str`` (surrogate-escaped
    ones included) or a path given here is encoded with ``os.fsencode`` when
    the options are made. ``env`` replaces the agent's environment when
    ``replace_env``, else extends it. Each child gets its own process group
    unless ``start_new_session`` or ``process_group`` say otherwise; children
    die with the connection unless ``keep_on_disconnect``. ``pipesize`` > 0
    sets the size of the child's stdio pipes (``F_SETPIPE_SZ``). With
    ``user_shell`` the argv are arguments of the user's shell (from the
    password database; ``["-c", line]`` runs a line as ssh does), in the
    home directory; without any, it is that shell as a login shell.
    ``pass_fds`` are fd numbers the child gets the caller's fds at, as
    :class:`subprocess.Popen`'s ``pass_fds`` (each > 2, inheritable in the
    child, every other fd above 2 closed): the caller sends its fds of those
    numbers after any passed stdio (:attr:`SpawnSpec.passed`), so only an
    agent started on the caller's machine takes them.
    """

    executable: Optional[bytes] = None
    cwd: Optional[bytes] = None
    env: Optional[Dict[bytes, bytes]] = None
    replace_env: bool = False
    start_new_session: bool = False
    process_group: Optional[int] = None
    umask: int = -1
    restore_signals: bool = True
    user: Union[int, str, None] = None
    group: Union[int, str, None] = None
    extra_groups: Optional[List[Union[int, str]]] = None
    keep_on_disconnect: bool = False
    pipesize: int = -1
    terminal: Optional[Terminal] = None
    user_shell: bool = False
    pass_fds: List[int] = []

    def __post_init__(self) -> None:
        if self.executable is not None:
            force_setattr(self, "executable", os_bytes(self.executable, "executable"))
        if self.cwd is not None:
            force_setattr(self, "cwd", os_bytes(self.cwd, "cwd"))
        if self.env is not None:
            env = {os_bytes(k, "an env name"): os_bytes(v, f"env[{k!r}]") for k, v in self.env.items()}
            force_setattr(self, "env", env)


class SpawnSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A child to start: its handle, argv, options and stdio. Stdio fields name streams the caller opened.

    ``lazy_stdout`` / ``lazy_stderr`` (with no stream named): the child gets a
    pipe all the same, and the agent opens a one-way stream for it only once
    there is output, or the child exits with the pipe still open; it announces
    the stream with :meth:`ProcessEventsApi.output` before any of its data.

    ``closed`` names stdio the child gets as if closed: /dev/null opened the
    wrong way round, so every read (stdin) or write (stdout, stderr) fails with
    ``EBADF`` as on a closed fd, and nothing the child opens lands there.
    ``passed`` names stdio the caller sent as fds of its own, on the agent's fd
    socket just before this call, with ``handle`` as the token
    (:mod:`remowt.transports.fdpass`; only an agent started on the caller's
    machine has one): the child gets them as they are.
    Stdio that is none of these is /dev/null.
    """

    handle: int
    argv: List[bytes]
    options: SpawnOptions = SpawnOptions()
    stdin: Optional[int] = None
    stdout: Optional[int] = None
    stderr: Optional[int] = None
    stderr_to_stdout: bool = False
    lazy_stdout: bool = False
    lazy_stderr: bool = False
    closed: List[str] = []
    passed: List[str] = []


class SubprocessApi(Service, namespace=10):
    """Children of the serving node."""

    @rpc(1)
    def spawn(self, spec: SpawnSpec) -> int:
        """Start a child; returns its pid. Failing to exec raises the ``OSError``."""
        raise NotImplementedError

    @rpc(2)
    def wait(self, handle: int, timeout: Optional[float]) -> Optional[int]:
        """The return code once the child exits, or None after ``timeout`` seconds."""
        raise NotImplementedError

    @rpc(3, inline=True)
    def poll(self, handle: int) -> Optional[int]:
        """The return code if the child has exited, else None."""
        raise NotImplementedError

    @rpc(4, inline=True)
    def send_signal(self, handle: int, signum: int) -> bool:
        """Signal the child; False if it had already exited."""
        raise NotImplementedError

    @rpc(5, inline=True, oneway=True)
    def release(self, handle: int) -> None:
        """Forget an exited child."""
        raise NotImplementedError

    @rpc(6, inline=True)
    def signal_group(self, handle: int, signum: int) -> bool:
        """Signal the child's process group, as a terminal signals its job; False if the child had exited."""
        raise NotImplementedError

    @rpc(7, inline=True)
    def resize(self, handle: int, cols: int, rows: int) -> bool:
        """Set the size of the child's terminal (its foreground job gets SIGWINCH); False if it had exited."""
        raise NotImplementedError


class ProcessEventsApi(Service, namespace=11):
    """Served by whoever spawns children: exits are pushed here."""

    @rpc(1, inline=True, oneway=True)
    def exited(self, handle: int, returncode: int) -> None:
        """Child ``handle`` exited (negative: killed by that signal)."""
        raise NotImplementedError

    @rpc(2, inline=True, oneway=True)
    def output(self, handle: int, name: str, sid: int) -> None:
        """Child ``handle``'s lazy ``name`` ("stdout" or "stderr") comes on stream ``sid``, opened by the sender."""
        raise NotImplementedError


class _Child:
    def __init__(self, owner: str, handle: int, process: subprocess.Popen[bytes], keep: bool) -> None:
        self.owner = owner
        self.handle = handle
        self.process = process
        self.keep = keep
        self.returncode: Optional[int] = None
        self.exited = threading.Event()
        self.terminal = -1  # the master of its terminal, if it has one (for resizing)


def _check_stdio(spec: SpawnSpec) -> None:
    """``spec.closed`` and ``spec.passed`` name stdio that nothing else in ``spec`` claims."""
    claimed = {
        "stdin": spec.stdin is not None,
        "stdout": spec.stdout is not None or spec.lazy_stdout,
        "stderr": spec.stderr is not None or spec.lazy_stderr or spec.stderr_to_stdout,
    }
    for field, names in (("closed", spec.closed), ("passed", spec.passed)):
        for name in names:
            if claimed.get(name, True):
                raise BadArguments(f"{field}: {name!r} is not stdin, stdout or stderr, or was given another way too")
            claimed[name] = True


def _check_terminal(spec: SpawnSpec) -> None:
    """A terminal is the child's stdin, stdout and stderr: its output must be read, no other stdio given."""
    terminal = spec.options.terminal
    if terminal is None:
        return
    if spec.stderr is not None or spec.lazy_stderr or spec.stderr_to_stdout or spec.closed or spec.passed:
        raise BadArguments(
            "a child on a terminal writes its stderr there too: give no other stderr, closed or passed stdio"
        )
    if spec.options.pass_fds:
        raise BadArguments("a child on a terminal gets no pass_fds: it starts a session of its own on the terminal")
    if spec.stdout is None and not spec.lazy_stdout:
        raise BadArguments("the output of a child on a terminal must be read: give a stdout stream")
    if not 0 < terminal.cols < 65536 or not 0 < terminal.rows < 65536:
        raise BadArguments(f"a terminal of {terminal.cols}x{terminal.rows} characters: each must be 1 to 65535")
    if not terminal.term or "\0" in terminal.term:
        raise BadArguments(f"TERM must be a name, got {terminal.term!r}")


def set_size(fd: int, cols: int, rows: int) -> None:
    """Give terminal ``fd`` a size of ``cols`` x ``rows`` characters."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:
    """In the child, after setsid: its stdin (a terminal) becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _user_shell(argv: List[bytes], options: SpawnOptions) -> Tuple[List[bytes], SpawnOptions]:
    """``argv`` for the user's shell; none: it as a login shell (``-bash``).

    Either way it starts in the home directory (unless ``cwd`` says otherwise) with the login's ``HOME``,
    ``SHELL``, ``USER`` and ``LOGNAME``, as sshd starts it.
    """
    import pwd

    entry = pwd.getpwuid(os.getuid())
    shell = os.fsencode(entry.pw_shell or "/bin/sh")
    home, user = os.fsencode(entry.pw_dir), os.fsencode(entry.pw_name)
    login = {b"HOME": home, b"SHELL": shell, b"USER": user, b"LOGNAME": user}
    env = {**login, **(options.env or {})}
    cwd = options.cwd if options.cwd is not None else home
    name = os.path.basename(shell)
    argv = [name, *argv] if argv else [b"-" + name]
    return argv, msgspec.structs.replace(options, executable=shell, cwd=cwd, env=env, user_shell=False)


def move_off_targets(fds: Dict[int, int]) -> None:
    """Renumber each fd (value) that is some target's number (key) to a number that is none (close-on-exec),
    so that no placement in the child overwrites a source it has yet to place, nor leaves one close-on-exec."""
    targets = set(fds)
    spare: List[int] = []  # free numbers that are targets: held until the move is done, so the next dup skips them
    try:
        for target, fd in fds.items():
            if fd not in targets:
                continue
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            while moved in targets:
                spare.append(moved)
                moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fds[target] = moved
    finally:
        for fd in spare:
            os.close(fd)


def place_fds(placements: Tuple[Tuple[int, int], ...]) -> None:
    """In the child, before exec: each source fd copied to its target number (inheritable there, as ``pass_fds``)."""
    for source, target in placements:
        os.dup2(source, target)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of ``process``; only ``process`` if it shares the agent's own group."""
    group = os.getpgid(process.pid)
    if group == os.getpgrp():
        process.send_signal(sig)
    else:
        os.killpg(group, sig)


class Subprocesses(SubprocessApi):
    """The agent's implementation. ``watchdog`` kills the children :meth:`kill_all` would if the agent dies first.

    ``fds`` (a local agent's fd socket) brings the fds that spawns name as ``passed``.
    """

    def __init__(self, router: Router, watchdog: Optional[Watchdog] = None, fds: Optional[FdReceiver] = None) -> None:
        self._router = router
        self._watchdog = watchdog
        self._fds = fds
        self._lock = threading.Lock()
        self._children: Dict[Tuple[str, int], _Child] = {}
        self._io = ChildIO(self._child_exited)
        self._by_pid: Dict[int, _Child] = {}
        self._pumps: List[threading.Thread] = []
        self._closed = False
        self._editor: Optional[editor.EditorHost] = None

    def _child(self, handle: int) -> _Child:
        key = (self._router.caller(), handle)
        with self._lock:
            child = self._children.get(key)
        if child is None:
            raise BadArguments(f"no child with handle {handle} for {key[0]}")
        return child

    def spawn(self, spec: SpawnSpec) -> int:
        passed, inherited = self._take_passed(spec)  # first: whatever fails below, the caller's fds are closed here
        try:
            return self._spawn(spec, passed, inherited)
        finally:
            for fd in [*passed.values(), *inherited.values()]:
                os.close(fd)

    def _take_passed(self, spec: SpawnSpec) -> Tuple[Dict[str, int], Dict[int, int]]:
        """The caller's fds: for the stdio ``spec.passed`` names, by name; for ``pass_fds``, by target number.

        The latter are numbered off every target (:func:`move_off_targets`), ready for :func:`place_fds`.
        """
        targets = spec.options.pass_fds
        if not spec.passed and not targets:
            return {}, {}
        if self._fds is None:
            raise BadArguments(
                "passed stdio and pass_fds need the fd socket of an agent started on the caller's machine"
            )
        fds = self._fds.take(spec.handle, len(spec.passed) + len(targets))
        passed = dict(zip(spec.passed, fds))
        inherited = dict(zip(targets, fds[len(spec.passed) :]))
        try:
            if len(passed) != len(spec.passed):
                raise BadArguments(f"passed names a stdio twice: {spec.passed}")
            if len(inherited) != len(targets) or min(targets, default=3) < 3:
                raise BadArguments(f"pass_fds must be distinct fd numbers above 2, got {targets}")
            if inherited:
                move_off_targets(inherited)
        except BaseException:
            for fd in {*fds, *inherited.values()}:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return passed, inherited

    def _spawn(self, spec: SpawnSpec, passed: Dict[str, int], inherited: Dict[int, int]) -> int:
        owner = self._router.caller()
        if spec.options.user_shell:
            argv, options = _user_shell(spec.argv, spec.options)
            spec = msgspec.structs.replace(spec, argv=argv, options=options)
        terminal = spec.options.terminal
        if not spec.argv:
            raise BadArguments("argv must not be empty")
        _check_stdio(spec)
        _check_terminal(spec)
        key = (owner, spec.handle)
        with self._lock:
            if self._closed:
                raise ConnectionLost("agent is shutting down")
            if key in self._children:
                raise BadArguments(f"handle {spec.handle} is already in use")
        streams = {
            name: self._router.accept_stream(owner, sid)
            for name, sid in (("stdin", spec.stdin), ("stdout", spec.stdout), ("stderr", spec.stderr))
            if sid is not None
        }
        wanted = (("stdout", spec.lazy_stdout, spec.stdout), ("stderr", spec.lazy_stderr, spec.stderr))
        lazy = [name for name, flag, sid in wanted if flag and sid is None]
        # A pipe per stream, made here rather than by Popen: the child gets one end, the pumps own the other.
        ours: Dict[str, int] = {}
        theirs: Dict[str, int] = {}
        try:
            try:
                if terminal is not None:
                    self._open_terminal(terminal, "stdin" in streams, ours, theirs)
                for name in [] if terminal is not None else [*streams, *lazy]:
                    read_fd, write_fd = os.pipe()
                    ours[name], theirs[name] = (write_fd, read_fd) if name == "stdin" else (read_fd, write_fd)
                    if spec.options.pipesize > 0:  # as subprocess raises it when the size is refused
                        fcntl.fcntl(ours[name], F_SETPIPE_SZ, spec.options.pipesize)
                    elif name != "stdin":  # fewer, larger reads of the child's output
                        enlarge_pipe(ours[name])
                for name in spec.closed:
                    theirs[name] = os.open(os.devnull, os.O_WRONLY if name == "stdin" else os.O_RDONLY)
                process = LocalPopen(spec.argv, **self._popen_kwargs(spec, {**theirs, **passed}, inherited))
            except (ValueError, KeyError, TypeError) as e:  # bad env, unknown user or group: the caller's mistake
                raise BadArguments(f"cannot start {os_name_text(spec.argv[0])!r}: {e}") from None
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            for stream in streams.values():
                stream.close()
            raise
        finally:
            for fd in set(theirs.values()):
                os.close(fd)
        child = _Child(owner, spec.handle, process, spec.options.keep_on_disconnect)
        if terminal is not None:
            child.terminal = os.dup(ours["stdout"])
        if self._watchdog is not None and not child.keep:
            self._watchdog.watch(process.pid)
        with self._lock:
            self._children[key] = child
            self._by_pid[process.pid] = child
        self._start_pumps(process.pid, streams, ours, terminal is None)
        for name in lazy:
            output = LazyOutput(functools.partial(self._open_output, owner, spec.handle, name))
            self._io.pump(ours[name], output, process.pid, terminal is None)
        self._io.watch_exit(child.process)
        return process.pid

    @staticmethod
    def _open_terminal(terminal: Terminal, stdin: bool, ours: Dict[str, int], theirs: Dict[str, int]) -> None:
        """A pty: its master is our stdout (and, dup'd, stdin), its slave the child's stdin, stdout and stderr."""
        master, slave = os.openpty()
        try:
            set_size(master, terminal.cols, terminal.rows)
            if stdin:
                ours["stdin"] = os.dup(master)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        ours["stdout"] = master
        theirs.update(stdin=slave, stdout=slave, stderr=slave)

    def _popen_kwargs(self, spec: SpawnSpec, fds: Dict[str, int], inherited: Dict[int, int]) -> Dict[str, Any]:
        """Popen's arguments; ``fds`` are the child's ends of its stdio pipes (the rest is /dev/null).

        ``inherited`` (target number: fd) are placed by :func:`place_fds` after fork. subprocess's ``pass_fds``
        cannot: it keeps fds at the numbers they have here. subprocess then closes nothing: every fd of the
        agent is close-on-exec (so is each source), and the targets, made by ``dup2``, are the only others.
        """
        options = spec.options
        stderr = subprocess.STDOUT if spec.stderr_to_stdout else fds.get("stderr", subprocess.DEVNULL)
        env: Optional[Dict[bytes, bytes]] = None
        if options.replace_env:
            env = dict(options.env or {})
        elif options.env:
            env = {**os.environb, **options.env}
        kwargs: Dict[str, Any] = dict(
            executable=options.executable,
            stdin=fds.get("stdin", subprocess.DEVNULL),
            stdout=fds.get("stdout", subprocess.DEVNULL),
            stderr=stderr,
            cwd=options.cwd,
            env=env,
            close_fds=True,
            bufsize=0,
            umask=options.umask,
            restore_signals=options.restore_signals,
            user=options.user,
            group=options.group,
            extra_groups=options.extra_groups,
            start_new_session=options.start_new_session,
        )
        if inherited:
            placements = tuple((fd, target) for target, fd in inherited.items())
            kwargs.update(close_fds=False, preexec_fn=functools.partial(place_fds, placements))
        if options.terminal is not None:
            kwargs.update(start_new_session=True, preexec_fn=_take_terminal)
            editor = self._editor_host().environment
            kwargs["env"] = {**(os.environb if env is None else env), b"TERM": options.terminal.term.encode(), **editor}
        elif sys.version_info >= (3, 11):
            if not options.start_new_session:
                kwargs["process_group"] = 0 if options.process_group is None else options.process_group
        elif options.process_group is not None:
            raise BadArguments("process_group needs Python 3.11 or later on the target")
        else:
            kwargs["start_new_session"] = True
        return kwargs

    def _editor_host(self) -> editor.EditorHost:
        """Where the ``EDITOR`` of children on a terminal reaches the caller's editor (made on first need)."""
        from .editor import EditorApi, EditorHost

        with self._lock:
            if self._editor is None:
                router = self._router

                def ask(name: str, content: bytes) -> Optional[bytes]:
                    return proxy(EditorApi, router, USER, None).edit(name, content)

                self._editor = EditorHost(ask, python_command(AGENT, "editor"))
            return self._editor

    def _start_pumps(self, pid: int, streams: Dict[str, Stream], fds: Dict[str, int], pipes: bool) -> None:
        for name in ("stdout", "stderr"):
            if name in streams:
                self._io.pump(fds[name], streams[name], splice=pipes)
        stdin = streams.get("stdin")
        if stdin is not None:
            FdInput(stdin, fds["stdin"], f"stdin-{pid}", self._add_pump)

    def _add_pump(self, thread: threading.Thread) -> None:
        """A thread writing a child's stdin: joined by :meth:`join`."""
        with self._lock:
            self._pumps = [pump for pump in self._pumps if pump.is_alive()]
            self._pumps.append(thread)

    def _open_output(self, owner: str, handle: int, name: str) -> Stream:
        """Open the stream of a lazy output and announce it to ``owner`` (before anything is sent on it)."""
        stream = self._router.open_stream(owner, one_way=True)
        proxy(ProcessEventsApi, self._router, owner).output(handle, name, stream.sid)
        return stream

    def _child_exited(self, process: Child) -> None:
        with self._lock:
            child = self._by_pid.pop(process.pid)
            terminal, child.terminal = child.terminal, -1
        if terminal >= 0:
            os.close(terminal)
        child.returncode = child.process.returncode
        child.exited.set()
        assert child.returncode is not None
        try:
            proxy(ProcessEventsApi, self._router, child.owner).exited(child.handle, child.returncode)
        except (Unreachable, ConnectionLost):
            log.debug("owner %s of child %d is gone", child.owner, child.process.pid)

    def wait(self, handle: int, timeout: Optional[float]) -> Optional[int]:
        child = self._child(handle)
        child.exited.wait(timeout)
        return child.returncode

    def poll(self, handle: int) -> Optional[int]:
        return self._child(handle).returncode

    def send_signal(self, handle: int, signum: int) -> bool:
        return self._signal(handle, signum, lambda process, sig: process.send_signal(sig))

    def signal_group(self, handle: int, signum: int) -> bool:
        return self._signal(handle, signum, _signal_group)

    def resize(self, handle: int, cols: int, rows: int) -> bool:
        if not 0 < cols < 65536 or not 0 < rows < 65536:
            raise BadArguments(f"a terminal of {cols}x{rows} characters: each must be 1 to 65535")
        child = self._child(handle)
        with self._lock:
            if child.terminal < 0:
                if child.returncode is None:
                    raise BadArguments(f"child {handle} has no terminal")
                return False
            set_size(child.terminal, cols, rows)
        return True

    def _signal(self, handle: int, signum: int, send: Callable[[subprocess.Popen[bytes], int], None]) -> bool:
        """``send`` the signal about the child unless it exited (its pid is not reaped meanwhile)."""
        try:
            sig = signal.Signals(signum)
        except ValueError:
            raise BadArguments(f"{signum} is not a valid signal number") from None
        child = self._child(handle)
        with self._lock:
            if child.returncode is not None:
                return False
            try:
                send(child.process, sig)
            except ProcessLookupError:
                return False
        return True

    def release(self, handle: int) -> None:
        key = (self._router.caller(), handle)
        with self._lock:
            child = self._children.get(key)
            if child is None or child.returncode is None:
                return
            del self._children[key]
        if self._watchdog is not None and not child.keep:
            self._watchdog.forget(child.process.pid)

    def kill_all(self, timeout: float = 5.0) -> None:
        """Kill every child (and its process group) not marked to survive; wait for the exits.

        The fd socket is closed first: a spawn still waiting for its fds (its caller was interrupted between
        the call and the fds) fails at once instead of holding a worker, and the shutdown, for ten seconds.
        """
        if self._fds is not None:
            self._fds.close()
        with self._lock:
            self._closed = True
            children = [child for child in self._children.values() if not child.keep]
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
        for child in children:
            child.exited.wait(timeout)

    def join(self, timeout: float = 5.0) -> None:
        """Stop the exit watcher, join the stdio pumps (after the router closed their streams), close the fd socket."""
        self._io.stop(timeout)
        if self._fds is not None:
            self._fds.close()
        with self._lock:
            editor, self._editor = self._editor, None
        if editor is not None:
            editor.close()
        with self._lock:
            pumps = list(self._pumps)
        for pump in pumps:
            pump.join(timeout)
