"""JWT identities on sessions: each side signs with its own key and checks the other's."""

from __future__ import annotations

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from node_lite import NodeConfig, instance_id_for, open_node
from slim_agents import (
    JwtProvider,
    JwtVerifier,
    Name,
    SessionConfig,
    SessionRejectedError,
    jwks_from_public_keys,
    open_app,
)
from tests.helpers import unique

pytestmark = pytest.mark.anyio
RELIABLE = SessionConfig(timeout=0.5, max_retries=3)


def identity(app: str, key: object, algorithm: str, audience: str):  # type: ignore[no-untyped-def]
    subject = f"spiffe://example.org/{app}"
    return JwtProvider(key, algorithm=algorithm, subject=subject, issuer="https://issuer",
                       audience=audience)


@pytest.mark.parametrize(("make_key", "alg"), [
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
])
async def test_jwt_identities_talk_and_a_wrong_audience_is_refused(make_key, alg) -> None:  # type: ignore[no-untyped-def]
    alice_key, bob_key = make_key(), make_key()
    keys = jwks_from_public_keys(alice_key, bob_key)
    bob_app = unique("bob")
    async with open_node(NodeConfig()) as node:  # the node checks nothing: apps do
        verifier = JwtVerifier(keys=keys, issuer="https://issuer", audience="slim")
        alice_p = identity("alice", alice_key, alg, "slim")
        bob_p = identity(bob_app, bob_key, alg, "slim")
        async with open_app("org/ns/alice", node=node, provider=alice_p, verifier=verifier) as a, \
                open_app(f"org/ns/{bob_app}", node=node, provider=bob_p, verifier=verifier) as b:
            assert a.name.id == instance_id_for(alice_p.subject)
            s = await a.create_session(f"org/ns/{bob_app}", RELIABLE)
            r = await b.listen_for_session()
            await s.publish(b"signed")
            msg = await r.get_message()
            assert msg.payload == b"signed" and msg.context.identity == alice_p.subject
            await r.publish_to(msg.context, b"back")
            assert (await s.get_message()).payload == b"back"
        # bob only accepts tokens for audience "bob-only": alice is refused and told
        strict = JwtVerifier(keys=keys, issuer="https://issuer", audience="bob-only")
        async with open_app("org/ns/alice", node=node, provider=alice_p, verifier=verifier) as a, \
                open_app(f"org/ns/{bob_app}", node=node, provider=bob_p, verifier=strict):
            with pytest.raises(SessionRejectedError) as info, anyio.fail_after(10):
                await a.create_session(Name("org", "ns", bob_app), RELIABLE)
            assert info.value.code == "unauthenticated"
            assert "audience" in str(info.value)
