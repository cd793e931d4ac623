"""The upstream-compatible dialects (slim_agents.compat.v0_6 / v0_7), on asyncio and trio.

Upstream's own test semantics (spec §11.1-§11.2) through a node_lite node, and
the seeds' code run as programs (tests/slim_agents/seed_programs).
"""

from __future__ import annotations

import base64
import datetime
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from anyio.abc import Process, TaskGroup

import slim_agents.compat.v0_6 as v06
import slim_agents.compat.v0_7 as v07
from node_lite import Node, NodeConfig, open_node
from slim_agents import SessionConfig, SessionKind
from slim_agents.compat import _common
from tests.helpers import SECRET, unique

pytestmark = pytest.mark.anyio
SEEDS = Path(__file__).parent / "seed_programs"
REPO = Path(__file__).parents[2]
MS100 = datetime.timedelta(milliseconds=100)
RELIABLE_TIMEOUT = datetime.timedelta(seconds=1)

try:
    import xxhash  # noqa: F401
    HAVE_XXHASH = True
except ImportError:
    HAVE_XXHASH = False
needs_xxhash = pytest.mark.skipif(not HAVE_XXHASH, reason="name hashes need xxhash")


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


def slim_config(url: str) -> dict[str, Any]:
    return {"endpoint": url, "tls": {"insecure": True}}


def v06_identity(local: str) -> tuple[v06.PyIdentityProvider, v06.PyIdentityVerifier]:
    return (v06.PyIdentityProvider.SharedSecret(identity=local, shared_secret=SECRET),
            v06.PyIdentityVerifier.SharedSecret(identity=local, shared_secret=SECRET))


async def v06_app(node: Node, app: str) -> v06.Slim:
    slim = await v06.Slim.new(v06.PyName("org", "default", app), *v06_identity(f"org/ns/{app}"))
    await slim.connect(slim_config(node.url))
    return slim


def v07_app(app: str) -> v07.Slim:
    return v07.Slim(v07.Name("org", "default", app),
                    v07.IdentityProvider.SharedSecret(identity=app, shared_secret=SECRET),
                    v07.IdentityVerifier.SharedSecret(identity=app, shared_secret=SECRET))


# -- names, configurations, tracing ------------------------------------------------------


@needs_xxhash
def test_names_print_with_the_tutorials_hashes() -> None:
    expected = {"agntcy": "169ca82eb17d6bc2", "ns": "eef9769a4c6990d1",
                "moderator": "fc9bbc406957794b", "client-1": "58ec40d7c837e0b9",
                "client-2": "b521a3788f1267a8", "chat": "4abb367236cabc2a"}
    for text, digest in expected.items():
        assert f"{_common.component_hash(text):x}" == digest
    assert str(v06.PyName("agntcy", "ns", "moderator")) == (
        "169ca82eb17d6bc2/eef9769a4c6990d1/fc9bbc406957794b/ffffffffffffffff "
        "(agntcy/ns/moderator/ffffffffffffffff)")
    name = v06.PyName("agntcy", "ns", "client-1", id=0x6A34B65EBC955471)
    assert str(name) == ("169ca82eb17d6bc2/eef9769a4c6990d1/58ec40d7c837e0b9/6a34b65ebc955471 "
                         "(agntcy/ns/client-1/6a34b65ebc955471)")
    assert name.components() == [0x169CA82EB17D6BC2, 0xEEF9769A4C6990D1, 0x58EC40D7C837E0B9,
                                 0x6A34B65EBC955471]
    assert str(v07.Name("agntcy", "ns", "chat")).startswith(
        "169ca82eb17d6bc2/eef9769a4c6990d1/4abb367236cabc2a/ffffffffffffffff")


@pytest.mark.parametrize("data", ["not json", "[1]", "[" * 5000 + "]" * 5000],
                         ids=["not json", "not an object", "nested too deeply"])
def test_unreadable_jwk_key_data_is_a_config_error(data: str) -> None:
    from node_lite import ConfigError

    key = v07.Key(v07.Algorithm.ES256, v07.KeyFormat.Jwk, v07.KeyData.Content(data))
    with pytest.raises(ConfigError, match="key data"):
        key.material()


def test_names_without_xxhash_print_their_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "_xxh64", None)
    _common.component_hash.cache_clear()
    try:
        assert str(v06.PyName("agntcy", "ns", "chat")) == "agntcy/ns/chat/ffffffffffffffff"
        assert str(v06.PyName("agntcy", "ns", "chat", id=255)) == "agntcy/ns/chat/ff"
        with pytest.raises(RuntimeError, match="xxhash"):
            v06.PyName("a", "b", "c").components()
    finally:
        _common.component_hash.cache_clear()


def test_name_values() -> None:
    a = v06.PyName("org", "ns", "app")
    assert a.id == 0xFFFF_FFFF_FFFF_FFFF
    assert a.components_strings() == ["org", "ns", "app"]
    b = v06.PyName("org", "ns", "app", id=42)
    assert a != b and a.equal_without_id(b)
    assert hash(b) == hash(v06.PyName("org", "ns", "app", 42)) and b == v06.PyName(
        "org", "ns", "app", 42)
    a.set_id(42)
    assert a == b
    a.id = 0xFFFF_FFFF_FFFF_FFFF
    assert a.to_native().id is None and b.to_native().id == 42
    assert v06.split_id("org/ns/app") == v06.PyName("org", "ns", "app")
    with pytest.raises(ValueError, match="organization/namespace"):
        v06.split_id("org/ns")
    with pytest.raises(ValueError, match="instance id"):
        v06.PyName("org", "ns", "app", id=-1)
    assert v07.Name is v06.PyName  # one implementation, two spellings


def test_session_configurations() -> None:
    td = datetime.timedelta
    chan = v06.PyName("org", "ns", "chat")
    g = v06.PySessionConfiguration.Group(channel_name=chan, max_retries=5, timeout=td(seconds=5),
                                         mls_enabled=True, metadata={"k": "v"})
    assert g == v06.PySessionConfiguration.Group(channel_name=chan, max_retries=5,
                                                 timeout=td(seconds=5), mls_enabled=True,
                                                 metadata={"k": "v"})
    assert g != v06.PySessionConfiguration.Group(channel_name=chan, max_retries=5,
                                                 timeout=td(seconds=4), mls_enabled=True)
    assert g.channel_name == g.destination_name == chan and g.peer_name is None
    assert g.native() == SessionConfig(kind=SessionKind.GROUP, timeout=5.0, max_retries=5,
                                       mls_enabled=True, metadata={"k": "v"})
    default = v06.PySessionConfiguration.Group(channel_name=chan)
    assert (default.max_retries, default.timeout) == (0, td(seconds=1))
    p = v06.PySessionConfiguration.PointToPoint(peer_name=chan)
    assert not p.native().reliable and "PointToPoint(peer_name=" in str(p)
    q = v07.SessionConfiguration.PointToPoint(max_retries=5, timeout=td(seconds=5),
                                              mls_enabled=True)
    assert q.native().mls_enabled and q.native().reliable and q.destination_name is None
    assert v07.SessionConfiguration.Group().native().kind is SessionKind.GROUP


@pytest.fixture
def logger_levels() -> Iterator[None]:
    """init_tracing sets the package loggers' levels: put them back."""
    loggers = [logging.getLogger(n) for n in ("slim_agents", "node_lite")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


@pytest.mark.usefixtures("logger_levels")
def test_init_tracing_needs_no_await() -> None:
    done = v06.init_tracing({"log_level": "info", "opentelemetry": {"enabled": False}})
    assert not hasattr(done, "cr_frame")  # not a coroutine: no "never awaited" warning
    v07.init_tracing({"log_level": "debug"})
    assert logging.getLogger("node_lite").level == logging.DEBUG


@pytest.mark.usefixtures("logger_levels")
async def test_init_tracing_may_be_awaited() -> None:
    await v06.init_tracing({"log_level": "warn"})
    assert logging.getLogger("slim_agents").level == logging.WARNING
    assert v06.get_version()


# -- v0.6 end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("via", ["node", "run_server"])
async def test_end_to_end(node: Node, via: str) -> None:
    """Upstream's test_end_to_end and test_slim_wrapper: round trip, equal ids, reply,
    then "session closed" on use and on a second delete."""
    bob_app = unique("bob")
    server = await v06.Slim.new(v06.PyName("agntcy", "default", "server"),
                                *v06_identity("agntcy/default/server"))
    alice = await v06.Slim.new(v06.PyName("org", "default", "alice"),
                               *v06_identity("org/default/alice"))
    bob = await v06.Slim.new(v06.PyName("org", "default", bob_app),
                             *v06_identity(f"org/default/{bob_app}"))
    async with server, alice, bob:
        url = node.url
        if via == "run_server":
            bound = await server.run_server({"endpoint": "127.0.0.1:0",
                                             "tls": {"insecure": True}})
            assert server.server_endpoints == [bound]
            url = f"http://{bound}"
        with pytest.raises(RuntimeError, match=r"No active connection\. Please connect first\."):
            await alice.set_route(bob.local_name)
        assert isinstance(await alice.connect(slim_config(url)), int)
        await bob.connect(slim_config(url))
        assert alice.local_name.id == alice.id
        assert alice.id_str == f"org/default/alice/{alice.id}"
        await alice.set_route(bob.local_name)

        session = await alice.create_session(v06.PySessionConfiguration.PointToPoint(
            peer_name=bob.local_name, timeout=RELIABLE_TIMEOUT, max_retries=5))
        msg = list(range(1, 10))
        await session.publish(bytes(msg))
        with anyio.fail_after(5):
            recv = await bob.listen_for_session()
        ctx, data = await recv.get_message()
        assert list(data) == msg
        assert recv.id == session.id
        assert recv.session_type == v06.PySessionType.PointToPoint
        assert recv.src == bob.local_name and recv.dst == alice.local_name
        assert session.dst == bob.local_name and session.src == alice.local_name
        assert ctx.source_name == alice.local_name and ctx.payload_type == "msg"
        assert ctx.destination_name == bob.local_name and ctx.metadata == {}
        assert isinstance(ctx.input_connection, int)

        await recv.publish_to(ctx, bytes(reversed(msg)), payload_type="reply",
                              metadata={"k": "v"})
        ctx2, data2 = await session.recv()
        assert list(data2) == list(reversed(msg))
        assert (ctx2.payload_type, ctx2.metadata) == ("reply", {"k": "v"})

        await alice.delete_session(session)
        with pytest.raises(Exception, match="session closed"):
            await session.publish(b"after delete")
        with pytest.raises(Exception, match="session closed"):
            await alice.delete_session(session)
        with pytest.raises(Exception, match="session closed"):
            await session.get_message()
        with anyio.fail_after(5), pytest.raises(Exception, match="session closed"):
            await recv.get_message()  # the peer was told
        await alice.disconnect(url)
        assert alice.conn_id is None and alice.app is None
        with pytest.raises(RuntimeError, match="No active connection"):
            await alice.set_route(bob.local_name)
        if via == "run_server":
            await server.stop_server(bound)
            assert server.server_endpoints == []


async def test_group_of_three_with_mls(node: Node) -> None:
    """Upstream's test_group, with three members and mls_enabled=True."""
    chan = v06.PyName("org", "default", unique("chat"))
    names = [unique("mod"), unique("p1"), unique("p2")]
    apps = [await v06_app(node, n) for n in names]
    try:
        mod, p1, p2 = apps
        group = await mod.create_session(v06.PySessionConfiguration.Group(
            channel_name=chan, max_retries=5, timeout=datetime.timedelta(seconds=5),
            mls_enabled=True))
        assert group.session_config.mls_enabled and group.dst == chan
        for member in (p1, p2):
            invite_name = v06.PyName("org", "default", member.local_name.components_strings()[2])
            await mod.set_route(invite_name)
            await group.invite(invite_name)
        with anyio.fail_after(5):
            sessions = [group] + [await app.listen_for_session() for app in (p1, p2)]
        for app, s in zip(apps, sessions, strict=True):
            assert s.session_type == v06.PySessionType.Group
            assert s.dst == chan and s.src == app.local_name and s.id == group.id
        for i, s in enumerate(sessions):
            await s.publish(f"from {i}".encode())
        with anyio.fail_after(5):
            for i, (app, s) in enumerate(zip(apps, sessions, strict=True)):
                got = {}
                for _ in range(2):
                    ctx, data = await s.get_message()
                    got[data.decode()] = ctx.source_name
                assert got == {f"from {j}": apps[j].local_name for j in range(3) if j != i}, app
        await mod.delete_session(group)
        with anyio.fail_after(5):
            for s in sessions[1:]:
                with pytest.raises(Exception, match="session closed"):
                    await s.get_message()
    finally:
        for app in apps:
            await app.aclose()


async def test_listen_and_get_message_time_out(node: Node) -> None:
    async with await v06_app(node, unique("a")) as a, await v06_app(node, unique("b")) as b:
        start = anyio.current_time()
        with pytest.raises(TimeoutError, match="timed out"):
            await a.listen_for_session(MS100)
        assert 0.08 <= anyio.current_time() - start <= 0.5
        s = await a.create_session(v06.PySessionConfiguration.PointToPoint(peer_name=b.local_name))
        await s.publish(b"x")
        r = await b.listen_for_session(datetime.timedelta(seconds=5))
        assert (await r.get_message(datetime.timedelta(seconds=5)))[1] == b"x"
        start = anyio.current_time()
        with pytest.raises(TimeoutError, match="timed out"):
            await r.get_message(MS100)
        assert 0.08 <= anyio.current_time() - start <= 0.5


async def test_session_metadata_reaches_the_receiver(node: Node) -> None:
    async with await v06_app(node, unique("a")) as a, await v06_app(node, unique("b")) as b:
        s = await a.create_session(v06.PySessionConfiguration.PointToPoint(
            peer_name=v06.PyName("org", "default", b.local_name.components_strings()[2]),
            metadata={"a": "1", "k": "session"}))
        assert s.metadata == {"a": "1", "k": "session"}
        await s.publish(b"hi")
        with anyio.fail_after(5):
            r = await b.listen_for_session()
        assert r.metadata == {"a": "1", "k": "session"}
        assert r.session_config.metadata == {"a": "1", "k": "session"}
        assert r.session_config.peer_name == a.local_name


async def test_publish_to_an_unknown_service_fails(node: Node) -> None:
    async with await v06_app(node, unique("a")) as a:
        s = await a.create_session(v06.PySessionConfiguration.PointToPoint(
            peer_name=v06.PyName("org", "default", unique("nobody"))))
        with anyio.fail_after(10), pytest.raises(Exception, match="no matching found"):
            await s.publish(b"x")


# -- v0.7 handles ----------------------------------------------------------------------------


async def test_v07_handles(node: Node) -> None:
    a, b, c = v07_app(unique("a")), v07_app(unique("b")), v07_app(unique("c"))
    async with a, b, c:
        for app in (a, b, c):
            await app.connect(slim_config(node.url))
        config = v07.SessionConfiguration.PointToPoint(
            max_retries=5, timeout=RELIABLE_TIMEOUT, mls_enabled=True, metadata={"x": "y"})
        session, handle = await a.create_session(b.local_name, config)
        with anyio.fail_after(5):
            await handle
        with pytest.raises(RuntimeError, match="already consumed"):
            await handle
        assert session.dst == b.local_name
        r = await b.listen_for_session(datetime.timedelta(seconds=5))
        assert r.metadata == {"x": "y"} and r.session_config.mls_enabled

        publish = await session.publish(b"ack me")
        with anyio.fail_after(5):
            await publish  # resolves once b acknowledged
        with pytest.raises(RuntimeError, match="already consumed"):
            await publish
        ctx, data = await r.get_message(timeout=datetime.timedelta(seconds=5))
        assert data == b"ack me" and ctx.identity and ctx.source_name == a.local_name
        await (await r.publish_to(ctx, b"back")).wait_for(5)
        assert (await session.get_message())[1] == b"back"

        deleted = await a.delete_session(session)
        with pytest.raises(Exception, match="session closed"):
            await session.publish(b"late")
        with anyio.fail_after(5):
            await deleted

        chan = v07.Name("org", "default", unique("chan"))
        group, created = await a.create_session(chan, v07.SessionConfiguration.Group(
            max_retries=5, timeout=RELIABLE_TIMEOUT, mls_enabled=True))
        await created
        invites = [await group.invite(v07.Name("org", "default",
                                               app.local_name.components_strings()[2]))
                   for app in (b, c)]
        with anyio.fail_after(5):
            for h in invites:
                await h
            rb = await b.listen_for_session()
            rc = await c.listen_for_session()
        assert rb.dst == rc.dst == chan and rb.session_type == v07.SessionType.Group
        await (await group.publish(b"to all")).wait()
        assert (await rb.get_message())[1] == (await rc.get_message())[1] == b"to all"
        with anyio.fail_after(5):
            await (await group.remove(c.local_name))
            with pytest.raises(Exception, match="session closed"):
                await rc.get_message()
            await (await a.delete_session(group))
            with pytest.raises(Exception, match="session closed"):
                await rb.get_message()


async def test_v07_creation_to_nobody_does_not_complete(node: Node) -> None:
    async with v07_app(unique("a")) as a:
        await a.connect(slim_config(node.url))
        _, handle = await a.create_session(v07.Name("org", "default", unique("nobody")),
                                           v07.SessionConfiguration.PointToPoint())
        with anyio.fail_after(10), pytest.raises(Exception, match="no matching found"):
            await handle.wait_for(datetime.timedelta(seconds=5))


# -- JWT identities with the tutorial's helper -------------------------------------------------


def load_seed_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"seed_{name}", SEEDS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_tutorial_jwt_identity_helper(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("jwt")
    from cryptography.hazmat.primitives.asymmetric import rsa

    from node_lite import JwtProvider, jwks_from_public_keys

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = jwks_from_public_keys(key, key_ids=["k1"], algorithms=["RS256"])
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"example.org": base64.b64encode(
        json.dumps(jwks).encode()).decode()}))
    common = load_seed_module("common_v0_6")
    apps = []
    for who in ("alice", "bob"):
        token = JwtProvider(key, algorithm="RS256", subject=f"spiffe://example.org/{who}",
                            audience=["slim"], key_id="k1").get_token()
        (tmp_path / f"{who}.jwt").write_text(token)
    async with open_node(NodeConfig()) as node:  # the node checks nothing: apps do
        for who in ("alice", "bob"):
            apps.append(await common.create_local_app(
                f"org/ns/{who}", slim_config(node.url), jwt=str(tmp_path / f"{who}.jwt"),
                spire_trust_bundle=str(bundle), audience=["slim"]))
        alice, bob = apps
        try:
            assert "Using JWT + JWKS authentication." in capsys.readouterr().out
            s = await alice.create_session(v06.PySessionConfiguration.PointToPoint(
                peer_name=common.split_id("org/ns/bob"), timeout=RELIABLE_TIMEOUT,
                max_retries=3))
            await s.publish(b"signed")
            with anyio.fail_after(5):
                r = await bob.listen_for_session()
                ctx, data = await r.get_message()
            assert data == b"signed" and ctx.identity == "spiffe://example.org/alice"
            # a verifier for another audience refuses alice's token
            _, strict = common.jwt_identity(str(tmp_path / "bob.jwt"), str(bundle),
                                            aud=["other"])
            picky = await v06.Slim.new(common.split_id("org/ns/picky"),
                                       v06.PyIdentityProvider.StaticJwt(
                                           str(tmp_path / "bob.jwt")), strict)
            async with picky:
                await picky.connect(slim_config(node.url))
                s2 = await alice.create_session(v06.PySessionConfiguration.PointToPoint(
                    peer_name=common.split_id("org/ns/picky"), timeout=RELIABLE_TIMEOUT,
                    max_retries=3))
                with anyio.fail_after(10), pytest.raises(Exception, match="audience"):
                    await s2.publish(b"refused")
        finally:
            for app in apps:
                await app.aclose()


def test_jwt_keys_map_onto_node_lite(tmp_path: Path) -> None:
    pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from node_lite import AuthenticationError, ConfigError, jwks_from_public_keys

    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (tmp_path / "key.pem").write_text(private_pem)
    provider = v06.PyIdentityProvider.Jwt(
        private_key=v06.PyKey(v06.PyAlgorithm.ES256, v06.PyKeyFormat.Pem,
                              v06.PyKeyData.File(str(tmp_path / "key.pem"))),
        duration=datetime.timedelta(minutes=5), issuer="https://issuer", audience=["slim"],
        subject="spiffe://example.org/alice")
    token = provider.native().get_token()
    jwk = jwks_from_public_keys(public_pem)["keys"][0]
    for public in (v06.PyKey(v06.PyAlgorithm.ES256, v06.PyKeyFormat.Pem,
                             v06.PyKeyData.Content(public_pem)),
                   v07.Key(v07.Algorithm.ES256, v07.KeyFormat.Jwk,
                           v07.KeyData.Content(json.dumps(jwk)))):
        verifier = v06.PyIdentityVerifier.Jwt(public_key=public, issuer="https://issuer",
                                              audience=[["slim"]], require_iss=True,
                                              require_aud=True)
        assert verifier.native().verify(token).subject == "spiffe://example.org/alice"
    other_aud = v06.PyIdentityVerifier.Jwt(public_key=public, audience=["other"])
    with pytest.raises(AuthenticationError, match="audience"):
        other_aud.native().verify(token)
    other_sub = v06.PyIdentityVerifier.Jwt(public_key=public, subject="spiffe://x/bob")
    with pytest.raises(AuthenticationError, match="subject"):
        other_sub.native().verify(token)
    with pytest.raises(ConfigError, match="autoresolve"):
        v06.PyIdentityVerifier.Jwt(autoresolve=True)
    with pytest.raises(ConfigError):
        v06.PyIdentityProvider.StaticJwt(str(tmp_path / "missing.jwt"))


# -- the seeds as programs ----------------------------------------------------------------------


class Program:
    """A seed program in a subprocess; its output is collected as it comes."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.output = ""
        self._changed = anyio.Event()
        self._eof = anyio.Event()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            async for chunk in self.process.stdout:
                self.output += chunk.decode(errors="replace")
                self._changed.set()
                self._changed = anyio.Event()
        finally:
            self._eof.set()
            self._changed.set()

    async def wait_for(self, text: str, timeout: float = 15) -> None:
        with anyio.fail_after(timeout):
            while text not in self.output:
                if self._eof.is_set():
                    raise AssertionError(f"{self.name} ended without {text!r}:\n{self.output}")
                await self._changed.wait()

    async def finish(self, timeout: float = 20) -> str:
        with anyio.fail_after(timeout):
            rc = await self.process.wait()
            await self._eof.wait()
        assert rc == 0, f"{self.name} exited with {rc}:\n{self.output}"
        assert "Traceback" not in self.output, self.output
        return self.output


async def start(tg: TaskGroup, script: str, *args: str) -> Program:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = await anyio.open_process(
        [sys.executable, "-W", "error", str(SEEDS / script), *args], cwd=SEEDS, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    program = Program(process, f"{script} {' '.join(args[:2])}")
    tg.start_soon(program._read)
    return program


def program_args(node: Node, local: str, *more: str) -> list[str]:
    return ["--local", local, "--slim", json.dumps(slim_config(node.url)),
            "--shared-secret", SECRET, *more]


async def run_programs(body: Callable[[TaskGroup], Any]) -> None:
    async with anyio.create_task_group() as tg:
        try:
            await body(tg)
        finally:
            tg.cancel_scope.cancel()


async def test_seed_group_tutorial_v0_6(node: Node) -> None:
    """The tutorial's group example: two participants wait, the moderator creates the
    MLS group, invites them, and everyone talks until the moderator types exit."""
    c1, c2, mod = (f"agntcy/ns/{unique(n)}" for n in ("client-1", "client-2", "moderator"))
    chat = f"agntcy/ns/{unique('chat')}"

    async def body(tg: TaskGroup) -> None:
        p1 = await start(tg, "group_v0_6.py", *program_args(
            node, c1, "--input", "wait:> hello from moderator", "--input", "hi from client-1"))
        p2 = await start(tg, "group_v0_6.py", *program_args(
            node, c2, "--input", "wait:> hi from client-1", "--input", "hi from client-2"))
        for p in (p1, p2):
            await p.wait_for("Waiting for session...")
        m = await start(tg, "group_v0_6.py", *program_args(
            node, mod, "--remote", chat, "--invites", c1, "--invites", c2, "--enable-mls",
            "--input", "hello from moderator", "--input", "wait:> hi from client-1",
            "--input", "wait:> hi from client-2", "--input", "exit"))
        out_m = await m.finish()
        out_1, out_2 = await p1.finish(), await p2.finish()
        assert "Warning: Falling back to shared-secret authentication." in out_m
        assert f"{mod.capitalize()}/" in out_m and "Created app" in out_m
        assert f"Connected to {node.url}" in out_m
        assert "Creating new group session (moderator)... " in out_m
        for c in (c1, c2):
            assert f"{mod} -> add " in out_m and f"{c}/ffffffffffffffff" in out_m
        for out in (out_m, out_1, out_2):
            assert "Welcome to the group " in out and f"{chat}/ffffffffffffffff" in out
        assert f"{c1}/" in out_m and "> hi from client-1" in out_m
        assert "> hi from client-2" in out_m
        for out in (out_1, out_2):
            assert "> hello from moderator" in out
            assert "-> Error receiving message: session closed" in out
        assert "> hi from client-2" in out_1 and "> hi from client-1" in out_2
        if HAVE_XXHASH:
            assert ("Creating new group session (moderator)... "
                    f"{v06.split_id(mod)}") in out_m
            assert f"Welcome to the group {v06.split_id(chat)}!" in out_1

    await run_programs(body)


async def test_seed_point_to_point_v0_7(node: Node) -> None:
    alice, bob = f"agntcy/ns/{unique('alice')}", f"agntcy/ns/{unique('bob')}"

    async def body(tg: TaskGroup) -> None:
        b = await start(tg, "point_to_point_v0_7.py", *program_args(node, bob))
        await b.wait_for("Waiting for session...")
        a = await start(tg, "point_to_point_v0_7.py", *program_args(
            node, alice, "--remote", bob, "--enable-mls"))
        out_a = await a.finish()
        out_b = await b.finish()
        assert "\nhello\n" in out_a and "reply from " in out_a and f"{bob}/" in out_a
        assert "received: hello" in out_b
        assert "session ended: session closed" in out_b

    await run_programs(body)


async def test_seed_group_v0_7(node: Node) -> None:
    c1, c2, mod = (f"agntcy/ns/{unique(n)}" for n in ("c1", "c2", "moderator"))

    async def body(tg: TaskGroup) -> None:
        p1 = await start(tg, "group_v0_7.py", *program_args(node, c1))
        p2 = await start(tg, "group_v0_7.py", *program_args(node, c2))
        for p in (p1, p2):
            await p.wait_for("Waiting for session...")
        m = await start(tg, "group_v0_7.py", *program_args(
            node, mod, "--remote", f"agntcy/ns/{unique('chat')}", "--invites", c1,
            "--invites", c2, "--remove", c2, "--enable-mls"))
        out_m = await m.finish()
        out_1, out_2 = await p1.finish(), await p2.finish()
        assert out_m.count("to the group") == 2
        assert f"channel received: hello from {c1}" in out_m
        assert f"channel received: hello from {c2}" in out_m
        assert "removed" in out_m and "group closed" in out_m
        for out in (out_1, out_2):
            assert "(Group)" in out and "channel received: hello\n" in out
        assert "session ended: session closed (removed)" in out_2
        assert "session ended: session closed" in out_1

    await run_programs(body)
