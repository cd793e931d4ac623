"""Hook specifications of slim_agents (pluggy project ``slim_agents``).

Plugins implement these with :data:`hookimpl` and register through the
``slim_agents`` entry-point group (or :meth:`PluginManager.register`).
Hooks are synchronous and return objects; where a hook returns an
awaitable, slim_agents awaits it in the agent's task group.

Which plugins load is chosen by the environment variable
``SLIM_AGENTS_PLUGINS``: unset loads every installed plugin, an empty value
loads none, ``a,b`` loads the entry points named ``a`` and ``b``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._agent import Agent
    from ._app_core import JoinInfo
    from ._reports import Message
    from ._session import Session
    from ._tools import Tool

hookspec = pluggy.HookspecMarker("slim_agents")
hookimpl = pluggy.HookimplMarker("slim_agents")

__all__ = ["hookimpl", "hookspec"]


# -------------------------------------------------------------------------
# Tools and handlers
# -------------------------------------------------------------------------


@hookspec
def slim_tools(agent: Agent) -> list[Tool] | None:
    """Tools a plugin adds to an agent.

    Called once per agent when it starts, before its tools are announced.
    Return a list of :class:`~slim_agents.Tool` (or None).
    """


@hookspec(firstresult=True)
def slim_invite_policy(agent: Agent, info: JoinInfo) -> bool | str | None:
    """Decide whether ``agent`` joins the session described by ``info``.

    Called for every invitation the agent receives. The first non-None result
    wins: True accepts, False or a string (the reason) declines. When every
    plugin returns None, the agent's own ``on_invite`` handler decides (and
    without one, the invitation is accepted).
    """


# -------------------------------------------------------------------------
# Message middleware
# -------------------------------------------------------------------------


@hookspec
def slim_before_send(agent: Agent, session: Session, payload: bytes,
                     metadata: dict[str, str]) -> bytes | None:
    """See (and possibly replace) a payload before the agent sends it.

    Called for every message an agent's tools and helpers send. ``metadata``
    may be changed in place (trace context, for instance). Return new bytes
    to replace the payload, or None to keep it. Results chain in plugin order.
    """


@hookspec
def slim_after_receive(agent: Agent, session: Session, message: Message) -> Message | None:
    """See (and possibly replace) a message the agent received, before its handlers.

    Return a new :class:`~slim_agents.Message` to replace it, or None.
    """


# -------------------------------------------------------------------------
# Session and membership events
# -------------------------------------------------------------------------


@hookspec
def slim_session_event(agent: Agent, session: Session, event: str) -> None:
    """A session of the agent changed state.

    ``event`` is ``"established"`` or ``"closed"``. Called in the agent's task.
    """


@hookspec
def slim_membership_event(agent: Agent, session: Session, added: list[Any],
                          removed: list[Any]) -> None:
    """Members joined or left a group session of the agent (lists of names)."""


# -------------------------------------------------------------------------
# Frameworks and backends
# -------------------------------------------------------------------------


@hookspec
def slim_framework_adapters() -> dict[str, Any] | None:
    """Adapters to agent frameworks this plugin provides.

    Return a mapping from a framework name (``"langchain"``, ``"mcp"``, ...) to
    an adapter object; :func:`slim_agents.framework_adapter` looks them up.
    """


@hookspec(firstresult=True)
def slim_backend(url: str) -> Any | None:
    """A transport backend for a node URL this plugin understands, or None.

    Lets apps run over another network (such as upstream SLIM through
    ``slim-bindings``) chosen by the URL's scheme: :func:`slim_agents.open_app`
    asks this hook for any scheme other than ``http``, ``https`` and ``tcp``.
    The backend is an object with ``open_app(name, *, node, secret, provider,
    verifier, tls, limits, invite_policy)``, an async context manager giving an
    object with :class:`~slim_agents.App`'s methods.
    """
