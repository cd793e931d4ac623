"""JWT identities: JwtProvider, JwtVerifier, StaticJwtProvider, trust bundles, node hello."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from node_lite import (
    AuthenticationError,
    ConfigError,
    Identity,
    JwtProvider,
    JwtVerifier,
    Name,
    NodeCore,
    StaticJwtProvider,
    TokenProvider,
    TokenVerifier,
    instance_id_for,
    jwks_from_public_keys,
    load_trust_bundle,
)
from node_lite._jwt import TRUST_DOMAIN_MEMBER
from node_lite.wire import Error, Hello, HelloAck, encode_frame
from tests.node_lite.test_core import FakeSink, decode_all

NOW = 1_700_000_000.0
SUB = "spiffe://example.org/agent/alice"
HS_SECRET = "a-jwt-hmac-secret-that-is-at-least-32-bytes-long"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# -- keys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    # RSA generation is the slow part: once per module.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_jwk(key: PrivateKey, kid: str | None = None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    assert "d" in jwk
    return {**jwk, "kid": kid} if kid else dict(jwk)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS from parts, signed by nobody."""
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()),
                     b64url(signature)))


def valid_claims(**extra: Any) -> dict[str, Any]:
    return {"sub": SUB, "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 600, **extra}


def reason(verifier: JwtVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token, now=now)
    return info.value.reason


# -- round trips ------------------------------------------------------------------------

ROUND_TRIPS = [("EdDSA", "ed_key"), ("ES256", "ec_key"), ("RS256", "rsa_key")]


@pytest.mark.parametrize(("algorithm", "key_name"), ROUND_TRIPS)
@pytest.mark.parametrize("form", ["jwk", "pem"])
def test_round_trip(algorithm: str, key_name: str, form: str,
                    request: pytest.FixtureRequest) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    if form == "jwk":
        provider = JwtProvider(private_jwk(key, kid="k1"), algorithm=algorithm, subject=SUB,
                               claims={"name": "org/ns/app/7"})
        verifier = JwtVerifier(keys=jwks_from_public_keys(key, key_ids=["k1"]))
    else:
        provider = JwtProvider(private_pem(key), algorithm=algorithm, subject=SUB,
                               claims={"name": "org/ns/app/7"})
        verifier = JwtVerifier(keys=public_pem(key))
    assert isinstance(provider, TokenProvider)
    assert isinstance(verifier, TokenVerifier)
    assert provider.subject == SUB
    token = provider.get_token(now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    identity = verifier.verify(token, now=NOW + 10)
    assert identity == Identity(subject=SUB, issued_at=NOW, expires_at=NOW + 3600,
                                claims=claims_of(token), token=token)
    assert identity.claims["name"] == "org/ns/app/7"


def test_provider_sets_registered_claims_and_kid(ec_key: ec.EllipticCurvePrivateKey) -> None:
    provider = JwtProvider(private_pem(ec_key), algorithm="ES256", subject=SUB,
                           issuer="https://issuer.example", audience=["slim", "other"],
                           duration=60, key_id="key-2024")
    first, second = provider.get_token(now=NOW + 0.7), provider.get_token(now=NOW)
    claims = claims_of(first)
    assert claims["sub"] == SUB
    assert claims["iss"] == "https://issuer.example"
    assert claims["aud"] == ["slim", "other"]
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (NOW, NOW, NOW + 60)
    assert claims["jti"] != claims_of(second)["jti"]
    assert jwt.get_unverified_header(first)["kid"] == "key-2024"
    verifier = JwtVerifier(keys=jwks_from_public_keys(ec_key, key_ids=["key-2024"]),
                           issuer="https://issuer.example", audience="slim")
    assert verifier.verify(first, now=NOW).subject == SUB


def test_provider_takes_the_kid_of_its_jwk(ed_key: ed25519.Ed25519PrivateKey) -> None:
    provider = JwtProvider(private_jwk(ed_key, kid="from-jwk"), algorithm="EdDSA", subject=SUB)
    assert jwt.get_unverified_header(provider.get_token(now=NOW))["kid"] == "from-jwk"


def test_hs256_round_trip_with_an_oct_jwk() -> None:
    provider = JwtProvider(HS_SECRET, algorithm="HS256", subject=SUB)
    oct_jwk = {"kty": "oct", "k": b64url(HS_SECRET.encode())}
    verifier = JwtVerifier(keys=[oct_jwk])
    assert verifier.verify(provider.get_token(now=NOW), now=NOW).subject == SUB
    assert verifier.algorithms == {"HS256", "HS384"}  # 49 bytes: too short for HS512
    other = JwtProvider(HS_SECRET + "x", algorithm="HS256", subject=SUB)
    assert reason(verifier, other.get_token(now=NOW)) == "bad_signature"


# -- claims -----------------------------------------------------------------------------


def test_audience_is_checked(ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key), audience=["slim", "slim-2"])
    pem = private_pem(ed_key)

    def token(audience: str | list[str] | None) -> str:
        return JwtProvider(pem, algorithm="EdDSA", subject=SUB,
                           audience=audience).get_token(now=NOW)

    assert verifier.verify(token(["other", "slim-2"]), now=NOW).subject == SUB
    assert reason(verifier, token("other")) == "audience"
    assert reason(verifier, token(None)) == "audience"
    # Without a configured audience, any aud is accepted (as the shared-secret verifier).
    assert JwtVerifier(keys=public_pem(ed_key)).verify(token("other"), now=NOW).subject == SUB


def test_issuer_is_checked(ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key), issuer="https://good")
    pem = private_pem(ed_key)
    good = JwtProvider(pem, algorithm="EdDSA", subject=SUB, issuer="https://good")
    bad = JwtProvider(pem, algorithm="EdDSA", subject=SUB, issuer="https://evil")
    none = JwtProvider(pem, algorithm="EdDSA", subject=SUB)
    assert verifier.verify(good.get_token(now=NOW), now=NOW).subject == SUB
    assert reason(verifier, bad.get_token(now=NOW)) == "issuer"
    assert reason(verifier, none.get_token(now=NOW)) == "issuer"


def test_expired_and_not_yet_valid_tokens(ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key), leeway=5)
    token = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB,
                        duration=100).get_token(now=NOW)
    assert verifier.verify(token, now=NOW + 104).subject == SUB  # within the leeway
    assert reason(verifier, token, now=NOW + 105) == "token_time"
    assert reason(verifier, token, now=NOW + 10_000) == "token_time"
    assert verifier.verify(token, now=NOW - 5).subject == SUB  # issuer's clock a bit ahead
    assert reason(verifier, token, now=NOW - 6) == "token_time"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_future_nbf_or_iat_is_refused(claim: str, ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    claims = valid_claims(**{claim: int(NOW) + 60})
    token = jwt.encode(claims, ed_key, algorithm="EdDSA")
    assert reason(verifier, token) == "token_time"
    assert verifier.verify(token, now=NOW + 60).subject == SUB


@pytest.mark.parametrize(("claims", "expected"), [
    ({"iat": int(NOW), "exp": int(NOW) + 60}, "malformed"),  # no sub
    ({"sub": SUB, "exp": int(NOW) + 60}, "malformed"),  # no iat
    ({"sub": SUB, "iat": int(NOW)}, "malformed"),  # no exp
    ({"sub": "", "iat": int(NOW), "exp": int(NOW) + 60}, "malformed"),
    ({"sub": 42, "iat": int(NOW), "exp": int(NOW) + 60}, "malformed"),
    ({"sub": SUB, "iat": int(NOW), "exp": "tomorrow"}, "malformed"),
    ({"sub": SUB, "iat": int(NOW), "exp": True}, "malformed"),
    ({"sub": SUB, "iat": int(NOW), "exp": 10**400}, "malformed"),
])
def test_missing_or_bad_claims_are_malformed(claims: dict[str, Any], expected: str,
                                             ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    assert reason(verifier, jwt.encode(claims, ed_key, algorithm="EdDSA")) == expected


def test_require_is_configurable_but_sub_is_always_required(
        ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key), require=())
    identity = verifier.verify(jwt.encode({"sub": SUB}, ed_key, algorithm="EdDSA"), now=NOW)
    assert (identity.issued_at, identity.expires_at) == (0.0, float("inf"))
    assert reason(verifier, jwt.encode({"iat": 1}, ed_key, algorithm="EdDSA")) == "malformed"


# -- signatures and keys ----------------------------------------------------------------


def test_tampered_tokens_are_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    token = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB).get_token(now=NOW)
    header, payload, signature = token.split(".")
    evil = b64url(json.dumps({**claims_of(token), "sub": "spiffe://example.org/admin"}).encode())
    assert reason(verifier, f"{header}.{evil}.{signature}") == "bad_signature"
    flipped = b64url(bytes([base64.urlsafe_b64decode(signature + "==")[0] ^ 1])
                     + base64.urlsafe_b64decode(signature + "==")[1:])
    assert reason(verifier, f"{header}.{payload}.{flipped}") == "bad_signature"
    assert reason(verifier, f"{header}.{payload}.") == "bad_signature"


def test_a_token_signed_by_another_key_is_refused(
        ed_key: ed25519.Ed25519PrivateKey, other_ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    token = JwtProvider(private_pem(other_ed_key), algorithm="EdDSA",
                        subject=SUB).get_token(now=NOW)
    assert reason(verifier, token) == "bad_signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(alg: str, ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    assert reason(verifier, forge({"alg": alg, "typ": "JWT"}, valid_claims())) == "algorithm"
    # Even when the caller lists it.
    with pytest.raises(ConfigError, match="unsupported JWT algorithm"):
        JwtVerifier(keys=public_pem(ed_key), algorithms=["EdDSA", "none"])


def test_algorithm_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(rsa_key)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa"}).encode())
    payload = b64url(json.dumps(valid_claims()).encode())
    mac = hmac.new(pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(mac)}"
    # The public key as PEM, as a JWKS entry, and with HS256 explicitly "allowed".
    for verifier in (JwtVerifier(keys=pem),
                     JwtVerifier(keys=jwks_from_public_keys(rsa_key, key_ids=["rsa"])),
                     JwtVerifier(keys=pem, algorithms=["HS256", "RS256"])):
        assert "HS256" not in verifier.algorithms
        assert reason(verifier, token) == "algorithm"
    with pytest.raises(ConfigError, match="no usable verification key"):
        JwtVerifier(keys=pem, algorithms=["HS256"])


def test_unknown_kid_is_refused(ed_key: ed25519.Ed25519PrivateKey,
                                ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = JwtVerifier(keys=jwks_from_public_keys(ed_key, ec_key, key_ids=["ed", "ec"]))
    token = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB,
                        key_id="rotated-away").get_token(now=NOW)
    assert reason(verifier, token) == "unknown_key"
    # Without a kid the keys of the header's algorithm are tried.
    plain = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB).get_token(now=NOW)
    assert verifier.verify(plain, now=NOW).subject == SUB


def test_kidless_keys_match_any_kid(ed_key: ed25519.Ed25519PrivateKey) -> None:
    token = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB,
                        key_id="whatever").get_token(now=NOW)
    assert JwtVerifier(keys=public_pem(ed_key)).verify(token, now=NOW).subject == SUB


def test_a_key_is_only_used_with_its_own_algorithms(
        ed_key: ed25519.Ed25519PrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    both = JwtVerifier(keys=jwks_from_public_keys(ed_key, ec_key, key_ids=["ed", "ec"]))
    # Signed by the EC key, but naming the Ed25519 key.
    token = jwt.encode(valid_claims(), ec_key, algorithm="ES256", headers={"kid": "ed"})
    assert reason(both, token) == "algorithm"
    # An ES256 token for a verifier that only has an Ed25519 key.
    only_ed = JwtVerifier(keys=public_pem(ed_key))
    assert reason(only_ed, jwt.encode(valid_claims(), ec_key, algorithm="ES256")) == "algorithm"
    # A JWK's "alg" restricts the key further.
    rs_only = jwks_from_public_keys(ed_key, algorithms=["EdDSA"])
    assert JwtVerifier(keys=rs_only).algorithms == {"EdDSA"}


def test_rsa_keys_verify_rs_and_ps(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(rsa_key))
    for algorithm in ("RS256", "RS384", "RS512", "PS256"):
        token = JwtProvider(private_jwk(rsa_key), algorithm=algorithm,
                            subject=SUB).get_token(now=NOW)
        assert verifier.verify(token, now=NOW).subject == SUB
    limited = JwtVerifier(keys=public_pem(rsa_key), algorithms=["RS256"])
    ps = JwtProvider(private_pem(rsa_key), algorithm="PS256", subject=SUB).get_token(now=NOW)
    assert reason(limited, ps) == "algorithm"


def test_oversized_and_non_ascii_tokens_are_malformed(
        ed_key: ed25519.Ed25519PrivateKey) -> None:
    verifier = JwtVerifier(keys=public_pem(ed_key))
    big = jwt.encode(valid_claims(pad="x" * 9000), ed_key, algorithm="EdDSA")
    assert reason(verifier, big) == "malformed"
    assert reason(verifier, "é.é.é") == "malformed"
    assert reason(verifier, 42) == "malformed"  # type: ignore[arg-type]


# -- replay cache -----------------------------------------------------------------------


def test_jti_replay_is_refused_when_the_cache_is_on(ed_key: ed25519.Ed25519PrivateKey) -> None:
    provider = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB, duration=60)
    token = provider.get_token(now=NOW)
    cached = JwtVerifier(keys=public_pem(ed_key), replay_cache=16)
    assert cached.verify(token, now=NOW).subject == SUB
    assert reason(cached, token, now=NOW + 1) == "replayed"
    assert cached.verify(provider.get_token(now=NOW), now=NOW + 1).subject == SUB
    uncached = JwtVerifier(keys=public_pem(ed_key))
    assert uncached.verify(token, now=NOW) == uncached.verify(token, now=NOW)
    # The cache needs a jti.
    no_jti = jwt.encode(valid_claims(), ed_key, algorithm="EdDSA")
    assert reason(cached, no_jti) == "malformed"


def test_a_full_replay_cache_refuses_until_entries_expire(
        ed_key: ed25519.Ed25519PrivateKey) -> None:
    provider = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB, duration=60)
    verifier = JwtVerifier(keys=public_pem(ed_key), replay_cache=2, leeway=0)
    for _ in range(2):
        verifier.verify(provider.get_token(now=NOW), now=NOW)
    assert reason(verifier, provider.get_token(now=NOW)) == "replay_cache_full"
    later = NOW + 60
    assert verifier.verify(provider.get_token(now=later), now=later).subject == SUB


# -- trust bundles ----------------------------------------------------------------------


def encoded_jwks(*keys: PrivateKey, kids: list[str]) -> str:
    jwks = jwks_from_public_keys(*keys, key_ids=kids)
    return base64.b64encode(json.dumps(jwks).encode()).decode()


def test_trust_bundle_with_two_domains(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey,
                                       ec_key: ec.EllipticCurvePrivateKey,
                                       rsa_key: rsa.RSAPrivateKey) -> None:
    x509_svid_key = {**jwks_from_public_keys(rsa_key)["keys"][0], "use": "x509-svid"}
    domain_b = {"keys": [*jwks_from_public_keys(ec_key, key_ids=["b1"])["keys"], x509_svid_key]}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({
        "domain-a.org": encoded_jwks(ed_key, kids=["a1"]),
        "domain-b.org": base64.b64encode(json.dumps(domain_b).encode()).decode(),
    }))
    jwks = load_trust_bundle(path)
    assert [k.get("kid") for k in jwks["keys"]] == ["a1", "b1", None]
    assert [k[TRUST_DOMAIN_MEMBER] for k in jwks["keys"]] == ["domain-a.org", "domain-b.org",
                                                              "domain-b.org"]
    verifier = JwtVerifier(keys=jwks, audience="slim")
    for key, alg, kid, sub in ((ed_key, "EdDSA", "a1", "spiffe://domain-a.org/app"),
                               (ec_key, "ES256", "b1", "spiffe://domain-b.org/app")):
        token = JwtProvider(private_pem(key), algorithm=alg, subject=sub, key_id=kid,
                            audience="slim").get_token(now=NOW)
        assert verifier.verify(token, now=NOW).subject == sub
    # The X.509 CA key of a domain does not validate JWTs.
    ca_signed = JwtProvider(private_pem(rsa_key), algorithm="RS256", audience="slim",
                            subject="spiffe://domain-b.org/app").get_token(now=NOW)
    assert reason(verifier, ca_signed) == "algorithm"
    # A domain's key does not speak for another domain's identities...
    cross = JwtProvider(private_pem(ed_key), algorithm="EdDSA", key_id="a1", audience="slim",
                        subject="spiffe://domain-b.org/app").get_token(now=NOW)
    assert reason(verifier, cross) == "trust_domain"
    # ...unless the domains are merged on purpose.
    unbound = JwtVerifier(keys=load_trust_bundle(path, bind_domains=False))
    assert unbound.verify(cross, now=NOW).subject == "spiffe://domain-b.org/app"


def test_trust_bundle_accepts_wrapped_and_urlsafe_base64(
        ed_key: ed25519.Ed25519PrivateKey) -> None:
    text = encoded_jwks(ed_key, kids=["a1"])
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    urlsafe = base64.urlsafe_b64encode(base64.b64decode(text)).decode().rstrip("=")
    for value in (wrapped, urlsafe):
        assert load_trust_bundle({"d.org": value})["keys"][0]["kid"] == "a1"


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read trust bundle"),
    ("[]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"bad.org": "%%%not-base64"}', "'bad.org': the value is not base64"),
    ('{"bad.org": "' + base64.b64encode(b"no json").decode() + '"}', "'bad.org'"),
    ('{"bad.org": "' + base64.b64encode(b'{"nokeys": 1}').decode() + '"}',
     "'bad.org': expected a JWKS"),
    ('{"bad.org": 12}', "'bad.org': expected a JWKS"),
    ('{"bad.org": {"keys": [{"kty": "RSA", "n": "AA", "e": "AQAB"}]}}',
     "'bad.org': key #0"),
    ('{"bad.org": {"keys": [{"kty": "XYZ"}]}}', "'bad.org': key #0: unsupported key type"),
    ('{"bad.org": {"keys": ["a string"]}}', "'bad.org': key #0"),
    ('{"empty.org": {"keys": []}}', "no keys"),
])
def test_malformed_trust_bundle(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_trust_bundle(path)


def test_missing_trust_bundle_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trust bundle"):
        load_trust_bundle(tmp_path / "absent.json")


# -- static tokens ----------------------------------------------------------------------


def test_static_provider_rereads_a_changed_file(tmp_path: Path,
                                                ed_key: ed25519.Ed25519PrivateKey) -> None:
    path = tmp_path / "svid.jwt"
    first = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB).get_token(now=NOW)
    path.write_text(first + "\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    provider = StaticJwtProvider(path)
    assert isinstance(provider, TokenProvider)
    assert (provider.subject, provider.get_token()) == (SUB, first)
    other = "spiffe://example.org/agent/bob"
    second = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=other,
                         duration=7200).get_token(now=NOW)
    path.write_text(second)
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert provider.get_token(now=NOW) == second
    assert provider.subject == other
    # A file being rotated (gone or half-written) keeps the last good token.
    path.unlink()
    assert provider.get_token() == second
    path.write_text("half-writ")
    assert provider.get_token() == second
    assert provider.subject == other


@pytest.mark.parametrize("content", ["", "not a jwt", "a.b.c", forge({"alg": "EdDSA"}, {})])
def test_static_provider_refuses_a_bad_file(content: str, tmp_path: Path) -> None:
    path = tmp_path / "svid.jwt"
    path.write_text(content)
    with pytest.raises(ConfigError, match="cannot load a JWT"):
        StaticJwtProvider(path)
    with pytest.raises(ConfigError, match="cannot load a JWT"):
        StaticJwtProvider(tmp_path / "absent.jwt")


# -- configuration errors ---------------------------------------------------------------


def test_verifier_configuration_errors(ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ConfigError, match="not a private key"):
        JwtVerifier(keys=private_pem(ed_key))
    with pytest.raises(ConfigError, match="expected a PEM public key"):
        JwtVerifier(keys=HS_SECRET)
    with pytest.raises(ConfigError, match="HMAC key of 5 bytes"):
        JwtVerifier(keys={"kty": "oct", "k": b64url(b"short")})
    with pytest.raises(ConfigError, match="does not fit"):
        JwtVerifier(keys=[{**jwks_from_public_keys(ed_key)["keys"][0], "alg": "ES256"}])
    with pytest.raises(ConfigError, match="no usable verification key"):
        JwtVerifier(keys={"keys": []})
    with pytest.raises(ConfigError, match="leeway"):
        JwtVerifier(keys=public_pem(ed_key), leeway=-1)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024 bits"):
        JwtVerifier(keys=public_pem(weak))


def test_provider_configuration_errors(ed_key: ed25519.Ed25519PrivateKey,
                                       ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ConfigError, match="cannot sign RS256"):
        JwtProvider(private_pem(ec_key), algorithm="RS256", subject=SUB)
    with pytest.raises(ConfigError, match="cannot sign ES384"):
        JwtProvider(private_pem(ec_key), algorithm="ES384", subject=SUB)
    with pytest.raises(ConfigError, match="kty 'OKP'"):
        JwtProvider(private_jwk(ec_key), algorithm="EdDSA", subject=SUB)
    with pytest.raises(ConfigError, match="needs a private key"):
        JwtProvider(jwks_from_public_keys(ed_key)["keys"][0], algorithm="EdDSA", subject=SUB)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        JwtProvider("secret", algorithm="HS256", subject=SUB)
    with pytest.raises(ConfigError, match="not a PEM key"):
        JwtProvider(public_pem(ed_key), algorithm="HS256", subject=SUB)
    with pytest.raises(ConfigError, match="cannot load"):
        JwtProvider("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
                    algorithm="EdDSA", subject=SUB)
    with pytest.raises(ConfigError, match="unsupported JWT algorithm"):
        JwtProvider(HS_SECRET, algorithm="none", subject=SUB)
    with pytest.raises(ConfigError, match="set by the provider"):
        JwtProvider(ed_key, algorithm="EdDSA", subject=SUB, claims={"exp": 1})
    with pytest.raises(ConfigError, match="subject"):
        JwtProvider(ed_key, algorithm="EdDSA", subject="")
    with pytest.raises(ConfigError, match="duration"):
        JwtProvider(ed_key, algorithm="EdDSA", subject=SUB, duration=0)


def test_module_imports_and_fails_cleanly_without_pyjwt() -> None:
    code = (
        "import sys\n"
        "sys.modules['jwt'] = None\n"
        "import node_lite\n"
        "try:\n"
        "    node_lite.JwtVerifier(keys={'keys': []})\n"
        "except node_lite.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2], timeout=60)
    assert "pip install 'slim-agents[jwt]'" in out.stdout


# -- robustness -------------------------------------------------------------------------

segment = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=",
            max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(["alg", "kid", "sub", "exp", "crit", "b64",
                                                    "iat", "nbf", "aud", "x"]), inner,
                                   max_size=4),
                 max_leaves=8).map(lambda v: b64url(json.dumps(v).encode())),
)


@given(text=st.text(max_size=300))
def test_arbitrary_text_only_raises_authentication_error(
        text: str, shared_verifier: JwtVerifier) -> None:
    try:
        shared_verifier.verify(text, now=NOW)
    except AuthenticationError:
        pass


@given(parts=st.lists(segment, min_size=1, max_size=4),
       alg=st.sampled_from([None, "EdDSA", "HS256", "none", "RS256"]))
def test_arbitrary_jws_parts_only_raise_authentication_error(
        parts: list[str], alg: str | None, shared_verifier: JwtVerifier) -> None:
    if alg is not None:
        parts[0] = b64url(json.dumps({"alg": alg, "kid": "ed"}).encode())
    with pytest.raises(AuthenticationError):
        shared_verifier.verify(".".join(parts), now=NOW)


@pytest.fixture(scope="module")
def shared_verifier(ed_key: ed25519.Ed25519PrivateKey) -> JwtVerifier:
    return JwtVerifier(keys=jwks_from_public_keys(ed_key, key_ids=["ed"]), replay_cache=4)


# -- node core --------------------------------------------------------------------------


def hello(core: NodeCore, conn_id: int, token: str, name: Name) -> FakeSink:
    sink = FakeSink()
    core.connection_made(conn_id, sink, NOW)
    core.data_received(conn_id, encode_frame(Hello(token=token, name=name)), NOW)
    return sink


def test_node_core_accepts_jwt_hellos_and_refuses_unknown_keys(
        ed_key: ed25519.Ed25519PrivateKey, other_ed_key: ed25519.Ed25519PrivateKey) -> None:
    core = NodeCore("n1", verifier=JwtVerifier(keys=jwks_from_public_keys(ed_key),
                                               audience="slim"))
    provider = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject=SUB,
                           audience="slim")
    name = Name("org", "ns", "alice", instance_id_for(provider.subject))
    sink = hello(core, 1, provider.get_token(now=NOW), name)
    [ack] = decode_all(sink)
    assert isinstance(ack, HelloAck)
    assert sink.closed is None
    assert core.connection_statistics(1).subject == SUB
    assert core.table.match_one(name) == 1

    # A token bound to a full name by its "name" claim.
    bound_name = Name("org", "ns", "bob", 5)
    bound = JwtProvider(private_pem(ed_key), algorithm="EdDSA", subject="bob",
                        audience="slim", claims={"name": str(bound_name)})
    [ack] = decode_all(hello(core, 2, bound.get_token(now=NOW), bound_name))
    assert isinstance(ack, HelloAck)

    # The right name, but signed by a key the node does not trust.
    intruder = JwtProvider(private_pem(other_ed_key), algorithm="EdDSA", subject=SUB,
                           audience="slim")
    sink = hello(core, 3, intruder.get_token(now=NOW), name)
    [error] = decode_all(sink)
    assert isinstance(error, Error)
    assert (error.code, error.message) == ("unauthenticated", "bad_signature")
    assert sink.closed == ("unauthenticated", "bad_signature")

    # A valid token for another instance id.
    assert name.id is not None
    sink = hello(core, 4, provider.get_token(now=NOW), name.with_id(name.id ^ 1))
    [error] = decode_all(sink)
    assert isinstance(error, Error)
    assert error.code == "forbidden_source"
    assert (core.accepted, core.refused) == (2, 2)
