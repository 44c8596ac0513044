"""Principals: the people and restore tools the service knows, each with roles and a public key.

The private key never reaches the service. A principal proves itself by signing a client
assertion (RFC 7523) with it; officials also sign their approvals with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class Role(StrEnum):
    OFFICIAL = "official"
    RESTORE_OPERATOR = "restore-operator"
    RESTORE_TOOL = "restore-tool"
    SECURITY_OFFICER = "security-officer"
    AUDITOR = "auditor"
    BACKUP_WRITER = "backup-writer"


# Managing these roles needs a quorum of officials; the rest are managed by security officers.
QUORUM_ROLES = frozenset({Role.OFFICIAL})
# Machine identities: each takes no other role, and its tokens are bound to its key (DPoP), so a
# token copied off the machine is worth nothing without the key.
MACHINE_ROLES = frozenset({Role.RESTORE_TOOL, Role.BACKUP_WRITER})

_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def validate_principal_id(value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequestError(
            "principal id must be 1-64 characters of lower-case letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return value


def parse_roles(values: Iterable[object]) -> frozenset[Role]:
    roles = set()
    for value in values:
        try:
            roles.add(Role(str(value)))
        except ValueError:
            allowed = ", ".join(r.value for r in Role)
            raise InvalidRequestError(f"unknown role {value!r}; roles are: {allowed}") from None
    if not roles:
        raise InvalidRequestError("a principal needs at least one role")
    if Role.RESTORE_TOOL in roles and len(roles) > 1:
        raise InvalidRequestError("a restore tool is a machine identity: it takes no other role")
    if Role.BACKUP_WRITER in roles and len(roles) > 1:
        raise InvalidRequestError("a backup writer is a machine identity: it takes no other role")
    return frozenset(roles)


@dataclass(frozen=True)
class Principal:
    id: str
    roles: frozenset[Role]
    jwk: Mapping[str, str]  # the public members only (kms.jose.PublicJwk.members)
    thumbprint: str
    created_at: float
    created_by: str
    disabled_at: float | None = None
    # Tokens issued before this moment are refused: "revoke every token of this principal".
    tokens_valid_after: float = 0.0
    display_name: str = field(default="", compare=False)

    @property
    def active(self) -> bool:
        return self.disabled_at is None

    def has(self, role: Role) -> bool:
        return self.active and role in self.roles

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "display_name": self.display_name,
            "roles": sorted(r.value for r in self.roles),
            "jwk": dict(self.jwk),
            "thumbprint": self.thumbprint,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "disabled_at": self.disabled_at,
            "tokens_valid_after": self.tokens_valid_after,
        }
