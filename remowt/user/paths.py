"""Remote paths: ``conn.path("/etc/hosts")``, with :class:`pathlib.Path`'s face, on the node's files service.

A :class:`RemotePath` is a :class:`~pathlib.PurePosixPath` bound to a node:
the pure part (``/``, ``name``, ``parent``, ``suffix`` …) is computed here,
everything that touches the file system is a call of the node's
:class:`~remowt.endpoints.fs.FsApi` (as root on ``conn.privileged``). A
relative path is relative to the agent's working directory. Errors are the
``OSError`` subclass the target's OS raised, with its errno and file name.
``open()`` gives real file objects whose bytes stream, so any size works;
``write_bytes``/``write_text`` replace the file atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import os
import re
import stat as stat_module
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import msgspec

from ..endpoints.fs import BATCH, Entry, FsApi, OpenSpec, ScanSpec, Stat, StatVfs
from ..errors import ConnectionLost, Unreachable
from ..protocol.service import timed
from ..rpc.streams import Stream

if TYPE_CHECKING:
    from .node import Node

#: What names a path segment: text, bytes (``os.fsdecode``d) or a path of either kind.
Segment = Union[str, bytes, "os.PathLike[str]"]
BUFFER_SIZE = 256 * 1024  # the buffered layer of open(): one stream chunk
_IGNORED = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)  # what pathlib's exists() and is_*() take for "no"
_ENTRIES = msgspec.msgpack.Decoder(List[Entry])


def stat_result(st: Stat) -> os.stat_result:
    """``st`` as the ``os.stat_result`` ``os.stat`` gives."""
    seconds = (st.atime_ns // 10**9, st.mtime_ns // 10**9, st.ctime_ns // 10**9)
    extra = {
        "st_atime": st.atime_ns / 1e9,
        "st_mtime": st.mtime_ns / 1e9,
        "st_ctime": st.ctime_ns / 1e9,
        "st_atime_ns": st.atime_ns,
        "st_mtime_ns": st.mtime_ns,
        "st_ctime_ns": st.ctime_ns,
        "st_blksize": st.blksize,
        "st_blocks": st.blocks,
        "st_rdev": st.rdev,
    }
    return os.stat_result((st.mode, st.ino, st.dev, st.nlink, st.uid, st.gid, st.size, *seconds), extra)


def statvfs_result(s: StatVfs) -> os.statvfs_result:
    """``s`` as the ``os.statvfs_result`` ``os.statvfs`` gives."""
    fields = (s.bsize, s.frsize, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.favail, s.flag, s.namemax)
    return os.statvfs_result(fields, {"f_fsid": s.fsid})


def _segment(value: object) -> Union[str, os.PathLike[str]]:
    if isinstance(value, RemotePath):
        return value.pure
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, (str, os.PathLike)):
        return value  # a PathLike[bytes] is refused by PurePosixPath, by name
    raise TypeError(f"a path segment must be str, bytes or a path-like object, got {type(value).__name__}")


class RemotePath:
    """A path on a node, with :class:`pathlib.Path`'s methods where they make sense (see the module docstring)."""

    __slots__ = ("node", "pure")
    node: Node
    pure: PurePosixPath

    def __init__(self, node: Node, *segments: Segment) -> None:
        for segment in segments:
            if isinstance(segment, RemotePath) and segment.node is not node:
                raise ValueError(f"{segment!r} is on another node than {node!r}")
        self.node = node
        self.pure = PurePosixPath(*(_segment(s) for s in segments))

    def _new(self, pure: PurePosixPath) -> RemotePath:
        path = RemotePath.__new__(RemotePath)
        path.node = self.node
        path.pure = pure
        return path

    # --- the pure part ----------------------------------------------------

    def __str__(self) -> str:
        return str(self.pure)

    def __bytes__(self) -> bytes:
        return os.fsencode(str(self.pure))

    def __repr__(self) -> str:
        return f"RemotePath({str(self.pure)!r}, node={self.node.description!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.node is self.node and other.pure == self.pure

    def __hash__(self) -> int:
        return hash((id(self.node), self.pure))

    def __lt__(self, other: RemotePath) -> bool:
        if not isinstance(other, RemotePath) or other.node is not self.node:
            return NotImplemented
        return self.pure < other.pure

    def __truediv__(self, other: Segment) -> RemotePath:
        return self._new(self.pure / _segment(other))

    def joinpath(self, *others: Segment) -> RemotePath:
        return self._new(self.pure.joinpath(*(_segment(o) for o in others)))

    @property
    def name(self) -> str:
        return self.pure.name

    @property
    def suffix(self) -> str:
        return self.pure.suffix

    @property
    def suffixes(self) -> List[str]:
        return self.pure.suffixes

    @property
    def stem(self) -> str:
        return self.pure.stem

    @property
    def parts(self) -> Tuple[str, ...]:
        return self.pure.parts

    @property
    def anchor(self) -> str:
        return self.pure.anchor

    @property
    def parent(self) -> RemotePath:
        return self._new(self.pure.parent)

    @property
    def parents(self) -> Sequence[RemotePath]:
        return [self._new(p) for p in self.pure.parents]

    def is_absolute(self) -> bool:
        return self.pure.is_absolute()

    def as_posix(self) -> str:
        return self.pure.as_posix()

    def with_name(self, name: str) -> RemotePath:
        return self._new(self.pure.with_name(name))

    def with_stem(self, stem: str) -> RemotePath:
        return self._new(self.pure.with_stem(stem))

    def with_suffix(self, suffix: str) -> RemotePath:
        return self._new(self.pure.with_suffix(suffix))

    def relative_to(self, other: Segment) -> PurePosixPath:
        """The pure relative path from ``other`` (a :class:`PurePosixPath`: it is no path on the node by itself)."""
        return self.pure.relative_to(_segment(other))

    def is_relative_to(self, other: Segment) -> bool:
        return self.pure.is_relative_to(_segment(other))

    def match(self, pattern: str) -> bool:
        return self.pure.match(pattern)

    # --- calls ------------------------------------------------------------

    @property
    def _fs(self) -> FsApi:
        return self.node.service(FsApi)

    @property
    def _bytes(self) -> bytes:
        return os.fsencode(str(self.pure))

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat`` of the path on the node (``lstat`` without ``follow_symlinks``)."""
        return stat_result(self._fs.stat(self._bytes, follow_symlinks))

    def lstat(self) -> os.stat_result:
        return self.stat(follow_symlinks=False)

    def _mode(self, follow_symlinks: bool = True) -> Optional[int]:
        """The mode, or None when the path is missing (or names no directory on the way, or loops)."""
        try:
            return self.stat(follow_symlinks=follow_symlinks).st_mode
        except OSError as e:
            if e.errno in _IGNORED:
                return None
            raise

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        return self._mode(follow_symlinks) is not None

    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self._mode() or 0)

    def is_file(self) -> bool:
        return stat_module.S_ISREG(self._mode() or 0)

    def is_symlink(self) -> bool:
        return stat_module.S_ISLNK(self._mode(False) or 0)

    def is_fifo(self) -> bool:
        return stat_module.S_ISFIFO(self._mode() or 0)

    def is_socket(self) -> bool:
        return stat_module.S_ISSOCK(self._mode() or 0)

    def is_block_device(self) -> bool:
        return stat_module.S_ISBLK(self._mode() or 0)

    def is_char_device(self) -> bool:
        return stat_module.S_ISCHR(self._mode() or 0)

    def statvfs(self) -> os.statvfs_result:
        """``os.statvfs`` of the file system the path is on."""
        return statvfs_result(self._fs.statvfs(self._bytes))

    def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
        self._fs.chmod(self._bytes, mode, follow_symlinks)

    def lchmod(self, mode: int) -> None:
        self.chmod(mode, follow_symlinks=False)

    def chown(self, uid: int = -1, gid: int = -1, *, follow_symlinks: bool = True) -> None:
        """``os.chown`` (-1 keeps that id); not in pathlib."""
        self._fs.chown(self._bytes, uid, gid, follow_symlinks)

    def utime(self, times_ns: Optional[Tuple[int, int]] = None, *, follow_symlinks: bool = True) -> None:
        """``os.utime(path, ns=times_ns)`` (None: now); not in pathlib."""
        self._fs.utime(self._bytes, times_ns, follow_symlinks)

    def touch(self, mode: int = 0o666, exist_ok: bool = True) -> None:
        self._fs.touch(self._bytes, mode, exist_ok)

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        self._fs.mkdir(self._bytes, mode, parents, exist_ok)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._fs.remove(self._bytes)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self) -> None:
        self._fs.rmdir(self._bytes)

    def rmtree(self) -> None:
        """Remove the directory and everything in it (symbolic links are removed, not followed); not in pathlib."""
        self._fs.rmtree(self._bytes)

    def rename(self, target: Segment) -> RemotePath:
        """Rename to ``target`` (relative to the agent's working directory, as pathlib's), replacing it."""
        destination = self._new(PurePosixPath(_segment(target)))
        try:
            self._fs.rename(self._bytes, destination._bytes)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(self), None, str(destination)) from None
        return destination

    def replace(self, target: Segment) -> RemotePath:
        return self.rename(target)

    def symlink_to(self, target: Segment, target_is_directory: bool = False) -> None:
        """Make this path a symbolic link to ``target``."""
        name = str(_segment(target))
        try:
            self._fs.symlink(os.fsencode(name), self._bytes)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, name, None, str(self)) from None

    def readlink(self) -> RemotePath:
        return self._new(PurePosixPath(os.fsdecode(self._fs.readlink(self._bytes))))

    def resolve(self, strict: bool = False) -> RemotePath:
        """The absolute path with symbolic links resolved (``os.path.realpath`` on the node)."""
        return self._new(PurePosixPath(os.fsdecode(self._fs.realpath(self._bytes, strict))))

    def absolute(self) -> RemotePath:
        """The path made absolute against the agent's working directory (symbolic links kept)."""
        if self.pure.is_absolute():
            return self
        return self._new(PurePosixPath(os.fsdecode(self._fs.realpath(b".", False))) / self.pure)

    def expanduser(self) -> RemotePath:
        """``~`` and ``~user`` expanded with the node's home directories."""
        if not self.pure.parts or not self.pure.parts[0].startswith("~"):
            return self
        return self._new(PurePosixPath(os.fsdecode(self._fs.expanduser(self._bytes))))

    def home(self) -> RemotePath:
        """The home directory of the user the node runs as."""
        return self._new(PurePosixPath(os.fsdecode(self._fs.expanduser(b"~"))))

    # --- directories ------------------------------------------------------

    def scan(self, *, recursive: bool = False, stat: bool = False) -> List[Entry]:
        """The directory's entries with their types (and ``lstat``); every one below it with ``recursive``.

        Names are relative to this path; a recursive listing does not follow symbolic links.
        """
        node = self.node
        node.service(FsApi)  # the node gets ready: the privileged agent starts on first use
        spec = ScanSpec(path=self._bytes, stream=0, recursive=recursive, stat=stat)
        stream = node.router.open_stream(node.address)
        try:
            stream.close_write()
            args = _SCAN.encode_args((msgspec.structs.replace(spec, stream=stream.sid),), {})
            # not a proxy's call, which would wait for the answer: the node answers once the stream took it all
            pending = node.router.call(node.address, FsApi.namespace, _SCAN.number, args)
            data = stream.readall()
            _SCAN.decode_result(pending.result(node.call_timeout))
        finally:
            stream.close()
        entries: List[Entry] = []
        view = memoryview(data)
        while view:
            (size,) = BATCH.unpack_from(view)
            entries.extend(_ENTRIES.decode(view[BATCH.size : BATCH.size + size]))
            view = view[BATCH.size + size :]
        return entries

    def iterdir(self) -> Iterator[RemotePath]:
        """The directory's entries (listed at once, yielded after)."""
        for entry in self.scan():
            yield self / os.fsdecode(entry.name)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """The paths below this one matching ``pattern``, as :meth:`pathlib.Path.glob` (``**``: any depth)."""
        parts = PurePosixPath(pattern).parts
        if not parts:
            raise ValueError(f"Unacceptable pattern: {pattern!r}")
        if PurePosixPath(pattern).is_absolute():
            raise NotImplementedError("Non-relative patterns are unsupported")
        if parts[-1] == "**":
            parts = (*parts, "")  # a pattern ending in ** matches directories only
        yield from _Globber(self).select(self.pure, parts, set())

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """:meth:`glob` of ``**/pattern``."""
        return self.glob(f"**/{pattern}")

    # --- contents ---------------------------------------------------------

    def open(
        self,
        mode: str = "r",
        buffering: int = -1,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        newline: Optional[str] = None,
    ) -> Any:
        """A file object, as :func:`open` gives (``r``, ``w``, ``a``, ``x``, with ``b`` or ``t``; no ``+``).

        The bytes stream: a reader gets them as they arrive, a writer sends
        them as it goes, and its ``close()`` raises what failed on the node.
        """
        kinds = set(mode)
        if len(mode) != len(kinds) or not kinds <= set("rwaxbt") or len(kinds & set("rwax")) != 1:
            raise ValueError(
                f"invalid mode: {mode!r}" + (" (no '+': remote files are read or written)" if "+" in mode else "")
            )
        binary = "b" in kinds
        if binary and "t" in kinds:
            raise ValueError("can't have text and binary mode at once")
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        if buffering == 0 and not binary:
            raise ValueError("can't have unbuffered text I/O")
        write = {"r": None, "w": "truncate", "a": "append", "x": "exclusive"}[(kinds & set("rwax")).pop()]
        raw = open_raw(self, write)
        if buffering == 0:
            return raw
        size = BUFFER_SIZE if buffering in (-1, 1) else buffering
        buffered: Union[io.BufferedReader, io.BufferedWriter]
        buffered = io.BufferedReader(raw, size) if write is None else io.BufferedWriter(raw, size)
        if binary:
            return buffered
        text = io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline, line_buffering=buffering == 1)
        text.mode = mode  # type: ignore[misc]  # as open() sets it
        return text

    def read_bytes(self) -> bytes:
        with open_raw(self, None) as raw:
            return raw.readall()

    def read_text(self, encoding: Optional[str] = None, errors: Optional[str] = None) -> str:
        with self.open("r", encoding=encoding, errors=errors) as f:
            text: str = f.read()
            return text

    def write_bytes(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Replace the file with ``data`` atomically (a new file beside it, renamed into place), keeping its mode
        and owner; the number of bytes."""
        view = memoryview(data).cast("B")
        write_atomically(self, lambda writer: writer.write(view))
        return len(view)

    def write_text(
        self, data: str, encoding: Optional[str] = None, errors: Optional[str] = None, newline: Optional[str] = None
    ) -> int:
        """:meth:`write_bytes` of ``data`` encoded (newlines translated as ``open()`` would)."""
        if not isinstance(data, str):
            raise TypeError(f"data must be str, not {type(data).__name__}")
        buffer = io.BytesIO()
        with io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline, write_through=True) as text:
            text.write(data)
            self.write_bytes(buffer.getvalue())
        return len(data)


_SCAN = FsApi.methods["scan"]


class RemoteFile(io.RawIOBase):
    """A file on a node, read or written through a stream (the raw layer under ``open()``'s buffered one)."""

    def __init__(self, path: RemotePath, stream: Stream, handle: int, stat: Stat, writing: bool) -> None:
        super().__init__()
        self.name = str(path)
        self.stat = stat_result(stat)
        self._path = path
        self._stream = stream
        self._handle = handle
        self._writing = writing
        self._finished = False
        self._fs = timed(path._fs, None)  # finishing waits for the node's disk, as a local close() does

    def __repr__(self) -> str:
        return f"<RemoteFile {self.name!r} on {self._path.node.description}{' closed' if self.closed else ''}>"

    def readable(self) -> bool:
        return not self._writing

    def writable(self) -> bool:
        return self._writing

    def _finish(self) -> int:
        """The transfer's end at the node: the bytes it moved, or the error that stopped it."""
        self._finished = True
        return self._fs.finish(self._handle)

    def readinto(self, buffer: Any) -> int:
        self._check_readable_open()
        n = self._stream.readinto(memoryview(buffer).cast("B"))
        if n == 0 and not self._finished:
            self._finish()
        return n

    def read(self, size: Optional[int] = -1, /) -> bytes:
        """Up to ``size`` bytes as they arrived (to the end when ``size`` is negative): not copied into a buffer."""
        if size is None or size < 0:
            return self.readall()
        self._check_readable_open()
        data = self._stream.read(size)
        if not data and size and not self._finished:
            self._finish()
        return data

    def readall(self) -> bytes:
        self._check_readable_open()
        data = self._stream.readall()
        if not self._finished:
            self._finish()
        return data

    def _check_readable_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if self._writing:
            raise io.UnsupportedOperation("not readable")

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not self._writing:
            raise io.UnsupportedOperation("not writable")
        view = memoryview(data).cast("B")
        try:
            self._stream.write(view)
        except BrokenPipeError:  # the node stopped writing: say why
            if not self._finished:
                self._finish()
            raise
        return len(view)

    def abort(self) -> None:
        """Close without finishing: an atomic write leaves the file as it was; nothing is asked of the node."""
        if self.closed:
            return
        self._stream.close()
        if not self._finished:
            self._finished = True
            with contextlib.suppress(ConnectionLost, Unreachable):
                self._fs.discard(self._handle)
        super().close()

    def close(self) -> None:
        """A writer: end the stream and wait until the node wrote it all (raising what failed); a reader stops."""
        if self.closed:
            return
        if self._writing and not self._finished:
            try:
                self._stream.close_write()
                self._finish()
            except BaseException:
                self.abort()
                raise
        self.abort()


def open_raw(
    path: RemotePath,
    write: Optional[str],
    *,
    offset: int = 0,
    length: int = -1,
    mode: Optional[int] = None,
    times: Optional[Tuple[int, int]] = None,
) -> RemoteFile:
    """Open ``path`` for a transfer (see :class:`~remowt.endpoints.fs.OpenSpec` for the arguments)."""
    fs = path._fs
    node = path.node
    stream = node.router.open_stream(node.address, one_way=write is not None)
    try:
        if write is None:
            stream.close_write()
        spec = OpenSpec(
            path=path._bytes, stream=stream.sid, write=write, offset=offset, length=length, mode=mode, times=times
        )
        opened = fs.open(spec)
    except BaseException:
        stream.close()
        raise
    return RemoteFile(path, stream, opened.handle, opened.stat, write is not None)


def write_atomically(
    path: RemotePath,
    produce: Callable[[RemoteFile], object],
    *,
    mode: Optional[int] = None,
    times: Optional[Tuple[int, int]] = None,
) -> None:
    """Write ``path`` atomically with what ``produce`` writes; if it raises, the file is left as it was."""
    writer = open_raw(path, "atomic", mode=mode, times=times)
    try:
        produce(writer)
    except BaseException:
        writer.abort()
        raise
    writer.close()


class _Globber:
    """Matches glob patterns against a node's directories, one listing per directory, each listed once."""

    def __init__(self, root: RemotePath) -> None:
        self.root = root
        self._listings: Dict[PurePosixPath, List[Entry]] = {}
        self._trees: Set[PurePosixPath] = set()  # directories whose whole tree is listed

    def entries(self, directory: PurePosixPath) -> List[Entry]:
        """The entries of ``directory`` (none when it cannot be listed, as pathlib's glob)."""
        listing = self._listings.get(directory)
        if listing is None:
            try:
                listing = self.root._new(directory).scan()
            except (PermissionError, FileNotFoundError, NotADirectoryError):
                listing = []
            self._listings[directory] = listing
        return listing

    def walk(self, directory: PurePosixPath) -> Iterator[PurePosixPath]:
        """``directory`` and every directory below it, symbolic links not followed (listed in one call)."""
        if directory not in self._trees:
            try:
                found = self.root._new(directory).scan(recursive=True)
            except (PermissionError, FileNotFoundError, NotADirectoryError):
                found = []
            listings: Dict[PurePosixPath, List[Entry]] = {directory: []}
            for entry in found:
                relative = PurePosixPath(os.fsdecode(entry.name))
                listings.setdefault(directory / relative.parent, []).append(
                    msgspec.structs.replace(entry, name=os.fsencode(relative.name))
                )
                if entry.kind == stat_module.S_IFDIR:
                    listings.setdefault(directory / relative, [])
            for path, listing in listings.items():
                self._listings.setdefault(path, listing)
                self._trees.add(path)
        yield directory
        for entry in self.entries(directory):
            if entry.kind == stat_module.S_IFDIR:
                yield from self.walk(directory / os.fsdecode(entry.name))

    def select(self, directory: PurePosixPath, parts: Sequence[str], seen: Set[PurePosixPath]) -> Iterator[RemotePath]:
        part, rest = parts[0], parts[1:]
        if part == "**":
            for below in self.walk(directory):
                yield from self.select(below, rest, seen) if rest else self._once(below, seen)
            return
        if part == "":  # after a final **: the directory itself
            yield from self._once(directory, seen)
            return
        if not _is_wildcard(part):
            candidate = directory / part
            if rest:
                if self.root._new(candidate).is_dir():
                    yield from self.select(candidate, rest, seen)
            elif self.root._new(candidate).exists():
                yield from self._once(candidate, seen)
            return
        matcher = re.compile(fnmatch.translate(part)).fullmatch
        for entry in self.entries(directory):
            name = os.fsdecode(entry.name)
            if not matcher(name) or (rest and not entry.is_dir):
                continue
            yield from self.select(directory / name, rest, seen) if rest else self._once(directory / name, seen)

    def _once(self, path: PurePosixPath, seen: Set[PurePosixPath]) -> Iterator[RemotePath]:
        if path not in seen:
            seen.add(path)
            yield self.root._new(path)


def _is_wildcard(part: str) -> bool:
    return any(c in part for c in "*?[")
