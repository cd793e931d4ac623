# SLIM-GK v1 identities (sans-IO): Ed25519 signing identities, credentials bound
# to the SLIM identity token (section 2.3), and one-time key packages (2.4).
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import nacl.bindings as sodium

from node_lite import AuthenticationError, Identity

from ._e2e_base import (
    LABEL_KP,
    MAX_SUBJECT,
    MAX_TOKEN,
    U64,
    E2EError,
    Rng,
    as_bin,
    as_int,
    as_map,
    as_str,
    canonical,
    default_rng,
    open_signed,
    seal_signed,
    sha256,
    unpack,
    verify_signature,
    wipe,
    x25519_keypair,
    x25519_ok,
)

__all__ = [
    "Binding",
    "Credential",
    "KeyPackage",
    "KeyPackageSecret",
    "SigningIdentity",
    "check_credential",
    "decode_key_package",
    "make_key_package",
]

Binding = Literal["claim", "cnf", "tofu"]
#: Longest key-package lifetime (RFC 9420 section 16.8 advice; section 2.4).
MAX_KP_LIFETIME: Final = 3600.0
#: Clock skew tolerated on a key package's not-before.
KP_SKEW: Final = 5.0
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class SigningIdentity:
    """An app's long-lived Ed25519 key pair (persist :attr:`seed` with the app identity)."""

    __slots__ = ("_pk", "_sk")

    def __init__(self, seed: bytes) -> None:
        if type(seed) is not bytes or len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._pk, sk = sodium.crypto_sign_seed_keypair(seed)
        self._sk = bytearray(sk)

    @classmethod
    def generate(cls, rng: Rng = default_rng) -> SigningIdentity:
        return cls(rng(32))

    @property
    def public_key(self) -> bytes:
        return self._pk

    @property
    def seed(self) -> bytes:
        return bytes(self._sk[:32])

    def sign(self, label: str, data: bytes) -> bytes:
        """Ed25519 over ``label || data`` (labels separate the uses of one key)."""
        signed: bytes = sodium.crypto_sign(label.encode() + data, bytes(self._sk))
        return signed[:64]

    def pubkey_claim(self) -> dict[str, str]:
        """The token claim that binds this key: ``{"pubkey": <base64 of the public key>}``."""
        return {"pubkey": base64.b64encode(self._pk).decode()}

    def __repr__(self) -> str:
        return f"SigningIdentity({base64.b64encode(self._pk).decode()})"


@dataclass(frozen=True, slots=True)
class Credential:
    """A member's signing key ``spk`` bound to its identity token ``tok`` for ``sub``."""

    sub: str
    tok: str
    spk: bytes
    bind: Binding = "claim"

    def to_wire(self) -> dict[str, Any]:
        return {"sub": self.sub, "tok": self.tok, "spk": self.spk, "bind": self.bind}

    @classmethod
    def from_wire(cls, obj: object) -> Credential:
        d = as_map(obj, "cred")
        bind = d.get("bind", "claim")
        if bind not in ("claim", "cnf", "tofu"):
            raise E2EError("malformed", "cred.bind")
        return cls(as_str(d.get("sub"), "cred.sub", MAX_SUBJECT),
                   as_str(d.get("tok"), "cred.tok", MAX_TOKEN),
                   as_bin(d.get("spk"), "cred.spk", 32), bind)


def _key_from_claim(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _key_from_jwk(jwk: object) -> bytes | None:
    if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    x = jwk.get("x")
    if not isinstance(x, str) or not _B64URL.fullmatch(x) or len(x) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (binascii.Error, ValueError):
        return None


def check_credential(cred: Credential, verify: Callable[[str], Identity]) -> Credential:
    """Check that ``cred.tok`` verifies, names ``cred.sub`` and binds ``cred.spk``.

    The key is bound by a ``pubkey`` claim (base64, also under ``custom_claims``) or
    by ``cnf.jwk`` (RFC 7800, OKP Ed25519). A token with neither is accepted as
    trust-on-first-use: the returned credential says ``bind="tofu"``.

    :raises E2EError: ``binding`` when the token is refused, names another subject,
        or carries a key claim that is not ``cred.spk``.
    """
    try:
        ident = verify(cred.tok)
    except (AuthenticationError, ValueError) as exc:
        why = getattr(exc, "code", type(exc).__name__)
        raise E2EError("binding", f"token refused ({why})", sender=cred.sub) from exc
    if ident.subject != cred.sub:
        raise E2EError("binding", "the token names another subject", sender=cred.sub)
    claims = ident.claims
    bind: Binding | None = None
    pub = claims.get("pubkey")
    if pub is None and isinstance(claims.get("custom_claims"), Mapping):
        pub = claims["custom_claims"].get("pubkey")
    if pub is not None:
        if _key_from_claim(pub) != cred.spk:
            raise E2EError("binding", "pubkey claim does not match", sender=cred.sub)
        bind = "claim"
    cnf = claims.get("cnf")
    if cnf is not None:
        jwk = cnf.get("jwk") if isinstance(cnf, Mapping) else None
        if _key_from_jwk(jwk) != cred.spk:
            raise E2EError("binding", "cnf.jwk does not match", sender=cred.sub)
        bind = bind or "cnf"
    return Credential(cred.sub, cred.tok, cred.spk, bind or "tofu")


# -- key packages -----------------------------------------------------------------------


class KeyPackageSecret:
    """The private half of a key package: its one-time init key and first envelope key."""

    __slots__ = ("enc_pk", "enc_sk", "init_pk", "init_sk", "kid", "ref")

    def __init__(self, init_sk: bytearray, init_pk: bytes, enc_sk: bytearray, enc_pk: bytes,
                 kid: bytes, ref: bytes) -> None:
        self.init_sk: bytearray | None = init_sk
        self.init_pk = init_pk
        self.enc_sk: bytearray | None = enc_sk
        self.enc_pk = enc_pk
        self.kid = kid
        self.ref = ref

    @property
    def used(self) -> bool:
        return self.init_sk is None

    def take_enc(self) -> bytearray:
        """Hand the envelope key over to the group state (once)."""
        sk, self.enc_sk = self.enc_sk, None
        if sk is None:
            raise E2EError("bad_welcome", "key package already used")
        return sk

    def wipe(self) -> None:
        wipe(self.init_sk)
        wipe(self.enc_sk)
        self.init_sk = self.enc_sk = None


@dataclass(frozen=True, slots=True)
class KeyPackage:
    """A decoded key package whose signature verified (its credential is not yet checked)."""

    cred: Credential
    init: bytes
    enc: bytes
    nb: int
    na: int
    kid: bytes
    ref: bytes  # SHA-256 of the encoded key package


def make_key_package(identity: SigningIdentity, token: str, subject: str, now: float,
                     lifetime: float = MAX_KP_LIFETIME, *, bind: Binding = "claim",
                     rng: Rng = default_rng) -> tuple[bytes, KeyPackageSecret]:
    """A signed one-time key package for one invite, and its secret half."""
    if not 0 < lifetime <= MAX_KP_LIFETIME:
        raise ValueError(f"key package lifetime must be in (0, {MAX_KP_LIFETIME}]")
    init_sk, init_pk = x25519_keypair(rng)
    enc_sk, enc_pk = x25519_keypair(rng)
    kid = rng(16)
    cred = Credential(subject, token, identity.public_key, bind)
    tbs = canonical({"cred": cred.to_wire(), "init": init_pk, "enc": enc_pk,
                     "nb": int(now), "na": int(now + lifetime), "kid": kid})
    data = seal_signed("kp", tbs, identity.sign(LABEL_KP, tbs))
    return data, KeyPackageSecret(init_sk, init_pk, enc_sk, enc_pk, kid, sha256(data))


def decode_key_package(data: bytes) -> KeyPackage:
    """Decode a key package and check its self-signature.

    :raises E2EError: ``malformed``/``unsupported_version`` on a bad encoding,
        ``key_package`` on a bad signature or an unusable key.
    """
    tbs, sig = open_signed(data, "kp")
    # Self-signed: the key to check comes from the tbs, which is decoded first.
    d = as_map(unpack(tbs, "kp.tbs"), "kp.tbs")
    cred = Credential.from_wire(d.get("cred"))
    if not verify_signature(cred.spk, LABEL_KP, tbs, sig):
        raise E2EError("key_package", "bad signature", sender=cred.sub)
    init = as_bin(d.get("init"), "kp.init", 32)
    enc = as_bin(d.get("enc"), "kp.enc", 32)
    if not (x25519_ok(init) and x25519_ok(enc)):
        raise E2EError("key_package", "unusable X25519 key", sender=cred.sub)
    return KeyPackage(cred, init, enc, as_int(d.get("nb"), "kp.nb", 0, U64),
                      as_int(d.get("na"), "kp.na", 0, U64), as_bin(d.get("kid"), "kp.kid", 16),
                      sha256(bytes(data)))


def check_key_package_time(kp: KeyPackage, now: float) -> None:
    if kp.na <= kp.nb or kp.na - kp.nb > MAX_KP_LIFETIME:
        raise E2EError("key_package", "lifetime above 1 h", sender=kp.cred.sub)
    if now + KP_SKEW < kp.nb or now > kp.na:
        raise E2EError("key_package", "expired or not yet valid", sender=kp.cred.sub)
