# A swarm worker process (started by slim_agents._swarm, not by hand).
#
# Reads its configuration as one JSON line on stdin, runs its agents, and
# writes JSON lines on stdout: {"ev": "ready"|"down"|"log", "agent": ...}.
# End of file on stdin (the parent closed it, or died) stops the worker.
from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import traceback
from typing import Any

import anyio

from node_lite._util import run as run_on

from ._swarm import AgentSpec, load_factory

_agent_name: contextvars.ContextVar[str] = contextvars.ContextVar("agent", default="-")
_out_lock = threading.Lock()


def emit(event: dict[str, Any]) -> None:
    line = json.dumps(event, default=str) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class _ToParent(logging.Handler):
    """Log records travel to the parent, tagged with the agent that wrote them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            emit({"ev": "log", "agent": _agent_name.get(), "level": record.levelno,
                  "logger": record.name, "msg": msg})
        except Exception:
            self.handleError(record)


async def run_agent(spec: AgentSpec, url: str, secret: str, backoff: float,
                    max_backoff: float) -> None:
    _agent_name.set(spec.name)
    log = logging.getLogger("slim_agents.swarm.worker")
    delay = backoff
    factory = load_factory(spec.factory)
    while True:
        try:
            agent = factory(spec.name, **spec.kwargs)
            async with agent.run(url, secret=secret):
                emit({"ev": "ready", "agent": spec.name})
                delay = backoff
                await anyio.sleep_forever()
        except Exception:
            # The agent failed (its factory, or a connection that would not come
            # back): tell the parent and try again after a pause.
            log.exception("agent %s failed; restarting in %.1f s", spec.name, delay)
            emit({"ev": "down", "agent": spec.name})
            await anyio.sleep(delay)
            delay = min(delay * 2, max_backoff)


async def main(config: dict[str, Any]) -> None:
    async with anyio.create_task_group() as tg:
        for a in config["agents"]:
            spec = AgentSpec(a["factory"], a["name"], a.get("kwargs") or {})
            tg.start_soon(run_agent, spec, config["url"], config["secret"],
                          config["restart"]["backoff"], config["restart"]["max_backoff"])
        # Stop when the parent closes stdin (or dies).
        await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
        tg.cancel_scope.cancel()


def run() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    config = json.loads(line)
    root = logging.getLogger()
    root.handlers[:] = [_ToParent()]
    root.setLevel(int(config.get("log_level", logging.WARNING)))
    try:
        run_on(main, config, backend=config.get("backend", "asyncio"))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(run())
