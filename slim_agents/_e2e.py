# SLIM-GK v1 group keys (sans-IO): one member's view of one group's epochs,
# membership commits (moderator), welcomes, and application messages with a
# per-sender hash ratchet. Design: security-reliability.md section 2.
#
# Nothing here reads a clock, touches a socket or keeps a task: times come in
# as ``now`` and every output is bytes for the caller to send.
#
# Secrets are kept in bytearrays and overwritten when an epoch or a key is
# dropped; Python cannot guarantee erasure (copies in bytes objects, PyNaCl
# arguments and the allocator), so deletion-based forward secrecy is best effort.
from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Final, Literal

from node_lite import Identity

from ._e2e_base import (
    E2E_CODES,
    LABEL_KUPD,
    MAX_ROSTER,
    PREFIX,
    U32,
    U64,
    E2ECode,
    E2EError,
    EpochSecrets,
    Rng,
    as_bin,
    as_bool,
    as_int,
    as_map,
    canonical,
    confirmation_tag,
    default_rng,
    epoch_context,
    expand,
    extract,
    key_schedule,
    open_signed,
    seal_open,
    seal_signed,
    sender_roots,
    sha256,
    unpack,
    verify_signature,
    wipe,
    x25519_keypair,
    x25519_ok,
)
from ._e2e_commit import (
    INLINE_ENVELOPES,
    BuiltCommit,
    Envelope,
    bad_commit,
    bad_welcome,
    build_commit,
    build_welcome,
    commit_transcript,
    inline_envelope,
    open_commit,
    open_envelope,
    open_welcome,
)
from ._e2e_epoch import (
    AppLayout,
    Chain,
    Epoch,
    Member,
    Roster,
    app_fields,
    next_roster,
    open_app,
    open_next,
    roster_digest,
    seal_next,
)
from ._e2e_identity import (
    Binding,
    Credential,
    KeyPackage,
    KeyPackageSecret,
    SigningIdentity,
    check_credential,
    check_key_package_time,
    decode_key_package,
    make_key_package,
)
from ._errors import NotModeratorError

__all__ = [
    "E2E_CODES",
    "INLINE_ENVELOPES",
    "Credential",
    "E2ECode",
    "E2EError",
    "GroupState",
    "KeyPackage",
    "KeyPackageSecret",
    "SigningIdentity",
    "check_credential",
    "decode_key_package",
    "make_key_package",
]

SenderAuth = Literal["signature", "group"]
#: Commits that arrive early are kept until the gap closes, at most this far ahead.
MAX_EARLY_COMMITS: Final = 16
MAX_FORWARD: Final = 1000
MAX_SKIPPED: Final = 64
PAST_EPOCH_TTL: Final = 60.0
#: Past epochs whose receive keys are kept (within the TTL): retransmissions of
#: messages sent before a few quick membership changes still open.
MAX_PAST_EPOCHS: Final = 4
#: Pending envelope-key updates a member keeps (the moderator commits the latest).
_MAX_PENDING_KEYS: Final = 4
Verify = Callable[[str], Identity]


class GroupState:
    """One member's view of one group's keys (SLIM-GK v1).

    Build it with :meth:`create` (the moderator) or :meth:`join` (a member with a
    Welcome). The moderator alone commits: :meth:`add`, :meth:`remove` and
    :meth:`refresh` return the bytes to send and advance its own state at once;
    members apply them with :meth:`apply_commit`.
    """

    def __init__(self, identity: SigningIdentity, *, group_id: bytes, leaf: int,
                 moderator_spk: bytes, sender_auth: SenderAuth, rng: Rng,
                 max_forward: int = MAX_FORWARD, max_skipped: int = MAX_SKIPPED,
                 past_epoch_ttl: float = PAST_EPOCH_TTL) -> None:
        """Internal: use :meth:`create` or :meth:`join`."""
        self._identity = identity
        self._group_id = group_id
        self._leaf = leaf
        self._mod_spk = moderator_spk
        self.sender_auth: SenderAuth = sender_auth
        self._rng = rng
        self.max_forward = max_forward
        self.max_skipped = max_skipped
        self.past_epoch_ttl = past_epoch_ttl
        self._cur: Epoch | None = None
        self._past: list[Epoch] = []  # oldest first
        self._send = Chain(bytearray(32))
        self._by_sub: dict[str, int] = {}
        self._init_secret = bytearray(32)
        self._exporter = bytearray(32)
        self._th = b""
        self._cid = 0
        self._enc_sk = bytearray(32)
        self._enc_pending: dict[bytes, bytearray] = {}
        self._early: dict[int, tuple[bytes, dict[str, Any]]] = {}
        self._envelopes: dict[int, Envelope] = {}
        self._removed = False
        self._bindings: dict[str, Binding] = {}
        # Moderator only.
        self._token: str | None = None
        self._used_kids: dict[bytes, int] = {}
        self._updates: dict[int, bytes] = {}

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, identity: SigningIdentity, token: str, subject: str, now: float, *,
               group_id: bytes | None = None, sender_auth: SenderAuth = "signature",
               rng: Rng = default_rng, max_forward: int = MAX_FORWARD,
               max_skipped: int = MAX_SKIPPED,
               past_epoch_ttl: float = PAST_EPOCH_TTL) -> GroupState:
        """A new group at epoch 0 whose only member is its moderator (leaf 0)."""
        gid = rng(16) if group_id is None else group_id
        if type(gid) is not bytes or len(gid) != 16:
            raise ValueError("a group id is 16 bytes")
        if sender_auth not in ("signature", "group"):
            raise ValueError(f"unknown sender_auth {sender_auth!r}")
        if not (1 <= max_forward <= 100_000 and 0 <= max_skipped <= 4096
                and 0 <= past_epoch_ttl <= 3600):
            raise ValueError("max_forward, max_skipped or past_epoch_ttl out of range")
        st = cls(identity, group_id=gid, leaf=0, moderator_spk=identity.public_key,
                 sender_auth=sender_auth, rng=rng, max_forward=max_forward,
                 max_skipped=max_skipped, past_epoch_ttl=past_epoch_ttl)
        st._token = token
        st._enc_sk, enc_pk = x25519_keypair(rng)
        roster = {0: Member(subject, identity.public_key, enc_pk)}
        th = sha256(canonical([PREFIX + "/group", gid, identity.public_key]))
        secret = bytearray(rng(32))
        secrets = key_schedule(extract(bytes(32), secret),
                               epoch_context(gid, 0, roster_digest(roster), th))
        wipe(secret)
        st._install(0, roster, secrets, th, now)
        return st

    @classmethod
    def join(cls, welcome: bytes, kp_secret: KeyPackageSecret, identity: SigningIdentity,
             verify: Verify, now: float, *, moderator: str | None = None,
             rng: Rng = default_rng) -> GroupState:
        """Enter a group from a Welcome sealed to ``kp_secret``'s init key.

        The init private key is wiped once the Welcome is accepted, so it cannot be
        opened twice. ``moderator``, when given, is the subject that must have sent it.

        :raises E2EError: ``bad_welcome`` (wrong key package, cannot open, bad
            signature or confirmation), ``binding`` (moderator credential), ``malformed``.
        """
        w = open_welcome(welcome, kp_secret, identity)
        mod = w.roster[0]
        if moderator is not None and mod.sub != moderator:
            w.secrets.wipe()
            raise bad_welcome(f"sent by {mod.sub!r}, not the moderator {moderator!r}")
        try:
            cred = check_credential(Credential(mod.sub, w.mod_tok, w.mod_spk), verify)
            auth = w.settings.get("auth", "signature")
            if auth not in ("signature", "group"):
                raise E2EError("malformed", "welcome.settings.auth")
            st = cls(identity, group_id=w.group_id, leaf=w.leaf, moderator_spk=w.mod_spk,
                     sender_auth=auth, rng=rng,
                     max_forward=as_int(w.settings.get("fwd", MAX_FORWARD), "fwd", 1, 100_000),
                     max_skipped=as_int(w.settings.get("ooo", MAX_SKIPPED), "ooo", 0, 4096),
                     past_epoch_ttl=float(as_int(w.settings.get("past_s", int(PAST_EPOCH_TTL)),
                                                 "past_s", 0, 3600)))
        except E2EError:
            w.secrets.wipe()
            raise
        st._enc_sk = kp_secret.take_enc()
        st._bindings[mod.sub] = cred.bind
        st._cid = w.cid
        st._install(w.epoch, w.roster, w.secrets, w.th, now)
        kp_secret.wipe()  # the init private key: a second Welcome cannot be opened
        return st

    # -- state -----------------------------------------------------------------------------

    @property
    def _epoch(self) -> Epoch:
        if self._cur is None:
            raise E2EError("not_member", "removed from the group")
        return self._cur

    @property
    def group_id(self) -> bytes:
        return self._group_id

    @property
    def epoch(self) -> int:
        return self._epoch.number

    @property
    def epoch_authenticator(self) -> bytes:
        """16 bytes that every member of this epoch shares (compare them in acks)."""
        return self._epoch.auth

    @property
    def commit_id(self) -> int:
        return self._cid

    @property
    def leaf(self) -> int:
        return self._leaf

    @property
    def subject(self) -> str:
        return self._epoch.roster[self._leaf].sub

    @property
    def moderator(self) -> str:
        return self._epoch.roster[0].sub

    @property
    def is_moderator(self) -> bool:
        return self._token is not None

    @property
    def removed(self) -> bool:
        """True once this member applied the commit that removes it (its keys are wiped)."""
        return self._removed

    @property
    def roster(self) -> list[tuple[str, bytes]]:
        """(subject, signing key) of each member, by leaf."""
        return [(m.sub, m.spk) for _, m in sorted(self._epoch.roster.items())]

    @property
    def missing_envelope(self) -> int | None:
        """Id of the next commit held back until its per-recipient envelope arrives."""
        cid = self._cid + 1
        nxt = self._early.get(cid)
        if nxt is None or nxt[1].get("env_root") is None or cid in self._envelopes:
            return None
        return cid

    def leaf_of(self, subject: str) -> int:
        leaf = self._by_sub.get(subject)
        if leaf is None:
            raise E2EError("not_member", f"{subject!r} is not in the group", sender=subject)
        return leaf

    def binding(self, subject: str) -> Binding | None:
        """How ``subject``'s signing key was bound to its token, where this member checked it."""
        return self._bindings.get(subject)

    def export(self, label: str, context: bytes, length: int = 32) -> bytes:
        """A secret of this epoch for another use (MLS exporter)."""
        return expand(expand(self._exporter, "exported", label.encode(), 32), "exporter",
                      context, length)

    def expire(self, now: float) -> None:
        """Drop past epochs' keys once their time is up (also done lazily)."""
        while self._past and now > self._past[0].expires:
            self._past.pop(0).wipe()

    def wipe(self) -> None:
        """Forget every key (session closed). The state is unusable afterwards."""
        for e in (self._cur, *self._past):
            if e is not None:
                e.wipe()
        self._cur = None
        self._past = []
        self._send.wipe()
        for s in (self._init_secret, self._exporter, self._enc_sk, *self._enc_pending.values()):
            wipe(s)
        self._enc_pending.clear()
        self._early.clear()
        self._envelopes.clear()

    def _install(self, number: int, roster: Roster, secrets: EpochSecrets,
                 th: bytes, now: float) -> None:
        epoch = Epoch(number, roster, sender_roots(secrets.enc_secret, roster),
                      secrets.authenticator)
        send = epoch.take(self._leaf)
        send.layout = AppLayout(self._group_id, number, self._leaf)
        self.expire(now)
        old = self._cur
        if old is not None:
            if self.past_epoch_ttl > 0:
                old.expires = now + self.past_epoch_ttl
                self._past.append(old)
                while len(self._past) > MAX_PAST_EPOCHS:
                    self._past.pop(0).wipe()
            else:
                old.wipe()
        self._send.wipe()
        self._send = send
        self._cur = epoch
        self._by_sub = {m.sub: leaf for leaf, m in roster.items()}
        wipe(self._init_secret)
        wipe(self._exporter)
        self._init_secret = secrets.init_secret
        self._exporter = secrets.exporter_secret
        for s in (secrets.epoch_secret, secrets.enc_secret, secrets.confirm_key):
            wipe(s)
        self._th = th

    # -- moderator: commits ----------------------------------------------------------------

    def _require_moderator(self) -> str:
        if self._token is None:
            raise NotModeratorError("only the moderator commits membership changes")
        return self._token

    def add(self, key_package: bytes, verify: Verify, now: float, *,
            token: str | None = None) -> tuple[bytes | None, bytes]:
        """Add the owner of ``key_package``: (commit for the members, Welcome for the joiner).

        The commit is ``None`` when the moderator was alone. Send the commit, collect
        every member's ack, then send the Welcome. ``token`` replaces the moderator's
        identity token that the Welcome carries (pass a fresh one when it expires).

        :raises E2EError: ``key_package`` (bad signature, expired, reused, already a
            member), ``binding`` (credential), ``malformed``.
        """
        stored = self._require_moderator()  # before taking a token: members never commit
        self._token = mod_tok = token or stored
        kp = decode_key_package(key_package)
        check_key_package_time(kp, now)
        self._used_kids = {k: na for k, na in self._used_kids.items() if na >= now}
        if kp.kid in self._used_kids:
            raise E2EError("key_package", "key package already used", sender=kp.cred.sub)
        cred = check_credential(kp.cred, verify)
        cur = self._epoch.roster
        if cred.sub in self._by_sub:
            raise E2EError("key_package", f"{cred.sub!r} is already a member", sender=cred.sub)
        if len(cur) >= MAX_ROSTER:
            raise E2EError("key_package", "the group is full", sender=cred.sub)
        self._used_kids[kp.kid] = kp.na
        leaf = next(i for i in range(len(cur) + 1) if i not in cur)
        roster = dict(cur)
        roster[leaf] = Member(cred.sub, cred.spk, kp.enc)
        diff = {"add": [[leaf, cred.sub, cred.spk, kp.enc]], "rm": [], "upd": []}
        alone = len(cur) == 1
        built = self._commit("add", cred.sub, diff, roster, now, fresh=False)
        self._bindings[cred.sub] = cred.bind
        settings = {"auth": self.sender_auth, "fwd": self.max_forward, "ooo": self.max_skipped,
                    "past": MAX_PAST_EPOCHS, "past_s": int(self.past_epoch_ttl)}
        welcome = build_welcome(self._identity, kp, group_id=self._group_id, epoch=self.epoch,
                                cid=self._cid, leaf=leaf, roster=roster, joiner=built.joiner,
                                th=built.th, conf=built.conf, mod_tok=mod_tok,
                                settings=settings, rng=self._rng)
        wipe(built.joiner)
        return (None if alone else built.commit), welcome

    def remove(self, subject_or_leaf: str | int, now: float) -> tuple[bytes, dict[str, bytes]]:
        """Remove a member with a fresh secret sealed to every remaining member.

        Returns the commit and, above 64 remaining members, one envelope per member
        (subject -> bytes, each to be sent to that member only); else an empty dict.
        """
        self._require_moderator()
        leaf = subject_or_leaf if isinstance(subject_or_leaf, int) else self.leaf_of(
            subject_or_leaf)
        roster = dict(self._epoch.roster)
        if leaf == self._leaf:
            raise ValueError("the moderator cannot remove itself")
        gone = roster.pop(leaf, None)
        if gone is None:
            raise E2EError("not_member", f"no member at leaf {leaf}")
        self._updates.pop(leaf, None)
        diff = {"add": [], "rm": [leaf], "upd": self._take_updates(roster)}
        built = self._commit("remove", gone.sub, diff, roster, now, fresh=True)
        wipe(built.joiner)
        self._bindings.pop(gone.sub, None)
        return built.commit, built.envelopes

    def refresh(self, now: float) -> tuple[bytes, dict[str, bytes]]:
        """A new epoch from a fresh secret (post-compromise security), with the envelope
        keys of received key updates; returns like :meth:`remove`."""
        self._require_moderator()
        roster = dict(self._epoch.roster)
        diff = {"add": [], "rm": [], "upd": self._take_updates(roster)}
        built = self._commit("refresh", None, diff, roster, now, fresh=True)
        wipe(built.joiner)
        return built.commit, built.envelopes

    def _take_updates(self, roster: Roster) -> list[list[Any]]:
        upd = []
        for leaf, pk in sorted(self._updates.items()):
            m = roster.get(leaf)
            if m is not None:
                roster[leaf] = Member(m.sub, m.spk, pk)
                upd.append([leaf, pk])
        self._updates.clear()
        return upd

    def _commit(self, op: str, target: str | None, diff: dict[str, Any], roster: Roster,
                now: float, *, fresh: bool) -> BuiltCommit:
        cid = self._cid + 1
        if cid > U32:
            raise ValueError("commit ids exhausted: re-create the group")
        built = build_commit(self._identity, group_id=self._group_id, cid=cid, epoch=self.epoch,
                             th_prev=self._th, init_secret=self._init_secret, roster=roster,
                             own_leaf=self._leaf, op=op, target=target, diff=diff, fresh=fresh,
                             rng=self._rng)
        self._cid = cid
        self._install(self.epoch + 1, roster, built.secrets, built.th, now)
        return built

    def receive_key_update(self, update: bytes, now: float) -> bool:
        """Moderator: record a member's new envelope key for the next remove or refresh.

        :returns: whether the member suspects a compromise (refresh right away then).
        :raises E2EError: ``not_member``, ``bad_signature``, ``stale_epoch``, ``malformed``.
        """
        self._require_moderator()
        tbs, sig = open_signed(update, "kupd")
        d = as_map(unpack(tbs, "kupd.tbs"), "kupd.tbs")
        leaf = as_int(d.get("leaf"), "kupd.leaf")
        m = self._epoch.roster.get(leaf)
        if m is None or leaf == self._leaf:
            raise E2EError("not_member", f"no member at leaf {leaf}")
        if not verify_signature(m.spk, LABEL_KUPD, tbs, sig):
            raise E2EError("bad_signature", "key update", sender=m.sub)
        if as_bin(d.get("g"), "kupd.g", 16) != self._group_id:
            raise E2EError("malformed", "key update for another group", sender=m.sub)
        if not self.epoch - 1 <= as_int(d.get("e"), "kupd.e", 0, U64) <= self.epoch:
            raise E2EError("stale_epoch", "key update", sender=m.sub)
        pk = as_bin(d.get("enc_pk"), "kupd.enc_pk", 32)
        if not x25519_ok(pk):
            raise E2EError("malformed", "unusable X25519 key", sender=m.sub)
        self._updates[leaf] = pk
        return as_bool(d.get("suspect", False), "kupd.suspect")

    # -- members: updates and commits --------------------------------------------------------

    def key_update(self, *, suspect: bool = False) -> bytes:
        """Member: a signed new envelope key for the moderator (section 2.6 ``kupd``).

        The new private key replaces the old one when a commit carrying it applies.
        """
        sk, pk = x25519_keypair(self._rng)
        while len(self._enc_pending) >= _MAX_PENDING_KEYS:
            wipe(self._enc_pending.pop(next(iter(self._enc_pending))))
        self._enc_pending[pk] = sk
        tbs = canonical({"g": self._group_id, "e": self.epoch, "leaf": self._leaf,
                         "enc_pk": pk, "suspect": suspect})
        return seal_signed("kupd", tbs, self._identity.sign(LABEL_KUPD, tbs))

    def apply_commit(self, commit: bytes, now: float, envelope: bytes | None = None) -> None:
        """Apply a moderator commit (and this member's envelope, if sent apart).

        Commits apply in ``cid`` order: an old one is ignored, an early one is kept
        (up to 16) until the gap closes; one that needs a per-recipient envelope waits
        for it (:attr:`missing_envelope`, :meth:`apply_envelope`). A member removed by
        the commit ends with :attr:`removed` set and its keys wiped.

        :raises E2EError: ``bad_commit`` (signature, epoch, roster, tag, envelope, gap,
            or a signed commit that is malformed): the state stays at its epoch.
            ``malformed``/``unsupported_version`` when the bytes are not a commit.
        """
        if self._removed:
            raise E2EError("not_member", "removed from the group")
        if envelope is not None:
            self._take_envelope(envelope)
        tbs, d, cid = open_commit(commit, self._mod_spk, self._group_id)
        if cid <= self._cid:
            return
        if self._token is not None or cid > self._cid + MAX_EARLY_COMMITS:
            raise bad_commit(f"commit {cid} too far ahead of {self._cid}")
        self._early[cid] = (tbs, d)
        self._drain(now)

    def apply_envelope(self, envelope: bytes, now: float) -> None:
        """Member: a per-recipient envelope that arrived apart from its commit."""
        if self._removed:
            raise E2EError("not_member", "removed from the group")
        self._take_envelope(envelope)
        self._drain(now)

    def _take_envelope(self, envelope: bytes) -> None:
        env = open_envelope(envelope, self._mod_spk, self._group_id, self._leaf)
        if env.cid <= self._cid:
            return
        if env.cid > self._cid + MAX_EARLY_COMMITS:
            raise bad_commit(f"envelope {env.cid} too far ahead of {self._cid}")
        self._envelopes[env.cid] = env

    def _drain(self, now: float) -> None:
        while not self._removed and (item := self._early.get(self._cid + 1)) is not None:
            try:
                applied = self._apply(item[0], item[1], now)
            except E2EError as exc:
                self._early.pop(self._cid + 1, None)
                if exc.code != "bad_commit":  # signed by the moderator yet unusable
                    raise bad_commit(str(exc)) from exc
                raise
            if not applied:
                return
            self._early.pop(self._cid, None)

    def _apply(self, tbs: bytes, d: dict[str, Any], now: float) -> bool:
        """Apply commit ``_cid + 1``; False when it waits for an envelope. All checks come
        before any state changes."""
        cid = self._cid + 1
        op = d.get("op")
        if op not in ("add", "remove", "refresh"):
            raise bad_commit(f"unknown op {op!r}")
        e_to = as_int(d.get("e_to"), "commit.e_to", 0, U64)
        if as_int(d.get("e_from"), "commit.e_from", 0, U64) != self.epoch or e_to != self.epoch + 1:
            raise bad_commit("not from our epoch")
        if as_bin(d.get("th_prev"), "commit.th_prev", 32) != self._th:
            raise bad_commit("transcript differs")
        roster, gone = next_roster(self._epoch.roster, op, d.get("target"),
                                  as_map(d.get("diff"), "commit.diff"))
        rh = roster_digest(roster)
        if as_bin(d.get("roster_hash"), "commit.roster_hash", 32) != rh:
            raise bad_commit("roster hash differs")
        if self._leaf in gone:
            self._leave()
            return True
        sk: bytearray | None = None
        if op == "add":
            secret = bytes(32)
        else:
            sealed = self._my_envelope(d, tbs, cid, e_to)
            if sealed is None:
                return False
            pk = roster[self._leaf].enc_pk
            old_pk = self._epoch.roster[self._leaf].enc_pk
            sk = self._enc_sk if pk == old_pk else self._enc_pending.get(pk)
            opened = None if sk is None else seal_open(sealed, pk, sk)
            if opened is None or len(opened) != 32:
                raise bad_commit("cannot open our envelope")
            secret = opened
        conf = as_bin(d.get("conf"), "commit.conf", 32)
        th = commit_transcript(self._th, d)
        joiner = bytearray(extract(self._init_secret, secret))
        secrets = key_schedule(joiner, epoch_context(self._group_id, e_to, rh, th))
        wipe(joiner)
        if not hmac.compare_digest(confirmation_tag(secrets.confirm_key, th), conf):
            secrets.wipe()
            raise bad_commit("confirmation tag")
        if sk is not None and sk is not self._enc_sk:
            wipe(self._enc_sk)
            self._enc_sk = self._enc_pending.pop(roster[self._leaf].enc_pk)
        self._envelopes.pop(cid, None)
        self._cid = cid
        self._install(e_to, roster, secrets, th, now)
        return True

    def _my_envelope(self, d: dict[str, Any], tbs: bytes, cid: int, e_to: int) -> bytes | None:
        if d.get("env") is not None:
            return inline_envelope(d["env"], self._leaf)
        if d.get("env_root") is None:
            raise bad_commit("no envelopes")
        got = self._envelopes.get(cid)
        if got is None:
            return None
        if got.e_to != e_to or got.commit_hash != sha256(tbs):
            raise bad_commit("envelope of another commit")
        return got.sealed

    def _leave(self) -> None:
        self.wipe()
        self._removed = True

    # -- application messages ----------------------------------------------------------------

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt (and sign) one message of this member in the current epoch.

        ``aad`` is the canonical routing header; it is bound with the group id, epoch,
        sender leaf and generation. A retransmission resends the returned bytes: never
        encrypt the same content again under a new generation.
        """
        return seal_next(self._send, self._identity if self.sender_auth == "signature" else None,
                         plaintext, aad, self._rng)

    def decrypt(self, ciphertext: bytes, aad: bytes, now: float) -> tuple[bytes, str]:
        """Decrypt and authenticate one message: (plaintext, sender subject).

        Checks run cheapest first: group and epoch, sender, generation window, AEAD
        tag, then the signature. A message that fails moves no window and deletes no key.

        :raises E2EError: see section 2.12; ``epoch_pending`` asks the caller to keep
            the message until the next commit applies.
        """
        signed = self.sender_auth == "signature"
        cur = self._cur
        if cur is not None:
            hit = open_next(cur, ciphertext, aad, self._group_id, signed)
            if hit is not None:
                return hit[0], hit[1].sub
        h = app_fields(ciphertext)
        group_id, e, leaf = h[0], h[1], h[2]
        if group_id != self._group_id:
            raise E2EError("malformed", "app message of another group")
        ep = self._epoch_of(e, now)
        m = ep.roster.get(leaf)
        if m is None:
            raise E2EError("not_member", f"no member at leaf {leaf}")
        if ep is not cur:
            # A member removed since that epoch must not keep talking in it.
            by_sub = self._by_sub.get(m.sub)
            if by_sub is None or self._epoch.roster[by_sub].spk != m.spk:
                raise E2EError("not_member", "sender left the group", sender=m.sub)
        if leaf == self._leaf:
            raise E2EError("replay", "our own message", sender=m.sub)
        body = open_app(ep.chain(leaf), m, h, aad, signed=signed,
                        max_forward=self.max_forward, max_skipped=self.max_skipped)
        return body, m.sub

    def _epoch_of(self, e: int, now: float) -> Epoch:
        cur = self._epoch
        if e == cur.number:
            return cur
        if e > cur.number:
            raise E2EError("epoch_pending", f"epoch {e}, ours is {cur.number}")
        self.expire(now)
        for past in self._past:
            if past.number == e:
                return past
        raise E2EError("stale_epoch", f"epoch {e}, ours is {cur.number}")
