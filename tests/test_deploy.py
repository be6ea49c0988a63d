"""Deploying the agent through one shell line (``sh -c`` standing in for ssh), with a temporary HOME.

Real processes throughout: the bootstrap runs in a real Python, installs into
a real cache directory (tmpfs mounts for the noexec, read-only and full
cases), and the agent it starts serves a real connection.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import io
import json
import logging
import marshal
import os
import pathlib
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from _util import pypi_reachable, run_together

import remowt
from remowt import Remowt
from remowt.deploy import bundle, tree
from remowt.deploy.bundle import AgentBundle, BundleError, artifact_name, local_platform
from remowt.deploy.remote import (
    BOOT,
    BOOT_FAILED_EXIT,
    INSTALL,
    MAGIC,
    NO_PYTHON_EXIT,
    DeployError,
    DeployReport,
    remote_start_command,
    start_agent,
)
from remowt.transports.stdio import ChildTransport, spawn_framed_child

pytestmark = pytest.mark.timeout(60)

LOCAL = local_platform()
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> AgentBundle:
    directory = str(tmp_path_factory.mktemp("bundle"))
    bundle.build_local(directory)
    return AgentBundle.from_dir(directory)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH entry whose ``python3`` is the interpreter running the tests."""
    directory = str(tmp_path_factory.mktemp("bin"))
    os.symlink(sys.executable, os.path.join(directory, "python3"))
    return directory


@pytest.fixture
def home(tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(str(tmp_path), "home")
    os.mkdir(path)
    return path


class Target:
    """A pretend remote: ``/bin/sh -c LINE`` with its own HOME and PATH."""

    def __init__(self, home: str, bin_dir: str) -> None:
        self.env: Dict[str, str] = {"HOME": home, "PATH": f"{bin_dir}:/usr/bin:/bin"}

    def spawn(self, line: str) -> ChildTransport:
        return spawn_framed_child(["/bin/sh", "-c", line], env=self.env)

    def start(self, agent_bundle: AgentBundle, python: str = "python3", before: str = "") -> ChildTransport:
        return self.spawn(before + remote_start_command(agent_bundle, python))

    def deploy(self, agent_bundle: AgentBundle, **kwargs: str) -> Tuple[DeployReport, Remowt]:
        transport = self.start(agent_bundle, **kwargs)
        report = start_agent(transport, agent_bundle, timeout=TIMEOUT)
        return report, remowt.connect_transport(transport, description="deploy test", agent_keepalive=0)


@pytest.fixture
def target(home: str, bin_dir: str) -> Target:
    return Target(home, bin_dir)


@pytest.fixture
def mounts() -> Iterator[Callable[..., None]]:
    """``mount(path, *args)`` runs mount(8) and unmounts at the end; skips when that is not possible here."""
    mounted: List[str] = []

    def mount(path: str, *args: str) -> None:
        if os.geteuid() != 0:
            pytest.skip("mounting needs root")
        os.makedirs(path, exist_ok=True)
        result = subprocess.run(["mount", *args, path], capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            pytest.skip(f"cannot mount here: {result.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=True, timeout=10)


def says_hi(conn: Remowt) -> None:
    try:
        assert conn.run(["echo", "hi"], capture_output=True, timeout=TIMEOUT).stdout == b"hi\n"
    finally:
        conn.close()


def cache_root(home: str) -> str:
    return os.path.join(home, ".cache", "remowt")


def frames(data: bytes) -> List[Dict[str, object]]:
    assert data.startswith(MAGIC), data[:100]
    data = data[len(MAGIC) :]
    out = []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return out


def printf_bytes(data: bytes) -> str:
    return "printf '" + "".join(f"\\{byte:03o}" for byte in data) + "'"


def find_python(version: str) -> Optional[str]:
    """A real interpreter binary of ``version`` (not a pyenv shim), or None."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    candidates += [p for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}") if os.path.exists(p)]
    return candidates[0] if candidates else None


# --- the normal path -------------------------------------------------------------


def test_first_deploy_uploads_then_the_cache_is_reused(built: AgentBundle, target: Target, home: str) -> None:
    expected = os.path.join(cache_root(home), built.hashes[LOCAL])
    first, conn = target.deploy(built)
    says_hi(conn)
    assert (first.platform, first.path, first.uploaded, first.fallback) == (LOCAL, expected, True, None)
    assert first.python_version == ".".join(map(str, sys.version_info[:3]))
    assert first.python_executable == os.path.join(os.path.dirname(first.python_executable), "python3")
    second, conn = target.deploy(built)
    says_hi(conn)
    assert (second.path, second.uploaded, second.fallback) == (expected, False, None)
    assert sorted(os.listdir(cache_root(home))) == [built.hashes[LOCAL]]
    assert {"agent.py", "remowt", "msgspec"} <= set(os.listdir(expected))


def test_xdg_cache_home_is_honoured_and_a_relative_one_ignored(built: AgentBundle, target: Target, home: str) -> None:
    xdg = os.path.join(home, "xdg")
    target.env["XDG_CACHE_HOME"] = xdg
    report, conn = target.deploy(built)
    says_hi(conn)
    assert report.path == os.path.join(xdg, "remowt", built.hashes[LOCAL])
    assert not os.path.exists(os.path.join(home, ".cache"))
    target.env["XDG_CACHE_HOME"] = "relative/xdg"
    report, conn = target.deploy(built)
    says_hi(conn)
    assert report.path == os.path.join(cache_root(home), built.hashes[LOCAL])


def test_concurrent_deploys_into_an_empty_cache_both_succeed(built: AgentBundle, target: Target, home: str) -> None:
    def deploy(n: int) -> DeployReport:
        report, conn = target.deploy(built)
        says_hi(conn)
        return report

    expected = os.path.join(cache_root(home), built.hashes[LOCAL])
    for report in run_together(deploy, 3, TIMEOUT + 10):
        assert isinstance(report, DeployReport), report
        assert (report.path, report.fallback) == (expected, None)
    assert os.listdir(cache_root(home)) == [built.hashes[LOCAL]], "a staging directory was left behind"


def read_frame(stream: IO[bytes]) -> Dict[str, object]:
    (size,) = struct.unpack(">I", stream.read(4))
    message: Dict[str, object] = json.loads(stream.read(size))
    return message


def test_losing_the_install_race_uses_the_winners_copy(
    built: AgentBundle, target: Target, home: str, tmp_path: os.PathLike[str]
) -> None:
    """Another client renames its copy into place while this one uploads: this one's rename fails, and that is fine."""
    other_home = os.path.join(str(tmp_path), "other")
    os.mkdir(other_home)
    report, conn = Target(other_home, target.env["PATH"].split(":")[0]).deploy(built)
    says_hi(conn)
    boot = BOOT.encode()
    process = subprocess.Popen(
        ["/bin/sh", "-c", remote_start_command(built)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=target.env,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(struct.pack(">I", len(boot)) + boot)
        process.stdin.flush()
        assert process.stdout.read(len(MAGIC)) == MAGIC
        status = read_frame(process.stdout)
        assert (status["kind"], status["installed"]) == ("status", False)
        winner = os.path.join(cache_root(home), built.hashes[LOCAL])
        shutil.copytree(report.path, winner)  # the other client won
        won = os.stat(winner).st_ino
        artifact = built.read_artifact(LOCAL)
        install = INSTALL.encode()
        process.stdin.write(struct.pack(">I", len(install)) + install + struct.pack(">I", len(artifact)) + artifact)
        process.stdin.flush()
        ready = read_frame(process.stdout)
        assert (ready["kind"], ready["path"], ready["note"]) == ("ready", winner, "")
        assert os.stat(winner).st_ino == won
        assert os.listdir(cache_root(home)) == [built.hashes[LOCAL]], "the loser's staging directory was left behind"
    finally:
        process.stdin.close()  # the agent sees the end of its input and exits
        process.stdout.close()
        process.wait(TIMEOUT)


def test_everything_in_the_line_is_quoted(built: AgentBundle, target: Target, tmp_path: os.PathLike[str]) -> None:
    odd = os.path.join(str(tmp_path), "b i n's", "py $(thon) `3`;")
    os.makedirs(os.path.dirname(odd))
    os.symlink(sys.executable, odd)
    report, conn = target.deploy(built, python=odd)
    says_hi(conn)
    assert report.python_executable == odd


def test_login_script_output_before_the_bootstrap_is_skipped(
    built: AgentBundle, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="remowt.deploy"):
        report, conn = target.deploy(built, before="echo 'Welcome to target!'; printf 'no newline'; ")
    says_hi(conn)
    assert report.uploaded
    assert "Welcome to target!\\nno newline" in caplog.text


def test_cached_start_is_quick(built: AgentBundle, target: Target) -> None:
    _, conn = target.deploy(built)
    says_hi(conn)
    times = []
    for _ in range(3):
        report, conn = target.deploy(built)
        conn.close()
        assert not report.uploaded
        times.append(report.seconds)
    assert min(times) < 1.0, times  # about 30 ms here: Python's start and msgspec's import


# --- falling back to a temporary directory ----------------------------------------


def assert_ran_from_a_temporary_directory(report: DeployReport, conn: Remowt, tmpdir: str, note: str) -> None:
    assert report.fallback is not None and note in report.fallback, report.fallback
    assert report.uploaded and os.path.dirname(report.path) == tmpdir
    assert os.path.isfile(os.path.join(report.path, "agent.py"))
    says_hi(conn)
    assert os.listdir(tmpdir) == [], "the temporary directory outlived its agent"


@pytest.fixture
def tmpdir_env(target: Target, tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(str(tmp_path), "tmp")
    os.mkdir(path)
    target.env["TMPDIR"] = path
    return path


def test_noexec_cache_falls_back(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    mounts(os.path.join(home, ".cache"), "-t", "tmpfs", "-o", "noexec", "tmpfs")
    report, conn = target.deploy(built)
    note = f"{cache_root(home)} is on a filesystem mounted noexec"
    assert_ran_from_a_temporary_directory(report, conn, tmpdir_env, note)


def read_only_cache(target: Target, home: str, mounts: Callable[..., None]) -> str:
    """The target's cache is on a read-only file system: its agents run from temporary directories."""
    xdg = os.path.join(home, "ro")
    target.env["XDG_CACHE_HOME"] = xdg
    mounts(xdg, "-t", "tmpfs", "-o", "ro", "tmpfs")
    return xdg


def test_read_only_cache_falls_back(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    xdg = read_only_cache(target, home, mounts)
    report, conn = target.deploy(built)
    assert_ran_from_a_temporary_directory(
        report, conn, tmpdir_env, f"cannot write {xdg}/remowt (Read-only file system)"
    )


def test_full_cache_falls_back(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    mounts(os.path.join(home, ".cache"), "-t", "tmpfs", "-o", "size=64k", "tmpfs")
    report, conn = target.deploy(built)
    assert_ran_from_a_temporary_directory(report, conn, tmpdir_env, "No space left on device")
    assert os.listdir(cache_root(home)) == [], "the half-unpacked staging directory was left behind"


def test_cache_that_no_longer_loads_falls_back(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    """Installed earlier, mounted noexec since (statvfs may not tell): the import check catches it."""
    _, conn = target.deploy(built)
    says_hi(conn)
    cache = os.path.join(home, ".cache")
    mounts(cache, "--bind", cache)
    subprocess.run(["mount", "-o", "remount,bind,noexec", cache], check=True, timeout=10)
    report, conn = target.deploy(built)
    installed = os.path.join(cache_root(home), built.hashes[LOCAL])
    assert_ran_from_a_temporary_directory(report, conn, tmpdir_env, f"cannot load the agent from {installed}")


# --- errors a user can act on ---------------------------------------------------------


@pytest.mark.parametrize("python", ["python3", "python-does-not-exist"])
def test_missing_python(built: AgentBundle, target: Target, tmp_path: os.PathLike[str], python: str) -> None:
    target.env["PATH"] = str(tmp_path)  # nothing in it
    transport = target.start(built, python=python)
    with pytest.raises(DeployError, match=f"no {python} on the target: the agent needs Python 3.9 or newer") as e:
        start_agent(transport, built, timeout=TIMEOUT)
    assert e.value.kind == "no-python"
    assert transport.process.returncode == NO_PYTHON_EXIT
    assert f"remowt: {python} not found on the PATH" in transport.stderr_tail()


@pytest.mark.parametrize("version", ["3.8", "3.6"])
def test_python_too_old(built: AgentBundle, target: Target, version: str) -> None:
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    transport = target.start(built, python=python)
    with pytest.raises(DeployError, match=f"the target's {python} is Python {version}\\.[0-9]+: the agent needs") as e:
        start_agent(transport, built, timeout=TIMEOUT)
    assert e.value.kind == "too-old"
    assert transport.process.returncode == BOOT_FAILED_EXIT
    assert "is too old" in transport.stderr_tail()


def test_platform_missing_names_the_command_that_adds_it(built: AgentBundle, target: Target, home: str) -> None:
    other = AgentBundle(built.directory, {"aarch64-cp39": "0" * 64}, {"aarch64-cp39": "1" * 64})
    transport = target.start(other)
    with pytest.raises(DeployError) as e:
        start_agent(transport, other, timeout=TIMEOUT)
    assert e.value.kind == "platform-missing"
    assert str(e.value) == (
        f"target platform {LOCAL} is missing from bundle {built.directory}; "
        f"add it with: remowt bundle add --platform {LOCAL} --dir {built.directory}"
    )
    assert not os.path.exists(cache_root(home))


def test_corrupted_artifact_is_refused_before_upload(
    built: AgentBundle, target: Target, home: str, tmp_path: os.PathLike[str]
) -> None:
    directory = os.path.join(str(tmp_path), "bundle")
    shutil.copytree(built.directory, directory)
    loaded = AgentBundle.from_dir(directory)
    with open(os.path.join(directory, artifact_name(LOCAL)), "r+b") as f:
        f.seek(1000)
        f.write(b"corrupt")
    transport = target.start(loaded)
    with pytest.raises(BundleError, match="changed or corrupted"):
        start_agent(transport, loaded, timeout=TIMEOUT)
    assert transport.process.returncode == BOOT_FAILED_EXIT  # it saw the end of its input
    assert os.listdir(cache_root(home)) == []


def test_bootstrap_refuses_an_artifact_with_the_wrong_hash(built: AgentBundle, target: Target, home: str) -> None:
    boot, install = BOOT.encode(), INSTALL.encode()
    sent = (
        struct.pack(">I", len(boot))
        + boot
        + struct.pack(">I", len(install))
        + install
        + struct.pack(">I", 5)
        + b"bogus"
    )
    result = subprocess.run(
        ["/bin/sh", "-c", remote_start_command(built)], input=sent, env=target.env, capture_output=True, timeout=TIMEOUT
    )
    assert result.returncode == BOOT_FAILED_EXIT
    status, error = frames(result.stdout)
    assert (status["kind"], status["installed"], status["platform"]) == ("status", False, LOCAL)
    assert (error["kind"], error["error"]) == ("error", "hash-mismatch")
    bogus = hashlib.sha256(b"bogus").hexdigest()
    assert str(error["message"]).endswith(f"has sha256 {bogus}, not {built.hashes[LOCAL]}")
    assert b"remowt: the artifact received for" in result.stderr
    assert os.listdir(cache_root(home)) == []


def test_interpreter_that_fails_to_start_shows_its_stderr(
    built: AgentBundle, target: Target, tmp_path: os.PathLike[str]
) -> None:
    broken = os.path.join(str(tmp_path), "python3")
    with open(broken, "w") as f:
        f.write("#!/bin/sh\necho 'error while loading shared libraries: libpython3.so' >&2\nexit 1\n")
    os.chmod(broken, 0o755)
    transport = target.start(built, python=broken)
    with pytest.raises(DeployError, match=r"ended while waiting for the bootstrap; its stderr:\n.*libpython3\.so") as e:
        start_agent(transport, built, timeout=TIMEOUT)
    assert e.value.kind == "start"


def test_timeout_while_waiting_for_the_bootstrap(built: AgentBundle, target: Target) -> None:
    transport = target.spawn("cat >/dev/null")  # holds stdout open, says nothing, ends at end of input
    started = time.monotonic()
    with pytest.raises(DeployError, match=r"did not answer within 0\.5 s while waiting for the bootstrap") as e:
        start_agent(transport, built, timeout=0.5)
    assert e.value.kind == "timeout"
    assert time.monotonic() - started < 5
    assert transport.process.returncode is not None


def test_timeout_while_uploading(target: Target, tmp_path: os.PathLike[str]) -> None:
    """A target that stops reading: the blocked write ends at the deadline too."""
    directory = str(tmp_path)
    artifact = os.urandom(4 << 20)  # more than the pipe holds
    with open(os.path.join(directory, artifact_name(LOCAL)), "wb") as f:
        f.write(artifact)
    with open(os.path.join(directory, "hashes"), "w") as f:
        f.write(f"{LOCAL} {hashlib.sha256(artifact).hexdigest()}\n")
    with open(os.path.join(directory, "trees"), "w") as f:
        f.write(f"{hashlib.sha256(artifact).hexdigest()} {'0' * 64}\n")  # never unpacked
    big = AgentBundle.from_dir(directory)
    status = {"kind": "status", "platform": LOCAL, "python": "3", "executable": "x", "path": "/x", "installed": False}
    body = json.dumps(status).encode()
    transport = target.spawn(printf_bytes(MAGIC + struct.pack(">I", len(body)) + body) + "; exec sleep 30")
    transport.exit_timeout = 0.2
    started = time.monotonic()
    with pytest.raises(DeployError, match=rf"did not answer within 0\.5 s while uploading the agent for {LOCAL}"):
        start_agent(transport, big, timeout=0.5)
    assert time.monotonic() - started < 5


# --- another platform, fetched with pip --------------------------------------------------


def test_python39_runs_an_agent_built_from_a_pip_wheel(
    built: AgentBundle, target: Target, tmp_path: os.PathLike[str]
) -> None:
    python = find_python("3.9")
    if python is None:
        pytest.skip("no Python 3.9 on this machine")
    if not pypi_reachable():
        pytest.skip("PyPI (pypi.org:443) is unreachable from this machine")
    directory = os.path.join(str(tmp_path), "bundle")
    shutil.copytree(built.directory, directory)
    bundle.add_platform(directory, f"{os.uname().machine}-cp39")
    both = AgentBundle.from_dir(directory)
    report, conn = target.deploy(both, python=python)
    try:
        platform = f"{os.uname().machine}-cp39"
        assert (report.platform, report.python_version[:4], report.uploaded) == (platform, "3.9.", True)
        assert conn.info().python.startswith("3.9.")
    finally:
        says_hi(conn)


# --- a cache other users could write ----------------------------------------------------

OTHER_USER = "nobody"  # another local user of the target, the one who plants


def plant(source: str, planted: str) -> str:
    """A copy of the agent at ``source`` whose agent.py first leaves a mark, owned by another user; the mark's path."""
    mark = planted.rstrip("/") + ".ran"
    shutil.copytree(source, planted)
    entry = os.path.join(planted, "agent.py")
    with open(entry) as f:
        code = f.read()
    with open(entry, "w") as f:
        f.write(f"open({mark!r}, 'w').close()\n{code}")
    subprocess.run(["chown", "-R", OTHER_USER, planted], check=True, timeout=10)
    subprocess.run(["chmod", "-R", "a+rwX", planted], check=True, timeout=10)
    return mark


def test_an_agent_planted_by_another_user_in_a_loose_cache_is_never_run(
    built: AgentBundle, target: Target, home: str
) -> None:
    """The cache root was left writable by all (an old remowt, umask 000): the planted agent is set aside."""
    first, conn = target.deploy(built)
    says_hi(conn)
    root = cache_root(home)
    os.chmod(root, 0o777)
    spare = os.path.join(home, "spare")
    mark = plant(first.path, spare)
    shutil.rmtree(first.path)
    os.rename(spare, first.path)
    report, conn = target.deploy(built)
    says_hi(conn)
    assert not os.path.exists(mark), "the planted agent ran"
    assert (report.path, report.uploaded) == (first.path, True)
    assert report.fallback is not None and "not trusted" in report.fallback and OTHER_USER not in report.fallback
    assert os.stat(first.path).st_uid == os.getuid() and os.stat(root).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("how", ["symlinked cache", "shared XDG_CACHE_HOME"])
def test_a_cache_root_of_another_user_is_not_used(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, tmp_path: os.PathLike[str], how: str
) -> None:
    first, conn = target.deploy(built)  # a genuine agent to copy from
    says_hi(conn)
    theirs = os.path.join(str(tmp_path), "theirs")  # a directory the other user made, writable by all
    os.makedirs(os.path.join(theirs, "remowt"))
    mark = plant(first.path, os.path.join(theirs, "remowt", built.hashes[LOCAL]))
    subprocess.run(["chown", "-R", OTHER_USER, theirs], check=True, timeout=10)
    os.chmod(theirs, 0o1777)
    if how == "symlinked cache":
        shutil.rmtree(cache_root(home))
        os.symlink(os.path.join(theirs, "remowt"), cache_root(home))
    else:
        target.env["XDG_CACHE_HOME"] = theirs
    report, conn = target.deploy(built)
    assert "the agent cache is not used" in (report.fallback or ""), report.fallback
    assert_ran_from_a_temporary_directory(report, conn, tmpdir_env, "running the agent from the temporary directory")
    assert not os.path.exists(mark), "the planted agent ran"


def test_a_new_cache_is_private_whatever_the_umask(built: AgentBundle, target: Target, home: str) -> None:
    report, conn = target.deploy(built, before="umask 000; ")
    says_hi(conn)
    assert report.path == os.path.join(cache_root(home), built.hashes[LOCAL])
    assert os.stat(os.path.join(home, ".cache")).st_mode & 0o777 == 0o700
    assert os.stat(cache_root(home)).st_mode & 0o777 == 0o700


# --- the content itself: verified on every start -----------------------------------------


def changed_source(path: str, mark: str) -> None:
    """The agent's main module under ``path`` also leaves ``mark`` (its bytecode removed, so the change is seen)."""
    module = os.path.join(path, "remowt", "agent", "main.py")
    with open(module, "a") as f:
        f.write(f"\nopen({mark!r}, 'w').close()\n")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(importlib.util.cache_from_source(module))


def planted_bytecode(path: str, mark: str) -> None:
    """Bytecode for the agent's main module under ``path`` that leaves ``mark``, valid for its unchanged source."""
    module = os.path.join(path, "remowt", "agent", "main.py")
    with open(module) as f:
        code = compile(f"{f.read()}\nopen({mark!r}, 'w').close()\n", module, "exec", dont_inherit=True)
    st = os.stat(module)
    stamp = (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc = importlib.util.cache_from_source(module)
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(importlib.util.MAGIC_NUMBER + b"\0\0\0\0" + stamp + marshal.dumps(code))


@pytest.mark.parametrize("tamper", [changed_source, planted_bytecode])
def test_an_agent_changed_in_place_is_set_aside_and_installed_again(
    built: AgentBundle, target: Target, home: str, tamper: Callable[[str, str], None]
) -> None:
    """The same user (or anything running as them) edits the cached agent: it never runs, and the cache is repaired."""
    first, conn = target.deploy(built)
    says_hi(conn)
    mark = os.path.join(home, "tampered-agent-ran")
    tamper(first.path, mark)
    report, conn = target.deploy(built)
    says_hi(conn)
    assert not os.path.exists(mark), "the changed agent ran"
    assert (report.path, report.uploaded) == (first.path, True)
    assert report.fallback is not None and "is not the agent the client sent" in report.fallback, report.fallback
    assert "set aside" in report.fallback
    again, conn = target.deploy(built)
    says_hi(conn)
    assert (again.uploaded, again.fallback) == (False, None), "repaired once, then used as it is"
    assert not os.path.exists(mark)


def test_an_extra_file_in_the_cache_is_a_mismatch(built: AgentBundle, target: Target) -> None:
    first, conn = target.deploy(built)
    says_hi(conn)
    open(os.path.join(first.path, "remowt", "sitecustomize.py"), "w").close()
    report, conn = target.deploy(built)
    says_hi(conn)
    assert report.uploaded and "set aside" in (report.fallback or ""), report.fallback
    assert not os.path.exists(os.path.join(first.path, "remowt", "sitecustomize.py"))


def test_the_agent_writes_no_bytecode_into_its_tree(built: AgentBundle, target: Target) -> None:
    """Python would add __pycache__ files as modules are imported: -B, and the artifact brings them instead."""
    first, conn = target.deploy(built)
    with conn:
        conn.run(["true"], sudo=False)  # the subprocess service and its helpers are imported by now
    before = sorted(os.path.relpath(os.path.join(p, n), first.path) for p, _, ns in os.walk(first.path) for n in ns)
    with open(built.artifact_path(LOCAL), "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:gz") as tar:
        assert before == sorted(m.name for m in tar if m.isfile())


def test_a_start_from_the_cache_imports_only_what_the_agent_serves(
    built: AgentBundle, home: str, tmp_path: os.PathLike[str]
) -> None:
    """Every connect waits for this start: no OpenSSL (the digest is BLAKE2b), no json, no installer, no socket
    module (only a local agent passes fds), no escalation until asked."""
    wrapped = os.path.join(str(tmp_path), "bin")
    os.mkdir(wrapped)
    log = os.path.join(str(tmp_path), "imports")
    with open(os.path.join(wrapped, "python3"), "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -X importtime "$@" 2>>{shlex.quote(log)}\n')
    os.chmod(os.path.join(wrapped, "python3"), 0o755)
    target = Target(home, wrapped)
    first, conn = target.deploy(built)
    says_hi(conn)
    os.unlink(log)
    again, conn = target.deploy(built)
    assert (again.path, again.uploaded) == (first.path, False)
    says_hi(conn)
    with open(log) as f:
        imported = {line.rpartition("|")[2].strip() for line in f if line.startswith("import time:")}
    assert "remowt.agent.main" in imported and "remowt.endpoints.subprocess" in imported
    unwanted = {"json", "hashlib", "_hashlib", "tarfile", "tempfile", "socket", "remowt.endpoints.escalate"}
    assert imported & unwanted == set()


def test_tree_names_are_quoted_exactly_as_json_dumps_quotes_them() -> None:
    """The tree digest's names are JSON; the target writes them without importing json."""
    quote = tree._code()["quote"]
    names = [
        "agent.py",
        "a b",
        'q"uote',
        "back\\slash",
        "tab\tnew\nline\r",
        "\b\f\x00\x1f\x7f",
        "é",
        "日本",
        "\U0001f600",
    ]
    names += [os.fsdecode(b"undecodable\xff\xfe"), "".join(map(chr, range(0, 0x300)))]
    for name in names:
        assert quote(name) == json.dumps(name), name


def test_a_corrupted_cache_is_repaired_by_the_next_start(built: AgentBundle, target: Target) -> None:
    """A file cut short (a crash, a full disk) made every start fail during the handshake, with no hint."""
    first, conn = target.deploy(built)
    says_hi(conn)
    module = os.path.join(first.path, "remowt", "rpc", "router.py")
    os.truncate(module, os.path.getsize(module) // 2)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(importlib.util.cache_from_source(module))
    report, conn = target.deploy(built)
    says_hi(conn)
    assert report.uploaded and "set aside" in (report.fallback or "")


def changed_bundle(built: AgentBundle, directory: str, change: Dict[str, bytes]) -> AgentBundle:
    """A bundle whose artifact is ``built``'s with the files of ``change`` replaced, and without bytecode."""
    files = []
    with open(built.artifact_path(LOCAL), "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:gz") as tar:
        for member in tar:
            content = tar.extractfile(member)
            if content is not None and not member.name.endswith(".pyc"):
                files.append((member.name, change.get(member.name, content.read())))
    artifact = bundle.build_artifact(files)
    os.makedirs(directory)
    with open(os.path.join(directory, artifact_name(LOCAL)), "wb") as f:
        f.write(artifact)
    with open(os.path.join(directory, "hashes"), "w") as f:
        f.write(f"{LOCAL} {hashlib.sha256(artifact).hexdigest()}\n")
    return AgentBundle.from_dir(directory)


def test_an_agent_that_does_not_import_is_a_clear_error(
    built: AgentBundle, target: Target, tmpdir_env: str, tmp_path: os.PathLike[str]
) -> None:
    broken = changed_bundle(built, os.path.join(str(tmp_path), "b"), {"remowt/agent/main.py": b"def broken(:\n"})
    transport = target.start(broken)
    with pytest.raises(
        DeployError, match=r"cannot load the agent from .*SyntaxError: invalid syntax \(main.py, line 1\)"
    ) as e:
        start_agent(transport, broken, timeout=TIMEOUT)
    assert e.value.kind == "install"
    assert os.listdir(tmpdir_env) == []


def test_an_agent_that_fails_to_start_shows_its_stderr(
    built: AgentBundle, target: Target, tmp_path: os.PathLike[str]
) -> None:
    entry = b"import sys\nsys.exit('remowt-test: this agent does not start')\n"
    failing = changed_bundle(built, os.path.join(str(tmp_path), "b"), {"agent.py": entry})
    with pytest.raises(remowt.ConnectionLost, match=r"the agent's stderr:\nremowt-test: this agent does not start"):
        target.deploy(failing)


# --- temporary directories: the next one when one is full, none left behind ----------------


def test_a_full_temporary_directory_falls_back_to_the_next(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    read_only_cache(target, home, mounts)
    mounts(tmpdir_env, "-t", "tmpfs", "-o", "size=64k", "tmpfs")
    report, conn = target.deploy(built)
    try:
        assert os.path.dirname(report.path) == "/var/tmp", report.path
        assert f"cannot unpack the agent into {tmpdir_env}/remowt-agent-" in (report.fallback or ""), report.fallback
        assert "No space left on device" in (report.fallback or "")
        assert os.listdir(tmpdir_env) == [], "the half-unpacked directory was left behind"
    finally:
        says_hi(conn)
    assert not os.path.exists(report.path), "the temporary directory outlived its agent"


def test_a_killed_agents_temporary_directory_is_removed_by_the_next_start(
    built: AgentBundle, target: Target, home: str, tmpdir_env: str, mounts: Callable[..., None]
) -> None:
    read_only_cache(target, home, mounts)
    theirs = os.path.join(tmpdir_env, "remowt-agent-theirs")  # another user's: never touched
    os.mkdir(theirs)
    subprocess.run(["chown", OTHER_USER, theirs], check=True, timeout=10)
    killed, victim = target.deploy(built)
    running, alive = target.deploy(built)
    os.kill(victim.info().pid, signal.SIGKILL)
    with pytest.raises(remowt.ConnectionLost):
        victim.run(["true"], timeout=TIMEOUT)
    victim.close()
    assert os.path.isdir(killed.path), "a killed agent cannot clean up after itself"
    _, conn = target.deploy(built)
    assert not os.path.exists(killed.path), "the next start removes what the killed agent left"
    assert os.path.isdir(running.path), "a running agent's directory is kept"
    says_hi(alive)
    says_hi(conn)
    assert os.listdir(tmpdir_env) == ["remowt-agent-theirs"]


def test_a_local_agent_caches_the_bytecode_of_what_only_it_imports(tmp_path: pathlib.Path) -> None:
    """A local agent runs this installation as this user and writes its bytecode there, as any import would.

    Started with ``-B`` it compiled every module the client never imports (files, sockets, systemd, its own
    main …) from source at each start: a local connect took ~85 ms instead of ~50.
    """
    package = os.path.join(os.fspath(tmp_path), "remowt")
    shutil.copytree(os.path.dirname(remowt.__file__), package, ignore=shutil.ignore_patterns("__pycache__"))
    main = os.path.join(package, "agent", "main.py")
    program = "import remowt; conn = remowt.connect_local(); conn.ping(); conn.close()"
    env = dict(os.environ, PYTHONPATH=os.fspath(tmp_path))
    subprocess.run([sys.executable, "-c", program], env=env, cwd=tmp_path, check=True, timeout=60)  # not this checkout
    assert os.path.exists(importlib.util.cache_from_source(main))  # the client never imports the agent's main
