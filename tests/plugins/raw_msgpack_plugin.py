#!/usr/bin/env python3
"""A remowt plugin written from docs/protocol.md alone: the standard library and ``msgpack``, nothing of remowt.

It serves ``DemoApi`` (namespace 100, see tests/plugins/demo_api.py) and
``ControlApi.ping``/``info`` (namespace 1) on its stdin/stdout, under the
address in ``REMOWT_PLUGIN_ADDRESS``, and logs to stderr. Blocking threads:
the main thread reads the link and runs the calls that never wait, a call
that waits runs on a thread of its own, and one lock keeps frames whole on
stdout. It is the proof that the spec is enough, so every rule it follows is
the spec's (section names in the comments).
"""

import errno
import os
import platform
import struct
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import msgpack

VERSION = 4  # "Handshake"
MAX_FRAME = 8 * 1024 * 1024  # what we accept; announced in our Hello
MAX_CHUNK = 256 * 1024  # "Streams": our Data frames carry at most this much
HEADER = struct.Struct(">I")  # "Framing"
BLOCK = 65536  # DemoApi.send_bytes: byte k is (k // BLOCK) % 256

CONTROL_NS, PING, INFO = 1, 1, 2
DEMO_NS, NOOP, ECHO, WHOAMI, SEND_BYTES, ASK_CALLER, CRASH = 100, 1, 2, 3, 4, 5, 6
CALLER_NS, SHOUT = 101, 1


def log(text: str) -> None:
    sys.stderr.write(f"raw plugin {OWN}: {text}\n")
    sys.stderr.flush()


class Failure(Exception):
    """A call that fails with ``kind`` ("Errors"): the plugin's own, or the one a call it made got."""

    def __init__(self, kind: str, message: str, err: Optional[int] = None, filename: Optional[str] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.errno = err
        self.filename = filename


class Output:
    """Our end of the link: whole frames onto the fd, one writer at a time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: List[Any]) -> None:
        body = msgpack.packb(message)
        self._write([HEADER.pack(len(body)), body])

    def send_data(self, dst: str, sid: int, from_opener: bool, pieces: List[memoryview]) -> None:
        """A Data frame built by hand ("Data"), so that the payload pieces are written without joining them."""
        size = sum(len(piece) for piece in pieces)
        envelope = (
            b"\x96"
            + msgpack.packb("data")
            + msgpack.packb(OWN)
            + msgpack.packb(dst)
            + msgpack.packb(sid)
            + msgpack.packb(from_opener)
            + b"\xc6"
            + struct.pack(">I", size)
        )
        self._write([HEADER.pack(len(envelope) + size), envelope, *pieces])

    def _write(self, parts: List[Any]) -> None:
        views = [memoryview(part) for part in parts]
        with self._lock:
            while views:
                try:
                    written = os.writev(self._fd, views)
                except BrokenPipeError:  # "Plugin launch": the link ended, as when stdin ends
                    log("the link ended")
                    os._exit(0)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]


class Stream:
    """Our end of a stream the caller opened ("Streams"): what we may still send, and how it ended."""

    def __init__(self, peer: str, sid: int, window: int) -> None:
        self.peer = peer
        self.sid = sid
        self.credit = window  # "Streams": each side starts with a window of credit
        self.peer_eof = False
        self.sent_eof = False
        self.reset: Optional[str] = None


class Plugin:
    def __init__(self, output: Output) -> None:
        self.out = output
        self.lock = threading.Condition()
        self.streams: Dict[Tuple[str, int], Stream] = {}
        self.calls: Dict[int, List[Any]] = {}  # id -> [callee, event, reply or failure]
        self.next_id = 1
        self.blocks: Dict[int, bytes] = {}

    # --- incoming, on the reading thread ------------------------------------------------------------

    def on_message(self, message: List[Any]) -> None:
        tag = message[0]
        if tag == "call":
            _, call_id, src, _dst, ns, method, args = message[:7]
            if (ns, method) in WAITING:  # "Calls": a handler that waits must not stop the reading
                threading.Thread(target=self.serve, args=(call_id, src, ns, method, args), daemon=True).start()
            else:
                self.serve(call_id, src, ns, method, args)
        elif tag in ("reply", "fail"):
            self.on_answer(message)
        elif tag == "open":
            _, src, _dst, sid, window = message[:5]
            with self.lock:
                self.streams.setdefault((src, sid), Stream(src, sid, window))
        elif tag in ("data", "credit", "eof", "reset"):
            self.on_stream_message(message)
        elif tag not in ("routes", "notify"):  # a leaf needs no routes; we serve no notifications
            log(f"ignoring a {tag!r} message")

    def on_answer(self, message: List[Any]) -> None:
        call_id, src = message[1], message[2]
        with self.lock:
            slot = self.calls.get(call_id)
            # "Errors": only the callee answers a call, but any node on the way may say it is unreachable
            if slot is None or not (src == slot[0] or (message[0] == "fail" and message[4] == "unreachable")):
                return
            del self.calls[call_id]
        slot[2] = message
        slot[1].set()

    def on_stream_message(self, message: List[Any]) -> None:
        tag, src, _dst, sid, from_opener = message[:5]
        key = (src, sid) if from_opener else (OWN, sid)  # "Streams": whose sid space
        answer = None
        with self.lock:
            stream = self.streams.get(key)
            if stream is None or stream.peer != src:
                if tag in ("data", "eof"):
                    answer = ["reset", OWN, src, sid, not from_opener, "no such stream"]
            elif tag == "data":
                # We read nothing on these streams: take the bytes as consumed and hand the credit back at once.
                if message[5]:
                    answer = ["credit", OWN, src, sid, not from_opener, len(message[5])]
            elif tag == "credit":
                stream.credit += message[5]
            elif tag == "eof":
                stream.peer_eof = True
                self.forget_if_done(stream)
            else:
                stream.reset = message[5]
                del self.streams[key]
            self.lock.notify_all()
        if answer is not None:
            self.out.send(answer)

    def forget_if_done(self, stream: Stream) -> None:
        if stream.peer_eof and stream.sent_eof:
            self.streams.pop((stream.peer, stream.sid), None)

    def link_lost(self) -> None:
        with self.lock:
            for stream in self.streams.values():
                stream.reset = "link lost"
            for slot in self.calls.values():
                slot[2] = ["fail", 0, OWN, OWN, "remote", "link lost"]
                slot[1].set()
            self.lock.notify_all()

    # --- calls -------------------------------------------------------------------------------------

    def serve(self, call_id: int, caller: str, ns: int, method: int, args: List[Any]) -> None:
        try:
            answer = ["reply", call_id, OWN, caller, self.run(caller, ns, method, args)]
        except Exception as e:
            answer = ["fail", call_id, OWN, caller, *failure(e)]
        self.out.send(answer)

    def run(self, caller: str, ns: int, method: int, args: List[Any]) -> Any:
        handler = HANDLERS.get((ns, method))
        if handler is None:
            raise Failure("unknown-method", f"{OWN} serves no method {method} in namespace {ns}")
        name, types, function = handler
        if not isinstance(args, list) or len(args) != len(types) or any(type(a) is not t for a, t in zip(args, types)):
            raise Failure("bad-arguments", f"bad arguments for {name}: {args!r:.200}")
        return function(self, caller, *args)

    def call(self, dst: str, ns: int, method: int, args: List[Any]) -> Any:
        """Call ``dst`` and wait for its answer: its result, or a :class:`Failure`."""
        slot: List[Any] = [dst, threading.Event(), None]
        with self.lock:
            call_id = self.next_id
            self.next_id += 1
            self.calls[call_id] = slot
        self.out.send(["call", call_id, OWN, dst, ns, method, args])
        slot[1].wait()
        return answer_value(slot[2])

    # --- DemoApi and ControlApi ----------------------------------------------------------------

    def ping(self, caller: str) -> None:
        return None

    def info(self, caller: str) -> Dict[str, Any]:
        python = ".".join(str(part) for part in sys.version_info[:3])
        return {"address": OWN, "pid": os.getpid(), "python": python, "machine": platform.machine(), "uid": os.getuid()}

    def noop(self, caller: str) -> None:
        return None

    def echo(self, caller: str, data: bytes) -> bytes:
        return data

    def whoami(self, caller: str) -> List[int]:
        return [os.getuid(), os.getpid()]

    def ask_caller(self, caller: str, text: str) -> str:
        return "plugin heard " + self.call(caller, CALLER_NS, SHOUT, [text])

    def crash(self, caller: str, status: int) -> None:
        os._exit(status)

    def send_bytes(self, caller: str, sid: int, size: int) -> None:
        with self.lock:
            stream = self.streams.get((caller, sid))
        if stream is None:
            raise OSError(errno.EPIPE, f"stream {sid} from {caller} is not open here")
        sent = 0
        while sent < size:
            with self.lock:
                while not stream.credit and stream.reset is None:
                    self.lock.wait()
                if stream.reset is not None:
                    raise OSError(errno.EPIPE, f"{caller} reset stream {sid}: {stream.reset}")
                count = min(stream.credit, MAX_CHUNK, size - sent)
                stream.credit -= count
            self.out.send_data(caller, sid, False, self.pattern(sent, count))
            sent += count
        with self.lock:
            if stream.reset is not None:
                raise OSError(errno.EPIPE, f"{caller} reset stream {sid}: {stream.reset}")
            stream.sent_eof = True
            self.forget_if_done(stream)
        self.out.send(["eof", OWN, caller, sid, False])

    def pattern(self, start: int, count: int) -> List[memoryview]:
        """Bytes ``start`` to ``start + count`` of send_bytes' pattern, as views of one block per value."""
        pieces = []
        end = start + count
        while start < end:
            value = (start // BLOCK) % 256
            block = self.blocks.get(value)
            if block is None:
                block = self.blocks[value] = bytes([value]) * BLOCK
            offset = start % BLOCK
            take = min(BLOCK - offset, end - start)
            pieces.append(memoryview(block)[offset : offset + take])
            start += take
        return pieces


def failure(error: Exception) -> List[Any]:
    """The kind, message, errno and filename of the fail that reports ``error`` ("Errors")."""
    if isinstance(error, Failure):
        return [error.kind, error.message, error.errno, error.filename]
    if isinstance(error, OSError) and error.errno is not None:
        name = error.filename
        if isinstance(name, bytes):  # text, with the bytes that are not UTF-8 as \xff escapes
            name = name.decode("utf-8", "backslashreplace")
        return ["os-error", error.strerror or str(error), error.errno, name]
    return ["internal", f"{type(error).__name__}: {error}", None, None]


def answer_value(answer: List[Any]) -> Any:
    if answer[0] == "reply":
        return answer[4]
    kind, message, *os_error = answer[4:]  # "Errors": errno and filename may be left out
    err, filename = [*os_error, None, None][:2]
    raise Failure(kind, message, err, filename)


#: (namespace, method): (name, argument types, handler).
HANDLERS = {
    (CONTROL_NS, PING): ("ControlApi.ping", (), Plugin.ping),
    (CONTROL_NS, INFO): ("ControlApi.info", (), Plugin.info),
    (DEMO_NS, NOOP): ("DemoApi.noop", (), Plugin.noop),
    (DEMO_NS, ECHO): ("DemoApi.echo", (bytes,), Plugin.echo),
    (DEMO_NS, WHOAMI): ("DemoApi.whoami", (), Plugin.whoami),
    (DEMO_NS, SEND_BYTES): ("DemoApi.send_bytes", (int, int), Plugin.send_bytes),
    (DEMO_NS, ASK_CALLER): ("DemoApi.ask_caller", (str,), Plugin.ask_caller),
    (DEMO_NS, CRASH): ("DemoApi.crash", (int,), Plugin.crash),
}
#: The methods that wait (for credit, for an answer): each runs on a thread of its own, the rest on the reader.
WAITING = {(DEMO_NS, SEND_BYTES), (DEMO_NS, ASK_CALLER)}


class Frames:
    """Frame bodies out of the bytes read ("Framing")."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        self.buffer += data
        bodies = []
        pos = 0
        while len(self.buffer) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer, pos)
            if size > MAX_FRAME:
                raise ValueError(f"a frame of {size} bytes is over our limit of {MAX_FRAME}")
            if len(self.buffer) - pos - HEADER.size < size:
                break
            bodies.append(bytes(self.buffer[pos + HEADER.size : pos + HEADER.size + size]))
            pos += HEADER.size + size
        del self.buffer[:pos]
        return bodies


def take_stdio() -> Tuple[int, int]:
    """The link's fds; fd 1 then points at stderr, so that nothing printed can break a frame ("Launch")."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    return read_fd, write_fd


def main() -> int:
    global OWN
    OWN = os.environ.get("REMOWT_PLUGIN_ADDRESS", "")
    if not OWN.startswith("plugin("):
        sys.stderr.write("raw plugin: REMOWT_PLUGIN_ADDRESS is not set to plugin(N): started outside a host?\n")
        return 2
    read_fd, write_fd = take_stdio()
    out = Output(write_fd)
    out.send(["hello", VERSION, OWN, MAX_FRAME])  # "Handshake": first, without waiting for the peer's
    plugin = Plugin(out)
    frames = Frames()
    hello: Optional[List[Any]] = None
    try:
        while True:
            data = os.read(read_fd, 1024 * 1024)
            if not data:
                log("the link ended")
                break
            for body in frames.feed(data):
                message = msgpack.unpackb(body)
                if hello is None:
                    if message[:1] != ["hello"] or message[1] != VERSION:
                        log(f"expected a hello of version {VERSION}, got {message!r:.200}")
                        return 1
                    hello = message
                    out.send(["routes", []])  # a leaf reaches nobody else
                    continue
                plugin.on_message(message)
    except (ValueError, msgpack.UnpackException) as e:
        log(f"closing the link: {e}")
        return 1
    finally:
        plugin.link_lost()
    return 0


OWN = ""

if __name__ == "__main__":
    sys.exit(main())
