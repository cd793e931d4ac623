"""End-to-end encrypted sessions through a real node on loopback TCP, on asyncio and trio,
with a wiretap on everything the node reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from node_lite import Node, NodeConfig, open_node
from slim_agents import (
    JwtProvider,
    JwtVerifier,
    SessionConfig,
    SigningIdentity,
    jwks_from_public_keys,
    open_app,
)
from tests.helpers import SECRET, open_group, unique

pytestmark = pytest.mark.anyio
GROUP = SessionConfig.group(mls_enabled=True, timeout=0.5, max_retries=10)


def tap(node: Node) -> list[bytes]:
    """Every chunk the node reads, as a wiretap on the node would see it."""
    seen: list[bytes] = []
    core = node.core
    original: Callable[..., Any] = core.data_received

    def data_received(conn_id: int, data: bytes, now: float) -> Any:
        seen.append(bytes(data))
        return original(conn_id, data, now)

    core.data_received = data_received  # type: ignore[method-assign]
    return seen


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


async def test_group_of_ten_over_tcp_reads_each_other_and_the_tap_sees_no_body(
        node: Node) -> None:
    wire = tap(node)
    async with AsyncExitStack() as stack:
        everyone = await open_group(stack, node.url, GROUP, 9)
        g, sessions = everyone[0], everyone[1:]
        assert len({s.encryption.authenticator for s in everyone  # type: ignore[union-attr]
                    }) == 1
        texts = [f"confidential {i}: the eagle lands at {i}".encode() for i in range(10)]
        for s, text in zip(everyone, texts, strict=True):
            await (await s.publish(text))
        with anyio.fail_after(10):
            for j, s in enumerate(everyone):
                got = {(await s.get_message()).payload for _ in range(9)}
                assert got == {t for i, t in enumerate(texts) if i != j}
        assert not [t for t in texts if any(t in chunk for chunk in wire)]
        # a member removed stops reading; the others move to a new epoch together
        await g.remove(sessions[4].src)
        with anyio.fail_after(10):
            assert await sessions[4].wait_closed() == "removed"
        rest = [g, *sessions[:4], *sessions[5:]]
        assert len({s.encryption.authenticator for s in rest}) == 1  # type: ignore[union-attr]
        await (await g.publish(b"after the removal"))
        with anyio.fail_after(10):
            for s in rest[1:]:
                assert (await s.get_message()).payload == b"after the removal"


async def test_jwt_identities_bind_their_signing_keys_by_claim_or_fall_back_to_tofu() -> None:
    alice_key, bob_key = ed25519.Ed25519PrivateKey.generate(), \
        ed25519.Ed25519PrivateKey.generate()
    keys = jwks_from_public_keys(alice_key, bob_key)
    alice_signing = SigningIdentity.generate()
    bob_app = unique("bob")
    alice = JwtProvider(alice_key, algorithm="EdDSA", subject="spiffe://example.org/alice",
                        issuer="https://issuer", audience="slim",
                        claims=alice_signing.pubkey_claim())
    bob = JwtProvider(bob_key, algorithm="EdDSA", subject=f"spiffe://example.org/{bob_app}",
                      issuer="https://issuer", audience="slim")  # no key claim
    verifier = JwtVerifier(keys=keys, issuer="https://issuer", audience="slim")
    async with open_node(NodeConfig()) as node:
        async with open_app("org/ns/alice", node=node, provider=alice, verifier=verifier,
                            signing_identity=alice_signing) as a, \
                open_app(f"org/ns/{bob_app}", node=node, provider=bob, verifier=verifier) as b:
            s = await a.create_session(f"org/ns/{bob_app}",
                                       SessionConfig(mls_enabled=True, timeout=0.5,
                                                     max_retries=5))
            with anyio.fail_after(10):
                r = await b.listen_for_session()
            await (await s.publish(b"signed and sealed"))
            with anyio.fail_after(10):
                assert (await r.get_message()).payload == b"signed and sealed"
            assert r.encryption is not None and s.encryption is not None
            assert r.encryption.bindings == {alice.subject: "claim"}
            assert s.encryption.bindings[bob.subject] == "tofu"


async def test_members_sharing_a_process_check_each_group_message_signature_once(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from slim_agents import _e2e_base as base

    checked: list[bytes] = []
    real = base._sign_open

    def counting(signed: bytes, spk: bytes) -> bytes:  # the real check, counted
        if signed[64:].startswith(base.LABEL_APP_SIG.encode()):
            checked.append(signed)
        return real(signed, spk)

    monkeypatch.setattr(base, "_sign_open", counting)
    async with AsyncExitStack() as stack:
        everyone = await open_group(stack, node.url, GROUP, 3)
        assert all(s.encryption.sender_auth == "signature"  # type: ignore[union-attr]
                   for s in everyone)
        for i, s in enumerate(everyone):
            await (await s.publish(f"signed {i}".encode()))
        with anyio.fail_after(10):
            for j, s in enumerate(everyone):
                got = {(await s.get_message()).payload for _ in range(3)}
                assert got == {f"signed {i}".encode() for i in range(4) if i != j}
    # Four messages, each read by three members of this process: four checks, not twelve.
    assert len(checked) == 4 and len(set(checked)) == 4
