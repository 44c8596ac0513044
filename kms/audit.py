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
from typing import Any

HASH_PREFIX = "hmac-sha256:"


def keyed_hash(key: bytes | bytearray, value: bytes) -> str:
    return HASH_PREFIX + hmac.new(bytes(key), value, hashlib.sha256).hexdigest()


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


_FIELDS = tuple(f.name for f in fields(AuditRecord))
