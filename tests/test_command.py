"""The command builder, ``conn.cmd(program)...``, over a loopback and a local connection."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import msgspec
import pytest
from _util import shared_connection

import remowt
from remowt.user.command import Command

PIPE = subprocess.PIPE
PY = sys.executable
WEIRD = ["a b", "it's", 'say "hi"', "$HOME", "${PATH}", "`id`", "$(id)", "", "back\\slash", "~", "*", "!x", "x\ny"]
WEIRD += ["-n", "a;b", "a|b", "a&&b", "#c", "{x,y}", "tab\there"]
# prints what it was given, one variable and where it ran, as JSON
REPORT = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ.get('FOO'), os.getcwd()]))"

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=["loopback", "local"])
def conn(request: pytest.FixtureRequest, connections: Dict[str, remowt.Remowt]) -> remowt.Remowt:
    return shared_connection(request, connections, request.param)


class Item(msgspec.Struct):
    name: str
    count: int
    tags: List[str] = msgspec.field(default_factory=list)


def test_printf(conn: remowt.Remowt) -> None:
    command = conn.cmd("printf").arg("%s|").args(["a b", "c"])
    assert isinstance(command, Command)
    assert command.run_string() == "a b|c|"


def test_builder_is_immutable(conn: remowt.Remowt) -> None:
    base = conn.cmd("printf")
    one = base.arg("%s|").arg("one")
    two = base.arg("%s|").arg("two").env("A", "1").cwd("/")
    assert base.argv == ["printf"]
    assert one.argv == ["printf", "%s|", "one"]
    assert two.argv == ["printf", "%s|", "two"]
    assert (one.environment, one.directory) == ((), None)
    assert one.run_string() == "one|"
    assert two.run_string() == "two|"


def test_arguments_are_strings(conn: remowt.Remowt) -> None:
    command = conn.cmd("printf").arg("%s|").arg(3).args([1.5, pathlib.Path("p/q")])
    assert command.argv == ["printf", "%s|", "3", "1.5", "p/q"]
    assert command.run_string() == "3|1.5|p/q|"


def test_eqarg_and_comparg(conn: remowt.Remowt) -> None:
    command = conn.cmd("printf").arg("[%s]").eqarg("--property", "X Y").comparg("-p", "v w").eqarg("--n", 5)
    assert command.argv == ["printf", "[%s]", "--property=X Y", "-p", "v w", "--n=5"]
    assert command.run_string() == "[--property=X Y][-p][v w][--n=5]"


def test_env_extends_the_environment(conn: remowt.Remowt) -> None:
    command = conn.cmd("sh").args(["-c", 'printf "%s|%s|%s" "$GREETING" "$OTHER" "${PATH:+has PATH}"'])
    assert command.env("GREETING", "hello world").env("OTHER", 2).run_string() == "hello world|2|has PATH"
    # the last setting of a name wins
    assert command.env("GREETING", "first").env("GREETING", "second").run_string() == "second||has PATH"


def test_cwd(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    where = tmp_path / "a dir"
    where.mkdir()
    command = conn.cmd(PY).args(["-c", "import os; print(os.getcwd())"])
    assert command.cwd(where).run_string() == os.path.realpath(where) + "\n"
    assert command.cwd(str(where)).run_string() == os.path.realpath(where) + "\n"
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        command.cwd(missing).run()
    assert info.value.filename == str(missing)


def test_popen(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    proc = conn.cmd("cat").popen(stdin=PIPE, stdout=PIPE)
    assert isinstance(proc, remowt.Popen)
    assert proc.connection is conn
    assert proc.args == ["cat"]
    assert proc.communicate(b"piped") == (b"piped", None)
    assert proc.returncode == 0
    command = conn.cmd("sh").args(["-c", 'echo "$V"; pwd -P; exit 3']).env("V", "from env").cwd(tmp_path)
    with command.popen(stdout=PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read() == f"from env\n{os.path.realpath(tmp_path)}\n"
    assert proc.returncode == 3


def test_run(conn: remowt.Remowt) -> None:
    result = conn.cmd("sh").args(["-c", "cat; echo err >&2"]).run(input=b"in put")
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"in put", b"err\n")
    assert conn.cmd("cat").run_string(input="é".encode()) == "é"


def test_run_timeout(conn: remowt.Remowt) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        conn.cmd("sleep").arg(30).run(timeout=0.2)


def test_missing_program(conn: remowt.Remowt) -> None:
    with pytest.raises(FileNotFoundError) as info:
        conn.cmd("no-such-program-remowt-cmd").arg("x").run()
    assert info.value.filename == "no-such-program-remowt-cmd"


def test_failure_raises_with_stderr(conn: remowt.Remowt) -> None:
    command = conn.cmd("sh").args(["-c", "echo partial; echo 'it broke' >&2; exit 3"])
    for run in (command.run, command.run_string):
        with pytest.raises(subprocess.CalledProcessError) as info:
            run()
        error = info.value
        assert isinstance(error, remowt.CalledProcessError)
        assert (error.returncode, error.output, error.stderr) == (3, b"partial\n", b"it broke\n")
        assert error.cmd == str(command)


def test_failure_by_signal(conn: remowt.Remowt) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        conn.cmd("sh").args(["-c", "kill -TERM $$"]).run()
    assert info.value.returncode == -15


def test_run_value(conn: remowt.Remowt) -> None:
    code = "import json; print(json.dumps({'name': 'widget', 'count': 3, 'tags': ['a', 'b c']}))"
    item = conn.cmd(PY).args(["-c", code]).run_value(Item)
    assert item == Item(name="widget", count=3, tags=["a", "b c"])
    assert conn.cmd(PY).args(["-c", "print('[1, 2, 3]')"]).run_value(List[int]) == [1, 2, 3]
    assert conn.cmd(PY).args(["-c", "print('{\"a\": 1}')"]).run_value(Dict[str, int]) == {"a": 1}
    # input reaches the child
    echo = conn.cmd(PY).args(["-c", "import sys; sys.stdout.write(sys.stdin.read())"])
    assert echo.run_value(Item, input=b'{"name": "in", "count": 0}') == Item(name="in", count=0)


@pytest.mark.parametrize(
    "output",
    ["not json", '{"name": "x", "count": "three"}', '{"name": "x"}', "[1, 2]", ""],
    ids=["invalid-json", "wrong-type", "missing-field", "wrong-shape", "empty"],
)
def test_run_value_rejects_bad_output(conn: remowt.Remowt, output: str) -> None:
    command = conn.cmd("printf").args(["%s", output])
    with pytest.raises(ValueError, match="Item"):
        command.run_value(Item)


def test_run_value_failure_is_a_called_process_error(conn: remowt.Remowt) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        conn.cmd("sh").args(["-c", "echo '{}'; echo bad >&2; exit 1"]).run_value(Item)
    assert info.value.stderr == b"bad\n"


def test_str_is_a_quoted_shell_line(conn: remowt.Remowt, tmp_path: pathlib.Path) -> None:
    where = str(tmp_path / "it's a $dir")
    plain = conn.cmd("printf").arg("%s|").args(WEIRD)
    assert shlex.split(str(plain)) == ["printf", "%s|", *WEIRD]
    full = plain.env("FOO", "x y $z").env("BAR", "'q'").cwd(where)
    assert shlex.split(str(full)) == ["cd", where, "&&", "env", "FOO=x y $z", "BAR='q'", "printf", "%s|", *WEIRD]
    assert str(conn.cmd("ls")) == "ls"
    assert repr(full) == f"<Command {full}>"


@pytest.mark.parametrize("with_env", [False, True], ids=["plain", "env"])
@pytest.mark.parametrize("with_cwd", [False, True], ids=["here", "cwd"])
def test_str_through_sh_does_the_same(
    conn: remowt.Remowt, tmp_path: pathlib.Path, with_env: bool, with_cwd: bool
) -> None:
    where = tmp_path / "it's a $dir"
    where.mkdir()
    command = conn.cmd(PY).args(["-c", REPORT, *WEIRD])
    if with_env:
        command = command.env("FOO", "x 'y' $z")
    if with_cwd:
        command = command.cwd(where)
    by_builder = command.run_value(Tuple[List[str], Optional[str], str])
    by_shell = conn.run(["sh", "-c", str(command)], stdout=PIPE, check=True).stdout
    assert msgspec.json.decode(by_shell, type=Tuple[List[str], Optional[str], str]) == by_builder
    assert by_builder[0] == WEIRD
    assert by_builder[1] == ("x 'y' $z" if with_env else os.environ.get("FOO"))
    assert by_builder[2] == (os.path.realpath(where) if with_cwd else os.getcwd())


@pytest.mark.parametrize("with_env", [False, True], ids=["plain", "env"])
@pytest.mark.parametrize("by_path", [False, True], ids=["bare-name", "path"])
def test_str_with_equals_in_the_program(
    conn: remowt.Remowt, tmp_path: pathlib.Path, with_env: bool, by_path: bool
) -> None:
    # a shell reads a first word NAME=VALUE as an assignment, and env reads every such word before the program
    bin_dir = tmp_path / "bin=dir"
    bin_dir.mkdir()
    script = bin_dir / "A=b"
    script.write_text("#!/bin/sh\nprintf 'ran:%s|' \"$@\"\n")
    script.chmod(0o755)
    search = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = conn.cmd(str(script) if by_path else "A=b").args(["x y", "K=v"])
    if with_env:
        command = command.env("PATH", search["PATH"]).env("FOO", "1")
        by_builder = command.run_string()
        line = conn.run(["sh", "-c", str(command)], stdout=PIPE, check=True)
    else:
        assert shlex.split(str(command)) == [command.program, "x y", "K=v"]
        with command.popen(stdout=PIPE, extra_env=search) as proc:
            assert proc.stdout is not None
            by_builder = proc.stdout.read().decode()
        line = conn.run(["sh", "-c", str(command)], stdout=PIPE, check=True, extra_env=search)
    assert by_builder == "ran:x y|ran:K=v|"
    assert line.stdout.decode() == by_builder


def test_invalid_commands(conn: remowt.Remowt) -> None:
    with pytest.raises(ValueError):
        conn.cmd("")
    command = conn.cmd("true")
    for name in ("", "A=B", "A\0B"):
        with pytest.raises(ValueError, match="environment variable name"):
            command.env(name, "v")
