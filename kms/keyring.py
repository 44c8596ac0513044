"""The keyring: from the first rekey on, the working keys are stored sealed, not derived.

At init every working key is derived from the root secret (``RootKeys.derive``). A rekey must
make the old shares useless, so it needs a new root secret; but the audit HMAC key has to
survive it (old records' context hashes stay comparable), and the HSM PINs change by
``C_SetPIN``, not by derivation. So after a rekey the working keys are stored in the share-set
descriptor, AES-256-GCM under ``HKDF(new secret, "keyring")``, with AAD naming the set
(identifier, generation). Unseal reconstructs the secret, checks the verifier, and then opens
the keyring if the descriptor has one, else derives as before: a set made at init (generation
0) needs no migration.

The rekey commit also writes the new keys sealed under the *old* keys (``seal_for_commit``),
so that the old set, which is still in force until the commit ends, can finish an interrupted
commit. See docs/adr/0010-rekey-and-keyring.md.

Pure: randomness is injected; nothing here touches the HSM or the disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.derivation import ROOT_SECRET_BYTES, RootKeys, hkdf, wipe
from kms.errors import StorageError

if TYPE_CHECKING:
    from kms.custody import ShareSetDescriptor
    from kms.ports import RandomSource

SetName = tuple[int, int]  # (SLIP-39 identifier, generation)

_FORMAT = b"\x01"
_NONCE_BYTES = 12
_KEYRING_AAD = b"embassy-kms/v1/keyring\x00"
_COMMIT_AAD = b"embassy-kms/v1/rekey-commit\x00"


def set_name(descriptor: ShareSetDescriptor) -> SetName:
    return descriptor.identifier, descriptor.generation


def _name_bytes(name: SetName) -> bytes:
    identifier, generation = name
    return identifier.to_bytes(2, "big") + generation.to_bytes(4, "big")


def _seal(key: bytearray, aad: bytes, keys: RootKeys, random: RandomSource) -> bytes:
    nonce = random.bytes(_NONCE_BYTES)
    blob = keys.to_bytes()
    try:
        return _FORMAT + nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(blob), aad)
    finally:
        wipe(blob)
        wipe(key)


def _open(key: bytearray, aad: bytes, sealed: bytes, what: str) -> RootKeys:
    damaged = StorageError(
        f"the stored {what} does not open with the keys of this share set: the metadata "
        "store is damaged or was altered"
    )
    try:
        if sealed[:1] != _FORMAT or len(sealed) < 1 + _NONCE_BYTES + 16:
            raise damaged
        nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        blob = bytearray(AESGCM(bytes(key)).decrypt(nonce, ciphertext, aad))
    except InvalidTag:
        raise damaged from None
    finally:
        wipe(key)
    try:
        return RootKeys.from_bytes(blob)
    finally:
        wipe(blob)


def seal_keyring(
    secret: bytes | bytearray, name: SetName, keys: RootKeys, random: RandomSource
) -> bytes:
    """The working keys, sealed under ``HKDF(secret, "keyring")`` for the set ``name``."""
    if len(secret) != ROOT_SECRET_BYTES:
        raise ValueError("root secret must be 32 bytes")
    return _seal(hkdf(secret, "keyring"), _KEYRING_AAD + _name_bytes(name), keys, random)


def unlock(descriptor: ShareSetDescriptor, secret: bytes | bytearray) -> RootKeys:
    """The working keys of the set, from its verified secret (the caller wipes the secret)."""
    if descriptor.keyring is None:
        return RootKeys.derive(secret)
    aad = _KEYRING_AAD + _name_bytes(set_name(descriptor))
    return _open(hkdf(secret, "keyring"), aad, descriptor.keyring, "keyring")


def rotated(old: RootKeys, random: RandomSource) -> RootKeys:
    """New random HSM PINs, barrier key and domain wrapping key; the audit HMAC key is kept.

    The audit key stays so that context hashes in records written before the rekey can still
    be compared (``sys/audit-hash``) with those written after it.
    """
    fresh = [bytearray(random.bytes(32)) for _ in range(4)]
    return RootKeys(fresh[0], fresh[1], fresh[2], fresh[3], bytearray(old.audit_hmac_key))


def _commit_key(old: RootKeys) -> bytearray:
    return hkdf(old.barrier_key, "rekey-commit")


def seal_for_commit(
    old: RootKeys, new: RootKeys, source: SetName, target: SetName, random: RandomSource
) -> bytes:
    """The new keys, sealed under the old set's barrier key, for the pending-commit row."""
    aad = _COMMIT_AAD + _name_bytes(source) + _name_bytes(target)
    return _seal(_commit_key(old), aad, new, random)


def open_commit(old: RootKeys, sealed: bytes, source: SetName, target: SetName) -> RootKeys:
    aad = _COMMIT_AAD + _name_bytes(source) + _name_bytes(target)
    return _open(_commit_key(old), aad, sealed, "rekey commit")
