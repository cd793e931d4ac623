"""Shared-secret identity tokens: round trips, refusals and robustness (the clock is explicit)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_VALIDITY,
    AuthenticationError,
    ConfigError,
    SharedSecretProvider,
    SharedSecretVerifier,
    SlimError,
    TokenProvider,
    TokenVerifier,
)
from node_lite._auth import Identity, parse_unverified

SECRET = "test-secret-that-is-long-enough-for-hmac-0123456789"
OTHER_SECRET = "another-secret-that-is-long-enough-for-hmac-987654"
NOW = 1_700_000_000.0
IDENTITY = "org/ns/app"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(subject: str, ts: str, nonce: str, claims_text: str, secret: str = SECRET) -> str:
    """A token built by hand, with a valid MAC over arbitrary fields."""
    signed = f"{subject}:{ts}:{nonce}:{claims_text}"
    mac = b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())
    return f"{signed}:{mac}"


def outcome(verifier: SharedSecretVerifier, token: str, *, now: float = NOW) -> Identity | str:
    """The identity, or the reason of the refusal; any other exception propagates."""
    try:
        return verifier.verify(token, now=now)
    except AuthenticationError as exc:
        return exc.reason


def refused(verifier: SharedSecretVerifier, token: Any, *, now: float = NOW) -> str:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token, now=now)
    assert isinstance(info.value, SlimError)
    assert info.value.code == "unauthenticated"
    return info.value.reason


@pytest.fixture
def provider() -> SharedSecretProvider:
    return SharedSecretProvider(IDENTITY, SECRET)


@pytest.fixture
def verifier() -> SharedSecretVerifier:
    return SharedSecretVerifier(SECRET)


# -- round trip -------------------------------------------------------------------------


def test_token_round_trip() -> None:
    provider = SharedSecretProvider(IDENTITY, SECRET, claims={"role": "worker", "n": 3},
                                    audience="node-a")
    verifier = SharedSecretVerifier(SECRET, audience="node-a")
    token = provider.get_token(now=NOW)
    identity = verifier.verify(token, now=NOW)
    assert identity.subject == provider.subject
    assert identity.claims == {"role": "worker", "n": 3, "aud": "node-a"}
    assert identity.issued_at == NOW
    assert identity.expires_at == NOW + DEFAULT_VALIDITY
    assert identity.token == token


def test_token_shape(provider: SharedSecretProvider) -> None:
    token = provider.get_token(now=NOW + 0.9)
    fields = token.split(":")
    assert len(fields) == 5
    subject, ts, nonce, claims, mac = fields
    assert subject == provider.subject
    assert ts == str(int(NOW))
    assert len(base64.urlsafe_b64decode(nonce + "==")) == 12
    assert json.loads(base64.urlsafe_b64decode(claims + "==")) == {}
    assert len(base64.urlsafe_b64decode(mac + "=")) == 32
    allowed = set(string.ascii_letters + string.digits + "-_")
    assert set(nonce + claims + mac) <= allowed


def test_subject_is_identity_plus_random_suffix(provider: SharedSecretProvider) -> None:
    prefix, _, suffix = provider.subject.rpartition("_")
    assert prefix == IDENTITY
    assert len(suffix) == 8
    assert suffix.isalnum()
    assert suffix.isascii()


def test_subjects_are_unique_per_provider() -> None:
    subjects = {SharedSecretProvider(IDENTITY, SECRET).subject for _ in range(50)}
    assert len(subjects) == 50
    a, b = SharedSecretProvider(IDENTITY, SECRET), SharedSecretProvider(IDENTITY, SECRET)
    verifier = SharedSecretVerifier(SECRET)
    assert verifier.verify(a.get_token(now=NOW), now=NOW).subject == a.subject
    assert verifier.verify(b.get_token(now=NOW), now=NOW).subject == b.subject
    assert a.subject != b.subject


def test_explicit_subject() -> None:
    provider = SharedSecretProvider(IDENTITY, SECRET, subject="org/ns/app_fixed")
    assert provider.subject == "org/ns/app_fixed"
    assert SharedSecretVerifier(SECRET).verify(provider.get_token(now=NOW), now=NOW).subject \
        == "org/ns/app_fixed"


def test_each_token_is_new(provider: SharedSecretProvider, verifier: SharedSecretVerifier
                           ) -> None:
    tokens = {provider.get_token(now=NOW) for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert verifier.verify(token, now=NOW).subject == provider.subject


def test_real_clock_when_now_is_omitted(provider: SharedSecretProvider,
                                        verifier: SharedSecretVerifier) -> None:
    identity = verifier.verify(provider.get_token())
    assert identity.subject == provider.subject


def test_protocols(provider: SharedSecretProvider, verifier: SharedSecretVerifier) -> None:
    assert isinstance(provider, TokenProvider)
    assert isinstance(verifier, TokenVerifier)


def test_non_ascii_identity_round_trip(verifier: SharedSecretVerifier) -> None:
    provider = SharedSecretProvider("örg/ñs/äpp", SECRET, claims={"ключ": "值"})
    identity = verifier.verify(provider.get_token(now=NOW), now=NOW)
    assert identity.subject == provider.subject
    assert identity.claims == {"ключ": "值"}


# -- refusals ---------------------------------------------------------------------------


def test_wrong_secret(provider: SharedSecretProvider) -> None:
    token = provider.get_token(now=NOW)
    assert refused(SharedSecretVerifier(OTHER_SECRET), token) == "bad_signature"


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_tampered_field(provider: SharedSecretProvider, verifier: SharedSecretVerifier,
                        index: int) -> None:
    fields = provider.get_token(now=NOW).split(":")
    replacement = {0: "org/ns/other_AAAAAAAA", 1: str(int(NOW) + 1), 2: b64(b"\x00" * 12),
                   3: b64(b'{"admin":true}'), 4: b64(b"\x00" * 32)}[index]
    fields[index] = replacement
    assert refused(verifier, ":".join(fields)) == "bad_signature"


def test_expired(provider: SharedSecretProvider) -> None:
    verifier = SharedSecretVerifier(SECRET, validity=60, replay_cache=0)
    token = provider.get_token(now=NOW)
    assert verifier.verify(token, now=NOW + 60).subject == provider.subject
    assert refused(verifier, token, now=NOW + 60.5) == "token_time"
    assert refused(verifier, token, now=NOW + 10 * DEFAULT_VALIDITY) == "token_time"
    assert refused(SharedSecretVerifier(SECRET), token,
                   now=NOW + DEFAULT_VALIDITY + 1) == "token_time"


def test_issued_in_the_future(provider: SharedSecretProvider) -> None:
    verifier = SharedSecretVerifier(SECRET, replay_cache=0)
    token = provider.get_token(now=NOW + DEFAULT_CLOCK_SKEW + 1)
    assert refused(verifier, token) == "token_time"
    assert refused(verifier, provider.get_token(now=NOW + 3600)) == "token_time"


def test_within_clock_skew_accepted(provider: SharedSecretProvider) -> None:
    verifier = SharedSecretVerifier(SECRET, replay_cache=0)
    assert verifier.verify(provider.get_token(now=NOW + DEFAULT_CLOCK_SKEW), now=NOW).subject \
        == provider.subject
    assert verifier.verify(provider.get_token(now=NOW + 1), now=NOW).issued_at == NOW + 1


def test_custom_clock_skew(provider: SharedSecretProvider) -> None:
    strict = SharedSecretVerifier(SECRET, clock_skew=0)
    assert refused(strict, provider.get_token(now=NOW + 1)) == "token_time"
    assert strict.verify(provider.get_token(now=NOW), now=NOW).subject == provider.subject
    lenient = SharedSecretVerifier(SECRET, clock_skew=120)
    assert lenient.verify(provider.get_token(now=NOW + 100), now=NOW).issued_at == NOW + 100


def test_replayed_token_refused(provider: SharedSecretProvider,
                                verifier: SharedSecretVerifier) -> None:
    token = provider.get_token(now=NOW)
    verifier.verify(token, now=NOW)
    assert refused(verifier, token, now=NOW + 1) == "replayed"
    # A fresh token of the same provider is fine.
    verifier.verify(provider.get_token(now=NOW + 1), now=NOW + 1)


def test_replay_cache_disabled(provider: SharedSecretProvider) -> None:
    verifier = SharedSecretVerifier(SECRET, replay_cache=0)
    token = provider.get_token(now=NOW)
    assert verifier.verify(token, now=NOW).subject == provider.subject
    assert verifier.verify(token, now=NOW + 1).subject == provider.subject


def test_replay_cache_full_refuses_new_tokens_until_entries_expire(
        provider: SharedSecretProvider) -> None:
    verifier = SharedSecretVerifier(SECRET, validity=60, replay_cache=2)
    first, second, third = (provider.get_token(now=NOW) for _ in range(3))
    verifier.verify(first, now=NOW)
    verifier.verify(second, now=NOW)
    assert refused(verifier, third, now=NOW) == "replay_cache_full"
    assert refused(verifier, first, now=NOW) == "replayed"
    # Once the remembered tokens have expired, new tokens evict them.
    later = NOW + 61
    verifier.verify(provider.get_token(now=later), now=later)
    verifier.verify(provider.get_token(now=later), now=later)
    assert refused(verifier, first, now=later) == "token_time"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("just-a-string", id="one-field"),
        pytest.param("a:1:n:c", id="four-fields"),
        pytest.param("a:1:n:c:m:x", id="six-fields"),
        pytest.param("a:1:n:c:m:x:y", id="seven-fields"),
        pytest.param(":1:n:c:AAAA", id="empty-subject"),
        pytest.param("a:abc:n:c:AAAA", id="non-int-ts"),
        pytest.param("a:1.5:n:c:AAAA", id="float-ts"),
        pytest.param("a::n:c:AAAA", id="empty-ts"),
        pytest.param("a:1:n:c:A", id="mac-bad-length"),
        pytest.param("a:1:n:c:AAAAA", id="mac-bad-length-5"),
        pytest.param("a:1:n:c:é", id="mac-non-ascii"),
        pytest.param("x" * 8193, id="too-long"),
        pytest.param(None, id="none"),
        pytest.param(b"a:1:n:c:AAAA", id="bytes"),
        pytest.param(12345, id="int"),
    ],
)
def test_malformed_tokens(verifier: SharedSecretVerifier, token: Any) -> None:
    assert refused(verifier, token) == "malformed"


def test_malformed_ts_with_valid_mac(verifier: SharedSecretVerifier) -> None:
    for ts in ("abc", "1.5", "", "1e9", "0x10"):
        assert refused(verifier, sign("org/ns/app_x", ts, b64(b"n" * 12), "")) == "malformed"


@pytest.mark.parametrize(
    "claims_text",
    [
        pytest.param(b64(b"not json"), id="not-json"),
        pytest.param(b64(b'{"a": '), id="truncated-json"),
        pytest.param(b64(b"\xff\xfe\x00"), id="not-utf8"),
        pytest.param(b64(b"[1, 2]"), id="json-array"),
        pytest.param(b64(b'"text"'), id="json-string"),
        pytest.param(b64(b"null"), id="json-null"),
        pytest.param("A", id="bad-base64-length"),
        pytest.param("!!!!", id="bad-base64-chars"),
    ],
)
def test_malformed_claims_with_valid_mac(verifier: SharedSecretVerifier,
                                         claims_text: str) -> None:
    token = sign("org/ns/app_x", str(int(NOW)), b64(b"n" * 12), claims_text)
    assert refused(verifier, token) == "malformed"


def test_empty_claims_field_means_no_claims(verifier: SharedSecretVerifier) -> None:
    token = sign("org/ns/app_x", str(int(NOW)), b64(b"n" * 12), "")
    assert verifier.verify(token, now=NOW).claims == {}


MAC_VARIANTS = [
    pytest.param(lambda mac: "!!!!", id="not-base64"),
    pytest.param(lambda mac: mac[:8] + "!!!!" + mac[8:], id="junk-inside"),
    pytest.param(lambda mac: mac[:8] + "\n" + mac[8:], id="newline-inside"),
    pytest.param(lambda mac: mac + "==", id="padding"),
]


@pytest.mark.parametrize("mangle", MAC_VARIANTS)
def test_mac_that_is_not_canonical_base64url_is_malformed(
        provider: SharedSecretProvider, mangle: Any) -> None:
    # The format is base64url without padding: a MAC field in any other form must be
    # refused as malformed and never accepted (a token has exactly one valid spelling).
    verifier = SharedSecretVerifier(SECRET, replay_cache=0)
    token = provider.get_token(now=NOW)
    signed, _, mac = token.rpartition(":")
    assert refused(verifier, f"{signed}:{mangle(mac)}") == "malformed"


def test_token_with_lone_surrogate_is_refused(verifier: SharedSecretVerifier) -> None:
    # A Python str may hold a lone surrogate; verify() must refuse it with
    # AuthenticationError like any other bad token.
    assert refused(verifier, "org/ns/app_\ud800:1:n:c:AAAA") == "malformed"


def test_audience() -> None:
    token_for = {aud: SharedSecretProvider(IDENTITY, SECRET, audience=aud).get_token(now=NOW)
                 for aud in ("node-a", "node-b")}
    verifier = SharedSecretVerifier(SECRET, audience="node-a", replay_cache=0)
    assert verifier.verify(token_for["node-a"], now=NOW).claims["aud"] == "node-a"
    assert refused(verifier, token_for["node-b"]) == "audience"
    no_audience = SharedSecretProvider(IDENTITY, SECRET).get_token(now=NOW)
    assert refused(verifier, no_audience) == "audience"
    # A verifier without an audience accepts any.
    assert SharedSecretVerifier(SECRET).verify(token_for["node-b"], now=NOW).subject


def test_audience_lists() -> None:
    multi = SharedSecretProvider(IDENTITY, SECRET, audience=["node-a", "node-b"])
    assert SharedSecretVerifier(SECRET, audience="node-b").verify(
        multi.get_token(now=NOW), now=NOW).claims["aud"] == ["node-a", "node-b"]
    assert SharedSecretVerifier(SECRET, audience=["node-x", "node-a"]).verify(
        multi.get_token(now=NOW), now=NOW).subject == multi.subject
    assert refused(SharedSecretVerifier(SECRET, audience=["node-c"]),
                   multi.get_token(now=NOW)) == "audience"
    odd = sign("org/ns/app_x", str(int(NOW)), b64(b"n" * 12), b64(b'{"aud": 5}'))
    assert refused(SharedSecretVerifier(SECRET, audience="5"), odd) == "audience"


# -- configuration errors ---------------------------------------------------------------


@pytest.mark.parametrize("identity", ["org:ns/app", "org/ns/app ", "org ns", "a\tb", "a\nb",
                                      "", ":", " "])
def test_bad_identity(identity: str) -> None:
    with pytest.raises(ConfigError):
        SharedSecretProvider(identity, SECRET)


def test_bad_identity_types() -> None:
    with pytest.raises(ConfigError):
        SharedSecretProvider(None, SECRET)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SharedSecretProvider(b"org/ns/app", SECRET)  # type: ignore[arg-type]


@pytest.mark.parametrize("subject", ["a:b", "a b", "a\nb"])
def test_bad_explicit_subject(subject: str) -> None:
    with pytest.raises(ConfigError):
        SharedSecretProvider(IDENTITY, SECRET, subject=subject)


@pytest.mark.parametrize("secret", ["", None, b"bytes-secret-that-is-long-enough-for-hmac"])
def test_bad_secret(secret: Any) -> None:
    with pytest.raises(ConfigError):
        SharedSecretProvider(IDENTITY, secret)
    with pytest.raises(ConfigError):
        SharedSecretVerifier(secret)


@pytest.mark.parametrize("kwargs", [{"validity": 0}, {"validity": -1}, {"clock_skew": -1},
                                    {"replay_cache": -1}])
def test_bad_verifier_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SharedSecretVerifier(SECRET, **kwargs)


def test_short_secret_warns_but_works(caplog: pytest.LogCaptureFixture) -> None:
    short = "s" + secrets.token_hex(4)  # unique: each secret is warned about once
    with caplog.at_level(logging.WARNING, logger="node_lite.auth"):
        provider = SharedSecretProvider(IDENTITY, short)
    warnings = [r for r in caplog.records
                if r.name == "node_lite.auth" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "shorter than 32 bytes" in warnings[0].getMessage()
    verifier = SharedSecretVerifier(short)
    assert verifier.verify(provider.get_token(now=NOW), now=NOW).subject == provider.subject
    assert refused(SharedSecretVerifier(SECRET), provider.get_token(now=NOW)) == "bad_signature"


def test_long_secret_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="node_lite.auth"):
        SharedSecretProvider(IDENTITY, SECRET + secrets.token_hex(4))
        SharedSecretVerifier(SECRET + secrets.token_hex(4))
    assert not [r for r in caplog.records if r.name == "node_lite.auth"]


# -- parse_unverified -------------------------------------------------------------------


def test_parse_unverified_returns_subject_and_claims() -> None:
    provider = SharedSecretProvider(IDENTITY, SECRET, claims={"k": "v"}, audience="a")
    token = provider.get_token(now=NOW)
    identity = parse_unverified(token)
    assert identity.subject == provider.subject
    assert identity.claims == {"k": "v", "aud": "a"}
    assert identity.issued_at == NOW
    assert identity.expires_at == float("inf")
    assert identity.token == token
    # No check at all: a wrong secret or an old token still parses.
    other = SharedSecretProvider(IDENTITY, OTHER_SECRET).get_token(now=0)
    assert parse_unverified(other).issued_at == 0.0


@pytest.mark.parametrize(
    ("token", "subject", "claims"),
    [
        ("plain-name", "plain-name", {}),
        ("", "", {}),
        ("x" * 500, "x" * 128, {}),
        (":1:n:c:m", ":1:n:c:m", {}),
        ("s:notint:n:" + b64(b'{"a":1}') + ":m", "s", {}),
        ("s:1:n:" + b64(b"not json") + ":m", "s", {}),
        ("s:1:n:" + b64(b"[1]") + ":m", "s", {}),
        ("s:1:n::m", "s", {}),
        ("s:1:n:" + b64(b'{"a":1}') + ":", "s", {"a": 1}),
    ],
)
def test_parse_unverified_garbage(token: str, subject: str, claims: dict[str, Any]) -> None:
    identity = parse_unverified(token)
    assert identity.subject == subject
    assert dict(identity.claims) == claims


def test_parse_unverified_deeply_nested_claims() -> None:
    # A token small enough for a hello (max_token_size 8192) whose claims are deeply
    # nested JSON: parse_unverified must not raise (it runs on unauthenticated input).
    token = "org/ns/app_x:1:n:" + b64(b"[" * 5000) + ":m"
    assert len(token) < 8192
    identity = parse_unverified(token)
    assert identity.subject == "org/ns/app_x"
    assert identity.claims == {}


# -- robustness -------------------------------------------------------------------------


@given(st.text(max_size=200))
def test_arbitrary_text_tokens_only_raise_authentication_error(token: str) -> None:
    verifier = SharedSecretVerifier(SECRET)
    assert outcome(verifier, token) in {"malformed", "bad_signature"}
    parse_unverified(token)


B64URL = string.ascii_letters + string.digits + "-_"
field_text = st.text(alphabet=B64URL + "=!: é.", max_size=12) | st.text(max_size=6)


@given(st.lists(field_text, min_size=3, max_size=7), st.integers(-(2**40), 2**40))
def test_token_shaped_text_only_raises_authentication_error(parts: list[str], ts: int) -> None:
    verifier = SharedSecretVerifier(SECRET)
    parts[1:2] = [str(ts)]
    token = ":".join(parts)
    assert outcome(verifier, token) in {"malformed", "bad_signature"}
    parse_unverified(token)


@given(subject=st.text(min_size=1, max_size=12).filter(lambda s: ":" not in s),
       ts=st.integers(0, 2 * int(NOW)) | st.integers(int(NOW) - 4000, int(NOW) + 10),
       nonce=st.text(max_size=12).filter(lambda s: ":" not in s),
       claims=st.binary(max_size=40) | st.sampled_from([b"{}", b'{"aud":["x"]}', b"[]"]))
@settings(max_examples=150)
def test_signed_tokens_with_arbitrary_fields(subject: str, ts: int, nonce: str, claims: bytes
                                             ) -> None:
    verifier = SharedSecretVerifier(SECRET, audience="x")
    token = sign(subject, str(ts), nonce, b64(claims))
    result = outcome(verifier, token)
    if isinstance(result, Identity):
        assert result.subject == subject
        assert result.issued_at == ts
        assert parse_unverified(token).subject == subject
    else:
        assert result in {"malformed", "token_time", "audience", "replayed"}
