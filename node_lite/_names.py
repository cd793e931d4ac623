# Hierarchical names: three string components and an optional 64-bit instance
# id. ``id is None`` is the wildcard: anycast to a service, or a channel.
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Upstream prints the wildcard id as all ones; it is never a real instance id.
WILDCARD_ID = 0xFFFF_FFFF_FFFF_FFFF
MAX_ID = WILDCARD_ID - 1


@dataclass(frozen=True, slots=True)
class Name:
    """A SLIM name ``org/ns/app`` with an optional instance id.

    Names compare and hash on all four components; use :meth:`without_id`
    or :meth:`same_service` to compare services.
    """

    org: str
    ns: str
    app: str
    id: int | None = None
    # Names key the sets and maps of every message's path: hash once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for part in (self.org, self.ns, self.app):
            if not isinstance(part, str) or not part or "/" in part or part != part.strip():
                raise ValueError(f"invalid name component {part!r}")
        if self.id is not None and (
            type(self.id) is not int or not 0 <= self.id <= MAX_ID
        ):
            raise ValueError(f"invalid instance id {self.id!r}")
        object.__setattr__(self, "_hash", hash((self.org, self.ns, self.app, self.id)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Name], tuple[str, str, str, int | None]]:
        # String hashes differ between processes: a copy hashes afresh.
        return (Name, (self.org, self.ns, self.app, self.id))

    @classmethod
    def parse(cls, text: str) -> Name:
        """Parse ``org/ns/app`` or ``org/ns/app/<decimal id>``.

        :raises ValueError: on any other shape.
        """
        parts = text.strip().split("/")
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2])
        if len(parts) == 4:
            raw = parts[3]
            if raw.lower() in ("ffffffffffffffff", "*"):
                return cls(parts[0], parts[1], parts[2])
            if not raw.isdigit():
                raise ValueError(f"invalid instance id in name {text!r}")
            return cls(parts[0], parts[1], parts[2], int(raw))
        raise ValueError(f"a name has the form org/ns/app[/id], got {text!r}")

    @property
    def service(self) -> tuple[str, str, str]:
        return (self.org, self.ns, self.app)

    def with_id(self, id: int | None) -> Name:
        return Name(self.org, self.ns, self.app, id)

    def without_id(self) -> Name:
        return Name(self.org, self.ns, self.app)

    def same_service(self, other: Name) -> bool:
        return self.service == other.service

    def to_wire(self) -> list[object]:
        return [self.org, self.ns, self.app, self.id]

    def __str__(self) -> str:
        base = f"{self.org}/{self.ns}/{self.app}"
        return base if self.id is None else f"{base}/{self.id}"


def instance_id_for(subject: str) -> int:
    """The instance id bound to an identity subject.

    A cryptographic hash lets the node and peers check that a name belongs to
    the identity that uses it.
    """
    value = int.from_bytes(hashlib.blake2b(subject.encode(), digest_size=8).digest(), "big")
    return value if value <= MAX_ID else value >> 1
