"""Remote paths agree with pathlib, and files move whole or not at all.

The case tables run through the fixture ``P``: :class:`pathlib.Path` itself,
and ``conn.path`` of a loopback, a local-agent and an ssh connection (as root
on this machine, so the test's files are the target's). Each case is written
once and its outcome (a value, or the error's type, errno and file name) must
be the same on every backend.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import pwd
import stat
import subprocess
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from _util import CONNECTIONS, shared_connection, wait_until
from sshd import SshServer

import remowt
from remowt.user.paths import RemotePath, open_raw, write_atomically

TEST_USER = "remowt-test"
TEST_PASSWORD = "remowt-test-password"

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["pathlib", *CONNECTIONS])
def P(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> Callable[..., Any]:
    """``pathlib.Path``, or a connection's ``path``."""
    if request.param == "pathlib":
        return pathlib.Path
    return shared_connection(request, connections, request.param).path


@pytest.fixture(params=list(CONNECTIONS))
def conn(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> remowt.Remowt:
    return shared_connection(request, connections, request.param)


def outcome(action: Callable[[], Any]) -> Tuple[Any, ...]:
    """What ``action`` gives, comparable across backends: ("ok", value) or ("error", type, errno, names)."""
    try:
        value = action()
    except OSError as e:
        return ("error", type(e).__name__, e.errno, e.filename, e.filename2)
    except (ValueError, TypeError, NotImplementedError) as e:
        return ("error", type(e).__name__)
    return ("ok", plain(value))


def plain(value: Any) -> Any:
    """Paths as text, stat results as their fields that do not change by looking."""
    if isinstance(value, (pathlib.PurePath, RemotePath)):
        return str(value)
    if isinstance(value, os.stat_result):
        return (value.st_mode, value.st_ino, value.st_size, value.st_uid, value.st_mtime_ns, value.st_nlink)
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A small tree: files, a directory with a subdirectory, symbolic links (one dangling), a fifo, a 0600 file."""
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / ".hidden").write_text("hidden")
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "one.py").write_text("print(1)\n")
    (tmp_path / "sub" / "deep" / "two.py").write_text("print(2)\n")
    (tmp_path / "sub" / "deep" / "notes.txt").write_text("notes")
    (tmp_path / "to-a").symlink_to("a.txt")
    (tmp_path / "to-sub").symlink_to("sub")
    (tmp_path / "dangling").symlink_to("nowhere")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "private").write_text("secret")
    (tmp_path / "private").chmod(0o600)
    return tmp_path


QUERIES: Dict[str, Callable[[Any], Any]] = {
    "stat": lambda p: p.stat(),
    "lstat": lambda p: p.lstat(),
    "stat-nofollow": lambda p: p.stat(follow_symlinks=False),
    "exists": lambda p: p.exists(),
    "is_dir": lambda p: p.is_dir(),
    "is_file": lambda p: p.is_file(),
    "is_symlink": lambda p: p.is_symlink(),
    "is_fifo": lambda p: p.is_fifo(),
    "is_socket": lambda p: p.is_socket(),
    "is_char_device": lambda p: p.is_char_device(),
    "read_bytes": lambda p: p.read_bytes(),
    "read_text": lambda p: p.read_text(),
    "readlink": lambda p: p.readlink(),
    "resolve": lambda p: p.resolve(),
    "resolve-strict": lambda p: p.resolve(strict=True),
    "iterdir": lambda p: sorted(str(child) for child in p.iterdir()),
    "name-parent-suffix": lambda p: (p.name, str(p.parent), p.suffix, p.stem, p.parts[-1]),
    "joined": lambda p: (p / "x" / "y.tar.gz").with_suffix(".bz2"),
}
NAMES = ["a.txt", "b.bin", "sub", "sub/deep/two.py", "to-a", "to-sub", "dangling", "missing", "a.txt/inside", "fifo"]


@pytest.mark.parametrize("query", list(QUERIES))
def test_queries_agree_with_pathlib(P: Callable[..., Any], tree: pathlib.Path, query: str) -> None:
    results = {}
    for name in NAMES:
        if query.startswith("read") and name == "fifo":
            continue  # a fifo with no writer blocks a reader, here and there
        results[name] = outcome(lambda name=name: QUERIES[query](P(tree, name)))
    expected = {
        name: outcome(lambda name=name: QUERIES[query](pathlib.Path(tree, name)))
        for name in NAMES
        if not (query.startswith("read") and name == "fifo")
    }
    assert results == expected


GLOBS = ["*", "*.txt", "**/*.py", "sub/*", "**", "s?b", "[ab]*", "sub/**/n*", "a.txt", "missing/*", "*/*.py", "**/deep"]


@pytest.mark.parametrize("pattern", GLOBS)
def test_glob_agrees_with_pathlib(P: Callable[..., Any], tree: pathlib.Path, pattern: str) -> None:
    found = sorted(str(p) for p in P(tree).glob(pattern))
    assert found == sorted(str(p) for p in pathlib.Path(tree).glob(pattern))
    assert sorted(str(p) for p in P(tree).rglob("*.py")) == sorted(str(p) for p in tree.rglob("*.py"))


CHANGES: Dict[str, Callable[[Any], Any]] = {
    "write_bytes": lambda t: (t / "new").write_bytes(b"new\n"),
    "write_bytes-over": lambda t: (t / "a.txt").write_bytes(b"over"),
    "write_bytes-dir": lambda t: (t / "sub").write_bytes(b"x"),
    "write_bytes-missing-dir": lambda t: (t / "missing" / "f").write_bytes(b"x"),
    "write_text": lambda t: (t / "new.txt").write_text("a\nb\n"),
    "write_text-through-link": lambda t: (t / "to-a").write_text("via link"),
    "mkdir": lambda t: (t / "d").mkdir(),
    "mkdir-mode": lambda t: (t / "d").mkdir(mode=0o700),
    "mkdir-exists": lambda t: (t / "sub").mkdir(),
    "mkdir-exist_ok": lambda t: (t / "sub").mkdir(exist_ok=True),
    "mkdir-exist_ok-file": lambda t: (t / "a.txt").mkdir(exist_ok=True),
    "mkdir-no-parent": lambda t: (t / "x" / "y").mkdir(),
    "mkdir-parents": lambda t: (t / "x" / "y" / "z").mkdir(parents=True),
    "unlink": lambda t: (t / "a.txt").unlink(),
    "unlink-missing": lambda t: (t / "missing").unlink(),
    "unlink-missing_ok": lambda t: (t / "missing").unlink(missing_ok=True),
    "unlink-dir": lambda t: (t / "sub").unlink(),
    "unlink-link": lambda t: (t / "to-sub").unlink(),
    "rmdir": lambda t: (
        (t / "sub" / "deep" / "two.py").unlink()
        or (t / "sub" / "deep" / "notes.txt").unlink()
        or (t / "sub" / "deep").rmdir()
    ),
    "rmdir-not-empty": lambda t: (t / "sub").rmdir(),
    "rename": lambda t: (t / "a.txt").rename(t / "renamed"),
    "rename-over": lambda t: (t / "a.txt").rename(t / "b.bin"),
    "rename-missing": lambda t: (t / "missing").rename(t / "x"),
    "rename-dir-over-file": lambda t: (t / "sub").rename(t / "a.txt"),
    "replace": lambda t: (t / "b.bin").replace(t / "a.txt"),
    "chmod": lambda t: (t / "a.txt").chmod(0o640),
    "chmod-missing": lambda t: (t / "missing").chmod(0o640),
    "touch-new": lambda t: (t / "touched").touch(mode=0o600),
    "touch-exists": lambda t: (t / "a.txt").touch(exist_ok=False),
    "symlink_to": lambda t: (t / "link").symlink_to("sub/one.py"),
    "symlink_to-exists": lambda t: (t / "a.txt").symlink_to("b.bin"),
    "open-w": lambda t: _write(t / "a.txt", "w", "written\n"),
    "open-a": lambda t: _write(t / "a.txt", "a", "appended\n"),
    "open-x": lambda t: _write(t / "a.txt", "x", "x"),
    "open-x-new": lambda t: _write(t / "fresh", "x", "x"),
    "open-wb": lambda t: _write(t / "bytes", "wb", b"\x00\xff"),
    "open-ab-new": lambda t: _write(t / "bytes", "ab", b"\x00\xff"),
    "open-w-dir": lambda t: _write(t / "sub", "w", ""),
    "open-r-dir": lambda t: (t / "sub").open("rb"),
    "open-bad": lambda t: (t / "a.txt").open("rw"),
}


def _write(path: Any, mode: str, data: Any) -> None:
    with path.open(mode) as f:
        f.write(data)


def snapshot(root: pathlib.Path) -> List[Tuple[str, int, Any]]:
    """Every entry below ``root``: name, mode and content (or link target), walked here."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = pathlib.Path(path).read_bytes()
            else:
                content = None
            found.append((os.path.relpath(path, root), st.st_mode, content))
    return sorted(found)


@pytest.mark.parametrize("change", list(CHANGES))
def test_changes_agree_with_pathlib(
    P: Callable[..., Any], tree: pathlib.Path, tmp_path_factory: pytest.TempPathFactory, change: str
) -> None:
    """Each change, made through the backend, gives the outcome and leaves the tree pathlib's does."""
    mirror = tmp_path_factory.mktemp("mirror")
    subprocess.run(["cp", "-a", f"{tree}/.", str(mirror)], check=True)
    got = outcome(lambda: CHANGES[change](P(tree)))
    expected = outcome(lambda: CHANGES[change](pathlib.Path(mirror)))
    assert got == tuple(str(v).replace(str(mirror), str(tree)) if isinstance(v, str) else v for v in expected)
    assert snapshot(tree) == snapshot(mirror)


def test_open_reads_lines_and_streams(P: Callable[..., Any], tree: pathlib.Path) -> None:
    with P(tree, "a.txt").open() as f:
        assert (f.readline(), list(f)) == ("alpha\n", ["beta\n"])
    with P(tree, "b.bin").open("rb") as f:
        assert (f.read(3), f.read(1)) == (b"\x00\x01\x02", b"\x03")
        assert len(f.read()) == 256 * 40 - 4
    with P(tree, "b.bin").open("rb", buffering=0) as f:
        assert f.read(5) == b"\x00\x01\x02\x03\x04"
    with P(tree, "a.txt").open("r", newline="") as f:
        assert f.read() == "alpha\nbeta\n"


def test_big_file_round_trip(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    """64 MiB there and back, by write_bytes, a streamed writer and reader; the same sha256."""
    data = os.urandom(64 << 20)
    remote = conn.path(tmp_path, "big")
    assert remote.write_bytes(data) == len(data)
    assert hashlib.sha256((tmp_path / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
    with conn.path(tmp_path, "copy").open("wb") as f:
        for offset in range(0, len(data), 3 << 20):
            f.write(data[offset : offset + (3 << 20)])
    digest = hashlib.sha256()
    with conn.path(tmp_path, "copy").open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()


def test_a_raw_read_gives_what_came_and_then_the_end(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    """An unbuffered file's read(n) hands on the stream's bytes (at most n), b"" at the end, and finishes the
    transfer then: an error met there would be raised by that read."""
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    pieces = []
    with open_raw(conn.path(tmp_path, "f"), None) as raw:
        assert raw.read(0) == b""
        while piece := raw.read(700000):
            assert type(piece) is bytes and 0 < len(piece) <= 700000
            pieces.append(piece)
        assert raw.read(10) == b""
        assert raw._finished
    assert b"".join(pieces) == data


def test_a_reader_that_gives_up_ends_the_transfer_at_the_node(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    """Closing a reader before the end stops the node's sending thread (the file spliced into the link where
    the link splices): the node lets go of the file, and the next read of it is whole."""
    data = os.urandom(48 << 20)
    (tmp_path / "f").write_bytes(data)
    agent = conn.info().pid

    def node_has_it_open() -> bool:
        for fd in os.listdir(f"/proc/{agent}/fd"):
            try:
                if os.readlink(f"/proc/{agent}/fd/{fd}") == str(tmp_path / "f"):
                    return True
            except FileNotFoundError:
                continue
        return False

    raw = open_raw(conn.path(tmp_path, "f"), None, offset=5)
    first = raw.read(1 << 20)
    assert first and first == data[5 : 5 + len(first)]
    assert node_has_it_open()
    raw.close()
    assert wait_until(lambda: not node_has_it_open(), 20)
    assert conn.path(tmp_path, "f").read_bytes() == data


def test_reads_and_writes_at_an_offset(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    with open_raw(conn.path(tmp_path, "f"), None, offset=3, length=4) as raw:
        assert raw.readall() == b"3456"
    with open_raw(conn.path(tmp_path, "f"), "update", offset=8) as raw:
        raw.write(b"xyz")
    assert (tmp_path / "f").read_bytes() == b"01234567xyz"


def test_an_abandoned_atomic_write_leaves_the_file_as_it_was(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    (tmp_path / "f").write_bytes(b"good")
    os.chmod(tmp_path / "f", 0o640)

    def produce(writer: Any) -> None:
        writer.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(conn.path(tmp_path, "f"), produce)
    assert (tmp_path / "f").read_bytes() == b"good"
    conn.ping()  # the connection serves on
    assert _quiet(lambda: os.listdir(tmp_path) == ["f"])  # the new file is gone once the node saw the reset


def _quiet(condition: Callable[[], bool]) -> bool:
    return wait_until(condition, 10)


def test_atomic_write_keeps_mode_and_owner(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    os.chown(target, 1234, 5678)
    conn.path(target).write_bytes(b"new")
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, target.read_bytes()) == (0o604, 1234, 5678, b"new")
    assert os.listdir(tmp_path) == ["f"]


def test_lost_link_fails_a_transfer_and_leaves_the_file(private_sshd: SshServer, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"good")
    with remowt.connect("remowt-test-root", ssh_config=private_sshd.ssh_config) as conn:
        remote = conn.path(target)

        def produce(writer: Any) -> None:
            writer.write(b"x" * (1 << 20))
            private_sshd.kill_sessions()
            while True:
                writer.write(b"x" * (1 << 20))

        with pytest.raises(remowt.ConnectionLost):
            write_atomically(remote, produce)
        with pytest.raises(remowt.ConnectionLost):
            remote.read_bytes()
    assert target.read_bytes() == b"good"
    assert _quiet(lambda: os.listdir(tmp_path) == ["f"])  # the agent saw its link end and removed its new file


@pytest.fixture
def small_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True, timeout=10)


def test_disk_full_is_enospc_and_leaves_the_file(conn: remowt.Remowt, small_tmpfs: pathlib.Path) -> None:
    target = small_tmpfs / "f"
    target.write_bytes(b"good")
    with pytest.raises(OSError) as raised:
        conn.path(target).write_bytes(b"x" * (4 << 20))
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert target.read_bytes() == b"good"
    assert os.listdir(small_tmpfs) == ["f"]
    with pytest.raises(OSError) as raised, conn.path(small_tmpfs, "g").open("wb") as f:
        f.write(b"x" * (4 << 20))
    assert raised.value.errno == errno.ENOSPC


def test_bad_arguments_are_named(conn: remowt.Remowt) -> None:
    with pytest.raises(TypeError, match="path segment must be str, bytes or a path-like object, got int"):
        conn.path(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"invalid mode: 'r\+' \(no '\+'"):
        conn.path("/etc/hosts").open("r+")
    with remowt.loopback() as other, pytest.raises(ValueError, match="is on another node than"):
        conn.path(other.path("/etc"), "hosts")


def test_expanduser_and_home_are_the_nodes(conn: remowt.Remowt) -> None:
    home = pwd.getpwuid(conn.info().uid).pw_dir
    assert str(conn.path("~/x").expanduser()) == f"{home}/x"
    assert str(conn.path("/").home()) == home


def test_privileged_reads_and_rewrites_a_root_file_over_ssh(sshd: SshServer, tmp_path: pathlib.Path) -> None:
    """As the test user with sudo's password: a root-owned 0600 file is refused, then read and replaced as root."""
    directory = tmp_path / "root-only"
    directory.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    target = directory / "secret.conf"
    target.write_bytes(b"password=old\n")
    os.chmod(target, 0o600)
    with remowt.connect(sshd.alias, ssh_config=sshd.ssh_config, prompter=lambda prompt: TEST_PASSWORD) as conn:
        conn.escalation = "sudo"
        assert conn.info().uid == pwd.getpwnam(TEST_USER).pw_uid
        with pytest.raises(PermissionError) as raised:
            conn.path(target).read_bytes()
        assert (raised.value.errno, raised.value.filename) == (errno.EACCES, str(target))
        root = conn.privileged.path(target)
        assert root.read_bytes() == b"password=old\n"
        root.write_text("password=new\n")
        assert root.stat().st_uid == 0
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, target.read_bytes()) == (0o600, 0, b"password=new\n")
    assert os.listdir(directory) == ["secret.conf"]
