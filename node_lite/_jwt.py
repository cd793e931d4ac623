# JWT identity tokens (sans-IO: the clock is an argument), on PyJWT.
#
# PyJWT is optional (the ``jwt`` extra): it is imported inside functions, so
# this module imports without it and fails with a ConfigError only when used.
#
# Verification rules (RFC 8725):
# * The accepted algorithms come from configuration: the ``algorithms``
#   argument, else each key's ``alg`` or key type. The token header only
#   selects among them; ``alg: none`` is never accepted.
# * A key is only used with algorithms of its own type, so an HS* token is
#   only checked against an HS key (kty "oct") that was configured as such:
#   a public key never becomes an HMAC secret (algorithm confusion).
# * The header ``kid`` selects the key; keys without a kid match any kid.
# * Time claims are checked here against ``now`` (PyJWT reads the wall clock).
from __future__ import annotations

import base64
import binascii
import heapq
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._auth import DEFAULT_CLOCK_SKEW, DEFAULT_VALIDITY, Identity
from ._errors import AuthenticationError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        PrivateKeyTypes,
        PublicKeyTypes,
    )

log = logging.getLogger("node_lite.auth")

#: Tokens above this size are refused before any parsing (as shared-secret tokens).
MAX_TOKEN_SIZE = 8192
_MISSING_PYJWT = "JWT support needs PyJWT: pip install 'slim-agents[jwt]'"

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# RFC 7518 section 3.2: an HMAC key is at least as long as the hash output.
_HMAC_MIN_KEY = {"HS256": 32, "HS384": 48, "HS512": 64}
# JWK curve names and cryptography curve names to the one algorithm of each curve.
_JWK_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_CRYPTO_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512",
                  "secp256k1": "ES256K"}
#: Every algorithm this module signs and verifies with ("none" is not one).
SUPPORTED_ALGORITHMS = frozenset(
    (*_RSA_ALGORITHMS, *_HMAC_MIN_KEY, *_JWK_CURVES.values(), "EdDSA"))
# RSA keys below this size are refused (NIST SP 800-131A; PyJWT warns below it).
MIN_RSA_BITS = 2048
# JWK "use" values of signature keys; SPIFFE bundles also carry "x509-svid" CA keys,
# which must not validate JWTs.
_SIGNATURE_USES = (None, "sig", "jwt-svid")
#: JWK member added by :func:`load_trust_bundle`: the trust domain a key speaks for.
TRUST_DOMAIN_MEMBER = "x-trust-domain"
# Claims the provider sets itself.
_REGISTERED = frozenset(("iat", "nbf", "exp", "jti", "sub", "iss", "aud"))


def _require_pyjwt() -> None:
    """Fail early, with a clear message, when the ``jwt`` extra is missing.

    :raises ConfigError: when PyJWT or cryptography is not installed.
    """
    try:
        import cryptography  # noqa: F401
        import jwt  # noqa: F401
    except ImportError as exc:
        raise ConfigError(_MISSING_PYJWT) from exc


def _family(algorithm: str) -> str:
    """The JWK key type (kty) an algorithm signs with."""
    if algorithm in _HMAC_MIN_KEY:
        return "oct"
    if algorithm in _RSA_ALGORITHMS:
        return "RSA"
    if algorithm == "EdDSA":
        return "OKP"
    return "EC"


def _check_algorithm(algorithm: object) -> str:
    if not isinstance(algorithm, str) or algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(f"unsupported JWT algorithm {algorithm!r}; "
                          f"use one of {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
    return algorithm


def _public_algorithms(public_key: object, where: str) -> tuple[str, frozenset[str]]:
    """The key type and the algorithms an asymmetric public key verifies.

    :raises ConfigError: for unsupported key types, curves and short RSA keys.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA key of {public_key.key_size} bits, "
                              f"at least {MIN_RSA_BITS} are required")
        return "RSA", frozenset(_RSA_ALGORITHMS)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        alg = _CRYPTO_CURVES.get(public_key.curve.name)
        if alg is None:
            raise ConfigError(f"{where}: unsupported curve {public_key.curve.name}")
        return "EC", frozenset((alg,))
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP", frozenset(("EdDSA",))
    raise ConfigError(f"{where}: unsupported key type {type(public_key).__name__}")


def _to_public(key: Any) -> Any:
    # A private key (JWK with "d", or a key object) verifies through its public half.
    public = getattr(key, "public_key", None)
    return public() if callable(public) else key


def _is_pem(data: str | bytes) -> bool:
    text = data.encode() if isinstance(data, str) else data
    return text.lstrip().startswith(b"-----BEGIN ")


def _load_pem_public(data: str | bytes, where: str) -> PublicKeyTypes:
    """Load a PEM public key or the public key of a PEM certificate.

    :raises ConfigError: for private keys and anything that does not parse.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    raw = data.encode() if isinstance(data, str) else data
    if b"PRIVATE KEY-----" in raw:
        raise ConfigError(f"{where}: a verifier takes public keys, not a private key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in raw:
            return x509.load_pem_x509_certificate(raw).public_key()
        return load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not a PEM public key or certificate: {exc}") from exc


# -- keys for verification ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the algorithms it may be used with."""

    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any  # a cryptography public key, or bytes for HMAC
    trust_domain: str | None = None


def _parse_jwk(jwk: Mapping[str, Any], where: str) -> _Key | None:
    """Parse one JWK for verification; None for a key that is not for signatures.

    :raises ConfigError: when the JWK is invalid or unsupported.
    """
    from jwt.algorithms import Algorithm, ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
    from jwt.exceptions import PyJWTError

    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: a JWK must be an object, got {type(jwk).__name__}")
    kty, kid, alg = jwk.get("kty"), jwk.get("kid"), jwk.get("alg")
    if jwk.get("use") not in _SIGNATURE_USES:
        return None
    if not isinstance(kty, str):
        raise ConfigError(f"{where}: JWK without a 'kty' member")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(f"{where}: JWK 'kid' must be a string")
    domain = jwk.get(TRUST_DOMAIN_MEMBER)
    if domain is not None and (not isinstance(domain, str) or not domain):
        raise ConfigError(f"{where}: {TRUST_DOMAIN_MEMBER!r} must be a non-empty string")
    where = f"{where} (kid {kid!r})" if kid else where
    data = dict(jwk)
    try:
        if kty == "oct":
            secret = HMACAlgorithm.from_jwk(data)
            algorithms = frozenset(a for a, n in _HMAC_MIN_KEY.items() if len(secret) >= n)
            if not algorithms:
                raise ConfigError(f"{where}: HMAC key of {len(secret)} bytes, at least "
                                  f"{_HMAC_MIN_KEY['HS256']} are required")
            key: Any = secret
        elif kty in ("RSA", "EC", "OKP"):
            loaders: dict[str, type[Algorithm]] = {
                "RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
            key = _to_public(loaders[kty].from_jwk(data))
            kty, algorithms = _public_algorithms(key, where)
        else:
            raise ConfigError(f"{where}: unsupported key type {kty!r}")
    except (PyJWTError, ValueError, TypeError, KeyError, binascii.Error) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: invalid {kty} JWK: {exc}") from exc
    if alg is not None:
        if alg not in algorithms:
            raise ConfigError(f"{where}: 'alg' {alg!r} does not fit a {kty} key")
        algorithms = frozenset((alg,))
    return _Key(kid=kid, kty=kty, algorithms=algorithms, key=key, trust_domain=domain)


def _parse_keys(keys: object) -> list[_Key]:
    """Parse the verifier's ``keys`` argument (see :class:`JwtVerifier`).

    :raises ConfigError: on any invalid key.
    """
    if isinstance(keys, str | bytes):
        items: list[object] = [keys]
    elif isinstance(keys, Mapping):
        if "keys" in keys:
            if not isinstance(keys["keys"], list):
                raise ConfigError("JWKS 'keys' must be a list")
            items = list(keys["keys"])
        else:
            items = [keys]
    elif isinstance(keys, Sequence):
        items = list(keys)
    else:
        raise ConfigError(f"keys must be a JWKS, JWKs or PEM keys, got {type(keys).__name__}")
    parsed: list[_Key] = []
    for index, item in enumerate(items):
        where = f"key #{index}"
        if isinstance(item, str | bytes):
            if not _is_pem(item):
                # A bare string is not taken as an HMAC secret: HS keys come as JWKs.
                raise ConfigError(f"{where}: expected a PEM public key (HMAC keys are "
                                  "given as JWKs with kty 'oct')")
            public = _load_pem_public(item, where)
            kty, algorithms = _public_algorithms(public, where)
            parsed.append(_Key(kid=None, kty=kty, algorithms=algorithms, key=public))
        elif isinstance(item, Mapping):
            key = _parse_jwk(item, where)
            if key is not None:
                parsed.append(key)
        else:
            raise ConfigError(f"{where}: expected a JWK or a PEM key, got {type(item).__name__}")
    return parsed


def _strings(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{what} must be non-empty strings: {value!r}")
    return items


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    """A numeric date claim, None when absent.

    :raises AuthenticationError: (malformed) for a non-numeric or non-finite value.
    """
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationError("malformed", detail=f"claim {name!r} is not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise AuthenticationError("malformed", detail=f"claim {name!r} is out of range") from exc
    if not math.isfinite(number):
        raise AuthenticationError("malformed", detail=f"claim {name!r} is not finite")
    return number


class JwtVerifier:
    """Verifies JWTs signed by configured keys; implements ``TokenVerifier``.

    :param keys: a JWKS (``{"keys": [...]}``), a list of JWKs, one JWK, a PEM
        public key (or certificate), or a list of PEM keys. HMAC keys are only
        accepted as JWKs with ``"kty": "oct"``. JWKs whose ``use`` is neither
        ``sig`` nor ``jwt-svid`` are skipped. A key without ``kid`` matches any
        token ``kid``.
    :param algorithms: the accepted algorithms; by default each key's ``alg``,
        else every algorithm of its type (RSA keys: RS* and PS*).
    :param issuer: when set, the ``iss`` claim must be one of these.
    :param audience: when set, the ``aud`` claim must contain one of these.
    :param leeway: tolerated clock skew in seconds for ``exp``, ``nbf`` and ``iat``.
    :param require: claims that must be present; ``sub`` is always required,
        it is the identity.
    :param replay_cache: ``jti`` values remembered (until the token expires)
        to refuse a token seen before; 0 disables it (tokens attached to many
        messages must not use it). With the cache on, ``jti`` and ``exp`` are
        required.
    :raises ConfigError: on invalid settings or keys, or when PyJWT is missing.
    """

    def __init__(
        self,
        *,
        keys: Mapping[str, Any] | Sequence[Mapping[str, Any] | str | bytes] | str | bytes,
        algorithms: Sequence[str] | None = None,
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        leeway: float = DEFAULT_CLOCK_SKEW,
        require: Sequence[str] = ("exp", "iat", "sub"),
        replay_cache: int = 0,
    ) -> None:
        _require_pyjwt()
        import jwt

        if leeway < 0 or replay_cache < 0:
            raise ConfigError("leeway and replay_cache must be >= 0")
        if isinstance(require, str) or not all(isinstance(c, str) for c in require):
            raise ConfigError(f"require must be a list of claim names: {require!r}")
        self.issuer = _strings(issuer, "issuer")
        self.audience = _strings(audience, "audience")
        self.leeway = float(leeway)
        self.require = tuple(dict.fromkeys(("sub", *require)))
        if replay_cache:
            self.require = tuple(dict.fromkeys((*self.require, "exp", "jti")))
        keys_parsed = _parse_keys(keys)
        if algorithms is not None:
            if isinstance(algorithms, str):
                raise ConfigError("algorithms must be a list of names")
            allowed = frozenset(_check_algorithm(a) for a in algorithms)
            keys_parsed = [replace(k, algorithms=k.algorithms & allowed)
                           for k in keys_parsed if k.algorithms & allowed]
        if not keys_parsed:
            raise ConfigError("no usable verification key (check the keys and algorithms)")
        self._keys = keys_parsed
        #: The algorithms a token header may name.
        self.algorithms = frozenset(a for k in keys_parsed for a in k.algorithms)
        # Claims and times are checked below against `now`; PyJWT only checks
        # the signature (and never warns: short keys were refused above).
        self._jwt = jwt.PyJWT({
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False, "verify_sub": False,
            "verify_jti": False, "require": [], "enforce_minimum_key_length": True,
        })
        self._replay_capacity = replay_cache
        self._seen: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, tuple[str, str]]] = []

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        """Check a token's signature and claims.

        :param now: the current wall-clock time in seconds (default: the clock).
        :returns: the identity: ``sub``, ``iat``, ``exp`` and all claims.
        :raises AuthenticationError: with ``reason`` ``malformed``, ``algorithm``,
            ``unknown_key``, ``bad_signature``, ``token_time``, ``issuer``,
            ``audience``, ``trust_domain``, ``replayed`` or ``replay_cache_full``.
        """
        import jwt

        now = time.time() if now is None else now
        if not isinstance(token, str) or len(token) > MAX_TOKEN_SIZE or not token.isascii():
            raise AuthenticationError("malformed", detail="token is not ASCII text of <= 8 KiB")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
            raise AuthenticationError("malformed", detail=f"not a JWT: {exc}") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthenticationError("algorithm", detail=f"algorithm {alg!r} not accepted")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("malformed", detail="'kid' is not a string")
        claims, key = self._check_signature(token, alg, kid)
        return self._check_claims(token, claims, key, now)

    def _candidates(self, alg: str, kid: str | None) -> list[_Key]:
        if kid is None:
            return [k for k in self._keys if alg in k.algorithms]
        named = [k for k in self._keys if k.kid == kid]
        if not named:
            named = [k for k in self._keys if k.kid is None]
            if not named:
                raise AuthenticationError("unknown_key", detail=f"no key with kid {kid!r}")
        usable = [k for k in named if alg in k.algorithms]
        if not usable:
            raise AuthenticationError("algorithm",
                                      detail=f"key {kid!r} does not sign with {alg}")
        return usable

    def _check_signature(self, token: str, alg: str, kid: str | None
                         ) -> tuple[dict[str, Any], _Key]:
        import jwt

        for key in self._candidates(alg, kid):
            try:
                # `algorithms` is the one header alg, already checked against this key.
                claims: dict[str, Any] = self._jwt.decode(token, key.key, algorithms=[alg])
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError,
                    RecursionError) as exc:
                raise AuthenticationError("malformed", detail=str(exc)) from exc
            return claims, key
        raise AuthenticationError("bad_signature", detail="signature does not verify")

    def _check_claims(self, token: str, claims: dict[str, Any], key: _Key, now: float
                      ) -> Identity:
        for name in self.require:
            if claims.get(name) is None:
                raise AuthenticationError("malformed", detail=f"missing claim {name!r}")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("malformed", detail="'sub' is not a non-empty string")
        exp, nbf, iat = (_number(claims, c) for c in ("exp", "nbf", "iat"))
        if exp is not None and now >= exp + self.leeway:
            raise AuthenticationError("token_time", detail="expired")
        if nbf is not None and nbf > now + self.leeway:
            raise AuthenticationError("token_time", detail="not valid yet (nbf)")
        if iat is not None and iat > now + self.leeway:
            raise AuthenticationError("token_time", detail="issued in the future")
        iss = claims.get("iss")
        if self.issuer and iss not in self.issuer:
            raise AuthenticationError("issuer", detail=f"issuer {iss!r} not accepted")
        if self.audience:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in self.audience for a in auds):
                raise AuthenticationError("audience", detail=f"audience {aud!r} not accepted")
        if key.trust_domain is not None:
            # A trust domain's keys only speak for its own SPIFFE ids.
            prefix = f"spiffe://{key.trust_domain}"
            if subject != prefix and not subject.startswith(prefix + "/"):
                raise AuthenticationError(
                    "trust_domain",
                    detail=f"subject not in trust domain {key.trust_domain!r}")
        if self._replay_capacity:
            assert exp is not None  # required when the cache is on
            self._remember(str(iss or ""), claims["jti"], exp + self.leeway, now)
        return Identity(subject=subject, issued_at=iat if iat is not None else 0.0,
                        expires_at=exp if exp is not None else math.inf,
                        claims=claims, token=token)

    def _remember(self, issuer: str, jti: object, expiry: float, now: float) -> None:
        if not isinstance(jti, str):
            raise AuthenticationError("malformed", detail="'jti' is not a string")
        seen, expiries = self._seen, self._expiries
        # Forget tokens that expired: they are refused on time anyway.
        while expiries and expiries[0][0] <= now:
            seen.pop(heapq.heappop(expiries)[1], None)
        entry = (issuer, jti)
        if entry in seen:
            raise AuthenticationError("replayed", detail="token already used")
        if len(seen) >= self._replay_capacity:
            # Evicting a live entry would reopen a replay window: refuse instead.
            raise AuthenticationError("replay_cache_full", detail="too many live tokens")
        seen[entry] = expiry
        heapq.heappush(expiries, (expiry, entry))


# -- providers ----------------------------------------------------------------------


def _load_signing_key(private_key: object, algorithm: str) -> tuple[Any, str | None]:
    """The signing key for ``algorithm`` and the JWK's kid, if any.

    :raises ConfigError: when the key does not fit the algorithm or does not parse.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from jwt.algorithms import Algorithm, ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
    from jwt.exceptions import PyJWTError

    family = _family(algorithm)
    kid: str | None = None
    try:
        if isinstance(private_key, Mapping):
            kid_value = private_key.get("kid")
            kid = kid_value if isinstance(kid_value, str) else None
            if private_key.get("kty") != family:
                raise ConfigError(f"{algorithm} needs a JWK with kty {family!r}, "
                                  f"got {private_key.get('kty')!r}")
            loaders: dict[str, type[Algorithm]] = {
                "oct": HMACAlgorithm, "RSA": RSAAlgorithm, "EC": ECAlgorithm,
                "OKP": OKPAlgorithm}
            key: Any = loaders[family].from_jwk(dict(private_key))
        elif isinstance(private_key, str | bytes):
            if family == "oct":
                if _is_pem(private_key):
                    raise ConfigError(f"{algorithm} takes a secret, not a PEM key")
                key = private_key.encode() if isinstance(private_key, str) else private_key
            else:
                raw = private_key.encode() if isinstance(private_key, str) else private_key
                key = load_pem_private_key(raw, password=None)
        else:
            key = private_key  # a cryptography private key object
    except (PyJWTError, ValueError, TypeError, KeyError, binascii.Error,
            UnsupportedAlgorithm) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot load the {algorithm} signing key: {exc}") from exc
    if family == "oct":
        if not isinstance(key, bytes) or len(key) < _HMAC_MIN_KEY[algorithm]:
            raise ConfigError(f"{algorithm} needs a secret of at least "
                              f"{_HMAC_MIN_KEY[algorithm]} bytes")
        return key, kid
    private_types = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                     ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
    if not isinstance(key, private_types):
        raise ConfigError(f"{algorithm} needs a private key, got {type(key).__name__}")
    kty, algorithms = _public_algorithms(key.public_key(), "signing key")
    if algorithm not in algorithms:
        raise ConfigError(f"a {kty} key cannot sign {algorithm} "
                          f"(it signs {', '.join(sorted(algorithms))})")
    return key, kid


class JwtProvider:
    """Signs a fresh JWT per call; implements ``TokenProvider``.

    :param private_key: a PEM private key (str or bytes), a private JWK, or a
        ``cryptography`` private key; for HS* a secret (str or bytes, at least
        as long as the hash) or an ``oct`` JWK.
    :param algorithm: one of :data:`SUPPORTED_ALGORITHMS`, e.g. ``EdDSA``,
        ``ES256``, ``RS256``; it must fit the key.
    :param subject: the ``sub`` claim: the identity (the app's instance id
        is ``instance_id_for(subject)`` unless a ``name`` claim binds the name).
    :param duration: token lifetime in seconds (``exp = iat + duration``).
    :param key_id: the header ``kid``; by default the JWK's ``kid``, if any.
    :param claims: extra claims, e.g. ``{"name": "org/ns/app/123"}``; the
        registered claims set here (iat, nbf, exp, jti, sub, iss, aud) are refused.
    :raises ConfigError: on invalid settings or keys, or when PyJWT is missing.
    """

    def __init__(
        self,
        private_key: str | bytes | Mapping[str, Any] | PrivateKeyTypes,
        *,
        algorithm: str,
        subject: str,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        duration: float = DEFAULT_VALIDITY,
        key_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        _require_pyjwt()
        import jwt

        self.algorithm = _check_algorithm(algorithm)
        if not isinstance(subject, str) or not subject:
            raise ConfigError("subject must be a non-empty string")
        if issuer is not None and (not isinstance(issuer, str) or not issuer):
            raise ConfigError("issuer must be a non-empty string")
        if not duration > 0 or not math.isfinite(duration):
            raise ConfigError("duration must be a positive number of seconds")
        extra = dict(claims or {})
        clash = sorted(_REGISTERED & extra.keys())
        if clash:
            raise ConfigError(f"claims {clash} are set by the provider (use its arguments)")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"claims must be JSON-serializable: {exc}") from exc
        self._key, jwk_kid = _load_signing_key(private_key, self.algorithm)
        self.key_id = key_id if key_id is not None else jwk_kid
        self._subject = subject
        self.issuer = issuer
        auds = _strings(audience, "audience")
        self.audience: str | list[str] | None = (
            None if not auds else auds[0] if isinstance(audience, str) else list(auds))
        self.duration = float(duration)
        self.claims = extra
        # Keys were checked above, so PyJWT never warns about their length.
        self._jwt = jwt.PyJWT({"enforce_minimum_key_length": True})

    @property
    def subject(self) -> str:
        return self._subject

    def get_token(self, *, now: float | None = None) -> str:
        """Sign a new token valid from ``now`` for ``duration`` seconds.

        :param now: the current wall-clock time in seconds (default: the clock).
        """
        now = time.time() if now is None else now
        iat = int(now)
        payload: dict[str, Any] = dict(self.claims)
        payload.update(sub=self._subject, iat=iat, nbf=iat, exp=int(now + self.duration),
                       jti=secrets.token_urlsafe(16))
        if self.issuer is not None:
            payload["iss"] = self.issuer
        if self.audience is not None:
            payload["aud"] = self.audience
        headers = {"kid": self.key_id} if self.key_id is not None else None
        token: str = self._jwt.encode(payload, self._key, algorithm=self.algorithm,
                                      headers=headers)
        return token


def _unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWT, without checking anything but the shape.

    :raises ValueError: when the token is not a JWT with a JSON object payload.
    """
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise ValueError("not a compact JWT (three dot-separated parts)")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise ValueError(f"undecodable payload: {exc}") from exc
    if not isinstance(claims, dict):
        raise ValueError("the payload is not a JSON object")
    return claims


class StaticJwtProvider:
    """Serves a JWT read from a file, re-read when the file changes.

    For tokens minted elsewhere (a SPIRE agent helper writing a JWT-SVID). The
    file is checked on each :meth:`get_token`; when a re-read fails (a rotation
    in progress) the previous token is kept and a warning is logged.

    :param path: the file holding one compact JWT (surrounding spaces ignored).
    :raises ConfigError: when the file cannot be read or holds no JWT with a ``sub``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._subject = ""
        try:
            self._load(self._stat())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a JWT from {self.path}: {exc}") from exc

    def _stat(self) -> tuple[int, int, int]:
        # Size and inode too: an atomic rename may keep the mtime.
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, stamp: tuple[int, int, int]) -> None:
        # The stamp is taken before reading: a write in between is seen next time.
        token = self.path.read_text(encoding="ascii").strip()
        subject = _unverified_claims(token).get("sub")
        if not isinstance(subject, str) or not subject:
            raise ValueError("the token has no 'sub' claim")
        self._token, self._subject, self._stamp = token, subject, stamp

    @property
    def subject(self) -> str:
        """The ``sub`` of the token last read (not verified: the node checks it)."""
        return self._subject

    def get_token(self, *, now: float | None = None) -> str:
        """The file's token, re-read if the file changed since the last read.

        :param now: unused (the token's times are fixed by its issuer).
        """
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp)
        except (OSError, ValueError) as exc:
            log.warning("keeping the previous JWT: cannot reload %s: %s", self.path, exc)
        return self._token


# -- key sets -----------------------------------------------------------------------


def _decode_jwks_text(domain: str, value: str) -> Any:
    # `base64` wraps lines and some tools write the URL-safe alphabet.
    text = "".join(value.split())
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars,
                               validate=True)
        return json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise ConfigError(f"trust bundle: domain {domain!r}: the value is not "
                          f"base64-encoded JWKS JSON: {exc}") from exc


def load_trust_bundle(
    source: str | os.PathLike[str] | Mapping[str, Any], *, bind_domains: bool = True
) -> dict[str, Any]:
    """Load a SPIRE JWT trust bundle as one JWKS for :class:`JwtVerifier`.

    The bundle maps trust-domain names to base64-encoded JWKS documents, as in
    the SLIM tutorial: ``{"trust-domain-1.org": "<base64 JWKS>", ...}`` (a
    domain may also map to a JWKS object). Each key is checked.

    :param source: the bundle file's path, or the already-parsed mapping.
    :param bind_domains: tag each key with its domain (JWK member
        :data:`TRUST_DOMAIN_MEMBER`) so that the verifier only accepts it for
        subjects ``spiffe://<domain>/...``; otherwise one domain's keys could
        sign tokens for another domain's identities.
    :returns: ``{"keys": [...]}`` with the keys of every domain.
    :raises ConfigError: when the file cannot be read, for any invalid
        domain entry or key (the message names the domain), or when PyJWT
        is missing (keys are checked with it).
    """
    _require_pyjwt()
    if isinstance(source, Mapping):
        bundle: Any = source
    else:
        try:
            bundle = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(f"cannot read trust bundle {source}: {exc}") from exc
    if not isinstance(bundle, Mapping) or not bundle:
        raise ConfigError("a trust bundle is a non-empty JSON object mapping trust "
                          "domains to base64-encoded JWKS")
    merged: list[dict[str, Any]] = []
    for domain, value in bundle.items():
        if not isinstance(domain, str) or not domain or "/" in domain:
            raise ConfigError(f"trust bundle: invalid trust domain name {domain!r}")
        jwks = _decode_jwks_text(domain, value) if isinstance(value, str) else value
        if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
            raise ConfigError(f"trust bundle: domain {domain!r}: expected a JWKS "
                              "object with a 'keys' list")
        for index, jwk in enumerate(jwks["keys"]):
            where = f"trust bundle: domain {domain!r}: key #{index}"
            if not isinstance(jwk, Mapping):
                raise ConfigError(f"{where}: a JWK must be an object")
            entry = dict(jwk)
            if bind_domains:
                entry[TRUST_DOMAIN_MEMBER] = domain
            _parse_jwk(entry, where)
            merged.append(entry)
    if not merged:
        raise ConfigError("trust bundle: no keys in any trust domain")
    return {"keys": merged}


def jwks_from_public_keys(
    *keys: str | bytes | PublicKeyTypes | PrivateKeyTypes,
    key_ids: Sequence[str | None] | None = None,
    algorithms: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Build a JWKS (public keys only) for :class:`JwtVerifier` or for publishing.

    :param keys: PEM public keys or certificates, or ``cryptography`` key
        objects; a private key object contributes only its public half.
    :param key_ids: a ``kid`` per key (None for none).
    :param algorithms: an ``alg`` per key (None for none), restricting the key.
    :returns: ``{"keys": [...]}``.
    :raises ConfigError: for unsupported keys or mismatched list lengths, or
        when PyJWT is missing.
    """
    _require_pyjwt()
    from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    exporters: dict[str, type[Algorithm]] = {
        "RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
    kids = list(key_ids) if key_ids is not None else [None] * len(keys)
    algs = list(algorithms) if algorithms is not None else [None] * len(keys)
    if len(kids) != len(keys) or len(algs) != len(keys):
        raise ConfigError("key_ids and algorithms need one entry per key")
    out: list[dict[str, Any]] = []
    for index, (item, kid, alg) in enumerate(zip(keys, kids, algs, strict=True)):
        where = f"key #{index}"
        public = (_load_pem_public(item, where) if isinstance(item, str | bytes)
                  else _to_public(item))
        kty, supported = _public_algorithms(public, where)
        jwk: dict[str, Any] = dict(exporters[kty].to_jwk(public, as_dict=True))
        if kid is not None:
            jwk["kid"] = kid
        if alg is not None:
            if alg not in supported:
                raise ConfigError(f"{where}: a {kty} key cannot use {alg!r}")
            jwk["alg"] = alg
        jwk["use"] = "sig"
        out.append(jwk)
    return {"keys": out}
