"""A real node on loopback (and in-memory): routing, handshake and errors."""

from __future__ import annotations

import random

import anyio
import pytest
import trustme

from node_lite import (
    AuthenticationError,
    ConnectError,
    Name,
    NodeConfig,
    ServerConfig,
    TlsConfig,
    open_connection,
    open_node,
)
from node_lite.wire import (
    Error,
    FrameDecoder,
    Hello,
    Publish,
    Subscribe,
    SubscribeAck,
    decode_frame,
    decode_message,
    encode_frame,
)
from tests.helpers import SECRET, app_connection, identity, unique, wait_until

pytestmark = pytest.mark.anyio


def secured(**kwargs: object) -> NodeConfig:
    return NodeConfig(shared_secret=SECRET, **kwargs)  # type: ignore[arg-type]


async def receive_publish(conn: object, timeout: float = 5.0) -> Publish:
    with anyio.fail_after(timeout):
        while True:
            msg = await conn.receive()  # type: ignore[attr-defined]
            if isinstance(msg, Publish):
                return msg


@pytest.mark.parametrize("transport", ["tcp", "memory"])
async def test_unicast_anycast_and_channel(transport: str) -> None:
    async with open_node(secured()) as node:
        target = node.url if transport == "tcp" else node
        svc = unique("svc")
        async with app_connection(target, "sender") as (a, a_name), \
                app_connection(target, svc) as (b, b_name):
            # unicast to the full name
            await a.send(Publish(source=a_name, destination=b_name, payload=b"uni"))
            got = await receive_publish(b)
            assert (got.payload, got.source, got.destination) == (b"uni", a_name, b_name)
            # anycast to the service
            await a.send(Publish(source=a_name, destination=b_name.without_id(),
                                 payload=b"any", payload_type="text",
                                 metadata={"k": "v"}, session_id=7, message_id=9))
            got = await receive_publish(b)
            assert got.payload == b"any"
            assert (got.payload_type, got.metadata, got.session_id, got.message_id) == \
                ("text", {"k": "v"}, 7, 9)
            # channel
            chan = Name("org", "ns", unique("chan"))
            await b.send(Subscribe(name=chan, request_id=1))
            assert await b.receive() == SubscribeAck(request_id=1, ok=True)
            await a.send(Publish(source=a_name, destination=chan, fanout=2, payload=b"ch"))
            assert (await receive_publish(b)).payload == b"ch"


async def test_anycast_spreads_and_unicast_sticks() -> None:
    async with open_node(secured(), rng=random.Random(1)) as node:
        svc = unique("svc")
        async with app_connection(node.url, "src") as (src, src_name), \
                app_connection(node.url, svc) as (_r1, n1), \
                app_connection(node.url, svc) as (_r2, n2):
            assert n1 != n2
            assert n1.without_id() == n2.without_id()
            for i in range(40):
                await src.send(Publish(source=src_name, destination=n1.without_id(),
                                       message_id=i, payload=b"x"))
            await src.send(Publish(source=src_name, destination=n1.without_id(),
                                   message_id=999, payload=b"end"))

            def received() -> int:
                return sum(s.frames_out for s in node.statistics(per_connection=True)
                           .per_connection if s.name in (str(n1), str(n2)))

            await wait_until(lambda: received() >= 2 + 41, message="41 deliveries")
            per = {s.name: s.frames_out for s in node.statistics(per_connection=True)
                   .per_connection}
            # hello_ack counts as one frame out per connection
            assert per[str(n1)] > 1 and per[str(n2)] > 1, per
            # unicast to one instance reaches only it
            before = per[str(n2)]
            for i in range(20):
                await src.send(Publish(source=src_name, destination=n1, message_id=i,
                                       payload=b"u"))
            await wait_until(lambda: node.statistics(per_connection=True).per_connection
                             is not None and sum(
                                 s.frames_out for s in node.statistics(per_connection=True)
                                 .per_connection if s.name == str(n1)) >= per[str(n1)] + 20)
            after = {s.name: s.frames_out for s in node.statistics(per_connection=True)
                     .per_connection}
            assert after[str(n2)] == before


async def test_no_echo_on_channel() -> None:
    async with open_node(secured()) as node:
        chan = Name("org", "ns", unique("chan"))
        async with app_connection(node.url, "a") as (a, a_name), \
                app_connection(node.url, "b") as (b, b_name):
            for conn in (a, b):
                await conn.send(Subscribe(name=chan, request_id=1))
                assert isinstance(await conn.receive(), SubscribeAck)
            await a.send(Publish(source=a_name, destination=chan, fanout=2, payload=b"1"))
            assert (await receive_publish(b)).payload == b"1"
            await b.send(Publish(source=b_name, destination=a_name, payload=b"from b"))
            # The first frame a gets is b's: its own channel copy never came back.
            assert (await receive_publish(a)).payload == b"from b"
            # Nor does a frame addressed to its own sender: split horizon.
            await a.send(Publish(source=a_name, destination=a_name, payload=b"self"))
            with anyio.fail_after(5):
                err = await a.receive()
            assert isinstance(err, Error)
            assert err.code == "no_route"


async def test_no_route_error_names_destination() -> None:
    async with open_node(secured()) as node:
        async with app_connection(node.url, "a") as (a, a_name):
            missing = Name("org", "ns", unique("nobody"))
            await a.send(Publish(source=a_name, destination=missing, session_id=5,
                                 message_id=42, payload=b"?"))
            with anyio.fail_after(5):
                err = await a.receive()
            assert isinstance(err, Error)
            assert (err.code, err.name, err.ref, err.session_id) == ("no_route", missing, 42, 5)
            assert str(missing) in err.message
            assert node.statistics().drops == {"no_route": 1}


async def test_forged_source_is_refused_and_not_delivered() -> None:
    async with open_node(secured()) as node:
        async with app_connection(node.url, "a") as (a, _), \
                app_connection(node.url, "b") as (_b, b_name):
            await a.send(Publish(source=b_name, destination=b_name, message_id=3, payload=b"f"))
            with anyio.fail_after(5):
                err = await a.receive()
            assert isinstance(err, Error)
            assert err.code == "forbidden_source"
            assert node.statistics().drops["forbidden_source"] == 1


async def test_wrong_secret_is_refused() -> None:
    async with open_node(secured()) as node:
        provider, name = identity("intruder", secret="another-secret-of-the-right-length-123456")
        with pytest.raises(AuthenticationError) as info:
            async with open_connection(node.url, name=name, token=provider.get_token()):
                pass
        assert info.value.detail == "unauthenticated"
        assert node.statistics().refused == 1


async def test_name_not_owned_by_token_is_refused() -> None:
    async with open_node(secured()) as node:
        provider, _ = identity("a")
        _, other = identity("b")
        with pytest.raises(AuthenticationError) as info:
            async with open_connection(node.url, name=other, token=provider.get_token()):
                pass
        assert info.value.detail == "forbidden_source"


async def test_missing_hello_is_refused() -> None:
    async with open_node(secured()) as node:
        stream = await anyio.connect_tcp("127.0.0.1", node.ports[0])
        async with stream:
            _, name = identity("a")
            await stream.send(encode_frame(Publish(source=name, destination=name)))
            decoder = FrameDecoder()
            frames: list[bytes] = []
            with anyio.fail_after(5):
                while True:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
                    frames += [bytes(f) for f in decoder.feed(data)]
            (err,) = [decode_message(decode_frame(f[4:])) for f in frames]
            assert isinstance(err, Error)
            assert err.code == "unauthenticated"


async def test_silent_connection_is_closed_at_hello_timeout() -> None:
    from node_lite import Limits

    async with open_node(secured(limits=Limits(hello_timeout=0.2))) as node:
        stream = await anyio.connect_tcp("127.0.0.1", node.ports[0])
        async with stream:
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:
                        await stream.receive()
        await wait_until(lambda: node.statistics().refused == 1)


async def test_development_mode_accepts_any_token() -> None:
    async with open_node() as node:
        name = Name("org", "ns", unique("dev"), 12345)
        async with open_connection(node.url, name=name, token="anything") as conn:
            assert conn.hello_ack is not None
            assert conn.hello_ack.node_id == "slim/0"


async def test_unknown_endpoint_is_a_connect_error() -> None:
    async with open_node() as node:
        port = node.ports[0]
    with pytest.raises(ConnectError):
        async with open_connection(f"127.0.0.1:{port}", name=Name("a", "b", "c", 1),
                                   token="t"):
            pass


async def test_tls_listener(tmp_path: object) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    path = anyio.Path(str(tmp_path))
    cert_file, key_file, ca_file = path / "cert.pem", path / "key.pem", path / "ca.pem"
    await cert_file.write_bytes(cert.cert_chain_pems[0].bytes())
    await key_file.write_bytes(cert.private_key_pem.bytes())
    await ca_file.write_bytes(ca.cert_pem.bytes())
    server_tls = TlsConfig(insecure=False, cert_file=str(cert_file), key_file=str(key_file))
    cfg = secured(servers=(ServerConfig(endpoint="127.0.0.1:0", tls=server_tls),))
    async with open_node(cfg) as node:
        url = f"https://127.0.0.1:{node.ports[0]}"
        client_tls = TlsConfig(insecure=False, ca_file=str(ca_file))
        async with app_connection(url, "a", tls=client_tls) as (a, a_name), \
                app_connection(url, "b", tls=client_tls) as (b, b_name):
            await a.send(Publish(source=a_name, destination=b_name, payload=b"over tls"))
            assert (await receive_publish(b)).payload == b"over tls"
        # A plain-TCP client cannot talk to a TLS listener.
        with pytest.raises(ConnectError):
            async with app_connection(f"http://127.0.0.1:{node.ports[0]}", "b",
                                      hello_timeout=2.0):
                pass


async def test_statistics_count_a_scripted_exchange() -> None:
    async with open_node(secured()) as node:
        async with app_connection(node.url, "a") as (a, a_name), \
                app_connection(node.url, "b") as (b, b_name):
            for i in range(10):
                await a.send(Publish(source=a_name, destination=b_name, message_id=i,
                                     payload=b"x" * 10))
            for _ in range(10):
                await receive_publish(b)
            per = {s.name: s for s in node.statistics(per_connection=True).per_connection}
            sa, sb = per[str(a_name)], per[str(b_name)]
            assert (sa.frames_in, sa.frames_out) == (11, 1)  # hello + 10; hello_ack
            assert (sb.frames_in, sb.frames_out) == (1, 11)
            assert sa.subscriptions == sb.subscriptions == 1
            stats = node.statistics()
            assert stats.connections == {"app": 2}
            assert stats.accepted == 2
            assert stats.routes == 2


async def test_hello_must_come_first_over_memory_transport() -> None:
    async with open_node(secured()) as node:
        stream = await node.connect_local()
        provider, name = identity("m")
        await stream.send(encode_frame(Hello(token=provider.get_token(), name=name)))
        decoder = FrameDecoder()
        with anyio.fail_after(5):
            frames = decoder.feed(await stream.receive())
        (ack,) = [decode_message(decode_frame(f[4:])) for f in frames]
        assert ack.TYPE == "hello_ack"
        await stream.aclose()
