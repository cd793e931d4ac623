# End-to-end encryption of one session (SLIM-GK v1 carried by the session's
# control flow). The session core calls in at each step: the join request
# names the group, the join reply carries a key package, the group update a
# commit, the welcome a Welcome; data bodies are GK application messages whose
# associated data is the routing header.
#
# Sans-IO like the session core: times come in as ``now``.
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from node_lite import Identity, Name

from ._e2e import E2EError, GroupState, KeyPackageSecret, SigningIdentity, make_key_package
from ._e2e_base import as_bin, as_map, open_signed, pack_uint, unpack
from ._e2e_identity import decode_key_package

__all__ = ["DecryptError", "Encryption", "SessionKeys", "aad_head", "aad_tail"]

#: Messages of a future epoch kept until its commit applies (section 2.12).
HOLD_MAX: Final = 256
HOLD_SECONDS: Final = 5.0
#: The moderator starts a new epoch from a fresh secret this often, and after
#: this many messages on the session (post-compromise security).
REFRESH_INTERVAL: Final = 3600.0
REFRESH_MESSAGES: Final = 10_000
KEY_PACKAGE_LIFETIME: Final = 600.0

Verify = Callable[[str], Identity]


def aad_head(src: list[Any], dst: list[Any], sid: int, st: int) -> bytes:
    """The part of :meth:`SessionKeys.aad` fixed for a flow (cached by the session)."""
    pack = msgpack.packb
    head: bytes = b"\x97" + pack(src) + pack(dst) + pack(sid) + pack(int(st))
    return head


def aad_tail(mid: int, payload_type: str | None,
             metadata: Mapping[str, str] | None) -> bytes:
    """The rest of :meth:`SessionKeys.aad`, per message."""
    if not payload_type and not metadata:
        return pack_uint(mid) + b"\xa0\x90"  # an empty string, an empty list
    pack = msgpack.packb
    tail: bytes = (pack_uint(mid) + (pack(payload_type) if payload_type else b"\xa0")
                   + (pack(sorted(metadata.items())) if metadata else b"\x90"))
    return tail


class DecryptError(E2EError):
    """A received message failed its end-to-end checks (``code`` says which).

    It takes the message's place in the session's order: ``get_message()``
    raises it, and the next call goes on with the next message.
    """

    def __init__(self, code: Any, message: str, *, source: Name, message_id: int,
                 session_id: int | None = None) -> None:
        super().__init__(code, f"message {message_id} from {source}: {message}",
                         session_id=session_id)
        self.source = source
        self.message_id = message_id


@dataclass(frozen=True, slots=True)
class Encryption:
    """A session's end-to-end encryption as this member sees it."""

    group_id: bytes
    epoch: int
    #: Equal at every member of the same epoch: compare it to check agreement.
    authenticator: bytes
    #: ``"signature"``: every message is signed by its sender; ``"group"``: AEAD only.
    sender_auth: str
    #: How each credential this member checked bound its key: ``claim``, ``cnf``
    #: or ``tofu`` (trust on first use: the token carried no key, a weaker binding).
    bindings: Mapping[str, str]


class SessionKeys:
    """The group keys of one session at one member, and messages waiting for them."""

    def __init__(self, identity: SigningIdentity, verify: Verify, *, sender_auth: str,
                 window: int, now: float) -> None:
        self.identity = identity
        self.verify = verify
        self.sender_auth = sender_auth
        # Reliable streams may reorder up to a window: keep that many skipped keys.
        self.max_skipped = min(4096, max(64, window))
        self.max_forward = min(100_000, max(1000, 2 * window))
        self.state: GroupState | None = None
        self.kp_secret: KeyPackageSecret | None = None
        self.group_id: bytes | None = None
        self.held: deque[tuple[float, dict[str, Any]]] = deque()
        self.messages = 0
        self.refreshed_at = now
        self.wiped = False

    # -- membership ----------------------------------------------------------------------

    def create(self, token: str, subject: str, now: float) -> None:
        """Moderator: a new group with this member alone."""
        self.state = GroupState.create(
            self.identity, token, subject, now,
            sender_auth="group" if self.sender_auth == "group" else "signature",
            max_forward=self.max_forward, max_skipped=self.max_skipped)
        self.group_id = self.state.group_id

    def join_body(self) -> dict[str, Any]:
        assert self.group_id is not None
        return {"g": self.group_id}

    def key_package(self, body: object, token: str, subject: str, now: float) -> bytes:
        """Invitee: a one-time key package for the group named in the join request."""
        if not isinstance(body, Mapping):
            raise E2EError("malformed", "join request: bad mls field")
        self.group_id = as_bin(body.get("g"), "join.mls.g", 16)
        data, secret = make_key_package(self.identity, token, subject, now,
                                        KEY_PACKAGE_LIFETIME)
        if self.kp_secret is not None:
            self.kp_secret.wipe()
        self.kp_secret = secret
        return data

    def add(self, key_package: object, subject: str, now: float) -> tuple[bytes | None, bytes]:
        """Moderator: (commit for the members, Welcome for the joiner)."""
        if type(key_package) is not bytes:
            raise E2EError("key_package", "the join reply carries no key package",
                           sender=subject)
        if decode_key_package(key_package).cred.sub != subject:
            raise E2EError("key_package", "key package of another identity", sender=subject)
        assert self.state is not None
        return self.state.add(key_package, self.verify, now)

    def welcome_is_ours(self, welcome: object) -> bool:
        """Whether a Welcome names our pending key package.

        A replayed Welcome of an earlier join names another one: it is ignored
        rather than refused, so it cannot end the join under way. An unreadable
        one (or any, without a pending key package) counts as ours and is refused.
        """
        secret = self.kp_secret
        if secret is None:
            return True
        try:
            tbs, _ = open_signed(welcome, "welcome")
            ref = as_map(unpack(tbs, "welcome.tbs"), "welcome.tbs").get("kp_ref")
        except E2EError:
            return True
        return ref == secret.ref

    def join(self, welcome: object, moderator: str, now: float) -> None:
        """Invitee: enter the group from the Welcome."""
        if type(welcome) is not bytes or self.kp_secret is None:
            raise E2EError("bad_welcome", "no Welcome or no key package")
        state = GroupState.join(welcome, self.kp_secret, self.identity, self.verify, now,
                                moderator=moderator)
        self.kp_secret = None
        if state.group_id != self.group_id:
            state.wipe()
            raise E2EError("bad_welcome", "Welcome of another group")
        self.state = state

    def subjects(self) -> set[str]:
        assert self.state is not None
        return {sub for sub, _ in self.state.roster}

    def info(self) -> Encryption | None:
        st = self.state
        if st is None or st.removed or self.wiped:
            return None
        bindings = {sub: b for sub, _ in st.roster if (b := st.binding(sub)) is not None}
        return Encryption(st.group_id, st.epoch, st.epoch_authenticator, st.sender_auth,
                          bindings)

    # -- data ----------------------------------------------------------------------------

    @staticmethod
    def aad(src: list[Any], dst: list[Any], sid: int, st: int, mid: int,
            payload_type: str | None, metadata: Mapping[str, str] | None) -> bytes:
        """The routing header a message's ciphertext is bound to (its logical destination):
        ``msgpack([src, dst, sid, st, mid, payload_type or "", sorted metadata items])``."""
        return aad_head(src, dst, sid, st) + aad_tail(mid, payload_type, metadata)

    def encrypt(self, payload: bytes, aad: bytes) -> bytes:
        assert self.state is not None
        if self.state.is_moderator:
            self.messages += 1
        return self.state.encrypt(payload, aad)

    def decrypt(self, body: object, aad: bytes, subject: str, now: float) -> bytes:
        """The plaintext of a member's message; raises E2EError."""
        state = self.state
        if state is None:
            raise E2EError("epoch_pending", "not in the group yet")
        if type(body) is not bytes:
            raise E2EError("malformed", "the body is not a GK message")
        plaintext, sender = state.decrypt(body, aad, now)
        if sender != subject:
            raise E2EError("bad_signature", f"sent by {sender!r}, labelled as {subject!r}",
                           sender=sender)
        if state.is_moderator:  # it counts the messages between refreshes
            self.messages += 1
        return plaintext

    def hold(self, d: dict[str, Any], now: float) -> bool:
        """Keep a message of a future epoch; False when the buffer is full."""
        if len(self.held) >= HOLD_MAX:
            return False
        self.held.append((now + HOLD_SECONDS, d))
        return True

    def take_held(self) -> list[dict[str, Any]]:
        out = [d for _, d in self.held]
        self.held.clear()
        return out

    def expired(self, now: float) -> list[dict[str, Any]]:
        out = []
        while self.held and self.held[0][0] <= now:
            out.append(self.held.popleft()[1])
        return out

    def timer(self) -> float | None:
        return self.held[0][0] if self.held else None

    def refresh_due(self, now: float) -> bool:
        return (now - self.refreshed_at >= REFRESH_INTERVAL
                or self.messages >= REFRESH_MESSAGES)

    def wipe(self) -> None:
        self.wiped = True
        if self.state is not None:
            self.state.wipe()
        if self.kp_secret is not None:
            self.kp_secret.wipe()
            self.kp_secret = None
        self.held.clear()
