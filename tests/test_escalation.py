"""Privilege escalation with the real tools: sudo and doas as an unprivileged user, run0 where systemd runs.

The client runs as the test user that ``scripts/setup-test-host.sh`` creates
(``escalation_client.py`` in a private copy of remowt and msgspec that user
can read), so sudo and doas really ask for its password; the test answers
each prompt over the client's stdin. Tests that need no password run the
client in this process, as root.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import msgspec
import pytest
from _util import kill_quietly, memory_hits, proc_gone, wait_until
from sshd import SshServer

import remowt
from remowt.deploy.bundle import AgentBundle, local_platform
from remowt.errors import ConnectionLost, EscalationError

TEST_USER = "remowt-test"
TEST_PASSWORD = "remowt-test-password"
USER_PYTHON = "/usr/bin/python3"
SETUP_HINT = "run `bash scripts/setup-test-host.sh` as root to create the user and configure sudo and doas"
TOOLS = ["sudo", "doas"]
TRANSPORTS = ["loopback", "local"]
ATTEMPTS = {"sudo": 3, "doas": 1}  # passwd_tries=3 in the test sudoers; opendoas asks once
EVENT_TIMEOUT = 60.0

Answer = Callable[[int, str], Dict[str, Any]]


def _check_setup() -> None:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"the test user {TEST_USER!r} does not exist: {SETUP_HINT}", pytrace=False)
    for path in (USER_PYTHON, "/usr/bin/sudo", "/usr/bin/doas"):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is not installed: {SETUP_HINT}", pytrace=False)
    if not os.path.exists(f"/etc/sudoers.d/{TEST_USER}"):
        pytest.fail(f"/etc/sudoers.d/{TEST_USER} is missing: {SETUP_HINT}", pytrace=False)
    with open("/etc/doas.conf") as f:
        if f"permit {TEST_USER} as root" not in f.read().splitlines():
            pytest.fail(f"/etc/doas.conf does not permit {TEST_USER}: {SETUP_HINT}", pytrace=False)
    version = subprocess.run(
        [USER_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.split()
    if [int(v) for v in version] != list(sys.version_info[:2]):
        pytest.fail(f"{USER_PYTHON} is Python {'.'.join(version)}, the tests' msgspec is built for this Python")


@pytest.fixture(scope="module")
def user_env() -> Iterator[str]:
    """A directory the test user can read: copies of remowt, msgspec and the client script."""
    if os.geteuid() != 0:
        pytest.skip("the escalation tests run their client as the test user, which needs root")
    _check_setup()
    directory = tempfile.mkdtemp(prefix="remowt-escalation-test-")
    try:
        os.chmod(directory, 0o755)
        ignore = shutil.ignore_patterns("__pycache__")
        for module in (remowt, msgspec):
            assert module.__file__ is not None
            source = os.path.dirname(os.path.abspath(module.__file__))
            shutil.copytree(source, os.path.join(directory, module.__name__), ignore=ignore)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "escalation_client.py"), directory)
        for root, dirs, files in os.walk(directory):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def user_run(argv: List[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``argv`` as the test user (another process of the user the agent runs as), text on stdout/stderr."""
    user = pwd.getpwnam(TEST_USER)
    kwargs.setdefault("cwd", "/")
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        **kwargs,
    )


class UserClient:
    """``escalation_client.py`` running as the test user, in a session of its own (no terminal)."""

    def __init__(self, directory: str, config: Dict[str, Any]) -> None:
        user = pwd.getpwnam(TEST_USER)
        config = {"path": [directory], **config}
        self.process = user_run(
            [USER_PYTHON, "-I", os.path.join(directory, "escalation_client.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": user.pw_dir, "USER": TEST_USER},
            cwd=user.pw_dir,
            start_new_session=True,
        )
        self.events: queue.Queue[Dict[str, Any]] = queue.Queue()
        self.stderr: List[str] = []
        self._threads = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exit"})

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr.extend(self.process.stderr)

    def event(self) -> Dict[str, Any]:
        try:
            event = self.events.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"the client said nothing for {EVENT_TIMEOUT} s; stderr: {''.join(self.stderr)}")
        if event["event"] == "exit":
            self.process.wait(10)
            pytest.fail(f"the client exited ({self.process.returncode}) early: {''.join(self.stderr)}")
        return event

    def send(self, message: Dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for thread in self._threads:
            thread.join(10)


def drive(
    directory: str,
    config: Dict[str, Any],
    answer: Answer,
    on_pause: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Run the client; answer prompt ``n`` (from 1) with ``answer(n, text)``; return its result."""
    client = UserClient(directory, config)
    try:
        prompts = 0
        while True:
            event = client.event()
            if event["event"] == "prompt":
                prompts += 1
                client.send(answer(prompts, event["text"]))
            elif event["event"] == "pause":
                if on_pause is not None:
                    on_pause(event)
                client.send({})
            else:
                assert event["event"] == "result"
                client.process.wait(30)
                assert client.process.returncode == 0, "".join(client.stderr)
                return event
    finally:
        client.close()


def password(n: int, text: str) -> Dict[str, Any]:
    return {"answer": TEST_PASSWORD}


def values(result: Dict[str, Any]) -> List[Any]:
    """The value of every action, failing on the first action that raised."""
    out = []
    for item in result["results"]:
        assert "error" not in item, item
        out.append(item["value"])
    return out


def scan_for(secrets: List[bytes]) -> List[str]:
    """Where ``secrets`` appear in any process's argv or environment, or in the agents' private dirs."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            found += [f"/proc/{pid}/{name}" for secret in secrets if secret in data]
    for path in glob.glob("/tmp/remowt-escalate-*/*") + glob.glob("/run/user/*/remowt-escalate-*/*"):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            found += [path for secret in secrets if secret in data]
    return found


def askpass_helper() -> Optional[int]:
    """The pid of a running askpass helper (sudo started it, as the test user), if any."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"askpass" in argv:
            return int(pid)
    return None


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


def protection(pid: int) -> Tuple[bool, str]:
    """Whether process ``pid`` is undumpable (its /proc files then belong to root), and its core size limit."""
    with open(f"/proc/{pid}/limits") as f:
        core = next(line for line in f if line.startswith("Max core file size")).split()[4]
    return os.stat(f"/proc/{pid}/environ").st_uid == 0, core


# An attacker running as the same user: sends a token and its own prompt to the agent's askpass socket.
REPLAY = """
import json, socket, sys
path, token = sys.argv[1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
sock.sendall(json.dumps({"token": token, "prompt": "Your bank password: "}).encode())
sock.shutdown(socket.SHUT_WR)
print("sent", flush=True)
try:
    reply = b"".join(iter(lambda: sock.recv(4096), b""))
except OSError as e:
    reply = repr(e).encode()
print(reply.decode("utf-8", "replace"), flush=True)
"""


class Replay:
    """:data:`REPLAY` run as the test user with ``token``; returns once its request is sent."""

    def __init__(self, path: str, token: str) -> None:
        self.process = user_run([USER_PYTHON, "-I", "-c", REPLAY, path, token])
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "sent\n", self.process.communicate(timeout=10)

    def reply(self) -> str:
        out, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err
        return out


# --- as the test user: real prompts -------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("tool", TOOLS)
def test_privileged_commands_run_as_root_after_one_prompt(user_env: str, tool: str, transport: str) -> None:
    actions = [
        {"do": "concurrent", "n": 2},  # two first uses at once: one privileged agent, one prompt
        {"do": "run", "sudo": True},
        {"do": "cmd_sudo"},
        {"do": "privileged"},
        {"do": "info"},
        {"do": "run", "sudo": False},
    ]
    result = drive(user_env, {"transport": transport, "tool": tool, "actions": actions}, password)
    concurrent, run_sudo, cmd_sudo, privileged, info, run_plain = values(result)
    assert [item.get("value") for item in concurrent] == ["0", "0"], concurrent
    assert run_sudo == [0, "0"]
    assert cmd_sudo == "0"
    assert privileged == "0"
    assert info["uid"] == 0 and info["address"] == "agent-privileged"
    assert run_plain == [0, str(pwd.getpwnam(TEST_USER).pw_uid)]
    assert result["prompts"] == 1
    assert result["tool"] == tool
    expected = "[sudo] password for remowt-test@" if tool == "sudo" else "doas (remowt-test@"
    shown = result["prompt_texts"][0]
    where = "loopback" if transport == "loopback" else "local agent pid "
    assert shown.startswith(where) and f" asks for {tool}: {expected}" in shown, shown


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tool", TOOLS)
def test_wrong_password_fails_after_the_tools_attempts(user_env: str, tool: str) -> None:
    actions = [{"do": "run", "sudo": True}, {"do": "run", "sudo": False}]
    result = drive(user_env, {"transport": "local", "tool": tool, "actions": actions}, lambda n, t: {"answer": "wrong"})
    failed, plain = result["results"]
    attempts = ATTEMPTS[tool]
    assert failed["error"] == "EscalationError", failed
    assert f"authentication failed after {attempts} attempt" in failed["message"]
    assert "wrong" not in failed["message"].replace("incorrect", "")
    assert result["prompts"] == attempts
    assert plain["value"][0] == 0, "the connection stays usable unprivileged"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", TOOLS)
def test_cancelled_prompt_fails_at_once_and_a_later_use_asks_again(user_env: str, tool: str) -> None:
    actions = [{"do": "run", "sudo": True}, {"do": "run", "sudo": False}, {"do": "run", "sudo": True}]

    def answer(n: int, text: str) -> Dict[str, Any]:
        return {"cancel": "not now"} if n == 1 else {"answer": TEST_PASSWORD}

    result = drive(user_env, {"transport": "local", "tool": tool, "actions": actions}, answer)
    cancelled, plain, retried = result["results"]
    assert cancelled["error"] == "EscalationError", cancelled
    assert "cancelled" in cancelled["message"] and "not now" in cancelled["message"]
    assert cancelled["seconds"] < 10, "a cancel must not wait for the tool's retries or timeouts"
    assert plain["value"][0] == 0
    assert retried["value"] == [0, "0"]
    assert result["prompts"] == 2


@pytest.mark.timeout(60)
def test_start_timeout_does_not_count_the_users_time_at_the_prompt(user_env: str) -> None:
    def slow_password(n: int, text: str) -> Dict[str, Any]:
        time.sleep(2.0)  # the user thinks longer than the whole timeout
        return {"answer": TEST_PASSWORD}

    actions = [{"do": "start", "timeout": 1.0}, {"do": "run", "sudo": True}]
    result = drive(user_env, {"transport": "local", "tool": "sudo", "actions": actions}, slow_password)
    assert values(result) == ["sudo", [0, "0"]]
    assert result["prompts"] == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tool", TOOLS)
def test_password_is_in_no_argv_environment_file_or_agent_memory(user_env: str, tool: str) -> None:
    """No password anywhere while the tool runs; none in the agent's memory after (sudo: a wrong one first)."""
    wrong = "wrong-password-7f3a9c"
    secrets = [TEST_PASSWORD.encode(), wrong.encode()]
    scans: Dict[str, List[str]] = {}
    states: Dict[str, Tuple[bool, str]] = {}

    def answer(n: int, text: str) -> Dict[str, Any]:
        # sudo: a wrong password first, then scan while the second prompt is pending (sudo, its
        # askpass helper and both agents are alive); doas asks once: scan while it is pending.
        if tool == "sudo":
            helper = askpass_helper()
            assert helper is not None, "the scan should see the askpass helper"
            states[f"prompt {n}"] = protection(parent(parent(helper)))  # sudo's parent is the agent
            if n == 1:
                return {"answer": wrong}
        scans[f"prompt {n}"] = scan_for(secrets)
        return {"answer": TEST_PASSWORD}

    def paused(event: Dict[str, Any]) -> None:
        scans["privileged agent running"] = scan_for(secrets)
        scans["agent's memory"] = memory_hits(event["agent"], secrets)
        states["after"] = protection(event["agent"])

    actions = [{"do": "run", "sudo": True}, {"do": "pause"}, {"do": "run", "sudo": True}]
    config = {"transport": "local", "tool": tool, "actions": actions, "core_limit": 4096}
    result = drive(user_env, config, answer, paused)
    assert values(result) == [[0, "0"], None, [0, "0"]]
    assert len(scans) == 3
    assert scans == {key: [] for key in scans}
    if tool == "sudo":  # open; closed while the wrong password is held; open again, its core limit back
        assert states == {"prompt 1": (False, "4096"), "prompt 2": (True, "0"), "after": (False, "4096")}
    else:
        assert states == {"after": (False, "4096")}


@pytest.mark.timeout(90)
def test_askpass_answers_neither_a_replayed_token_nor_a_process_sudo_did_not_start(user_env: str) -> None:
    """Another process of the user replays a waiting helper's token, then shows the next one: both get nothing."""
    attacks: List[Replay] = []

    def answer(n: int, text: str) -> Dict[str, Any]:
        helper = askpass_helper()
        assert helper is not None
        reader = user_run(["cat", f"/proc/{helper}/environ"])
        assert reader.communicate(timeout=10)[0] == "" and reader.returncode != 0, "the helper is not dumpable"
        with open(f"/proc/{helper}/environ", "rb") as f:  # root reads it for the attacker
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        path = env[b"REMOWT_ASKPASS_SOCKET"].decode()
        if n == 1:  # the token the waiting helper used
            attacks.append(Replay(path, env[b"REMOWT_ASKPASS_TOKEN"].decode()))
            return {"answer": "wrong"}
        with open(os.path.join(os.path.dirname(path), "askpass")) as f:  # the one sudo's next helper would get
            fresh = next(line for line in f if line.startswith("REMOWT_ASKPASS_TOKEN="))
        attacks.append(Replay(path, fresh.split("=", 1)[1].strip().strip("'")))
        return {"answer": TEST_PASSWORD}

    result = drive(user_env, {"transport": "local", "tool": "sudo", "actions": [{"do": "run", "sudo": True}]}, answer)
    replies = [attack.reply() for attack in attacks]
    assert values(result) == [[0, "0"]]
    assert result["prompts"] == 2 and not any("bank" in text for text in result["prompt_texts"]), result
    assert len(replies) == 2 and all(TEST_PASSWORD not in reply and "wrong" not in reply for reply in replies)
    assert "did not start it" in replies[0], replies


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", TOOLS)
def test_privileged_children_die_with_a_killed_agent(user_env: str, tool: str) -> None:
    result = drive(user_env, {"transport": "local", "tool": tool, "actions": [{"do": "kill_agent"}]}, password)
    pids = values(result)[0]
    assert wait_until(lambda: all(proc_gone(pid) for pid in pids.values()), 10), pids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", TOOLS)
def test_root_children_die_with_a_killed_privileged_agent(user_env: str, tool: str) -> None:
    result = drive(user_env, {"transport": "local", "tool": tool, "actions": [{"do": "kill_privileged"}]}, password)
    pids = values(result)[0]
    try:
        assert wait_until(lambda: all(proc_gone(pid) for pid in pids.values()), 10), {
            name: pid for name, pid in pids.items() if not proc_gone(pid)
        }
    finally:
        for pid in pids.values():
            kill_quietly(pid)


@pytest.mark.timeout(60)
def test_default_prompter_without_terminal_says_to_pass_a_prompter(user_env: str) -> None:
    config = {"transport": "local", "tool": "sudo", "default_prompter": True, "actions": [{"do": "run", "sudo": True}]}
    result = drive(user_env, config, password)
    failed = result["results"][0]
    assert failed["error"] == "EscalationError"
    assert "no terminal" in failed["message"] and "prompter=" in failed["message"]


@pytest.mark.timeout(90)
def test_the_askpass_directory_of_a_killed_agent_is_removed_by_the_next_start(user_env: str) -> None:
    uid = pwd.getpwnam(TEST_USER).pw_uid

    def ours() -> List[str]:
        return [path for path in glob.glob("/tmp/remowt-escalate-*") if os.stat(path).st_uid == uid]

    before = set(ours())
    left: List[str] = []

    def kill_the_agent(n: int, text: str) -> Dict[str, Any]:
        left.extend(set(ours()) - before)
        os.kill(int(text.split("local agent pid ")[1].split()[0]), signal.SIGKILL)
        return {"answer": TEST_PASSWORD}

    config = {"transport": "local", "tool": "sudo", "actions": [{"do": "run", "sudo": True}]}
    killed = drive(user_env, config, kill_the_agent)["results"][0]
    assert "error" in killed, killed
    assert len(left) == 1 and os.path.isdir(left[0]), "the killed agent left its askpass directory"
    assert values(drive(user_env, config, password)) == [[0, "0"]]
    assert not os.path.exists(left[0]), "the next start removed it"


def run0_usable() -> bool:
    return shutil.which("run0") is not None and os.path.isdir("/run/systemd/system")


@pytest.mark.timeout(60)
def test_unusable_tool_is_a_clear_error(user_env: str) -> None:
    if run0_usable():
        pytest.skip("run0 works on this machine (see test_run0)")
    result = drive(user_env, {"transport": "local", "tool": "run0", "actions": [{"do": "run", "sudo": True}]}, password)
    failed = result["results"][0]
    assert failed["error"] == "EscalationError"
    assert "run0" in failed["message"]
    assert "no escalation tool" in failed["message"] or "systemd" in failed["message"]
    assert result["prompts"] == 0


@pytest.mark.timeout(60)
def test_run0(user_env: str) -> None:
    if not run0_usable():
        pytest.skip("run0 needs a running systemd, and pid 1 is not systemd here (no /run/systemd/system)")
    actions = [{"do": "run", "sudo": True}, {"do": "run", "sudo": True}]
    result = drive(user_env, {"transport": "local", "tool": "run0", "actions": actions}, password)
    assert values(result) == [[0, "0"], [0, "0"]]
    assert result["prompts"] <= 1


# --- over ssh: the client here (root), the agent as the test user ------------------


class Prompts:
    """A prompter that answers from a list (a str, or an exception to raise) and keeps the prompts."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked: List[str] = []

    def __call__(self, prompt: str) -> str:
        self.asked.append(prompt)
        answer = self.answers[min(len(self.asked), len(self.answers)) - 1]
        if callable(answer):
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)


def ssh_connect(sshd: SshServer, prompts: Prompts, tool: str) -> remowt.Remowt:
    conn = remowt.connect(sshd.alias, ssh_config=sshd.ssh_config)
    conn.prompter = prompts
    conn.escalation = tool
    return conn


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", TOOLS)
def test_ssh_privileged_commands_run_as_root_after_one_prompt(sshd: SshServer, tool: str) -> None:
    prompts = Prompts(TEST_PASSWORD)
    with ssh_connect(sshd, prompts, tool) as conn:
        assert conn.info().uid == pwd.getpwnam(TEST_USER).pw_uid
        assert conn.run(["id", "-u"], sudo=True, capture_output=True).stdout == b"0\n"
        assert conn.cmd("id").arg("-u").sudo().run_string() == "0\n"
        assert conn.privileged.check_output(["id", "-u"]) == b"0\n"
        assert conn.check_output(["id", "-u"]) != b"0\n"
        assert conn.privileged.tool == tool
    assert len(prompts.asked) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tool", TOOLS)
def test_ssh_wrong_password_then_cancel(sshd: SshServer, tool: str) -> None:
    prompts = Prompts("wrong")
    with ssh_connect(sshd, prompts, tool) as conn:
        with pytest.raises(EscalationError, match=f"authentication failed after {ATTEMPTS[tool]} attempt"):
            conn.run(["true"], sudo=True)
        assert len(prompts.asked) == ATTEMPTS[tool]
        prompts.answers = [KeyboardInterrupt("user gave up")]
        prompts.asked.clear()
        start = time.monotonic()
        with pytest.raises(EscalationError, match="cancelled: KeyboardInterrupt: user gave up"):
            conn.privileged.ping()
        assert time.monotonic() - start < 10
        assert len(prompts.asked) == 1
        assert conn.run(["true"]).returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tool", TOOLS)
def test_ssh_password_is_in_no_argv_environment_file_or_agent_memory(sshd: SshServer, tool: str) -> None:
    wrong = "wrong-password-5d1e02"
    secrets = [TEST_PASSWORD.encode(), wrong.encode()]
    scans: List[List[str]] = []

    def scan_then_answer() -> str:
        scans.append(scan_for(secrets))
        return TEST_PASSWORD

    # sudo: scan while the second prompt is pending, after a wrong password went through askpass
    prompts = Prompts(wrong, scan_then_answer) if tool == "sudo" else Prompts(scan_then_answer)
    with ssh_connect(sshd, prompts, tool) as conn:
        sleeper = conn.Popen(["sleep", "60"], sudo=True)
        scans.append(scan_for(secrets))
        scans.append(memory_hits(conn.info().pid, secrets))  # the agent, as the test user over ssh
        sleeper.kill()
        assert sleeper.wait(10) == -9
    assert scans == [[], [], []]


def root_copies() -> List[str]:
    """The private copies of the agent that root runs the privileged agent from."""
    return glob.glob("/run/remowt-root-*") + glob.glob("/var/tmp/remowt-root-*") + glob.glob("/tmp/remowt-root-*")


def cached_agent() -> str:
    """Where the test user's cache holds the agent that ``remowt.connect`` deploys."""
    home = pwd.getpwnam(TEST_USER).pw_dir
    digest = AgentBundle.default().hashes[local_platform()]
    return os.path.join(home, ".cache", "remowt", digest)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tool", TOOLS)
def test_ssh_a_tampered_user_cache_never_runs_as_root(sshd: SshServer, tool: str, tmp_path: os.PathLike[str]) -> None:
    """The user's agent is changed while it runs (by anything running as the user): root refuses its code."""
    mark = os.path.join(str(tmp_path), "ran-as-root")
    with ssh_connect(sshd, Prompts(TEST_PASSWORD), tool) as conn:
        assert conn.check_output(["true"]) == b""
        module = os.path.join(cached_agent(), "remowt", "agent", "main.py")
        with open(module, "a") as f:
            f.write(f"\nimport os as _os\nif _os.geteuid() == 0:\n    open({mark!r}, 'w').close()\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(importlib.util.cache_from_source(module))
        with pytest.raises(
            EscalationError, match=r"refusing to run the agent as root: .* is not the agent the client sent"
        ):
            conn.privileged.ping()
        assert not os.path.exists(mark), "the tampered agent ran as root"
        assert conn.run(["true"]).returncode == 0
    assert root_copies() == [], "the refused copy was left behind"


@pytest.mark.timeout(60)
def test_ssh_the_privileged_agent_runs_from_a_private_copy_of_roots(sshd: SshServer) -> None:
    with ssh_connect(sshd, Prompts(TEST_PASSWORD), "sudo") as conn:
        pid = conn.privileged.info().pid
        [copy] = root_copies()
        st = os.stat(copy)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
        with open(f"/proc/{pid}/maps") as f:
            loaded = {line.split()[-1] for line in f if "msgspec" in line}
        assert loaded and all(path.startswith(copy + "/") for path in loaded), loaded
        conn.privileged.close()
        assert wait_until(lambda: not os.path.exists(copy), 10), "the copy outlived the privileged agent"


# --- as root, in this process: no tool, no prompt ----------------------------------


def _refuse(prompt: str) -> str:
    raise AssertionError(f"root needs no password, but was asked {prompt!r}")


@pytest.fixture(params=TRANSPORTS)
def root_connect(request: pytest.FixtureRequest) -> Callable[..., remowt.Remowt]:
    """``loopback`` or ``connect_local``, for tests whose agent must run as root."""
    if os.geteuid() != 0:
        pytest.skip("needs to run as root")
    connect: Callable[..., remowt.Remowt] = {"loopback": remowt.loopback, "local": remowt.connect_local}[request.param]
    return connect


@pytest.mark.timeout(30)
def test_root_agent_starts_the_privileged_agent_without_a_prompt(root_connect: Callable[..., remowt.Remowt]) -> None:
    with root_connect(prompter=_refuse, escalation="sudo") as conn:
        assert conn.run(["id", "-u"], sudo=True, capture_output=True).stdout == b"0\n"
        assert conn.privileged.tool == ""
        info = conn.privileged.info()
        assert info.address == "agent-privileged" and info.pid != conn.info().pid
        assert conn.privileged.ping() >= 0


@pytest.mark.timeout(30)
def test_closing_the_view_ends_the_privileged_agent_and_loses_its_children(
    root_connect: Callable[..., remowt.Remowt],
) -> None:
    with root_connect(prompter=_refuse) as conn:
        first = conn.privileged.info().pid
        sleeper = conn.Popen(["sleep", "60"], sudo=True)
        conn.privileged.close()
        assert "agent-privileged" not in conn.router.reachable()
        start = time.monotonic()
        try:
            returncode: Optional[int] = sleeper.wait(timeout=20)
        except ConnectionLost:
            returncode = None
        assert time.monotonic() - start < 10
        assert returncode in (None, -9)
        assert wait_until(lambda: proc_gone(first), 10)
        assert conn.run(["true"]).returncode == 0
        assert conn.privileged.info().pid != first, "the next use starts a new privileged agent"


@pytest.mark.timeout(30)
def test_closing_the_connection_ends_the_privileged_agent(root_connect: Callable[..., remowt.Remowt]) -> None:
    conn = root_connect(prompter=_refuse)
    try:
        pid = conn.privileged.info().pid
        child = conn.Popen(["sleep", "60"], sudo=True).pid
    finally:
        conn.close()
    assert wait_until(lambda: proc_gone(pid) and proc_gone(child), 10)
    with pytest.raises(ConnectionLost):
        conn.privileged.run(["true"])


def test_bad_choices_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="escalation must be one of 'run0', 'sudo', 'doas'"):
        remowt.connect_local(escalation="su")
    with pytest.raises(TypeError, match="prompter must be a callable"):
        remowt.loopback(prompter="hunter2")  # type: ignore[arg-type]


def test_escalation_error_is_a_remowt_error() -> None:
    assert issubclass(EscalationError, remowt.RemowtError)
