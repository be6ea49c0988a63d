"""``remowt cp``, run as a separate process against the test sshd (as root on this machine)."""

from __future__ import annotations

import os
import pathlib
import pty
import subprocess

import pytest
from sshd import SshServer
from test_cli import REMOWT

pytestmark = pytest.mark.timeout(60)


def cp(sshd: SshServer, *args: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    command = [*REMOWT, "cp", "-F", str(sshd.ssh_config), *args]
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, timeout=50)


def test_files_and_trees_both_ways(sshd: SshServer, tmp_path: pathlib.Path) -> None:
    (tmp_path / "a").write_bytes(b"alpha")
    os.chmod(tmp_path / "a", 0o640)
    os.utime(tmp_path / "a", ns=(1, 2_000_000_000))
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "b").write_bytes(b"beta")
    (tmp_path / "tree" / "link").symlink_to("sub/b")
    (tmp_path / "there").mkdir()
    host = "remowt-test-root"
    result = cp(sshd, "-r", "-p", str(tmp_path / "a"), str(tmp_path / "tree"), f"{host}:{tmp_path}/there")
    assert (result.returncode, result.stderr, result.stdout) == (0, b"", b"")  # quiet off a terminal
    st = os.stat(tmp_path / "there" / "a")
    assert (st.st_mtime_ns, oct(st.st_mode & 0o777)) == (2_000_000_000, "0o640")
    assert os.readlink(tmp_path / "there" / "tree" / "link") == "sub/b"
    result = cp(sshd, "-r", f"{host}:{tmp_path}/there/tree", str(tmp_path / "back"))
    assert (result.returncode, result.stderr) == (0, b"")
    assert (tmp_path / "back" / "sub" / "b").read_bytes() == b"beta"


def test_a_progress_bar_on_a_terminal(sshd: SshServer, tmp_path: pathlib.Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * (3 << 20))
    primary, secondary = pty.openpty()
    try:
        result = cp(sshd, str(tmp_path / "a"), f"remowt-test-root:{tmp_path}/b", stderr=secondary)
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed and all of it was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert result.returncode == 0
    assert b"100% 3.0MiB/3.0MiB 1/1 files" in shown
    assert (tmp_path / "b").read_bytes() == b"x" * (3 << 20)


def test_errors_and_usage(sshd: SshServer, tmp_path: pathlib.Path) -> None:
    result = cp(sshd, str(tmp_path / "missing"), f"remowt-test-root:{tmp_path}/x")
    assert result.returncode == 1
    assert result.stderr.decode() == f"remowt: [Errno 2] No such file or directory: '{tmp_path}/missing'\n"
    result = cp(sshd, str(tmp_path), f"remowt-test-root:{tmp_path}/x")
    assert result.returncode == 1 and b"recursive=True" in result.stderr
    result = cp(sshd, str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 2 and b"exactly one side must be HOST:PATH" in result.stderr
    result = cp(sshd, f"remowt-test-root:{tmp_path}/a", f"remowt-test-root:{tmp_path}/b")
    assert result.returncode == 2 and b"SRC and DST must be on different sides" in result.stderr
