"""The caller's side of remote editing: a target's file opened in this side's editor, on this side's terminal.

The agents ask :class:`LocalEditor` (``EditorApi``, served on the user's
router) when a remote program runs its ``EDITOR``; ``remowt edit`` calls
:func:`edit_locally` itself. The file is edited as a private temporary copy
named like the original, with ``$VISUAL``, else ``$EDITOR``, else ``vi``. A
program that owns the terminal meanwhile (the CLI's raw-mode session) lends
it through :func:`lend_terminal`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import threading
from typing import Callable, ContextManager, Iterator, Optional

from ..endpoints.editor import EditorApi
from ..runtime.real_subprocess import Popen as LocalPopen

_lock = threading.Lock()  # one editor at a time: they would share the terminal
_lender: Optional[Callable[[], ContextManager[None]]] = None


def lend_terminal(lender: Optional[Callable[[], ContextManager[None]]]) -> None:
    """While ``lender()``'s context is entered, the terminal is the editor's (None: nobody holds it)."""
    global _lender
    _lender = lender


def local_editor() -> str:
    """The editor command of this side: ``$VISUAL``, else ``$EDITOR``, else ``vi``."""
    return os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"


def edit_locally(name: str, content: bytes) -> Optional[bytes]:
    """Open ``content`` (of a file called ``name``) in this side's editor; the new content, or None if unchanged.

    ``OSError`` when there is no terminal to edit on; ``RuntimeError`` when the editor fails.
    """
    editor = local_editor()
    with _lock, tempfile.TemporaryDirectory(prefix="remowt-edit-") as directory:
        path = os.path.join(directory, os.path.basename(name.rstrip("/")) or "file")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(content)
        with _terminal() as stdio, (_lender or contextlib.nullcontext)():
            command = f"{editor} {shlex.quote(path)}"
            status = LocalPopen(["/bin/sh", "-c", command], stdin=stdio, stdout=stdio, stderr=stdio).wait()
        if status != 0:
            raise RuntimeError(f"the editor ({editor}) exited with status {status}; {name} is left as it was")
        with open(path, "rb") as f:
            edited = f.read()
    return None if edited == content else edited


@contextlib.contextmanager
def _terminal() -> Iterator[Optional[int]]:
    """The terminal to edit on: this process's stdin if it is one (None: inherit), else /dev/tty."""
    if os.isatty(0):
        yield None
        return
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise OSError(e.errno, f"no terminal on the caller's side to edit on ({e.strerror})") from None
    try:
        yield fd
    finally:
        os.close(fd)


class LocalEditor(EditorApi):
    """Served on the user's router: a remote program's ``EDITOR`` edits here."""

    def edit(self, name: str, content: bytes) -> Optional[bytes]:
        return edit_locally(name, content)
