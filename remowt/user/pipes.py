"""File objects, fd pumps and relays over streams: what Popen's stdio is made of.

``PIPE`` becomes a raw file object over the stream (wrapped in the usual
buffered and text layers); an inherited or given fd is copied to or from the
stream, as the child would have read or written it directly if it were
local: input by a :class:`FdToStream` thread, output by the connection's
:class:`FdWriter` for that fd. One child's pipe given as another child's
stdio is copied from stream to stream by a :class:`Relay`.
"""

from __future__ import annotations

import abc
import collections
import errno
import fcntl
import io
import os
import select
import stat
import threading
from typing import Any, Callable, Deque, Dict, Optional, Tuple, Union

from ..errors import ConnectionLost
from ..rpc.streams import MAX_CHUNK, Chunk, Stream, as_bytes
from ..runtime.interrupts import start, without_interrupts
from ..runtime.waiting import Flag, Gate, wait_on
from ..transports.stdio import enlarge_pipe

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux's number; fcntl names it from Python 3.10


class PipeEnd:
    """A child's stdio stream as this process holds it, shared like a ``dup()``-ed fd.

    The file object Popen made and every relay or fd copy of the stream hold
    it; the stream is finished when the last holder lets go: closed, after
    sending EOF if it is a child's stdin. ``exited`` says whether that child
    is gone, so that writing to its stdin raises ``BrokenPipeError`` as
    writing to a local pipe nobody reads would.
    """

    def __init__(self, stream: Stream, writable: bool, exited: Optional[Callable[[], bool]] = None) -> None:
        self.stream = stream
        self.writable = writable
        self._exited = exited
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> bool:
        """One more holder; False if the stream was already let go."""
        with self._lock:
            if self._holders == 0:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        """One holder less; the last one finishes the stream."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if not last:
            return
        if self.writable:
            try:
                self.stream.close_write()
            finally:
                self.stream.close()
        else:
            self.stream.close()

    def check_writable(self) -> None:
        """``BrokenPipeError`` if the child that reads this stream has exited."""
        if self._exited is not None and self._exited():
            raise BrokenPipeError(errno.EPIPE, f"Broken pipe: the child reading {self.stream!r} has exited")

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Send all of ``data``; ``BrokenPipeError`` (with errno EPIPE) once nobody reads."""
        self.check_writable()
        try:
            return self.stream.write(data)
        except BrokenPipeError as e:
            if e.errno is None:
                raise BrokenPipeError(errno.EPIPE, f"Broken pipe: {e}") from None
            raise


class _PipeFile(io.RawIOBase):
    """A raw file over a :class:`PipeEnd`.

    ``fileno()`` puts a real OS pipe between the file and the stream (on the
    first call): a thread copies between the stream and the pipe, so
    ``select()``, non-blocking I/O and local processes given the file work
    as with a local child's pipe. From then on the OS pipe is the file's
    end: the thread holds the file's share of the stream and lets it go when
    the pipe ends, so ``os.close(p.stdin.fileno())`` gives the child EOF as
    it would with a local child. ``pipesize`` > 0 is that pipe's size.
    """

    def __init__(self, end: PipeEnd, name: str, pipesize: int = -1) -> None:
        super().__init__()
        self.end = end
        self.name = name
        self.pipesize = pipesize
        self._fd = -1
        self._lock = threading.Lock()

    @property
    def has_fd(self) -> bool:
        """True once ``fileno()`` made a real pipe: the stream is used through it."""
        return self._fd >= 0

    def fileno(self) -> int:
        """This side of the OS pipe (made on the first call)."""
        with self._lock:
            if self.closed:
                raise ValueError("I/O operation on closed file")
            if self._fd < 0:
                without_interrupts(self._make_pipe)
            return self._fd

    def _make_pipe(self) -> None:
        read_fd, write_fd = os.pipe()
        if self.pipesize > 0:  # else the default size, as a local child's pipe has
            enlarge_pipe(write_fd, self.pipesize)
        mine, theirs = (write_fd, read_fd) if self.end.writable else (read_fd, write_fd)
        if not self._copy_ahead(theirs):
            start(threading.Thread(target=self._copy, args=(theirs,), name=f"remowt{self.name}", daemon=True))
        self._fd = mine

    def _copy_ahead(self, fd: int) -> bool:
        """Before the thread starts, on the caller's thread: copy what is there already; True if that was all."""
        return False

    @abc.abstractmethod
    def _copy(self, fd: int) -> None:
        """The thread between the stream and ``fd``, the other side of the OS pipe; lets go of the stream at the end."""

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            fd, self._fd = self._fd, -1
            super().close()
        if fd >= 0:
            os.close(fd)  # the copying thread sees the pipe end and lets go of the stream
        else:
            self.end.release()


class StreamReader(_PipeFile):
    """A readable raw file over the receiving side of a stream."""

    def __init__(self, end: PipeEnd, name: str, pipesize: int = -1) -> None:
        super().__init__(end, name, pipesize)
        self.touched = False
        self._feed_error: Optional[BaseException] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> Optional[int]:
        self.touched = True
        if self._fd >= 0:
            try:
                n = os.readv(self._fd, [buffer])
            except BlockingIOError:
                return None
            if n == 0 and self._feed_error is not None:
                raise self._feed_error
            return n
        return self.end.stream.readinto(memoryview(buffer).cast("B"))

    def read1(self, size: int = -1) -> Optional[bytes]:
        """At most ``size`` bytes as soon as any are there."""
        chunk = self.read_chunk(size)
        return None if chunk is None else as_bytes(chunk)

    def read_chunk(self, size: int = -1) -> Optional[Chunk]:
        """:meth:`read1`, but a chunk the stream received comes as it is: maybe a view of its frame, uncopied."""
        size = MAX_CHUNK if size < 0 else size
        if self._fd >= 0:
            buffer = bytearray(size)
            n = self.readinto(buffer)
            return None if n is None else bytes(buffer[:n])
        self.touched = True
        return self.end.stream.read_chunk(size)

    def _copy_ahead(self, fd: int) -> bool:
        """What the stream holds already goes into the new pipe now (as much as it takes), and its end if
        that came too: ``select()`` right after ``fileno()`` sees what a local child's pipe would hold."""
        stream = self.end.stream
        room = fcntl.fcntl(fd, F_GETPIPE_SZ)
        while room and stream.buffered:
            data = stream.read(min(room, MAX_CHUNK))
            os.write(fd, data)  # an empty pipe takes up to its size at once
            room -= len(data)
        if not stream.at_eof:
            return False
        os.close(fd)
        self.end.release()
        return True

    def _copy(self, fd: int) -> None:
        """Stream → pipe until the stream ends or nobody reads the pipe."""
        try:
            while True:
                try:
                    data = self.end.stream.read(MAX_CHUNK)
                except ConnectionLost as e:
                    self._feed_error = e  # the reader sees it after the bytes that came before
                    return
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError:
            return  # every read end was closed
        finally:
            os.close(fd)
            self.end.release()


class StreamWriter(_PipeFile):
    """A writable raw file over the sending side of a stream; closing it sends EOF."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> Optional[int]:
        if self.closed:
            raise ValueError("write to closed file")
        if self._fd >= 0:
            self.end.check_writable()
            try:
                return os.write(self._fd, data)
            except BlockingIOError:
                return None
        return self.end.write(data)

    def _copy(self, fd: int) -> None:
        """Pipe → stream until every write end is closed or nobody reads the stream."""
        try:
            while True:
                data = os.read(fd, MAX_CHUNK)
                if not data:
                    return
                self.end.write(data)
        except (OSError, ConnectionLost, ValueError):
            return  # closing our end makes the pipe's writers see EPIPE
        finally:
            os.close(fd)
            self.end.release()


def remowt_pipe(value: Any) -> Union[StreamReader, StreamWriter, None]:
    """The remowt pipe below a file object's buffered and text layers, unless it has a real fd by now."""
    for _ in range(3):
        if isinstance(value, (StreamReader, StreamWriter)):
            return None if value.has_fd else value
        value = getattr(value, "buffer", None) or getattr(value, "raw", None)
    return None


def is_devnull(fd: int) -> bool:
    """True if ``fd`` is /dev/null, so inheriting it needs no pump."""
    try:
        mine, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(mine.st_mode) and mine.st_rdev == null.st_rdev


class Relay:
    """Copies one child's output stream into another child's stdin, on a thread of its own.

    Each side is a :class:`PipeEnd` the relay holds one share of and lets go
    when the output ends (the reading child then sees EOF unless someone else
    still holds its stdin) or when the reading child is gone (the writing
    child then gets SIGPIPE unless someone else still holds its output).
    """

    def __init__(self, source: PipeEnd, sink: PipeEnd) -> None:
        self.source = source
        self.sink = sink
        self._thread = start(threading.Thread(target=self._run, name="remowt-relay", daemon=True))

    def _run(self) -> None:
        try:
            while True:
                data = self.source.stream.read(MAX_CHUNK)
                if not data:
                    return
                self.sink.write(data)
        except (OSError, ConnectionLost, ValueError):
            return
        finally:
            self.source.release()
            self.sink.release()


class FdToStream:
    """Copies a local fd into a stream until EOF, or until stopped.

    It reads from its own copy of the fd, so the caller may close theirs as
    a local child's parent may. It reads only as much as the stream can take
    at once, so what it has read has been sent: the child's side holds at
    most a stream window plus a pipe's worth that the child may never read.
    """

    def __init__(self, fd: int, stream: Stream) -> None:
        self.fd = os.dup(fd)
        self.stream = stream
        self._stopping = False
        self._writable = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = start(threading.Thread(target=self._run, name=f"remowt-fd{fd}-in", daemon=True))

    def _room(self) -> int:
        """How much the stream takes now, after waiting for credit; 0 once it failed or we stop."""
        while not self._stopping:
            credit = self.stream.credit()
            if credit or self.stream.broken:
                return credit
            self._writable.clear()
            if self._stopping:  # stop() set the event before we cleared it
                break
            self.stream.when_writable(self._writable.set)
            self._writable.wait()
        return 0

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                room = self._room()
                if not room or any(fd == self._wake_r for fd, _ in poller.poll()):
                    break
                try:
                    data = os.read(self.fd, min(room, MAX_CHUNK))
                except BlockingIOError:
                    continue
                if not data:
                    self.stream.close_write()
                    break
                self.stream.write(data)
        except (OSError, ConnectionLost, ValueError):
            pass
        finally:
            os.close(self.fd)
            self.stream.close()

    def stop(self) -> None:
        """Stop copying (the child exited): what was not read stays in the fd."""
        if self._wake_w < 0:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._writable.set()
        self._thread.join()
        os.close(self._wake_w)
        os.close(self._wake_r)
        self._wake_w = self._wake_r = -1


class FdSink:
    """One child output's bytes on their way to a local fd, through its :class:`FdWriter`.

    It writes to its own copy of the fd, so the caller may close theirs (or
    reuse the number) as a local child's parent may; the copy is taken by
    :meth:`open` once the sink is registered, so an interrupt cannot lose it. Its stream comes
    later (:meth:`FdWriter.attach`), or never when the child writes nothing:
    then :meth:`close` alone ends it. ``done`` is set once every byte was
    written, or the output failed; ``error`` then says how:
    ``ConnectionLost`` before its end, or the ``OSError`` of a local write
    (the stream is reset then, so the child's next write to that pipe fails
    with EPIPE, as it would with a local reader that went away).
    """

    def __init__(self, writer: FdWriter, name: str) -> None:
        self.name = name
        self.stream: Optional[Stream] = None
        self.fd = -1
        self.done = Flag()
        self.error: Optional[OSError] = None
        self._writer = writer
        self._lock = threading.Lock()
        self._released = False

    def open(self) -> None:
        """Take the copy of the writer's fd (after the caller registered the sink, to close it on failure)."""
        without_interrupts(self._take_copy)

    def _take_copy(self) -> None:
        self.fd = os.dup(self._writer.fd)

    def take(self, stream: Stream) -> bool:
        """Adopt ``stream``; False if the sink was closed already."""
        with self._lock:
            if self._released:
                return False
            self.stream = stream
            return True

    def close(self) -> None:
        """Give up: release the sink now, or once the writer is past what it queued (the stream is reset)."""
        with self._lock:
            stream = self.stream
        if stream is None:
            self.release()
        else:
            stream.close()
            self._writer.end(self)

    def release(self) -> None:
        """Close the stream, if any, and the fd copy (once): nothing more is written."""
        with self._lock:
            if self._released:
                return
            self._released = True
            stream = self.stream
        if stream is not None:
            stream.close()
        if self.fd >= 0:
            os.close(self.fd)
        self.done.set()

    def ending(self) -> None:
        """The stream's end arrived: if the link was lost before its EOF, the output is incomplete."""
        stream = self.stream
        if stream is not None and isinstance(stream.error, ConnectionLost):
            where = f"the child's {self.name}, copied to fd {self._writer.fd}"
            self._fail(ConnectionLost(f"{where}, was cut off before its end: {stream.error}"))

    def write(self, data: Chunk) -> None:
        """Write ``data`` to the fd (on the writer's thread); a failure resets the stream and releases the fd."""
        if self._released:
            return
        assert self.stream is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            self._fail(OSError(e.errno, f"copying the child's {self.name} to fd {self._writer.fd}: {e.strerror}"))
            self.release()  # resets the stream: the child's next write to its pipe fails
            return
        self.stream.ack(len(data))

    def _fail(self, error: OSError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self.done.set()


class FdWriter:
    """Writes pushed stream chunks to one local fd, in order, on a thread of its own.

    Each stream's bytes go to its sink's copy of the fd; sharing one thread
    per fd number keeps the order in which they arrived.

    Chunks arrive on the thread that reads the link, which must not block,
    so they are queued here; the bytes count against their stream's window
    until written. The thread lingers a while for more work, then ends; a
    stream that ends with nothing to write never needs it.
    """

    LINGER = 2.0

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._gate = Gate()
        self._queue: Deque[Tuple[FdSink, Chunk]] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def sink(self, name: str) -> FdSink:
        """A sink for one output (``name``: "stdout" or "stderr"); :meth:`FdSink.open` takes its copy of the fd."""
        return FdSink(self, name)

    def attach(self, sink: FdSink, stream: Stream) -> None:
        """Send everything ``stream`` receives to ``sink`` (one of this writer's); reset it if the sink was closed."""
        if not sink.take(stream):
            stream.close()
            return
        stream.deliver_to(lambda data: self._push(sink, data))

    def end(self, sink: FdSink) -> None:
        """Release ``sink`` after what is queued for it."""
        self._push(sink, b"")

    def _push(self, sink: FdSink, data: Chunk) -> None:
        if not data:
            sink.ending()
        with self._lock:
            if data or self._queue or self._thread is not None:
                self._queue.append((sink, data))
                if self._thread is None:
                    self._thread = start(threading.Thread(target=self._run, name=f"remowt-fd{self.fd}", daemon=True))
                self._gate.open()
                return
        sink.release()

    def _run(self) -> None:
        while True:
            with self._lock:
                waiter = None if self._queue or self._closed else self._gate.enlist()
            if waiter is not None:
                wait_on(waiter, self.LINGER)
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                sink, data = self._queue.popleft()
            if data:
                sink.write(data)
            else:
                sink.release()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._gate.open()
        if thread is not None:
            thread.join()


class FdWriters:
    """The writers of one connection's children's outputs, one per local fd."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: Dict[int, FdWriter] = {}

    def get(self, fd: int) -> FdWriter:
        """The writer that copies children's output to local fd ``fd``, made on first use."""
        with self._lock:
            writer = self._writers.get(fd)
            if writer is None:
                writer = self._writers[fd] = FdWriter(fd)
            return writer

    def close(self) -> None:
        """Finish what every writer queued, then stop them."""
        with self._lock:
            writers = list(self._writers.values())
        for writer in writers:
            writer.close()
