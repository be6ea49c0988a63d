"""The agent bundle: validation, deterministic artifacts, refresh, concurrent builders, pip-fetched platforms, CLI."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from typing import Iterator, List

import pytest
from _util import pypi_reachable, run_together

from remowt.deploy import bundle
from remowt.deploy.bundle import AgentBundle, BundleError, artifact_name, local_platform
from remowt.deploy.local import AGENT, agent_pythonpath, python_command

pytestmark = pytest.mark.timeout(60)

LOCAL = local_platform()
REMOWT = [sys.executable, "-c", "from remowt.cli import main; main()"]


@pytest.fixture(scope="module", autouse=True)
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundle builds from a copy of the remowt package, so edits to the tree during the run change nothing."""
    package = os.path.join(str(tmp_path_factory.mktemp("snapshot")), "remowt")
    shutil.copytree(bundle._package_dir(), package, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle, "_package_dir", lambda: package)
        yield package


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, snapshot: str) -> str:
    """A bundle with the local platform, built once; tests copy it before changing it."""
    directory = str(tmp_path_factory.mktemp("bundle"))
    bundle.build_local(directory)
    return directory


@pytest.fixture
def copy(built: str, tmp_path: os.PathLike[str]) -> str:
    directory = os.path.join(str(tmp_path), "bundle")
    shutil.copytree(built, directory)
    return directory


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def members(artifact: bytes) -> List[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
        return tar.getmembers()


needs_pypi = pytest.mark.skipif(not pypi_reachable(), reason="PyPI (pypi.org:443) is unreachable from this machine")


# --- validation --------------------------------------------------------------


def test_valid_bundle_loads(copy: str) -> None:
    loaded = AgentBundle.from_dir(copy)
    assert loaded.platforms == [LOCAL]
    assert loaded.directory == copy
    with open(os.path.join(copy, artifact_name(LOCAL)), "rb") as f:
        data = f.read()
    assert loaded.hashes[LOCAL] == hashlib.sha256(data).hexdigest()
    assert loaded.read_artifact(LOCAL) == data


def test_comments_and_blank_lines_are_skipped(copy: str) -> None:
    path = os.path.join(copy, "hashes")
    with open(path) as f:
        line = f.read()
    write(path, f"# built here\n\n{line}\n   \n")
    assert AgentBundle.from_dir(copy).platforms == [LOCAL]


def test_missing_directory(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(str(tmp_path), "nope")
    expected = f"agent bundle {missing} does not exist.*remowt bundle build --dir {missing}"
    with pytest.raises(BundleError, match=expected):
        AgentBundle.from_dir(missing)


def test_missing_hashes_file(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BundleError, match="has no hashes file; build one with: remowt bundle build"):
        AgentBundle.from_dir(str(tmp_path))


def test_no_platforms(tmp_path: os.PathLike[str]) -> None:
    write(os.path.join(str(tmp_path), "hashes"), "# nothing yet\n")
    with pytest.raises(BundleError, match="lists no platforms"):
        AgentBundle.from_dir(str(tmp_path))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("x86_64-cp311", r"expected '<platform> <sha256>', got 'x86_64-cp311'"),
        (f"x86_64-cp311 {'a' * 64} extra", "expected '<platform> <sha256>'"),
        (f"x86_64 {'a' * 64}", "'x86_64' is not a platform like x86_64-cp311"),
        ("x86_64-cp311 abc123", "'abc123' is not a sha256"),
        (f"x86_64-cp311 {'A' * 64}", "'A{64}' is not a sha256 \\(64 lowercase hex digits\\)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: os.PathLike[str], line: str, problem: str) -> None:
    path = os.path.join(str(tmp_path), "hashes")
    write(path, f"# header\n{line}\n")
    with pytest.raises(BundleError, match=f"{path} line 2: {problem}"):
        AgentBundle.from_dir(str(tmp_path))


def test_duplicate_platform(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "hashes")
    write(path, f"aarch64-cp39 {'a' * 64}\n\nx86_64-cp311 {'b' * 64}\naarch64-cp39 {'c' * 64}\n")
    expected = f"{path} line 4: platform aarch64-cp39 is listed twice (first on line 1)"
    with pytest.raises(BundleError, match=re.escape(expected)):
        AgentBundle.from_dir(str(tmp_path))


def test_missing_artifact(tmp_path: os.PathLike[str]) -> None:
    write(os.path.join(str(tmp_path), "hashes"), f"aarch64-cp39 {'a' * 64}\n")
    with pytest.raises(
        BundleError,
        match=re.escape(
            "the artifact for aarch64-cp39, agent-aarch64-cp39.tar.gz, is missing; "
            "rebuild it with: remowt bundle add --platform aarch64-cp39 --dir"
        ),
    ):
        AgentBundle.from_dir(str(tmp_path))


def test_artifact_with_wrong_sha256(copy: str) -> None:
    with open(os.path.join(copy, artifact_name(LOCAL)), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(BundleError, match=f"{artifact_name(LOCAL)} has sha256 [0-9a-f]{{64}} but hashes says"):
        AgentBundle.from_dir(copy)


def test_artifact_changed_after_loading_is_refused(copy: str) -> None:
    loaded = AgentBundle.from_dir(copy)
    with open(os.path.join(copy, artifact_name(LOCAL)), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(BundleError, match="changed or corrupted"):
        loaded.read_artifact(LOCAL)
    with pytest.raises(BundleError, match="platform aarch64-cp39 is missing from bundle"):
        loaded.read_artifact("aarch64-cp39")


def test_malformed_sources_file(copy: str) -> None:
    write(os.path.join(copy, "sources.json"), '{"x86_64-cp311": {"source": "../../etc"}}')
    with pytest.raises(BundleError, match="is not a bundle sources file"):
        bundle.refresh(copy)


@pytest.mark.parametrize("platform", ["x86_64", "x86_64-311", "-cp311", "x86-64-cp311", "x86_64-cp3"])
def test_bad_platform_names(platform: str) -> None:
    with pytest.raises(BundleError, match="is not a platform"):
        bundle.parse_platform(platform)


def test_parse_platform() -> None:
    assert bundle.parse_platform("aarch64-cp39") == ("aarch64", "cp", 3, 9)
    assert bundle.parse_platform("x86_64-cp311") == ("x86_64", "cp", 3, 11)
    parsed = bundle.parse_platform(LOCAL)
    assert (parsed.machine, parsed.major, parsed.minor) == (os.uname().machine, *sys.version_info[:2])


# --- artifacts -----------------------------------------------------------------


def test_artifact_is_deterministic_and_normalised(built: str, tmp_path: os.PathLike[str]) -> None:
    again = os.path.join(str(tmp_path), "again")
    assert bundle.build_local(again) == AgentBundle.from_dir(built).hashes[LOCAL]
    with open(os.path.join(again, artifact_name(LOCAL)), "rb") as f:
        data = f.read()
    assert (data[3] & 0x08, data[4:8]) == (0, b"\0\0\0\0")  # gzip header: no file name, mtime 0
    entries = members(data)
    names = [m.name for m in entries]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in entries)
    assert all(m.mode == 0o755 for m in entries if m.isdir())
    assert {m.mode for m in entries if m.isfile()} == {0o644, 0o755}
    assert {"agent.py", "remowt/agent/main.py", "remowt/protocol/wire.py", "msgspec/__init__.py"} <= set(names)
    assert any(n.startswith("msgspec/_core.") and n.endswith(".so") for n in names)
    tag = sys.implementation.cache_tag
    modules = [n for n in names if n.endswith(".py") and n != "agent.py"]
    bytecode = [n for n in names if n.endswith(".pyc")]
    assert sorted(bytecode) == sorted(
        f"{os.path.dirname(n)}/__pycache__/{os.path.basename(n)[:-3]}.{tag}.pyc" for n in modules
    ), "the local platform's artifact brings the bytecode of each module, and nothing else"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        pyc = tar.extractfile("remowt/agent/__pycache__/main." + tag + ".pyc")
        assert pyc is not None and pyc.read(8)[4:] == (0b01).to_bytes(4, "little"), "unchecked-hash bytecode"
    assert not [n for n in names if n.split("/")[0] not in ("agent.py", "remowt", "msgspec")]


def test_build_artifact_same_files_same_bytes() -> None:
    files = [("b/x.py", b"x"), ("a.py", b"a"), ("b/c/y.so", b"\x7fELF")]
    first = bundle.build_artifact(files)
    assert first == bundle.build_artifact(list(reversed(files)))
    assert [m.name for m in members(first)] == ["a.py", "b", "b/c", "b/c/y.so", "b/x.py"]
    assert bundle.build_artifact([("a.py", b"A")]) != bundle.build_artifact([("a.py", b"a")])
    with pytest.raises(BundleError, match=re.escape("bad archive member name '../x'")):
        bundle.build_artifact([("../x", b"")])


def test_agent_runs_from_an_unpacked_artifact_without_site_packages(built: str, tmp_path: os.PathLike[str]) -> None:
    """The artifact is self-contained: the agent's imports need nothing else (no paramiko, no typing_extensions)."""
    with tarfile.open(os.path.join(built, artifact_name(LOCAL))) as tar:
        tar.extractall(str(tmp_path))
    probe = (
        "import sys, runpy; sys.argv = ['agent.py', '--help']\n"
        "try:\n runpy.run_path('agent.py', run_name='__main__')\nexcept SystemExit: pass\n"
        "import remowt.agent.main, remowt.endpoints.subprocess, remowt.endpoints.childio\n"
        "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('paramiko', 'typing_extensions', 'cryptography')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], cwd=str(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert "real-agent" in result.stdout


def _remowt_imports(source: str, module: str) -> Iterator[str]:
    """The remowt modules (or packages) that ``module``'s source imports anywhere, but under ``if TYPE_CHECKING``."""

    def nodes(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            yield child
            yield from nodes(child)

    package = module.split(".")
    for node in nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def test_the_artifact_leaves_out_the_client_and_nothing_shipped_imports_it(
    built: str, tmp_path: os.PathLike[str]
) -> None:
    """The agent, its services and the plugin SDK import (at any depth, lazily too) only what is shipped."""
    with tarfile.open(os.path.join(built, artifact_name(LOCAL))) as tar:
        tar.extractall(str(tmp_path))
        names = tar.getnames()
    client_only = [n for n in names if n.startswith(bundle.CLIENT_ONLY)]
    assert client_only == []
    assert {"remowt/user", "remowt/cli.py", "remowt/transports/ssh.py"}.isdisjoint(names)
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    left_out = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in bundle.CLIENT_ONLY}
    for name in names:
        if name.startswith("remowt/") and name.endswith(".py"):
            module = name[:-3].replace("/", ".")
            with open(os.path.join(str(tmp_path), name)) as f:
                imported = set(_remowt_imports(f.read(), module))
            wrong = sorted(i for i in imported if i in left_out or any(i.startswith(o + ".") for o in left_out))
            assert wrong == [], f"{name} imports what the artifact leaves out"
    modules = sorted(m for m in shipped if m.startswith("remowt.") and not m.endswith("__main__"))
    probe = f"import importlib, sys\nsys.path.insert(0, '.')\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    probe += "print('ok')"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], cwd=str(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def run_isolated(argv: List[str]) -> str:
    """Run ``argv`` with a PYTHONPATH that an isolated interpreter must ignore; its stdout."""
    env = dict(os.environ, PYTHONPATH="/nonexistent")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_python_command_runs_the_entrys_main_isolated() -> None:
    argv = python_command(AGENT, "--help")
    assert argv[:5] == [sys.executable, "-I", "-S", "-B", "-c"] and repr(agent_pythonpath()) in argv[5]
    assert "real-agent" in run_isolated(argv)


def test_an_agent_run_from_an_unpacked_artifact_starts_remowt_code_from_there(
    built: str, tmp_path: os.PathLike[str]
) -> None:
    """What a deployed agent starts (the privileged agent, askpass, the killer) imports only from its directory."""
    with tarfile.open(os.path.join(built, artifact_name(LOCAL))) as tar:
        tar.extractall(str(tmp_path))
    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1])\n"
        "from remowt.deploy.local import AGENT, python_command\n"
        "print(json.dumps(python_command(AGENT, '--help')))"
    )
    argv = json.loads(run_isolated([sys.executable, "-I", "-S", "-c", probe, str(tmp_path)]))
    assert argv[:5] == [sys.executable, "-I", "-S", "-B", "-c"] and repr([str(tmp_path)]) in argv[5]
    assert "real-agent" in run_isolated(argv)


# --- refresh -----------------------------------------------------------------


@pytest.fixture
def package_copy(snapshot: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of the remowt package that the bundle builds from, for a test to change."""
    package = os.path.join(str(tmp_path), "src", "remowt")
    shutil.copytree(snapshot, package)
    monkeypatch.setattr(bundle, "_package_dir", lambda: package)
    return package


def test_refresh_builds_once_then_only_when_sources_change(package_copy: str, tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(str(tmp_path), "fresh")
    bundle.refresh(directory)
    first = AgentBundle.from_dir(directory).hashes[LOCAL]
    artifact = os.path.join(directory, artifact_name(LOCAL))
    before = os.stat(artifact)
    bundle.refresh(directory)
    after = os.stat(artifact)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rebuilt with nothing changed"
    with open(os.path.join(package_copy, "protocol", "wire.py"), "a") as f:
        f.write("\n# changed\n")
    bundle.refresh(directory)
    second = AgentBundle.from_dir(directory).hashes[LOCAL]
    assert second != first
    with tarfile.open(artifact) as tar:
        member = tar.extractfile("remowt/protocol/wire.py")
        assert member is not None and member.read().endswith(b"# changed\n")


def test_default_uses_the_environment_and_builds(
    package_copy: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = os.path.join(str(tmp_path), "env-bundle")
    monkeypatch.setenv("REMOWT_BUNDLE_DIR", directory)
    assert bundle.default_bundle_dir() == directory
    loaded = AgentBundle.default()
    assert (loaded.directory, loaded.platforms) == (directory, [LOCAL])


def test_default_bundle_dir_checkout_then_cache(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOWT_BUNDLE_DIR", raising=False)
    package = os.path.dirname(os.path.dirname(os.path.abspath(bundle.__file__)))  # the remowt package
    monkeypatch.setattr(bundle, "_package_dir", lambda: package)
    checkout = os.path.join(os.path.dirname(package), "agent_bundle")
    assert os.path.isfile(os.path.join(checkout, "README.md")), "this checkout has agent_bundle/README.md"
    assert bundle.default_bundle_dir() == checkout
    installed = os.path.join(str(tmp_path), "site-packages", "remowt")
    monkeypatch.setattr(bundle, "_package_dir", lambda: installed)
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(str(tmp_path), "xdg"))
    assert bundle.default_bundle_dir() == os.path.join(str(tmp_path), "xdg", "remowt", "bundle")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bundle.default_bundle_dir() == os.path.join(str(tmp_path), ".cache", "remowt", "bundle")


def test_concurrent_builders_do_not_corrupt_the_bundle(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(str(tmp_path), "shared")

    def builder(n: int) -> object:
        if n % 2:
            return bundle.build_local(directory)
        bundle.refresh(directory)
        return AgentBundle.from_dir(directory)

    results = run_together(builder, 4, 30)
    digest = AgentBundle.from_dir(directory).hashes[LOCAL]
    assert [results[n] for n in (1, 3)] == [digest, digest]
    for n in (0, 2):
        loaded = results[n]
        assert isinstance(loaded, AgentBundle) and loaded.hashes == {LOCAL: digest}, loaded
    assert not [name for name in os.listdir(directory) if name.startswith(".tmp-")]


def test_unwritable_bundle_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    blocker = os.path.join(str(tmp_path), "file")
    write(blocker, "")
    with pytest.raises(BundleError, match=f"cannot create the agent bundle {blocker}/b"):
        bundle.build_local(os.path.join(blocker, "b"))


# --- other platforms, through pip -----------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REMOWT, "bundle", *args], capture_output=True, text=True, timeout=120)


@needs_pypi
def test_add_platform_from_pip_and_rebuild_from_the_kept_wheel(
    copy: str, package_copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = bundle.add_platform(copy, "aarch64-cp39")
    assert added.platform == "aarch64-cp39"
    assert os.path.isfile(added.wheel) and os.path.dirname(added.wheel) == os.path.join(copy, "wheels")
    loaded = AgentBundle.from_dir(copy)
    assert loaded.platforms == sorted([LOCAL, "aarch64-cp39"])
    names = [m.name for m in members(loaded.read_artifact("aarch64-cp39"))]
    assert [n for n in names if n.endswith(".so")] == ["msgspec/_core.cpython-39-aarch64-linux-gnu.so"]
    assert "remowt/agent/main.py" in names and "agent.py" in names
    info = {i.platform: i for i in bundle.describe(copy)}
    assert info["aarch64-cp39"].current and info["aarch64-cp39"].source == f"wheels/{os.path.basename(added.wheel)}"
    # the sources change: both platforms are rebuilt, without pip (which would fail now)
    monkeypatch.setattr(bundle, "fetch_msgspec_wheel", None)
    with open(os.path.join(package_copy, "rpc", "router.py"), "a") as f:
        f.write("\n# changed\n")
    assert not any(i.current for i in bundle.describe(copy))
    bundle.refresh(copy)
    rebuilt = AgentBundle.from_dir(copy)
    assert all(rebuilt.hashes[p] != loaded.hashes[p] for p in rebuilt.platforms)
    assert all(i.current for i in bundle.describe(copy))


@needs_pypi
def test_cli_add_list_and_build(copy: str) -> None:
    result = run_cli("add", "--platform", "aarch64-cp310", "--dir", copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"aarch64-cp310 {AgentBundle.from_dir(copy).hashes['aarch64-cp310']} in {copy}")
    result = run_cli("list", "--dir", copy)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"agent bundle {copy}:"
    assert any(line.startswith("aarch64-cp310 ") and " current " in line for line in lines)


def test_cli_build_and_list(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(str(tmp_path), "cli")
    result = run_cli("build", "--dir", directory)
    assert result.returncode == 0, result.stderr
    digest = AgentBundle.from_dir(directory).hashes[LOCAL]
    assert result.stdout == f"{LOCAL} {digest} in {directory}\n"
    result = run_cli("list", "--dir", directory)
    assert (result.returncode, result.stderr) == (0, "")
    assert f"{LOCAL:<16} {digest}  current  msgspec " in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--dir", "/nonexistent/remowt-bundle"], "agent bundle /nonexistent/remowt-bundle does not exist"),
        (["add", "--platform", "arm64"], "'arm64' is not a platform"),
        (["add", "--platform", "x86_64-pp39"], "for CPython platforms \\(cpXY\\) only"),
    ],
)
def test_cli_errors(args: List[str], message: str, tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(str(tmp_path), "untouched")
    result = run_cli(*args, *(["--dir", directory] if args[0] == "add" else []))
    assert not os.path.exists(directory)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("remowt: ")
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize("action", [[], ["build"], ["add"], ["list"]])
def test_cli_help(action: List[str]) -> None:
    result = run_cli(*action, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: remowt bundle")
    if action == ["add"]:
        assert "--platform PLATFORM" in result.stdout and "aarch64-cp39" in result.stdout


def test_the_default_bundle_directory_is_made_private_whatever_the_umask(tmp_path: os.PathLike[str]) -> None:
    """Others must not write what is deployed: the directories made for the bundle are 0700 under umask 000."""
    cache = os.path.join(str(tmp_path), "xdg")
    probe = "from remowt.deploy.bundle import AgentBundle; print(AgentBundle.default().directory)"
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    env.pop("REMOWT_BUNDLE_DIR", None)
    installed = os.path.join(str(tmp_path), "site")  # an installed remowt: no checkout around it
    shutil.copytree(
        os.path.dirname(os.path.dirname(os.path.abspath(bundle.__file__))), os.path.join(installed, "remowt")
    )
    env["PYTHONPATH"] = installed
    result = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$@"', "sh", sys.executable, "-c", probe],
        env=env,
        cwd=installed,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    directory = os.path.join(cache, "remowt", "bundle")
    assert result.stdout.strip() == directory
    for path in (cache, os.path.dirname(directory), directory, os.path.join(directory, "wheels")):
        if os.path.exists(path):
            assert os.stat(path).st_mode & 0o777 == 0o700, path
