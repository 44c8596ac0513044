"""Bearer tokens: 256 random bits, stored only as a SHA-256 digest.

A slow password hash buys nothing for a uniformly random 256-bit value, and a fast digest keeps
the per-request check cheap. Audit records name a token by its id (an accessor), never by value.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kms.ports import RandomSource

TOKEN_PREFIX = "ekms."  # noqa: S105 - a prefix, not a secret
ROOT_POLICY = "root"


@dataclass(frozen=True, repr=False)
class IssuedToken:
    token: str
    token_id: str
    token_hash: bytes

    def __repr__(self) -> str:
        return f"IssuedToken(token_id={self.token_id!r}, token=<redacted>)"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def issue_token(random: RandomSource, token: str | None = None) -> IssuedToken:
    """A fresh token, or (development only) a chosen one such as ``-dev-root-token-id``."""
    value = token or TOKEN_PREFIX + base64.urlsafe_b64encode(random.bytes(32)).decode().rstrip("=")
    return IssuedToken(token=value, token_id=random.bytes(12).hex(), token_hash=hash_token(value))
