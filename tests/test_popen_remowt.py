"""What only remowt's subprocess face has: refused local-only arguments, binding to a
connection, the default connection, and ``remowt.patch()``."""

from __future__ import annotations

import logging
import os
import pathlib
import select
import shutil
import subprocess
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from _util import wait_until

import remowt
from remowt.user.default import close_default_connection, default_connection

PIPE = subprocess.PIPE
ENV = shutil.which("env") or "/usr/bin/env"
PPID = ["sh", "-c", "echo $PPID"]
PATCHED = ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=["loopback", "local"])
def connection(request: pytest.FixtureRequest) -> Iterator[remowt.Remowt]:
    made = remowt.loopback() if request.param == "loopback" else remowt.connect_local()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def local() -> Iterator[remowt.Remowt]:
    made = remowt.connect_local()
    try:
        yield made
    finally:
        made.close()


def ppid_line(pid: int) -> bytes:
    return f"{pid}\n".encode()


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def originals() -> Dict[str, Any]:
    return {name: getattr(subprocess, name) for name in PATCHED}


# --- arguments that cannot be honoured on the target ------------------------------------


LOCAL_ONLY = [
    ({"preexec_fn": os.getpid}, "preexec_fn"),
    ({"pass_fds": (0,)}, "pass_fds"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("kwargs", "name"), LOCAL_ONLY, ids=[name for _, name in LOCAL_ONLY])
def test_local_only_arguments_are_refused(connection: remowt.Remowt, kwargs: Dict[str, Any], name: str) -> None:
    if name == "pass_fds" and connection.fd_sender is not None:
        kwargs = {**kwargs, "pty": True}  # a local agent takes this process's fds, but not for a child on a terminal
    calls = [
        lambda: connection.Popen(["true"], **kwargs),
        lambda: remowt.Popen(["true"], connection=connection, **kwargs),
        lambda: connection.run(["true"], **kwargs),
        lambda: connection.call(["true"], **kwargs),
        lambda: connection.check_output(["true"], **kwargs),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=name):
            call()
    # nothing was started: the connection has no children to wait for
    assert connection.children.count() == 0


def test_local_only_arguments_with_their_defaults_are_fine(connection: remowt.Remowt) -> None:
    result = connection.run(["echo", "ok"], stdout=PIPE, preexec_fn=None, pass_fds=(), close_fds=True)
    assert result.stdout == b"ok\n"


# --- exceptions and constants ---------------------------------------------------------------


def test_exceptions_subclass_subprocess_s_own() -> None:
    assert issubclass(remowt.SubprocessError, subprocess.SubprocessError)
    assert issubclass(remowt.CalledProcessError, subprocess.CalledProcessError)
    assert issubclass(remowt.CalledProcessError, remowt.SubprocessError)
    assert issubclass(remowt.TimeoutExpired, subprocess.TimeoutExpired)
    assert issubclass(remowt.TimeoutExpired, remowt.SubprocessError)
    assert remowt.CompletedProcess is subprocess.CompletedProcess
    assert (remowt.PIPE, remowt.DEVNULL, remowt.STDOUT) == (subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT)


def test_connection_has_the_subprocess_names(connection: remowt.Remowt) -> None:
    assert connection.CalledProcessError is remowt.CalledProcessError
    assert connection.TimeoutExpired is remowt.TimeoutExpired
    assert connection.SubprocessError is remowt.SubprocessError
    assert connection.CompletedProcess is subprocess.CompletedProcess
    assert (connection.PIPE, connection.DEVNULL, connection.STDOUT) == (PIPE, subprocess.DEVNULL, subprocess.STDOUT)


def test_raised_exceptions_are_remowt_s(connection: remowt.Remowt) -> None:
    with pytest.raises(remowt.CalledProcessError) as called:
        connection.check_call(["sh", "-c", "exit 3"])
    assert isinstance(called.value, subprocess.CalledProcessError)
    with pytest.raises(remowt.TimeoutExpired) as expired:
        connection.run(["sleep", "30"], timeout=0.1)
    assert isinstance(expired.value, subprocess.TimeoutExpired)
    proc = connection.Popen(["sleep", "30"])
    with pytest.raises(remowt.TimeoutExpired):
        proc.wait(timeout=0.05)
    proc.kill()
    assert proc.wait(timeout=10) == -9


# --- Popen bound to a connection ----------------------------------------------------------------


def test_popen_with_connection_argument(connection: remowt.Remowt) -> None:
    with remowt.Popen(["echo", "explicit"], stdout=PIPE, connection=connection) as proc:
        assert isinstance(proc, remowt.Popen)
        assert proc.connection is connection
        assert proc.stdout is not None
        assert proc.stdout.read() == b"explicit\n"
    assert proc.returncode == 0


def test_connection_popen_is_a_remowt_popen(connection: remowt.Remowt) -> None:
    assert issubclass(connection.Popen, remowt.Popen)
    assert connection.Popen is connection.Popen
    with connection.Popen(["echo", "bound"], stdout=PIPE) as proc:
        assert isinstance(proc, remowt.Popen)
        assert isinstance(proc, connection.Popen)
        assert proc.connection is connection
        assert proc.communicate() == (b"bound\n", None)


def test_popen_connection_argument_beats_the_bound_one(connection: remowt.Remowt, local: remowt.Remowt) -> None:
    with connection.Popen(PPID, stdout=PIPE, connection=local) as proc:
        assert proc.connection is local
        assert proc.communicate()[0] == ppid_line(local.info().pid)


def test_extra_env_extends(connection: remowt.Remowt) -> None:
    lines = connection.check_output([ENV], extra_env={"REMOWT_EXTRA": "x y"}).splitlines()
    assert b"REMOWT_EXTRA=x y" in lines
    assert any(line.startswith(b"PATH=") for line in lines)
    with pytest.raises(ValueError, match="not both"):
        connection.run([ENV], env={"A": "1"}, extra_env={"B": "2"})


def test_target_pid_is_the_child_of_the_agent(local: remowt.Remowt) -> None:
    with local.Popen(["sh", "-c", "read x"], stdin=PIPE) as proc:
        assert parent_of(proc.pid) == local.info().pid
        assert proc.stdin is not None
        proc.stdin.write(b"\n")


# --- stdio copied by this process: what a remote child cannot share with us ------------------------


@pytest.mark.timeout(30)
def test_stdin_file_is_read_only_as_far_as_it_was_sent(connection: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    size = 32 << 20
    (tmp_path / "big").write_bytes(b"x" * size)
    with open(tmp_path / "big", "rb") as f:
        start = time.monotonic()
        assert connection.call(["head", "-c", "1"], stdin=f, stdout=subprocess.DEVNULL) == 0
        assert time.monotonic() - start < 10
        # the copy stopped with the child: a stream window and a pipe or so went ahead, not the whole file
        assert 1 <= f.tell() <= 8 << 20
        assert f.read(1) == b"x"


@pytest.mark.timeout(30)
def test_wait_does_not_wait_for_a_grandchild_holding_stdin(connection: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (32 << 20))
    with open(tmp_path / "big", "rb") as f:
        # the grandchild keeps the child's stdin and never reads it: the copy fills the window and stalls
        proc = connection.Popen(["sh", "-c", "sleep 3 >/dev/null 2>&1 & exit 0"], stdin=f)
        assert proc.wait(timeout=10) == 0
    assert connection.check_output(["echo", "still usable"], timeout=10) == b"still usable\n"


def test_given_fds_may_be_closed_once_the_child_started(connection: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    # as with a local child, which has its own copies: the copies here use their own duplicates
    (tmp_path / "in").write_bytes(b"input\n")
    read_fd = os.open(tmp_path / "in", os.O_RDONLY)
    write_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    proc = connection.Popen(["sh", "-c", "read x; sleep 0.2; echo got $x"], stdin=read_fd, stdout=write_fd)
    os.close(read_fd)
    os.close(write_fd)
    # numbers reused for another file must not receive the child's output
    decoy = os.open(tmp_path / "decoy", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(decoy)
    assert (tmp_path / "out").read_bytes() == b"got input\n"
    assert (tmp_path / "decoy").read_bytes() == b""


def test_output_copied_to_a_fd_opens_no_stream_until_written(connection: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    # a child that has not written to its copied stdout/stderr costs no stream: only its stdin pipe is open
    with open(tmp_path / "out", "wb") as out:
        proc = connection.Popen(["sh", "-c", "read x; echo got $x"], stdin=PIPE, stdout=out, stderr=out)
        # a local agent's child has our pipe and file themselves: no stream at all
        assert connection.router.stream_count() == (0 if connection.fd_sender is not None else 1)
        assert proc.stdin is not None
        proc.stdin.write(b"line\n")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    assert (tmp_path / "out").read_bytes() == b"got line\n"
    assert connection.router.stream_count() == 0


def test_output_of_a_grandchild_after_the_child_exited(connection: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    # the grandchild keeps the copied stdout open past the child's exit: what it writes then is copied too
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with open(tmp_path / "out", "wb") as out:
        proc = connection.Popen(["sh", "-c", f"(read x < {fifo}; echo late $x) & exit 0"], stdout=out)
        assert proc._process is not None
        assert proc._process.wait(timeout=10) == 0  # the exit arrived; the grandchild still waits
        with open(fifo, "wb") as feed:
            feed.write(b"now\n")
        assert proc.wait(timeout=10) == 0
        if connection.fd_sender is not None:  # the grandchild writes to the file itself, as a local one would
            assert wait_until(lambda: (tmp_path / "out").read_bytes() == b"late now\n", 10)
    assert (tmp_path / "out").read_bytes() == b"late now\n"


def test_pipeline_across_two_connections(connection: remowt.Remowt, local: remowt.Remowt) -> None:
    first = connection.Popen(["sh", "-c", "echo one; echo two"], stdout=PIPE)
    second = local.Popen(["cat"], stdin=first.stdout, stdout=PIPE)
    assert first.stdout is not None
    first.stdout.close()
    assert second.communicate(timeout=10) == (b"one\ntwo\n", None)
    assert first.wait(timeout=10) == 0


def test_pipe_with_a_real_fd_is_copied_through_it(connection: remowt.Remowt) -> None:
    first = connection.Popen(["sh", "-c", "echo one"], stdout=PIPE)
    assert first.stdout is not None
    assert select.select([first.stdout], [], [], 10)[0] == [first.stdout]
    second = connection.Popen(["cat"], stdin=first.stdout, stdout=PIPE)
    first.stdout.close()
    assert second.communicate(timeout=10) == (b"one\n", None)
    assert first.wait(timeout=10) == 0


def test_lost_connection_reaches_a_reader_with_a_real_fd() -> None:
    connection = remowt.loopback()
    proc = connection.Popen(["sh", "-c", "echo first; exec sleep 30"], stdout=PIPE)
    assert proc.stdout is not None
    assert select.select([proc.stdout], [], [], 10)[0] == [proc.stdout]
    assert proc.stdout.readline() == b"first\n"
    connection.close()
    with pytest.raises(remowt.ConnectionLost):
        proc.stdout.read()
    proc.stdout.close()


BAD_STRINGS = [
    ({"extra_env": {"A": "b\0c"}}, "embedded null byte"),
    ({"extra_env": {"A=B": "c"}}, "illegal environment variable name"),
    ({"env": {"A\0B": "c"}}, "embedded null byte"),
    ({"cwd": "/tmp\0x"}, "embedded null byte in cwd"),
    ({"executable": "/bin/sh\0x"}, "embedded null byte in executable"),
    ({"args": ["sh", "-c", "a\0b"], "shell": True}, r"embedded null byte in args\[2\]"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_STRINGS)
def test_bad_strings_are_refused_here(
    connection: remowt.Remowt, caplog: pytest.LogCaptureFixture, kwargs: Dict[str, Any], message: str
) -> None:
    kwargs = {"args": ["cat"], **kwargs}
    with pytest.raises(ValueError, match=message):
        connection.Popen(**kwargs)
    assert connection.children.count() == 0
    assert caplog.records == []


@pytest.mark.timeout(60)
def test_children_exiting_while_the_connection_closes_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # an exit event that arrives as the connection closes has nothing left to release
    caplog.set_level(logging.WARNING)
    for i in range(10):
        for make in (remowt.loopback, remowt.connect_local):
            connection = make()
            for _ in range(3):
                connection.spawn(["true"])
            time.sleep(0.001 * (i % 5))  # vary where the exits fall relative to the close
            connection.close()
    assert [record.getMessage() for record in caplog.records] == []


# --- the default connection ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_default_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOWT_HOST", raising=False)
    close_default_connection()
    try:
        result = remowt.run(PPID, capture_output=True)
        default = default_connection()
        assert remowt.default_connection() is default
        assert result.stdout == ppid_line(default.info().pid)
        assert default.info().pid != os.getpid()
        assert remowt.check_output(["echo", "hi"]) == b"hi\n"
        assert remowt.getoutput("echo $PPID") == str(default.info().pid)
        with remowt.Popen(["true"]) as proc:
            assert proc.connection is default
        assert proc.returncode == 0
    finally:
        close_default_connection()


# --- patch() ---------------------------------------------------------------------------------------


def check_routed_through(connection: remowt.Remowt) -> None:
    """Unmodified subprocess calls run where ``connection`` points."""
    expected = ppid_line(connection.info().pid)
    assert subprocess.run(PPID, capture_output=True).stdout == expected
    assert subprocess.check_output(PPID) == expected
    with subprocess.Popen(PPID, stdout=subprocess.PIPE) as proc:
        assert isinstance(proc, remowt.Popen)
        assert proc.stdout is not None
        assert proc.stdout.read() == expected
    assert subprocess.getoutput("echo $PPID") == str(connection.info().pid)
    assert subprocess.getstatusoutput("echo $PPID; exit 3") == (3, str(connection.info().pid))
    assert subprocess.call(["sh", "-c", "exit 4"]) == 4
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.check_call(["sh", "-c", "exit 5"])


def check_not_patched(saved: Dict[str, Any]) -> None:
    assert originals() == saved
    assert subprocess.check_output(PPID) == ppid_line(os.getpid())


def test_patch_as_context_manager(local: remowt.Remowt) -> None:
    saved = originals()
    assert local.info().pid != os.getpid()
    with remowt.patch(local) as patched:
        assert patched is local
        check_routed_through(local)
    check_not_patched(saved)


def test_patch_as_decorator(local: remowt.Remowt) -> None:
    saved = originals()

    @remowt.patch(local)
    def unmodified_code(argv: List[str]) -> bytes:
        return subprocess.check_output(argv)

    assert unmodified_code.__name__ == "unmodified_code"
    check_not_patched(saved)
    assert unmodified_code(PPID) == ppid_line(local.info().pid)
    check_not_patched(saved)
    assert unmodified_code(PPID) == ppid_line(local.info().pid)  # reusable
    check_not_patched(saved)


def test_patch_restores_after_an_exception(local: remowt.Remowt) -> None:
    saved = originals()
    with pytest.raises(subprocess.CalledProcessError), remowt.patch(local):
        subprocess.check_call(["sh", "-c", "exit 1"])
    check_not_patched(saved)


def test_patch_nests(local: remowt.Remowt) -> None:
    saved = originals()
    with remowt.loopback() as loop:
        with remowt.patch(local):
            with remowt.patch(loop):
                # the loopback agent runs in this process
                assert subprocess.check_output(PPID) == ppid_line(os.getpid())
                assert subprocess.Popen is loop.Popen
            check_routed_through(local)
        check_not_patched(saved)


def test_patch_is_process_wide(local: remowt.Remowt) -> None:
    seen: List[bytes] = []
    with remowt.patch(local):
        thread = threading.Thread(target=lambda: seen.append(subprocess.check_output(PPID)))
        thread.start()
        thread.join(15)
    assert seen == [ppid_line(local.info().pid)]


@pytest.mark.timeout(30)
def test_connect_local_while_patched_uses_the_real_popen(local: remowt.Remowt) -> None:
    saved = originals()
    real_popen = saved["Popen"]
    with remowt.patch(local):
        inner = remowt.connect_local()
        try:
            agent = inner.link.transport.process  # type: ignore[attr-defined]
            assert isinstance(agent, real_popen) and not isinstance(agent, remowt.Popen)  # the real one
            assert parent_of(inner.info().pid) == os.getpid()
            assert inner.info().pid != local.info().pid
            assert inner.check_output(PPID) == ppid_line(inner.info().pid)
            # and unmodified code still goes to the patched-in connection
            assert subprocess.check_output(PPID) == ppid_line(local.info().pid)
        finally:
            inner.close()
        with remowt.loopback() as loop:
            assert loop.check_output(PPID) == ppid_line(os.getpid())
    check_not_patched(saved)
