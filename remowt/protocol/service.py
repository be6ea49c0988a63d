"""Services: declared once, served by the agent, called through typed proxies.

A declaration is a class with a namespace number whose methods carry
:func:`rpc` numbers and type annotations::

    class Greeter(Service, namespace=42):
        @rpc(1)
        def greet(self, name: str) -> str: ...

The serving side subclasses the declaration and implements the methods, then
``router.register(GreeterImpl())``. The calling side gets
``proxy(Greeter, router, "agent")``: an instance of the declaration whose
methods encode their arguments, call the peer and decode the result, so the
two ends are built from the same annotations and cannot drift.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Protocol, Tuple, Type, TypeVar, Union, get_type_hints

import msgspec

from ..errors import RemoteError
from . import wire

F = TypeVar("F", bound=Callable[..., Any])
_VARARGS, _VARKEYWORDS = 0x04, 0x08  # code object flags: *args, **kwargs
S = TypeVar("S", bound="Service")
Result = Union[bytes, bytearray]
"""A call's raw msgpack result: a bytearray (the caller's to wipe) for a ``secret`` method."""


class Answer(Protocol):
    """The future of one call."""

    def result(self, timeout: Optional[float] = None) -> Result:
        """The raw msgpack result, once it came; raises the remote error or ``TimeoutError``."""


class Caller(Protocol):
    """What a proxy calls through (:class:`remowt.rpc.router.Router` is one)."""

    def call(self, dst: str, ns: int, method: int, args: bytes, secret: bool = False) -> Answer:
        """Send a call of method ``method`` in namespace ``ns`` at ``dst`` with encoded ``args``.

        ``secret``: the result is the caller's to wipe, and no other copy of it stays.
        """

    def notify(self, dst: str, ns: int, method: int, args: bytes) -> None:
        """Send a one-way call."""


def rpc(number: int, *, inline: bool = False, oneway: bool = False, secret: bool = False) -> Callable[[F], F]:
    """Mark a declared method with its number.

    ``inline`` handlers run on the link's reader thread: only for handlers
    that never block. ``oneway`` methods are notifications: no reply, the
    proxy returns None at once. A ``secret`` method's result (a password)
    is wiped from the caller's memory once decoded (see
    :meth:`remowt.rpc.router.Router.call`); declare it ``bytearray``, which
    the caller can wipe in turn.
    """
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"method number must be in 0..65535, got {number}")

    def mark(fn: F) -> F:
        fn.__remowt_rpc__ = (number, inline, oneway, secret)  # type: ignore[attr-defined]
        return fn

    return mark


class MethodSpec:
    """What both ends know about one method: number, parameters and codecs."""

    def __init__(
        self, service: str, fn: Callable[..., Any], number: int, inline: bool, oneway: bool, secret: bool
    ) -> None:
        self.name = f"{service}.{fn.__name__}"
        self.attr = fn.__name__
        self.number = number
        self.inline = inline
        self.oneway = oneway
        self.secret = secret
        hints = get_type_hints(fn)
        code = fn.__code__  # not inspect.signature: importing inspect costs the agent's start-up ~3 ms
        if code.co_kwonlyargcount or code.co_flags & (_VARARGS | _VARKEYWORDS):
            raise TypeError(f"{self.name}: parameters must be plain positional parameters")
        self.params = list(code.co_varnames[1 : code.co_argcount])
        for name in self.params:
            if name not in hints:
                raise TypeError(f"{self.name}: parameter {name} needs a type annotation")
        if "return" not in hints:
            raise TypeError(f"{self.name}: the return type must be annotated")
        arg_types = tuple(hints[name] for name in self.params)
        args_type: Any = Tuple[arg_types] if arg_types else Tuple[()]
        self._args: msgspec.msgpack.Decoder[Tuple[Any, ...]] = msgspec.msgpack.Decoder(args_type)
        self._result: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(hints["return"])

    def decode_args(self, raw: bytes) -> Tuple[Any, ...]:
        """The argument tuple; ``msgspec.ValidationError`` (or ``DecodeError``) when ``raw`` does not fit."""
        try:
            return self._args.decode(raw)
        except RecursionError:
            raise msgspec.ValidationError("the arguments are nested too deeply") from None

    def decode_result(self, raw: Result) -> Any:
        """The result; ``msgspec.ValidationError`` when ``raw`` does not fit."""
        try:
            return self._result.decode(raw)
        except RecursionError:
            raise msgspec.ValidationError("the result is nested too deeply") from None

    def encode_args(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bytes:
        if len(args) > len(self.params):
            raise TypeError(f"{self.name}() takes {len(self.params)} arguments, got {len(args)}")
        values = list(args)
        for name in self.params[len(args) :]:
            if name not in kwargs:
                raise TypeError(f"{self.name}() missing argument {name!r}")
            values.append(kwargs.pop(name))
        if kwargs:
            raise TypeError(f"{self.name}() got unexpected arguments {sorted(kwargs)}")
        return wire.encode_value(values)


class Service:
    """Base of service declarations; see the module docstring."""

    namespace: ClassVar[int]
    service_name: ClassVar[str]
    methods: ClassVar[Dict[str, MethodSpec]]

    def __init_subclass__(cls, namespace: Optional[int] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if namespace is None:
            return
        if not 0 <= namespace <= 0xFFFF:
            raise ValueError(f"namespace must be in 0..65535, got {namespace}")
        cls.namespace = namespace
        cls.service_name = cls.__name__
        methods: Dict[str, MethodSpec] = {}
        numbers: Dict[int, str] = {}
        for attr, fn in vars(cls).items():
            mark = getattr(fn, "__remowt_rpc__", None)
            if mark is None:
                continue
            spec = MethodSpec(cls.__name__, fn, *mark)
            if spec.number in numbers:
                raise ValueError(f"{cls.__name__}: {attr} and {numbers[spec.number]} share number {spec.number}")
            numbers[spec.number] = attr
            methods[attr] = spec
        cls.methods = methods


def bind_methods(implementation: object) -> Tuple[int, str, Dict[int, Tuple[MethodSpec, Callable[..., Any]]]]:
    """The namespace, name and ``{number: (spec, bound handler)}`` of an implementation."""
    if not isinstance(implementation, Service) or not hasattr(type(implementation), "methods"):
        raise TypeError(f"{implementation!r} is not an instance of a declared remowt service")
    cls = type(implementation)
    declaration = next(c for c in cls.__mro__ if "methods" in vars(c))
    bound: Dict[int, Tuple[MethodSpec, Callable[..., Any]]] = {}
    for attr, spec in cls.methods.items():
        handler = getattr(implementation, attr)
        if getattr(handler, "__func__", None) is vars(declaration)[attr]:
            raise TypeError(f"{cls.__name__} does not implement {spec.name}")
        bound[spec.number] = (spec, handler)
    return cls.namespace, cls.service_name, bound


_proxy_classes: Dict[type, type] = {}


def proxy(service: Type[S], router: Caller, dst: str, timeout: Optional[float] = None) -> S:
    """An instance of ``service`` whose methods run at ``dst``, each waiting ``timeout`` seconds at most.

    ``router`` carries the calls: a :class:`~remowt.rpc.router.Router`, or any other :class:`Caller`.
    A call that gets no answer in time raises ``TimeoutError`` (a late answer
    is dropped); ``timeout`` None waits as long as the link lives.
    """
    cls = _proxy_classes.get(service)
    if cls is None:
        body: Dict[str, Any] = {}
        for attr, spec in service.methods.items():
            body[attr] = _remote_method(spec, service.namespace)
        cls = type(f"{service.__name__}Proxy", (service,), body)
        _proxy_classes[service] = cls
    instance: S = object.__new__(cls)
    vars(instance).update(_router=router, _dst=dst, _timeout=timeout)
    return instance


def timed(instance: S, timeout: Optional[float]) -> S:
    """A copy of the proxy ``instance`` whose calls wait ``timeout`` seconds at most."""
    copy: S = object.__new__(type(instance))
    vars(copy).update(vars(instance), _timeout=timeout)
    return copy


def _remote_method(spec: MethodSpec, namespace: int) -> Callable[..., Any]:
    if spec.oneway:

        def notify(self: Any, *args: Any, **kwargs: Any) -> None:
            self._router.notify(self._dst, namespace, spec.number, spec.encode_args(args, kwargs))

        notify.__name__ = spec.attr
        return notify

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        raw = self._router.call(self._dst, namespace, spec.number, spec.encode_args(args, kwargs), spec.secret)
        result = raw.result(self._timeout)
        try:
            return spec.decode_result(result)
        except msgspec.ValidationError as e:
            raise RemoteError(f"{spec.name} returned a malformed result: {e}") from None
        finally:
            if spec.secret and isinstance(result, bytearray):  # the router's copy for a secret call
                result[:] = bytes(len(result))  # zeroed in place

    call.__name__ = spec.attr
    return call
