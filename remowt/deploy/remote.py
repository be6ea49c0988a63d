"""Start the agent on a target through one remote shell line, installing it there first if needed.

:func:`remote_start_command` is that line: it checks that Python is there and
execs ``python3 -I -S -B -c <STUB> <platform>=<sha256>:<tree digest>...`` (the
artifact's sha256 and the digest of the tree it unpacks to, see
:mod:`remowt.deploy.tree`; ``-B``: nothing writes bytecode, the artifact
brings it). The stub announces itself with :data:`MAGIC`, checks the Python
version in code that parses on any Python 3, reads the bootstrap
(:data:`BOOT`) from its stdin and runs it.
The client sends the bootstrap at once, without waiting, so a start costs no
round trip more than the agent's own handshake when the agent is cached.

The bootstrap then speaks a small pre-protocol on stdin/stdout before the
agent's framed RPC protocol starts. Its messages are frames (4-byte
big-endian length, then JSON), so the client never reads past them:

1. BOOT sends ``status``: platform, Python version and executable, the
   cache directory (``$XDG_CACHE_HOME/remowt/<sha256>``, else
   ``~/.cache/remowt/<sha256>``), whether a loadable agent is there already
   (trusted: only this user could have written it; verified: its tree
   digest is the one the client sent; loading: the agent's modules import),
   and a note when it will have to use a temporary directory instead (the
   cache cannot be written, is mounted noexec, ...). A cached agent that is
   not trusted or not verified is set aside (never run) and installed
   again. Or an ``error`` frame: platform missing from the bundle, Python
   too old.
2. Only when not installed: the client sends the installer (:data:`INSTALL`,
   what only an install needs, so that a start from the cache compiles
   less) and the artifact, each as one frame; the installer checks the
   artifact's sha256, unpacks it into a temporary directory beside the
   cache directory and renames it into place (the rename is the last step,
   so nobody runs a half-written agent; when another client won the race,
   its copy is used once verified). When that fails, or the agent does not
   load from there, it uses a fresh private temporary directory (the next
   candidate when one is full), locked while the agent runs and removed
   when it ends; those left by killed agents are removed then.
3. BOOT sends ``ready`` (the directory and any note) and runs the agent
   (``agent.py real-agent``) in the same process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Type, TypeVar

import msgspec

from ..errors import RemowtError
from ..runtime.deadline import Deadline
from ..runtime.interrupts import start
from ..transports.base import Transport
from .bundle import AgentBundle
from .tree import CODE, PRIVATE, QUICK_EXIT

log = logging.getLogger("remowt.deploy")

MAGIC = b"\x00remowt-boot-1\x00"
NO_PYTHON_EXIT = 127  # the shell line's exit status when the interpreter is not found
BOOT_FAILED_EXIT = 3  # the bootstrap's exit status after it reported an error
MAX_BOOT_FRAME = 1 << 20
MAX_JUNK = 64 * 1024  # output of login scripts before the stub starts that is skipped, at most
DEFAULT_TIMEOUT = 60.0

# Runs first, from argv: must parse on every Python 3 that has -I (3.4+).
STUB = """import os, sys
def r(n):
    b = []
    while n:
        c = os.read(0, n)
        if not c:
            sys.exit(3)
        b.append(c)
        n -= len(c)
    return b"".join(b)
os.write(1, MAGIC)
if sys.version_info < (3, 9):
    import json, struct
    v = "%d.%d.%d" % sys.version_info[:3]
    m = json.dumps({"kind": "error", "error": "too-old", "python": v, "executable": sys.executable}).encode()
    os.write(1, struct.pack(">I", len(m)) + m)
    sys.stderr.write("remowt: Python %s (%s) is too old: the agent needs Python 3.9 or newer\\n" % (v, sys.executable))
    sys.exit(3)
exec(compile(r(int.from_bytes(r(4), "big")), "remowt-boot", "exec"))
""".replace("MAGIC", repr(MAGIC))

# Sent by the client, run by the stub on Python >= 3.9 (``r`` reads n bytes of stdin), after remowt.deploy.tree's CODE.
# What only an install needs is INSTALL, sent with the artifact: a start from the cache compiles less.
BOOT = (
    CODE
    + r"""
import struct
want = dict(arg.split("=", 1) for arg in sys.argv[1:])
impl = sys.implementation.name
plat = "%s-%s%d%d" % (os.uname().machine, {"cpython": "cp", "pypy": "pp"}.get(impl, impl), *sys.version_info[:2])
python = "%d.%d.%d" % sys.version_info[:3]


# a message's field value as JSON: a string, a bool or None
def value(v):
    return "null" if v is None else "true" if v is True else "false" if v is False else quote(v)


def send(kind, **fields):
    fields = dict(fields, kind=kind, platform=plat, python=python, executable=sys.executable)
    m = ("{%s}" % ", ".join("%s: %s" % (quote(k), value(v)) for k, v in fields.items())).encode()
    m = struct.pack(">I", len(m)) + m
    while m:
        m = m[os.write(1, m):]


def fail(error, message):
    send("error", error=error, message=message)
    sys.stderr.write("remowt: %s\n" % message)
    sys.exit(3)


# None when the agent's modules (msgspec, a compiled extension, among them) import from d, else why not
def loads(d):
    sys.path.insert(0, d)
    try:
        import remowt.agent.main
        return None
    except Exception as e:
        sys.path.remove(d)
        for name in [m for m in sys.modules if m.split(".")[0] in ("msgspec", "remowt")]:
            del sys.modules[name]
        return "%s: %s" % (type(e).__name__, e)


# None when path is a directory (or, with file=True, a regular file) of this user that nobody else can write
def trusted(path, file=False):
    try:
        st = os.lstat(path)
    except OSError as e:
        return "cannot inspect %s (%s)" % (path, e.strerror or e)
    if stat.S_ISLNK(st.st_mode):
        return "%s is a symbolic link" % path
    if not (stat.S_ISREG(st.st_mode) if file else stat.S_ISDIR(st.st_mode)):
        return "%s is not a %s" % (path, "regular file" if file else "directory")
    try:
        owned(path, st, os.getuid())
    except ValueError as e:
        return str(e)
    return None


# the cache root made (mode 0700) or checked: None when it can hold agents, else why not
def prepare_root():
    try:
        if not os.path.isdir(base):
            os.makedirs(base, 0o700, exist_ok=True)  # another client may make it at the same time
        if not os.path.lexists(root):
            try:
                os.mkdir(root, 0o700)
            except FileExistsError:  # made by another client meanwhile: checked below like any
                pass
        st = os.lstat(root)
        if os.path.isdir(root) and not os.path.islink(root) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(root, 0o700)  # made loose by an older remowt or a umask: what others put in it is checked below
    except OSError as e:
        return "cannot write %s (%s)" % (root, e.strerror or e)
    return trusted(root)


# move an untrusted agent directory out of the way (it is never run); the note says why
def set_aside(why):
    import tempfile
    aside = tempfile.mkdtemp(prefix=".untrusted-", dir=root)
    os.rename(target, os.path.join(aside, digest))
    return "%s was not trusted (%s): set aside in %s and installed again" % (target, why, aside)


# None when d holds the agent and it loads, else why not
def loading(d):
    why = loads(d)
    return None if why is None else "cannot load the agent from %s (%s)" % (d, why)


wanted = want.get(plat)
if wanted is None:
    fail("platform-missing", "the bundle has no agent for %s (it has: %s)" % (plat, ", ".join(sorted(want)) or "none"))
digest, _, tree = wanted.partition(":")
xdg = os.environ.get("XDG_CACHE_HOME", "")
base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
root = os.path.join(base, "remowt") if os.path.isabs(base) else None
target = os.path.join(root, digest) if root else None
notes = []
final = None
untrusted = None if target is None else prepare_root()
cache_usable = False
if target is None:
    notes.append("neither $XDG_CACHE_HOME nor $HOME names a directory")
elif untrusted is not None:
    notes.append("the agent cache is not used: %s" % untrusted)
elif not os.path.lexists(target):
    cache_usable = not noexec(root)
    if not cache_usable:
        notes.append("%s is on a filesystem mounted noexec" % root)
else:
    untrusted = trusted(target) or verify(target, tree)
    if untrusted is None:
        why = loading(target)
        if why is None:
            final = target
        else:
            notes.append(why)
    else:
        try:
            notes.append(set_aside(untrusted))
            cache_usable = True
        except OSError as e:
            notes.append("%s is not trusted and cannot be moved (%s)" % (target, e.strerror or e))
send("status", path=target, installed=final is not None, note="; ".join(notes))
lock = -1  # held while the agent runs from a private directory, which is removed after
if final is None:  # the client sends INSTALL, then the artifact: INSTALL installs it, setting final (and lock)
    exec(compile(r(struct.unpack(">I", r(4))[0]), "remowt-install", "exec"))
send("ready", path=final, note="; ".join(notes))
entry = os.path.join(final, "agent.py")
sys.argv = [entry, "real-agent", "--tree=" + tree]
try:
    with open(entry) as f:
        code = compile(f.read(), entry, "exec")
    exec(code, {"__name__": "__main__", "__file__": entry})
finally:
    if lock >= 0:
        import shutil
        shutil.rmtree(final, ignore_errors=True)
"""
    + QUICK_EXIT
    + "\n"
)


# Sent by the client when the status says the agent is not installed, before the artifact; runs in BOOT's globals.
INSTALL = (
    PRIVATE
    + r"""
import hashlib


# None when the artifact is unpacked into dest (modes as the client's digest has them), else why not
def unpack(data, dest):
    import io, tarfile
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                odd = member.name.startswith("/") or ".." in parts or "" in parts
                if odd or not (member.isdir() or member.isfile()):
                    fail("install", "refusing the archive member %r" % member.name)
                for depth in range(1, len(parts) + member.isdir()):
                    path = os.path.join(dest, *parts[:depth])
                    if not os.path.isdir(path):
                        os.mkdir(path, 0o700)
                        os.chmod(path, 0o755)
                if member.isfile():
                    with open(os.path.join(dest, *parts), "wb") as f:
                        f.write(tar.extractfile(member).read())
                        os.fchmod(f.fileno(), 0o755 if member.mode & 0o100 else 0o644)
                        os.fsync(f.fileno())  # whole on disk before the rename makes it the cache
    except (OSError, tarfile.TarError) as e:
        return "cannot unpack the agent into %s (%s)" % (dest, e)
    return None


# unpack beside the cache dir and rename into place: None when it is there and loads, else why not
def install_cache(data):
    import shutil, tempfile
    try:
        staging = tempfile.mkdtemp(prefix=".tmp-%s-" % digest[:12], dir=root)
    except OSError as e:
        return "cannot write %s (%s)" % (root, e.strerror or e)
    try:
        why = unpack(data, staging)
        if why is not None:
            return why
        try:
            os.rename(staging, target)
        except OSError as e:
            if not os.path.isdir(target):  # else another client installed it first: checked like any cached agent
                return "cannot install into %s (%s)" % (target, e.strerror or e)
        return trusted(target) or verify(target, tree) or loading(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# fill a new private directory with the agent: None when it runs from there, else why not (ValueError: nowhere)
def fill_private(data, d):
    why = unpack(data, d)
    if why is not None:
        return why
    why = verify(d, tree)
    if why is not None:  # the artifact and the digest sent with it disagree: a broken bundle
        raise ValueError("the agent unpacked from the artifact does not match: %s" % why)
    return loading(d)


# a fresh private directory (allowing running code) with the agent unpacked and loading, and the lock held on it
def install_private(data):
    import tempfile
    bases = [tempfile.gettempdir(), "/var/tmp", "/dev/shm"]
    d, lock, why = private_tree(bases, "remowt-agent-", lambda d: fill_private(data, d))
    if d is None:
        fail("install", "no temporary directory could hold the agent: %s" % "; ".join(why))
    notes.extend(why)
    return d, lock


data = r(struct.unpack(">I", r(4))[0])
got = hashlib.sha256(data).hexdigest()
if got != digest:
    fail("hash-mismatch", "the artifact received for %s has sha256 %s, not %s" % (plat, got, digest))
if cache_usable:
    why = install_cache(data)
    if why is None:
        final = target
    else:
        notes.append(why)
if final is None:
    final, lock = install_private(data)
    notes.append("running the agent from the temporary directory %s" % final)
del data
"""
)


class DeployError(RemowtError):
    """Starting the agent on the target failed; ``kind`` says how.

    Kinds: ``no-python``, ``too-old``, ``platform-missing``, ``hash-mismatch``,
    ``install``, ``load``, ``start`` (ended before it was ready), ``timeout``,
    ``protocol``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DeployReport:
    """What :func:`start_agent` found and did on the target."""

    platform: str
    python_version: str
    python_executable: str
    path: str  # the directory the agent runs from
    uploaded: bool  # False when the agent was cached there already
    fallback: Optional[str]  # why the agent runs from a temporary directory (or another note); None when all is well
    seconds: float


class _Status(msgspec.Struct):
    """The bootstrap's ``status`` message: what the target is, whether the agent is installed."""

    platform: str
    installed: bool


class _Ready(msgspec.Struct):
    """The bootstrap's ``ready`` message: the agent runs, from ``path``."""

    platform: str
    python: str
    executable: str
    path: str
    note: str


M = TypeVar("M", _Status, _Ready)


def _fields(message: Dict[str, Any], shape: Type[M]) -> M:
    """``message`` as ``shape``, or a DeployError naming the field that is missing or wrong."""
    try:
        return msgspec.convert(message, shape)
    except msgspec.ValidationError as e:
        raise DeployError("protocol", f"the bootstrap's {message['kind']!r} message is malformed: {e}") from None


def _frame(message: Dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def remote_start_command(bundle: AgentBundle, python: str = "python3") -> str:
    """The POSIX shell line that starts the agent's bootstrap with ``python`` (everything in it is quoted).

    Without that interpreter it says so on stderr, writes an error frame, and
    exits with :data:`NO_PYTHON_EXIT`.
    """
    quoted = shlex.quote(python)
    said = MAGIC + _frame({"kind": "error", "error": "no-python", "python": python})
    missing = "".join(f"\\{byte:03o}" for byte in said)
    message = shlex.quote(f"remowt: {python} not found on the PATH; the agent needs Python 3.9 or newer")
    platforms = " ".join(
        shlex.quote(f"{platform}={digest}:{bundle.trees[platform]}")
        for platform, digest in sorted(bundle.hashes.items())
    )
    return (
        f"command -v {quoted} >/dev/null 2>&1 || {{ printf '{missing}'; echo {message} >&2; exit {NO_PYTHON_EXIT}; }}; "
        f"exec {quoted} -I -S -B -c {shlex.quote(STUB)} {platforms}"
    )


class _Session:
    """The client side of the pre-protocol on one transport, under one deadline."""

    def __init__(self, transport: Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        self.deadline = Deadline(timeout)
        self.phase = "starting"
        self.expired = False
        self._lock = threading.Lock()
        self._done = False
        # a blocked write has no timeout of its own: closing the transport ends it
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        start(self._timer)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
        self.transport.close()

    def finish(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()

    def timed_out(self) -> DeployError:
        return DeployError("timeout", f"the target did not answer within {self.timeout:.3g} s while {self.phase}")

    def read_exact(self, size: int) -> Optional[bytes]:
        """Exactly ``size`` bytes, or None at end of stream (never more: what follows is the agent's)."""
        chunks = []
        needed = size
        while needed:
            data = self.transport.read(needed)
            if data is None:
                if self.deadline.expired():
                    raise self.timed_out()
                self.transport.wait_readable(self.deadline.left())
                continue
            if not data:
                if self.expired:
                    raise self.timed_out()
                return None
            chunks.append(data)
            needed -= len(data)
        return b"".join(chunks)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self.transport.write(view, True) :]
        except OSError:
            if self.expired:
                raise self.timed_out() from None
            raise

    def find_magic(self) -> bool:
        """Skip what login scripts printed before the stub; False if the stream ended first."""
        window = self.read_exact(len(MAGIC))
        skipped = bytearray()
        while window is not None and window != MAGIC:
            if len(skipped) >= MAX_JUNK:
                raise DeployError(
                    "protocol",
                    f"the target printed more than {MAX_JUNK} bytes that are not remowt's: {bytes(skipped[:200])!r}...",
                )
            skipped += window[:1]
            byte = self.read_exact(1)
            window = None if byte is None else window[1:] + byte
        if skipped:
            log.warning("the target printed this before the agent's bootstrap (login scripts?): %r", bytes(skipped))
        return window is not None

    def read_message(self) -> Optional[Dict[str, Any]]:
        header = self.read_exact(4)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        if size > MAX_BOOT_FRAME:
            raise DeployError("protocol", f"the bootstrap sent a frame of {size} bytes (more than {MAX_BOOT_FRAME})")
        body = self.read_exact(size)
        if body is None:
            return None
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
            raise DeployError("protocol", f"the bootstrap sent something that is not a message: {body[:200]!r}")
        return message


def _error(message: Dict[str, Any], bundle: AgentBundle) -> DeployError:
    """The user's error for an ``error`` frame from the target."""
    kind = str(message.get("error"))
    detail = str(message.get("message", ""))
    python = message.get("python", "?")
    if kind == "no-python":
        return DeployError(
            kind, f"no {message.get('python')} on the target: the agent needs Python 3.9 or newer on the remote PATH"
        )
    if kind == "too-old":
        return DeployError(
            kind, f"the target's {message.get('executable')} is Python {python}: the agent needs Python 3.9 or newer"
        )
    if kind == "platform-missing":
        platform = message.get("platform")
        where = shlex.quote(bundle.directory)
        return DeployError(
            kind,
            f"target platform {platform} is missing from bundle {bundle.directory}; "
            f"add it with: remowt bundle add --platform {platform} --dir {where}",
        )
    if kind == "hash-mismatch":
        return DeployError(kind, f"the target refused the agent: {detail}")
    if kind in ("install", "load"):
        return DeployError(kind, f"installing the agent on the target failed: {detail}")
    return DeployError("protocol", f"the bootstrap reported an unknown error {kind!r}: {detail}")


def _expect(message: Optional[Dict[str, Any]], kind: str, bundle: AgentBundle, session: _Session) -> Dict[str, Any]:
    if message is None:
        tail = session.transport.stderr_tail().strip()
        said = f"; its stderr:\n{tail}" if tail else " (no stderr)"
        raise DeployError("start", f"the agent's bootstrap ended while {session.phase}{said}")
    if message["kind"] == "error":
        raise _error(message, bundle)
    if message["kind"] != kind:
        raise DeployError("protocol", f"the bootstrap sent {message['kind']!r} while {session.phase}")
    return message


def start_agent(transport: Transport, bundle: AgentBundle, *, timeout: float = DEFAULT_TIMEOUT) -> DeployReport:
    """Install (if needed) and start the agent over ``transport``, which runs :func:`remote_start_command`.

    Returns once the agent has taken over the stream: the next bytes are the
    agent's protocol (``router.add_link(transport)``). On failure the
    transport is closed and a :class:`DeployError` (or a
    :class:`~remowt.deploy.bundle.BundleError` for a broken local bundle) says why.
    """
    started = time.monotonic()
    session = _Session(transport, timeout)
    try:
        boot = BOOT.encode()
        with contextlib.suppress(OSError):  # it ended at once (no Python?): what it said comes next
            session.write_all(struct.pack(">I", len(boot)) + boot)
        session.phase = "waiting for the bootstrap"
        if not session.find_magic():
            _expect(None, "status", bundle, session)
        session.phase = "waiting for the target's status"
        status = _fields(_expect(session.read_message(), "status", bundle, session), _Status)
        uploaded = not status.installed
        if uploaded:
            session.phase = f"uploading the agent for {status.platform}"
            artifact = bundle.read_artifact(status.platform)
            install = INSTALL.encode()
            session.write_all(struct.pack(">I", len(install)) + install + struct.pack(">I", len(artifact)) + artifact)
        session.phase = "waiting for the agent to be ready"
        ready = _fields(_expect(session.read_message(), "ready", bundle, session), _Ready)
    except BaseException:
        session.finish()
        transport.close()
        raise
    session.finish()
    if session.expired:  # the timer closed the transport just as the agent became ready
        raise session.timed_out()
    report = DeployReport(
        platform=ready.platform,
        python_version=ready.python,
        python_executable=ready.executable,
        path=ready.path,
        uploaded=uploaded,
        fallback=ready.note or None,
        seconds=time.monotonic() - started,
    )
    if report.fallback:
        log.warning("remowt agent (%s, Python %s): %s", report.platform, report.python_version, report.fallback)
    how = "uploaded" if uploaded else "cached"
    log.info("agent %s at %s (%s) in %.3f s", how, report.path, report.platform, report.seconds)
    return report
