"""The client side of the escalation tests, run as the unprivileged test user.

``python3 escalation_client.py CONFIG_JSON``: connects (loopback or local),
runs the configured actions (with ``core_limit``: under that soft limit on
core dumps, which the agent inherits) and reports on stdout, one JSON object a line:
``{"event": "prompt", "text": ...}`` when the prompter is asked (the test
answers on stdin with ``{"answer": ...}`` or ``{"cancel": reason}``),
``{"event": "pause", "agent": PID}`` for a ``pause`` action
(the test answers ``{}``), and
finally ``{"event": "result", "results": [...], "prompts": N, "tool": ...}``.
Passwords come only on stdin, so they are in no argv or environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List

CONFIG: Dict[str, Any] = json.loads(sys.argv[1])
sys.path[:0] = CONFIG["path"]

import remowt  # noqa: E402

_out = threading.Lock()
prompts: List[str] = []


def emit(**event: Any) -> None:
    with _out:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def reply() -> Dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the test closed stdin")
    answer: Dict[str, Any] = json.loads(line)
    return answer


def prompter(text: str) -> str:
    prompts.append(text)
    emit(event="prompt", text=text)
    answer = reply()
    if "cancel" in answer:
        raise RuntimeError(answer["cancel"])
    return str(answer["answer"])


def outcome(action: Callable[[], Any]) -> Dict[str, Any]:
    start = time.monotonic()
    try:
        value = action()
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"value": value, "seconds": time.monotonic() - start}


def output(data: bytes) -> str:
    return data.decode().strip()


def run_action(conn: remowt.Remowt, action: Dict[str, Any]) -> Any:
    kind = action["do"]
    argv = action.get("argv", ["id", "-u"])
    if kind == "run":
        result = conn.run(argv, sudo=action.get("sudo", False), capture_output=True, timeout=60)
        return [result.returncode, output(result.stdout)]
    if kind == "cmd_sudo":
        return conn.cmd(argv[0]).args(argv[1:]).sudo().run_string(timeout=60).strip()
    if kind == "privileged":
        return output(conn.privileged.check_output(argv, timeout=60))
    if kind == "concurrent":
        results: List[Dict[str, Any]] = []
        threads = [
            threading.Thread(target=lambda: results.append(outcome(lambda: run_action(conn, {"do": "privileged"}))))
            for _ in range(action["n"])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return results
    if kind == "start":
        return conn.privileged.start(timeout=action["timeout"])
    if kind == "info":
        info = conn.privileged.info()
        return {"uid": info.uid, "pid": info.pid, "address": info.address}
    if kind == "kill_agent":  # the unprivileged agent dies abruptly, with a privileged child running
        sleeper = conn.Popen(["sleep", "600"], sudo=True)
        pids = {"agent": conn.info().pid, "privileged": conn.privileged.info().pid, "child": sleeper.pid}
        os.kill(pids["agent"], signal.SIGKILL)
        return pids
    if kind == "kill_privileged":  # the privileged agent dies abruptly, with a root child and grandchild running
        group = conn.Popen(["sh", "-c", "sleep 600 & echo $!; wait"], sudo=True, stdout=remowt.PIPE)
        assert group.stdout is not None
        grandchild = int(group.stdout.readline())
        pids = {"privileged": conn.privileged.info().pid, "child": group.pid, "grandchild": grandchild}
        with contextlib.suppress(remowt.ConnectionLost):  # its agent may die before it says the kill started
            kill = ["sh", "-c", f"kill -KILL {pids['privileged']}"]
            conn.Popen(kill, sudo=True, stdout=remowt.DEVNULL, stderr=remowt.DEVNULL)
        with contextlib.suppress(remowt.ConnectionLost):  # the privileged agent is gone: nobody reports the exit
            group.wait(timeout=30)
        return pids
    if kind == "pause":  # the test looks at the processes meanwhile
        emit(event="pause", agent=conn.info().pid)
        reply()
        return None
    raise ValueError(f"unknown action {kind!r}")


def main() -> None:
    if "core_limit" in CONFIG:  # a soft limit on core dumps, which the agent inherits
        resource.setrlimit(resource.RLIMIT_CORE, (CONFIG["core_limit"], resource.getrlimit(resource.RLIMIT_CORE)[1]))
    connect = {"loopback": remowt.loopback, "local": remowt.connect_local}[CONFIG["transport"]]
    chosen = None if CONFIG.get("default_prompter") else prompter
    with connect(prompter=chosen, escalation=CONFIG.get("tool")) as conn:
        results = [outcome(lambda action=action: run_action(conn, action)) for action in CONFIG["actions"]]
        tool = conn.privileged.tool
    emit(event="result", results=results, prompts=len(prompts), prompt_texts=prompts, tool=tool)


if __name__ == "__main__":
    main()
