"""The security-domain key and the KEK escrow it wraps (docs/adr/0012 §3).

KEKs stay non-extractable in every backend, so to move one to another site the service makes
its material itself: 32 bytes from the CSPRNG, wrapped here under the **security-domain key**
(SDK) before the backend imports them and the bytes are wiped. The wrapped copy, the *escrow*,
is stored with the key version and travels in the domain backup; another site that a quorum of
the same share set has unsealed opens the SDK (sealed under the domain wrapping key,
``kms.sealed_values``) and imports the same KEK into its own backend.

The SDK is one random key rather than the domain wrapping key itself so that a rekey, which
replaces the domain wrapping key, reseals one value instead of every escrow.

Escrow format: ``0x01 || nonce(12) || AES-256-GCM(HKDF(SDK, "kek-escrow"), material, aad)``,
where the AAD names the key, the version and the key type, so an escrow moved to another
version, key or type does not open. Pure: no I/O; randomness is injected. Nothing here puts
key material in a message or a repr.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.derivation import hkdf, wipe
from kms.errors import InvalidRequestError
from kms.keys import KeyType
from kms.sealed_values import SECURITY_DOMAIN_KEY, Purpose, SealedValue, open_value, seal

if TYPE_CHECKING:
    from kms.derivation import RootKeys
    from kms.ports import RandomSource

DOMAIN_KEY_BYTES = 32
KEK_BYTES = 32
_FORMAT = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_ESCROW_AAD = b"embassy-kms/v1/kek-escrow\x00"
ESCROW_BYTES = 1 + _NONCE_BYTES + KEK_BYTES + _TAG_BYTES


class EscrowError(InvalidRequestError):
    """An escrow that does not open: another domain's, moved to another version, or damaged.

    One message per cause that names the key version, never the bytes.
    """


def new_domain_key(keys: RootKeys, random: RandomSource) -> tuple[bytearray, SealedValue]:
    """A fresh SDK and its sealed form for the store; the caller wipes the plaintext."""
    sdk = bytearray(random.bytes(DOMAIN_KEY_BYTES))
    try:
        return sdk, seal(keys, SECURITY_DOMAIN_KEY, Purpose.DOMAIN, sdk, random)
    except BaseException:
        wipe(sdk)
        raise


def open_domain_key(keys: RootKeys, sealed: SealedValue) -> bytearray:
    """The SDK (the caller wipes it); ``StorageError`` if it does not open with ``keys``."""
    if sealed.name != SECURITY_DOMAIN_KEY or sealed.purpose is not Purpose.DOMAIN:
        raise InvalidRequestError("the sealed value is not the security-domain key")
    sdk = open_value(keys, sealed)
    if len(sdk) != DOMAIN_KEY_BYTES:
        wipe(sdk)
        raise InvalidRequestError("the security-domain key has the wrong length")
    return sdk


def escrow_aad(name: str, version: int, key_type: KeyType) -> bytes:
    """Length-prefixed, so that no two (name, version, type) triples share an encoding."""
    encoded, kind = name.encode(), key_type.value.encode()
    return b"".join(
        (
            _ESCROW_AAD,
            struct.pack(">H", len(encoded)),
            encoded,
            struct.pack(">I", version),
            struct.pack(">B", len(kind)),
            kind,
        )
    )


def _escrow_key(sdk: bytes | bytearray) -> bytearray:
    if len(sdk) != DOMAIN_KEY_BYTES:
        raise InvalidRequestError("the security-domain key has the wrong length")
    return hkdf(sdk, "kek-escrow")


def wrap_escrow(
    sdk: bytes | bytearray,
    name: str,
    version: int,
    key_type: KeyType,
    material: bytes | bytearray,
    *,
    random: RandomSource,
) -> bytes:
    """``material`` wrapped for ``name``/``version``; only AES KEKs are escrowed."""
    if key_type is not KeyType.AES256_GCM96:
        raise InvalidRequestError("only aes256-gcm96 keys are escrowed")
    if len(material) != KEK_BYTES:
        raise InvalidRequestError("aes256-gcm96 key material must be 32 bytes")
    key = _escrow_key(sdk)
    nonce = random.bytes(_NONCE_BYTES)
    try:
        sealed = AESGCM(bytes(key)).encrypt(
            nonce, bytes(material), escrow_aad(name, version, key_type)
        )
    finally:
        wipe(key)
    return _FORMAT + nonce + sealed


def unwrap_escrow(
    sdk: bytes | bytearray, name: str, version: int, key_type: KeyType, escrow: bytes
) -> bytearray:
    """The KEK material (the caller wipes it); ``EscrowError`` naming the version otherwise."""
    refused = EscrowError(
        f"the escrow of key {name!r} version {version} does not open with the security-domain "
        "key: it belongs to another domain, another key or version, or it was damaged"
    )
    if len(escrow) != ESCROW_BYTES or escrow[:1] != _FORMAT:
        raise refused
    key = _escrow_key(sdk)
    try:
        return bytearray(
            AESGCM(bytes(key)).decrypt(
                escrow[1 : 1 + _NONCE_BYTES],
                escrow[1 + _NONCE_BYTES :],
                escrow_aad(name, version, key_type),
            )
        )
    except InvalidTag:
        raise refused from None
    finally:
        wipe(key)
