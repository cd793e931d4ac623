# Identity tokens (sans-IO: the clock is an argument).
#
# Shared-secret token: "<sub>:<ts>:<nonce>:<claims>:<mac>" where
#   mac = HMAC-SHA256(secret, "<sub>:<ts>:<nonce>:<claims>"),
#   nonce = 12 random bytes, claims = JSON; all base64url without padding.
# Verification checks the shape, the MAC in constant time, the issue time
# against the validity window and clock skew, the audience, and a replay
# cache of (nonce, ts) pairs.
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._errors import AuthenticationError, ConfigError

log = logging.getLogger("node_lite.auth")

# Upstream refuses secrets under 32 bytes; we accept them with a warning
# (the tutorial uses "secret").
MIN_SECRET_LENGTH = 32
# Token lifetime and tolerated clock skew, as upstream.
DEFAULT_VALIDITY = 3600.0
DEFAULT_CLOCK_SKEW = 5.0
# Replay cache size, as upstream's optional cache (on by default here).
DEFAULT_REPLAY_CACHE = 4096
_ALNUM = string.ascii_letters + string.digits
_warned_secrets: set[str] = set()


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified identity: the token's subject and its claims."""

    subject: str
    issued_at: float
    expires_at: float
    claims: Mapping[str, Any] = field(default_factory=dict)
    token: str = ""


@runtime_checkable
class TokenProvider(Protocol):
    """Makes identity tokens for one identity."""

    @property
    def subject(self) -> str: ...

    def get_token(self, *, now: float | None = None) -> str: ...


@runtime_checkable
class TokenVerifier(Protocol):
    """Checks identity tokens; raises :class:`AuthenticationError` on refusal."""

    def verify(self, token: str, *, now: float | None = None) -> Identity: ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    # Strict: one spelling per value (the stdlib decoder skips stray characters).
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_secret(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise ConfigError("a shared secret must be a non-empty string")
    if len(secret.encode()) < MIN_SECRET_LENGTH and secret not in _warned_secrets:
        _warned_secrets.add(secret)
        log.warning(
            "shared secret shorter than %d bytes: for development only, never in production",
            MIN_SECRET_LENGTH,
        )
    return secret.encode()


class SharedSecretProvider:
    """Tokens signed with a shared secret.

    The subject is ``<identity>_<8 random characters>``: unique per provider,
    so two instances of one app get different subjects and instance ids.
    """

    def __init__(
        self,
        identity: str,
        secret: str,
        *,
        claims: Mapping[str, Any] | None = None,
        audience: str | Sequence[str] | None = None,
        subject: str | None = None,
    ) -> None:
        if not isinstance(identity, str) or not identity or any(
            c == ":" or c.isspace() for c in identity
        ):
            raise ConfigError(f"identity must be non-empty without ':' or spaces: {identity!r}")
        self._key = _check_secret(secret)
        self.identity = identity
        self._subject = subject or f"{identity}_{''.join(secrets.choice(_ALNUM) for _ in range(8))}"
        if ":" in self._subject or any(c.isspace() for c in self._subject):
            raise ConfigError(f"invalid subject {self._subject!r}")
        self.claims: dict[str, Any] = dict(claims or {})
        if audience is not None:
            self.claims["aud"] = audience

    @property
    def shared_secret(self) -> str:
        """The secret the tokens are made with (a bridge to another network needs it)."""
        return self._key.decode()

    @property
    def subject(self) -> str:
        return self._subject

    def get_token(self, *, now: float | None = None) -> str:
        ts = int(time.time() if now is None else now)
        nonce = _b64(os.urandom(12))
        claims = _b64(json.dumps(self.claims, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{self._subject}:{ts}:{nonce}:{claims}"
        mac = _b64(hmac.new(self._key, signed.encode(), hashlib.sha256).digest())
        return f"{signed}:{mac}"


class SharedSecretVerifier:
    """Verifies :class:`SharedSecretProvider` tokens.

    :param audience: when set, the token's ``aud`` claim must contain one of these.
    :param replay_cache: entries remembered to refuse a token seen before; 0
        disables it (tokens attached to many messages must not use it).
    """

    def __init__(
        self,
        secret: str,
        *,
        validity: float = DEFAULT_VALIDITY,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        audience: str | Sequence[str] | None = None,
        replay_cache: int = DEFAULT_REPLAY_CACHE,
    ) -> None:
        self._key = _check_secret(secret)
        if validity <= 0 or clock_skew < 0 or replay_cache < 0:
            raise ConfigError("validity must be positive, clock_skew and replay_cache >= 0")
        self.validity = validity
        self.clock_skew = clock_skew
        self.audience = [audience] if isinstance(audience, str) else list(audience or [])
        self._replay_capacity = replay_cache
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        now = time.time() if now is None else now
        if not isinstance(token, str) or len(token) > 8192:
            raise AuthenticationError("malformed", detail="token is not a string of <= 8 KiB")
        signed, sep, mac_text = token.rpartition(":")
        parts = signed.split(":")
        if not sep or len(parts) != 4 or not parts[0]:
            raise AuthenticationError("malformed", detail="expected 5 fields")
        subject, ts_text, nonce, claims_text = parts
        try:
            mac = _unb64(mac_text)
            ts = int(ts_text)
        except (ValueError, binascii.Error) as exc:
            raise AuthenticationError("malformed", detail=str(exc)) from exc
        try:
            signed_bytes = signed.encode()
        except UnicodeEncodeError as exc:
            raise AuthenticationError("malformed", detail="token is not valid text") from exc
        expected = hmac.new(self._key, signed_bytes, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("bad_signature", detail="token MAC does not verify")
        if ts > now + self.clock_skew:
            raise AuthenticationError("token_time", detail="issued in the future")
        if now - ts > self.validity:
            raise AuthenticationError("token_time", detail="expired")
        try:
            claims = json.loads(_unb64(claims_text)) if claims_text else {}
        except (ValueError, binascii.Error, RecursionError) as exc:
            raise AuthenticationError("malformed", detail="claims are not JSON") from exc
        if not isinstance(claims, dict):
            raise AuthenticationError("malformed", detail="claims are not an object")
        if self.audience:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(a in self.audience for a in auds):
                raise AuthenticationError("audience", detail=f"audience {aud!r} not accepted")
        if self._replay_capacity:
            key = (nonce, ts)
            if key in self._seen:
                raise AuthenticationError("replayed", detail="token already used")
            self._seen[key] = ts + self.validity
            while len(self._seen) > self._replay_capacity:
                oldest_key, expiry = next(iter(self._seen.items()))
                if expiry >= now and len(self._seen) <= 2 * self._replay_capacity:
                    # Evicting a live entry would reopen a replay window: refuse instead.
                    del self._seen[key]
                    raise AuthenticationError("replay_cache_full", detail="too many new tokens")
                del self._seen[oldest_key]
        return Identity(subject=subject, issued_at=float(ts), expires_at=ts + self.validity,
                        claims=claims, token=token)


def parse_unverified(token: str) -> Identity:
    """Read the subject and claims of a shared-secret token without checking it.

    Used by a node that has no verifier configured (development mode).
    """
    signed, _, _ = token.rpartition(":")
    parts = signed.split(":")
    if len(parts) != 4 or not parts[0]:
        return Identity(subject=token[:128], issued_at=0.0, expires_at=float("inf"), token=token)
    try:
        claims = json.loads(_unb64(parts[3])) if parts[3] else {}
        ts = float(int(parts[1]))
    except (ValueError, binascii.Error, RecursionError):
        claims, ts = {}, 0.0
    return Identity(subject=parts[0], issued_at=ts, expires_at=float("inf"),
                    claims=claims if isinstance(claims, dict) else {}, token=token)
