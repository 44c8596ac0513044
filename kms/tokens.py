"""Bearer tokens: 256 random bits, stored only as a SHA-256 digest.

A slow password hash buys nothing for a uniformly random 256-bit value, and a fast digest keeps
the per-request check cheap. Audit records name a token by its id (an accessor), never by value.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from kms.ports import RandomSource

TOKEN_PREFIX = "ekms."  # noqa: S105 - a prefix, not a secret
ROOT_POLICY = "root"
_TOKEN_RANDOM_BYTES = 32
# "ekms." and 32 bytes in unpadded base64url: every issued token has this many characters.
TOKEN_LENGTH = len(TOKEN_PREFIX) + (4 * _TOKEN_RANDOM_BYTES + 2) // 3
_BASE62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_OTP_ALPHABET = frozenset(_BASE62 + b"+/-_=")


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
    value = token or TOKEN_PREFIX + base64.urlsafe_b64encode(
        random.bytes(_TOKEN_RANDOM_BYTES)
    ).decode().rstrip("=")
    return IssuedToken(token=value, token_id=random.bytes(12).hex(), token_hash=hash_token(value))


def generate_otp(random: RandomSource, length: int = TOKEN_LENGTH) -> bytearray:
    """A one-time pad of base62 characters, as ``bao operator generate-root -generate-otp``.

    Rejection sampling keeps every character uniform (248 = 4 x 62).
    """
    otp = bytearray()
    while len(otp) < length:
        chunk = bytearray(random.bytes(length))
        otp += bytes(_BASE62[b % 62] for b in chunk if b < 248)
        chunk[:] = bytes(len(chunk))
    del otp[length:]
    return otp


def check_otp(otp: str, length: int = TOKEN_LENGTH) -> bytearray:
    """The caller's OTP as bytes; it must cover the token exactly, as OpenBao requires."""
    if len(otp) != length or not otp.isascii() or not set(otp.encode()) <= _OTP_ALPHABET:
        raise InvalidRequestError(
            f"otp must be {length} characters from A-Z, a-z, 0-9, '+', '/', '-', '_' or '=' "
            "(the otp_length of this service's tokens); or leave it out to get one generated"
        )
    return bytearray(otp.encode())


def encode_with_otp(token: str, otp: bytearray) -> str:
    """OpenBao's encoding of a generated root token: unpadded base64 of ``token XOR otp``."""
    raw = bytearray(token.encode())
    if len(raw) != len(otp):
        raise ValueError("the otp must be exactly as long as the token")
    try:
        for index, value in enumerate(otp):
            raw[index] ^= value
        return base64.b64encode(raw).decode().rstrip("=")
    finally:
        raw[:] = bytes(len(raw))


def decode_with_otp(encoded: str, otp: str) -> str:
    """Inverse of ``encode_with_otp`` (``bao operator generate-root -decode``)."""
    try:
        raw = bytearray(base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
    except ValueError:
        raise InvalidRequestError("the encoded token is not valid base64") from None
    pad = otp.encode()
    if len(raw) != len(pad):
        raise InvalidRequestError(
            f"the otp has {len(pad)} characters but the encoded token is {len(raw)} bytes long: "
            "use the otp of the attempt that produced this token"
        )
    try:
        return bytes(a ^ b for a, b in zip(raw, pad, strict=True)).decode()
    except UnicodeDecodeError:
        raise InvalidRequestError("the otp does not decode this token") from None
    finally:
        raw[:] = bytes(len(raw))
