"""put and get: files and trees land whole with their modes, times and links, or not at all.

Run over a loopback, a local-agent and an ssh connection as root on this
machine (the fixtures of ``test_fs``), so both ends are this file system.
The big file is 2 GiB, as the issue asks (about 20 s over ssh here).
"""

# ruff: noqa: F811  (test_fs's fixtures, taken as arguments)

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import stat
from typing import Any, Dict, List, Tuple

import pytest
from sshd import SshServer
from test_fs import TEST_PASSWORD, _quiet, conn, small_tmpfs  # noqa: F401  (the fixtures)

import remowt

pytestmark = pytest.mark.timeout(60)
BIG = 2 << 30


def _write_random(path: pathlib.Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for n in range(size >> 20):
            chunk = n.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.timeout(240)
def test_big_file_round_trip(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    source = tmp_path / "big"
    digest = _write_random(source, BIG)
    os.chmod(source, 0o640)
    os.utime(source, ns=(1_000_000_000, 1_234_567_891_000))
    landed = conn.put(source, tmp_path / "there")
    assert str(landed) == str(tmp_path / "there")
    assert conn.get(tmp_path / "there", tmp_path / "back") == str(tmp_path / "back")
    st = os.stat(tmp_path / "back")
    assert (_sha256(tmp_path / "back"), stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (digest, 0o640, 1_234_567_891_000)
    assert sorted(os.listdir(tmp_path)) == ["back", "big", "there"]
    for name in ("back", "big", "there"):  # 6 GiB: not left for pytest's kept temp dirs
        os.unlink(tmp_path / name)


def _make_tree(root: pathlib.Path, files: int) -> None:
    for n in range(files):
        directory = root / f"d{n % 50:02}" / ("deep" if n % 3 else "")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"f{n}"
        path.write_bytes(b"%d\n" % n * (n % 97))
        os.chmod(path, (0o600, 0o644, 0o755, 0o640)[n % 4])
        os.utime(path, ns=(n * 1_000_000_007, n * 1_000_000_009))
    (root / "big").write_bytes(os.urandom(3 << 20))  # one that streams, beside the batches
    (root / "link").symlink_to("d01/f1")
    (root / "dangling").symlink_to("nowhere")
    (root / "d02" / "up").symlink_to("..")
    os.chmod(root / "d03", 0o750)
    os.utime(root / "d03", ns=(5, 7_000_000_000))


def _describe(root: pathlib.Path) -> Dict[str, Tuple[Any, ...]]:
    found: Dict[str, Tuple[Any, ...]] = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = pathlib.Path(directory, name)
            st = path.lstat()
            what: Any = os.readlink(path) if path.is_symlink() else None
            if stat.S_ISREG(st.st_mode):
                what = path.read_bytes()
            found[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, what)
    return found


def test_a_tree_both_ways(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    _make_tree(tmp_path / "tree", 10_000)
    expected = _describe(tmp_path / "tree")
    (tmp_path / "there").mkdir()
    landed = conn.put(tmp_path / "tree", tmp_path / "there", recursive=True)  # into an existing directory
    assert str(landed) == str(tmp_path / "there" / "tree")
    assert _describe(tmp_path / "there" / "tree") == expected
    back = conn.get(tmp_path / "there" / "tree", tmp_path / "back", recursive=True)
    assert back == str(tmp_path / "back")
    assert _describe(tmp_path / "back") == expected


def test_progress_is_monotonic_and_ends_at_the_totals(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    _make_tree(tmp_path / "tree", 300)
    total = sum(p.stat().st_size for p in (tmp_path / "tree").rglob("*") if p.is_file() and not p.is_symlink())
    files = sum(1 for p in (tmp_path / "tree").rglob("*") if p.is_symlink() or p.is_file())
    for copy in (
        lambda progress: conn.put(tmp_path / "tree", tmp_path / "put", recursive=True, progress=progress),
        lambda progress: conn.get(tmp_path / "tree", tmp_path / "get", recursive=True, progress=progress),
    ):
        seen: List[Tuple[int, ...]] = []
        copy(lambda *state, seen=seen: seen.append(state))
        assert seen[0] == (0, total, 0, files) and seen[-1] == (total, total, files, files)
        assert all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(seen, seen[1:]))


def test_errors_name_the_file(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        conn.put(tmp_path / "missing", tmp_path / "x")
    assert raised.value.filename == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as raised:
        conn.get(tmp_path / "missing", tmp_path / "x")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOENT, str(tmp_path / "missing"))
    with pytest.raises(IsADirectoryError, match="recursive=True"):
        conn.put(tmp_path, tmp_path / "x")
    with pytest.raises(IsADirectoryError, match="recursive=True"):
        conn.get(tmp_path, tmp_path / "x")
    (tmp_path / "f").write_bytes(b"f")
    with pytest.raises(FileNotFoundError) as raised:
        conn.put(tmp_path / "f", tmp_path / "no" / "such")
    assert raised.value.filename == str(tmp_path / "no" / "such")


def test_an_interrupt_leaves_the_old_file(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    # progress is told of every chunk moved: the interrupt comes mid-file, never after it
    (tmp_path / "new").write_bytes(b"n" * (64 << 20))
    (tmp_path / "old").write_bytes(b"good")

    def interrupt(done: int, total: int, files: int, files_total: int) -> None:
        if 0 < done < total:
            raise KeyboardInterrupt

    for copy in (
        lambda: conn.put(tmp_path / "new", tmp_path / "old", progress=interrupt),
        lambda: conn.get(tmp_path / "new", tmp_path / "old", progress=interrupt),
    ):
        with pytest.raises(KeyboardInterrupt):
            copy()
        assert (tmp_path / "old").read_bytes() == b"good"
        assert _quiet(lambda: sorted(os.listdir(tmp_path)) == ["new", "old"])
    conn.put(tmp_path / "new", tmp_path / "old")  # the connection serves on
    assert (tmp_path / "old").stat().st_size == 64 << 20


def test_a_lost_link_mid_put_leaves_the_old_file(private_sshd: SshServer, tmp_path: pathlib.Path) -> None:
    (tmp_path / "new").write_bytes(b"n" * (256 << 20))
    (tmp_path / "old").write_bytes(b"good")
    with remowt.connect("remowt-test-root", ssh_config=private_sshd.ssh_config) as conn:

        def kill(done: int, total: int, files: int, files_total: int) -> None:
            if done:
                private_sshd.kill_sessions()

        with pytest.raises(remowt.ConnectionLost):
            conn.put(tmp_path / "new", tmp_path / "old", progress=kill)
    assert (tmp_path / "old").read_bytes() == b"good"
    assert _quiet(lambda: sorted(os.listdir(tmp_path)) == ["new", "old"])


def test_disk_full_is_enospc_and_leaves_the_file(
    conn: remowt.Remowt,
    small_tmpfs: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "big").write_bytes(b"x" * (4 << 20))
    target = small_tmpfs / "f"
    target.write_bytes(b"good")
    for copy in (
        lambda: conn.put(tmp_path / "big", target),
        lambda: conn.get(tmp_path / "big", target),
    ):
        with pytest.raises(OSError) as raised:
            copy()
        assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
        assert target.read_bytes() == b"good"
        assert os.listdir(small_tmpfs) == ["f"]


def test_privileged_put_keeps_a_root_files_mode_and_owner(sshd: SshServer, tmp_path: pathlib.Path) -> None:
    """As the test user with sudo's password: a root-owned 0600 file goes to a root-only directory and back."""
    os.chmod(tmp_path, 0o755)
    source = tmp_path / "secret.conf"
    source.write_bytes(b"password=new\n")
    os.chmod(source, 0o600)
    os.chown(source, 0, 0)
    directory = tmp_path / "root-only"
    directory.mkdir(mode=0o700)
    (directory / "secret.conf").write_bytes(b"password=old\n")
    with remowt.connect(sshd.alias, ssh_config=sshd.ssh_config, prompter=lambda prompt: TEST_PASSWORD) as conn:
        conn.escalation = "sudo"
        with pytest.raises(PermissionError):
            conn.put(source, directory)
        assert str(conn.privileged.put(source, directory)) == str(directory / "secret.conf")
    st = os.stat(directory / "secret.conf")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert (directory / "secret.conf").read_bytes() == b"password=new\n"
    assert os.listdir(directory) == ["secret.conf"]
