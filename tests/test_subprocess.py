"""The subprocess service, end to end, over both transports."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import threading
from typing import Any, List

import pytest

import remowt
from remowt import PIPE, STDOUT
from remowt.endpoints.subprocess import SpawnOptions

ENV = shutil.which("env") or "/usr/bin/env"


def run(conn: remowt.Remowt, argv: List[str], timeout: float = 30, **options: Any) -> tuple[int, bytes]:
    """Spawn with stdout piped (and ``options``; ``extra_env`` extends the environment), read everything, wait."""
    if "extra_env" in options:
        options["env"] = options.pop("extra_env")
    elif "env" in options:
        options["replace_env"] = True
    proc = conn.spawn(argv, SpawnOptions(**options), stdout=PIPE)
    assert proc.stdout is not None
    out = proc.stdout.readall(timeout=timeout)
    return proc.wait(timeout=timeout), out


@pytest.mark.timeout(30)
def test_echo(conn: remowt.Remowt) -> None:
    proc = conn.spawn(["echo", "hello", "world"], stdout=PIPE)
    assert proc.pid > 0
    assert proc.args == ["echo", "hello", "world"]
    assert proc.stdin is None and proc.stderr is None
    assert proc.stdout is not None
    assert proc.stdout.readall(timeout=10) == b"hello world\n"
    assert proc.wait(timeout=10) == 0
    assert proc.returncode == 0
    assert proc.poll() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes(conn: remowt.Remowt, code: int) -> None:
    proc = conn.spawn(["sh", "-c", f"exit {code}"])
    assert proc.wait(timeout=10) == code
    assert proc.poll() == code


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_child_killed_by_own_signal(conn: remowt.Remowt, sig: signal.Signals) -> None:
    proc = conn.spawn(["sh", "-c", f"kill -{int(sig)} $$; sleep 60"])
    assert proc.wait(timeout=10) == -int(sig)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["send_signal", "terminate", "kill"])
def test_signal_from_client(conn: remowt.Remowt, method: str) -> None:
    # the child says it is ready (its trap-free shell is running) before we signal it
    proc = conn.spawn(["sh", "-c", "echo ready; exec sleep 60"], stdout=PIPE)
    assert proc.stdout is not None
    assert proc.stdout.read(100, timeout=10) == b"ready\n"
    assert proc.poll() is None
    if method == "send_signal":
        proc.send_signal(signal.SIGINT)
        expected = -signal.SIGINT
    elif method == "terminate":
        proc.terminate()
        expected = -signal.SIGTERM
    else:
        proc.kill()
        expected = -signal.SIGKILL
    assert proc.wait(timeout=10) == expected
    assert proc.returncode == expected
    # signalling an exited child is a no-op, not an error
    proc.kill()


@pytest.mark.timeout(30)
def test_wait_timeout(conn: remowt.Remowt) -> None:
    proc = conn.spawn(["sleep", "60"])
    with pytest.raises(TimeoutError):
        proc.wait(timeout=0.05)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.timeout(30)
def test_env_replaces(conn: remowt.Remowt) -> None:
    code, out = run(conn, [ENV], env={"REMOWT_TEST": "replaced", "OTHER": "x y"})
    assert code == 0
    assert sorted(out.decode().splitlines()) == ["OTHER=x y", "REMOWT_TEST=replaced"]


@pytest.mark.timeout(30)
def test_env_empty_replaces(conn: remowt.Remowt) -> None:
    code, out = run(conn, [ENV], env={})
    assert (code, out) == (0, b"")


@pytest.mark.timeout(30)
def test_extra_env_extends(conn: remowt.Remowt) -> None:
    code, out = run(conn, [ENV], extra_env={"REMOWT_TEST": "extended"})
    assert code == 0
    lines = out.decode().splitlines()
    assert "REMOWT_TEST=extended" in lines
    # the agent's own environment (inherited from this process) is still there
    assert f"PATH={os.environ['PATH']}" in lines
    assert len(lines) > 1


@pytest.mark.timeout(30)
def test_env_and_extra_env_exclusive(conn: remowt.Remowt) -> None:
    with pytest.raises(ValueError, match="not both"):
        conn.Popen(["true"], env={"A": "1"}, extra_env={"B": "2"})


@pytest.mark.timeout(30)
def test_cwd(conn: remowt.Remowt, tmp_path: os.PathLike[str]) -> None:
    code, out = run(conn, ["pwd", "-P"], cwd=str(tmp_path))
    assert code == 0
    assert out.decode().rstrip("\n") == os.path.realpath(tmp_path)


@pytest.mark.timeout(30)
def test_bad_cwd(conn: remowt.Remowt, tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "no", "such", "dir")
    with pytest.raises(FileNotFoundError) as info:
        conn.spawn(["true"], SpawnOptions(cwd=missing), stdout=PIPE)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == missing
    # the connection is still fine
    assert run(conn, ["echo", "ok"]) == (0, b"ok\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("program", ["/nonexistent/remowt-no-such-program", "remowt-no-such-program"])
def test_missing_executable(conn: remowt.Remowt, program: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        conn.spawn([program, "arg"], stdin=PIPE, stdout=PIPE, stderr=PIPE)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == program
    assert isinstance(info.value, OSError)
    assert run(conn, ["echo", "ok"]) == (0, b"ok\n")


@pytest.mark.timeout(30)
def test_not_executable(conn: remowt.Remowt, tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "script")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError) as info:
        conn.spawn([path])
    assert info.value.errno == errno.EACCES
    assert info.value.filename == path


@pytest.mark.timeout(30)
def test_stderr_to_stdout(conn: remowt.Remowt) -> None:
    proc = conn.spawn(["sh", "-c", "echo out; echo err >&2; echo out2"], stdout=PIPE, stderr=STDOUT)
    assert proc.stderr is None
    assert proc.stdout is not None
    assert proc.stdout.readall(timeout=10) == b"out\nerr\nout2\n"
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(30)
def test_stderr_pipe_separate(conn: remowt.Remowt) -> None:
    proc = conn.spawn(["sh", "-c", "echo out; echo err >&2"], stdout=PIPE, stderr=PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readall(timeout=10) == b"out\n"
    assert proc.stderr.readall(timeout=10) == b"err\n"
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(30)
def test_stdin_devnull_by_default(conn: remowt.Remowt) -> None:
    assert run(conn, ["cat"]) == (0, b"")


@pytest.mark.timeout(60)
def test_cat_round_trip_64_mib(conn: remowt.Remowt) -> None:
    total = 64 * 1024 * 1024
    block = os.urandom(1024 * 1024 + 7)  # not a power of two: exercises chunk boundaries
    proc = conn.spawn(["cat"], stdin=PIPE, stdout=PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    sent = hashlib.sha256()
    errors: List[BaseException] = []

    def writer() -> None:
        assert proc.stdin is not None
        try:
            left = total
            while left:
                piece = block[: min(left, len(block))]
                proc.stdin.write(piece, timeout=30)
                sent.update(piece)
                left -= len(piece)
            proc.stdin.close_write()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    received = hashlib.sha256()
    count = 0
    while True:
        chunk = proc.stdout.read(1 << 20, timeout=30)
        if not chunk:
            break
        received.update(chunk)
        count += len(chunk)
    thread.join(30)
    assert not thread.is_alive()
    assert not errors, errors
    assert count == total
    assert received.hexdigest() == sent.hexdigest()
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(60)
def test_fifty_concurrent_children(conn: remowt.Remowt) -> None:
    n = 50
    procs = [conn.spawn(["sh", "-c", "read x; echo got-$x"], stdin=PIPE, stdout=PIPE) for _ in range(n)]
    assert len({p.pid for p in procs}) == n
    # all of them are running, each blocked on its stdin
    assert all(p.poll() is None for p in procs)
    for i, proc in enumerate(procs):
        assert proc.stdin is not None
        proc.stdin.write(f"{i}\n".encode())
        proc.stdin.close_write()
    for i, proc in enumerate(procs):
        assert proc.stdout is not None
        assert proc.stdout.readall(timeout=30) == f"got-{i}\n".encode()
        assert proc.wait(timeout=30) == 0


@pytest.mark.timeout(30)
def test_stdin_closed_early_by_child(conn: remowt.Remowt) -> None:
    # the child exits without reading: the writer gets BrokenPipeError or its bytes vanish, never a hang
    proc = conn.spawn(["sh", "-c", "exit 0"], stdin=PIPE)
    assert proc.wait(timeout=10) == 0
    assert proc.stdin is not None
    with pytest.raises(BrokenPipeError):
        for _ in range(64):
            proc.stdin.write(b"x" * (1 << 20), timeout=10)


@pytest.mark.timeout(30)
def test_spawn_argument_checks(conn: remowt.Remowt) -> None:
    with pytest.raises(ValueError):
        conn.spawn([])
    with pytest.raises(ValueError):
        conn.spawn(["true"], stdin=STDOUT)
    with pytest.raises(ValueError):
        conn.spawn(["true"], stdout=1234)
