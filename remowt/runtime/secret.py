"""Passwords in memory: held as bytearrays, wiped after use, the process closed to inspection meanwhile.

:func:`wipe` overwrites a buffer with zeros in place, also the read-only
bytes a frame was read into (through ctypes: Python cannot change them, but
they are ours alone). :class:`Secrets` keeps the passwords of one use; while
any :class:`Secrets` holds one, the process is not dumpable
(``PR_SET_DUMPABLE`` 0: another process of the same user can neither ptrace
it nor read its ``/proc/<pid>/mem`` or ``environ``) and writes no core
(``RLIMIT_CORE`` 0); both are put back when the last one is cleared.
CPython cannot wipe a ``str``: code that keeps a password never makes one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    import ctypes

log = logging.getLogger("remowt.secret")

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_lock = threading.Lock()
_holders = 0
_saved: Tuple[Optional[int], Optional[Tuple[int, int]]] = (None, None)


def wipe(buffer: Any) -> None:
    """Overwrite every byte of ``buffer`` (a bytearray, a view, ``bytes``, a ``msgspec.Raw``) with zero, in place.

    The caller must be the only user of the memory: a read-only buffer is
    written through ctypes, behind the back of whoever else might hold it.
    ``bytes`` of 0 or 1 byte are left alone: the interpreter shares them.
    """
    if isinstance(buffer, bytes) and len(buffer) < 2:
        return
    view = memoryview(buffer)
    if not view.readonly:
        view.cast("B")[:] = bytes(view.nbytes)
        return
    try:
        import ctypes
    except ImportError:  # a Python built without ctypes: what Python cannot change stays
        log.debug("ctypes is missing: a read-only buffer of %d bytes is not wiped", view.nbytes)
        return

    class PyBuffer(ctypes.Structure):  # Py_buffer, as in CPython's Include/pybuffer.h
        _fields_ = [
            ("buf", ctypes.c_void_p),
            ("obj", ctypes.c_void_p),
            ("len", ctypes.c_ssize_t),
            ("itemsize", ctypes.c_ssize_t),
            ("readonly", ctypes.c_int),
            ("ndim", ctypes.c_int),
            ("format", ctypes.c_char_p),
            ("shape", ctypes.c_void_p),
            ("strides", ctypes.c_void_p),
            ("suboffsets", ctypes.c_void_p),
            ("internal", ctypes.c_void_p),
        ]

    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = [ctypes.POINTER(PyBuffer)]
    found = PyBuffer()
    if get(buffer, ctypes.byref(found), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise TypeError(f"cannot wipe a {type(buffer).__name__}: it has no contiguous buffer")
    try:
        ctypes.memset(found.buf, 0, found.len)
    finally:
        release(ctypes.byref(found))


class Secrets:
    """The passwords of one use, each a bytearray; :meth:`clear` wipes them."""

    def __init__(self) -> None:
        self._held: List[bytearray] = []

    def keep(self, secret: bytearray) -> bytearray:
        """Hold ``secret`` until :meth:`clear`; the process is protected from the first one on."""
        if not self._held:
            _protect()
        self._held.append(secret)
        return secret

    def __iter__(self) -> Iterator[bytearray]:
        return iter(self._held)

    def clear(self) -> None:
        """Wipe every secret held; the process is open again once no other :class:`Secrets` holds one."""
        if not self._held:
            return
        for secret in self._held:
            wipe(secret)
        self._held.clear()
        _unprotect()


@contextlib.contextmanager
def protected() -> Iterator[None]:
    """This process not dumpable and without core dumps while inside (see the module docstring)."""
    _protect()
    try:
        yield
    finally:
        _unprotect()


def _libc() -> Optional[ctypes.CDLL]:
    try:
        import ctypes
    except ImportError:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    return libc if hasattr(libc, "prctl") else None


def _protect() -> None:
    global _holders, _saved
    import resource

    with _lock:
        _holders += 1
        if _holders > 1:
            return
        libc = _libc()
        dumpable = None
        if libc is not None:
            dumpable = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                log.warning("cannot make the process undumpable while a password is held")
                dumpable = None
        else:
            log.debug("no prctl here: the process stays dumpable while a password is held")
        core = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
        _saved = (dumpable, core)


def _unprotect() -> None:
    global _holders, _saved
    import resource

    with _lock:
        _holders -= 1
        if _holders:
            return
        (dumpable, core), _saved = _saved, (None, None)
        if core is not None:
            resource.setrlimit(resource.RLIMIT_CORE, core)
        libc = _libc()
        if dumpable is not None and libc is not None:
            libc.prctl(_PR_SET_DUMPABLE, dumpable, 0, 0, 0)
