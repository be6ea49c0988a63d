"""Copying files and trees between this machine and a node: ``conn.put(local, remote)``, ``conn.get(remote, local)``.

A file lands whole or not at all: on the node through the files service's
atomic write, here through :class:`~remowt.endpoints.fs.AtomicFile` (a new
file beside the target, synced, renamed over it). A tree is listed first
(so the totals are known), its directories are made, then its files and
symbolic links move through up to :data:`CONCURRENCY` worker threads at once,
each file on a stream of its own; directories get their modes and times
last, deepest first. The caller's thread only waits and reports progress, so
a ``KeyboardInterrupt`` (or the first error) stops every transfer in flight
(each aborted: its destination stays as it was) and is raised once the
workers are gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat as stat_module
import threading
from typing import TYPE_CHECKING, Callable, List, Optional, Set, Tuple, TypeVar, Union

from ..endpoints.fs import BATCH_BYTES, AtomicFile, FsApi, SmallFile, sync_directory
from ..errors import ConnectionLost, Unreachable
from ..runtime.interrupts import start
from .paths import RemoteFile, RemotePath, open_raw, stat_result

if TYPE_CHECKING:
    from .node import Node

#: ``progress(bytes_done, bytes_total, files_done, files_total)``.
Progress = Callable[[int, int, int, int], None]
LocalPath = Union[str, bytes, "os.PathLike[str]"]
RemoteArg = Union[str, bytes, "os.PathLike[str]", RemotePath]
CONCURRENCY = 16  # files in flight at once in a tree
CHUNK = 1 << 20  # one read of a local file
SMALL = 64 * 1024  # a file this small moves whole in a batch of them: one call for many
BATCH_FILES = 512  # the most files in one batch
_T = TypeVar("_T")
_NOT_RECURSIVE = "is a directory: a tree is copied with recursive=True (remowt cp -r)"
_REPORT_INTERVAL = 0.1  # at most this long between progress reports while bytes move


class _Cancelled(Exception):
    """The transfer was stopped (an interrupt or another file's error): this file is abandoned."""


class _Run:
    """One put or get: its totals and progress, its workers, what is open, and the first error."""

    def __init__(self, progress: Optional[Progress], bytes_total: int, files_total: int) -> None:
        self.progress = progress
        self.bytes_total = bytes_total
        self.files_total = files_total
        self.bytes_done = 0
        self.files_done = 0
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self.changed = threading.Condition()
        self._open: Set[RemoteFile] = set()
        self._reported: Optional[Tuple[int, int, int, int]] = None

    def moved(self, count: int) -> None:
        with self.changed:
            self.bytes_done += count
            self.changed.notify_all()

    def finished(self, expected: int, moved: int) -> None:
        """A file is done: ``moved`` bytes of the ``expected`` its listing said (it changed meanwhile)."""
        with self.changed:
            self.bytes_total += moved - expected
            self.files_done += 1
            self.changed.notify_all()

    def check(self) -> None:
        if self.cancelled:
            raise _Cancelled

    def opened(self, file: RemoteFile) -> RemoteFile:
        with self.changed:
            if self.cancelled:
                file.abort()
                raise _Cancelled
            self._open.add(file)
        return file

    def closed(self, file: RemoteFile) -> None:
        with self.changed:
            self._open.discard(file)

    def cancel(self) -> None:
        """Stop: every file in flight is aborted (its stream reset), so no worker waits on it any longer."""
        with self.changed:
            self.cancelled = True
            files = list(self._open)
            self.changed.notify_all()
        for file in files:
            with contextlib.suppress(ConnectionLost, Unreachable, OSError, ValueError):
                file.abort()

    def report(self) -> None:
        """Tell the caller's callback, in the caller's thread, when something changed."""
        with self.changed:
            now = (self.bytes_done, self.bytes_total, self.files_done, self.files_total)
        if self.progress is not None and now != self._reported:
            self._reported = now
            self.progress(*now)

    def run(self, jobs: List[Callable[[], None]], workers: int) -> None:
        """Run ``jobs`` on up to ``workers`` threads; the caller's thread reports progress until all ended."""
        self.report()
        if not jobs:
            return
        queue = list(reversed(jobs))
        running = [0]

        def work() -> None:
            try:
                while True:
                    with self.changed:
                        if self.cancelled or not queue:
                            return
                        job = queue.pop()
                    try:
                        job()
                    except _Cancelled:
                        return
                    except BaseException as e:
                        with self.changed:
                            if self.error is None:
                                self.error = e
                        self.cancel()
                        return
            finally:
                with self.changed:
                    running[0] -= 1
                    self.changed.notify_all()

        threads = [threading.Thread(target=work, name=f"remowt-transfer-{n}", daemon=True) for n in range(workers)]
        try:
            for thread in threads[: min(workers, len(jobs))]:
                with self.changed:
                    running[0] += 1
                start(thread)
            while True:
                with self.changed:
                    if not running[0]:
                        break
                    self.changed.wait(_REPORT_INTERVAL)
                self.report()
        except BaseException:
            self.cancel()
            with self.changed:  # the workers end as their streams do: reset here, or failed by a lost link
                while running[0]:
                    self.changed.wait()
            raise
        if self.error is not None:
            raise self.error
        self.report()


# --- put ------------------------------------------------------------------


def put(
    node: Node,
    local: LocalPath,
    remote: RemoteArg,
    *,
    recursive: bool = False,
    preserve: bool = True,
    progress: Optional[Progress] = None,
    concurrency: int = CONCURRENCY,
) -> RemotePath:
    """Copy ``local`` (a file; a tree with ``recursive``) to ``remote`` on ``node``; where it landed.

    Into ``remote`` when it is an existing directory, else as ``remote``.
    See :meth:`remowt.Node.put`.
    """
    source = os.fsdecode(os.fspath(local))
    target = remote if isinstance(remote, RemotePath) else node.path(remote)
    top = os.stat(source)
    if stat_module.S_ISDIR(top.st_mode) and not recursive:
        raise IsADirectoryError(errno.EISDIR, _NOT_RECURSIVE, source)
    if target.is_dir():
        target = target / os.path.basename(source.rstrip("/"))
    fs = target._fs
    as_root = preserve and node.info().uid == 0
    if not stat_module.S_ISDIR(top.st_mode):
        run = _Run(progress, top.st_size, 1)
        run.run([lambda: _put_file(run, source, target, top, preserve, as_root)], 1)
        return target
    directories: List[Tuple[RemotePath, os.stat_result]] = []
    jobs: List[Callable[[], None]] = []
    files: List[Tuple[str, RemotePath, os.stat_result]] = []
    links: List[Tuple[str, RemotePath, os.stat_result]] = []
    size = 0
    for path, destination, st in _walk_local(source, target):
        if stat_module.S_ISDIR(st.st_mode):
            directories.append((destination, st))
        elif stat_module.S_ISLNK(st.st_mode):
            links.append((path, destination, st))
        elif stat_module.S_ISREG(st.st_mode):
            files.append((path, destination, st))
            size += st.st_size
    run = _Run(progress, size, len(files) + len(links))
    for destination, _ in directories:  # parents first; writable by us until the files are in
        fs.mkdir(destination._bytes, 0o700 if preserve else 0o777, False, True)
    for batch in _batches(files, lambda item: item[2].st_size):
        if len(batch) == 1:
            jobs.append(functools.partial(_put_file, run, *batch[0], preserve, as_root))
        else:
            jobs.append(functools.partial(_put_small, run, fs, batch, preserve, as_root))
    for path, destination, st in links:
        jobs.append(functools.partial(_put_link, run, fs, path, destination, st, preserve, as_root))
    run.run(jobs, concurrency)
    if preserve:
        for destination, st in reversed(directories):
            _set_attributes(fs, destination._bytes, st, as_root, follow_symlinks=True)
    return target


def _walk_local(source: str, target: RemotePath) -> List[Tuple[str, RemotePath, os.stat_result]]:
    """``source`` and everything below it (links not followed), parents first, each with its destination."""
    found = [(source, target, os.lstat(source))]
    index = 0
    while index < len(found):
        path, destination, st = found[index]
        index += 1
        if stat_module.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    found.append((entry.path, destination / entry.name, entry.stat(follow_symlinks=False)))
    return found


def _put_file(run: _Run, source: str, target: RemotePath, st: os.stat_result, preserve: bool, as_root: bool) -> None:
    run.check()
    mode = stat_module.S_IMODE(st.st_mode) if preserve else None
    times = (st.st_atime_ns, st.st_mtime_ns) if preserve else None
    moved = 0
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        writer = run.opened(open_raw(target, "atomic", mode=mode, times=times))
        try:
            while True:
                run.check()
                data = os.read(fd, CHUNK)
                if not data:
                    break
                writer.write(data)
                moved += len(data)
                run.moved(len(data))
            run.check()
        except BaseException:
            writer.abort()
            raise
        finally:
            run.closed(writer)
        writer.close()
    finally:
        os.close(fd)
    if as_root and (st.st_uid, st.st_gid) != (0, 0):
        fs = target._fs
        fs.chown(target._bytes, st.st_uid, st.st_gid, False)
        if st.st_mode & (stat_module.S_ISUID | stat_module.S_ISGID):  # chown cleared them
            fs.chmod(target._bytes, stat_module.S_IMODE(st.st_mode), False)
    run.finished(st.st_size, moved)


def _batches(items: List[_T], size: Callable[[_T], int]) -> List[List[_T]]:
    """``items`` as jobs: each large one alone, the small ones together in batches of bounded bytes and count."""
    jobs: List[List[_T]] = []
    batch: List[_T] = []
    batch_bytes = 0
    for item in items:
        n = size(item)
        if n > SMALL:
            jobs.append([item])
            continue
        if batch and (batch_bytes + n > BATCH_BYTES or len(batch) == BATCH_FILES):
            jobs.append(batch)
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += n
    if batch:
        jobs.append(batch)
    return jobs


def _put_small(
    run: _Run, fs: FsApi, batch: List[Tuple[str, RemotePath, os.stat_result]], preserve: bool, as_root: bool
) -> None:
    run.check()
    files: List[SmallFile] = []
    expected = moved = 0
    for source, target, st in batch:
        with open(source, "rb") as f:
            data = f.read()
        expected += st.st_size
        moved += len(data)
        files.append(
            SmallFile(
                target._bytes,
                data,
                stat_module.S_IMODE(st.st_mode) if preserve else None,
                (st.st_atime_ns, st.st_mtime_ns) if preserve else None,
                (st.st_uid, st.st_gid) if as_root and (st.st_uid, st.st_gid) != (0, 0) else None,
            )
        )
    run.check()
    fs.write_files(files)
    run.moved(moved)
    for _ in batch[1:]:
        run.finished(0, 0)
    run.finished(expected, moved)


def _put_link(
    run: _Run, fs: FsApi, source: str, target: RemotePath, st: os.stat_result, preserve: bool, as_root: bool
) -> None:
    run.check()
    pointee = os.fsencode(os.readlink(source))
    try:
        fs.symlink(pointee, target._bytes)
    except FileExistsError:
        fs.remove(target._bytes)
        fs.symlink(pointee, target._bytes)
    if preserve:
        if as_root and (st.st_uid, st.st_gid) != (0, 0):
            fs.chown(target._bytes, st.st_uid, st.st_gid, False)
        fs.utime(target._bytes, (st.st_atime_ns, st.st_mtime_ns), False)
    run.finished(0, 0)


def _set_attributes(fs: FsApi, path: bytes, st: os.stat_result, as_root: bool, follow_symlinks: bool) -> None:
    if as_root and (st.st_uid, st.st_gid) != (0, 0):
        fs.chown(path, st.st_uid, st.st_gid, follow_symlinks)
    fs.chmod(path, stat_module.S_IMODE(st.st_mode), follow_symlinks)
    fs.utime(path, (st.st_atime_ns, st.st_mtime_ns), follow_symlinks)


# --- get ------------------------------------------------------------------


def get(
    node: Node,
    remote: RemoteArg,
    local: LocalPath,
    *,
    recursive: bool = False,
    preserve: bool = True,
    progress: Optional[Progress] = None,
    concurrency: int = CONCURRENCY,
) -> str:
    """Copy ``remote`` on ``node`` (a file; a tree with ``recursive``) to ``local``; where it landed.

    Into ``local`` when it is an existing directory, else as ``local``.
    See :meth:`remowt.Node.get`.
    """
    source = remote if isinstance(remote, RemotePath) else node.path(remote)
    target = os.fsdecode(os.fspath(local))
    top = source.stat()
    if stat_module.S_ISDIR(top.st_mode) and not recursive:
        raise IsADirectoryError(errno.EISDIR, _NOT_RECURSIVE, str(source))
    if os.path.isdir(target):
        target = os.path.join(target, source.name)
    as_root = preserve and os.geteuid() == 0
    if not stat_module.S_ISDIR(top.st_mode):
        run = _Run(progress, top.st_size, 1)
        run.run([lambda: _get_file(run, source, target, top, preserve, as_root)], 1)
        return target
    entries = source.scan(recursive=True, stat=True)
    directories: List[Tuple[str, os.stat_result]] = [(target, top)]
    files: List[Tuple[RemotePath, str, os.stat_result]] = []
    links: List[Tuple[RemotePath, str, os.stat_result]] = []
    size = 0
    for entry in entries:
        assert entry.stat is not None  # asked for
        st = stat_result(entry.stat)
        name = os.fsdecode(entry.name)
        destination = os.path.join(target, name)
        if entry.kind == stat_module.S_IFDIR:
            directories.append((destination, st))
        elif entry.kind == stat_module.S_IFLNK:
            links.append((source / name, destination, st))
        elif entry.kind == stat_module.S_IFREG:
            files.append((source / name, destination, st))
            size += st.st_size
    run = _Run(progress, size, len(files) + len(links))
    for destination, _ in directories:
        try:
            os.mkdir(destination, 0o700 if preserve else 0o777)
        except FileExistsError:
            if not os.path.isdir(destination):
                raise
    fs = source._fs
    jobs: List[Callable[[], None]] = []
    for batch in _batches(files, lambda item: item[2].st_size):
        if len(batch) == 1:
            jobs.append(functools.partial(_get_file, run, *batch[0], preserve, as_root))
        else:
            jobs.append(functools.partial(_get_small, run, fs, batch, preserve, as_root))
    for remote_path, destination, st in links:
        jobs.append(functools.partial(_get_link, run, fs, remote_path, destination, st, preserve, as_root))
    run.run(jobs, concurrency)
    if preserve:
        for destination, st in reversed(directories):
            if as_root:
                os.chown(destination, st.st_uid, st.st_gid)
            os.chmod(destination, stat_module.S_IMODE(st.st_mode))
            os.utime(destination, ns=(st.st_atime_ns, st.st_mtime_ns))
    return target


def _get_file(run: _Run, source: RemotePath, target: str, st: os.stat_result, preserve: bool, as_root: bool) -> None:
    run.check()
    moved = 0
    reader = run.opened(open_raw(source, None))
    try:
        new = AtomicFile(target, stat_module.S_IMODE(st.st_mode) if preserve else None)
        try:
            while True:
                run.check()
                data = reader.read(CHUNK)
                if not data:
                    break
                new.write(data)
                moved += len(data)
                run.moved(len(data))
            run.check()  # an abort here ends the stream early: that is no end of file
            if as_root:
                os.fchown(new.fd, st.st_uid, st.st_gid)
                os.fchmod(new.fd, stat_module.S_IMODE(st.st_mode))  # chown clears set-id bits
            new.commit((st.st_atime_ns, st.st_mtime_ns) if preserve else None)
        except BaseException:
            new.abort()
            raise
    finally:
        run.closed(reader)
        reader.abort()
    run.finished(st.st_size, moved)


def _get_small(
    run: _Run, fs: FsApi, batch: List[Tuple[RemotePath, str, os.stat_result]], preserve: bool, as_root: bool
) -> None:
    run.check()
    found = fs.read_files([source._bytes for source, _, _ in batch], SMALL)
    directories: Set[str] = set()
    for (source, target, st), data in zip(batch, found):
        run.check()
        if data is None:  # it grew past a small file's size since the listing
            _get_file(run, source, target, st, preserve, as_root)
            continue
        new = AtomicFile(target, stat_module.S_IMODE(st.st_mode) if preserve else None)
        try:
            new.write(data)
            if as_root:
                os.fchown(new.fd, st.st_uid, st.st_gid)
                os.fchmod(new.fd, stat_module.S_IMODE(st.st_mode))
            new.commit((st.st_atime_ns, st.st_mtime_ns) if preserve else None, sync_dir=False)
        except BaseException:
            new.abort()
            raise
        directories.add(os.path.dirname(target))
        run.moved(len(data))
        run.finished(st.st_size, len(data))
    for directory in directories:
        sync_directory(os.fsencode(directory))


def _get_link(
    run: _Run, fs: FsApi, source: RemotePath, target: str, st: os.stat_result, preserve: bool, as_root: bool
) -> None:
    run.check()
    pointee = fs.readlink(source._bytes)
    try:
        os.symlink(pointee, target)
    except FileExistsError:
        os.unlink(target)
        os.symlink(pointee, target)
    if preserve:
        if as_root:
            os.lchown(target, st.st_uid, st.st_gid)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    run.finished(0, 0)
