"""A link: frames over one transport, with one reader thread and a writer backlog.

Senders write straight to the transport when nothing is queued and the
transport takes the bytes without waiting; whatever it cannot take at once
goes to a backlog that a writer thread drains. So no sender, and in
particular no reader thread, ever blocks on a slow peer. A frame's payload
may still be in a pipe (:class:`Spliced`): the transport moves it itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, TypeVar, Union

from ..errors import ProtocolError
from ..protocol import wire
from ..runtime.interrupts import start, without_interrupts
from ..runtime.waiting import Gate, forget, held_elsewhere, owns, wait_on, wake_on_release
from ..transports.base import Transport

log = logging.getLogger("remowt.link")
# Read what is there, up to a window (a pipe holds at most 1 MiB; an ssh inbox at most the channel's window).
READ_SIZE = 8 * 1024 * 1024
# Where small reads are cheap, a Data frame this big that a read does not hold whole has its payload read apart,
# straight into the bytes the stream hands out; the read after such a payload takes little more than a frame head.
SPLIT_SIZE = 64 * 1024
HEAD_READ = 512
# How long the reader thread stays off the fd after the last caller that read for itself: a caller back within
# that time finds the fd its own again (see Link.lead).
LINGER = 0.002
# How long a leader that expects a quick answer polls for it before it sleeps: waking a sleeping thread costs more
# than a quick answer takes (~18 µs across vCPUs here, as much as the round trip).
SPIN = 0.00015

_MAIN_THREAD = threading.main_thread().ident
Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")


class Spliced:
    """Part of a frame that is still in a pipe: ``count`` bytes of ``fd``, moved by :meth:`Transport.splice_from`.

    ``on_sent(True)`` runs once they all left; ``on_sent(False)`` if the link ended first.
    """

    __slots__ = ("count", "fd", "on_sent")

    def __init__(self, fd: int, count: int, on_sent: Callable[[bool], None]) -> None:
        self.fd = fd
        self.count = count
        self.on_sent = on_sent

    def __len__(self) -> int:
        return self.count


Part = Union[Buffer, Spliced]
_Item = Union[memoryview, Spliced]


class _Held(threading.local):
    links: Optional[Dict[Link, List[Part]]] = None


_held = _Held()


def holding_sends() -> bool:
    """Whether this thread is inside :func:`held_sends` (what it sends now leaves only at the block's end)."""
    return _held.links is not None


@contextlib.contextmanager
def held_sends() -> Iterator[None]:
    """Hold the frames this thread sends meanwhile, and send them at the end: one write per link.

    Only for code that waits for nothing from a peer (a held call would not be sent).
    """
    if _held.links is not None:
        yield
        return
    links: Dict[Link, List[Part]] = {}
    try:
        _held.links = links  # set inside the try: a KeyboardInterrupt must never leave this thread holding
        yield
    finally:
        _held.links = None
        for link, parts in links.items():
            link.send(*parts)


def held_mark() -> Dict[Link, int]:
    """Where this thread's held frames end now, inside :func:`held_sends`; see :func:`held_undo`."""
    links = _held.links
    assert links is not None, "held_mark() outside held_sends()"
    return {link: len(parts) for link, parts in links.items()}


def held_undo(mark: Dict[Link, int]) -> None:
    """Drop the frames this thread held since ``mark``: they will not be sent."""
    links = _held.links
    assert links is not None, "held_undo() outside held_sends()"
    for link, parts in links.items():
        start = mark.get(link, 0)
        dropped = parts[start:]
        del parts[start:]
        _report([], [part for part in dropped if isinstance(part, Spliced)])


class Link:
    """Frames in and out of a transport. ``on_frame`` and ``on_close`` run on the reader thread."""

    def __init__(
        self,
        transport: Transport,
        on_frame: Callable[[Link, wire.Item], None],
        on_close: Callable[[Link, Optional[BaseException]], None],
        *,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        name: str = "link",
    ) -> None:
        self.transport = transport
        self.name = name
        self.peer: Optional[str] = None
        self.peer_max_frame = wire.DEFAULT_MAX_FRAME
        #: A leaf reaches nothing behind it (a plugin): the routes it announces are ignored.
        self.leaf = False
        self._on_frame = on_frame
        self._on_close = on_close
        self._frames = wire.FrameReader(max_frame, SPLIT_SIZE if transport.small_reads else 0)
        self._read_size = READ_SIZE
        self._lock = threading.Lock()
        self._writer_gate = Gate()
        self._backlog: List[_Item] = []
        self._writer_busy = False
        self._closed = False
        self._eof = False
        self.close_reason: Optional[BaseException] = None
        self._deferred: List[Callable[[], None]] = []
        self.sent = False  # set by every send, cleared by a keepalive sender (remowt.rpc.keepalive)
        self.heard = False  # set by every read that brought bytes, cleared by a silence watch
        self._turn = threading.Lock()  # held by whichever thread reads and dispatches (see _read_here)
        self._leader = threading.RLock()  # held by the one caller that waits by reading (see lead)
        self._leads = 0  # how many callers led so far: the parked reader stays parked while this grows
        self._park_wanted = False
        self._followers = 0  # callers that wait without leading: the reader stays on the fd for them
        self._park_gate = Gate()
        self._reader = threading.Thread(target=self._read_loop, name=f"remowt-read-{name}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"remowt-write-{name}", daemon=True)

    def start(self) -> None:
        """Start the reader and writer threads."""
        start(self._writer)
        start(self._reader)
        self.transport.on_arrival(self._read_here)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, *parts: Part) -> None:
        """Queue one encoded frame (or several), given as consecutive parts; never waits for the peer.

        The parts are sent as they are, not copied: they must not change afterwards.
        """
        held = _held.links
        if held is not None:
            held.setdefault(self, []).extend(parts)
            return
        self.sent = True
        if len(parts) == 1 and not isinstance(parts[0], Spliced) and self._send_whole(parts[0]):
            return
        items = [part if isinstance(part, Spliced) else memoryview(part) for part in parts if len(part)]
        sent: List[Spliced] = []
        dropped: List[_Item] = []
        failed = False
        with self._lock:
            if self._closed:
                dropped = items
            elif self._backlog or self._writer_busy or not self._may_write_here(items):
                self._writer_gate.open()  # first: an interrupt may lose these frames, never strand them
                self._backlog += items
            else:
                try:
                    self._put(items, False, sent)
                except OSError as e:
                    dropped = items + self._fail_locked(e)
                    failed = True
                else:
                    if items:
                        self._writer_gate.open()
                        self._backlog = items
        if failed:
            self.transport.close()
        _report(sent, dropped)

    def _send_whole(self, data: Buffer) -> bool:
        """The usual case made short: one buffer written here at once; False to take the general way."""
        if threading.get_ident() == _MAIN_THREAD and not len(data) <= self.transport.atomic_write:
            return False
        with self._lock:
            if self._closed or self._backlog or self._writer_busy:
                return False
            view = memoryview(data)
            try:
                written = self.transport.writev((view,), False)
            except OSError:
                return False  # nothing left: the general way meets the error again and fails the link
            if written < len(view):
                self._writer_gate.open()
                self._backlog = [view[written:]]
            return True

    def _may_write_here(self, items: List[_Item]) -> bool:
        """Whether the sending thread may write ``items`` to the transport itself.

        Signal handlers (and so KeyboardInterrupt) run in the main thread, where
        they may strike between a write and its bookkeeping: there, only a write
        that is all or nothing is safe; bigger ones go to the writer thread.
        """
        if threading.get_ident() != _MAIN_THREAD:
            return True
        atomic = self.transport.atomic_write
        return (
            bool(atomic)
            and sum(len(item) for item in items) <= atomic
            and not any(isinstance(item, Spliced) for item in items)
        )

    def _put(self, items: List[_Item], block: bool, sent: List[Spliced]) -> None:
        """Write ``items`` from the front, removing what left (and adding finished splices to ``sent``).

        Without ``block`` it stops when the transport takes no more at once.
        """
        transport = self.transport
        while items:
            head = items[0]
            if isinstance(head, Spliced):
                moved = transport.splice_from(head.fd, head.count, block)
                if not moved:
                    return
                head.count -= moved
                if not head.count:
                    del items[0]
                    sent.append(head)
                continue
            buffers: List[memoryview] = []
            for item in items:
                if isinstance(item, Spliced):
                    break
                buffers.append(item)
            written = transport.writev(buffers, block)
            if not written:
                return
            done = 0
            while done < len(buffers) and len(buffers[done]) <= written:
                written -= len(buffers[done])
                done += 1
            del items[:done]
            if written:
                items[0] = buffers[done][written:]

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                items, self._backlog = self._backlog, []
                self._writer_busy = bool(items)
                if not items:
                    waiter = self._writer_gate.enlist()
            if not items:
                wait_on(waiter)
                continue
            sent: List[Spliced] = []
            try:
                self._put(items, True, sent)
            except OSError as e:
                with self._lock:
                    self._writer_busy = False
                    items += self._fail_locked(e)
                self.transport.close()
                _report(sent, items)
                return
            with self._lock:
                self._writer_busy = False
            _report(sent, [])

    def _fail_locked(self, error: BaseException) -> List[_Item]:
        """Mark the link failed; returns the backlog, which will never be sent."""
        if self.close_reason is None:
            self.close_reason = error
        self._closed = True
        self._writer_gate.open()
        dropped, self._backlog = self._backlog, []
        return dropped

    def _shut(self) -> None:
        """Mark the link closed and give up what is still queued."""
        with self._lock:
            self._closed = True
            self._writer_gate.open()
            self._park_gate.open()
            dropped, self._backlog = self._backlog, []
        _report([], dropped)

    def _read_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    park = self._park_wanted and not self._followers and not self._closed
                    if park:
                        leads = self._leads
                        waiter = self._park_gate.enlist()
                if park:
                    wait_on(waiter, LINGER)
                    with self._lock:
                        if self._leads == leads and not held_elsewhere(self._leader):
                            self._park_wanted = False
                    continue
                self.transport.wait_readable(None)
                with self._turn:
                    going = self._read_available()
                if held_elsewhere(self._leader):
                    self.transport.wake_caller()  # what it waits for may have come: it looks again
                if not going:
                    break
        finally:
            self._run_deferred()
            self._shut()
            self.transport.close()
            self._on_close(self, self.close_reason)

    def defer(self, action: Callable[[], None]) -> None:
        """Run ``action`` (on the reader thread) once the frames read so far are dispatched, before it waits again.

        For waking callers: a woken caller then finds this thread asleep, not holding the GIL.
        """
        self._deferred.append(action)

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for action in deferred:
            action()

    def lead(
        self,
        done: Callable[[], bool],
        timeout: Optional[float],
        waiter: Optional[threading.Lock] = None,
        spin: bool = False,
    ) -> Optional[bool]:
        """Wait until ``done()`` by reading the link on this thread, which saves a thread switch per answer.

        None when this thread cannot (the transport has no fd to wait on,
        another caller leads, the link ends): then it must wait as usual,
        through :meth:`follow`. Else whether ``done()`` came within
        ``timeout``. While a caller leads, the reader thread keeps off the
        fd; it comes back :data:`LINGER` after the last one, or at once for
        a thread that waits without leading, and stays while one does.
        Reading and dispatching run with the signals held off; a
        KeyboardInterrupt strikes only in the wait between, where nothing is
        half done, and the lead is given up on the way out, wherever the
        interrupt struck (the lock is this thread's).
        ``waiter``: the gate's lock that ``done()`` watches, which another
        thread may release (a stream closed here): that wakes this one too.
        ``spin``: the answer is expected within :data:`SPIN`, so poll for it
        (yielding the CPU) before sleeping.
        """
        leader = self._leader
        if not self.transport.callers_wait or owns(leader):
            return None
        try:
            if not leader.acquire(False):
                return None
            if waiter is not None:
                wake_on_release(waiter, self._wake_leader)
            self._leads += 1
            if not self._park_wanted and not self._followers:
                self._park_wanted = True
                self.transport.nudge()
            end = None if timeout is None else time.monotonic() + timeout
            spin_end = time.perf_counter() + SPIN if spin else 0.0
            while not done():
                left = None if end is None else max(0.0, end - time.monotonic())
                if spin_end:
                    ready = self.transport.wait_for_caller(0.0)
                    if ready is False:
                        if time.perf_counter() > spin_end:
                            spin_end = 0.0
                        else:
                            os.sched_yield()  # the peer may run on this CPU
                        continue
                else:
                    ready = self.transport.wait_for_caller(left)
                if ready is None:
                    return None
                if not ready:
                    if end is not None and time.monotonic() >= end:
                        return done()
                    continue
                going = without_interrupts(functools.partial(self._read_for, done))
                if going is None:  # the reader thread has the turn: it wakes this one when it is through
                    if not owns(leader):  # it brought the answer meanwhile: the lead, and the poller, are given up
                        return True
                    if self.transport.wait_for_caller(left, data=False) is None:
                        return None
                elif not going:
                    self._unpark()  # the reader thread closes the link and reports the close
                    return None
            return True
        finally:
            # Given up first, with no call before it: a signal handler runs at calls, and one cutting in before
            # the release left this thread the leader for good (and every later wait a follower's). Not
            # contextlib.suppress: making one is a call.
            try:  # noqa: SIM105
                leader.release()
            except RuntimeError:
                pass  # not taken here: another thread leads
            if waiter is not None:
                forget(waiter)

    def _wake_leader(self) -> None:
        if not owns(self._leader):  # the leader itself needs no waking: it looks at done() next
            self.transport.wake_caller()

    def _read_for(self, done: Callable[[], bool]) -> Optional[bool]:
        """:meth:`_read_here` for the leader, which stops leading in the same breath once ``done()``."""
        going = self._read_here()
        if done():
            self._leader.release()
        return going

    def wait(self, waiter: threading.Lock, timeout: Optional[float] = None) -> bool:
        """:func:`~remowt.runtime.waiting.wait_on` ``waiter``, which a frame from this link releases: led if it can."""
        led = self.lead(functools.partial(_released, waiter), timeout, waiter)
        if led is not None:
            return led
        return self.follow(functools.partial(wait_on, waiter, timeout))

    def follow(self, wait: Callable[[], T]) -> T:
        """Return ``wait()``, a wait for what the link brings that this thread does not read: the reader reads.

        The reader thread stays on the fd (no caller parks it) until every such wait is over.
        """
        counted = False
        try:
            with self._lock:
                self._followers += 1
                counted = True
                self._unpark_locked()
            return wait()
        finally:
            if counted:
                with self._lock:
                    self._followers -= 1

    def _unpark(self) -> None:
        with self._lock:
            self._unpark_locked()

    def _unpark_locked(self) -> None:
        """Put the reader thread back on the fd now (the lock held)."""
        self._park_wanted = False
        self._park_gate.open()

    def _read_here(self) -> Optional[bool]:
        """Read and dispatch on the calling thread, which brought data (see :meth:`Transport.on_arrival`).

        None if another thread has the turn (it will see the data); else
        whether the link goes on. When it does not, the reader thread must
        be woken: it closes the transport and reports the close.
        """
        if not self._turn.acquire(False):
            return None
        try:
            return self._read_available()
        finally:
            self._turn.release()

    def _read_available(self) -> bool:
        """Read and dispatch what is there now; False once the link is done (the reader thread then closes it)."""
        if self._eof:
            return False
        try:
            frames = self._frames
            transport = self.transport
            while True:
                payload = frames.payload_left
                size = payload or self._read_size
                data = transport.read(size)
                if data is None:
                    transport.expect(frames.missing)
                    self._run_deferred()
                    return True
                if not data:
                    break
                self.heard = True
                items = frames.feed(data)
                self._read_size = HEAD_READ if payload or frames.payload_left else READ_SIZE
                for item in items:
                    self._on_frame(self, item)
                if self._deferred and len(data) < size and transport.small_reads:
                    transport.expect(frames.missing)  # a short read took all there was
                    self._run_deferred()
                    return True
        except ProtocolError as e:
            log.warning("closing %s: %s", self.name, e)
            self._set_reason(e)
        except Exception as e:  # a bug in a handler must not leave the link half-alive
            log.exception("closing %s after an unexpected error", self.name)
            self._set_reason(e)
        self._eof = True
        return False

    def _set_reason(self, error: BaseException) -> None:
        with self._lock:
            if self.close_reason is None:
                self.close_reason = error

    def close(self) -> None:
        """Close the transport; the reader thread then reports the close."""
        self._shut()
        self.transport.close()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for both threads to finish."""
        for thread in (self._reader, self._writer):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)


def _released(waiter: threading.Lock) -> bool:
    return not waiter.locked()


def _report(sent: List[Spliced], dropped: List[_Item]) -> None:
    """Tell splices whether their bytes left."""
    for splice in sent:
        splice.on_sent(True)
    for item in dropped:
        if isinstance(item, Spliced):
            item.on_sent(False)
