"""The agent's tree on a target: its digest, checked before the agent runs; private directories that outlive no agent.

:data:`CODE` is Python source (3.9+) that runs where no remowt code may be
imported yet: in the bootstrap (:data:`remowt.deploy.remote.BOOT`), before the
cached agent runs, and in :data:`PRIVILEGED`, before root imports anything
of the user's. This process runs the same source (the wrappers below), so
the client computes the digest it sends exactly as the target checks it.

The tree digest is the BLAKE2b-256 of the sorted lines ``d <mode> <name>``
(a directory) and ``f <blake2b-256> <mode> <name>`` (a file and the digest of
its content), one per entry under the tree's root, ``name`` its relative path
as JSON. Any other kind of entry (a symbolic link, a device) has no digest: an
extra file (a planted ``.pyc``), a missing one, a changed byte or mode all
change the digest. BLAKE2b because CPython has it built in: a target that
checked with sha256 would load the OpenSSL library at every start (~2 ms),
and the built-in sha256 is four times slower. The check of a deployed tree
also refuses any entry that is not its user's alone (:func:`verify`), in the
same walk.

A private directory (the agent's temporary copy when the cache cannot be
used, the privileged agent's copy, the askpass directory) is held by an
``flock`` on the directory itself while its process runs; one whose lock
can be taken was left by a killed process and is removed the next time one
is made there (:func:`clean_stale`), only if this user owns it.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Dict, List, Set, Tuple

CODE = r"""
import os, stat

try:
    from _blake2 import blake2b  # built in: no OpenSSL library to load at every start
except ImportError:
    from hashlib import blake2b

ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


# s as a JSON string, exactly as json.dumps(s) writes it (without importing json, which imports re)
def quote(s):
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"%s"' % s
    out = []
    for c in s:
        n = ord(c)
        if c in ESCAPES:
            out.append(ESCAPES[c])
        elif 0x20 <= n < 0x7F:
            out.append(c)
        elif n > 0xFFFF:
            n -= 0x10000
            out.append("\\u%04x\\u%04x" % (0xD800 | n >> 10, 0xDC00 | n & 0x3FF))
        else:
            out.append("\\u%04x" % n)
    return '"%s"' % "".join(out)


# one line of a tree's manifest: a directory (data None) or a file with its content
def manifest_line(name, mode, data):
    kind = "d" if data is None else "f " + blake2b(data, digest_size=32).hexdigest()
    return "%s %o %s\n" % (kind, mode, quote(name))


def manifest_digest(lines):
    return blake2b("".join(sorted(lines)).encode(), digest_size=32).hexdigest()


# ValueError unless st (of path) belongs to owner and nobody else may write it
def owned(path, st, owner):
    if st.st_uid != owner:
        raise ValueError("%s belongs to uid %d, not to this user (uid %d)" % (path, st.st_uid, owner))
    if st.st_mode & 0o022:
        raise ValueError("%s can be written by others (mode %o)" % (path, st.st_mode & 0o777))


# the digest of everything under root; ValueError or OSError for an entry neither a directory nor a regular file,
# or (owner given) one that is not owner's alone
def tree_digest(root, owner=None):
    lines = []
    todo = [("", root)]
    while todo:
        rel, path = todo.pop()
        with os.scandir(path) as entries:
            entries = list(entries)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                if owner is not None:
                    owned(entry.path, st, owner)
                lines.append(manifest_line(rel + entry.name, stat.S_IMODE(st.st_mode), None))
                todo.append((rel + entry.name + "/", entry.path))
                continue
            if entry.is_symlink():
                raise ValueError("%s is a symbolic link" % entry.path)
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # swapped for a link: ELOOP
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ValueError("%s is neither a directory nor a regular file" % entry.path)
                if owner is not None:
                    owned(entry.path, st, owner)
                data = os.read(fd, st.st_size + 1)  # one more byte: a file that grows meanwhile does not match
            finally:
                os.close(fd)
            lines.append(manifest_line(rel + entry.name, stat.S_IMODE(st.st_mode), data))
    return manifest_digest(lines)


# None when the tree under d is this user's alone and the one whose digest is want, else why not
def verify(d, want):
    try:
        got = tree_digest(d, os.getuid())
    except (OSError, ValueError) as e:
        return "cannot check %s (%s)" % (d, e)
    if got != want:
        return "%s is not the agent the client sent (its tree digest is %s, not %s)" % (d, got, want)
    return None


def noexec(d):
    try:
        return bool(os.statvfs(d).f_flag & os.ST_NOEXEC)
    except (OSError, AttributeError):
        return False


"""

# What makes and cleans private directories: run where CODE runs, but compiled only by those who need it.
PRIVATE = r"""
import os

# remove the directories prefix* in base that this user owns and no running remowt holds (left by a killed one)
def clean_stale(base, prefix):
    import fcntl, shutil
    try:
        names = [name for name in os.listdir(base) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path)
        except OSError:
            pass
        finally:
            os.close(fd)


# a new private directory prefix* in base and the open descriptor that holds its lock (OSError if none can be made)
def locked_dir(base, prefix):
    import fcntl, tempfile
    for _ in range(5):
        d = tempfile.mkdtemp(prefix=prefix, dir=base)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(d).st_ino == os.fstat(fd).st_ino:  # else a cleaner took it between mkdtemp and flock
                return d, fd
        except OSError:
            pass
        os.close(fd)
    raise OSError("others removed each directory made in %s at once" % base)


# the first new directory prefix* in one of bases that fill(d) makes usable: (d, lock, why the others were not);
# (None, -1, why) when none was: fill returns None or why not (the next base is tried), or raises ValueError (no use)
def private_tree(bases, prefix, fill):
    import shutil
    why = []
    final = False
    for base in dict.fromkeys(bases):
        if noexec(base):
            why.append("%s is mounted noexec" % base)
            continue
        clean_stale(base, prefix)
        try:
            d, lock = locked_dir(base, prefix)
        except OSError as e:
            why.append("cannot write %s (%s)" % (base, e.strerror or e))
            continue
        try:
            problem = fill(d)
        except ValueError as e:
            problem = str(e)
            final = True
        if problem is None:
            return d, lock, why
        shutil.rmtree(d, ignore_errors=True)
        os.close(lock)
        why.append(problem)
        if final:
            break
    return None, -1, why
"""

# How the agent's launchers end once ``main()`` has returned (everything shut down, every thread joined): the
# interpreter's finalization, which tears down every module and object, took ~12 ms that a local user's close waited
# for. Logging's handler writes each record through; stdout and stderr are flushed here.
QUICK_EXIT = "sys.stdout.flush(); sys.stderr.flush(); import os; os._exit(0)"

# Run by root (``python -I -S -B -c PRIVILEGED <source> <tree digest> real-agent --privileged``): copy the user's agent
# into a private directory of root's, verify the copy (not the source: the user may change it meanwhile), run that.
PRIVILEGED = (
    "import shutil, sys, tempfile\n"
    + CODE
    + PRIVATE
    + r"""
source, want = sys.argv[1:3]
del sys.argv[1:3]
LIMIT = 64 << 20  # bytes: far more than an agent, far less than would fill a tmpfs


# copy the directories and regular files under source into d; None when the copy is the agent, else why not
def copy(d):
    total = 0
    try:
        for path, dirs, files in os.walk(source):
            rel = os.path.relpath(path, source)
            into = d if rel == "." else os.path.join(d, rel)
            for name in dirs:
                if os.path.islink(os.path.join(path, name)):
                    raise ValueError("%s is a symbolic link" % os.path.join(path, name))
                os.mkdir(os.path.join(into, name), 0o700)
                os.chmod(os.path.join(into, name), 0o755)
            for name in files:
                fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with open(fd, "rb") as f:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise ValueError("%s is not a regular file" % os.path.join(path, name))
                    data = f.read(LIMIT - total + 1)
                total += len(data)
                if total > LIMIT:
                    raise ValueError("%s holds more than %d bytes: not an agent" % (source, LIMIT))
                out = os.open(os.path.join(into, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with open(out, "wb") as f:
                    f.write(data)
                    os.fchmod(f.fileno(), 0o755 if st.st_mode & 0o100 else 0o644)
    except OSError as e:
        return "cannot copy %s into %s (%s)" % (source, d, e.strerror or e)
    why = verify(d, want)
    if why is not None:
        raise ValueError("refusing to run the agent as root: %s; copied from %s" % (why, source))
    return None


d, lock, why = private_tree(["/run", "/var/tmp", tempfile.gettempdir(), "/dev/shm"], "remowt-root-", copy)
if d is None:
    sys.stderr.write("remowt: the privileged agent was not started: %s\n" % "; ".join(why))
    sys.exit(3)
sys.path.insert(0, d)
try:
    from remowt.agent.main import main

    main(sys.argv[1:])
finally:
    shutil.rmtree(d, ignore_errors=True)
"""
    + QUICK_EXIT
    + "\n"
)


@functools.cache
def _code() -> Dict[str, Any]:
    """CODE's functions, run here (on first use: the agent needs them only to escalate)."""
    functions: Dict[str, Any] = {}
    exec(compile(CODE + PRIVATE, "remowt-tree", "exec"), functions)
    return functions


def artifact_digest(artifact: bytes) -> str:
    """The digest of the tree that unpacking ``artifact`` (a ``tar.gz`` of directories and files) makes.

    Unpacking gives every directory mode 0755 (parents too), every file 0755
    if its owner may execute it, else 0644.
    """
    import tarfile

    lines: List[str] = []
    dirs: Set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            dirs.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
            if member.isdir():
                dirs.add(member.name)
            else:
                content = tar.extractfile(member)
                if content is None:
                    raise ValueError(f"the artifact's {member.name} is neither a directory nor a regular file")
                lines.append(
                    _code()["manifest_line"](member.name, 0o755 if member.mode & 0o100 else 0o644, content.read())
                )
    lines += [_code()["manifest_line"](name, 0o755, None) for name in dirs]
    return str(_code()["manifest_digest"](lines))


def clean_stale(base: str, prefix: str) -> None:
    """Remove the directories ``prefix*`` in ``base`` of this user that no running process holds."""
    _code()["clean_stale"](base, prefix)


def locked_dir(base: str, prefix: str) -> Tuple[str, int]:
    """A new private directory ``prefix*`` in ``base`` and the descriptor holding its lock (close it after removal)."""
    made: Tuple[str, int] = _code()["locked_dir"](base, prefix)
    return made
