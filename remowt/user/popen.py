"""A drop-in for :mod:`subprocess` whose processes run where a connection points.

``remowt.Popen`` has the signature of Python 3.11's ``subprocess.Popen`` plus
``connection=``; without one it uses :func:`remowt.default_connection`. The
module functions (``run``, ``call``, ``check_call``, ``check_output``,
``getoutput``, ``getstatusoutput``) follow CPython's own, and the exceptions
subclass subprocess's so ``except subprocess.CalledProcessError`` still works.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import locale
import os
import select
import subprocess
import threading
import types
import warnings
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import msgspec

from ..endpoints.subprocess import SpawnOptions, Terminal, os_bytes
from ..errors import ConnectionLost, os_name_text
from ..runtime.deadline import KILL_GRACE, Deadline
from ..runtime.interrupts import start, without_interrupts
from ..runtime.waiting import Gate, wait_on
from .pipes import FdSink, FdToStream, PipeEnd, Relay, StreamReader, StreamWriter, is_devnull, remowt_pipe

if TYPE_CHECKING:
    from ..rpc.streams import Stream
    from .node import Node
    from .process import RemoteProcess

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
CompletedProcess = subprocess.CompletedProcess
CLOSED = -4
"""remowt's own stdio value: the child gets that fd as if closed (reads or writes fail with ``EBADF``).

A closed fd 0, 1 or 2 of this process, inherited, is passed on so: subprocess's child would find it closed.
"""
INHERIT_GRACE = 2.0
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's number; fcntl names it from Python 3.10

StrOrBytesPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
Args = Union[StrOrBytesPath, Sequence[StrOrBytesPath]]
Stdio = Union[None, int, IO[Any]]


class SubprocessError(subprocess.SubprocessError):
    """Base of remowt's subprocess errors."""


class CalledProcessError(subprocess.CalledProcessError, SubprocessError):
    """A checked command exited non-zero (carries ``output`` and ``stderr``)."""


class TimeoutExpired(subprocess.TimeoutExpired, SubprocessError):
    """A timeout passed while waiting for a child."""


PREEXEC_REFUSED = (
    "preexec_fn: the child is forked by the agent, another process (on the target), where a function of this "
    "process cannot run; it cannot be honoured: do that work in the command itself, or with Popen's own "
    "arguments (env, cwd, umask, user, group, start_new_session, process_group)"
)


def _check_local_only(preexec_fn: Any, startupinfo: Any, creationflags: int) -> None:
    if preexec_fn is not None:
        raise ValueError(PREEXEC_REFUSED)
    if startupinfo is not None:
        raise ValueError("startupinfo is Windows only")
    if creationflags:
        raise ValueError("creationflags is Windows only")


def _os_bytes(value: Any, what: str) -> bytes:
    """``value`` as the bytes ``execve`` gets, refused as subprocess refuses it: a NUL anywhere."""
    data = os_bytes(value, what)
    if b"\0" in data:
        raise ValueError(f"embedded null byte in {what}: {value!r}")
    return data


def _argv(args: Args, shell: bool, executable: Optional[StrOrBytesPath]) -> Tuple[List[bytes], Optional[bytes], Any]:
    """The argv and executable to send, and what subprocess would name in a failure to run them."""
    if isinstance(args, (str, bytes)):
        items: List[Any] = [args]
    elif isinstance(args, os.PathLike):
        if shell:
            raise TypeError("path-like args is not allowed when shell is true")
        items = [args]
    else:
        items = list(args)
    argv = [_os_bytes(a, f"args[{i}]") for i, a in enumerate(items)]
    exe = None if executable is None else _os_bytes(executable, "executable")
    if shell:
        argv = [exe or b"/bin/sh", b"-c", *argv]
        items = [executable or "/bin/sh", "-c", *items]
        exe = None
    if not argv:
        raise ValueError("args must name a program to run, got an empty sequence")
    return argv, exe, items[0] if executable is None or shell else executable


def _sequence(args: Args) -> Sequence[StrOrBytesPath]:
    return [args] if isinstance(args, (str, bytes, os.PathLike)) else args


def _environment(name: str, env: Optional[Mapping[Any, Any]]) -> Optional[Dict[bytes, bytes]]:
    """``env`` as bytes, refused as subprocess refuses it: NUL anywhere, or '=' in a name."""
    if env is None:
        return None
    result: Dict[bytes, bytes] = {}
    for key, value in env.items():
        k = _os_bytes(key, f"{name} name")
        if b"=" in k:
            raise ValueError(f"illegal environment variable name in {name}: {key!r}")
        result[k] = _os_bytes(value, f"{name}[{key!r}]")
    return result


def _check_id(value: Any, what: str, too_large: Type[Exception]) -> None:
    """A user or group as subprocess checks it (names are looked up on the target): ``too_large`` past 32 bits."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, int):
        raise TypeError(f"{what} must be a string or an integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} ID cannot be negative, got {value}")
    if value >= 2**32:
        raise too_large(f"{what} ID {value} is out of range")


def _named_as_given(error: OSError, program: bytes, caller_program: Any, cwd: Optional[bytes], caller_cwd: Any) -> None:
    """Name the program or cwd in a failure to start as the caller gave it (the agent names it as text)."""
    if error.filename == os_name_text(program):
        error.filename = caller_program
    elif cwd is not None and error.filename == os_name_text(cwd):
        error.filename = caller_cwd


def _callers_view(options: SpawnOptions, started_env: Mapping[bytes, bytes]) -> SpawnOptions:
    """For an agent on this machine, as this user: what subprocess would give the child, taken now.

    No ``cwd``, or a relative one, is this process's cwd now (or relative to
    it); no ``env`` is this process's environment now, extended by
    ``extra_env``. The agent started with the environment ``started_env``,
    so the environment is sent only when it has changed since.
    """
    cwd = options.cwd
    login = options.user_shell and cwd is None  # the user's shell starts where a login does: the agent knows where
    if not login and (cwd is None or not os.path.isabs(cwd)):
        with contextlib.suppress(OSError):  # a removed cwd: the child finds it removed too, relative paths fail
            here = os.getcwdb()
            cwd = here if cwd is None else os.path.join(here, cwd)
    env, replace = options.env, options.replace_env
    if not replace:
        current = dict(os.environb)
        if current != started_env:
            env, replace = {**current, **(env or {})}, True
    return msgspec.structs.replace(options, cwd=cwd, env=env, replace_env=replace)


def terminal_for(pty: Union[bool, Terminal]) -> Optional[Terminal]:
    """The terminal ``pty`` asks for: ``True`` takes ``TERM`` and the size of this process's terminal, if any."""
    if isinstance(pty, Terminal):
        return pty
    return make_terminal() if pty else None


def make_terminal(term: Optional[str] = None, cols: Optional[int] = None, rows: Optional[int] = None) -> Terminal:
    """A terminal like this process's (``TERM``, size), else ``xterm-256color`` of 80x24; what is given wins."""
    size = _local_size()
    return Terminal(
        term=term or os.environ.get("TERM") or "xterm-256color",
        cols=cols or (size.columns if size else 80),
        rows=rows or (size.lines if size else 24),
    )


def _local_size() -> Optional[os.terminal_size]:
    """The size of the terminal on this process's stdin, stdout or stderr, if one of them is one."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            return os.get_terminal_size(fd)
    return None


_STD_FDS = {"stdin": 0, "stdout": 1, "stderr": 2}
Choice = Union[int, PipeEnd]


def _terminal_stdio(stdout: Stdio, stderr: Stdio) -> Stdio:
    """On a terminal stderr is the terminal: only None or STDOUT say so; its output must go somewhere."""
    if stderr not in (None, STDOUT):
        raise ValueError("with pty, stderr goes to the terminal with stdout: give stderr=None or STDOUT")
    if stdout == DEVNULL:
        raise ValueError("with pty, the terminal's output must be read: give stdout=PIPE, None or a file")
    return DEVNULL


def _fd_numbers(pass_fds: Sequence[Any]) -> List[int]:
    """``pass_fds`` as subprocess takes them: ints (sorted, each once), none negative."""
    numbers = sorted({int(fd) for fd in pass_fds})
    if numbers and numbers[0] < 0:
        raise ValueError(f"bad value(s) in pass_fds: {numbers[0]}")
    return numbers


def _fds_to_pass(conn: Node, terminal: Optional[Terminal], pass_fds: List[int], close_fds: bool) -> List[int]:
    """This process's fds the child gets at the same numbers, besides its stdio: ``pass_fds``, or with
    ``close_fds=False`` every inheritable one, as subprocess's child gets them. Only an agent started here
    takes fds; elsewhere ``pass_fds`` is refused and ``close_fds=False`` passes none (documented)."""
    if not pass_fds and close_fds:
        return []
    if terminal is not None or conn.fd_sender is None:
        if not pass_fds:
            return []
        if terminal is not None:
            raise ValueError("pass_fds: a child on a terminal (pty) gets no fds but the terminal")
        raise ValueError(
            f"pass_fds: this process's fds cannot reach the children of {conn.description}; only the agent "
            "that connect_local() starts takes them (not over ssh or the loopback, not with sudo=True)"
        )
    if not pass_fds:
        return _inheritable_fds()
    for fd in pass_fds:
        os.fstat(fd)  # EBADF, as subprocess's child reports for an fd that is not open
    return [fd for fd in pass_fds if fd > 2]  # 0-2 are the child's stdio, as with subprocess


def _inheritable_fds() -> List[int]:
    """This process's inheritable fds above 2: what a child started with ``close_fds=False`` inherits."""
    listing = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    fds: List[int] = []
    for name in os.listdir(listing):
        fd = int(name)
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
    return sorted(fds)


def _resolve_stdio(name: str, value: Any) -> Choice:
    """What one stdio argument means here: PIPE, DEVNULL, STDOUT, CLOSED, a local fd, or another child's pipe.

    A local fd is checked to be open (``OSError`` EBADF, as subprocess raises);
    an inherited one that is closed becomes CLOSED, stdin that is /dev/null
    DEVNULL. Another remowt child's pipe comes back as its :class:`PipeEnd`,
    already held for the relay that will copy it.
    """
    if value is None:
        fd = _STD_FDS[name]
        if not _is_open(fd):
            return CLOSED
        return DEVNULL if name == "stdin" and is_devnull(fd) else fd
    if isinstance(value, int):
        if value in (PIPE, DEVNULL, CLOSED) or (value == STDOUT and name == "stderr"):
            return value
        if value < 0:
            raise ValueError(f"{name}={value} is neither PIPE, DEVNULL, STDOUT, CLOSED nor a file descriptor")
        fd = value
    else:
        pipe = remowt_pipe(value)
        if pipe is not None:
            return _hold(name, pipe)
        try:
            fd = int(value.fileno())
        except (AttributeError, io.UnsupportedOperation):
            raise ValueError(
                f"{name} must be PIPE, DEVNULL, None, an fd or a file with fileno(), got {value!r}"
            ) from None
    os.fstat(fd)
    return DEVNULL if name == "stdin" and is_devnull(fd) else fd


def _hold(name: str, pipe: Union[StreamReader, StreamWriter]) -> PipeEnd:
    want = "readable" if name == "stdin" else "writable"
    if isinstance(pipe, StreamWriter) == (name == "stdin"):
        raise ValueError(f"{name} is the {pipe.name} pipe of another remowt process, which is not {want}")
    if pipe.closed or not pipe.end.hold():
        raise ValueError(f"{name}: I/O operation on closed file")
    return pipe.end


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _mode(choice: Choice) -> int:
    """What the agent does with one stdio: DEVNULL, STDOUT, CLOSED, or a pipe to us."""
    if isinstance(choice, int) and choice in (DEVNULL, STDOUT, CLOSED):
        return choice
    return PIPE


class Popen:
    """Execute a child program where ``connection`` points (like :class:`subprocess.Popen`).

    Beyond subprocess's arguments: ``connection`` (else the default one),
    ``extra_env`` (variables added to the target's environment instead of
    replacing it as ``env`` does), ``sudo`` (run it as root through the
    connection's privileged agent, :attr:`remowt.Remowt.privileged`) and
    ``spawn_timeout`` (how long starting it may take, None: the connection's
    ``call_timeout``; past it ``TimeoutError``).

    ``cwd=None`` and ``env=None`` mean, as for subprocess, this process's cwd
    and environment at this call when the agent was started here by
    :func:`remowt.connect_local` (a relative ``cwd`` or program resolves
    against this process's cwd). Elsewhere they are the agent's: over ssh the
    login's home directory and environment, as for a command ``ssh`` runs.

    Stdio on a connection from :func:`remowt.connect_local` (not its
    privileged node) is exactly subprocess's: an fd, a file or inherited
    stdio is handed to the child as it is (``SCM_RIGHTS`` to the agent), and
    ``PIPE`` is an ``os.pipe()`` made here whose other end the child gets, so
    a terminal stays a terminal, unread input stays unread, a full disk
    fails the child's write, and ``fileno()``, ``select()`` and EOF are the
    pipe's own. So are ``pass_fds`` (the child gets those fds at the same
    numbers, inheritable, and no other fd above 2) and ``close_fds=False``
    (it gets every inheritable fd of this process at its number). Elsewhere (over ssh, the loopback, ``sudo=True``,
    ``pty=True``) stdio is copied over the link, and it differs from a local
    child, because the child is elsewhere:

    - A stdin given as a local fd or file (or inherited) is copied to the
      child by a thread, which reads ahead of the child: a child that stops
      reading early (``head -n 1``) leaves the shared file offset after what
      was sent, not after what it consumed, and the copy stops when the
      child exits. A terminal given as stdin is a pipe over there.
      Output given as a local fd or file is copied likewise.
    - ``poll()`` may see the exit before the last output has reached the
      pipe that ``fileno()`` reads: read to EOF rather than stopping at the exit.
    - Writing to the stdin of a child known to have exited raises
      ``BrokenPipeError`` even if a grandchild still holds that pipe.
    - ``fileno()`` of a ``PIPE`` file object starts a thread that copies the
      stream through a real OS pipe, so ``select()`` works; the bytes take
      one more hop from then on.
    - Pipes given as another remowt child's stdio are copied by a thread in
      this process, not joined on the target.
    - When output copied to a local fd cannot be written there (its reader
      went away, the disk is full), the child's further writes to that pipe
      fail with EPIPE; if it exits 0 regardless, ``wait()`` raises the error.
    - ``close_fds=False`` is accepted, but no fd of this process exists
      where the child runs: it gets its stdio and nothing else, as with
      ``close_fds=True``. ``pass_fds`` is refused with ``ValueError``.

    ``preexec_fn`` is refused everywhere (``ValueError``): the agent, another
    process, forks the child, and a function of this process cannot run there.
    - ``pipesize`` sizes the child's pipes on the target and the local pipe
      that ``fileno()`` makes.
    """

    _bound_connection: Optional[Node] = None

    def __class_getitem__(cls, item: Any) -> types.GenericAlias:
        """``Popen[bytes]``, as ``subprocess.Popen[bytes]`` (an alias for annotations)."""
        return types.GenericAlias(cls, item)

    def __init__(
        self,
        args: Args,
        bufsize: int = -1,
        executable: Optional[StrOrBytesPath] = None,
        stdin: Stdio = None,
        stdout: Stdio = None,
        stderr: Stdio = None,
        preexec_fn: Any = None,
        close_fds: bool = True,
        shell: bool = False,
        cwd: Optional[StrOrBytesPath] = None,
        env: Optional[Mapping[Any, Any]] = None,
        universal_newlines: Optional[bool] = None,
        startupinfo: Any = None,
        creationflags: int = 0,
        restore_signals: bool = True,
        start_new_session: bool = False,
        pass_fds: Sequence[int] = (),
        *,
        user: Union[int, str, None] = None,
        group: Union[int, str, None] = None,
        extra_groups: Optional[Sequence[Union[int, str]]] = None,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        text: Optional[bool] = None,
        umask: int = -1,
        pipesize: int = -1,
        process_group: Optional[int] = None,
        connection: Optional[Node] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        sudo: bool = False,
        spawn_timeout: Optional[float] = None,
        pty: Union[bool, Terminal] = False,
        user_shell: bool = False,
    ) -> None:
        self.args = args
        self.returncode: Optional[int] = None
        self.stdin: Optional[IO[Any]] = None
        self.stdout: Optional[IO[Any]] = None
        self.stderr: Optional[IO[Any]] = None
        self.pid = -1
        self._process: Optional[RemoteProcess] = None
        self._in_pump: Optional[FdToStream] = None
        self._sinks: List[FdSink] = []
        self._raw_readers: Dict[str, StreamReader] = {}
        self._os_pipes: Dict[str, List[int]] = {}  # stdio made a pipe here: [our end, the child's end] (-1: closed)
        self._os_files: List[str] = []  # stdio whose file object is an os.pipe() end, as subprocess's are
        self._output_error: Optional[OSError] = None
        self._communication_started = False
        self._collected_output: Dict[str, io.BytesIO] = {}
        self._io_lock = threading.Lock()
        self._io_ended = Gate()  # a communicate thread ended
        self._io_running = 0
        self._io_error: Optional[BaseException] = None
        self._abandoned = False  # given up on after a timeout: the agent did not confirm the kill
        _check_local_only(preexec_fn, startupinfo, creationflags)
        fd_numbers = _fd_numbers(pass_fds)
        if fd_numbers and not close_fds:
            warnings.warn("pass_fds overriding close_fds.", RuntimeWarning, stacklevel=2)
            close_fds = True
        if bufsize is None:
            bufsize = -1
        if not isinstance(bufsize, int):
            raise TypeError("bufsize must be an integer")
        if pipesize is None:
            pipesize = -1
        if not isinstance(pipesize, int):
            raise TypeError("pipesize must be an integer")
        if text is not None and universal_newlines is not None and bool(universal_newlines) != bool(text):
            raise SubprocessError(
                "Cannot disambiguate when both text and universal_newlines are supplied but different. "
                "Pass one or the other."
            )
        if stderr == STDOUT and stdout == STDOUT:
            raise ValueError("stdout cannot be STDOUT")
        if stdin == STDOUT:
            raise ValueError("stdin cannot be STDOUT")
        self.text_mode = bool(encoding or errors or text or universal_newlines)
        self.universal_newlines = self.text_mode
        self.encoding = encoding
        self.errors = errors
        line_buffering = bufsize == 1 and self.text_mode
        if bufsize == 1 and not self.text_mode:
            warnings.warn(
                "line buffering (buffering=1) isn't supported in binary mode, the default buffer size will be used",
                RuntimeWarning,
                stacklevel=2,
            )
            bufsize = -1
        terminal = terminal_for(pty)
        if terminal is not None:
            stderr = _terminal_stdio(stdout, stderr)
        if user_shell:
            argv: List[bytes] = [_os_bytes(a, f"args[{i}]") for i, a in enumerate(_sequence(args))]
            exe: Optional[bytes] = None
            caller_program: Any = None
        else:
            argv, exe, caller_program = _argv(args, shell, executable)
        _check_id(user, "User", OverflowError)
        _check_id(group, "Group", OverflowError)
        for extra in extra_groups or ():
            _check_id(extra, "Group", ValueError)
        environment = _environment("env", env)
        extra_environment = _environment("extra_env", extra_env)
        if environment is not None and extra_environment is not None:
            raise ValueError("give env (replace) or extra_env (extend), not both")
        options = SpawnOptions(
            executable=exe,
            cwd=None if cwd is None else _os_bytes(cwd, "cwd"),
            env=environment if environment is not None else extra_environment or None,
            replace_env=environment is not None,
            start_new_session=start_new_session,
            process_group=process_group,
            umask=umask,
            restore_signals=restore_signals,
            user=user,
            group=group,
            extra_groups=None if extra_groups is None else list(extra_groups),
            pipesize=pipesize,
            terminal=terminal,
            user_shell=user_shell,
        )
        choices: Dict[str, Choice] = {}
        try:
            for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
                choices[name] = _resolve_stdio(name, value)
            # The connection the child runs on: the one given, else the one this class is bound to, else the default.
            conn = connection or self._bound_connection
            if conn is None:
                from .default import default_connection

                conn = default_connection()
            if sudo:
                conn = conn.privileged
            self.connection = conn
            if conn.started_env is not None:
                options = _callers_view(options, conn.started_env)
            inherited = _fds_to_pass(conn, terminal, fd_numbers, close_fds)
            if inherited:
                options = msgspec.structs.replace(options, pass_fds=inherited)
            passed = self._pass_stdio(choices, pipesize) if conn.fd_sender is not None and terminal is None else {}
            outputs = {
                name: self._copy_output(name, choice)
                for name in ("stdout", "stderr")
                for choice in (choices[name],)
                if isinstance(choice, int) and choice not in (PIPE, DEVNULL, STDOUT, CLOSED) and name not in passed
            }
            self._process = process = conn.spawn(
                argv,
                options,
                stdin=_mode(choices["stdin"]),
                stdout=_mode(choices["stdout"]),
                stderr=_mode(choices["stderr"]),
                outputs=outputs,
                passed=passed,
                timeout=spawn_timeout,
            )
            self._close_childs_ends()  # the child has its copies now
        except OSError as e:
            _named_as_given(e, exe or (argv[0] if argv else b""), caller_program, options.cwd, cwd)
            self._undo_stdio(choices)
            raise
        except BaseException:
            self._undo_stdio(choices)
            if self._process is not None:  # an interrupt right after the start: end the child's pipes
                self._process.close()
            raise
        self.pid = process.pid
        try:
            self._wire_stdio(process, choices, bufsize, line_buffering, pipesize)
        except BaseException:  # an interrupt, say: end the child's pipes, or it waits for its input for good
            process.close()
            self._close_os_pipes()
            raise

    def _close_os_pipes(self) -> None:
        """Close our ends of the pipes made here, as files or not yet (the child sees EOF, or EPIPE)."""
        for name, ends in self._os_pipes.items():
            without_interrupts(functools.partial(_close_end, ends, 0))
            handle = getattr(self, name) if name in self._os_files else None
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()

    def _undo_stdio(self, choices: Dict[str, Choice]) -> None:
        """Let go of what a failed start held: other children's pipes, copies of local fds, pipes made here."""
        for choice in choices.values():
            if isinstance(choice, PipeEnd):
                choice.release()
        for sink in self._sinks:
            sink.close()
        self._close_childs_ends()
        for ends in self._os_pipes.values():
            without_interrupts(functools.partial(_close_end, ends, 0))

    def _close_childs_ends(self) -> None:
        for ends in self._os_pipes.values():
            without_interrupts(functools.partial(_close_end, ends, 1))

    def _pass_stdio(self, choices: Dict[str, Choice], pipesize: int) -> Dict[str, int]:
        """The fds to hand the child as they are (an agent started here): given or inherited ones, and for
        ``PIPE`` the child's end of an ``os.pipe()`` made here, whose other end becomes the file object."""
        passed: Dict[str, int] = {}
        for name, choice in choices.items():
            if isinstance(choice, PipeEnd) or choice in (DEVNULL, STDOUT, CLOSED):
                continue
            if choice == PIPE:
                without_interrupts(functools.partial(self._make_os_pipe, name))
                ours, theirs = self._os_pipes[name]
                if pipesize > 0:
                    fcntl.fcntl(ours, F_SETPIPE_SZ, pipesize)
                passed[name] = theirs
            else:
                passed[name] = choice
        return passed

    def _copy_output(self, name: str, fd: int) -> Callable[[Optional[Stream]], None]:
        """The handler of output ``name`` copied to local ``fd``: the stream is opened only when there is output."""
        writer = self.connection.fd_writer(fd)
        sink = writer.sink(name)
        self._sinks.append(sink)
        sink.open()

        def opened(stream: Optional[Stream]) -> None:
            if stream is None:
                sink.close()
            else:
                writer.attach(sink, stream)

        return opened

    def _wire_stdio(
        self, process: RemoteProcess, choices: Dict[str, Choice], bufsize: int, line_buffering: bool, pipesize: int
    ) -> None:
        for name in self._os_pipes:
            without_interrupts(functools.partial(self._open_pipe_file, name, bufsize, line_buffering))
        choice = choices["stdin"]
        if process.stdin is not None:
            end = PipeEnd(process.stdin, writable=True, exited=lambda: process.returncode is not None)
            if isinstance(choice, PipeEnd):
                Relay(choice, end)
            elif choice == PIPE:
                raw_in: Any = StreamWriter(end, "<stdin>", pipesize)
                handle_in: Any = raw_in if bufsize == 0 else io.BufferedWriter(raw_in, _buffer_size(bufsize))
                self.stdin = handle_in
                if self.text_mode:
                    self.stdin = io.TextIOWrapper(
                        handle_in,
                        encoding=self.encoding,
                        errors=self.errors,
                        write_through=True,
                        line_buffering=line_buffering,
                    )
            else:
                fd, stdin = choice, process.stdin
                without_interrupts(lambda: setattr(self, "_in_pump", FdToStream(fd, stdin)))
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr)):
            choice = choices[name]
            if stream is None:
                continue
            if isinstance(choice, PipeEnd):
                Relay(PipeEnd(stream, writable=False), choice)
            elif choice == PIPE:
                raw = StreamReader(PipeEnd(stream, writable=False), f"<{name}>", pipesize)
                self._raw_readers[name] = raw
                handle: Any = raw if bufsize == 0 else io.BufferedReader(raw, _buffer_size(bufsize))
                if self.text_mode:
                    handle = io.TextIOWrapper(handle, encoding=self.encoding, errors=self.errors)
                setattr(self, name, handle)

    def _make_os_pipe(self, name: str) -> None:
        self._os_pipes[name] = _pipe_for(name)

    def _open_pipe_file(self, name: str, bufsize: int, line_buffering: bool) -> None:
        """Our end of pipe ``name`` as subprocess wraps it: ``io.open`` (buffered as ``bufsize`` says), text on top."""
        ends = self._os_pipes[name]
        writing = name == "stdin"
        handle: Any = open(ends[0], "wb" if writing else "rb", -1 if bufsize == 1 else bufsize)  # noqa: SIM115 (the Popen owns it, as subprocess.Popen does)
        ends[0] = -1  # the file owns it now
        if self.text_mode:
            handle = io.TextIOWrapper(
                handle,
                encoding=self.encoding,
                errors=self.errors,
                write_through=writing,
                line_buffering=writing and line_buffering,
            )
        setattr(self, name, handle)
        self._os_files.append(name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: returncode: {self.returncode} args: {self.args!r}>"

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, exc_type: Any, value: Any, traceback: Any) -> None:
        if self.stdout:
            self.stdout.close()
        if self.stderr:
            self.stderr.close()
        try:
            if self.stdin:
                self.stdin.close()
        finally:
            if exc_type is not KeyboardInterrupt and not self._abandoned:
                self.wait()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        process = getattr(self, "_process", None)  # absent when __init__ failed early
        if process is not None and self.returncode is None and process.returncode is None:
            _warn(f"remote subprocess {self.pid} is still running", ResourceWarning, source=self)

    # --- status -----------------------------------------------------------

    def poll(self) -> Optional[int]:
        """The return code if the child has exited, else None."""
        if self.returncode is None and self._process is not None:
            try:
                returncode = self._process.poll()
            except ConnectionLost:
                raise
            if returncode is not None:
                self._finish(returncode)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the child to exit; :class:`TimeoutExpired` after ``timeout`` seconds.

        Raises (once) instead of returning when output copied to a local fd
        is incomplete: ``ConnectionLost`` when the link went before its end,
        the local write's ``OSError`` when that failed and the child exited 0
        regardless (a child that still wrote got EPIPE, and its status says so).
        """
        if self.returncode is not None:
            return self._checked(self.returncode)
        assert self._process is not None
        try:
            returncode = self._process.wait(timeout)
        except TimeoutError:
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout) from None
        self._finish(returncode)
        return self._checked(returncode)

    def _checked(self, returncode: int) -> int:
        """``returncode``, unless the copied output's failure is yet to be raised."""
        error, self._output_error = self._output_error, None
        if error is not None:
            raise error
        return returncode

    def _finish(self, returncode: int) -> None:
        if self._in_pump is not None:
            self._in_pump.stop()
            self._in_pump = None
        if not self._sinks_done():
            # Output copied to local fds must be out before wait() returns, as it
            # would be locally; a grandchild holding the pipe open only delays us.
            deadline = Deadline(INHERIT_GRACE)
            for sink in self._sinks:
                sink.done.wait(deadline.left())
        self._output_error = self._output_failure(returncode)
        self.returncode = returncode

    def _sinks_done(self) -> bool:
        return all(sink.done.is_set() for sink in self._sinks)

    def _output_failure(self, returncode: int) -> Optional[OSError]:
        """What makes the copied output incomplete: its loss, or a local write error the child's status hides."""
        errors = [sink.error for sink in self._sinks if sink.error is not None]
        lost = [error for error in errors if isinstance(error, ConnectionLost)]
        if lost:
            return lost[0]
        return errors[0] if errors and returncode == 0 else None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child; nothing happens once it has exited."""
        self.poll()
        if self.returncode is None and self._process is not None:
            self._process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group, as a terminal signals its foreground job (remowt only).

        The child leads a group of its own unless ``process_group`` put it in another.
        Nothing happens once the child has exited (unlike :meth:`send_signal`, this
        does not poll, so it may be called while another thread waits).
        """
        if self._process is not None:
            self._process.signal_group(sig)

    def resize(self, cols: int, rows: int) -> None:
        """Set the size of the child's terminal (``pty=True``); its foreground job gets SIGWINCH."""
        if self._process is not None:
            self._process.resize(cols, rows)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def _kill_after_timeout(self) -> None:
        """Kill the child and wait for its exit, :data:`KILL_GRACE` seconds at most.

        An agent that does not answer in that time (stopped, or the network
        is down) gets the kill when it comes back; the caller is not held.
        """
        deadline = Deadline(KILL_GRACE)
        try:
            if self.returncode is None and self._process is not None and self._process.returncode is None:
                self._process.send_signal(9, deadline.remaining())
            self.wait(deadline.remaining())
        except (TimeoutError, TimeoutExpired, ConnectionLost):
            self._abandon()

    def _abandon(self) -> None:
        """Give the child up: close its streams here (waking a writer blocked on the agent) and wait for nothing."""
        self._abandoned = True
        if self._process is not None:
            self._process.close()
        self._wait_io(Deadline(KILL_GRACE))  # the communicate threads end at once: their streams are closed

    # --- communicate -------------------------------------------------------

    def communicate(self, input: Any = None, timeout: Optional[float] = None) -> Tuple[Any, Any]:
        """Send ``input``, read stdout and stderr to the end, and wait (as subprocess does).

        ``ConnectionLost`` if the link went before an output's end (even when
        the exit came first); what stops a reading thread (``MemoryError``) is raised as it is.
        """
        if self._communication_started and input:
            raise ValueError("Cannot send input after starting communication")
        deadline = Deadline(timeout)
        if not self._communication_started:
            self._start_communication(input)
        self._communication_started = True
        if not self._wait_io(deadline):
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout, output=self._partial("stdout"), stderr=self._partial("stderr"))
        if self._io_error is not None:  # the first failure of a thread: the others may never end
            raise self._io_error
        stdout: Any = self._collected("stdout")
        stderr: Any = self._collected("stderr")
        for handle in (self.stdout, self.stderr):
            if handle is not None:
                handle.close()
        if self.text_mode:
            stdout = None if stdout is None else _translate_newlines(stdout, self.encoding, self.errors)
            stderr = None if stderr is None else _translate_newlines(stderr, self.encoding, self.errors)
        self.wait(deadline.left())
        return stdout, stderr

    def _start_communication(self, input: Any) -> None:
        if self.stdin is not None:
            # As subprocess does: flush what the caller wrote (ValueError if they closed stdin).
            with contextlib.suppress(BrokenPipeError):
                self.stdin.flush()
            data = input
            if self.text_mode and data:
                stdin: Any = self.stdin
                data = data.encode(stdin.encoding, stdin.errors)
            if "stdin" in self._os_files:
                self._start_fd_io(_write_fd, self.stdin, data)
                with contextlib.suppress(BrokenPipeError):  # the thread's copy is the child's input now
                    self.stdin.close()
            else:
                self._start_io(self._write_input, data)
        for name in ("stdout", "stderr"):
            handle = getattr(self, name)
            if handle is None:
                continue
            collected = self._collected_output[name] = io.BytesIO()
            if name in self._os_files:
                # As subprocess does: the fd is read, whatever the file object holds in its buffers.
                if not handle.closed:
                    self._start_fd_io(_read_fd, handle, collected)
                continue
            raw = self._raw_readers[name]
            # Nothing read yet: no buffered layer holds bytes, so take the
            # stream's chunks as they are instead of copying them through it.
            binary = raw if not raw.touched else getattr(handle, "buffer", handle)
            read = raw.read_chunk if binary is raw else binary.read1
            self._start_io(_read_all, binary, read, collected)

    def _start_fd_io(self, target: Callable[..., None], handle: IO[Any], *args: Any) -> None:
        """Run ``target(fd, *args)`` on a communicate thread, ``fd`` a copy of ``handle``'s that the thread closes.

        The thread never touches the file object: the caller may close it meanwhile (``with Popen``
        after a timeout), and its fd's number may then be reused.
        """

        def take() -> None:
            fd = os.dup(handle.fileno())
            try:
                self._start_io_now(_closing, (fd, target, *args))
            except BaseException:
                os.close(fd)
                raise

        without_interrupts(take)

    def _start_io(self, target: Callable[..., None], *args: Any) -> None:
        """Run ``target(*args)`` on a communicate thread; communicate() raises what it raises."""
        without_interrupts(lambda: self._start_io_now(target, args))

    def _start_io_now(self, target: Callable[..., None], args: Tuple[Any, ...]) -> None:
        with self._io_lock:
            self._io_running += 1
        start(threading.Thread(target=self._run_io, args=(target, *args), name="remowt-communicate", daemon=True))

    def _wait_io(self, deadline: Deadline) -> bool:
        """Wait until every communicate thread ended or one failed; False if ``deadline`` passed first."""
        while True:
            with self._io_lock:
                if self._io_over():
                    return True
                waiter = self._io_ended.enlist()
            if not wait_on(waiter, deadline.left()):
                return self._io_over()

    def _io_over(self) -> bool:
        """Every communicate thread ended, or one failed."""
        return not self._io_running or self._io_error is not None

    def _run_io(self, target: Callable[..., None], *args: Any) -> None:
        error: Optional[BaseException] = None
        try:
            target(*args)
        except BaseException as e:
            error = e
        with self._io_lock:
            self._io_running -= 1
            if self._io_error is None:
                self._io_error = error
            self._io_ended.open()

    def _write_input(self, data: Optional[bytes]) -> None:
        """Write ``data`` to stdin and close it, as subprocess's ``_stdin_write``: a child that exits
        without reading its input is not an error."""
        stdin: Any = self.stdin
        with contextlib.suppress(BrokenPipeError, ValueError):
            if data:
                (stdin.buffer if self.text_mode else stdin).write(data)  # text: encoded already
        with contextlib.suppress(BrokenPipeError, ValueError):
            stdin.close()

    def _collected(self, name: str) -> Optional[bytes]:
        collected = self._collected_output.get(name)
        return None if collected is None else collected.getvalue()

    def _partial(self, name: str) -> Optional[bytes]:
        """What a timed-out communicate() has so far; None when nothing, as subprocess gives."""
        return self._collected(name) or None


def _read_all(handle: Any, read: Callable[[int], Any], collected: io.BytesIO) -> None:
    """Read ``handle`` (with ``read``) to the end into ``collected``, whose buffer then becomes the result.

    Whatever stops it early (``ConnectionLost`` before the end, ``MemoryError``) is raised.
    """
    while True:
        data = read(1 << 20)
        if data is None:  # the caller made the pipe non-blocking: wait until it is readable
            select.select([handle], [], [])
            continue
        if not data:
            return
        collected.write(data)


def _closing(fd: int, target: Callable[..., None], *args: Any) -> None:
    """``target(fd, *args)``, then close ``fd``."""
    try:
        target(fd, *args)
    finally:
        os.close(fd)


def _read_fd(fd: int, collected: io.BytesIO) -> None:
    """Read pipe ``fd`` to its end into ``collected``."""

    def read(size: int) -> Optional[bytes]:
        try:
            return os.read(fd, size)
        except BlockingIOError:  # the caller made the pipe non-blocking
            return None

    _read_all(fd, read, collected)


def _write_fd(fd: int, data: Optional[bytes]) -> None:
    """Write ``data`` to pipe ``fd``; a child that exits without reading it all is not an error (as subprocess)."""
    view = memoryview(data or b"")
    with contextlib.suppress(BrokenPipeError):
        while view:
            try:
                view = view[os.write(fd, view[: 1 << 20]) :]
            except BlockingIOError:  # the caller made the pipe non-blocking
                select.select([], [fd], [])


def _pipe_for(name: str) -> List[int]:
    """A pipe for stdio ``name``: [our end, the child's end]."""
    read_fd, write_fd = os.pipe()
    return [write_fd, read_fd] if name == "stdin" else [read_fd, write_fd]


def _close_end(ends: List[int], which: int) -> None:
    """Close ``ends[which]`` unless it is closed (-1) already, and mark it so."""
    fd, ends[which] = ends[which], -1
    if fd >= 0:
        os.close(fd)


def _buffer_size(bufsize: int) -> int:
    return bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE


def _translate_newlines(data: bytes, encoding: Optional[str], errors: Optional[str]) -> str:
    text = data.decode(encoding or locale.getpreferredencoding(False), errors or "strict")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- module functions, as in CPython's subprocess ----------------------------


def run(
    *popenargs: Any,
    input: Any = None,
    capture_output: bool = False,
    timeout: Optional[float] = None,
    check: bool = False,
    **kwargs: Any,
) -> CompletedProcess[Any]:
    """Run a command and wait for it; see :func:`subprocess.run`."""
    if input is not None:
        if kwargs.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        kwargs["stdin"] = PIPE
    if capture_output:
        if kwargs.get("stdout") is not None or kwargs.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        kwargs["stdout"] = PIPE
        if not kwargs.get("pty"):  # on a terminal stderr is in stdout
            kwargs["stderr"] = PIPE
    deadline = Deadline(timeout)
    with _spawn(deadline, popenargs, kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=deadline.left())
        except TimeoutExpired as e:
            assert timeout is not None
            e.timeout = timeout
            process._kill_after_timeout()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.poll()
        assert retcode is not None
        if check and retcode:
            raise CalledProcessError(retcode, process.args, output=stdout, stderr=stderr)
    return CompletedProcess(process.args, retcode, stdout, stderr)


def _spawn(deadline: Deadline, popenargs: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Popen:
    """``Popen(*popenargs, **kwargs)`` started within ``deadline`` (``TimeoutExpired`` when it is not)."""
    try:
        return Popen(*popenargs, **{**kwargs, "spawn_timeout": deadline.shorter(kwargs.get("spawn_timeout"))})
    except TimeoutError:
        if deadline.timeout is None:
            raise
        args: Args = kwargs["args"] if "args" in kwargs else popenargs[0]
        raise TimeoutExpired(args, deadline.timeout) from None


def call(*popenargs: Any, timeout: Optional[float] = None, **kwargs: Any) -> int:
    """Run a command and return its return code; see :func:`subprocess.call`."""
    deadline = Deadline(timeout)
    with _spawn(deadline, popenargs, kwargs) as process:
        try:
            return process.wait(timeout=deadline.left())
        except TimeoutExpired as e:
            assert timeout is not None
            e.timeout = timeout
            process._kill_after_timeout()
            raise
        except BaseException:
            process.kill()
            raise


def check_call(*popenargs: Any, **kwargs: Any) -> int:
    """Run a command; raise :class:`CalledProcessError` if it fails."""
    retcode = call(*popenargs, **kwargs)
    if retcode:
        cmd = kwargs.get("args")
        if cmd is None:
            cmd = popenargs[0]
        raise CalledProcessError(retcode, cmd)
    return 0


def check_output(*popenargs: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
    """Run a command and return its stdout; raise :class:`CalledProcessError` if it fails."""
    for name in ("stdout", "check"):
        if name in kwargs:
            raise ValueError(f"{name} argument not allowed, it will be overridden.")
    if "input" in kwargs and kwargs["input"] is None:
        text = kwargs.get("universal_newlines") or kwargs.get("text") or kwargs.get("encoding") or kwargs.get("errors")
        kwargs["input"] = "" if text else b""
    return run(*popenargs, stdout=PIPE, timeout=timeout, check=True, **kwargs).stdout


def getstatusoutput(
    cmd: Any, *, encoding: Optional[str] = None, errors: Optional[str] = None, **kwargs: Any
) -> Tuple[int, str]:
    """Return ``(exitcode, output)`` of a shell command; see :func:`subprocess.getstatusoutput`."""
    try:
        data = check_output(cmd, shell=True, text=True, stderr=STDOUT, encoding=encoding, errors=errors, **kwargs)
        exitcode = 0
    except CalledProcessError as ex:
        data = ex.output
        exitcode = ex.returncode
    if data[-1:] == "\n":
        data = data[:-1]
    return exitcode, data


def getoutput(cmd: Any, *, encoding: Optional[str] = None, errors: Optional[str] = None, **kwargs: Any) -> str:
    """Return the output of a shell command; see :func:`subprocess.getoutput`."""
    return getstatusoutput(cmd, encoding=encoding, errors=errors, **kwargs)[1]
