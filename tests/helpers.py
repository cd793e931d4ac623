"""Helpers shared by the tests: identities, app connections and deadline polling."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio

from node_lite import (
    Name,
    Node,
    NodeConnection,
    SharedSecretProvider,
    instance_id_for,
    open_connection,
)
from slim_agents import Session, SessionConfig, open_app

# The tutorial's config.yaml, verbatim.
TUTORIAL_CONFIG = """\
tracing:
  log_level: info
  display_thread_names: true
  display_thread_ids: true

runtime:
  n_cores: 0
  thread_name: "slim-data-plane"
  drain_timeout: 10s

services:
  slim/0:
    dataplane:
      servers:
        - endpoint: "0.0.0.0:46357"
          tls:
            insecure: true

      clients: []
    controller:
      servers: []
"""

SECRET = "test-secret-that-is-long-enough-for-hmac-0123456789"
_counter = itertools.count()


def node_yaml(folder: Path, limits: str, *, runtime: str = "") -> Path:
    """A node config file in ``folder``: one server on a free loopback port, the
    shared secret, these ``limits`` (and ``runtime``, when given: YAML flow maps)."""
    path = folder / "node.yaml"
    head = f"runtime: {{{runtime}}}\n" if runtime else ""
    path.write_text(f"""{head}services:
  slim/0:
    dataplane:
      servers: [{{endpoint: "127.0.0.1:0"}}]
    auth: {{shared_secret: "{SECRET}"}}
    limits: {{{limits}}}
""")
    return path


def unique(prefix: str) -> str:
    """A name component unique to this worker, process and call."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{prefix}-{worker}-{os.getpid()}-{next(_counter)}"


def identity(app: str, *, org: str = "org", ns: str = "ns",
             secret: str = SECRET) -> tuple[SharedSecretProvider, Name]:
    """A token provider and the full name it is allowed to use."""
    provider = SharedSecretProvider(f"{org}/{ns}/{app}", secret)
    return provider, Name(org, ns, app, instance_id_for(provider.subject))


@asynccontextmanager
async def app_connection(target: str | Node, app: str, **kwargs: object
                         ) -> AsyncIterator[tuple[NodeConnection, Name]]:
    """A wire-level app connection with a valid token for ``org/ns/<app>``."""
    provider, name = identity(app)
    async with open_connection(target, name=name, token=provider.get_token(),
                               **kwargs) as conn:  # type: ignore[arg-type]
        yield conn, name


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 5.0,
                     message: str = "condition") -> None:
    """Poll ``predicate`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await anyio.sleep(0.005)


async def open_group(stack: AsyncExitStack, url: str, config: SessionConfig,
                     members: int) -> list[Session]:
    """A moderator app and ``members`` apps on ``url``, each invited to a fresh channel
    and holding the whole roster: the moderator's session first, then the members'."""
    names = [unique(f"m{i}") for i in range(members)]
    mod = await stack.enter_async_context(open_app("org/ns/mod", node=url, secret=SECRET))
    apps = [await stack.enter_async_context(open_app(f"org/ns/{n}", node=url, secret=SECRET))
            for n in names]
    group = await mod.create_session(f"org/ns/{unique('chan')}", config)
    sessions = [group]
    with anyio.fail_after(20):
        for app, n in zip(apps, names, strict=True):
            await group.invite(f"org/ns/{n}")
            sessions.append(await app.listen_for_session())
        for s in sessions:
            await s.wait_participants(members + 1)
    return sessions
