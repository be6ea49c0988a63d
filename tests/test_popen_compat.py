"""remowt's subprocess face agrees with subprocess itself.

Every test runs against three backends through the fixture ``sp``: the real
:mod:`subprocess` module, a loopback connection and a local-agent connection
(a connection quacks like the subprocess module). Each expectation is
written once, so the three must give the same answer.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator
from unittest import mock

import pytest
from _util import CONNECTIONS, read_now, shared_connection

import remowt

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

PY = sys.executable
ENV = shutil.which("env") or "/usr/bin/env"
PRINTF = shutil.which("printf") or "/usr/bin/printf"
CAT = shutil.which("cat") or "/bin/cat"
MISSING = "no-such-program-remowt-compat"

# The remowt backends every case runs on (_util.CONNECTIONS), next to subprocess itself.
BACKENDS = ["subprocess", *CONNECTIONS]

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=BACKENDS)
def sp(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> Any:
    """The subprocess module, or a remowt connection standing in for it."""
    kind = request.param
    if kind == "subprocess":
        return subprocess
    return shared_connection(request, connections, kind)


@pytest.fixture(params=BACKENDS)
def fresh_sp(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Like ``sp``, but a new connection for this test alone, closed afterwards."""
    if request.param == "subprocess":
        yield subprocess
        return
    connection = CONNECTIONS[request.param](request)
    try:
        yield connection
    finally:
        connection.close()


def real_fds(sp: Any) -> bool:
    """Whether the child gets this process's own fds, as subprocess's does (a local agent's; loopback and ssh copy)."""
    return sp is subprocess or sp.description.startswith("local agent")


def make_script(path: pathlib.Path, body: str, mode: int = 0o755) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return str(path)


def pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --- args, shell, executable ----------------------------------------------


def test_args_as_list(sp: Any) -> None:
    result = sp.run([PRINTF, "%s|", "a b", "c", "$HOME", ""], stdout=PIPE)
    assert result.stdout == b"a b|c|$HOME||"
    assert result.returncode == 0
    assert result.args == [PRINTF, "%s|", "a b", "c", "$HOME", ""]
    assert isinstance(result, subprocess.CompletedProcess)


def test_args_as_pathlike_and_bytes(sp: Any) -> None:
    result = sp.run([pathlib.Path(PRINTF), b"%s|", "x", pathlib.Path("p/q")], stdout=PIPE)
    assert result.stdout == b"x|p/q|"


def test_args_as_string_names_the_program(sp: Any) -> None:
    assert sp.run("echo", stdout=PIPE).stdout == b"\n"
    assert sp.run(pathlib.Path(CAT), input=b"path-like", stdout=PIPE).stdout == b"path-like"
    # without a shell the whole string is the program name, spaces and all
    with pytest.raises(FileNotFoundError) as info:
        sp.run("echo hi", stdout=PIPE)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "echo hi"


def test_shell_string(sp: Any) -> None:
    result = sp.run("printf '%s\\n' $((1 + 2)) | cat; exit 4", shell=True, stdout=PIPE)
    assert (result.returncode, result.stdout) == (4, b"3\n")
    assert result.args == "printf '%s\\n' $((1 + 2)) | cat; exit 4"


def test_shell_dollar0_is_the_shell(sp: Any) -> None:
    assert sp.run('printf %s "$0"', shell=True, stdout=PIPE).stdout == b"/bin/sh"


def test_shell_extra_args_become_dollar0_and_positionals(sp: Any) -> None:
    result = sp.run(['printf "%s|" "$0" "$@"', "zero", "one", "two words"], shell=True, stdout=PIPE)
    assert result.stdout == b"zero|one|two words|"


def test_shell_with_executable_replaces_the_shell(sp: Any, tmp_path: pathlib.Path) -> None:
    shell = tmp_path / "my shell"
    shell.symlink_to("/bin/sh")
    result = sp.run('printf %s "$0"', shell=True, executable=str(shell), stdout=PIPE)
    assert result.stdout == str(shell).encode()


def test_executable_is_run_with_args0_as_its_name(sp: Any) -> None:
    # with no arguments after the command, sh's $0 is its own argv[0]
    result = sp.run(["fake-name", "-c", 'printf "%s|" "$0"'], executable="/bin/sh", stdout=PIPE)
    assert result.stdout == b"fake-name|"


# --- cwd and env ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["str", "bytes", "pathlike"])
def test_cwd(sp: Any, tmp_path: pathlib.Path, kind: str) -> None:
    where = tmp_path / "some dir"
    where.mkdir()
    cwd: Any = {"str": str(where), "bytes": os.fsencode(where), "pathlike": where}[kind]
    result = sp.run([PY, "-c", "import os; print(os.getcwd())"], cwd=cwd, stdout=PIPE, text=True)
    assert result.stdout == os.path.realpath(where) + "\n"


def test_cwd_applies_to_a_relative_program(sp: Any, tmp_path: pathlib.Path) -> None:
    make_script(tmp_path / "hello", "echo hello from $0\n")
    assert sp.run(["./hello"], cwd=str(tmp_path), stdout=PIPE).stdout == b"hello from ./hello\n"


def test_env_replaces_the_environment(sp: Any) -> None:
    assert sp.run([ENV], env={"ONLY": "this one", "B": "x=y"}, stdout=PIPE).stdout == b"ONLY=this one\nB=x=y\n"
    assert sp.run([ENV], env={}, stdout=PIPE).stdout == b""
    assert sp.run([ENV], env={b"BYTES": b"v\xc3\xa9"}, stdout=PIPE).stdout == b"BYTES=v\xc3\xa9\n"


def test_env_path_is_used_to_find_the_program(sp: Any, tmp_path: pathlib.Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_script(bin_dir / "my-prog", 'echo "found, PATH=$PATH"\n')
    result = sp.run(["my-prog"], env={"PATH": str(bin_dir)}, stdout=PIPE)
    assert result.stdout == f"found, PATH={bin_dir}\n".encode()


def test_env_inherited_by_default(sp: Any) -> None:
    # the local agent runs on this machine with this process's environment; an ssh login has its own
    skip_over_ssh(sp)
    out = sp.run([PY, "-c", "import os; print(repr(dict(os.environ)))"], stdout=PIPE, text=True).stdout
    child = eval(out)
    mine = dict(os.environ)
    # pytest changes the first; the others were set below os.environ (putenv) by the test runner
    for changing in ("PYTEST_CURRENT_TEST", "COLUMNS", "LINES"):
        child.pop(changing, None)
        mine.pop(changing, None)
    assert child == mine


SSH_HAS_ITS_OWN = "an agent started by sshd has the login's cwd and environment, not this process's"


def skip_over_ssh(sp: Any) -> None:
    if getattr(sp, "description", "").startswith("ssh"):
        pytest.skip(SSH_HAS_ITS_OWN)


def test_cwd_and_env_are_the_callers_at_spawn_time(
    sp: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 item 2: a later os.chdir() and os.environ change of the caller reach the next child."""
    skip_over_ssh(sp)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y").mkdir()
    make_script(tmp_path / "x" / "prog", "echo ran $0 in $(pwd)\n")
    monkeypatch.chdir(tmp_path / "x" / "y")
    monkeypatch.setenv("REMOWT_COMPAT_LATER", "set after connecting")
    script = "import os; print(os.getcwd(), os.environ.get('REMOWT_COMPAT_LATER'))"
    out = sp.run([PY, "-c", script], stdout=PIPE, text=True).stdout
    assert out == f"{tmp_path / 'x' / 'y'} set after connecting\n"
    assert sp.run([PY, "-c", "import os; print(os.getcwd())"], cwd="..", stdout=PIPE, text=True).stdout == (
        f"{tmp_path / 'x'}\n"
    )
    assert sp.run(["../prog"], stdout=PIPE).stdout == f"ran ../prog in {tmp_path / 'x' / 'y'}\n".encode()
    extended = sp.run([ENV], stdout=PIPE, **({} if sp is subprocess else {"extra_env": {"MORE": "1"}})).stdout
    assert b"REMOWT_COMPAT_LATER=set after connecting\n" in extended
    monkeypatch.delenv("REMOWT_COMPAT_LATER")
    assert b"REMOWT_COMPAT_LATER" not in sp.run([ENV], stdout=PIPE).stdout


# --- names that are not UTF-8 (issue 12, item 3) ------------------------------------

UNDECODABLE = b"\xff\xfe-not-utf8"


@pytest.mark.parametrize("kind", ["bytes", "surrogateescape-str"])
def test_undecodable_argv(sp: Any, kind: str) -> None:
    arg: Any = UNDECODABLE if kind == "bytes" else os.fsdecode(UNDECODABLE)
    result = sp.run([PRINTF, b"%s|", arg, "plain"], stdout=PIPE)
    assert result.stdout == UNDECODABLE + b"|plain|"
    assert result.args == [PRINTF, b"%s|", arg, "plain"]


@pytest.mark.parametrize("kind", ["bytes", "surrogateescape-str"])
def test_undecodable_env(sp: Any, kind: str) -> None:
    # as CPython's test_undecodable_env: names and values that are not UTF-8, given as str or as bytes
    name, value = b"REMOWT_\xff", b"v\xfe"
    env: Dict[Any, Any] = {name: value} if kind == "bytes" else {os.fsdecode(name): os.fsdecode(value)}
    assert sp.run([ENV], env=env, stdout=PIPE).stdout == name + b"=" + value + b"\n"
    script = "import os, sys; sys.stdout.buffer.write(os.environb[b'REMOWT_\\xff'])"
    assert sp.run([PY, "-c", script], env={**os.environ, **env}, stdout=PIPE).stdout == value


@pytest.mark.parametrize("kind", ["bytes", "surrogateescape-str"])
def test_undecodable_cwd_and_program(sp: Any, tmp_path: pathlib.Path, kind: str) -> None:
    where = os.path.join(os.fsencode(tmp_path), UNDECODABLE)
    os.mkdir(where)
    make_script(pathlib.Path(os.fsdecode(os.path.join(where, b"prog\xff"))), 'printf %s "$(pwd)"\n')
    cwd: Any = where if kind == "bytes" else os.fsdecode(where)
    program: Any = b"./prog\xff" if kind == "bytes" else os.fsdecode(b"./prog\xff")
    assert sp.run([program], cwd=cwd, stdout=PIPE).stdout == where


@pytest.mark.parametrize(
    "program", [b"/no/such/prog\xff", os.fsdecode(b"/no/such/prog\xff"), pathlib.Path("/no/such/prog")]
)
def test_failure_names_the_program_as_given(sp: Any, program: Any) -> None:
    with pytest.raises(FileNotFoundError) as info:
        sp.run([program])
    expected = subprocess_failure(lambda: subprocess.run([program]))
    assert (type(info.value.filename), info.value.filename) == (type(expected.filename), expected.filename)


def test_failure_names_the_cwd_as_given(sp: Any, tmp_path: pathlib.Path) -> None:
    cwd = os.path.join(os.fsencode(tmp_path), b"missing\xff")
    with pytest.raises(FileNotFoundError) as info:
        sp.run(["true"], cwd=cwd)
    assert info.value.filename == subprocess_failure(lambda: subprocess.run(["true"], cwd=cwd)).filename


def subprocess_failure(call: Callable[[], Any]) -> OSError:
    """The ``OSError`` that subprocess itself raises for ``call``."""
    try:
        call()
    except OSError as e:
        return e
    raise AssertionError("subprocess did not fail")


# --- bufsize ----------------------------------------------------------------


def read_exactly(handle: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = handle.read(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_bufsize_0_is_unbuffered(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, bufsize=0)
    assert isinstance(proc.stdin, io.RawIOBase)
    assert isinstance(proc.stdout, io.RawIOBase)
    proc.stdin.write(b"ping\n")  # no flush: it went straight through
    assert read_exactly(proc.stdout, 5) == b"ping\n"
    proc.stdin.close()
    assert proc.stdout.read() == b""
    proc.stdout.close()
    assert proc.wait(timeout=10) == 0


def test_bufsize_0_text(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, bufsize=0, text=True)
    proc.stdin.write("ping\n")  # write-through to an unbuffered pipe: no flush needed
    assert proc.stdout.readline() == "ping\n"
    assert proc.communicate() == ("", None)
    assert proc.returncode == 0


def test_bufsize_default_is_buffered(sp: Any) -> None:
    for bufsize in (-1, None, 4096):
        proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, bufsize=bufsize)
        assert isinstance(proc.stdin, io.BufferedIOBase)
        assert isinstance(proc.stdout, io.BufferedIOBase)
        proc.stdin.write(b"one\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"one\n"
        proc.stdin.write(b"two\nthree")
        proc.stdin.close()
        assert proc.stdout.read() == b"two\nthree"
        proc.stdout.close()
        assert proc.wait(timeout=10) == 0


def test_bufsize_1_text_is_line_buffered(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, bufsize=1, text=True)
    assert isinstance(proc.stdin, io.TextIOWrapper)
    assert proc.stdin.line_buffering
    proc.stdin.write("line\n")  # no flush: the newline pushed it out
    assert proc.stdout.readline() == "line\n"
    proc.stdin.close()
    assert proc.stdout.read() == ""
    proc.stdout.close()
    assert proc.wait(timeout=10) == 0


def test_bufsize_other_text_is_not_line_buffered(sp: Any) -> None:
    with sp.Popen([CAT], stdin=PIPE, stdout=PIPE, text=True) as proc:
        assert isinstance(proc.stdin, io.TextIOWrapper)
        assert not proc.stdin.line_buffering
        assert proc.communicate("abc\n") == ("abc\n", None)


def test_bufsize_1_binary_warns(sp: Any) -> None:
    with pytest.warns(RuntimeWarning, match="line buffering"):
        proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, bufsize=1)
    assert isinstance(proc.stdout, io.BufferedIOBase)
    assert proc.communicate(b"x") == (b"x", None)


def test_os_close_of_stdin_fileno_gives_the_child_eof(sp: Any) -> None:
    # CPython's test_bufsize_equal_one_binary_mode: the written line is never flushed, the fd is closed under the file
    with pytest.warns(RuntimeWarning, match="line buffering"):
        proc = sp.Popen(
            [PY, "-c", "import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush()"],
            stdin=PIPE,
            stdout=PIPE,
            bufsize=1,
        )
    proc.stdin.write(b"line\n")
    os.close(proc.stdin.fileno())
    assert proc.stdout.readline() == b""
    with pytest.raises(OSError):
        proc.stdin.close()  # its fd is gone: flushing the line fails, as locally
    proc.stdin = None
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


def default_pipe_size() -> int:
    read_fd, write_fd = os.pipe()
    try:
        return int(fcntl.fcntl(write_fd, F_GETPIPE_SZ))
    finally:
        os.close(read_fd)
        os.close(write_fd)


F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def test_pipesize(sp: Any) -> None:
    # as CPython's test_pipesizes: the pipes of the child, and those seen through fileno(), get the size asked for
    pipesize = default_pipe_size() // 2
    script = "import fcntl, sys; sys.stdin.read(); print([fcntl.fcntl(fd, 1032) for fd in (0, 2)])"
    proc = sp.Popen([PY, "-c", script], stdin=PIPE, stdout=PIPE, stderr=PIPE, pipesize=pipesize)
    sizes = [fcntl.fcntl(pipe.fileno(), F_GETPIPE_SZ) for pipe in (proc.stdin, proc.stdout, proc.stderr)]
    out, err = proc.communicate(timeout=10)
    assert (sizes, out, err) == ([pipesize] * 3, f"{[pipesize] * 2}\n".encode(), b"")
    with pytest.raises(TypeError, match="pipesize must be an integer"):
        sp.Popen([CAT], pipesize=1.5)
    # CPython's test_pipesize_default: without one, the pipes seen through fileno() have the default size
    with sp.Popen([CAT], stdin=PIPE, stdout=PIPE) as proc:
        assert [fcntl.fcntl(p.fileno(), F_GETPIPE_SZ) for p in (proc.stdin, proc.stdout)] == [default_pipe_size()] * 2


# --- text mode ----------------------------------------------------------------

NEWLINES = r"""printf 'a\r\nb\rc\nd\r\n'; printf 'e\r\nf\rg' >&2"""


@pytest.mark.parametrize(
    "mode",
    [{"text": True}, {"universal_newlines": True}, {"encoding": "utf-8"}, {"errors": "strict"}],
    ids=["text", "universal_newlines", "encoding", "errors"],
)
def test_text_mode_communicate_translates_newlines(sp: Any, mode: Dict[str, Any]) -> None:
    proc = sp.Popen(["sh", "-c", NEWLINES], stdout=PIPE, stderr=PIPE, **mode)
    assert proc.communicate() == ("a\nb\nc\nd\n", "e\nf\ng")
    assert proc.returncode == 0


def test_text_mode_run_translates_newlines(sp: Any) -> None:
    result = sp.run(["sh", "-c", NEWLINES], capture_output=True, universal_newlines=True)
    assert (result.stdout, result.stderr) == ("a\nb\nc\nd\n", "e\nf\ng")


def test_binary_mode_keeps_newlines(sp: Any) -> None:
    result = sp.run(["sh", "-c", NEWLINES], capture_output=True)
    assert (result.stdout, result.stderr) == (b"a\r\nb\rc\nd\r\n", b"e\r\nf\rg")


def test_text_mode_reading_lines(sp: Any) -> None:
    with sp.Popen(["sh", "-c", NEWLINES], stdout=PIPE, stderr=PIPE, text=True) as proc:
        assert isinstance(proc.stdout, io.TextIOWrapper)
        assert list(proc.stdout) == ["a\n", "b\n", "c\n", "d\n"]
        assert proc.stderr.readline() == "e\n"
        assert proc.stderr.read() == "f\ng"
    assert proc.returncode == 0


def test_binary_mode_reading_lines(sp: Any) -> None:
    with sp.Popen(["sh", "-c", NEWLINES], stdout=PIPE, stderr=DEVNULL) as proc:
        assert list(proc.stdout) == [b"a\r\n", b"b\rc\n", b"d\r\n"]
    assert proc.returncode == 0


def test_encoding_applies_to_input_and_output(sp: Any) -> None:
    hexdump = [PY, "-c", "import sys; print(sys.stdin.buffer.read().hex())"]
    assert sp.run(hexdump, input="é", stdout=PIPE, encoding="latin-1").stdout == "e9\n"
    assert sp.run([PRINTF, r"\351t\351"], stdout=PIPE, encoding="latin-1").stdout == "été"
    assert sp.run([CAT], input="hé\n", stdout=PIPE, encoding="utf-16-le").stdout == "hé\n"


def test_errors_replace(sp: Any) -> None:
    result = sp.run([PRINTF, r"a\377b"], stdout=PIPE, errors="replace")
    assert result.stdout == "a\ufffdb"


def test_undecodable_output_raises(sp: Any) -> None:
    with pytest.raises(UnicodeDecodeError):
        sp.run([PRINTF, r"a\377b"], stdout=PIPE, encoding="utf-8")


# --- communicate --------------------------------------------------------------


def test_communicate_input_bytes(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "cat; echo done >&2"], stdin=PIPE, stdout=PIPE, stderr=PIPE)
    assert proc.communicate(b"some\x00bytes\n") == (b"some\x00bytes\n", b"done\n")
    assert proc.returncode == 0
    assert proc.stdin.closed and proc.stdout.closed and proc.stderr.closed


def test_communicate_input_str(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE, text=True)
    assert proc.communicate("héllo\nwörld") == ("héllo\nwörld", None)


def test_communicate_without_pipes(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "exit 3"])
    assert proc.communicate() == (None, None)
    assert proc.returncode == 3


def test_communicate_twice_returns_the_same(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "echo out; echo err >&2"], stdout=PIPE, stderr=PIPE)
    assert proc.communicate() == (b"out\n", b"err\n")
    assert proc.communicate() == (b"out\n", b"err\n")


def test_communicate_writes_and_closes_stdin_itself(sp: Any) -> None:
    # as CPython's test_communicate_BrokenPipeError_stdin_*: the input goes to p.stdin, which is then closed,
    # and a BrokenPipeError from either is not an error
    for failing in ("write", "close"):
        proc = sp.Popen(["true"])
        with proc, mock.patch.object(proc, "stdin") as stdin:
            getattr(stdin, failing).side_effect = BrokenPipeError
            proc.communicate(b"stuff")
            stdin.write.assert_called_once_with(b"stuff")
            stdin.close.assert_called_once_with()


def test_input_the_child_does_not_read(sp: Any) -> None:
    # the child exits without reading: the broken pipe is not an error
    result = sp.run(["sh", "-c", "exit 0"], input=b"x" * (4 << 20), stdout=PIPE)
    assert (result.returncode, result.stdout) == (0, b"")


@pytest.mark.timeout(30)
def test_communicate_timeout_keeps_partial_output_then_retry_collects_the_rest(sp: Any, tmp_path: pathlib.Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    proc = sp.Popen(["sh", "-c", 'echo first; cat "$1"; echo last', "sh", str(gate)], stdout=PIPE, stderr=PIPE)
    # bounded poll: there is no event for "the first line was read"
    deadline = time.monotonic() + 10
    while True:
        with pytest.raises(subprocess.TimeoutExpired) as info:
            proc.communicate(timeout=0.05)
        if info.value.output == b"first\n" or time.monotonic() > deadline:
            break
    expired = info.value
    assert isinstance(expired, subprocess.TimeoutExpired)
    assert expired.output == expired.stdout == b"first\n"
    assert expired.stderr is None  # nothing read from stderr yet: None, as subprocess gives
    assert expired.timeout == 0.05
    assert expired.cmd == ["sh", "-c", 'echo first; cat "$1"; echo last', "sh", str(gate)]
    assert proc.returncode is None
    with pytest.raises(ValueError, match="Cannot send input after starting communication"):
        proc.communicate(b"late input")
    with open(gate, "wb") as f:
        f.write(b"middle\n")
    assert proc.communicate(timeout=10) == (b"first\nmiddle\nlast\n", b"")
    assert proc.returncode == 0


def test_communicate_timeout_before_any_output(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "exec sleep 60"], stdout=PIPE, stderr=PIPE)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        proc.communicate(timeout=0.1)
    # nothing was read: subprocess reports None, not b""
    assert (info.value.output, info.value.stderr) == (None, None)
    proc.kill()
    assert proc.communicate(timeout=10) == (b"", b"")
    assert proc.returncode == -signal.SIGKILL


def test_communicate_timeout_while_input_is_blocked(sp: Any) -> None:
    # the child never reads: the input cannot all be written before the timeout
    proc = sp.Popen(["sh", "-c", "echo waiting; exec sleep 60"], stdin=PIPE, stdout=PIPE)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.communicate(b"z" * (16 << 20), timeout=0.3)
    proc.kill()
    assert proc.communicate(timeout=10) == (b"waiting\n", None)
    assert proc.returncode == -signal.SIGKILL


def test_communicate_timeout_then_kill(sp: Any) -> None:
    # the pattern from subprocess's documentation
    proc = sp.Popen(["sh", "-c", "echo partial; exec sleep 60"], stdout=PIPE, stderr=PIPE)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.communicate(timeout=0.2)
    proc.kill()
    assert proc.communicate(timeout=10) == (b"partial\n", b"")
    assert proc.returncode == -signal.SIGKILL


DEADLOCK_CHILD = """
import sys
out, err, inp = sys.stdout.buffer, sys.stderr.buffer, sys.stdin.buffer
chunk = 1 << 16
got = 0
for _ in range(160):
    out.write(b"o" * chunk)
    out.flush()
    err.write(b"e" * chunk)
    err.flush()
    got += len(inp.read(chunk))
got += len(inp.read())
err.write(b"read %d" % got)
"""


def digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()}"


@pytest.mark.timeout(60)
def test_communicate_does_not_deadlock(sp: Any) -> None:
    size = 10 << 20
    proc = sp.Popen([PY, "-c", DEADLOCK_CHILD], stdin=PIPE, stdout=PIPE, stderr=PIPE)
    out, err = proc.communicate(b"i" * size, timeout=50)
    assert digest(out) == digest(b"o" * size)
    assert digest(err) == digest(b"e" * size + b"read %d" % size)
    assert proc.returncode == 0


# --- stdio choices --------------------------------------------------------------


def test_stderr_to_stdout(sp: Any) -> None:
    result = sp.run(["sh", "-c", "echo out; echo err >&2; echo out2"], stdout=PIPE, stderr=STDOUT)
    assert (result.stdout, result.stderr) == (b"out\nerr\nout2\n", None)


def test_stderr_to_stdout_file(sp: Any, tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "both", "wb") as f:
        assert sp.call(["sh", "-c", "echo out; echo err >&2; echo out2"], stdout=f, stderr=STDOUT) == 0
    assert (tmp_path / "both").read_bytes() == b"out\nerr\nout2\n"


def test_stderr_to_stdout_devnull(sp: Any) -> None:
    assert sp.run(["sh", "-c", "echo out; echo err >&2"], stdout=DEVNULL, stderr=STDOUT).stdout is None


def test_stdout_devnull(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "echo out; echo err >&2"], stdout=DEVNULL, stderr=PIPE)
    assert proc.stdout is None
    assert proc.communicate() == (None, b"err\n")


def test_stdin_devnull(sp: Any) -> None:
    assert sp.run([CAT], stdin=DEVNULL, stdout=PIPE).stdout == b""


def test_inherited_stdout_and_stderr(sp: Any, capfd: pytest.CaptureFixture[str]) -> None:
    result = sp.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
    assert (result.stdout, result.stderr) == (None, None)
    # the child's output reached fds 1 and 2 before run() returned
    assert capfd.readouterr() == ("to-stdout\n", "to-stderr\n")
    assert sp.call(["sh", "-c", "printf 'no newline'"]) == 0
    assert capfd.readouterr().out == "no newline"
    assert sp.call(["sh", "-c", "echo a; echo b >&2; echo c"], stderr=STDOUT) == 0
    assert capfd.readouterr() == ("a\nb\nc\n", "")


def test_inherited_stdout_large(sp: Any, capfd: pytest.CaptureFixture[str]) -> None:
    size = 6 << 20  # more than a stream's window
    sp.check_call([PY, "-c", f"import sys; sys.stdout.buffer.write(b'x' * {size}); print('end')"])
    out, err = capfd.readouterr()
    assert (len(out), out.count("x"), out[-5:], err) == (size + 4, size, "xend\n", "")


@pytest.mark.timeout(60)
def test_output_to_files_does_not_delay_wait(fresh_sp: Any, tmp_path: pathlib.Path) -> None:
    # the child's output is in the files once wait() returns, and wait() returns as soon as it is
    # (a fresh connection: whether the waiting thread reads the link itself depends on its state)
    sp = fresh_sp
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        for i in range(20):
            start = time.monotonic()
            assert sp.call(["sh", "-c", "echo out; echo err >&2"], stdout=out, stderr=err) == 0
            elapsed = time.monotonic() - start
            assert elapsed < 1.0, f"call {i} took {elapsed:.2f} s"
    assert (tmp_path / "out").read_bytes() == b"out\n" * 20
    assert (tmp_path / "err").read_bytes() == b"err\n" * 20


def test_stdout_to_file_object(sp: Any, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "out"
    with open(path, "wb") as f:
        f.write(b"before\n")
        f.flush()
        assert sp.call(["sh", "-c", "echo child"], stdout=f) == 0
        f.write(b"after\n")
    assert path.read_bytes() == b"before\nchild\nafter\n"


def test_stdout_and_stderr_to_fds(sp: Any, tmp_path: pathlib.Path) -> None:
    out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err_fd = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        result = sp.run(["sh", "-c", "echo out; echo err >&2; echo out2"], stdout=out_fd, stderr=err_fd)
    finally:
        os.close(out_fd)
        os.close(err_fd)
    assert result.returncode == 0
    assert (tmp_path / "out").read_bytes() == b"out\nout2\n"
    assert (tmp_path / "err").read_bytes() == b"err\n"


def test_stderr_to_file_with_stdout_piped(sp: Any, tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "err", "wb") as err:
        result = sp.run(["sh", "-c", "echo out; echo err >&2"], stdout=PIPE, stderr=err)
    assert (result.stdout, result.stderr) == (b"out\n", None)
    assert (tmp_path / "err").read_bytes() == b"err\n"


def test_stdin_from_file_object(sp: Any, tmp_path: pathlib.Path) -> None:
    data = b"line one\nline two\n" * 1000
    (tmp_path / "in").write_bytes(data)
    with open(tmp_path / "in", "rb") as f:
        assert sp.run([CAT], stdin=f, stdout=PIPE).stdout == data


def test_stdin_from_fd(sp: Any, tmp_path: pathlib.Path) -> None:
    (tmp_path / "in").write_bytes(b"from an fd\n")
    fd = os.open(tmp_path / "in", os.O_RDONLY)
    try:
        assert sp.check_output(["sh", "-c", "cat; echo end"], stdin=fd) == b"from an fd\nend\n"
    finally:
        os.close(fd)


def test_pipeline_stdout_into_stdin(sp: Any) -> None:
    # "Replacing shell pipeline" from subprocess's documentation
    first = sp.Popen(["sh", "-c", "echo one; echo two; echo three"], stdout=PIPE)
    second = sp.Popen(["head", "-n", "2"], stdin=first.stdout, stdout=PIPE)
    first.stdout.close()  # so that first gets SIGPIPE if second exits
    assert second.communicate(timeout=10) == (b"one\ntwo\n", None)
    assert second.returncode == 0
    assert first.wait(timeout=10) in (0, -signal.SIGPIPE)


def test_pipeline_writer_gets_sigpipe_when_the_reader_exits(sp: Any) -> None:
    first = sp.Popen(["yes"], stdout=PIPE)
    second = sp.Popen(["head", "-n", "1"], stdin=first.stdout, stdout=PIPE)
    first.stdout.close()
    assert second.communicate(timeout=10) == (b"y\n", None)
    assert first.wait(timeout=10) == -signal.SIGPIPE


def test_pipeline_stdin_pipe_as_stdout(sp: Any) -> None:
    # the reader's stdin sees EOF once both holders of its write end are done: us and the writer
    second = sp.Popen(["sh", "-c", "cat; echo end"], stdin=PIPE, stdout=PIPE)
    first = sp.Popen(["sh", "-c", "echo out; echo err >&2"], stdout=second.stdin, stderr=second.stdin)
    assert first.wait(timeout=10) == 0
    second.stdin.write(b"ours\n")
    second.stdin.close()
    assert sorted(second.stdout.read().splitlines()) == [b"end", b"err", b"ours", b"out"]
    assert second.wait(timeout=10) == 0
    second.stdout.close()


def test_pipeline_text_mode_pipe(sp: Any) -> None:
    first = sp.Popen(["sh", "-c", "echo one; echo two"], stdout=PIPE, text=True)
    second = sp.Popen([CAT], stdin=first.stdout, stdout=PIPE)
    first.stdout.close()
    assert second.communicate(timeout=10) == (b"one\ntwo\n", None)
    assert first.wait(timeout=10) == 0


def test_pipe_as_the_wrong_end(sp: Any) -> None:
    # a read end given as a child's output: subprocess lets the child fail writing, remowt refuses at once
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE)
    try:
        if real_fds(sp):
            assert sp.call(["sh", "-c", "echo x"], stdout=proc.stdout, stderr=DEVNULL) != 0
        else:
            with pytest.raises(ValueError, match="not writable"):
                sp.Popen(["sh", "-c", "echo x"], stdout=proc.stdout)
            with pytest.raises(ValueError, match="not readable"):
                sp.Popen([CAT], stdin=proc.stdin)
    finally:
        proc.stdin.close()
        proc.stdout.close()
        proc.wait(timeout=10)


def test_closed_pipe_as_stdio(sp: Any) -> None:
    first = sp.Popen(["sh", "-c", "echo x"], stdout=PIPE)
    first.stdout.close()
    with pytest.raises(ValueError, match="closed file"):
        sp.Popen([CAT], stdin=first.stdout)
    first.wait(timeout=10)


def test_pipe_into_and_out_of_a_local_process(sp: Any) -> None:
    # the real subprocess module needs fileno(): our pipes give a real OS pipe
    first = sp.Popen(["sh", "-c", "echo one; echo two; echo three"], stdout=PIPE)
    head = subprocess.Popen(["head", "-n", "2"], stdin=first.stdout, stdout=PIPE)
    first.stdout.close()
    assert head.communicate(timeout=10) == (b"one\ntwo\n", None)
    assert first.wait(timeout=10) in (0, -signal.SIGPIPE)
    last = sp.Popen(["sh", "-c", "cat; echo end"], stdin=PIPE, stdout=PIPE)
    printf = subprocess.Popen([PRINTF, "from a local child\n"], stdout=last.stdin)
    assert printf.wait(timeout=10) == 0
    last.stdin.close()
    assert last.stdout.read() == b"from a local child\nend\n"
    assert last.wait(timeout=10) == 0
    last.stdout.close()


def test_stdin_fileno_takes_writes(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE)
    fd = proc.stdin.fileno()
    _, writable, _ = select.select([], [fd], [], 10)
    assert writable == [fd]
    os.write(fd, b"through the fd\n")
    proc.stdin.write(b"and the file\n")
    proc.stdin.close()
    assert proc.stdout.read() == b"through the fd\nand the file\n"
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


def test_nonblocking_stdout(sp: Any) -> None:
    script = "read x; echo got $x; read y; sleep 0.2; echo late"
    proc = sp.Popen(["sh", "-c", script], stdin=PIPE, stdout=PIPE, bufsize=0)
    os.set_blocking(proc.stdout.fileno(), False)
    assert proc.stdout.read(100) is None  # nothing there yet
    proc.stdin.write(b"go\n")
    readable, _, _ = select.select([proc.stdout], [], [], 10)
    assert readable == [proc.stdout]
    assert proc.stdout.read(100) == b"got go\n"
    # communicate() waits for a non-blocking pipe rather than taking "nothing yet" for the end
    assert proc.communicate(b"ignored\n", timeout=10) == (b"late\n", None)
    assert proc.returncode == 0


def test_communicate_after_closing_stdin(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=PIPE)
    proc.stdin.close()
    with pytest.raises(ValueError, match="closed file"):
        proc.communicate(timeout=10)
    assert proc.stdout.read() == b""
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


def test_select_on_stdout(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "echo ready; read x; echo done"], stdin=PIPE, stdout=PIPE)
    assert isinstance(proc.stdout.fileno(), int)
    readable, _, _ = select.select([proc.stdout], [], [], 10)
    assert readable == [proc.stdout]
    assert proc.stdout.readline() == b"ready\n"
    assert proc.communicate(b"go\n", timeout=10) == (b"done\n", None)


def test_select_right_after_a_partial_read(sp: Any) -> None:
    # as CPython's test_select_unbuffered: what came and is not read yet is readable through fileno() at once
    proc = sp.Popen([PY, "-c", "import sys; sys.stdout.write('apple')"], stdout=PIPE, bufsize=0)
    with proc:
        assert proc.stdout.read(4) == b"appl"
        assert select.select([proc.stdout], [], [], 0.0)[0] == [proc.stdout]
        assert proc.stdout.read() == b"e"


def test_stdin_file_offset_after_a_partial_read(sp: Any, tmp_path: pathlib.Path) -> None:
    # POSIX utilities leave a seekable input just past what they used; the fd is shared with us
    (tmp_path / "in").write_bytes(b"line1\nline2\nline3\n")
    fd = os.open(tmp_path / "in", os.O_RDONLY)
    try:
        assert sp.run(["head", "-n", "1"], stdin=fd, stdout=PIPE).stdout == b"line1\n"
        if not real_fds(sp):
            pytest.skip(
                "remowt: a local stdin is copied to the remote child by a thread that reads ahead of it, "
                "so the offset ends after what was sent, not after what the child used (see Popen's docstring)"
            )
        assert os.read(fd, 100) == b"line2\nline3\n"
    finally:
        os.close(fd)


def test_stdin_the_child_does_not_read_is_left_unread(sp: Any, tmp_path: pathlib.Path) -> None:
    # the shell's `while read l; do cmd; done < file`: each cmd must leave the rest of the file to the loop
    (tmp_path / "in").write_bytes(b"".join(b"line%d\n" % i for i in range(1000)))
    with open(tmp_path / "in", "rb", buffering=0) as f:
        assert f.read(6) == b"line0\n"
        assert sp.run(["true"], stdin=f, timeout=10).returncode == 0
        rest = f.read()
    if real_fds(sp):
        assert rest == b"".join(b"line%d\n" % i for i in range(1, 1000))
    else:  # copied by a thread that reads ahead: it ends, whatever it took (see Popen's docstring)
        assert b"".join(b"line%d\n" % i for i in range(1000)).endswith(rest)


def test_a_terminal_as_stdin_is_a_terminal_in_the_child(sp: Any) -> None:
    master, slave = os.openpty()
    try:
        result = sp.run(["sh", "-c", "test -t 0"], stdin=slave, timeout=10)
    finally:
        os.close(slave)
        os.close(master)
    # a copied stdin is a pipe over there: the child ends all the same
    assert result.returncode == (0 if real_fds(sp) else 1)


WRITE_ERRNO = "import os, sys\ntry:\n    os.write(1, b'lost')\nexcept OSError as e:\n    sys.exit(e.errno)"


def test_writes_to_a_full_disk_fail_in_the_child(sp: Any) -> None:
    with open("/dev/full", "wb") as full:
        if real_fds(sp):
            result = sp.run([PY, "-c", WRITE_ERRNO], stdout=full, timeout=10)
            assert result.returncode == errno.ENOSPC
        else:  # copied: the write fails here, and the call says so
            with pytest.raises(OSError) as failed:
                sp.run([PY, "-c", WRITE_ERRNO], stdout=full, timeout=10)
            assert failed.value.errno == errno.ENOSPC


def test_a_tee_through_fileno_never_loses_the_tail(sp: Any) -> None:
    # a tee: select() on stdout's and stderr's fds and os.read() them while the child runs; once it has
    # exited, what is left in the pipes (with real pipes, all of it is there by then; a copied pipe may
    # still be on its way, so there the tee reads to the end)
    script = "i=0; while [ $i -lt 200 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    expected = {
        "stdout": b"".join(b"out%d\n" % i for i in range(200)),
        "stderr": b"".join(b"err%d\n" % i for i in range(200)),
    }
    for _ in range(200):
        proc = sp.Popen(["sh", "-c", script], stdout=PIPE, stderr=PIPE)
        got = {"stdout": b"", "stderr": b""}
        open_fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        deadline = time.monotonic() + 10
        while open_fds and time.monotonic() < deadline:
            exited = real_fds(sp) and proc.poll() is not None
            readable, _, _ = select.select(list(open_fds), [], [], 0 if exited else 1)
            for fd in readable:
                data = os.read(fd, 65536)
                got[open_fds[fd]] += data
                if not data:
                    del open_fds[fd]
            if exited and not readable:
                break
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
        proc.stderr.close()
        assert got == expected


def closed_fd() -> int:
    """A descriptor number that is not open in this process."""
    for fd in range(900, 1000):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise AssertionError("no free descriptor in 900..999")


@pytest.mark.parametrize("name", ["stdin", "stdout", "stderr"])
def test_bad_fd_for_stdio(sp: Any, name: str) -> None:
    with pytest.raises(OSError) as info:
        sp.Popen(["sh", "-c", "echo hi; echo err >&2"], **{name: closed_fd()})
    assert info.value.errno == errno.EBADF


# --- status, waiting, signals ------------------------------------------------------


def test_wait_timeout(sp: Any) -> None:
    proc = sp.Popen([CAT], stdin=PIPE, stdout=DEVNULL)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        proc.wait(timeout=0.1)
    assert isinstance(info.value, sp.TimeoutExpired)
    assert info.value.timeout == 0.1
    assert info.value.cmd == [CAT]
    assert proc.returncode is None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_poll_sees_the_exit(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "exit 4"])
    # bounded poll: poll() itself is what is tested, so there is no event to wait on
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() == 4
    assert proc.returncode == 4


def test_repr(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "exit 2"])
    proc.wait()
    assert repr(proc) == "<Popen: returncode: 2 args: ['sh', '-c', 'exit 2']>"


def test_writing_to_an_exited_child_raises_broken_pipe(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "exit 0"], stdin=PIPE, bufsize=0)
    assert proc.wait(timeout=10) == 0
    with pytest.raises(BrokenPipeError) as info:
        proc.stdin.write(b"nobody reads this")
    assert info.value.errno == errno.EPIPE
    proc.stdin.close()


def test_poll_returncode_and_pid(sp: Any) -> None:
    proc = sp.Popen(["sh", "-c", "read line; exit 9"], stdin=PIPE)
    assert isinstance(proc.pid, int) and proc.pid > 0
    assert proc.poll() is None
    assert proc.returncode is None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert proc.wait(timeout=10) == 9
    assert proc.returncode == 9
    assert proc.poll() == 9
    assert proc.wait() == 9


@pytest.mark.parametrize(
    ("method", "expected"),
    [("kill", -signal.SIGKILL), ("terminate", -signal.SIGTERM), ("send_signal", -signal.SIGUSR1)],
)
def test_signals(sp: Any, method: str, expected: int) -> None:
    proc = sp.Popen(["sh", "-c", "echo ready; exec cat"], stdin=PIPE, stdout=PIPE)
    assert proc.stdout.readline() == b"ready\n"
    if method == "send_signal":
        proc.send_signal(signal.SIGUSR1)
    else:
        getattr(proc, method)()
    assert proc.wait(timeout=10) == expected
    assert proc.returncode == expected
    # signalling an exited child does nothing
    proc.kill()
    proc.send_signal(signal.SIGTERM)
    assert proc.returncode == expected
    proc.stdin.close()
    proc.stdout.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR2], ids=lambda s: s.name)
def test_child_killed_by_its_own_signal(sp: Any, sig: signal.Signals) -> None:
    assert sp.call(["sh", "-c", f"kill -{int(sig)} $$; exit 1"]) == -int(sig)


def test_closing_stdout_gives_the_child_sigpipe(sp: Any) -> None:
    proc = sp.Popen(["yes"], stdout=PIPE)
    try:
        assert proc.stdout.read(6) == b"y\ny\ny\n"
        proc.stdout.close()
        assert proc.wait(timeout=10) == -signal.SIGPIPE
    finally:
        proc.kill()
        proc.wait()


def test_context_manager_closes_pipes_and_waits(sp: Any) -> None:
    with sp.Popen(["sh", "-c", "printf hi; echo err >&2; exit 3"], stdin=PIPE, stdout=PIPE, stderr=PIPE) as proc:
        assert proc.stdout.read() == b"hi"
    assert proc.stdin.closed and proc.stdout.closed and proc.stderr.closed
    assert proc.returncode == 3


def test_context_manager_flushes_stdin(sp: Any, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    with sp.Popen(["sh", "-c", 'cat > "$1"', "sh", str(out)], stdin=PIPE) as proc:
        proc.stdin.write(b"buffered, written at exit")
    assert proc.returncode == 0
    assert out.read_bytes() == b"buffered, written at exit"


def test_popen_args_attribute(sp: Any) -> None:
    with sp.Popen(["sh", "-c", "exit 0"]) as proc:
        assert proc.args == ["sh", "-c", "exit 0"]
    with sp.Popen("exit 0", shell=True) as proc:
        assert proc.args == "exit 0"


SESSION = [PY, "-c", "import os; print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())"]


def test_start_new_session(sp: Any) -> None:
    assert sp.check_output(SESSION, start_new_session=True) == b"True True\n"


def test_process_group_0(sp: Any) -> None:
    assert sp.check_output(SESSION, process_group=0) == b"False True\n"


def test_umask(sp: Any) -> None:
    assert sp.check_output(["sh", "-c", "umask"], umask=0o027) == b"0027\n"


# --- start failures ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["Popen", "run", "call"])
def test_missing_program(sp: Any, how: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        getattr(sp, how)([MISSING, "arg"])
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == MISSING


def test_missing_program_path(sp: Any, tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as info:
        sp.Popen([path])
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, path)


def test_missing_executable_argument(sp: Any) -> None:
    with pytest.raises(FileNotFoundError) as info:
        sp.Popen(["sh", "-c", "true"], executable="/no/such/shell")
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, "/no/such/shell")


def test_not_executable(sp: Any, tmp_path: pathlib.Path) -> None:
    path = make_script(tmp_path / "not-executable", "echo never\n", mode=0o644)
    with pytest.raises(PermissionError) as info:
        sp.Popen([path])
    assert (info.value.errno, info.value.filename) == (errno.EACCES, path)


def test_bad_cwd(sp: Any, tmp_path: pathlib.Path) -> None:
    cwd = str(tmp_path / "no such dir")
    with pytest.raises(FileNotFoundError) as info:
        sp.Popen(["sh", "-c", "true"], cwd=cwd)
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, cwd)


# --- run() ----------------------------------------------------------------------------


def test_run_capture_output_and_input(sp: Any) -> None:
    result = sp.run(["sh", "-c", "cat; echo err >&2; exit 3"], input=b"in", capture_output=True)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"in", b"err\n")
    assert result.args == ["sh", "-c", "cat; echo err >&2; exit 3"]
    with pytest.raises(subprocess.CalledProcessError) as info:
        result.check_returncode()
    assert info.value.returncode == 3


def test_run_text_input(sp: Any) -> None:
    result = sp.run([CAT], input="text ✓", capture_output=True, text=True)
    assert (result.stdout, result.stderr) == ("text ✓", "")


def test_run_without_capture(sp: Any) -> None:
    result = sp.run(["sh", "-c", "exit 0"])
    assert (result.returncode, result.stdout, result.stderr) == (0, None, None)


def test_run_check(sp: Any) -> None:
    assert sp.run(["sh", "-c", "exit 0"], check=True).returncode == 0
    args = ["sh", "-c", "echo out; echo err >&2; exit 5"]
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.run(args, check=True, capture_output=True)
    error = info.value
    assert isinstance(error, sp.CalledProcessError)
    assert (error.returncode, error.cmd, error.output, error.stdout, error.stderr) == (
        5,
        args,
        b"out\n",
        b"out\n",
        b"err\n",
    )
    assert str(error) == f"Command '{args!r}' returned non-zero exit status 5."


def test_run_check_death_by_signal(sp: Any) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.run(["sh", "-c", "kill -TERM $$"], check=True)
    assert info.value.returncode == -signal.SIGTERM
    assert "died with <Signals.SIGTERM: 15>" in str(info.value)


def test_run_timeout_kills_the_child(sp: Any, tmp_path: pathlib.Path) -> None:
    pidfile = tmp_path / "pid"
    args = ["sh", "-c", 'echo $$ > "$1"; echo started; exec sleep 60', "sh", str(pidfile)]
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        sp.run(args, capture_output=True, timeout=0.5)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, sp.TimeoutExpired)
    assert (info.value.cmd, info.value.timeout) == (args, 0.5)
    assert info.value.output == b"started\n"
    # run() killed and reaped the child before raising
    assert not pid_running(int(pidfile.read_text()))


def test_call(sp: Any) -> None:
    assert sp.call(["sh", "-c", "exit 5"]) == 5
    assert sp.call("exit 6", shell=True) == 6
    assert sp.call(["sh", "-c", "kill -KILL $$"]) == -signal.SIGKILL


def test_call_timeout_kills_the_child(sp: Any, tmp_path: pathlib.Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        sp.call(["sh", "-c", 'echo $$ > "$1"; exec sleep 60', "sh", str(pidfile)], timeout=0.5)
    assert not pid_running(int(pidfile.read_text()))


def test_check_call(sp: Any) -> None:
    assert sp.check_call(["sh", "-c", "exit 0"]) == 0
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.check_call(["sh", "-c", "exit 7"])
    assert (info.value.returncode, info.value.cmd, info.value.output, info.value.stderr) == (
        7,
        ["sh", "-c", "exit 7"],
        None,
        None,
    )
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.check_call(args=["sh", "-c", "exit 8"])
    assert (info.value.returncode, info.value.cmd) == (8, ["sh", "-c", "exit 8"])


def test_check_output(sp: Any) -> None:
    assert sp.check_output(["sh", "-c", "echo out; echo err >&2"], stderr=DEVNULL) == b"out\n"
    assert sp.check_output(["sh", "-c", "echo out; echo err >&2"], stderr=STDOUT) == b"out\nerr\n"
    assert sp.check_output([CAT], input=b"piped") == b"piped"
    assert sp.check_output([CAT], input="text", text=True) == "text"
    assert sp.check_output("printf 'a\\r\\nb'", shell=True, text=True) == "a\nb"
    # input=None means empty input, not inherited stdin
    assert sp.check_output([CAT], input=None) == b""
    assert sp.check_output([CAT], input=None, text=True) == ""


def test_check_output_failure(sp: Any) -> None:
    args = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.check_output(args, stderr=PIPE)
    error = info.value
    assert isinstance(error, sp.CalledProcessError)
    assert isinstance(error, sp.SubprocessError)
    assert (error.returncode, error.cmd, error.output, error.stderr) == (3, args, b"out\n", b"err\n")
    with pytest.raises(subprocess.CalledProcessError) as info:
        sp.check_output(args, stderr=DEVNULL, text=True)
    assert (info.value.output, info.value.stderr) == ("out\n", None)


def test_check_output_timeout(sp: Any) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        sp.check_output(["sh", "-c", "exec sleep 60"], timeout=0.3)
    assert info.value.timeout == 0.3


def test_getoutput_and_getstatusoutput(sp: Any) -> None:
    assert sp.getoutput("echo a; echo b >&2") == "a\nb"
    assert sp.getoutput("printf 'x\\r\\n\\n'") == "x\n"
    assert sp.getstatusoutput("echo out; exit 4") == (4, "out")
    assert sp.getstatusoutput("printf 'one\\ntwo'") == (0, "one\ntwo")
    assert sp.getstatusoutput("kill -KILL $$") == (-signal.SIGKILL, "")
    # the shell's own wording of "not found" (dash and bash differ): what subprocess gets here
    assert sp.getstatusoutput(MISSING) == subprocess.getstatusoutput(MISSING)
    assert sp.getstatusoutput(MISSING)[0] == 127


# --- argument checks ----------------------------------------------------------------


def test_argument_errors(sp: Any) -> None:
    cat = [CAT]
    with pytest.raises(ValueError, match="stdin and input arguments may not both be used"):
        sp.run(cat, input=b"x", stdin=PIPE)
    with pytest.raises(ValueError, match="stdout and stderr arguments may not be used with capture_output"):
        sp.run(cat, capture_output=True, stdout=PIPE)
    with pytest.raises(ValueError, match="stdout and stderr arguments may not be used with capture_output"):
        sp.run(cat, capture_output=True, stderr=DEVNULL)
    with pytest.raises(ValueError, match="stdout argument not allowed, it will be overridden"):
        sp.check_output(cat, stdout=PIPE)
    with pytest.raises(ValueError, match="stdin and input arguments may not both be used"):
        sp.check_output(cat, input=b"x", stdin=DEVNULL)
    with pytest.raises(subprocess.SubprocessError, match="Cannot disambiguate"):
        sp.Popen(cat, text=True, universal_newlines=False)
    with pytest.raises(ValueError, match="startupinfo"):
        sp.Popen(cat, startupinfo=object())
    with pytest.raises(ValueError, match="creationflags"):
        sp.Popen(cat, creationflags=1)
    with pytest.raises(TypeError, match="bufsize must be an integer"):
        sp.Popen(cat, bufsize=1.5)
    with pytest.raises(TypeError, match="path-like args is not allowed when shell is true"):
        sp.run(pathlib.Path(CAT), shell=True)
    for check in (False, True):
        with pytest.raises(ValueError, match="check argument not allowed, it will be overridden"):
            sp.check_output(cat, check=check)


def test_user_and_group_ids_are_checked(sp: Any) -> None:
    with pytest.raises(ValueError, match="User ID cannot be negative"):
        sp.run(["true"], user=-1)
    with pytest.raises(ValueError, match="Group ID cannot be negative"):
        sp.run(["true"], group=-1)
    with pytest.raises(OverflowError):
        sp.run(["true"], user=2**64)
    with pytest.raises(ValueError):
        sp.run(["true"], extra_groups=[2**64])


def test_popen_is_subscriptable(sp: Any) -> None:
    assert sp.Popen[bytes].__origin__ is sp.Popen


# --- this process's fds, its preexec_fn, and a child that signals its parent ---------


# The child lists the fds it has (but the listing's own) and writes each number into the fd of that number.
LIST_FDS = """
import os, sys
fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
open_fds = [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")]
for fd in open_fds:
    if fd > 2 and fd in map(int, sys.argv[1:]):
        os.write(fd, str(fd).encode())
print(",".join(map(str, open_fds)))
"""


def fds_of_child(sp: Any, *write_to: int, **kwargs: Any) -> set[int]:
    """The fds a child started with ``kwargs`` has open above 2 (it writes its number into each of ``write_to``)."""
    result = sp.run([PY, "-c", LIST_FDS, *map(str, write_to)], stdout=PIPE, check=True, **kwargs)
    return {int(fd) for fd in result.stdout.split(b",")} - {0, 1, 2}


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    """Twenty pipes of this process, the odd ones inheritable (spread over the low numbers a local agent uses too)."""
    made = [os.pipe() for _ in range(20)]
    for i, (_, write_fd) in enumerate(made):
        os.set_inheritable(write_fd, bool(i % 2))
    try:
        yield made
    finally:
        for pair in made:
            for fd in pair:
                os.close(fd)


def test_pass_fds_appear_at_their_numbers_and_no_other(sp: Any, pipes: list[tuple[int, int]]) -> None:
    passed = [write_fd for _, write_fd in pipes]
    if not real_fds(sp):
        with pytest.raises(ValueError, match="pass_fds: this process's fds cannot reach the children of"):
            sp.run(["true"], pass_fds=passed)
        return
    # the child gets our fds at the same numbers, whatever numbers the agent received them at, inheritable there
    assert fds_of_child(sp, *passed, pass_fds=passed) == set(passed)
    for read_fd, write_fd in pipes:
        assert read_now(read_fd) == str(write_fd).encode()
    # our flags are left as they were; 0-2 in pass_fds are the child's stdio anyway
    assert [os.get_inheritable(write_fd) for _, write_fd in pipes] == [bool(i % 2) for i in range(20)]
    assert fds_of_child(sp, pass_fds=[0, 2, passed[3]]) == {passed[3]}


def test_pass_fds_also_given_as_stdio(sp: Any, tmp_path: pathlib.Path) -> None:
    # as CPython's test_pass_fds_redirected: fds given as stdio are passed at their own numbers too
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        kwargs = {"stdin": null, "stdout": write_fd, "stderr": null, "pass_fds": [null, write_fd]}
        if not real_fds(sp):
            with pytest.raises(ValueError, match="pass_fds"):
                sp.Popen([PY, "-c", LIST_FDS], **kwargs)
            return
        with sp.Popen([PY, "-c", LIST_FDS], **kwargs) as proc:
            output = os.read(read_fd, 1024)
        assert proc.returncode == 0
        assert {int(fd) for fd in output.split(b",")} == {0, 1, 2, null, write_fd}
    finally:
        for fd in (read_fd, write_fd, null):
            os.close(fd)


def test_pass_fds_overrides_close_fds_with_a_warning(sp: Any, pipes: list[tuple[int, int]]) -> None:
    fd = pipes[0][1]
    with pytest.warns(RuntimeWarning, match="overriding close_fds"):
        if real_fds(sp):
            assert sp.call(["true"], close_fds=False, pass_fds=(fd,)) == 0
        else:
            with pytest.raises(ValueError, match="pass_fds"):
                sp.call(["true"], close_fds=False, pass_fds=(fd,))


def test_pass_fds_that_are_not_open(sp: Any) -> None:
    fd = 987
    assert not os.path.exists(f"/proc/self/fd/{fd}")
    with pytest.raises((OSError, ValueError)) as info:
        sp.run(["true"], pass_fds=[fd])
    if real_fds(sp):
        assert isinstance(info.value, OSError) and info.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="bad value"):
        sp.run(["true"], pass_fds=[-5])


def test_close_fds_false_passes_the_inheritable_fds(sp: Any, pipes: list[tuple[int, int]]) -> None:
    inheritable = {write_fd for i, (_, write_fd) in enumerate(pipes) if i % 2}
    others = {fd for pair in pipes for fd in pair} - inheritable
    inherited = fds_of_child(sp, *inheritable, close_fds=False)
    assert not inherited & others
    if real_fds(sp):  # locally, at their own numbers; remotely no fd of this process exists where the child runs
        assert inherited >= inheritable
        for i, (read_fd, write_fd) in enumerate(pipes):
            assert read_now(read_fd) == (str(write_fd).encode() if i % 2 else b"")
    else:
        assert not inherited & inheritable
    assert not fds_of_child(sp, close_fds=True) & (inheritable | others)


def test_preexec_fn_is_refused_on_remowt(sp: Any) -> None:
    if sp is subprocess:
        assert sp.run(["true"], preexec_fn=lambda: None).returncode == 0
        return
    with pytest.raises(ValueError, match="preexec_fn: the child is forked by the agent, another process"):
        sp.run(["true"], preexec_fn=lambda: None)


CALLS_ITS_PARENT = "import os, signal, sys; os.kill(os.getppid(), getattr(signal, sys.argv[1]))"


@pytest.mark.timeout(20, method="thread")  # pytest-timeout's own method uses SIGALRM, one of those signals
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2", "SIGALRM"])
def test_a_child_that_signals_its_parent(sp: Any, name: str) -> None:
    # as CPython's test_communicate_eintr: with subprocess the caller gets it; a local agent passes it on to
    # us; over ssh the parent is the agent, which takes it (it must not die of it); the loopback's is us
    signum = getattr(signal, name)
    got = threading.Event()
    previous = signal.signal(signum, lambda *_: got.set())
    try:
        with sp.Popen([PY, "-c", CALLS_ITS_PARENT, name], stdout=PIPE) as proc:
            assert proc.communicate(timeout=10) == (b"", None)
        assert proc.returncode == 0
        if not (sp is not subprocess and sp.description.startswith("ssh")):
            assert got.wait(10)
        assert sp.run(["true"]).returncode == 0  # the connection serves on
    finally:
        signal.signal(signum, previous)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"args": [CAT, "a\0b"]}, "embedded null byte"),
        ({"env": {"A": "b\0c"}}, "embedded null byte"),
        ({"env": {"A=B": "c"}}, "illegal environment variable name"),
    ],
    ids=["nul-in-arg", "nul-in-env", "equals-in-env-name"],
)
def test_bad_strings_raise_value_error(sp: Any, kwargs: Dict[str, Any], message: str) -> None:
    kwargs = {"args": [CAT], **kwargs}
    with pytest.raises(ValueError, match=message):
        sp.Popen(**kwargs)
