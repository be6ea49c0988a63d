"""The ``remowt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import select
import signal
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, TextIO, Tuple

from .endpoints.editor import FileEditApi
from .errors import ConnectionLost, RemowtError
from .runtime.interrupts import start
from .transports.stdio import pipe_above_stdio
from .user import connect as client
from .user.connection import Remowt
from .user.editing import edit_locally, lend_terminal
from .user.node import Node
from .user.popen import CLOSED, DEVNULL, PIPE, Popen, make_terminal
from .user.sockets import NIX_DAEMON_SOCKET, Address, Bound, bound, socket_address
from .version import __version__

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remowt",
        description="Run processes on another machine (or this one) through a remowt agent.",
    )
    parser.add_argument("--version", action="version", version=f"remowt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    local = commands.add_parser(
        "local",
        help="run a command (or a login shell) through a local agent",
        usage="remowt local [-h] [-t | -T] [-n] [--sudo] [[--] ARGV ...]",
        description=(
            "Start a remowt agent on this machine and run ARGV through it (as it is: no shell), with this "
            "terminal's stdin, stdout and stderr wired through; exit with its exit code (128+N if it was "
            "killed by signal N, like a shell). Without ARGV, your login shell, on a terminal of its own."
        ),
    )
    ssh = commands.add_parser(
        "ssh",
        help="run a command (or a login shell) on an ssh host through a remowt agent",
        usage="remowt ssh [-h] [options] HOST [COMMAND ... | -- ARGV ...]",
        description=(
            "Connect to HOST over ssh (honouring ~/.ssh/config and known_hosts), deploy the agent if the host "
            "does not have it yet, and run there, with this terminal's stdin, stdout and stderr wired through: "
            "COMMAND as ssh runs it (its words joined by spaces into one line for your shell there), or ARGV "
            "after -- as it is (no shell: each word one argument), or with neither your login shell on a "
            "terminal. Options may follow HOST; the first word after it that is no option starts COMMAND. "
            "Exit with the command's exit code (128+N if it was killed by signal N; 255 if the connection failed)."
        ),
    )
    ssh.add_argument("host", help="host name or ~/.ssh/config alias, optionally user@host")
    edit = commands.add_parser(
        "edit",
        help="edit a file of an ssh host in your editor",
        description=(
            "Open PATH on HOST in your editor here ($VISUAL, else $EDITOR, else vi) and save it back there "
            "atomically, keeping its mode and owner, if you changed it (--sudo: through the privileged agent, "
            "for files only root may write)."
        ),
    )
    edit.add_argument("target", metavar="HOST:PATH", help="the host (as for remowt ssh) and the file's path there")
    edit.add_argument("--sudo", action="store_true", help="read and write the file as root")
    cp = commands.add_parser(
        "cp",
        help="copy files and trees to or from an ssh host (scp's syntax)",
        usage="remowt cp [-h] [-r] [-p] [--sudo] [options] SRC... DST",
        description=(
            "Copy SRC... to DST, where either side (not both) is HOST:PATH, as with scp (a local path with a colon "
            "can be written ./a:b). Several SRC go into the directory DST. Each file lands whole or not at all. "
            "A progress bar on stderr when it is a terminal. The port is -P, as scp has it."
        ),
    )
    cp.add_argument("paths", nargs="+", metavar="SRC... DST", help="what to copy, and where")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy directories and everything in them")
    cp.add_argument("-p", "--preserve", action="store_true", help="keep modes and times (owners too, as root)")
    cp.add_argument("--sudo", action="store_true", help="read and write the host's files as root")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cp.add_argument("-P", "--port", type=int, help="port to connect to")
    socket_commands = _add_socket_parsers(commands)
    unit = _add_unit_parser(commands)
    for command in (ssh, edit, *socket_commands, unit):
        command.add_argument("-p", "--port", type=int, help="port to connect to")
    for command in (ssh, edit, cp, *socket_commands, unit):
        command.add_argument("-l", "--login", metavar="USER", help="user to log in as")
        command.add_argument("-i", "--identity", metavar="KEY", action="append", help="private key file (repeatable)")
        command.add_argument("-F", "--config", metavar="FILE", help="ssh config file (default ~/.ssh/config)")
        command.add_argument(
            "--accept-new-host-key",
            action="store_true",
            help="trust an unknown host's key and record it in known_hosts (changed keys are still refused)",
        )
    for command in (local, ssh):
        tty = command.add_mutually_exclusive_group()
        tty.add_argument(
            "-t",
            dest="tty",
            action="store_const",
            const=True,
            help="run it on a terminal of its own (the default with no command when stdin is a terminal)",
        )
        tty.add_argument("-T", dest="tty", action="store_const", const=False, help="never a terminal")
        command.add_argument("-n", dest="no_stdin", action="store_true", help="stdin from /dev/null")
        command.add_argument("--sudo", action="store_true", help="run it as root, through the privileged agent")
    _add_bundle_parser(commands)
    return parser


#: Options of each command that take a value (the next word, unless joined to it).
VALUE_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "ssh": ("-p", "--port", "-l", "--login", "-i", "--identity", "-F", "--config"),
    "local": (),
}
POSITIONALS = {"ssh": 1, "local": 0}


class Words(NamedTuple):
    """A command line taken apart: what argparse reads, and the command to run (None: none given)."""

    options: List[str]
    command: Optional[List[str]]
    as_argv: bool  # the command came after --: exec it as it is


def split_words(words: List[str]) -> Words:
    """Cut ``remowt local|ssh ...`` where the command starts: at ``--``, or the first word no option takes.

    Before that (and between options) come HOST for ssh and the options, in
    any order, as with ssh: ``remowt ssh HOST ls -l`` runs ``ls -l``.
    """
    name = words[0] if words else ""
    if name not in VALUE_OPTIONS:
        return Words(words, None, False)
    options, positionals, i = [name], 0, 1
    while i < len(words):
        word = words[i]
        if word == "--":
            return Words(options, words[i + 1 :], True)
        if word.startswith("-") and word != "-":
            options.append(word)
            if word in VALUE_OPTIONS[name] and i + 1 < len(words):
                options.append(words[i + 1])
                i += 1
        elif positionals < POSITIONALS[name]:
            options.append(word)
            positionals += 1
        else:
            return Words(options, words[i:], False)
        i += 1
    return Words(options, None, False)


def _add_bundle_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="build and list the agent bundle deployed to targets",
        description=(
            "The agent bundle holds one artifact per target platform (uname -m + Python tag, e.g. "
            "x86_64-cp311): the remowt package and msgspec built for that platform."
        ),
    )
    actions = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="(re)build the artifact for this interpreter's platform",
        description=(
            "Build the artifact for this interpreter's platform from the installed remowt and msgspec. "
            "With --plugin, every artifact also ships those plugins (loaded by name: conn.load_plugin)."
        ),
    )
    shipped = build.add_mutually_exclusive_group()
    shipped.add_argument(
        "--plugin",
        action="append",
        metavar="SRC",
        help="ship this plugin: a Python package directory (with __main__.py), a module (NAME.py) or an "
        "executable file; repeat for more. They replace the plugins the bundle shipped (default: keep them)",
    )
    shipped.add_argument("--no-plugins", action="store_true", help="ship no plugins any more")
    add = actions.add_parser(
        "add",
        help="add a platform from a msgspec wheel fetched with pip",
        description=(
            "Fetch a manylinux msgspec wheel for PLATFORM with pip (the newest release not newer than the "
            "installed one that supports that Python), keep it in the bundle, and build the artifact."
        ),
    )
    add.add_argument("--platform", required=True, help="the target's `uname -m` and Python tag, e.g. aarch64-cp39")
    add.add_argument("--msgspec-version", metavar="VERSION", help="use exactly this msgspec release")
    listing = actions.add_parser(
        "list", help="show the platforms, their sha256 and sources", description="Show the bundle's platforms."
    )
    for action in (build, add, listing):
        action.add_argument(
            "--dir",
            help="the bundle directory (default: $REMOWT_BUNDLE_DIR, else the checkout's agent_bundle/, "
            "else ~/.cache/remowt/bundle)",
        )


def _bundle_main(args: argparse.Namespace) -> int:
    """``remowt bundle build|add|list``: print what was done; exit 1 with the reason when it fails."""
    from .deploy import bundle
    from .deploy.plugins import plugin_name

    directory = os.path.abspath(args.dir) if args.dir else bundle.default_bundle_dir()
    try:
        if args.bundle_command == "build":
            digest = bundle.build_local(directory, [] if args.no_plugins else args.plugin)
            print(f"{bundle.local_platform()} {digest} in {directory}")
        elif args.bundle_command == "add":
            added = bundle.add_platform(directory, args.platform, args.msgspec_version)
            print(f"{added.platform} {added.sha256} in {directory} (msgspec {added.msgspec_version})")
        else:
            infos = bundle.describe(directory)
            print(f"agent bundle {directory}:")
            for info in infos:
                state = {True: "current", False: "stale: sources changed", None: "made elsewhere"}[info.current]
                made = f"msgspec {info.msgspec_version} from {info.source}" if info.source else ""
                print(f"{info.platform:<16} {info.sha256}  {state}  {made}".rstrip())
            for source in bundle.read_plugin_sources(directory):
                print(f"plugin {plugin_name(source)}: {source}")
    except bundle.BundleError as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 1
    return 0


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Interrupted(BaseException):
    """The third SIGINT, SIGTERM or SIGHUP: the CLI ends at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class SignalForwarder:
    """What SIGINT, SIGTERM and SIGHUP do to the CLI.

    The work (connect, start the child, wait, close) runs on a thread of its
    own; the main thread waits in ``select`` on a pipe that both the work and
    the signals (``signal.set_wakeup_fd``, whichever thread the kernel picked)
    write to. The handlers only note the signal: they take no lock and call
    nothing, so nothing is ever interrupted half-way. The main thread sends each
    signal on to the child's process group, as a terminal sends it to its
    foreground job (a shell running ``sleep`` waits for it before it dies of a
    SIGINT), and the CLI exits with the child's status: 128+N when the signal
    killed it. A signal that comes while the child is being started waits for
    it (the child may already run, and print). One that comes while connecting,
    or after the child exited, ends the CLI at once with 128+N: the connection
    ends with this process, and the agent kills a child it had started.

    SIGWINCH (this terminal was resized) resizes the child's terminal, if it has one.

    The third signal ends the CLI at once too, after killing the child's group
    (a fourth stops waiting for that). It takes three, not two, because
    ``timeout`` and others signal the CLI and then its whole process group, so
    one request can arrive twice.
    """

    ENOUGH = 3

    def __init__(self) -> None:
        self.process: Optional[Popen] = None
        self.starting = False
        self.received = 0
        self._signals: List[int] = []
        self._status: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._resized = False
        self.terminal: Optional[LocalTerminal] = None  # this process's terminal, while the child has one
        self.editing = False  # the caller's editor has the terminal (a remote EDITOR asked for it)
        self._wake_r, self._wake_w = pipe_above_stdio()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __enter__(self) -> SignalForwarder:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (*FORWARDED_SIGNALS, signal.SIGWINCH)}
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGWINCH:
            self._resized = True
            return
        self.received += 1
        if self.received >= self.ENOUGH:
            raise Interrupted(signum)
        self._signals.append(signum)

    def wake(self) -> None:
        """Look again: the child was started, or has exited (any thread)."""
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"w")

    def run(self, work: Callable[[], int]) -> int:
        """Run ``work`` on a thread and handle signals here meanwhile; its status, or 128+N if a signal ended it."""
        threading.Thread(target=self._work, args=(work,), name="remowt-cli", daemon=True).start()
        try:
            return self._serve()
        except Interrupted as e:
            process = self.process
            if process is not None:
                with contextlib.suppress(RemowtError):
                    process.signal_group(signal.SIGKILL)
            return 128 + e.signum

    def _work(self, work: Callable[[], int]) -> None:
        try:
            self._status = work()
        except BaseException as e:
            self._error = e
        finally:
            self.wake()

    def _serve(self) -> int:
        while True:
            select.select([self._wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
            if self._error is not None:
                raise self._error
            if self._status is not None:
                return self._status
            ending = self._forward()
            if ending is not None:
                return 128 + ending
            if self._resized:
                self._resized = False
                self._resize()

    def _resize(self) -> None:
        """This terminal changed size: the child's follows."""
        process, terminal = self.process, self.terminal
        if process is not None and terminal is not None:
            size = terminal.size()
            with contextlib.suppress(RemowtError):
                process.resize(size.columns, size.lines)

    def _forward(self) -> Optional[int]:
        """Send the signals noted on to the child; the one that ends the CLI (no child to send it to), if any."""
        while self._signals:
            starting = self.starting  # before the process: the work sets the process, then clears starting
            process = self.process
            if process is None:
                return None if starting else self._signals[0]
            signum = self._signals.pop(0)
            if self.editing and signum == signal.SIGINT:
                continue  # typed into the caller's editor (the terminal is cooked meanwhile): not the child's
            with contextlib.suppress(RemowtError):  # a lost connection is the work's to tell
                process.signal_group(signum)
        return None


class Job(NamedTuple):
    """What the CLI runs: argv (for the user's shell with ``user_shell``), on a terminal or not, as root or not."""

    argv: List[str]
    user_shell: bool
    tty: bool
    sudo: bool
    no_stdin: bool


class LocalTerminal:
    """This process's terminal (on stdin) in raw mode while a child's terminal is driven through it.

    Raw: every key goes to the child as typed (Ctrl-C, Ctrl-Z and Ctrl-\\ as
    bytes, for the child's terminal to turn into signals there), nothing is
    echoed here. :meth:`restore` puts the settings back, on every way out.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: Optional[List[Any]] = None
        self._lock = threading.Lock()

    def raw(self) -> None:
        import termios
        import tty

        with self._lock:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)

    def restore(self) -> None:
        import termios

        with self._lock:
            saved, self._saved = self._saved, None
            if saved is not None:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def size(self) -> os.terminal_size:
        return os.get_terminal_size(self.fd)


class Keyboard:
    """Keys from this terminal to the child's terminal, on a thread; paused while the caller's editor has them."""

    def __init__(self, fd: int, write: Callable[[bytes], object], close: Callable[[], None]) -> None:
        self._fd = fd
        self._write = write
        self._close = close
        self._wake_r, self._wake_w = pipe_above_stdio()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._paused = False
        self._stopped = False
        self._parked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remowt-keyboard", daemon=True)
        start(self._thread)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    os.read(self._wake_r, 512)
                with self._lock:
                    if self._stopped:
                        return
                    paused = self._paused
                if paused:
                    self._parked.set()
                else:
                    self._parked.clear()
                if paused or self._fd not in ready:
                    continue
                data = os.read(self._fd, 4096)
                if not data:
                    self._close()
                    return
                self._write(data)
        except (OSError, ValueError):  # the child's terminal is gone
            return
        finally:
            self._parked.set()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"w")

    @contextlib.contextmanager
    def lent(self, terminal: Optional[LocalTerminal], signals: SignalForwarder) -> Iterator[None]:
        """While the caller's editor runs: no keys read here, the terminal cooked, Ctrl-C left to the editor."""
        with self._lock:
            self._paused = True
        self._parked.clear()
        self._poke()
        self._parked.wait()
        signals.editing = True
        if terminal is not None:
            terminal.restore()
        try:
            yield
        finally:
            if terminal is not None:
                terminal.raw()
            signals.editing = False
            with self._lock:
                self._paused = False
            self._poke()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._poke()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)


def run_attached(connection: Node, job: Job, signals: SignalForwarder, stdio: Mapping[str, int]) -> int:
    """Run ``job`` with this process's stdio (or ``stdio``) wired through; return the shell-style exit status."""
    terminal = LocalTerminal(0) if job.tty and os.isatty(0) else None
    node = connection.privileged if job.sudo else connection
    signals.starting = True
    try:
        if job.sudo:
            node.ping()  # starts the privileged agent: a password is asked before this terminal goes raw
        if terminal is not None:
            terminal.raw()
            signals.terminal = terminal
        keys = job.tty and not job.no_stdin and "stdin" not in stdio
        process = signals.process = node.Popen(
            job.argv,
            stdin=DEVNULL if job.no_stdin else PIPE if keys else stdio.get("stdin"),
            stdout=stdio.get("stdout"),
            stderr=None if job.tty else stdio.get("stderr"),
            pty=make_terminal() if job.tty else False,
            user_shell=job.user_shell,
            bufsize=0,
        )
    except BaseException:
        signals.terminal = None
        if terminal is not None:
            terminal.restore()
        raise
    finally:
        signals.starting = False
        signals.wake()
    keyboard: Optional[Keyboard] = None
    if process.stdin is not None:
        keyboard = Keyboard(0, process.stdin.write, process.stdin.close)
        lend_terminal(functools.partial(keyboard.lent, terminal, signals))
    try:
        return exit_status(process.wait())
    except ConnectionLost:
        raise
    except OSError as e:  # its output could not be written here, and it exited 0 regardless
        return output_failed(e)
    finally:
        lend_terminal(None)
        if keyboard is not None:
            keyboard.stop()
        signals.process = None
        signals.terminal = None
        if terminal is not None:
            terminal.restore()
        signals.wake()


def output_failed(error: OSError) -> int:
    """The exit status when the child's output could not be written here.

    EPIPE is quiet and 128+SIGPIPE, as for a program writing to a pipe nobody
    reads; anything else is said on stderr and is 255, as ssh exits.
    """
    if error.errno == errno.EPIPE:
        return 128 + signal.SIGPIPE
    with contextlib.suppress(OSError):  # stderr may be the file that failed
        print(f"remowt: {error.strerror}", file=sys.stderr)
    return 255


def plug_closed_stdio() -> Dict[str, int]:
    """Open /dev/null on each of fds 0, 1 and 2 that is closed; the child gets that one CLOSED.

    Otherwise the next fd this process opens (an agent's pipe, the ssh socket)
    would land there and be taken for its stdin, stdout or stderr.
    """
    stdio: Dict[str, int] = {}
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            stdio[name] = CLOSED
    return stdio


def _job(args: argparse.Namespace, words: Words, parser: argparse.ArgumentParser) -> Job:
    """What the command line asks to run: ARGV as it is, a command line for the shell, or a login shell."""
    command = words.command
    if command is None:  # a login shell, on a terminal when this one is
        tty = os.isatty(0) if args.tty is None else args.tty
        return Job([], True, tty, args.sudo, args.no_stdin)
    if not command:
        parser.error(f"{args.command}: give the command to run after --")
    tty = bool(args.tty)
    if words.as_argv or args.command == "local":
        return Job(command, False, tty, args.sudo, args.no_stdin)
    return Job(["-c", " ".join(command)], True, tty, args.sudo, args.no_stdin)


def _connection(args: argparse.Namespace) -> Remowt:
    if args.command == "local":
        return client.connect_local()
    return client.connect(
        args.host,
        port=args.port,
        user=args.login,
        key_filename=args.identity,
        ssh_config=args.config,
        host_key_policy="accept-new" if args.accept_new_host_key else None,
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = _parser()
    words = split_words(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(words.options)
    if args.command == "bundle":
        sys.exit(_bundle_main(args))
    if args.command == "edit":
        sys.exit(_edit_main(args, parser))
    if args.command in ("forward", "nix-daemon"):
        sys.exit(_sockets_main(args, parser))
    if args.command == "cp":
        sys.exit(copy_main(args, parser))
    if args.command == "unit":
        sys.exit(unit_main(args))
    job = _job(args, words, parser)
    stdio = plug_closed_stdio()
    with SignalForwarder() as signals:
        try:
            status = signals.run(lambda: _run(args, job, signals, stdio))
        except Interrupted as e:  # a fourth signal while the third's kill was on its way
            status = 128 + e.signum
        finally:
            if signals.terminal is not None:
                signals.terminal.restore()
    sys.exit(status)


def _edit_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``remowt edit HOST:PATH``: the file read there, edited here, written back if changed."""
    host, _, path = args.target.partition(":")
    if not host or not path:
        parser.error(f"edit: give the file as HOST:PATH, got {args.target!r}")
    args.host = host
    try:
        with _connection(args) as connection:
            node = connection.privileged if args.sudo else connection
            files = node.service(FileEditApi)
            try:
                content = files.read(path)
            except FileNotFoundError:
                content = b""  # a new file, as an editor makes it
            edited = edit_locally(f"{host}:{path}", content)
            if edited is not None:
                files.replace(path, edited)
    except (OSError, RuntimeError, RemowtError) as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 1
    return 0


def copy_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``remowt cp SRC... DST``: put or get each SRC through one connection, with a progress bar on a terminal."""
    *sources, destination = args.paths
    if not sources:
        parser.error("cp: give at least one SRC and a DST")
    hosts = {host for host, _ in map(split_remote, args.paths) if host is not None}
    if len(hosts) != 1:
        parser.error("cp: exactly one side must be HOST:PATH (one host), the other local")
    args.host = hosts.pop()
    _, target = split_remote(destination)
    putting = split_remote(destination)[0] is not None
    if any((split_remote(source)[0] is not None) == putting for source in sources):
        parser.error("cp: SRC and DST must be on different sides: all SRC local and DST HOST:PATH, or the reverse")
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.quiet else None
    try:
        with _connection(args) as connection:
            node = connection.privileged if args.sudo else connection
            for source in sources:
                path = split_remote(source)[1]
                if bar is not None:
                    bar.name = os.path.basename(path.rstrip("/")) or path
                if putting:
                    node.put(path, target, recursive=args.recursive, preserve=args.preserve, progress=bar)
                else:
                    node.get(path, target, recursive=args.recursive, preserve=args.preserve, progress=bar)
                if bar is not None:
                    bar.done()
    except KeyboardInterrupt:
        if bar is not None:
            bar.done()
        print("remowt: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, RemowtError) as e:
        if bar is not None:
            bar.done()
        print(f"remowt: {e}", file=sys.stderr)
        return 1
    return 0


def split_remote(word: str) -> Tuple[Optional[str], str]:
    """scp's reading of a path: ``HOST:PATH`` when a colon comes before any slash, else a local path."""
    host, colon, path = word.partition(":")
    if not colon or "/" in host or not host:
        return None, word
    return host, path or "."


class ProgressBar:
    """A one-line progress bar rewritten in place on a terminal: name, percent, bytes, files, rate."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.name = ""
        self.started = time.monotonic()
        self._width = 0

    def __call__(self, done: int, total: int, files: int, files_total: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        percent = 100 * done // total if total else 100
        cells = 20 * percent // 100
        line = (
            f"\r{self.name[:30]:<30} [{'#' * cells:<20}] {percent:3}% {_size(done)}/{_size(total)}"
            f" {files}/{files_total} files {_size(int(done / elapsed))}/s"
        )
        self._width = max(self._width, len(line))
        self.out.write(line.ljust(self._width))
        self.out.flush()

    def done(self) -> None:
        """End the bar's line; the next file's bar starts afresh."""
        if self._width:
            self.out.write("\n")
            self.out.flush()
        self._width = 0
        self.started = time.monotonic()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def _run(args: argparse.Namespace, job: Job, signals: SignalForwarder, stdio: Mapping[str, int]) -> int:
    """Connect, run ``job`` and return the exit status; errors are told on stderr."""
    program = job.argv[0] if job.argv and not job.user_shell else "your shell"
    try:
        with _connection(args) as connection:
            return run_attached(connection, job, signals, stdio)
    except FileNotFoundError as e:
        print(f"remowt: {program}: {e.strerror}", file=sys.stderr)
        return 127
    except PermissionError as e:
        print(f"remowt: {program}: {e.strerror}", file=sys.stderr)
        return 126
    except RemowtError as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 255


def _add_socket_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> List[argparse.ArgumentParser]:
    forward = commands.add_parser(
        "forward",
        help="forward sockets to and from an ssh host (ssh -L / -R) until interrupted",
        description=(
            "Connect to HOST and forward unix sockets and TCP ports in ssh's syntax until interrupted: "
            "-L [BIND:]PORT:RHOST:RPORT, -L [BIND:]PORT:RPATH, -L LPATH:RHOST:RPORT, -L LPATH:RPATH listen here "
            "and connect from HOST; -R does the reverse (listens on HOST, connects from here). A path has a /; "
            "BIND defaults to localhost, * is every address; PORT 0 picks one. Each forward is told on stderr "
            "as it starts. Exit 0 when interrupted, 255 if the connection is lost."
        ),
    )
    forward.add_argument("host", help="host name or ~/.ssh/config alias, optionally user@host")
    forward.add_argument("-L", dest="local", metavar="SPEC", action="append", default=[], help="listen here")
    forward.add_argument("-R", dest="remote", metavar="SPEC", action="append", default=[], help="listen on HOST")
    forward.add_argument("--sudo", action="store_true", help="connect and listen on HOST as root")
    nix = commands.add_parser(
        "nix-daemon",
        help="expose an ssh host's nix daemon as a local unix socket until interrupted",
        description=(
            "Connect to HOST and listen at a local unix socket that reaches HOST's nix daemon (as the login, "
            "or through the privileged agent when the daemon's socket is root-only), so that "
            "nix --store unix://PATH works against HOST's store. The socket's path is told on stderr."
        ),
    )
    nix.add_argument("host", help="host name or ~/.ssh/config alias, optionally user@host")
    nix.add_argument("--socket", metavar="PATH", help="the local socket (default: a new one in a private directory)")
    nix.add_argument("--remote-socket", metavar="PATH", default=NIX_DAEMON_SOCKET, help="the daemon's socket on HOST")
    return [forward, nix]


def parse_forward(spec: str, listen_default: str = "localhost") -> Tuple[Address, Address]:
    """An ssh -L/-R ``spec`` as (where to listen, where to connect); ``ValueError`` saying what is wrong.

    Fields are split at ``:`` (IPv6 addresses in brackets); one with a ``/`` is a unix socket path.
    """
    fields = _forward_fields(spec)
    taken = 1 if "/" in fields[-1] else 2
    listen, target = fields[:-taken], fields[-taken:]
    if len(listen) == 1 and "/" in listen[0]:
        where: Address = listen[0]
    elif len(listen) in (1, 2) and "/" not in "".join(listen):
        bind = listen[0] if len(listen) == 2 else listen_default
        where = ("" if bind == "*" else bind, _port(listen[-1], spec))
    else:
        raise ValueError(f"bad forwarding specification {spec!r}: expected [BIND:]PORT or a path before the target")
    connect: Address = target[0] if taken == 1 else (target[0], _port(target[1], spec))
    return where, connect


def _forward_fields(spec: str) -> List[str]:
    fields: List[str] = []
    rest = spec
    while rest:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ValueError(f"bad forwarding specification {spec!r}: unclosed [")
            fields.append(rest[1:end])
            rest = rest[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad forwarding specification {spec!r}: expected : after ]")
            rest = rest[1:]
            continue
        field, colon, rest = rest.partition(":")
        fields.append(field)
        if colon and not rest:
            fields.append("")
    if len(fields) < 2 or "" in fields:
        raise ValueError(f"bad forwarding specification {spec!r}: expected LISTEN:TARGET")
    return fields


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"bad forwarding specification {spec!r}: {text!r} is not a port")
    return int(text)


def _text(address: Bound) -> str:
    return address if isinstance(address, str) else f"{address[0] or '*'}:{address[1]}"


def _sockets_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``remowt forward`` and ``remowt nix-daemon``: forwards that run until a signal, or until the link is lost."""
    try:
        local = [parse_forward(spec) for spec in getattr(args, "local", [])]
        remote = [parse_forward(spec) for spec in getattr(args, "remote", [])]
    except ValueError as e:
        parser.error(f"{args.command}: {e}")
    if args.command == "forward" and not local and not remote:
        parser.error("forward: give at least one -L or -R")
    stop = threading.Event()
    lost: List[str] = []
    signalled: List[int] = []

    def interrupted(signum: int, frame: Optional[FrameType]) -> None:
        signalled.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, interrupted) for signum in FORWARDED_SIGNALS}
    try:
        with contextlib.ExitStack() as stack:
            connection = stack.enter_context(_connection(args))
            connection.router.on_link_closed(lambda link, reason: _lost(lost, stop, reason))
            if args.command == "nix-daemon":
                path = args.socket or os.path.join(stack.enter_context(_private_dir()), "nix-daemon.sock")
                forward = stack.enter_context(connection.forward_nix_daemon(path, args.remote_socket))
                _tell(f"nix daemon of {args.host} at {_text(forward.address)}: nix --store unix://{forward.address}")
            node: Node = connection.privileged if getattr(args, "sudo", False) else connection
            for where, target in local:
                forward_l = stack.enter_context(node.forward_local(where, target))
                _tell(f"-L {_text(forward_l.address)} -> {args.host} {_text(bound(socket_address(target)))}")
            for where, target in remote:
                forward_r = stack.enter_context(node.forward_remote(where, target))
                _tell(f"-R {args.host} {_text(forward_r.address)} -> {_text(bound(socket_address(target)))}")
            while not stop.wait(1.0):
                pass
    except (OSError, RemowtError) as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 255
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if lost and not signalled:
        print(f"remowt: connection to {args.host} lost: {lost[0]}", file=sys.stderr)
        return 255
    return 0


def _lost(lost: List[str], stop: threading.Event, reason: Optional[BaseException]) -> None:
    lost.append(str(reason or "closed"))
    stop.set()


@contextlib.contextmanager
def _private_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="remowt-") as directory:
        yield directory


def _tell(line: str) -> None:
    print(f"remowt: {line}", file=sys.stderr, flush=True)


def _add_unit_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    unit = commands.add_parser(
        "unit",
        help="a systemd unit of an ssh host (or of this machine): status, start, stop, restart, logs",
        usage="remowt unit [-h] [options] HOST {status,start,stop,restart,logs} UNIT",
        description=(
            "Show or change UNIT of HOST's systemd (HOST 'local': this machine, through a local agent). "
            "start, stop and restart wait for the job (exit 1 with systemd's job result if it failed); status "
            "exits 0 when the unit is active, 3 when not, 4 when there is no such unit; logs prints its journal "
            "(-f: then new entries until interrupted). A system unit's start, stop and restart need --sudo. "
            "Exit 255 if the connection failed or was lost."
        ),
    )
    unit.add_argument("host", help="host name or ~/.ssh/config alias, optionally user@host; 'local': this machine")
    unit.add_argument("action", choices=["status", "start", "stop", "restart", "logs"])
    unit.add_argument("unit", metavar="UNIT", help="the unit's name (foo.service, bar.timer ...)")
    unit.add_argument("--sudo", action="store_true", help="through the privileged agent (as root)")
    unit.add_argument("--user", action="store_true", help="the login's --user manager, not the system's")
    unit.add_argument("-f", "--follow", action="store_true", help="logs: go on printing new entries")
    unit.add_argument("-n", "--lines", type=int, metavar="N", help="logs: the last N entries (default all; -f: 10)")
    unit.add_argument("--timeout", type=float, default=90.0, help="start/stop/restart: seconds to wait for the job")
    return unit


def unit_main(args: argparse.Namespace) -> int:
    """``remowt unit HOST ACTION UNIT``: what systemctl and journalctl would say there, through remowt."""
    from .errors import NoSuchUnit

    if args.lines is not None and args.lines < 0:
        print(f"remowt: unit: -n must be >= 0, got {args.lines}", file=sys.stderr)
        return 2
    try:
        connection = client.connect_local() if args.host == "local" else _connection(args)
    except (OSError, RemowtError) as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 255
    try:
        with connection:
            return _unit_action(connection.privileged if args.sudo else connection, args)
    except KeyboardInterrupt:  # logs -f ends here, as journalctl -f does
        return 0 if args.action == "logs" else 130
    except ConnectionLost as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 255
    except (OSError, RemowtError) as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 4 if isinstance(e, NoSuchUnit) else 1


def _unit_action(node: Node, args: argparse.Namespace) -> int:
    manager = node.systemd.user if args.user else node.systemd
    if args.action == "status":
        status = manager.status(args.unit)
        print(f"{status.unit} - {status.description}")
        print(f"  Loaded: {status.load} ({status.fragment_path or '-'}; {status.unit_file_state or '-'})")
        print(f"  Active: {status.active} ({status.sub}), result {status.result}")
        if status.main_pid:
            print(f"  Main PID: {status.main_pid}")
        return 0 if status.active in ("active", "reloading") else 3
    if args.action == "logs":
        lines = 10 if args.follow and args.lines is None else args.lines
        with manager.journal(args.unit, lines=lines, follow=args.follow) as journal:
            for entry in journal:
                print(_journal_line(entry.fields, entry.message), flush=args.follow)
        return 0
    outcome = manager.job(args.action, args.unit, timeout=args.timeout)
    print(f"{args.action} {outcome.unit}: {outcome.result} (now {outcome.active})")
    return 0


def _journal_line(fields: Dict[str, Any], message: str) -> str:
    """An entry as journalctl's short format writes it: time, identifier[pid]: message."""
    stamp = fields.get("__REALTIME_TIMESTAMP", "0")
    seconds = int(stamp) / 1e6 if isinstance(stamp, str) and stamp.isdigit() else 0.0
    when = time.strftime("%b %d %H:%M:%S", time.localtime(seconds))
    who = fields.get("SYSLOG_IDENTIFIER") or fields.get("_COMM") or "?"
    pid = fields.get("_PID")
    return f"{when} {who}{f'[{pid}]' if pid else ''}: {message}"
