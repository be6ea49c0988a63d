"""Plugins shipped with the agent: what a plugin source is, the files it becomes, and a local copy of them.

A source is a Python package (a directory with ``__main__.py``: shipped
whole, run as ``python -m <dir name>``), a Python module (``name.py``: run
as ``python -m name``) or any other executable file (executed as it is).
They land in :data:`~remowt.deploy.local.PLUGINS` of the agent's tree, under
their own names, so the tree digest covers them like the agent's code.
A local agent (and the loopback) runs the client's own code, not a tree: it
gets a private copy of the same files (:func:`stage`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple, Union

from ..errors import RemowtError
from .local import PLUGIN_NAME, PLUGINS, PYTHON_PLUGIN_NAME

Source = Union[str, "os.PathLike[str]"]
STAGE_PREFIX = "remowt-plugins-"


class PluginSourceError(RemowtError, ValueError):
    """A plugin source cannot be shipped: missing, not executable, badly named, or two with one name."""


class PluginFile(NamedTuple):
    """One file of a shipped plugin: its name in the agent's tree, content, and whether it is executable."""

    name: str
    data: bytes
    executable: bool


def _walk(root: str) -> Iterator[Tuple[str, str]]:
    """(relative name, path) of the files under ``root``, without caches and hidden entries, sorted."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(directory, root)
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith((".pyc", ".pyo")):
                yield ("" if rel == "." else rel.replace(os.sep, "/") + "/") + name, os.path.join(directory, name)


def _read(path: str) -> Tuple[bytes, bool]:
    try:
        with open(path, "rb") as f:
            return f.read(), bool(os.fstat(f.fileno()).st_mode & 0o100)
    except OSError as e:
        raise PluginSourceError(f"cannot read the plugin file {path}: {e.strerror}") from None


def plugin_name(source: Source) -> str:
    """The name a source is loaded by: its file name (a module's without ``.py``)."""
    path = os.path.abspath(os.fspath(source))
    base = os.path.basename(path)
    return base[:-3] if base.endswith(".py") and os.path.isfile(path) else base


def plugin_files(sources: Sequence[Source]) -> List[PluginFile]:
    """The files that ``sources`` become in the agent's tree (names under :data:`PLUGINS`), sorted."""
    files: List[PluginFile] = []
    names: Dict[str, str] = {}
    for source in sources:
        path = os.path.abspath(os.fspath(source))
        name = plugin_name(path)
        if not os.path.exists(path):
            raise PluginSourceError(f"plugin source {path} does not exist")
        python = os.path.isdir(path) or path.endswith(".py")
        if PLUGIN_NAME.fullmatch(name) is None or (python and PYTHON_PLUGIN_NAME.fullmatch(name) is None):
            kind = "a Python identifier" if python else "a file name of letters, digits and _ . + -"
            raise PluginSourceError(f"plugin source {path}: its name {name!r} must be {kind}")
        if name in names:
            raise PluginSourceError(f"two plugin sources are named {name!r}: {names[name]} and {path}")
        names[name] = path
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "__main__.py")):
                raise PluginSourceError(f"plugin source {path} is a directory without __main__.py: not runnable")
            for rel, file in _walk(path):
                data, executable = _read(file)
                files.append(PluginFile(f"{PLUGINS}/{name}/{rel}", data, executable))
            continue
        if not os.path.isfile(path):
            raise PluginSourceError(f"plugin source {path} is neither a directory nor a regular file")
        data, executable = _read(path)
        if not python and not executable:
            raise PluginSourceError(f"plugin source {path} is not executable (chmod +x it, or make it a .py module)")
        files.append(PluginFile(f"{PLUGINS}/{os.path.basename(path)}", data, not python or executable))
    return sorted(files)


def fingerprint(files: Sequence[PluginFile]) -> str:
    """A digest of ``files`` (names, contents, modes): what they are, whatever their sources' paths."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{len(file.data)}\0{int(file.executable)}\0".encode())
        digest.update(file.data)
    return digest.hexdigest()


def stage(sources: Sequence[Source]) -> str:
    """A private directory (0700) holding the plugins of ``sources`` as a tree's :data:`PLUGINS` would.

    For an agent that runs the client's own code (local, loopback): give
    its path as ``--plugins``, and :func:`unstage` it when the agent ends.
    """
    files = plugin_files(sources)
    directory = tempfile.mkdtemp(prefix=STAGE_PREFIX)
    try:
        for file in files:
            path = os.path.join(directory, *file.name.split("/")[1:])
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            with open(path, "xb") as f:
                f.write(file.data)
                os.fchmod(f.fileno(), 0o755 if file.executable else 0o644)
    except BaseException:
        unstage(directory)
        raise
    return directory


def unstage(directory: str) -> None:
    """Remove a directory :func:`stage` made."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)
