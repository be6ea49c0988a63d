"""The files service: metadata, directories, and file contents as flow-controlled streams.

Served by the agent and the privileged agent alike. Paths travel as bytes,
as the OS takes them. A failing call raises the ``OSError`` the OS gave here,
and it arrives as the same subclass with its errno and file name.

File contents move through a stream the caller opens before it calls
:meth:`FsApi.open` (so nothing arrives before it is ready), each by a thread
of its own on this side: reading, the file goes out within the stream's
credit; writing, what arrives is written, and the caller's end of stream
commits it. :meth:`FsApi.finish` then says how many bytes moved, or raises the
error that stopped them (a failed read or write resets the stream, so the
caller sees the end and asks). A stream that is reset or lost before its end
leaves an atomic write's destination as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat as stat_module
import struct
import threading
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import msgspec

from ..errors import BadArguments, RemoteError
from ..protocol.service import Service, rpc
from ..runtime.interrupts import start
from ..runtime.writeback import STEP as WRITEBACK_STEP
from ..runtime.writeback import start_writeback

if TYPE_CHECKING:  # the editor helper imports this module for replace_file alone
    from ..rpc.router import Router
    from ..rpc.streams import Chunk, Stream

log = logging.getLogger("remowt.fs")

CHUNK = 1 << 20  # one read or write of a transfer
_splice: Optional[Callable[..., int]] = getattr(os, "splice", None)  # Linux, Python 3.10+
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
BATCH = struct.Struct(">I")  # the length of each batch of a scan's entries on its stream
BATCH_ENTRIES = 512
WRITE_MODES = ("truncate", "exclusive", "append", "update", "atomic")
_WRITE_FLAGS = {
    "truncate": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "exclusive": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "append": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "update": os.O_WRONLY | os.O_CREAT,
}
PathArg = Union[str, bytes]


class Stat(msgspec.Struct, frozen=True, array_like=True):
    """What ``stat`` says of a file (``os.stat_result``'s fields, times in nanoseconds)."""

    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int
    blocks: int
    rdev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        return cls(
            st.st_mode,
            st.st_ino,
            st.st_dev,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_blksize,
            st.st_blocks,
            st.st_rdev,
        )


class StatVfs(msgspec.Struct, frozen=True, array_like=True):
    """What ``statvfs`` says of a file system (``os.statvfs_result``'s fields)."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    flag: int
    namemax: int
    fsid: int


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One directory entry: its name (a relative path in a recursive scan), its type and more.

    ``kind`` is the ``S_IFMT`` bits of the entry itself (a symbolic link is
    ``S_IFLNK``); ``is_dir`` says whether it is a directory or a link to one;
    ``stat`` is its ``lstat`` when the scan asked for it.
    """

    name: bytes
    kind: int
    is_dir: bool
    stat: Optional[Stat] = None


class ScanSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A listing of ``path`` written to the caller's stream ``stream``.

    ``recursive``: every entry below, parents first, symbolic links not
    followed; ``stat``: each entry's ``lstat`` too.
    """

    path: bytes
    stream: int
    recursive: bool = False
    stat: bool = False


class OpenSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A file to move through the caller's stream ``stream``.

    ``write`` None reads ``length`` bytes (-1: to the end) from ``offset``.
    Else it writes: ``truncate``, ``exclusive`` (the file must not exist),
    ``append``, ``update`` (at ``offset``, keeping the rest), or ``atomic``
    (a new file beside it, renamed into its place at the end; a symbolic link
    is followed). A file made new gets ``mode`` (None: 0o666 less the
    umask); an atomic write keeps the mode and owner of the file it replaces
    unless ``mode`` is given. ``times`` (atime, mtime in ns) are set once
    everything is written.
    """

    path: bytes
    stream: int
    write: Optional[str] = None
    offset: int = 0
    length: int = -1
    mode: Optional[int] = None
    times: Optional[Tuple[int, int]] = None


class Opened(msgspec.Struct, frozen=True, array_like=True):
    """An open transfer: the handle to :meth:`FsApi.finish` it with, and the file's ``fstat``."""

    handle: int
    stat: Stat


class SmallFile(msgspec.Struct, frozen=True, array_like=True):
    """A whole small file for :meth:`FsApi.write_files`: its path, bytes, and what to keep (None: as made)."""

    path: bytes
    data: bytes
    mode: Optional[int] = None
    times: Optional[Tuple[int, int]] = None
    owner: Optional[Tuple[int, int]] = None


#: The most bytes a batch of small files carries (one call, well within a frame).
BATCH_BYTES = 1 << 20


class FsApi(Service, namespace=30):
    """Served by the agents: files and directories."""

    @rpc(1)
    def stat(self, path: bytes, follow_symlinks: bool) -> Stat:
        """``os.stat`` (``os.lstat`` without ``follow_symlinks``)."""
        raise NotImplementedError

    @rpc(2)
    def scan(self, spec: ScanSpec) -> int:
        """Write the entries of ``spec.path`` to the stream, in batches (a u32 length and a msgpack list of
        :class:`Entry`); how many."""
        raise NotImplementedError

    @rpc(3)
    def open(self, spec: OpenSpec) -> Opened:
        """Open a file and start moving it through the caller's stream (see :class:`OpenSpec`)."""
        raise NotImplementedError

    @rpc(4)
    def finish(self, handle: int) -> int:
        """Wait for transfer ``handle`` to end (a write: committed); the bytes it moved, or its error."""
        raise NotImplementedError

    @rpc(5, inline=True, oneway=True)
    def discard(self, handle: int) -> None:
        """The caller abandoned transfer ``handle`` (its stream is reset): forget it."""
        raise NotImplementedError

    @rpc(6)
    def mkdir(self, path: bytes, mode: int, parents: bool, exist_ok: bool) -> None:
        """Make a directory as ``pathlib.Path.mkdir`` does."""
        raise NotImplementedError

    @rpc(7)
    def remove(self, path: bytes) -> None:
        """``os.unlink``."""
        raise NotImplementedError

    @rpc(8)
    def rmdir(self, path: bytes) -> None:
        """``os.rmdir``."""
        raise NotImplementedError

    @rpc(9)
    def rmtree(self, path: bytes) -> None:
        """``shutil.rmtree``: a directory and everything in it (symbolic links are removed, not followed)."""
        raise NotImplementedError

    @rpc(10)
    def rename(self, source: bytes, destination: bytes) -> None:
        """``os.replace``."""
        raise NotImplementedError

    @rpc(11)
    def chmod(self, path: bytes, mode: int, follow_symlinks: bool) -> None:
        """``os.chmod``."""
        raise NotImplementedError

    @rpc(12)
    def chown(self, path: bytes, uid: int, gid: int, follow_symlinks: bool) -> None:
        """``os.chown`` (-1 keeps that id)."""
        raise NotImplementedError

    @rpc(13)
    def utime(self, path: bytes, times: Optional[Tuple[int, int]], follow_symlinks: bool) -> None:
        """``os.utime`` with (atime, mtime) in ns; None: now."""
        raise NotImplementedError

    @rpc(14)
    def symlink(self, target: bytes, path: bytes) -> None:
        """``os.symlink``: make ``path`` a symbolic link to ``target``."""
        raise NotImplementedError

    @rpc(15)
    def readlink(self, path: bytes) -> bytes:
        """``os.readlink``."""
        raise NotImplementedError

    @rpc(16)
    def realpath(self, path: bytes, strict: bool) -> bytes:
        """``os.path.realpath``; with ``strict``, the path must exist."""
        raise NotImplementedError

    @rpc(17)
    def statvfs(self, path: bytes) -> StatVfs:
        """``os.statvfs``."""
        raise NotImplementedError

    @rpc(18)
    def expanduser(self, path: bytes) -> bytes:
        """``os.path.expanduser`` with this side's home directories."""
        raise NotImplementedError

    @rpc(19)
    def touch(self, path: bytes, mode: int, exist_ok: bool) -> None:
        """Make the file or update its times, as ``pathlib.Path.touch`` does."""
        raise NotImplementedError

    @rpc(20)
    def write_files(self, files: List[SmallFile]) -> None:
        """Write each file atomically, as an ``atomic`` :meth:`open` would (owner set too); stop at the first error."""
        raise NotImplementedError

    @rpc(21)
    def read_files(self, paths: List[bytes], limit: int) -> List[Optional[bytes]]:
        """Each whole file's bytes, or None for one longer than ``limit`` (to be read as a stream)."""
        raise NotImplementedError


class AtomicFile:
    """A new file beside ``path`` that takes its place on :meth:`commit` (synced, then renamed over it).

    It gets ``mode``, else the mode and owner of the file it replaces (else
    0o666 less the umask). A symbolic link at ``path`` is followed: its target
    is replaced. :meth:`abort` removes it and leaves ``path`` as it was.
    """

    def __init__(self, path: PathArg, mode: Optional[int] = None) -> None:
        self.path = path
        self.target = os.path.realpath(os.fsencode(path))
        self._written = 0
        self._started = 0  # how much of it the disk was asked to write (runtime.writeback)
        directory, name = os.path.split(self.target)
        try:
            st: Optional[os.stat_result] = os.stat(self.target)
        except FileNotFoundError:
            st = None
        if st is not None and stat_module.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        while True:
            self.temporary = os.path.join(directory, b".%s.%s.remowt" % (name, os.urandom(4).hex().encode()))
            try:
                create = 0o666 if st is None and mode is None else 0o600
                self.fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, create)
                break
            except FileExistsError:
                continue
            except OSError as e:  # named as the file the caller asked for, not our temporary one
                raise OSError(e.errno, e.strerror, path) from None
        try:
            if mode is not None:
                os.fchmod(self.fd, mode)
            elif st is not None:
                os.fchmod(self.fd, stat_module.S_IMODE(st.st_mode))
                if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                    os.fchown(self.fd, st.st_uid, st.st_gid)
                    os.fchmod(self.fd, stat_module.S_IMODE(st.st_mode))  # chown clears set-id bits
        except BaseException:
            self.abort()
            raise

    def write(self, data: Union[bytes, memoryview]) -> None:
        """Write all of ``data``; every few MiB, the disk is asked to start on what was written."""
        _write_all(self.fd, data, self.path)
        self._written += len(data)
        if self._written - self._started >= WRITEBACK_STEP:
            start_writeback(self.fd, self._started, self._written - self._started)
            self._started = self._written

    def commit(self, times: Optional[Tuple[int, int]] = None, sync_dir: bool = True) -> None:
        """Set ``times``, sync, and rename the file into its place (and sync its directory, unless the caller
        syncs it once for many files)."""
        try:
            if times is not None:
                os.utime(self.fd, ns=times)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.temporary, self.target)
        except OSError as e:
            self.abort()
            raise OSError(e.errno, e.strerror, self.path) from None
        except BaseException:
            self.abort()
            raise
        if sync_dir:
            sync_directory(os.path.dirname(self.target))

    def abort(self) -> None:
        """Remove the new file; ``path`` stays as it was."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temporary)


def sync_directory(path: bytes) -> None:
    """Sync the directory ``path``, so a rename into it is durable (where the OS allows)."""
    try:
        directory = os.open(path or b".", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(directory)
    os.close(directory)


def replace_file(path: PathArg, content: bytes) -> None:
    """Write ``content`` in place of ``path`` atomically, keeping its mode and owner (see :class:`AtomicFile`)."""
    new = AtomicFile(path)
    try:
        new.write(content)
    except BaseException:
        new.abort()
        raise
    new.commit()


def _send_spliced(transfer: _Transfer, fd: int, length: int) -> int:
    """Send file ``fd`` (``length`` bytes, -1: to its end) as spliced Data frames: the kernel moves the pages
    from the file to a pipe of ours and on into the link, never through Python. Returns the length left for
    the plain way: all of it when this file system cannot splice, 0 when done or stopped.
    """
    from ..transports.stdio import enlarge_pipe  # here: the editor helper imports this module for replace_file

    assert _splice is not None
    stream = transfer.stream
    pipe_r, pipe_w = os.pipe()
    sent = threading.Event()
    outcome: List[bool] = []

    def on_sent(ok: bool) -> None:
        outcome.append(ok)
        sent.set()

    enlarge_pipe(pipe_w, CHUNK)  # else the pipe's own size: smaller moves
    try:
        room = fcntl.fcntl(pipe_w, F_GETPIPE_SZ)
        while length:
            try:
                want = min(stream.wait_credit(), room, CHUNK if length < 0 else length)
            except (OSError, ValueError):  # reset or lost: the caller gave up
                transfer.abandoned = True
                return 0
            try:
                moved = _splice(fd, pipe_w, want)
            except OSError as e:
                if e.errno == errno.EINVAL and not transfer.moved:
                    return length  # a file system that cannot splice: read it instead
                transfer.error = OSError(e.errno, e.strerror, transfer.path)
                return 0
            if not moved:
                return 0
            sent.clear()
            try:
                stream.splice_from(pipe_r, moved, on_sent)
            except (OSError, ValueError):
                transfer.abandoned = True
                return 0
            sent.wait()
            if not outcome.pop():
                transfer.abandoned = True
                return 0
            transfer.moved += moved
            if length > 0:
                length -= moved
        return 0
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _write_all(fd: int, data: Union[bytes, memoryview], name: PathArg) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as e:
            raise OSError(e.errno, e.strerror, name) from None
        view = view[written:]


class _Transfer:
    """One file moving through a stream on a thread of its own; :attr:`done` once it ended."""

    def __init__(self, key: Tuple[str, int], stream: Stream, path: bytes) -> None:
        self.key = key
        self.stream = stream
        self.path = path
        self.done = threading.Event()
        self.moved = 0
        self.error: Optional[OSError] = None
        self.abandoned = False  # the stream was reset or lost: nobody asks for the result
        self.discarded = False  # the caller said it will not ask


class Files(FsApi):
    """The agents' implementation."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._lock = threading.Lock()
        self._transfers: Dict[Tuple[str, int], _Transfer] = {}
        self._threads: List[threading.Thread] = []
        self._handles = itertools.count(1)

    # --- metadata ---------------------------------------------------------

    def stat(self, path: bytes, follow_symlinks: bool) -> Stat:
        return Stat.of(os.stat(path, follow_symlinks=follow_symlinks))

    def mkdir(self, path: bytes, mode: int, parents: bool, exist_ok: bool) -> None:
        try:
            os.mkdir(path, mode)
        except FileNotFoundError:
            parent = os.path.dirname(path.rstrip(b"/")) or b"."
            if not parents or parent == path:
                raise
            self.mkdir(parent, 0o777, True, True)
            self.mkdir(path, mode, False, exist_ok)
        except OSError:
            if not exist_ok or not os.path.isdir(path):
                raise

    def remove(self, path: bytes) -> None:
        os.unlink(path)

    def rmdir(self, path: bytes) -> None:
        os.rmdir(path)

    def rmtree(self, path: bytes) -> None:
        import shutil

        if os.path.islink(path):  # as shutil.rmtree refuses it, but with the errno
            raise NotADirectoryError(errno.ENOTDIR, "Cannot call rmtree on a symbolic link", path)
        shutil.rmtree(path)

    def rename(self, source: bytes, destination: bytes) -> None:
        os.replace(source, destination)

    def chmod(self, path: bytes, mode: int, follow_symlinks: bool) -> None:
        os.chmod(path, mode, follow_symlinks=follow_symlinks)

    def chown(self, path: bytes, uid: int, gid: int, follow_symlinks: bool) -> None:
        os.chown(path, uid, gid, follow_symlinks=follow_symlinks)

    def utime(self, path: bytes, times: Optional[Tuple[int, int]], follow_symlinks: bool) -> None:
        if times is None:
            os.utime(path, follow_symlinks=follow_symlinks)
        else:
            os.utime(path, ns=times, follow_symlinks=follow_symlinks)

    def symlink(self, target: bytes, path: bytes) -> None:
        os.symlink(target, path)

    def readlink(self, path: bytes) -> bytes:
        return os.readlink(path)

    def realpath(self, path: bytes, strict: bool) -> bytes:
        if not strict:
            return os.path.realpath(path)
        try:
            return os.path.realpath(path, strict=True)  # type: ignore[call-arg,unused-ignore]  # Python >= 3.10
        except TypeError:  # Python 3.9: the path must exist all the same
            os.stat(path)
            return os.path.realpath(path)

    def statvfs(self, path: bytes) -> StatVfs:
        s = os.statvfs(path)
        return StatVfs(
            s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_favail, s.f_flag,
            s.f_namemax, s.f_fsid,
        )  # fmt: skip

    def expanduser(self, path: bytes) -> bytes:
        expanded = os.path.expanduser(path)
        if expanded.startswith(b"~"):
            raise RemoteError(f"could not determine the home directory for {os.fsdecode(path)!r}")
        return expanded

    def touch(self, path: bytes, mode: int, exist_ok: bool) -> None:
        if exist_ok:
            try:
                os.utime(path)
                return
            except OSError:
                pass  # missing: made below (other errors come again there)
        flags = os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        os.close(os.open(path, flags, mode))

    def write_files(self, files: List[SmallFile]) -> None:
        directories: Set[bytes] = set()
        for file in files:
            new = AtomicFile(file.path, file.mode)
            try:
                new.write(file.data)
                if file.owner is not None:
                    os.fchown(new.fd, *file.owner)
                    os.fchmod(new.fd, stat_module.S_IMODE(os.fstat(new.fd).st_mode) if file.mode is None else file.mode)
            except OSError as e:
                new.abort()
                raise OSError(e.errno, e.strerror, file.path) from None
            except BaseException:
                new.abort()
                raise
            new.commit(file.times, sync_dir=False)
            directories.add(os.path.dirname(new.target))
        for directory in directories:
            sync_directory(directory)

    def read_files(self, paths: List[bytes], limit: int) -> List[Optional[bytes]]:
        found: List[Optional[bytes]] = []
        for path in paths:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
            found.append(data if len(data) <= limit else None)
        return found

    # --- listings ---------------------------------------------------------

    def scan(self, spec: ScanSpec) -> int:
        stream = self._router.accept_stream(self._router.caller(), spec.stream)
        try:
            count = 0
            batch: List[Entry] = []
            for entry in _entries(spec.path, b"", spec.recursive, spec.stat):
                batch.append(entry)
                if len(batch) == BATCH_ENTRIES:
                    count += _send_batch(stream, batch)
            count += _send_batch(stream, batch)
            stream.close_write()
            return count
        finally:
            stream.close()

    # --- contents ---------------------------------------------------------

    def open(self, spec: OpenSpec) -> Opened:
        if spec.write is not None and spec.write not in WRITE_MODES:
            raise BadArguments(f"write must be one of {', '.join(WRITE_MODES)} or None, got {spec.write!r}")
        if spec.offset < 0 or spec.length < -1:
            raise BadArguments(f"offset must be >= 0 and length >= -1, got {spec.offset} and {spec.length}")
        caller = self._router.caller()
        stream = self._router.accept_stream(caller, spec.stream)
        try:
            if spec.write is None:
                fd = os.open(spec.path, os.O_RDONLY | os.O_CLOEXEC)
            elif spec.write == "atomic":
                atomic = AtomicFile(spec.path, spec.mode)
                fd = atomic.fd
            else:
                mode = 0o666 if spec.mode is None else spec.mode
                fd = os.open(spec.path, _WRITE_FLAGS[spec.write] | os.O_CLOEXEC, mode)
        except BaseException:
            stream.close()
            raise
        try:
            st = os.fstat(fd)
            if spec.write is None and stat_module.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), spec.path)
            if spec.offset:
                os.lseek(fd, spec.offset, os.SEEK_SET)
            handle = next(self._handles)
            transfer = _Transfer((caller, handle), stream, spec.path)
            if spec.write is None:
                thread = threading.Thread(target=self._send, args=(transfer, fd, spec.length), daemon=True)
            elif spec.write == "atomic":
                stream.receive_only()
                thread = threading.Thread(target=self._receive_atomic, args=(transfer, atomic, spec.times), daemon=True)
            else:
                stream.receive_only()
                thread = threading.Thread(target=self._receive, args=(transfer, fd, spec.times), daemon=True)
            thread.name = f"remowt-fs-{handle}"
        except BaseException:
            stream.close()
            if spec.write == "atomic":
                atomic.abort()
            else:
                os.close(fd)
            raise
        with self._lock:
            self._transfers[transfer.key] = transfer
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        start(thread)
        return Opened(handle, Stat.of(st))

    def _send(self, transfer: _Transfer, fd: int, length: int) -> None:
        stream = transfer.stream
        try:
            if _splice is not None and stream.splices and stat_module.S_ISREG(os.fstat(fd).st_mode):
                length = _send_spliced(transfer, fd, length)
            while length:
                try:
                    data = os.read(fd, CHUNK if length < 0 else min(CHUNK, length))
                except OSError as e:
                    transfer.error = OSError(e.errno, e.strerror, transfer.path)
                    break
                if not data:
                    break
                try:
                    stream.write(data)
                except (OSError, ValueError):  # reset or lost: the caller gave up
                    transfer.abandoned = True
                    break
                transfer.moved += len(data)
                length -= len(data)
            if transfer.error is None and not transfer.abandoned:
                stream.close_write()
        finally:
            os.close(fd)
            self._ended(transfer)

    def _receive(self, transfer: _Transfer, fd: int, times: Optional[Tuple[int, int]]) -> None:
        try:
            if self._copy_in(transfer, lambda data: _write_all(fd, data, transfer.path)):
                try:
                    if times is not None:
                        os.utime(fd, ns=times)
                    os.close(fd)
                except OSError as e:
                    transfer.error = OSError(e.errno, e.strerror, transfer.path)
                fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
            self._ended(transfer)

    def _receive_atomic(self, transfer: _Transfer, atomic: AtomicFile, times: Optional[Tuple[int, int]]) -> None:
        try:
            if self._copy_in(transfer, atomic.write):
                try:
                    atomic.commit(times)
                except OSError as e:
                    transfer.error = e
        finally:
            atomic.abort()  # after a commit there is nothing left to remove
            self._ended(transfer)

    def _copy_in(self, transfer: _Transfer, write: Callable[[Chunk], None]) -> bool:
        """Write what arrives until the caller's end of stream; False when it failed or was abandoned."""
        stream = transfer.stream
        while True:
            try:
                chunk = stream.read_chunk(CHUNK)
            except OSError:  # the link is lost
                transfer.abandoned = True
                return False
            if not chunk:
                # reset, or discarded (closed here, which reads as an end too): the caller gave up before the end
                if stream.error is not None or transfer.discarded:
                    transfer.abandoned = True
                    return False
                return True
            try:
                write(chunk)
            except OSError as e:
                transfer.error = e
                return False
            transfer.moved += len(chunk)

    def _ended(self, transfer: _Transfer) -> None:
        # after an error the caller sees the end (or its writes fail) and asks finish(); else both directions
        # ended, or the caller reset the stream: either way it is forgotten here
        transfer.stream.close()
        with self._lock:
            if transfer.abandoned or transfer.discarded:
                self._transfers.pop(transfer.key, None)
        transfer.done.set()

    def finish(self, handle: int) -> int:
        key = (self._router.caller(), handle)
        with self._lock:
            transfer = self._transfers.get(key)
        if transfer is None:
            raise BadArguments(f"no transfer with handle {handle} for {key[0]}")
        transfer.done.wait()
        with self._lock:
            self._transfers.pop(key, None)
        transfer.stream.close()
        if transfer.error is not None:
            raise transfer.error
        if transfer.abandoned:
            raise BrokenPipeError(errno.EPIPE, "the transfer's stream was closed before its end", transfer.path)
        return transfer.moved

    def discard(self, handle: int) -> None:
        key = (self._router.caller(), handle)
        with self._lock:
            transfer = self._transfers.get(key)
            if transfer is None:
                return
            transfer.discarded = True
            if transfer.done.is_set():
                del self._transfers[key]
        transfer.stream.close()

    def join(self, timeout: float) -> None:
        """Wait for the transfers' threads (their streams fail once the router is closed)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)


def _entries(root: bytes, prefix: bytes, recursive: bool, with_stat: bool) -> Iterator[Entry]:
    with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
        found = list(it)
    for item in found:
        name = prefix + b"/" + item.name if prefix else item.name
        if item.is_symlink():
            kind = stat_module.S_IFLNK
            try:
                is_dir = item.is_dir()
            except OSError:
                is_dir = False
        elif item.is_dir(follow_symlinks=False):
            kind, is_dir = stat_module.S_IFDIR, True
        elif item.is_file(follow_symlinks=False):
            kind, is_dir = stat_module.S_IFREG, False
        else:
            kind, is_dir = stat_module.S_IFMT(item.stat(follow_symlinks=False).st_mode), False
        st = Stat.of(item.stat(follow_symlinks=False)) if with_stat else None
        yield Entry(name, kind, is_dir, st)
        if recursive and kind == stat_module.S_IFDIR:
            yield from _entries(root, name, True, with_stat)


def _send_batch(stream: Stream, batch: List[Entry]) -> int:
    if not batch:
        return 0
    body = msgspec.msgpack.encode(batch)
    stream.write(BATCH.pack(len(body)) + body)
    count = len(batch)
    batch.clear()
    return count
