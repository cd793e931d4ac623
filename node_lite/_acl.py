# Who may subscribe to which name (sans-IO), and moderated channels.
#
# Subscribe ACL: rules select identities by subject glob; each lists allow
# and deny name patterns: "org/ns/app" (one glob per component, or the
# placeholders {org} {ns} {app} for the connection's own components) matches
# names without an instance id (channels, services); "org/ns/app/*" also
# matches full names (another app's unicast address). A deny that matches
# wins; otherwise the allow patterns of the matching rules decide; with no
# matching allow list, the ACL's default patterns decide. A connection may
# always subscribe to its own names (full name, own service).
#
# Moderated channels: a moderator claims a channel with its Ed25519 public
# key (a subscribe carrying `claim`); from then on, while the channel has
# subscribers on this node, a subscribe needs a grant signed by that key for
# exactly (channel, member full name), unexpired. Channels matching the
# configured `moderated` patterns accept no subscriber before a claim.
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import msgpack
import nacl.exceptions
import nacl.signing

from ._errors import ConfigError
from ._names import Name
from .wire import MAX_GRANT_SIZE

#: Domain separation for the bytes a moderator signs in a grant.
GRANT_CONTEXT = "slim-grant/1"
# Tolerated clock difference on a grant's expiry.
GRANT_CLOCK_SKEW = 5.0
_PLACEHOLDERS = ("{org}", "{ns}", "{app}")


def _check_pattern(pattern: object, where: str) -> tuple[str, str, str, bool]:
    """(org, ns, app globs, whether full names with an instance id match too)."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: a name pattern is a string such as 'org/ns/*'")
    parts = pattern.split("/")
    if len(parts) not in (3, 4) or not all(parts) or (len(parts) == 4 and parts[3] != "*"):
        raise ConfigError(f"{where}: expected 'org/ns/app' or 'org/ns/app/*' with globs, "
                          f"got {pattern!r}")
    return parts[0], parts[1], parts[2], len(parts) == 4


def _patterns(values: object, where: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, tuple | list):
        raise ConfigError(f"{where}: expected a list of name patterns")
    for i, p in enumerate(values):
        _check_pattern(p, f"{where}[{i}]")
    return tuple(values)


@dataclass(frozen=True, kw_only=True, slots=True)
class AclRule:
    """Subscribe permissions of the identities whose token subject matches ``subjects``."""

    subjects: tuple[str, ...] = ("*",)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.subjects, str) or not all(isinstance(s, str) and s
                                                     for s in self.subjects):
            raise ConfigError("acl rule subjects: expected a list of subject globs")
        object.__setattr__(self, "subjects", tuple(self.subjects))
        object.__setattr__(self, "allow", _patterns(self.allow, "acl rule allow"))
        object.__setattr__(self, "deny", _patterns(self.deny, "acl rule deny"))


@dataclass(frozen=True, kw_only=True, slots=True)
class SubscribeAcl:
    """Subscription policy of a node.

    :param rules: per-identity allow and deny lists (deny wins).
    :param default: patterns allowed when no matching rule has an allow list.
        The default ``("*/*/*/*",)`` allows everything (the node's behaviour
        before ACLs); ``("{org}/{ns}/*",)`` allows the channels of the
        identity's own namespace (and its own names).
    :param moderated: channels that need a moderator's claim and grants.
    """

    rules: tuple[AclRule, ...] = ()
    default: tuple[str, ...] = ("*/*/*/*",)
    moderated: tuple[str, ...] = ()
    _split: dict[str, tuple[str, str, str, bool]] = field(default_factory=dict, init=False,
                                                    repr=False, compare=False)

    def __post_init__(self) -> None:
        if not all(isinstance(r, AclRule) for r in self.rules):
            raise ConfigError("acl rules must be AclRule values")
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "default", _patterns(self.default, "acl default"))
        object.__setattr__(self, "moderated", _patterns(self.moderated, "acl moderated"))
        for p in (*self.default, *self.moderated,
                  *(q for r in self.rules for q in (*r.allow, *r.deny))):
            self._split[p] = _check_pattern(p, "acl")

    @property
    def is_open(self) -> bool:
        """Whether every subscription is allowed (nothing to check)."""
        return not self.rules and not self.moderated and "*/*/*/*" in self.default

    def _match(self, pattern: str, own: Name | None, name: Name) -> bool:
        *parts, full = self._split[pattern]
        if name.id is not None and not full:
            return False
        for part, value, mine in zip(parts, name.service,
                                     own.service if own else ("", "", ""), strict=True):
            if part in _PLACEHOLDERS:
                if own is None or value != mine:
                    return False
            elif part != "*" and not fnmatchcase(value, part):
                return False
        return True

    def allows(self, subject: str, own: Name | None, name: Name) -> bool:
        """Whether the identity ``subject`` connected as ``own`` may subscribe to ``name``."""
        if own is not None and name.service == own.service and name.id in (None, own.id):
            return True
        rules = [r for r in self.rules if any(fnmatchcase(subject, s) for s in r.subjects)]
        if any(self._match(p, own, name) for r in rules for p in r.deny):
            return False
        allow = [p for r in rules for p in r.allow]
        return any(self._match(p, own, name) for p in (allow or self.default))

    def is_moderated(self, name: Name) -> bool:
        return any(self._match(p, None, name) for p in self.moderated)


def _grant_body(channel: Name, member: Name, expires: int) -> bytes:
    body: bytes = msgpack.packb([GRANT_CONTEXT, channel.to_wire(), member.to_wire(), expires],
                                use_bin_type=True)
    return body


class ChannelModerator:
    """A moderator key: claims channels at a node and signs grants for members.

    :param seed: the 32-byte Ed25519 seed; random when omitted.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        self._key = nacl.signing.SigningKey(seed if seed is not None else os.urandom(32))

    @property
    def public_key(self) -> bytes:
        """The claim to send with the moderator's own subscribe (``Subscribe.claim``)."""
        return bytes(self._key.verify_key)

    def grant(self, channel: Name, member: Name, *, ttl: float = 3600.0,
              now: float | None = None) -> bytes:
        """A grant letting ``member`` (a full name) subscribe to ``channel`` until now + ttl."""
        if member.id is None:
            raise ValueError("a grant names a member's full name (with its instance id)")
        expires = int((time.time() if now is None else now) + ttl)
        return bytes(self._key.sign(_grant_body(channel, member, expires)))


def check_grant(public_key: bytes, grant: bytes, channel: Name, member: Name,
                now: float) -> str | None:
    """Why ``grant`` does not let ``member`` subscribe to ``channel`` (``None`` if it does)."""
    if len(grant) > MAX_GRANT_SIZE:
        return "grant too large"
    try:
        body = nacl.signing.VerifyKey(public_key).verify(grant)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError,
            TypeError):
        return "grant signature does not verify"
    try:
        context, chan, who, expires = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # signed by the moderator, but not a grant we understand
        return "grant is malformed"
    if context != GRANT_CONTEXT or chan != channel.to_wire() or who != member.to_wire():
        return "grant is for another channel or member"
    if type(expires) is not int or expires + GRANT_CLOCK_SKEW < now:
        return "grant expired"
    return None
