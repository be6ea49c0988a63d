"""The agent bundle: what is deployed to a target, one content-addressed artifact per platform.

A bundle is a directory with a ``hashes`` file (one ``<platform> <sha256>``
line per platform; platform = ``uname -m`` machine + Python tag, e.g.
``x86_64-cp311``) and one artifact per platform, ``agent-<platform>.tar.gz``:
a deterministic tar of the ``remowt`` package, ``msgspec`` built for that
platform and the entry script ``agent.py``, with the bytecode of every module
when the platform's Python is the one building it (see :func:`with_bytecode`).
The same inputs give the same bytes, so the same sha256 and the same cache
directory on the target. ``trees`` holds, for each artifact's sha256, the
digest of the tree it unpacks to (:mod:`remowt.deploy.tree`), which the
target checks before every start.

Plugins (:mod:`remowt.deploy.plugins`) ship inside every artifact, under
``remowt-plugins/``: those whose sources the bundle's ``plugins`` file lists
(``remowt bundle build --plugin``), and those a connection adds for itself
(:meth:`AgentBundle.with_plugins`, an artifact kept in memory).

``sources.json`` records how each artifact was made (from what is installed
here, or from a msgspec wheel kept under ``wheels/``) and a fingerprint of its
inputs (paths, sizes, mtimes), so :meth:`AgentBundle.default` rebuilds stale
artifacts without the network and costs about a millisecond when nothing
changed. Writers hold an exclusive ``flock`` on ``.lock`` and replace files
atomically; readers hold a shared one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import marshal
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Collection, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..errors import RemowtError
from ..runtime.real_subprocess import Popen as LocalPopen
from .local import PLUGINS
from .plugins import PluginFile, PluginSourceError, Source, fingerprint, plugin_files
from .tree import artifact_digest

BUNDLE_DIR_ENV = "REMOWT_BUNDLE_DIR"
HASHES = "hashes"
TREES = "trees"
SOURCES = "sources.json"
PLUGIN_SOURCES = "plugins"
WHEELS = "wheels"
LOCK = ".lock"
INSTALLED = "installed"
ENTRY_NAME = "agent.py"
# part of every fingerprint: bump it when the artifact's layout changes
FORMAT = "remowt-agent-artifact/2"
IMPLEMENTATION_TAGS = {"cpython": "cp", "pypy": "pp"}
PIP_TIMEOUT = 300.0
log = logging.getLogger("remowt.bundle")

ENTRY = '''\
"""Start the remowt agent from this directory: python3 -I -S agent.py real-agent [--privileged]."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from remowt.agent.main import main

main(sys.argv[1:])
'''

_PLATFORM_RE = re.compile(r"([A-Za-z0-9_]+)-([a-z]+)([0-9])([0-9]+)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_WHEEL_SOURCE_RE = re.compile(r"wheels/msgspec-[^/]+\.whl")


class BundleError(RemowtError):
    """The agent bundle is missing, malformed, or cannot be built."""


class Platform(NamedTuple):
    """A platform string taken apart: ``aarch64-cp39`` is ``("aarch64", "cp", 3, 9)``."""

    machine: str
    implementation: str
    major: int
    minor: int


def parse_platform(platform: str) -> Platform:
    """Split ``<machine>-<python tag>``; a :class:`BundleError` names a malformed one."""
    match = _PLATFORM_RE.fullmatch(platform)
    if match is None:
        raise BundleError(
            f"{platform!r} is not a platform: expected <uname -m machine>-<python tag>, "
            "like x86_64-cp311 or aarch64-cp39"
        )
    machine, implementation, major, minor = match.groups()
    return Platform(machine, implementation, int(major), int(minor))


def local_platform() -> str:
    """The platform of the running interpreter, e.g. ``x86_64-cp311`` (computed the same way on the target)."""
    name = sys.implementation.name
    return f"{os.uname().machine}-{IMPLEMENTATION_TAGS.get(name, name)}{sys.version_info[0]}{sys.version_info[1]}"


def artifact_name(platform: str) -> str:
    """The artifact's file name inside the bundle directory."""
    return f"agent-{platform}.tar.gz"


def _package_dir() -> str:
    """The ``remowt`` package's directory (this module is in its ``deploy`` package)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_bundle_dir() -> str:
    """``$REMOWT_BUNDLE_DIR``; else the checkout's ``agent_bundle/`` when running from a source tree;
    else ``$XDG_CACHE_HOME/remowt/bundle`` (``~/.cache/remowt/bundle``)."""
    configured = os.environ.get(BUNDLE_DIR_ENV)
    if configured:
        return os.path.abspath(configured)
    checkout = os.path.join(os.path.dirname(_package_dir()), "agent_bundle")
    if os.path.isfile(os.path.join(checkout, "README.md")):
        return checkout
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "remowt", "bundle")


def _rebuild_hint(directory: str, platform: str) -> str:
    where = shlex.quote(directory)
    if platform == local_platform():
        return f"remowt bundle build --dir {where}"
    return f"remowt bundle add --platform {platform} --dir {where}"


# --- the bundle directory --------------------------------------------------


@contextlib.contextmanager
def _locked(directory: str, exclusive: bool) -> Iterator[None]:
    """Hold the bundle's lock; a read-only bundle without a lock file cannot have writers, so it needs none."""
    path = os.path.join(directory, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if exclusive:
            raise BundleError(f"cannot write the agent bundle {directory}: {e.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _make_private(directory: str) -> None:
    """Make ``directory`` and its missing parents, each private to this user (0700) whatever the umask."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(directory) and parent != directory:
        _make_private(parent)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            return
        os.chmod(directory, 0o700)


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_hashes(text: str, path: str) -> Dict[str, str]:
    """The platform → sha256 map of a ``hashes`` file; blank lines and ``#`` comments are skipped."""
    hashes: Dict[str, str] = {}
    first_line: Dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise BundleError(f"{path} line {number}: expected '<platform> <sha256>', got {line!r}")
        platform, digest = fields
        if _PLATFORM_RE.fullmatch(platform) is None:
            raise BundleError(f"{path} line {number}: {platform!r} is not a platform like x86_64-cp311")
        if _SHA256_RE.fullmatch(digest) is None:
            raise BundleError(f"{path} line {number}: {digest!r} is not a sha256 (64 lowercase hex digits)")
        if platform in hashes:
            first = first_line[platform]
            raise BundleError(f"{path} line {number}: platform {platform} is listed twice (first on line {first})")
        hashes[platform] = digest
        first_line[platform] = number
    return hashes


def _format_hashes(hashes: Mapping[str, str]) -> bytes:
    return "".join(f"{platform} {hashes[platform]}\n" for platform in sorted(hashes)).encode()


def _read_hashes(directory: str, missing_ok: bool) -> Dict[str, str]:
    path = os.path.join(directory, HASHES)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise BundleError(
            f"agent bundle {directory} has no {HASHES} file; "
            f"build one with: remowt bundle build --dir {shlex.quote(directory)}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    return parse_hashes(text, path)


def _read_trees(directory: str) -> Dict[str, str]:
    """Artifact sha256 → tree digest, as recorded when the artifacts were built; {} for a bundle made elsewhere."""
    path = os.path.join(directory, TREES)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    trees = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not all(_SHA256_RE.fullmatch(field) for field in fields):
            raise BundleError(f"{path} line {number}: expected '<artifact sha256> <tree sha256>', got {line!r}")
        trees[fields[0]] = fields[1]
    return trees


def _read_sources(directory: str) -> Dict[str, Dict[str, str]]:
    """How each artifact was made (see the module docstring); {} for a bundle made elsewhere."""
    path = os.path.join(directory, SOURCES)
    rebuild = f"rebuild with: remowt bundle build --dir {shlex.quote(directory)}"
    try:
        with open(path, encoding="utf-8") as f:
            sources = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path}: {e}; {rebuild}") from None
    fields = {"source", "fingerprint", "sha256", "msgspec"}
    valid = isinstance(sources, dict) and all(
        isinstance(record, dict)
        and set(record) == fields
        and all(isinstance(value, str) for value in record.values())
        and (record["source"] == INSTALLED or _WHEEL_SOURCE_RE.fullmatch(record["source"]))
        for record in sources.values()
    )
    if not valid:
        raise BundleError(f"{path} is not a bundle sources file; {rebuild}")
    records: Dict[str, Dict[str, str]] = sources
    return records


class AgentBundle:
    """A validated bundle: its directory, the sha256 of each platform's artifact and the digest of its tree."""

    def __init__(
        self,
        directory: str,
        hashes: Mapping[str, str],
        trees: Mapping[str, str],
        artifacts: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        self.directory = directory
        self.hashes: Dict[str, str] = dict(hashes)
        self.trees: Dict[str, str] = dict(trees)
        #: Artifacts made in memory (:meth:`with_plugins`), by platform; the others are read from the directory.
        self.artifacts: Dict[str, bytes] = dict(artifacts or {})

    def __repr__(self) -> str:
        return f"<AgentBundle {self.directory} {' '.join(sorted(self.hashes))}>"

    @classmethod
    def from_dir(cls, directory: str) -> AgentBundle:
        """Read and check a bundle directory: its ``hashes`` file and every artifact's sha256."""
        directory = os.path.abspath(directory)
        if not os.path.isdir(directory):
            raise BundleError(
                f"agent bundle {directory} does not exist or is not a directory; "
                f"build one with: remowt bundle build --dir {shlex.quote(directory)}"
            )
        with _locked(directory, exclusive=False):
            hashes = _read_hashes(directory, missing_ok=False)
            if not hashes:
                raise BundleError(
                    f"agent bundle {directory} lists no platforms in {HASHES}; "
                    f"build one with: remowt bundle build --dir {shlex.quote(directory)}"
                )
            recorded = _read_trees(directory)
            bundle = cls(directory, hashes, {})
            for platform in sorted(hashes):
                data = bundle._check(platform)
                tree = recorded.get(hashes[platform])
                bundle.trees[platform] = (
                    tree if tree is not None else _tree_digest(data, bundle.artifact_path(platform))
                )
        return bundle

    @classmethod
    def default(cls) -> AgentBundle:
        """The bundle in :func:`default_bundle_dir`, with the local platform's artifact built and current."""
        directory = default_bundle_dir()
        refresh(directory)
        return cls.from_dir(directory)

    @property
    def platforms(self) -> List[str]:
        return sorted(self.hashes)

    def artifact_path(self, platform: str) -> str:
        return os.path.join(self.directory, artifact_name(platform))

    def _check(self, platform: str) -> bytes:
        path = self.artifact_path(platform)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BundleError(
                f"agent bundle {self.directory}: the artifact for {platform}, {artifact_name(platform)}, is missing; "
                f"rebuild it with: {_rebuild_hint(self.directory, platform)}"
            ) from None
        except OSError as e:
            raise BundleError(f"cannot read {path}: {e.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.hashes[platform]:
            raise BundleError(
                f"agent bundle {self.directory}: {artifact_name(platform)} has sha256 {actual} but {HASHES} says "
                f"{self.hashes[platform]} (changed or corrupted); "
                f"rebuild it with: {_rebuild_hint(self.directory, platform)}"
            )
        return data

    def read_artifact(self, platform: str) -> bytes:
        """The artifact's bytes, checked against the sha256 this bundle was loaded with."""
        if platform not in self.hashes:
            raise BundleError(f"platform {platform} is missing from bundle {self.directory}")
        if platform in self.artifacts:
            return self.artifacts[platform]
        with _locked(self.directory, exclusive=False):
            return self._check(platform)

    def with_plugins(self, sources: Sequence[Source]) -> AgentBundle:
        """This bundle with the plugins of ``sources`` added to every artifact (made in memory, kept for reuse).

        Each artifact gets a new sha256 and tree digest, so a target caches
        the agent with these plugins beside the one without, and a plugin's
        name always means the code sent. A source that cannot be shipped is
        a :class:`~remowt.deploy.plugins.PluginSourceError`.
        """
        files = plugin_files(sources)
        if not files:
            return self
        key = fingerprint(files)
        hashes, trees, artifacts = {}, {}, {}
        for platform in self.platforms:
            made = _shipped.get((self.hashes[platform], key))
            if made is None:
                data = add_plugins(self.read_artifact(platform), files)
                made = (data, hashlib.sha256(data).hexdigest(), _tree_digest(data, artifact_name(platform)))
                while len(_shipped) >= _SHIPPED_KEPT:
                    del _shipped[next(iter(_shipped))]
                _shipped[(self.hashes[platform], key)] = made
            artifacts[platform], hashes[platform], trees[platform] = made
        return AgentBundle(self.directory, hashes, trees, artifacts)


def _tree_digest(artifact: bytes, path: str) -> str:
    try:
        return artifact_digest(artifact)
    except (OSError, ValueError, tarfile.TarError) as e:
        raise BundleError(f"{path} is not an agent artifact: {e}") from None


# --- building --------------------------------------------------------------


def build_artifact(files: Sequence[Tuple[str, bytes]], executables: Collection[str] = ()) -> bytes:
    """A deterministic ``tar.gz`` of ``files`` (archive name, content).

    Entries are sorted, parent directories are made explicit, times and owners
    are zero, modes are 0755 for directories, extension modules and the names
    in ``executables`` and 0644 otherwise, and the gzip header carries no name
    or time.
    """
    entries: Dict[str, Optional[bytes]] = {}
    for name, data in files:
        parts = name.split("/")
        if name.startswith("/") or "" in parts or ".." in parts:
            raise BundleError(f"bad archive member name {name!r}")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), None)
        entries[name] = data
    raw = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, content in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o755 if name.endswith(".so") or name in executables else 0o644
                tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def builds_bytecode(platform: str) -> bool:
    """Whether ``platform``'s Python is this one (its version and implementation), so its bytecode can be built here."""
    parsed = parse_platform(platform)
    name = sys.implementation.name
    here = (IMPLEMENTATION_TAGS.get(name, name), sys.version_info[0], sys.version_info[1])
    return (parsed.implementation, parsed.major, parsed.minor) == here


def with_bytecode(files: Sequence[Tuple[str, bytes]]) -> List[Tuple[str, bytes]]:
    """``files`` and the bytecode of each module in them, as this Python imports it from ``__pycache__``.

    The ``.pyc`` files are unchecked-hash ones (PEP 552): Python loads them
    without looking at the source, which is right here because the target
    verifies the whole tree before the agent runs, and the agent writes no
    bytecode of its own (``-B``). The entry script is run, not imported.
    """
    out = list(files)
    for name, source in files:
        directory, _, module = name.rpartition("/")
        if not name.endswith(".py") or not directory:
            continue
        code = compile(source, name, "exec", dont_inherit=True, optimize=0)
        header = importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little") + importlib.util.source_hash(source)
        out.append(
            (f"{directory}/__pycache__/{module[:-3]}.{sys.implementation.cache_tag}.pyc", header + marshal.dumps(code))
        )
    return out


def _tree(root: str, prefix: str, suffixes: Tuple[str, ...]) -> List[Tuple[str, str]]:
    """(archive name, path) of the files under ``root`` ending in ``suffixes``, without caches, sorted."""
    found: List[Tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            if name.endswith(suffixes):
                found.append(("/".join([prefix, *parts, name]), os.path.join(dirpath, name)))
    return found


def _stats(files: Sequence[Tuple[str, str]]) -> List[Tuple[str, int, int]]:
    out = []
    for name, path in files:
        st = os.stat(path)
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def _read_files(files: Sequence[Tuple[str, str]]) -> List[Tuple[str, bytes]]:
    out = []
    for name, path in files:
        with open(path, "rb") as f:
            out.append((name, f.read()))
    return out


def _wheel_version(source: str) -> str:
    return os.path.basename(source).split("-")[1]


def _wheel_files(path: str) -> List[Tuple[str, bytes]]:
    """The msgspec package inside a wheel: its ``.py`` files and extension modules."""
    try:
        with zipfile.ZipFile(path) as wheel:
            files = [
                (name, wheel.read(name))
                for name in sorted(wheel.namelist())
                if name.startswith("msgspec/") and name.endswith((".py", ".so")) and "/__pycache__/" not in name
            ]
    except (OSError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read the wheel {path}: {e}") from None
    if not any(name.endswith(".so") for name, _ in files):
        raise BundleError(f"{path} holds no msgspec extension module: it is not a binary msgspec wheel")
    return files


class _Recipe:
    """How one platform's artifact is made, and a fingerprint of its inputs (stats only, no reads)."""

    def __init__(
        self,
        directory: str,
        platform: str,
        source: str,
        remowt_files: Sequence[Tuple[str, str]],
        plugins: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.platform = platform
        self.source = source
        self.remowt_files = remowt_files
        self.plugins = plugins
        self.msgspec_files: List[Tuple[str, str]] = []
        if source == INSTALLED:
            import msgspec

            self.msgspec_version = msgspec.__version__
            msgspec_dir = os.path.dirname(os.path.abspath(msgspec.__file__))
            self.msgspec_files = _tree(msgspec_dir, "msgspec", (".py", ".so"))
            inputs: object = _stats(self.msgspec_files)
        else:
            self.wheel = os.path.join(directory, source)
            self.msgspec_version = _wheel_version(source)
            try:
                st = os.stat(self.wheel)
            except OSError:
                raise BundleError(
                    f"the msgspec wheel {self.wheel} that {platform} was built from is gone; "
                    f"add the platform again with: {_rebuild_hint(directory, platform)}"
                ) from None
            inputs = [source, st.st_size, st.st_mtime_ns]
        blob = json.dumps([FORMAT, ENTRY, platform, source, _stats(remowt_files), inputs, _plugin_stats(plugins)])
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()

    def build(self) -> bytes:
        files = _read_files(self.remowt_files)
        if self.source == INSTALLED:
            files += _read_files(self.msgspec_files)
        else:
            files += _wheel_files(self.wheel)
        files.append((ENTRY_NAME, ENTRY.encode()))
        files = with_bytecode(files) if builds_bytecode(self.platform) else files
        shipped = _plugin_files(self.plugins, self.directory)
        return build_artifact(files + [(f.name, f.data) for f in shipped], [f.name for f in shipped if f.executable])

    def record(self, digest: str) -> Dict[str, str]:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "sha256": digest,
            "msgspec": self.msgspec_version,
        }


# The modules only the user's side runs (the client, its transports, the CLI): left out of the artifact, so that a
# target stores and verifies at every start about 40% less. tests/test_bundle.py checks that no module the agent,
# its services or the plugin SDK import (at any depth, lazily too) is one of them.
CLIENT_ONLY = (
    "remowt/__main__.py",
    "remowt/cli.py",
    "remowt/deploy/bundle.py",
    "remowt/deploy/plugins.py",
    "remowt/deploy/remote.py",
    "remowt/transports/hostkeys.py",
    "remowt/transports/loopback.py",
    "remowt/transports/readahead.py",
    "remowt/transports/ssh.py",
    "remowt/transports/sshconfig.py",
    "remowt/user/",
)


def _remowt_files() -> List[Tuple[str, str]]:
    files = _tree(_package_dir(), "remowt", (".py",))
    return [(name, path) for name, path in files if not name.startswith(CLIENT_ONLY)]


def _current(
    directory: str, recipe: _Recipe, sources: Mapping[str, Mapping[str, str]], hashes: Mapping[str, str]
) -> bool:
    """Whether the recorded artifact of ``recipe.platform`` was made from the inputs it has now."""
    record = sources.get(recipe.platform)
    return (
        record is not None
        and record["fingerprint"] == recipe.fingerprint
        and record["sha256"] == hashes.get(recipe.platform)
        and os.path.isfile(os.path.join(directory, artifact_name(recipe.platform)))
    )


def _make(
    directory: str, wanted: Mapping[str, str], force: bool, plugins: Optional[Sequence[str]] = None
) -> Dict[str, str]:
    """Under the lock, build each platform of ``wanted`` (platform → source) whose inputs changed.

    With ``force``, build them all; with ``plugins`` (absolute paths), record
    them as the plugin sources first. Returns the bundle's hashes afterwards.
    """
    try:
        _make_private(directory)
    except OSError as e:
        raise BundleError(f"cannot create the agent bundle {directory}: {e.strerror}") from None
    with _locked(directory, exclusive=True):
        if plugins is not None:
            _plugin_files(plugins, None)  # refused before anything changes
            try:
                _write_atomic(os.path.join(directory, PLUGIN_SOURCES), "".join(f"{p}\n" for p in plugins).encode())
            except OSError as e:
                raise BundleError(f"cannot write the agent bundle {directory}: {e.strerror}") from None
        hashes = _read_hashes(directory, missing_ok=True)
        sources = _read_sources(directory)
        trees = _read_trees(directory)
        remowt_files = _remowt_files()
        shipped = read_plugin_sources(directory)
        changed = False
        for platform in sorted(wanted):
            recipe = _Recipe(directory, platform, wanted[platform], remowt_files, shipped)
            if not force and _current(directory, recipe, sources, hashes):
                continue
            data = recipe.build()
            digest = hashlib.sha256(data).hexdigest()
            try:
                _write_atomic(os.path.join(directory, artifact_name(platform)), data)
            except OSError as e:
                raise BundleError(f"cannot write the agent bundle {directory}: {e.strerror}") from None
            hashes[platform] = digest
            sources[platform] = recipe.record(digest)
            trees[digest] = _tree_digest(data, artifact_name(platform))
            changed = True
        if changed:
            kept = "".join(f"{digest} {trees[digest]}\n" for digest in sorted(set(hashes.values())) if digest in trees)
            try:
                _write_atomic(os.path.join(directory, TREES), kept.encode())
                _write_atomic(os.path.join(directory, HASHES), _format_hashes(hashes))
                _write_atomic(os.path.join(directory, SOURCES), json.dumps(sources, indent=1, sort_keys=True).encode())
            except OSError as e:
                raise BundleError(f"cannot write the agent bundle {directory}: {e.strerror}") from None
        return hashes


def refresh(directory: str) -> None:
    """Make sure the local platform's artifact exists, and rebuild every artifact whose inputs changed.

    An artifact is rebuilt from its recorded source (what is installed, or its
    stored wheel), so no network is needed. Artifacts this bundle did not
    make itself, and those built from another interpreter's installed
    msgspec, are left alone. When nothing changed this only stats files.
    """
    local = local_platform()
    hashes = _read_hashes(directory, missing_ok=True)
    sources = _read_sources(directory)
    wanted = {
        platform: record["source"]
        for platform, record in sources.items()
        if platform in hashes and (record["source"] != INSTALLED or platform == local)
    }
    wanted.setdefault(local, INSTALLED)
    remowt_files = _remowt_files()
    shipped = read_plugin_sources(directory)
    stale = {}
    for platform, source in wanted.items():
        try:
            recipe = _Recipe(directory, platform, source, remowt_files, shipped)
            if not _current(directory, recipe, sources, hashes):
                stale[platform] = source
        except BundleError as e:
            if platform == local:
                raise
            log.warning("agent bundle: leaving %s as it is: %s", platform, e)
    if stale:
        _make(directory, stale, force=False)


def build_local(directory: str, plugins: Optional[Sequence[Source]] = None) -> str:
    """(Re)build the running interpreter's platform from the installed remowt and msgspec; return its sha256.

    ``plugins`` (sources, see :mod:`remowt.deploy.plugins`) become the plugins
    every artifact ships, the other platforms' artifacts rebuilt with them
    ([]: none); None keeps the ones recorded.
    """
    platform = local_platform()
    paths = None if plugins is None else [os.path.abspath(os.fspath(source)) for source in plugins]
    digest = _make(directory, {platform: INSTALLED}, force=True, plugins=paths)[platform]
    if paths is not None:
        refresh(directory)
    return digest


def _msgspec_requirement(version: Optional[str]) -> str:
    if version:
        return f"msgspec=={version}"
    import msgspec

    return f"msgspec<={msgspec.__version__}"


def _addable(platform: str) -> Platform:
    parsed = parse_platform(platform)
    if parsed.implementation != "cp":
        raise BundleError(f"cannot add {platform}: msgspec wheels are fetched for CPython platforms (cpXY) only")
    return parsed


def fetch_msgspec_wheel(platform: str, dest: str, version: Optional[str] = None) -> str:
    """Download a manylinux msgspec wheel for ``platform`` into ``dest`` with pip; return its path.

    Without ``version``, the newest release not newer than the installed one
    that has a wheel for that Python (msgspec drops old Pythons over time).
    """
    machine, _, major, minor = _addable(platform)
    requirement = _msgspec_requirement(version)
    argv = [sys.executable, "-m", "pip", "download", requirement, "--only-binary=:all:", "--no-deps"]
    argv += ["--implementation", "cp", "--python-version", f"{major}.{minor}", "--dest", dest]
    argv += ["--disable-pip-version-check", "--quiet"]
    for tag in ("manylinux_2_17", "manylinux2014", "manylinux_2_28"):
        argv += ["--platform", f"{tag}_{machine}"]
    try:
        pip = LocalPopen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        raise BundleError(f"cannot run pip to fetch msgspec for {platform}: {e}") from None
    try:
        output, _ = pip.communicate(timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pip.kill()
        pip.communicate()
        raise BundleError(f"pip did not fetch msgspec for {platform} within {PIP_TIMEOUT:g} s") from None
    wheels = [name for name in os.listdir(dest) if name.startswith("msgspec-") and name.endswith(".whl")]
    if pip.returncode != 0 or len(wheels) != 1:
        tail = "\n".join(output.decode("utf-8", "replace").strip().splitlines()[-8:])
        raise BundleError(f"pip could not fetch a msgspec wheel ({requirement}) for {platform}:\n{tail}")
    return os.path.join(dest, wheels[0])


class Added(NamedTuple):
    """What :func:`add_platform` built."""

    platform: str
    sha256: str
    msgspec_version: str
    wheel: str


def add_platform(directory: str, platform: str, msgspec_version: Optional[str] = None) -> Added:
    """Fetch msgspec for ``platform`` with pip, keep the wheel under ``wheels/``, and build that platform's artifact."""
    _addable(platform)
    wheels = os.path.join(directory, WHEELS)
    try:
        _make_private(wheels)
        download = tempfile.mkdtemp(prefix=".tmp-pip-", dir=directory)
    except OSError as e:
        raise BundleError(f"cannot write the agent bundle {directory}: {e.strerror}") from None
    try:
        fetched = fetch_msgspec_wheel(platform, download, msgspec_version)
        name = os.path.basename(fetched)
        os.replace(fetched, os.path.join(wheels, name))
    finally:
        shutil.rmtree(download, ignore_errors=True)
    source = f"{WHEELS}/{name}"
    digest = _make(directory, {platform: source}, force=True)[platform]
    return Added(platform, digest, _wheel_version(source), os.path.join(wheels, name))


class PlatformInfo(NamedTuple):
    """One line of ``remowt bundle list``."""

    platform: str
    sha256: str
    msgspec_version: Optional[str]
    source: Optional[str]
    current: Optional[bool]


def describe(directory: str) -> List[PlatformInfo]:
    """Each platform of a valid bundle: hash, msgspec version, source, and whether its inputs changed since."""
    bundle = AgentBundle.from_dir(directory)
    sources = _read_sources(bundle.directory)
    remowt_files = _remowt_files()
    shipped = read_plugin_sources(bundle.directory)
    out = []
    for platform in bundle.platforms:
        record = sources.get(platform)
        if record is None or record["sha256"] != bundle.hashes[platform]:
            out.append(PlatformInfo(platform, bundle.hashes[platform], None, None, None))
            continue
        if record["source"] == INSTALLED and platform != local_platform():
            out.append(PlatformInfo(platform, bundle.hashes[platform], record["msgspec"], INSTALLED, None))
            continue
        try:
            recipe = _Recipe(bundle.directory, platform, record["source"], remowt_files, shipped)
            current: Optional[bool] = _current(bundle.directory, recipe, sources, bundle.hashes)
        except BundleError:
            current = False
        out.append(PlatformInfo(platform, bundle.hashes[platform], record["msgspec"], record["source"], current))
    return out


# --- plugins -----------------------------------------------------------------


def _plugin_files(sources: Sequence[Source], recorded_in: Optional[str]) -> List[PluginFile]:
    """The files of plugin ``sources``; a :class:`BundleError` when one cannot be shipped.

    ``recorded_in``: the bundle whose ``plugins`` file lists them (the error says how to drop them).
    """
    try:
        return plugin_files(sources)
    except PluginSourceError as e:
        hint = (
            f"; ship others with: remowt bundle build --dir {shlex.quote(recorded_in)} --plugin SRC ... "
            f"(or --no-plugins)"
            if recorded_in
            else ""
        )
        raise BundleError(f"{e}{hint}") from None


def _plugin_stats(sources: Sequence[str]) -> List[object]:
    """Paths, sizes and mtimes of the plugin sources' files (a source that is gone: its path alone)."""
    out: List[object] = []
    for source in sources:
        if os.path.isdir(source):
            out.append(_stats(_tree(source, source, ("",))))
        elif os.path.exists(source):
            out.append(_stats([(source, source)]))
        else:
            out.append(source)
    return out


def read_plugin_sources(directory: str) -> List[str]:
    """The plugin sources a bundle ships in every artifact (its ``plugins`` file: one absolute path a line)."""
    path = os.path.join(directory, PLUGIN_SOURCES)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    sources = [line for line in lines if line]
    for source in sources:
        if not os.path.isabs(source):
            raise BundleError(f"{path}: plugin sources are absolute paths, got {source!r}")
    return sources


def add_plugins(artifact: bytes, files: Sequence[PluginFile]) -> bytes:
    """``artifact`` with the plugins of ``files`` in it (replacing plugins of the same names it had)."""
    names = {file.name.split("/")[1] for file in files}
    kept: List[Tuple[str, bytes]] = []
    executables = {file.name for file in files if file.executable}
    with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or (parts[0] == PLUGINS and len(parts) > 1 and _plugin_of(parts[1]) in names):
                continue
            content = tar.extractfile(member)
            assert content is not None
            kept.append((member.name, content.read()))
            if member.mode & 0o100:
                executables.add(member.name)
    return build_artifact(kept + [(file.name, file.data) for file in files], executables)


def _plugin_of(entry: str) -> str:
    """The plugin name of an entry in the plugins directory (``name``, ``name.py``)."""
    return entry[:-3] if entry.endswith(".py") else entry


_shipped: Dict[Tuple[str, str], Tuple[bytes, str, str]] = {}  # (artifact sha256, plugins) -> artifact, sha256, tree
_SHIPPED_KEPT = 8
