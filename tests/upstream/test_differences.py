"""What differs on upstream SLIM, tested explicitly (see slim_agents_plugins.upstream).

Instance ids, delivery reports, invitation policy, close reasons, the missing
directory, encryption state, configuration errors, and interplay with plain
slim-bindings apps that know nothing of slim-agents.
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

pytest.importorskip("slim_bindings", reason="slim-bindings is not installed "
                    "(pip install 'slim-agents[upstream]')")

import slim_bindings as sb

from node_lite import LimitExceededError
from slim_agents import (
    ConfigError,
    ConnectError,
    JoinInfo,
    Name,
    NoRouteError,
    PluginError,
    SessionConfig,
    SessionError,
    SessionKind,
    open_app,
)
from slim_agents._app import _backend_for
from slim_agents_plugins import _hooks, upstream
from tests.helpers import unique, wait_until
from tests.upstream import SECRET, upstream_plugin, upstream_server_url

__all__ = ["upstream_plugin", "upstream_server_url"]  # fixtures used here

pytestmark = pytest.mark.anyio
RELIABLE = SessionConfig(timeout=0.5, max_retries=10)
GROUP = SessionConfig.group(timeout=0.5, max_retries=10)
LIMIT = 20
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def test_instance_ids_are_hashes_of_upstream_uuids(upstream_server_url: str) -> None:
    ns = unique("ids")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/alice", node=upstream_server_url, secret=SECRET) as a, \
                open_app(f"org/{ns}/alice", node=upstream_server_url, secret=SECRET) as a2:
            assert UUID.match(a.upstream_id)
            assert a.name.id == upstream._short_id(a.upstream_id) and a.name != a2.name
            assert a.statistics()["backend"] == "upstream"
            # A full name this process never saw cannot be mapped back to a UUID.
            with pytest.raises(NoRouteError):
                await a.create_session(Name("org", ns, "bob", 12345), RELIABLE)
            s = await a.create_session(a2.name, RELIABLE)  # a full name it knows
            r = await a2.listen_for_session()
            assert s.dst == a2.name and r.dst == a.name


async def test_delivery_reports_are_all_or_nothing(upstream_server_url: str) -> None:
    ns = unique("reports")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/mod", node=upstream_server_url, secret=SECRET) as a, \
                open_app(f"org/{ns}/bob", node=upstream_server_url, secret=SECRET) as b:
            g = await a.create_session(Name("org", ns, "room"), GROUP)
            # Upstream would never complete a publish to an empty group: reported at once.
            alone = await g.publish(b"anyone?")
            assert alone.done and (await alone).delivered == ()
            await g.invite(b.name)
            handles = [await g.publish(b"m%d" % i) for i in range(3)]
            reports = [await h for h in handles]
            # message ids are local counters; recipients come from the roster.
            assert [r.message_id for r in reports] == [2, 3, 4]
            assert all(r.delivered == (b.name,) and r.ok and r.reliable for r in reports)
            best_effort = await a.create_session(f"org/{ns}/bob", SessionConfig())
            report = await (await best_effort.publish(b"x"))
            assert not report.reliable and report.delivered == (b.name,)


async def test_invite_policy_runs_after_joining_and_a_decline_leaves(
        upstream_server_url: str) -> None:
    ns = unique("policy")
    asked: list[JoinInfo] = []
    declined: list[Any] = []

    def busy(info: JoinInfo) -> bool | str:
        asked.append(info)
        # Upstream has joined already: the session exists while the policy decides.
        declined.extend(s for s in b.sessions if s.id == info.session_id)
        return "busy"

    url = upstream_server_url
    with anyio.fail_after(LIMIT):
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(open_app(f"org/{ns}/mod", node=url,
                                                         secret=SECRET))
            b = await stack.enter_async_context(open_app(f"org/{ns}/bob", node=url,
                                                         secret=SECRET, invite_policy=busy))
            c = await stack.enter_async_context(open_app(f"org/{ns}/carol", node=url,
                                                         secret=SECRET))
            g = await a.create_session(Name("org", ns, "room"), GROUP)
            await g.invite(c.name)
            # The invite succeeds (the full name, unless it has already left again)...
            assert (await g.invite(f"org/{ns}/bob")).same_service(b.name)
            # ...then the member leaves: its policy runs once it has joined, which under
            # load can be after the moderator's invite completed.
            await wait_until(lambda: bool(asked), message="bob's invite policy")
            [info], [session] = asked, declined
            assert await session.wait_closed() == "declined (busy)"
            assert (info.kind, info.channel, info.moderator) == \
                (SessionKind.GROUP, Name("org", ns, "room"), a.name)
            # Bob's side closes once its leave is sent; the moderator's roster follows
            # when upstream has handled it (under load, later).
            await wait_until(lambda: set(g.participants) == {a.name, c.name},
                             message="bob gone from the moderator's roster")
            assert not g.is_closed
            assert b.sessions == []


async def test_a_group_ends_when_its_last_member_leaves(upstream_server_url: str) -> None:
    ns = unique("last")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/mod", node=upstream_server_url, secret=SECRET) as a, \
                open_app(f"org/{ns}/bob", node=upstream_server_url, secret=SECRET) as b:
            g = await a.create_session(Name("org", ns, "room"), GROUP)
            await g.invite(b.name)
            member = await b.listen_for_session()
            await member.close()
            assert member.close_reason == "closed"
            # node_lite keeps the moderator's group open; upstream ends it.
            assert await g.wait_closed() == "last member left"


async def test_no_directory(upstream_server_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{unique('dir')}/a", node=upstream_server_url,
                            secret=SECRET) as a:
            await a.announce(b'{"agent": "a"}')
            assert a.card == b'{"agent": "a"}'
            with pytest.raises(LimitExceededError):
                await a.announce(b"x" * (64 * 1024 + 1))
            with pytest.raises(upstream.DirectoryUnsupportedError) as info:
                await a.lookup("org")
            assert info.value.code == "unsupported"


async def test_keys_are_upstream_managed(upstream_server_url: str) -> None:
    ns = unique("keys")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/a", node=upstream_server_url, secret=SECRET) as a, \
                open_app(f"org/{ns}/b", node=upstream_server_url, secret=SECRET):
            s = await a.create_session(f"org/{ns}/b", SessionConfig(
                timeout=0.5, max_retries=10, mls_enabled=True))
            assert s.encryption is None
            with pytest.raises(SessionError):
                await s.rotate_keys()


async def test_configuration_errors(upstream_server_url: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = upstream_server_url
    with anyio.fail_after(LIMIT):
        with pytest.raises(ConfigError):
            async with open_app("org/ns/a", node=url, secret=SECRET, tls=object()):  # type: ignore[arg-type]
                pass
        with pytest.raises(ConfigError):
            async with open_app("org/ns/a", node=url):
                pass
        with pytest.raises(ConfigError):
            async with open_app("org/ns/a", node="slim://no-port", secret=SECRET):
                pass
        with pytest.raises(PluginError):
            async with open_app("org/ns/a", node="gopher://127.0.0.1:1", secret=SECRET):
                pass
        # Upstream redials a dead endpoint forever; the first connection gives up.
        monkeypatch.setattr(upstream, "CONNECT_TIMEOUT", 0.3)
        port = upstream._free_port("127.0.0.1")
        with pytest.raises(ConnectError):
            async with open_app("org/ns/a", node=f"slim://127.0.0.1:{port}", secret=SECRET):
                pass


def test_the_plugin_serves_slim_urls_only(upstream_plugin: None) -> None:
    assert isinstance(_backend_for("slim://127.0.0.1:46357"), upstream.UpstreamBackend)
    assert _hooks.upstream.slim_backend(url="http://127.0.0.1:46357") is None
    assert _hooks.upstream.slim_backend(url="SLIM://127.0.0.1:46357") is upstream.backend()


async def _plain_app(url: str, name: Name) -> tuple[sb.Service, sb.App]:
    """An upstream app that knows nothing of slim-agents (slim_bindings only)."""
    native = upstream._native()
    service = sb.Service(f"plain-{name.app}")
    endpoint = "http://" + url.split("://", 1)[1]
    conn = await upstream._ffi(native, lambda: service.connect_async(
        sb.new_insecure_client_config(endpoint)))
    app = service.create_app_with_secret(sb.Name(name.org, name.ns, name.app), SECRET)
    await upstream._ffi(native, lambda: app.subscribe_async(app.name(), conn))
    await upstream._ffi(native, lambda: app.set_default_gateway_async(conn))
    return service, app


async def test_groups_with_plain_upstream_apps(upstream_server_url: str) -> None:
    ns = unique("plain")
    native = upstream._native()
    url = upstream_server_url
    service, plain = await _plain_app(url, Name("org", ns, "plain"))
    try:
        with anyio.fail_after(LIMIT):
            async with open_app(f"org/{ns}/ours", node=url, secret=SECRET) as ours:
                # A plain moderator: members cannot tell who moderates.
                made = await upstream._ffi(native, lambda: plain.create_session_async(
                    sb.SessionConfig(session_type=sb.SessionType.GROUP, max_retries=10,
                                     interval=upstream._duration(0.5), metadata={},
                                     mls_settings=None), sb.Name("org", ns, "hall")))
                await upstream._ffi(native, made.completion.wait_async)
                hall = made.session
                invited = await upstream._ffi(native, lambda: hall.invite_async(
                    sb.Name("org", ns, "ours")))
                await upstream._ffi(native, invited.wait_async)
                member = await ours.listen_for_session()
                assert member.moderator is None and member.dst == Name("org", ns, "hall")
                assert len(member.participants) == 2
                sent = await upstream._ffi(native, lambda: hall.publish_async(b"hi", None, None))
                await upstream._ffi(native, sent.wait_async)
                assert (await member.get_message()).payload == b"hi"

                # Our moderator: a plain member sees the roster notice and the metadata key.
                g = await ours.create_session(Name("org", ns, "room"), GROUP)
                await g.invite(f"org/{ns}/plain")
                joined = await upstream._ffi(native, lambda: plain.listen_for_session_async(
                    upstream._duration(5)))
                assert joined.metadata()[upstream.MODERATOR_KEY].endswith(ours.upstream_id)
                notice = await upstream._ffi(native, lambda: joined.get_message_async(
                    upstream._duration(5)))
                assert notice.context.payload_type == upstream.ROSTER_TYPE
                await g.publish(b"for all")
                got = await upstream._ffi(native, lambda: joined.get_message_async(
                    upstream._duration(5)))
                assert got.payload == b"for all"
    finally:
        await upstream._ffi(native, service.shutdown_async)
