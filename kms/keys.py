"""The key registry's model: key types, policies, versions, and the ciphertext format.

A ciphertext reads ``ekms:v<version>:<base64(nonce || ciphertext || tag)>``. The AES-GCM AAD
binds the key name, the version and the caller's context, so a ciphertext moved to another key,
relabelled with another version, or presented with another context fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from typing import TypeVar

from kms.errors import InvalidCiphertextError, InvalidRequestError

NONCE_BYTES = 12
TAG_BYTES = 16
CIPHERTEXT_PREFIX = "ekms"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_AAD_DOMAIN = b"embassy-kms/transit/v1"
_WORKING_KEY_DOMAIN = b"embassy-kms/working-key/v1"
_E = TypeVar("_E", bound=Enum)


class KeyType(StrEnum):
    AES256_GCM96 = "aes256-gcm96"
    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"

    @property
    def is_symmetric(self) -> bool:
        return self is KeyType.AES256_GCM96


class Classification(StrEnum):
    """Sensitivity of the data a key protects; decides where it may be restored (later issues)."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"  # noqa: S105 - a classification level, not a secret


class Residency(StrEnum):
    """Where a symmetric key version's operations run.

    ``hsm`` (default): every wrap and unwrap is a PKCS#11 call; key bytes never leave the HSM.
    ``memory`` (opt-in, see ADR 0003): a per-version working key, generated at random and stored
    only wrapped under the version's non-extractable HSM key, is unwrapped into worker memory while
    unsealed, so bulk unwraps run at software speed — the trade OpenBao transit makes for every key.
    """

    HSM = "hsm"
    MEMORY = "memory"


class VersionState(StrEnum):
    PENDING = "pending"  # registry row written, HSM object may not exist yet
    ACTIVE = "active"
    DELETING = "deleting"  # registry says destroy; the HSM object may still exist


def parse_enum(enum: type[_E], value: object, field_name: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise InvalidRequestError(f"{field_name} must be one of: {allowed}") from None


# Keys the service keeps for itself (the token-signing key). '/' cannot appear in a transit path
# segment or pass validate_key_name, so no API caller can name, list or use them.
SYSTEM_KEY_PREFIX = "ekms/"


def validate_key_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            "key name must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class KeyVersion:
    number: int
    handle: bytes  # backend object id (CKA_ID); not secret
    state: VersionState
    created_at: float
    public_key: bytes | None = None  # DER SubjectPublicKeyInfo for signing keys
    wrapped_working_key: bytes | None = field(default=None, repr=False)  # residency=memory only
    # AES only: the material wrapped under the security-domain key (kms.domain), so that the
    # domain backup can carry the version to another site. None for signing keys and for
    # versions made before KEK escrow existed (they cannot leave their site).
    escrow: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class KeyPolicy:
    name: str
    key_type: KeyType
    classification: Classification
    residency: Residency
    created_at: float
    latest_version: int = 0
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    deletion_allowed: bool = False
    versions: dict[int, KeyVersion] = field(default_factory=dict)
    # A verify-only key: its public versions came from this site in a domain backup, and its
    # private versions stay in that site's backend (no backend object here). None otherwise.
    origin_site: str | None = None

    @property
    def verify_only(self) -> bool:
        return self.origin_site is not None

    def with_changes(self, **changes: object) -> KeyPolicy:
        return replace(self, **changes)  # type: ignore[arg-type]

    def version_for_encryption(self, requested: int | None) -> KeyVersion:
        if self.latest_version < 1:
            raise InvalidRequestError(f"key {self.name!r} has no active version")
        number = self.latest_version if requested in (None, 0) else requested
        assert number is not None
        if number > self.latest_version or number < 1:
            raise InvalidRequestError(f"key version {number} does not exist")
        if number < self.min_encryption_version:
            raise InvalidRequestError(
                f"key version {number} is below min_encryption_version "
                f"{self.min_encryption_version}"
            )
        return self._active(number)

    def version_for_decryption(self, number: int) -> KeyVersion:
        if number < self.min_decryption_version:
            raise InvalidRequestError(
                f"ciphertext version {number} is disallowed by policy "
                f"(min_decryption_version {self.min_decryption_version})"
            )
        if number > self.latest_version:
            raise InvalidCiphertextError
        return self._active(number)

    def _active(self, number: int) -> KeyVersion:
        version = self.versions.get(number)
        if version is None or version.state is not VersionState.ACTIVE:
            raise InvalidCiphertextError
        return version


def transit_aad(name: str, version: int, context: bytes) -> bytes:
    """Length-prefixed so that no two (name, version, context) triples share an encoding."""
    encoded = name.encode()
    return b"".join(
        (
            _AAD_DOMAIN,
            struct.pack(">H", len(encoded)),
            encoded,
            struct.pack(">I", version),
            struct.pack(">I", len(context)),
            context,
        )
    )


def working_key_aad(name: str, version: int) -> bytes:
    encoded = name.encode()
    return (
        _WORKING_KEY_DOMAIN + struct.pack(">H", len(encoded)) + encoded + struct.pack(">I", version)
    )


def format_ciphertext(version: int, nonce: bytes, sealed: bytes) -> str:
    return f"{CIPHERTEXT_PREFIX}:v{version}:{base64.b64encode(nonce + sealed).decode()}"


def parse_ciphertext(text: object) -> tuple[int, bytes, bytes]:
    """Returns (version, nonce, ciphertext || tag); any malformation is the one opaque error."""
    if not isinstance(text, str):
        raise InvalidRequestError("ciphertext must be a string")
    parts = text.split(":", 2)
    if len(parts) != 3 or parts[0] != CIPHERTEXT_PREFIX or not parts[1].startswith("v"):
        raise InvalidRequestError("ciphertext is not in the form ekms:v<version>:<base64>")
    digits = parts[1][1:]
    if not digits.isdigit() or len(digits) > 9 or int(digits) < 1:
        raise InvalidRequestError("ciphertext version must be a positive integer")
    try:
        blob = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertextError from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise InvalidCiphertextError
    return int(digits), blob[:NONCE_BYTES], blob[NONCE_BYTES:]


def decode_b64_field(value: object, field_name: str, *, allow_empty: bool = True) -> bytes:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field_name} must be a base64 string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field_name} is not valid base64") from None
    if not decoded and not allow_empty:
        raise InvalidRequestError(f"{field_name} must not be empty")
    return decoded
