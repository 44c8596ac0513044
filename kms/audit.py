"""Audit records: what was asked, by whom, what was decided, and why.

Records never contain plaintext, key bytes, shares or tokens. Contexts and other sensitive
strings appear only as keyed hashes (HMAC-SHA256 under a key derived from the root secret), so
an officer holding a known value can check whether it appears, but a reader cannot enumerate
them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from kms.canonical import canonical_json, canonical_record
from kms.errors import InvalidRequestError

HASH_PREFIX = "hmac-sha256:"


def keyed_hash(key: bytes | bytearray, value: bytes) -> str:
    return HASH_PREFIX + hmac.new(bytes(key), value, hashlib.sha256).hexdigest()


def time_us(seconds: float) -> int:
    """A record's time as the log commits to it: canonical JSON has integers, not floats."""
    return round(seconds * 1_000_000)


@dataclass(frozen=True)
class AuditRecord:
    time: float
    request_id: str
    node: str
    operation: str
    decision: str  # "allow" | "deny" | "error"
    status: int
    principal: str | None = None  # token id (accessor), never the token
    path: str | None = None
    key: str | None = None
    version: int | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # Written once per request: a flat copy, not dataclasses.asdict's deep one.
        values = {name: getattr(self, name) for name in _FIELDS}
        return {k: v for k, v in values.items() if v is not None and v != {}}

    def leaf_json(self) -> dict[str, Any]:
        """The record as the Merkle log stores and hashes it: ``time`` as ``time_us``.

        Fields that are None or empty are left out. Spelled out field by field rather than
        looped over: it runs for every request, and this is half the cost.
        """
        values: dict[str, Any] = {
            "request_id": self.request_id,
            "node": self.node,
            "operation": self.operation,
            "decision": self.decision,
            "status": self.status,
        }
        if self.principal is not None:
            values["principal"] = self.principal
        if self.path is not None:
            values["path"] = self.path
        if self.key is not None:
            values["key"] = self.key
        if self.version is not None:
            values["version"] = self.version
        if self.reason is not None:
            values["reason"] = self.reason
        if self.details:
            values["details"] = self.details
        values["time_us"] = time_us(self.time)
        return values

    def canonical(self) -> bytes:
        """The stored bytes; the record's leaf is ``leaf_hash`` of them.

        Details that canonical JSON refuses (a float, say) are replaced by the reason, so one
        odd value cannot fail the batch it shares a transaction with: the record still says
        what was done, by whom, and what was decided.
        """
        values = self.leaf_json()
        try:
            return canonical_record(values)
        except InvalidRequestError as exc:
            values["details"] = {"unencodable_details": str(exc)}
            return canonical_json(values)


_FIELDS = tuple(f.name for f in fields(AuditRecord))


class JournalEntry(NamedTuple):
    """A record as acknowledged through the local journal, waiting to join the tree.

    ``data`` is the record's canonical bytes (its leaf is their hash); the other fields are the
    columns the log indexes it by, taken from the same record. (A named tuple: one is made per
    request, and a frozen dataclass costs three times as much to make.)
    """

    time: float
    request_id: str
    node: str
    data: bytes

    @classmethod
    def of(cls, record: AuditRecord) -> JournalEntry:
        return cls(record.time, record.request_id, record.node, record.canonical())


@dataclass(frozen=True)
class JournalMark:
    """How far a journal file is in the log: committed with the entries that reach it."""

    name: str
    offset: int


@dataclass(frozen=True)
class IssuedTokenRow:
    """A token the service minted, recorded for lookup, revocation and access reviews."""

    jti: str
    principal: str
    roles: tuple[str, ...]
    scope: dict[str, Any] | None
    proposal_id: str | None
    jkt: str | None
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class Admission:
    """Conditions checked, and effects written, in the same transaction as the audit record.

    A request's answer leaves only after its record commits, so checking a one-time id or a
    use counter here is as strong as checking it before the work, and costs no extra round
    trip. If a condition fails, the record is written as a denial and the answer withheld.
    """

    once: tuple[tuple[bytes, float], ...] = ()  # (SHA-256 of a one-time id, keep until)
    use_of: str | None = None  # grant (proposal) whose use counter must stay within max_uses
    uses: int = 1  # data keys this request unwraps under that grant: each batch item counts
    issued: IssuedTokenRow | None = None


@dataclass(frozen=True)
class Refusal:
    """Why an admission failed; becomes the request's answer and its audit reason."""

    status: int
    reason: str
