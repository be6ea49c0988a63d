"""A target is not trusted with the user's prompter: only an escalation this side started may ask it."""

from __future__ import annotations

import select
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import paramiko
import pytest
from _util import connect_routers

import remowt
from remowt.endpoints.control import Control
from remowt.endpoints.escalate import EscalateApi, _Attempt, agent_command
from remowt.endpoints.prompt import MAX_REMOTE_TEXT, PromptApi, PromptService
from remowt.protocol import wire
from remowt.protocol.service import proxy
from remowt.rpc.router import Router
from remowt.runtime.real_subprocess import Popen as LocalPopen
from remowt.transports import loopback
from remowt.transports.ssh import interactive_answers


class Recorder:
    """A prompter that keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: List[str] = []

    def __call__(self, prompt: str) -> str:
        self.asked.append(prompt)
        return "hunter2"


@pytest.fixture
def fake_agent() -> Iterator[Tuple[Router, remowt.Remowt, Recorder]]:
    """A connection (on the public seam) to a fake agent: a router at "agent" that the test drives."""
    agent = Router(wire.AGENT)
    agent.register(Control(wire.AGENT))
    user_end, agent_end = loopback.pair()
    shaken = threading.Thread(target=agent.add_link, args=(agent_end,), kwargs={"timeout": 10}, daemon=True)
    shaken.start()
    prompts = Recorder()
    conn = remowt.connect_transport(user_end, description="fake target", prompter=prompts, agent_keepalive=0)
    shaken.join(10)
    try:
        yield agent, conn, prompts
    finally:
        conn.close()
        agent.close()


@pytest.mark.timeout(30)
def test_an_unsolicited_prompt_never_reaches_the_prompter(fake_agent: Tuple[Router, remowt.Remowt, Recorder]) -> None:
    agent, conn, prompts = fake_agent
    ask = proxy(PromptApi, agent, wire.USER, 10).ask
    with pytest.raises(remowt.EscalationError, match="unbidden"):
        ask("Your bank password: ", "sudo")
    conn.privileged  # made, but not starting: still refused  # noqa: B018
    with pytest.raises(remowt.EscalationError, match="no privileged agent was being started"):
        ask("[sudo] password for you: ", "sudo")
    assert prompts.asked == []
    assert conn.ping() < 5  # refusing does not harm the connection


class PhishingEscalator(EscalateApi):
    """A compromised agent's escalation: its prompt tries to hide who asks, as a terminal would show it."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.answers: List[bytearray] = []

    def elevate(self, tool: Optional[str]) -> str:
        ask = proxy(PromptApi, self.router, wire.USER, 10).ask
        self.answers.append(ask("\r\x1b[2KYour bank password\u202e: ", "sudo\x1b[8m"))
        self.answers.append(ask("x" * 5000, "doas"))
        return "sudo"

    def drop(self) -> bool:
        return False


@pytest.mark.timeout(30)
def test_the_targets_words_are_shown_marked_and_escaped(fake_agent: Tuple[Router, remowt.Remowt, Recorder]) -> None:
    """The prompter sees who asks first; what the target says cannot move the cursor, erase or reorder it."""
    agent, conn, prompts = fake_agent
    escalator = PhishingEscalator(agent)
    agent.register(escalator)
    assert conn.privileged.start(timeout=10) == "sudo"
    phish, long = prompts.asked
    assert phish == "fake target asks for sudo\\x1b[8m: \\r\\x1b[2KYour bank password\\u202e: "
    assert long.startswith("fake target asks for doas: xxx") and len(long) < MAX_REMOTE_TEXT + 40
    assert all(text.isprintable() for text in prompts.asked)
    assert escalator.answers == [bytearray(b"hunter2")] * 2


# Stands in for sudo, which runs its askpass helper ($SUDO_ASKPASS) once per attempt. Between two
# runs, a process in its own tree replays the token of the first (from the environment sudo got, or the
# script): the peer check cannot tell it apart.
TWO_ATTEMPTS_AND_A_REPLAY = """
token=${REMOWT_ASKPASS_TOKEN:-$(sed -n "s/^REMOWT_ASKPASS_TOKEN=//p" "$SUDO_ASKPASS" | tr -d "'")}
"$SUDO_ASKPASS" first
REMOWT_ASKPASS_TOKEN=$token "$@" replayed
"$SUDO_ASKPASS" second
"""


@pytest.mark.timeout(30)
def test_an_askpass_token_is_used_up_by_its_first_request(tmp_path: Path) -> None:
    """Even a process that the tool started gets nothing for a token already shown; the tool's next run works."""
    user, agent = Router(wire.USER), Router(wire.AGENT)
    prompts = Recorder()
    user.register(PromptService(prompts))
    connect_routers(user, agent)
    attempt = _Attempt(agent, wire.USER, "sudo", None)  # only its askpass side is used: no agent tree needed
    listener, env = attempt._askpass(str(tmp_path))
    try:
        argv = ["sh", "-c", TWO_ATTEMPTS_AND_A_REPLAY, "sh", *agent_command("askpass")]
        attempt.process = LocalPopen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3):
            assert select.select([listener], [], [], 10)[0], "the helper did not connect"
            attempt._serve_askpass(listener)
        out, err = attempt.process.communicate(timeout=10)
    finally:
        attempt._secrets.clear()
        listener.close()
        user.close()
        agent.close()
    assert out == "hunter2\nhunter2\n"
    assert "its token was used already" in err, err
    assert prompts.asked == ["first", "second"]


@pytest.mark.timeout(10)
def test_keyboard_interactive_gives_the_password_only_to_password_prompts() -> None:
    """An OTP or any other question of the server goes to the prompter, marked with the host, never the password."""
    asked = Recorder()
    handler = interactive_answers("s3cret", asked, "ssh me@web1:22")
    answers = handler("", "", [("Password: ", False), ("Verification code: ", False), ("Your name? ", True)])
    assert answers == ["s3cret", "hunter2", "hunter2"]
    assert asked.asked == ["ssh me@web1:22: Verification code: ", "ssh me@web1:22: Your name? "]
    with pytest.raises(paramiko.AuthenticationException, match="Verification code"):
        interactive_answers("s3cret", None, "web1")("", "", [("Verification code: ", False)])
