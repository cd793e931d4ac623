"""Agent factories the swarm tests start in worker processes."""

from __future__ import annotations

import logging
import os

from slim_agents import Agent, Message, Session
from slim_agents._plugins import make_plugin_manager


def worker(name: str, greeting: str = "hello") -> Agent:
    agent = Agent(name, description="a swarm worker", plugins=make_plugin_manager(allow=False))

    @agent.on_message
    async def answer(msg: Message, session: Session) -> str:
        return f"{greeting} from {name}: {msg.payload.decode()}"

    @agent.tool
    async def whoami() -> dict[str, object]:
        """This agent's name, process id and event loop."""
        import asyncio

        try:
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        except RuntimeError:
            loop = "trio"
        return {"name": name, "pid": os.getpid(), "loop": loop}

    logging.getLogger("swarm-test").warning("worker %s starting", name)
    return agent


def crasher(name: str) -> Agent:
    os._exit(3)  # the whole worker process dies at once
