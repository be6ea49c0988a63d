"""A node: one address on a connection (the agent, the privileged agent, later a plugin), with one face.

Every node has the same face: ``ping`` and ``info``, ``spawn`` and the
:mod:`subprocess` face bound to it (``Popen``, ``run``, ``check_output`` …,
``cmd``), and typed proxies of the services it serves (:meth:`Node.service`).
What differs between nodes is how they get ready (the privileged agent starts
on first use: :meth:`Node._ready`) and what closing them means.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import socket
import time
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union, overload

import msgspec

from ..endpoints.control import ControlApi, NodeInfo
from ..endpoints.plugins import PluginInfo
from ..endpoints.subprocess import OsName, SpawnOptions, SpawnSpec, SubprocessApi, os_bytes
from ..errors import ConnectionLost, MessageTooLarge, RemoteError, Unreachable, os_name_text
from ..protocol.service import Result, Service, proxy, timed
from ..rpc.link import Link, held_mark, held_sends, held_undo, holding_sends
from ..rpc.router import Pending, Router
from ..rpc.streams import Stream
from ..runtime.deadline import Deadline
from ..runtime.interrupts import without_interrupts
from ..transports.fdpass import FdSender
from . import plugins as _plugins
from . import popen as _popen
from . import sockets as _sockets
from . import systemd as _systemd
from . import transfer as _transfer
from .children import Children
from .command import Command
from .paths import RemotePath
from .pipes import FdWriter, FdWriters
from .process import OutputHandler, RemoteProcess
from .transfer import LocalPath, Progress, RemoteArg

S = TypeVar("S", bound=Service)
_SPAWN = SubprocessApi.methods["spawn"]
_RELEASE = SubprocessApi.methods["release"]
_SIGNAL = SubprocessApi.methods["send_signal"]
PIPE = _popen.PIPE
DEVNULL = _popen.DEVNULL
STDOUT = _popen.STDOUT
CLOSED = _popen.CLOSED
STDIO = ("stdin", "stdout", "stderr")
NO_OPTIONS = SpawnOptions()
#: What a command may be, as for :class:`subprocess.Popen`: a string (a shell line with ``shell=True``) or a sequence.
Args = Union[str, bytes, "os.PathLike[str]", Sequence[Union[str, bytes, "os.PathLike[str]"]]]


class Node:
    """One address's face on a connection; see the module docstring.

    ``call_timeout`` bounds each call that should answer at once (``ping``,
    ``info``, ``spawn``, signals) when the caller gives no timeout: a stopped
    agent or a dead network is then a ``TimeoutError``, not a hang.
    """

    PIPE = _popen.PIPE
    DEVNULL = _popen.DEVNULL
    STDOUT = _popen.STDOUT
    CompletedProcess = _popen.CompletedProcess
    SubprocessError = _popen.SubprocessError
    CalledProcessError = _popen.CalledProcessError
    TimeoutExpired = _popen.TimeoutExpired

    def __init__(
        self,
        router: Router,
        address: str,
        *,
        description: str,
        children: Children,
        fd_writers: FdWriters,
        call_timeout: Optional[float],
    ) -> None:
        self.router = router
        self.address = address
        self.description = description
        self.call_timeout = call_timeout
        self.children = children
        self.fd_writers = fd_writers
        self._popen_class: Optional[Type[_popen.Popen]] = None
        #: For an agent started here by this process (``connect_local``): the environment it started with. Its
        #: children then get this process's cwd and environment as they are at each spawn, as subprocess's do.
        self.started_env: Optional[Dict[bytes, bytes]] = None
        #: For an agent started here by this process: how its children get this process's fds as their stdio.
        self.fd_sender: Optional[FdSender] = None
        self._control = proxy(ControlApi, router, address, call_timeout)
        self._subprocess = proxy(SubprocessApi, router, address, call_timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}{' closed' if self.closed else ''}>"

    @property
    def closed(self) -> bool:
        """Whether the connection is closed."""
        return self.children.closed

    @property
    def privileged(self) -> Node:
        """The privileged agent's node, where this node has one (``Popen(..., sudo=True)`` goes there)."""
        raise ValueError(f"{self.description} has no privileged agent")

    def _ready(self, timeout: Optional[float]) -> Optional[float]:
        """Get ready for a call that may take ``timeout`` seconds; what is left of it (the agent: all of it)."""
        return timeout

    def service(self, declaration: Type[S], timeout: Optional[float] = None) -> S:
        """A typed proxy of the service ``declaration`` served here (``timeout`` per call; None: call_timeout)."""
        self._ready(None)
        return proxy(declaration, self.router, self.address, self.call_timeout if timeout is None else timeout)

    # --- plugins --------------------------------------------------------

    def load_plugin(self, name: str, timeout: Optional[float] = None) -> _plugins.Plugin:
        """Start the plugin ``name`` shipped with this node's agent as ``plugin(n)``; its handle (a context manager).

        Plugins are shipped with the agent's code (``plugins=`` of the
        connectors, ``remowt bundle build --plugin``), so a name always means
        the code this client sent. ``PluginError`` names what went wrong (an
        unknown name, a plugin that ended before its handshake, with its stderr).
        """
        self._ready(None)
        return _plugins.load(self, name, timeout)

    def load_plugin_path(
        self, path: Union[str, bytes, os.PathLike[str]], timeout: Optional[float] = None
    ) -> _plugins.Plugin:
        """Start the executable file ``path`` on this node's machine as a plugin (see :meth:`load_plugin`).

        It is executed as it is, a ``.py`` file too (by its ``#!`` line), with
        ``PYTHONPATH`` starting with the agent's code. A missing or
        non-executable file is the ``OSError`` exec gave.
        """
        self._ready(None)
        return _plugins.load_path(self, path, timeout)

    def plugins(self) -> List[PluginInfo]:
        """The plugins running on this node."""
        self._ready(None)
        return _plugins.loaded(self)

    def shipped_plugins(self) -> List[str]:
        """The names of the plugins shipped with this node's agent (what :meth:`load_plugin` takes)."""
        self._ready(None)
        return _plugins.available(self)

    @property
    def systemd(self) -> _systemd.Systemd:
        """This node's systemd (:class:`~remowt.user.systemd.Systemd`; ``.user``: the user's ``--user`` manager)."""
        return _systemd.Systemd(self)

    def path(self, *segments: Union[str, bytes, os.PathLike[str]]) -> RemotePath:
        """A path here with :class:`pathlib.Path`'s face (:class:`~remowt.user.paths.RemotePath`)."""
        return RemotePath(self, *segments)

    # --- sockets --------------------------------------------------------

    def connect_unix(self, path: Union[str, bytes, os.PathLike[str]], timeout: Optional[float] = None) -> socket.socket:
        """A socket here joined to the unix socket ``path`` there (``timeout`` to connect; None: call_timeout).

        A real :class:`socket.socket` (one end of a socketpair; remowt pumps
        the other), so any socket code works on it. The ``OSError`` of a
        failed connect arrives as raised there (``FileNotFoundError``, ``PermissionError`` …).
        """
        return _sockets.connect(self, _sockets.socket_address(path), timeout)

    def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None) -> socket.socket:
        """A socket here joined to TCP ``host``:``port`` as reached from there; see :meth:`connect_unix`."""
        return _sockets.connect(self, _sockets.socket_address((host, port)), timeout)

    def forward_local(
        self, local: _sockets.Address, remote: _sockets.Address, *, connect_timeout: Optional[float] = None
    ) -> _sockets.LocalForward:
        """``ssh -L``: listen at ``local`` here; each connection reaches ``remote`` from there (a context manager).

        An address is a path (unix socket), ``(host, port)`` or a port on
        localhost; ``.address`` says where it listens (the port chosen for 0).
        """
        return _sockets.LocalForward(self, local, remote, connect_timeout)

    def forward_remote(
        self, remote: Optional[_sockets.Address], local: _sockets.Address, *, mode: Optional[int] = None
    ) -> _sockets.RemoteForward:
        """``ssh -R``: listen at ``remote`` there; each connection reaches ``local`` here (a context manager).

        ``remote`` None: a new unix socket in the runtime dir there
        (``$XDG_RUNTIME_DIR``, else a private temporary directory), ``mode``
        its permissions; ``.address`` says where it listens.
        """
        return _sockets.RemoteForward(self, remote, local, mode)

    def forward_nix_daemon(
        self, local: _sockets.Address, remote: _sockets.Address = _sockets.NIX_DAEMON_SOCKET
    ) -> _sockets.LocalForward:
        """The nix daemon's socket here (``remote``) at ``local`` on this machine (root-only: through privileged)."""
        return _sockets.forward_nix_daemon(self, local, remote)

    def put(
        self,
        local: LocalPath,
        remote: RemoteArg,
        *,
        recursive: bool = False,
        preserve: bool = True,
        progress: Optional[Progress] = None,
    ) -> RemotePath:
        r"""Copy the local file ``local`` (a whole tree with ``recursive``) here, to ``remote``; where it landed.

        As scp: into ``remote`` when it is an existing directory, else as
        ``remote``. ``preserve`` keeps mode and times (and owner when this
        node is root); symbolic links stay links. A file lands whole or not at
        all (an atomic write). ``progress(bytes_done, bytes_total,
        files_done, files_total)`` is called in this thread as they change.
        Errors are each an ``OSError`` with errno and file name; an interrupt
        stops every file in flight, leaving each destination as it was.
        """
        return _transfer.put(self, local, remote, recursive=recursive, preserve=preserve, progress=progress)

    def get(
        self,
        remote: RemoteArg,
        local: LocalPath,
        *,
        recursive: bool = False,
        preserve: bool = True,
        progress: Optional[Progress] = None,
    ) -> str:
        """Copy ``remote`` here (a whole tree with ``recursive``) to the local ``local``; where it landed.

        The mirror of :meth:`put`: each local file is written beside its
        target, synced and renamed into place (owner kept when this process is root).
        """
        return _transfer.get(self, remote, local, recursive=recursive, preserve=preserve, progress=progress)

    # --- health ---------------------------------------------------------

    def ping(self, timeout: Optional[float] = None) -> float:
        """One no-op round trip; returns how long it took, in seconds.

        ``TimeoutError`` after ``timeout`` seconds (None: :attr:`call_timeout`).
        """
        timeout = self._ready(timeout)
        control = self._control if timeout is None else timed(self._control, timeout)
        start = time.perf_counter()
        control.ping()
        return time.perf_counter() - start

    def info(self, timeout: Optional[float] = None) -> NodeInfo:
        """Who serves here: pid, uid, Python version and machine (``timeout`` as for :meth:`ping`)."""
        timeout = self._ready(timeout)
        return (self._control if timeout is None else timed(self._control, timeout)).info()

    # --- the subprocess face ---------------------------------------------

    @property
    def Popen(self) -> Type[_popen.Popen]:
        """:class:`remowt.Popen` bound to this node (a subclass, so isinstance works)."""
        if self._popen_class is None:
            self._popen_class = type("Popen", (_popen.Popen,), {"_bound_connection": self})
        return self._popen_class

    def open_shell(
        self, term: Optional[str] = None, cols: Optional[int] = None, rows: Optional[int] = None, *, sudo: bool = False
    ) -> _popen.Popen:
        """The login shell on a terminal of its own here, as ``ssh HOST`` opens one (as root with ``sudo``).

        Its ``stdin`` and ``stdout`` are pipes to the terminal; ``TERM``
        and the size are this process's own unless given (else
        ``xterm-256color``, 80x24). ``resize()`` changes the size.
        """
        terminal = _popen.make_terminal(term, cols, rows)
        return self.Popen([], stdin=_popen.PIPE, stdout=_popen.PIPE, pty=terminal, sudo=sudo, user_shell=True)

    @overload
    def run(self, args: Args, *, text: Literal[True], **kwargs: Any) -> _popen.CompletedProcess[str]: ...
    @overload
    def run(self, args: Args, *, encoding: str, **kwargs: Any) -> _popen.CompletedProcess[str]: ...
    @overload
    def run(self, args: Args, *, errors: str, **kwargs: Any) -> _popen.CompletedProcess[str]: ...
    @overload
    def run(self, args: Args, *, universal_newlines: Literal[True], **kwargs: Any) -> _popen.CompletedProcess[str]: ...
    @overload
    def run(
        self,
        args: Args,
        *,
        text: Literal[False, None] = None,
        encoding: None = None,
        errors: None = None,
        universal_newlines: Literal[False, None] = None,
        **kwargs: Any,
    ) -> _popen.CompletedProcess[bytes]: ...
    @overload
    def run(self, args: Args, **kwargs: Any) -> _popen.CompletedProcess[Union[str, bytes]]: ...
    def run(self, args: Args, **kwargs: Any) -> _popen.CompletedProcess[Any]:
        """:func:`remowt.run` on this node (its output is str in text mode, else bytes, as :func:`subprocess.run`)."""
        return _popen.run(args, connection=self, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> int:
        """:func:`remowt.call` on this node."""
        return _popen.call(*args, connection=self, **kwargs)

    def check_call(self, *args: Any, **kwargs: Any) -> int:
        """:func:`remowt.check_call` on this node."""
        return _popen.check_call(*args, connection=self, **kwargs)

    @overload
    def check_output(self, args: Args, *, text: Literal[True], **kwargs: Any) -> str: ...
    @overload
    def check_output(self, args: Args, *, encoding: str, **kwargs: Any) -> str: ...
    @overload
    def check_output(self, args: Args, *, errors: str, **kwargs: Any) -> str: ...
    @overload
    def check_output(self, args: Args, *, universal_newlines: Literal[True], **kwargs: Any) -> str: ...
    @overload
    def check_output(
        self,
        args: Args,
        *,
        text: Literal[False, None] = None,
        encoding: None = None,
        errors: None = None,
        universal_newlines: Literal[False, None] = None,
        **kwargs: Any,
    ) -> bytes: ...
    @overload
    def check_output(self, args: Args, **kwargs: Any) -> Union[str, bytes]: ...
    def check_output(self, args: Args, **kwargs: Any) -> Union[str, bytes]:
        """:func:`remowt.check_output` on this node: str in text mode, else bytes, as in :mod:`subprocess`."""
        output: Union[str, bytes] = _popen.check_output(args, connection=self, **kwargs)
        return output

    def getoutput(self, cmd: Any, **kwargs: Any) -> str:
        """:func:`remowt.getoutput` on this node."""
        return _popen.getoutput(cmd, connection=self, **kwargs)

    def getstatusoutput(self, cmd: Any, **kwargs: Any) -> Tuple[int, str]:
        """:func:`remowt.getstatusoutput` on this node."""
        return _popen.getstatusoutput(cmd, connection=self, **kwargs)

    def cmd(self, program: str) -> Command:
        """A :class:`~remowt.user.command.Command` builder for ``program`` on this node."""
        return Command(self, program)

    def fd_writer(self, fd: int) -> FdWriter:
        """The writer that copies children's output to local fd ``fd`` (for inherited stdio)."""
        return self.fd_writers.get(fd)

    # --- processes ------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[OsName],
        options: SpawnOptions = NO_OPTIONS,
        *,
        stdin: int = DEVNULL,
        stdout: int = DEVNULL,
        stderr: int = DEVNULL,
        outputs: Optional[Mapping[str, OutputHandler]] = None,
        passed: Optional[Mapping[str, int]] = None,
        timeout: Optional[float] = None,
    ) -> RemoteProcess:
        """Start ``argv`` here, as ``options`` say; its items go to ``execve`` as ``os.fsencode`` makes them.

        Each of ``stdin``/``stdout``/``stderr`` is ``PIPE`` (a
        :class:`~remowt.rpc.streams.Stream` on the result), ``DEVNULL`` or
        ``CLOSED`` (see :data:`remowt.user.popen.CLOSED`); ``stderr`` may also
        be ``STDOUT``.

        ``outputs`` maps ``"stdout"`` or ``"stderr"`` (whose mode is then
        ignored) to a handler of an output opened only when needed: it gets the
        stream once the child writes there, or exits with the pipe still open,
        else None when the child exits. It runs on the thread reading the link,
        before anything arrives on the stream, and must not block.

        ``passed`` maps stdio names (whose mode is then ignored) to fds of this
        process that the child gets as they are, as a local child would: only
        where :attr:`fd_sender` is set (an agent this process started here).
        So are this process's fds that ``options.pass_fds`` names, at the same
        numbers. The caller keeps its fds; they must stay open until this returns.

        Without an answer within ``timeout`` seconds (None: :attr:`call_timeout`)
        it raises ``TimeoutError``; a child the agent starts after that is
        killed as soon as its start is reported.
        """
        args = [os_bytes(a, f"argv[{i}]") for i, a in enumerate(argv)]
        if not args and not options.user_shell:
            raise ValueError("argv must not be empty (but for the user's login shell)")
        _check_mode("stdin", stdin, (PIPE, DEVNULL, CLOSED))
        _check_mode("stdout", stdout, (PIPE, DEVNULL, CLOSED))
        _check_mode("stderr", stderr, (PIPE, DEVNULL, STDOUT, CLOSED))
        lazy = dict(outputs or {})
        if not set(lazy) <= {"stdout", "stderr"}:
            raise ValueError(f"outputs may name stdout and stderr, got {sorted(lazy)}")
        if "stdout" in lazy:
            stdout = DEVNULL
        if "stderr" in lazy:
            stderr = DEVNULL
        given = dict(passed or {})
        if not set(given) <= set(STDIO) or set(given) & set(lazy):
            raise ValueError(f"passed may name stdin, stdout and stderr not in outputs, got {sorted(given)}")
        sender = self.fd_sender
        handed = [*given.values(), *options.pass_fds]
        if handed and sender is None:
            raise ValueError(f"{self.description} cannot take this process's fds (only an agent started here can)")
        modes = {name: DEVNULL if name in given else mode for name, mode in zip(STDIO, (stdin, stdout, stderr))}
        stdin, stdout, stderr = modes["stdin"], modes["stdout"], modes["stderr"]
        timeout = self._ready(timeout)
        opened: List[Stream] = []

        def open_pipe(mode: int, reader: bool) -> Optional[Stream]:
            if mode != PIPE:
                return None
            stream = self.router.open_stream(self.address)
            opened.append(stream)
            if reader:
                stream.close_write()
            return stream

        handle = self.children.next_handle()
        if holding_sends():  # the call must leave before its answer is awaited
            raise RuntimeError("spawn cannot be called inside held_sends()")
        try:
            with held_sends():  # releases, stream opens and the call leave in one write
                self._send_releases()
                mark = held_mark()
                streams = (open_pipe(stdin, False), open_pipe(stdout, True), open_pipe(stderr, True))
                process = RemoteProcess(
                    self._subprocess,
                    handle,
                    [os.fsdecode(a) for a in args],
                    *streams,
                    lazy,
                    functools.partial(self.router.wait_for, self.address),
                )
                self.children.add(self.address, process, repr(self))
                spec = SpawnSpec(
                    handle=handle,
                    argv=args,
                    options=options,
                    stdin=None if streams[0] is None else streams[0].sid,
                    stdout=None if streams[1] is None else streams[1].sid,
                    stderr=None if streams[2] is None else streams[2].sid,
                    stderr_to_stdout=stderr == STDOUT,
                    lazy_stdout="stdout" in lazy,
                    lazy_stderr="stderr" in lazy,
                    closed=[name for name, mode in zip(STDIO, (stdin, stdout, stderr)) if mode == CLOSED],
                    passed=list(given),
                )
                try:
                    pending = self.router.call(
                        self.address, SubprocessApi.namespace, _SPAWN.number, _SPAWN.encode_args((spec,), {})
                    )
                except MessageTooLarge as e:
                    _unsend(opened, mark)
                    why = f"the spawn request is {e.size} bytes, over the agent's frame limit of {e.limit}"
                    program = os_name_text(options.executable or args[0]) if args else "the login shell"
                    raise OSError(errno.E2BIG, f"{os.strerror(errno.E2BIG)} ({why})", program) from None
                if handed:
                    assert sender is not None
                    limit = self.call_timeout if timeout is None else timeout
                    _send_fds(sender, handle, handed, limit, (pending, opened, mark))
            try:
                process.pid = _SPAWN.decode_result(self._spawned(pending, process, timeout))
            except msgspec.ValidationError as e:
                raise RemoteError(f"{_SPAWN.name} returned a malformed result: {e}") from None
        except BaseException:
            self.children.discard(handle)
            for stream in opened:
                stream.close()
            raise
        return process

    def _spawned(self, pending: Pending, process: RemoteProcess, timeout: Optional[float]) -> Result:
        """The spawn's answer; on a timeout, the call is left to :meth:`_spawned_late` and ``TimeoutError`` raised."""
        timeout = self.call_timeout if timeout is None else timeout
        if pending.wait(timeout) or not pending.abandon(functools.partial(self._spawned_late, process)):
            return pending.result()
        raise TimeoutError(f"{self.address} did not answer the spawn of {process.args[0]!r} within {timeout:g} s")

    def _spawned_late(self, process: RemoteProcess, result: Optional[Result], error: Optional[BaseException]) -> None:
        """A spawn answered after its caller gave up: kill the child (its exit, as any, lets the agent forget it)."""
        if error is not None or self.closed:
            return
        with contextlib.suppress(ConnectionLost, Unreachable):
            args = _SIGNAL.encode_args((process.handle, signal.SIGKILL), {})
            self.router.notify(self.address, SubprocessApi.namespace, _SIGNAL.number, args)

    def _send_releases(self) -> None:
        """Let the nodes forget the children whose exits arrived (sent with the next spawn, off the exit path)."""
        for address, handle in self.children.take_releases():
            with contextlib.suppress(ConnectionLost, Unreachable):  # else that node is gone, its children too
                args = _RELEASE.encode_args((handle,), {})
                self.router.notify(address, SubprocessApi.namespace, _RELEASE.number, args)


def _send_fds(
    sender: FdSender,
    handle: int,
    fds: List[int],
    timeout: Optional[float],
    held: Tuple[Pending, List[Stream], Dict[Link, int]],
) -> None:
    """Send the spawn's fds just before its ``held`` call leaves; if they do not go, neither does the call.

    Whether they went is noted in the same uninterruptible step as the send: a
    Ctrl-C right after it leaves the call to go, so the agent takes them.
    """
    sent: List[bool] = []

    def attempt() -> bool:
        if sender.try_send(handle, fds):
            sent.append(True)
        return bool(sent)

    deadline = Deadline(timeout)
    try:
        while not without_interrupts(attempt):
            if not sender.wait_writable(deadline.left()) and deadline.expired():
                raise TimeoutError(f"the local agent took no fds for the spawn within {timeout:g} s")
    finally:
        if not sent:
            pending, opened, mark = held
            _unsend(opened, mark)
            pending.abandon()  # never sent: nothing will answer it


def _unsend(streams: List[Stream], mark: Dict[Link, int]) -> None:
    """Close ``streams`` and drop their held opens (and what followed): the peer never hears of them."""
    for stream in streams:
        stream.close()
    streams.clear()
    held_undo(mark)


def _check_mode(name: str, mode: int, allowed: Sequence[int]) -> None:
    if mode not in allowed:
        names = {PIPE: "PIPE", DEVNULL: "DEVNULL", STDOUT: "STDOUT", CLOSED: "CLOSED"}
        raise ValueError(f"{name} must be one of {', '.join(names[m] for m in allowed)}, got {mode!r}")
