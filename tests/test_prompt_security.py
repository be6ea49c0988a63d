"""A target is not trusted with the user's prompter: only an escalation this side started may ask it."""

from __future__ import annotations

import threading
from typing import Iterator, List, Tuple

import paramiko
import pytest

import remowt
from remowt.endpoints.control import Control
from remowt.endpoints.prompt import PromptApi
from remowt.protocol import wire
from remowt.protocol.service import proxy
from remowt.rpc.router import Router
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
