"""The router: one per process, with its own address, links and services.

It sends calls and returns futures, dispatches incoming calls to services,
forwards what is addressed to others along learned routes, and carries the
stream messages for :mod:`remowt.rpc.streams`. The route decisions themselves are
in :mod:`remowt.protocol.routing`; threads live in :mod:`remowt.rpc.link` and
:mod:`remowt.runtime.workers`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, Union

import msgspec

from ..errors import (
    REMOTE_ERRORS,
    BadArguments,
    ConnectionLost,
    InternalError,
    ProtocolError,
    RemoteError,
    ResultTooLarge,
    UnknownMethod,
    Unreachable,
    os_name_text,
    remote_os_error,
)
from ..protocol import dispatch, wire
from ..protocol.budget import MAX_UNACCEPTED, PeerBudget
from ..protocol.dispatch import Bounce, StreamEvent, answers, clip, decide, no_such_stream, stream_key
from ..protocol.routing import RouteTable
from ..protocol.streamstate import DEFAULT_WINDOW, MAX_WINDOW, StreamKey
from ..runtime.deadline import Deadline, lock_timeout
from ..runtime.secret import wipe
from ..runtime.waiting import Flag, Gate, wait_on
from ..runtime.workers import WorkerPool
from ..transports.base import Transport
from .link import SPIN, Link, Part
from .streams import Stream

if TYPE_CHECKING:
    from ..protocol.service import MethodSpec, Result

log = logging.getLogger("remowt.router")
HANDSHAKE_TIMEOUT = 30.0


class Pending:
    """The future of one outgoing call: a lock released by the link's reader thread when the answer arrives.

    A caller reads the link itself while it waits where it can
    (:meth:`Link.lead`: one thread switch fewer per call), with the signals
    held off while it reads and dispatches, so a signal handler or a
    KeyboardInterrupt strikes only between, where nothing is half done. A
    caller that stops waiting (a timeout) abandons the call: the router
    forgets it and drops its answer if one still comes.
    """

    __slots__ = ("_call_id", "_error", "_lock", "_result", "_router", "dst", "kind", "late", "link", "secret", "sent")

    def __init__(
        self, dst: str, link: Link, router: Router, call_id: int, secret: bool = False, kind: Tuple[int, int] = (0, 0)
    ) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: Optional[Result] = None
        self._error: Optional[BaseException] = None
        self._router = router
        self._call_id = call_id
        self.dst = dst
        self.link = link
        self.secret = secret
        self.kind = kind  # the call's namespace and method
        self.sent = time.perf_counter()
        self.late: Optional[Callable[[Optional[Result], Optional[BaseException]], None]] = None

    def resolve(self, result: Optional[Result], error: Optional[BaseException]) -> None:
        transport = self.link.transport
        spun = SPIN if transport.callers_wait else transport.caller_spin  # how long the next such wait polls
        self._router.quick[self.dst, self.kind] = time.perf_counter() - self.sent < spun
        self._result, self._error = result, error
        late = self.late
        self._lock.release()
        if late is not None:
            late(result, error)

    def done(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for the answer; whether it came."""
        if not self._lock.locked():
            return True
        quick = self._router.quick.get((self.dst, self.kind), True)
        led = self.link.lead(self.done, timeout, spin=quick)
        if led is not None:
            return led
        if quick and self._spin(self.link.transport.caller_spin, timeout):
            return True
        return self.link.follow(functools.partial(self._wait, timeout))

    def _spin(self, budget: float, timeout: Optional[float]) -> bool:
        """Poll for the answer up to ``budget`` seconds (``timeout`` at most), yielding the CPU; whether it came."""
        if timeout is not None:
            budget = min(budget, timeout)
        if budget <= 0:
            return False
        lock = self._lock
        end = time.perf_counter() + budget
        while lock.locked():
            if time.perf_counter() > end:
                return False
            os.sched_yield()
        return True

    def _wait(self, timeout: Optional[float]) -> bool:
        if not self._lock.acquire(True, lock_timeout(timeout)):
            return False
        self._lock.release()
        return True

    def result(self, timeout: Optional[float] = None) -> Result:
        """The raw msgpack result; raises the remote error, ``ConnectionLost`` or ``TimeoutError``.

        On a timeout the call is abandoned (see :meth:`abandon`).
        """
        if not self.wait(timeout) and self.abandon():
            raise TimeoutError(f"no answer from {self.dst} within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def abandon(self, late: Optional[Callable[[Optional[Result], Optional[BaseException]], None]] = None) -> bool:
        """Stop waiting for the answer; False (and nothing changed) if it has already arrived.

        Without ``late`` the router forgets the call and drops its answer. With
        ``late``, the call stays known until its answer (or the link's end),
        which is given to ``late(result, error)`` on the reader thread (it must
        not block): for a call whose effect must be undone when it happens.
        """
        if not self._router._abandon(self._call_id, self, late):
            self.link.follow(
                functools.partial(self._wait, None)
            )  # the answer is on its way: released after the batch it came in
            return False
        return True


class _Service:
    """A registered service: its methods by number, bound to the implementation."""

    def __init__(self, name: str, methods: Dict[int, Tuple[MethodSpec, Callable[..., Any]]]) -> None:
        self.name = name
        self.methods = methods


class Router:
    """One node of the remowt network."""

    def __init__(self, address: str, *, max_workers: int = 64, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.address = wire.check_address(address)
        if max_frame < wire.MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {wire.MIN_MAX_FRAME} bytes, got {max_frame}")
        self.max_frame = max_frame
        self._lock = threading.Lock()
        self._routes: RouteTable[Link] = RouteTable(self.address)
        self._announced: Dict[Link, List[Tuple[str, int]]] = {}
        self._links: List[Link] = []
        self._handshakes: Dict[Link, Flag] = {}
        self._pending: Dict[int, Pending] = {}
        # whether the last answer to each kind of call (destination, namespace, method) came within a spin
        self.quick: Dict[Tuple[str, Tuple[int, int]], bool] = {}
        self._call_ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._streams: Dict[StreamKey, Stream] = {}
        self._budgets: Dict[Link, PeerBudget] = {}
        self._services: Dict[int, _Service] = {}
        self._lazy: Dict[int, Callable[[], object]] = {}  # namespaces served once first called (register_lazy)
        self._loading = threading.Lock()
        self._link_closed_hooks: List[Callable[[Link, Optional[BaseException]], None]] = []
        self._routes_changed = Gate()
        self._local = threading.local()
        self._pool = WorkerPool(max_workers, f"remowt-{self.address}-worker")
        self._lost: Set[str] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Router {self.address}>"

    # --- links ----------------------------------------------------------

    def add_link(
        self,
        transport: Transport,
        *,
        timeout: float = HANDSHAKE_TIMEOUT,
        name: Optional[str] = None,
        leaf: bool = False,
    ) -> Link:
        """Attach a transport, exchange hellos, and return the ready link.

        A ``leaf`` peer (a plugin) is reached, but reaches nothing for this
        router: the routes it announces are ignored, so it can never take
        another node's address.
        """
        link = Link(
            transport,
            self._on_frame,
            self._on_link_closed,
            max_frame=self.max_frame,
            name=name or f"{self.address}-{transport.name}",
        )
        link.leaf = leaf
        ready = Flag()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._links.append(link)
            self._handshakes[link] = ready
        link.send(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, self.address, self.max_frame)))
        link.start()
        if not ready.wait(timeout):
            link.close()
            raise ConnectionLost(f"no handshake from the peer of {link.name} within {timeout} s")
        if link.peer is None:
            link.join(1.0)
            reason = link.close_reason
            if isinstance(reason, ProtocolError):
                raise reason
            raise ConnectionLost(f"{link.name} closed during the handshake" + (f": {reason}" if reason else ""))
        return link

    def on_link_closed(self, hook: Callable[[Link, Optional[BaseException]], None]) -> None:
        """Call ``hook(link, reason)`` on the reader thread whenever a link closes."""
        self._link_closed_hooks.append(hook)

    def links(self) -> List[Link]:
        with self._lock:
            return list(self._links)

    def reachable(self) -> Dict[str, int]:
        """Every address this router can reach now, with hop counts."""
        with self._lock:
            return self._routes.reachable()

    def wait_reachable(self, address: str, timeout: float) -> bool:
        """Wait until ``address`` has a route; False on timeout."""
        return self._wait_routes(lambda: self._routes.next_hop(address) is not None, timeout)

    def wait_unreachable(self, address: str, timeout: float) -> bool:
        """Wait until ``address`` has no route; False on timeout."""
        return self._wait_routes(lambda: self._routes.next_hop(address) is None, timeout)

    def _wait_routes(self, holds: Callable[[], bool], timeout: float) -> bool:
        deadline = Deadline(timeout)
        while True:
            with self._lock:
                if holds():
                    return True
                waiter = self._routes_changed.enlist()
            if not wait_on(waiter, deadline.left()):
                with self._lock:
                    return holds()

    # --- services -------------------------------------------------------

    def register(self, implementation: object) -> None:
        """Serve a service implementation (an instance of a declared service)."""
        from ..protocol.service import bind_methods

        namespace, name, methods = bind_methods(implementation)
        with self._lock:
            if namespace in self._services:
                raise ValueError(f"namespace {namespace} is already served by {self._services[namespace].name}")
            self._services[namespace] = _Service(name, methods)

    def register_lazy(self, namespace: int, load: Callable[[], object]) -> None:
        """Serve namespace ``namespace`` with the implementation ``load()`` returns, made at its first call.

        For services few connections use: their modules are imported then, not at start-up.
        """
        with self._lock:
            if namespace in self._services or namespace in self._lazy:
                raise ValueError(f"namespace {namespace} is already served")
            self._lazy[namespace] = load

    def stop_loading(self) -> None:
        """Make no more lazy services (their calls fail as unknown); returns once one being made is registered."""
        with self._loading, self._lock:
            self._lazy.clear()

    def _service(self, namespace: int) -> Optional[_Service]:
        """The service of ``namespace``; a lazy one is made now (on the thread that dispatches its first call)."""
        service = self._services.get(namespace)
        if service is not None or namespace not in self._lazy:
            return service
        with self._loading:
            load = self._lazy.get(namespace)
            if load is not None:
                try:
                    implementation = load()
                except Exception:  # a bug: its calls fail as unknown, the link and the rest go on
                    log.exception("%s could not load the service of namespace %d", self.address, namespace)
                    return None
                with self._lock:
                    del self._lazy[namespace]
                self.register(implementation)
        return self._services.get(namespace)

    def caller(self) -> str:
        """The address whose call the current thread is handling."""
        caller: Optional[str] = getattr(self._local, "caller", None)
        if caller is None:
            raise RuntimeError("Router.caller() called outside a call handler")
        return caller

    # --- outgoing -------------------------------------------------------

    def call(self, dst: str, ns: int, method: int, args: bytes, secret: bool = False) -> Pending:
        """Send a call; the returned future gives the raw msgpack result.

        ``secret``: the result (a password) is given as a bytearray, the caller's to wipe, and it is
        wiped where it was read (a frame read whole; the pieces of one split across reads are not).
        """
        with self._lock:
            link = self._route_locked(dst)
            call_id = next(self._call_ids)
            pending = Pending(dst, link, self, call_id, secret, (ns, method))
            self._pending[call_id] = pending
        frame = wire.encode(wire.Call(call_id, self.address, dst, ns, method, msgspec.Raw(args)))
        if len(frame) > link.peer_max_frame + wire.HEADER.size:
            with self._lock:
                self._pending.pop(call_id, None)
            raise wire.too_large(frame, link.peer_max_frame, f"the call of ns {ns} method {method} at {dst}")
        link.send(frame)
        if link.closed:
            self._fail_pending(lambda p: p is pending, f"link to {dst} closed")
        return pending

    def _abandon(
        self,
        call_id: int,
        pending: Pending,
        late: Optional[Callable[[Optional[Result], Optional[BaseException]], None]],
    ) -> bool:
        """Forget (or, with ``late``, hand over) a call nobody waits for; False if its answer already came."""
        with self._lock:
            if self._pending.get(call_id) is not pending:
                return False
            if late is None:
                del self._pending[call_id]
            else:
                pending.late = late
            return True

    def wait_for(self, dst: str, waiter: threading.Lock, timeout: Optional[float] = None) -> bool:
        """Wait until ``waiter`` (a :class:`Gate`'s) is released by what comes from ``dst``; False on ``timeout``.

        Where it can, the waiting thread reads the link to ``dst`` itself (:meth:`Link.lead`).
        """
        with self._lock:
            link = self._routes.next_hop(dst)
        if link is None:
            return wait_on(waiter, timeout)
        return link.wait(waiter, timeout)

    def pending_count(self) -> int:
        """How many calls wait for an answer (tests: nothing leaks)."""
        with self._lock:
            return len(self._pending)

    def notify(self, dst: str, ns: int, method: int, args: bytes) -> None:
        """Send a one-way call; raises ``Unreachable`` if there is no route."""
        with self._lock:
            link = self._route_locked(dst)
        frame = wire.encode(wire.Notify(self.address, dst, ns, method, msgspec.Raw(args)))
        if len(frame) > link.peer_max_frame + wire.HEADER.size:
            raise wire.too_large(frame, link.peer_max_frame, f"the notification of ns {ns} method {method} at {dst}")
        link.send(frame)

    def send_routed(self, dst: str, *parts: Part) -> bool:
        """Send an encoded frame (in one or more parts, see :meth:`Link.send`) towards ``dst``; False if no route."""
        with self._lock:
            link = self._routes.next_hop(dst)
        if link is None:
            return False
        link.send(*parts)
        return True

    def splices_to(self, dst: str) -> bool:
        """Whether frames towards ``dst`` may carry :class:`~remowt.rpc.link.Spliced` parts."""
        with self._lock:
            link = self._routes.next_hop(dst)
        return link is not None and link.transport.splices

    def _route_locked(self, dst: str) -> Link:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")
        link = self._routes.next_hop(dst)
        if link is None:
            if dst in self._lost:
                raise ConnectionLost(f"connection from {self.address} to {dst} was lost")
            known = ", ".join(sorted(self._routes.reachable())) or "nothing"
            raise Unreachable(f"no route from {self.address} to {dst!r} (reachable: {known})")
        return link

    # --- streams --------------------------------------------------------

    def open_stream(self, dst: str, window: int = DEFAULT_WINDOW, *, one_way: bool = False) -> Stream:
        """Open a stream to ``dst``; pass ``stream.sid`` to the peer to accept it.

        ``one_way``: only this side writes; the peer accepts it with :meth:`Stream.receive_only`.
        """
        if not 0 < window <= MAX_WINDOW:
            raise ValueError(f"a stream's window must be 1 to {MAX_WINDOW} bytes, got {window}")
        with self._lock:
            link = self._route_locked(dst)
            stream = Stream(self, dst, self.address, next(self._stream_ids), window, one_way)
            self._streams[stream.key] = stream
        link.send(wire.encode(wire.Open(self.address, dst, stream.sid, window)))
        return stream

    def accept_stream(self, src: str, sid: int) -> Stream:
        """The local end of stream ``sid`` that ``src`` opened."""
        with self._lock:
            stream = self._streams.get((src, sid))
            if stream is not None and not stream.accepted:
                stream.accepted = True
                self._release_unaccepted_locked(stream)
        if stream is None:  # never opened, or already reset: its opener gave up on it (an interrupt, say)
            raise BrokenPipeError(errno.EPIPE, f"stream {sid} from {src} is not open here")
        return stream

    def hold_unaccepted(self, stream: Stream, size: int) -> bool:
        """Charge ``size`` bytes that arrived on ``stream`` before anyone accepted it to its link, within a bound.

        False when the stream was refused for it (its bytes are to be dropped).
        """
        with self._lock:
            budget = stream.budget
            if stream.accepted or budget is None or self._streams.get(stream.key) is not stream:
                return True
            fits = budget.hold(size)
            if fits:
                stream.charged += size
            elif stream.peer != budget.peer:
                self._drop_stream_locked(stream)
        if not fits:
            self._refuse_stream(
                budget,
                stream.peer,
                stream.sid,
                f"sent more than {MAX_UNACCEPTED} bytes on streams nobody here accepted",
            )
        return fits

    def _release_unaccepted_locked(self, stream: Stream) -> None:
        if stream.charged and stream.budget is not None:
            stream.budget.release(stream.charged)
            stream.charged = 0

    def forget_stream(self, stream: Stream) -> None:
        with self._lock:
            if self._streams.get(stream.key) is stream:
                self._drop_stream_locked(stream)

    def _drop_stream_locked(self, stream: Stream) -> None:
        del self._streams[stream.key]
        self._release_unaccepted_locked(stream)
        if stream.budget is not None:
            stream.budget.stream_gone()

    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)

    # --- incoming (reader threads) ---------------------------------------

    def _on_frame(self, link: Link, body: wire.Item) -> None:
        message = body if isinstance(body, wire.Data) else wire.decode(body)
        if link.peer is None:
            self._on_hello(link, message)
            return
        if isinstance(message, wire.Hello):
            raise ProtocolError(f"second hello from {link.peer}")
        if isinstance(message, wire.Routes):
            self._on_routes(link, message)
            return
        with self._lock:
            decision = decide(self._routes, link, message, body)
        take = _TAKERS.get(decision)
        if take is not None:
            take(self, link, message)
        elif isinstance(decision, Bounce):
            if decision.answer is not None:
                self.send_routed(decision.answer.dst, wire.encode(decision.answer))
        elif isinstance(decision, dispatch.Act):  # the one left: DROP
            log.debug("dropping %s from %s: it came over %s", type(message).__name__, message.src, link.name)
        elif isinstance(body, wire.Data):  # forward a piece of a payload the link read apart from its frame
            decision.send(*wire.data_frame(body))
        else:  # forward the frame
            decision.send(wire.HEADER.pack(len(body)), body)

    def _on_hello(self, link: Link, message: wire.Message) -> None:
        if not isinstance(message, wire.Hello):
            raise ProtocolError(f"expected hello, got {type(message).__name__.lower()}")
        if message.version != wire.PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks remowt protocol version {message.version}, this side speaks {wire.PROTOCOL_VERSION}"
            )
        try:
            peer = wire.check_address(message.address)
        except ValueError as e:
            raise ProtocolError(f"bad hello: {e}") from None
        with self._lock:
            if peer == self.address or peer in self._routes.reachable():
                raise ProtocolError(f"peer address {peer!r} is already taken")
            if message.max_frame < wire.MIN_MAX_FRAME:
                raise ProtocolError(f"{peer} takes frames of at most {message.max_frame} bytes: too few to talk")
            link.peer = peer
            link.peer_max_frame = message.max_frame
            self._routes.link_up(link, peer)
            self._announce_locked()
            ready = self._handshakes.pop(link, None)
        if ready is not None:
            ready.set()

    def _on_routes(self, link: Link, message: wire.Routes) -> None:
        if link.leaf:
            if message.reachable:
                log.warning("ignoring the routes %s announced by %s: it is a leaf", message.reachable, link.peer)
            return
        reachable = []
        for address, hops in message.reachable:
            try:
                reachable.append((wire.check_address(address), hops))
            except ValueError as e:
                raise ProtocolError(f"bad route announcement: {e}") from None
        with self._lock:
            lost = self._routes.advertised(link, reachable)
            self._announce_locked()
        self._lose(lost, None)

    def _announce_locked(self) -> None:
        self._lost -= set(self._routes.reachable())
        for link, advert in self._routes.signature().items():
            if self._announced.get(link) != advert:
                self._announced[link] = advert
                link.send(wire.encode(wire.Routes(advert)))
        self._routes_changed.open()

    def _on_call(self, link: Link, message: wire.Call) -> None:
        service = self._service(message.ns)
        entry = None if service is None else service.methods.get(message.method)
        if entry is None:
            what = f"namespace {message.ns}" if service is None else f"method {message.method} in {service.name}"
            self._fail_call(message, UnknownMethod(f"{self.address} serves no {what}"))
            return
        spec, handler = entry
        if spec.inline:
            self._run_call(message, spec, handler)
        else:
            self._pool.submit(self._run_call, message, spec, handler)

    def _run_call(self, message: wire.Call, spec: MethodSpec, handler: Callable[..., Any]) -> None:
        try:
            result = self._invoke(message.src, message.args, spec, handler)
            encoded = wire.encode_value(result)
        except BaseException as e:  # every failure becomes a reply; nothing escapes
            self._fail_call(message, e)
            return
        reply = wire.encode(wire.Reply(message.id, self.address, message.src, msgspec.Raw(encoded)))
        if spec.secret:  # the frame keeps the one copy left, until it is sent
            if isinstance(result, bytearray):
                wipe(result)
            wipe(encoded)
        with self._lock:
            link = self._routes.next_hop(message.src)
        if link is None:
            return
        if len(reply) > link.peer_max_frame + wire.HEADER.size:
            error = wire.too_large(reply, link.peer_max_frame, f"the result of {spec.name}")
            self._fail_call(message, ResultTooLarge(str(error)))
            return
        link.send(reply)

    def _on_notify(self, link: Link, message: wire.Notify) -> None:
        service = self._service(message.ns)
        entry = None if service is None else service.methods.get(message.method)
        if entry is None:
            log.warning("%s sent a notification for unknown ns %d method %d", message.src, message.ns, message.method)
            return
        spec, handler = entry
        if spec.inline:
            self._run_notify(message, spec, handler)
        else:
            self._pool.submit(self._run_notify, message, spec, handler)

    def _run_notify(self, message: wire.Notify, spec: MethodSpec, handler: Callable[..., Any]) -> None:
        try:
            self._invoke(message.src, message.args, spec, handler)
        except Exception:
            log.exception("notification %s from %s failed", spec.name, message.src)

    def _invoke(self, src: str, raw: msgspec.Raw, spec: MethodSpec, handler: Callable[..., Any]) -> Any:
        try:
            args = spec.decode_args(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as e:
            raise BadArguments(f"bad arguments for {spec.name}: {e}") from None
        outer = getattr(self._local, "caller", None)
        self._local.caller = src
        try:
            return handler(*args)
        finally:
            self._local.caller = outer

    def _fail_call(self, message: wire.Call, error: BaseException) -> None:
        if isinstance(error, OSError) and error.errno is not None:
            fail = wire.Fail(
                message.id,
                self.address,
                message.src,
                "os-error",
                clip(error.strerror or str(error)),
                error.errno,
                None if error.filename is None else clip(os_name_text(error.filename)),
            )
        elif isinstance(error, RemoteError):
            fail = wire.Fail(message.id, self.address, message.src, error.kind, clip(error.message))
        elif isinstance(error, Unreachable):
            fail = wire.Fail(message.id, self.address, message.src, "unreachable", clip(str(error)))
        else:
            log.exception("call to ns %d method %d failed", message.ns, message.method, exc_info=error)
            fail = wire.Fail(
                message.id, self.address, message.src, InternalError.kind, clip(f"{type(error).__name__}: {error}")
            )
        self.send_routed(message.src, wire.encode(fail))

    def _on_answer(self, link: Link, message: Union[wire.Reply, wire.Fail]) -> None:
        with self._lock:
            pending = self._pending.get(message.id)
            if pending is None or not answers(message, pending.dst):
                return
            del self._pending[message.id]
        if isinstance(message, wire.Reply):
            if pending.secret:
                result: Result = bytearray(message.result)
                wipe(message.result)
            else:
                result = bytes(message.result)
            link.defer(lambda: pending.resolve(result, None))
        else:
            error = error_from_fail(message)
            link.defer(lambda: pending.resolve(None, error))

    def _on_stream_message(self, link: Link, message: StreamEvent) -> None:
        key = stream_key(self.address, message)
        with self._lock:
            stream = self._streams.get(key)
        if stream is None or stream.peer != message.src:  # only the stream's other end may speak on it
            reset = no_such_stream(self.address, message)
            if reset is not None:
                self.send_routed(reset.dst, wire.encode(reset))
        elif isinstance(message, wire.Data):
            try:
                stream.on_data(message.data)
            except ProtocolError as e:
                self._broken_stream(link, stream, e)
        elif isinstance(message, wire.Credit):
            try:
                stream.on_credit(message.amount)
            except ProtocolError as e:
                self._broken_stream(link, stream, e)
        elif isinstance(message, wire.Eof):
            stream.on_eof()
        else:
            self.forget_stream(stream)
            stream.on_reset(message.reason)

    def _broken_stream(self, link: Link, stream: Stream, error: ProtocolError) -> None:
        """The neighbour broke the protocol on ``stream``: its link ends; a node behind it: that stream is reset."""
        if stream.peer == link.peer:
            raise error
        self.forget_stream(stream)
        stream.abort(error)

    def _on_open(self, link: Link, message: wire.Open) -> None:
        src = message.src
        with self._lock:
            key = (src, message.sid)
            if key in self._streams:
                return
            budget = self._budgets.get(link)
            if budget is None:
                budget = self._budgets[link] = PeerBudget(link.peer)
            why = budget.admit(message.window)
            if why is None:
                stream = self._streams[key] = Stream(self, src, src, message.sid, message.window)
                stream.budget = budget
                return
        self._refuse_stream(budget, src, message.sid, why)

    def _refuse_stream(self, budget: PeerBudget, src: str, sid: int, why: str) -> None:
        """A ProtocolError if the neighbour itself did wrong; else the stream of the node behind it is reset."""
        self.send_routed(src, wire.encode(budget.refusal(self.address, src, sid, why)))

    def _on_link_closed(self, link: Link, reason: Optional[BaseException]) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
            self._announced.pop(link, None)
            self._budgets.pop(link, None)
            lost = self._routes.link_down(link)
            self._announce_locked()
            ready = self._handshakes.pop(link, None)
        if ready is not None:
            ready.set()
        self._fail_pending(lambda p: p.link is link, f"link {link.name} to {link.peer} closed")
        self._lose(lost, reason)
        for hook in list(self._link_closed_hooks):
            try:
                hook(link, reason)
            except Exception:
                log.exception("link-closed hook failed")

    def _lose(self, lost: set[str], reason: Optional[BaseException]) -> None:
        if not lost:
            return
        why = f" ({reason})" if reason else ""
        self._fail_pending(lambda p: p.dst in lost, "route lost" + why)
        with self._lock:
            self._lost |= lost
            gone = [s for s in self._streams.values() if s.peer in lost]
            for stream in gone:
                self._drop_stream_locked(stream)
        for stream in gone:
            stream.lost()

    def _fail_pending(self, which: Callable[[Pending], bool], why: str) -> None:
        with self._lock:
            failed = [(cid, p) for cid, p in self._pending.items() if which(p)]
            for cid, _ in failed:
                del self._pending[cid]
        for _, pending in failed:
            pending.resolve(None, ConnectionLost(f"connection to {pending.dst} lost: {why}"))

    # --- shutdown -------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Close every link, fail what is pending, and join all threads."""
        with self._lock:
            self._closed = True
            links = list(self._links)
        for link in links:
            link.close()
        for link in links:
            link.join(timeout)
        self._fail_pending(lambda p: True, "router closed")
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.lost()
        self._pool.shutdown(timeout)


#: Who takes each kind of message for this node, by decision (any other decision is not found here).
_TAKERS: Dict[object, Callable[[Router, Link, Any], None]] = {
    dispatch.STREAM: Router._on_stream_message,
    dispatch.CALL: Router._on_call,
    dispatch.ANSWER: Router._on_answer,
    dispatch.NOTIFY: Router._on_notify,
    dispatch.OPEN: Router._on_open,
}


def error_from_fail(message: wire.Fail) -> BaseException:
    """The exception a ``Fail`` stands for: the matching OSError, ``Unreachable``, or the remote error by kind."""
    if message.kind == "os-error" and message.errno is not None:
        return remote_os_error(message.errno, message.message, message.filename)
    if message.kind == "unreachable":
        return Unreachable(message.message)
    return REMOTE_ERRORS.get(message.kind, RemoteError)(f"{message.src}: {message.message}")
