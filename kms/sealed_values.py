"""The few secrets a site keeps at rest, sealed under keys only a quorum can unlock.

Two purposes, two keys, both derived from the working keys (``RootKeys``) with HKDF:

- ``barrier``: what the node needs to reach its own key backend, such as a transit site's
  Vault token or AppRole secret. Useless until a quorum unseals.
- ``domain``: the security-domain key, the one key under which every KEK version's escrow is
  wrapped (``kms.domain``). Keeping one random key here, rather than wrapping each escrow
  directly under the domain wrapping key, means a rekey (which replaces the domain wrapping key
  so that old shares open nothing new) reseals one value instead of every key version.

Each value is AES-256-GCM with its name and purpose in the AAD, so a sealed blob cannot be moved
to another name. A rekey reseals every value from the old keys to the new ones (``reseal``)
inside its crash-safe commit. Pure: no I/O; randomness is injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.derivation import hkdf, wipe
from kms.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from kms.derivation import RootKeys
    from kms.ports import RandomSource

_FORMAT = b"\x01"
_NONCE_BYTES = 12
_AAD = b"embassy-kms/v1/sealed-value\x00"

BACKEND_CREDENTIAL = "backend-credential"
SECURITY_DOMAIN_KEY = "security-domain-key"


class Purpose(StrEnum):
    BARRIER = "barrier"
    DOMAIN = "domain"


@dataclass(frozen=True, repr=False)
class SealedValue:
    """A stored sealed value. Not secret by itself, but no reason to print it either."""

    name: str
    purpose: Purpose
    blob: bytes

    def __repr__(self) -> str:
        return f"SealedValue({self.name!r}, {self.purpose.value})"


def _key(keys: RootKeys, purpose: Purpose) -> bytearray:
    if purpose is Purpose.BARRIER:
        return hkdf(keys.barrier_key, "sealed-value/barrier")
    return hkdf(keys.domain_wrapping_key, "sealed-value/domain")


def _aad(name: str, purpose: Purpose) -> bytes:
    return _AAD + purpose.value.encode() + b"\x00" + name.encode()


def seal(
    keys: RootKeys, name: str, purpose: Purpose, plaintext: bytes | bytearray, random: RandomSource
) -> SealedValue:
    key = _key(keys, purpose)
    nonce = random.bytes(_NONCE_BYTES)
    try:
        blob = (
            _FORMAT
            + nonce
            + AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), _aad(name, purpose))
        )
    finally:
        wipe(key)
    return SealedValue(name, purpose, blob)


def open_value(keys: RootKeys, value: SealedValue) -> bytearray:
    """The plaintext (the caller wipes it); ``StorageError`` if it does not open."""
    damaged = StorageError(
        f"the sealed value {value.name!r} does not open with this share set's keys: the "
        "metadata store is damaged, was altered, or belongs to another domain"
    )
    blob = value.blob
    if blob[:1] != _FORMAT or len(blob) < 1 + _NONCE_BYTES + 16:
        raise damaged
    key = _key(keys, value.purpose)
    try:
        return bytearray(
            AESGCM(bytes(key)).decrypt(
                blob[1 : 1 + _NONCE_BYTES],
                blob[1 + _NONCE_BYTES :],
                _aad(value.name, value.purpose),
            )
        )
    except InvalidTag:
        raise damaged from None
    finally:
        wipe(key)


def reseal(
    values: Iterable[SealedValue], old: RootKeys, new: RootKeys, random: RandomSource
) -> list[SealedValue]:
    """Every value opened with ``old`` and sealed again with ``new`` (a rekey commit)."""
    out = []
    for value in values:
        plaintext = open_value(old, value)
        try:
            out.append(seal(new, value.name, value.purpose, plaintext, random))
        finally:
            wipe(plaintext)
    return out
