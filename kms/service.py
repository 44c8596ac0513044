"""Transit-shaped key operations: the key registry and envelope encryption.

Creating a key touches the backend and the registry. The registry row is written first as
``pending`` with the backend handle it will get, then the backend object is made, then the row is
activated. Deleting runs the other way: rows are marked ``deleting``, objects destroyed, rows
dropped. A crash at any step leaves a row that says what to finish, and ``reconcile`` finishes it
(an unfinished creation is undone, an unfinished deletion completed). So the HSM never holds a
key that no row names. An object that no row names anyway means the registry was restored from an
older backup: ``reconcile`` reports it and never destroys it, since data may depend on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.derivation import wipe
from kms.errors import (
    InvalidCiphertextError,
    InvalidRequestError,
    NotFoundError,
)
from kms.keys import (
    NONCE_BYTES,
    SYSTEM_KEY_PREFIX,
    Classification,
    KeyPolicy,
    KeyType,
    KeyVersion,
    Residency,
    VersionState,
    format_ciphertext,
    parse_ciphertext,
    transit_aad,
    working_key_aad,
)

if TYPE_CHECKING:
    from kms.ports import Clock, KeyBackend, KeyStore, RandomSource
    from kms.seal import Barrier

DATAKEY_BITS = (128, 256, 512)
DEFAULT_PENDING_GRACE = 120.0
_SIGNATURE_PREFIX = "ekms:v"


class HashAlgorithm(StrEnum):
    SHA2_256 = "sha2-256"
    SHA2_384 = "sha2-384"
    SHA2_512 = "sha2-512"

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.value.replace("sha2-", "sha"), data).digest()

    @property
    def primitive(self) -> hashes.HashAlgorithm:
        return {
            "sha2-256": hashes.SHA256(),
            "sha2-384": hashes.SHA384(),
            "sha2-512": hashes.SHA512(),
        }[self.value]


class Marshaling(StrEnum):
    ASN1 = "asn1"
    JWS = "jws"


@dataclass(frozen=True)
class ReconcileReport:
    discarded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unknown_objects: int = 0


class KeyService:
    def __init__(
        self,
        *,
        backend: KeyBackend,
        store: KeyStore,
        barrier: Barrier,
        clock: Clock,
        random: RandomSource,
    ) -> None:
        self._backend = backend
        self._store = store
        self._barrier = barrier
        self._clock = clock
        self._random = random
        self._working_keys: dict[tuple[str, int], AESGCM] = {}
        self._working_lock = threading.Lock()
        barrier.on_close(self._forget_working_keys)

    # --- registry -------------------------------------------------------------------------

    def policy(self, name: str) -> KeyPolicy:
        self._barrier.require_open()
        policy = self._store.get_policy(name)
        if policy is None:
            raise NotFoundError(f"no key named {name!r}")
        return policy

    def list_names(self) -> list[str]:
        self._barrier.require_open()
        return [n for n in self._store.list_names() if not n.startswith(SYSTEM_KEY_PREFIX)]

    def create_key(
        self,
        name: str,
        key_type: KeyType,
        classification: Classification,
        residency: Residency = Residency.HSM,
    ) -> KeyPolicy:
        self._barrier.require_open()
        if residency is Residency.MEMORY:
            if not key_type.is_symmetric:
                raise InvalidRequestError("residency 'memory' applies only to aes256-gcm96 keys")
            if classification is Classification.SECRET:
                raise InvalidRequestError(
                    "residency 'memory' is not allowed for keys classified 'secret'"
                )
        now = self._clock.now()
        policy = KeyPolicy(
            name=name,
            key_type=key_type,
            classification=classification,
            residency=residency,
            created_at=now,
        )
        version = self._new_version(1, now)
        self._store.insert_pending_key(policy, version)
        self._materialise(policy, version)
        return self.policy(name)

    def rotate(self, name: str) -> KeyPolicy:
        policy = self.policy(name)
        version = self._new_version(policy.latest_version + 1, self._clock.now())
        self._store.insert_pending_version(name, version)
        self._materialise(policy, version)
        return self.policy(name)

    def configure(
        self,
        name: str,
        *,
        min_decryption_version: int | None = None,
        min_encryption_version: int | None = None,
        deletion_allowed: bool | None = None,
    ) -> KeyPolicy:
        policy = self.policy(name)
        changes: dict[str, object] = {}
        if min_decryption_version is not None:
            if not 1 <= min_decryption_version <= policy.latest_version:
                raise InvalidRequestError(
                    f"min_decryption_version must be between 1 and the latest version "
                    f"({policy.latest_version})"
                )
            changes["min_decryption_version"] = min_decryption_version
        if min_encryption_version is not None:
            if not 0 <= min_encryption_version <= policy.latest_version:
                raise InvalidRequestError(
                    f"min_encryption_version must be between 0 and the latest version "
                    f"({policy.latest_version})"
                )
            changes["min_encryption_version"] = min_encryption_version
        if deletion_allowed is not None:
            changes["deletion_allowed"] = deletion_allowed
        updated = policy.with_changes(**changes)
        if (
            updated.min_encryption_version
            and updated.min_encryption_version < updated.min_decryption_version
        ):
            raise InvalidRequestError(
                "min_encryption_version must not be below min_decryption_version"
            )
        self._store.update_policy(updated)
        return self.policy(name)

    def delete(self, name: str) -> None:
        policy = self.policy(name)
        if not policy.deletion_allowed:
            raise InvalidRequestError(
                f"deletion is not allowed for key {name!r}: set deletion_allowed first"
            )
        self._store.mark_deleting(name)
        for version in policy.versions.values():
            self._backend.destroy(version.handle)
            self._store.discard_version(name, version.number)
        with self._working_lock:
            for number in policy.versions:
                self._working_keys.pop((name, number), None)

    def reconcile(self, older_than: float = DEFAULT_PENDING_GRACE) -> ReconcileReport:
        """Finish what a crash interrupted: undo half-made versions, complete deletions.

        Pending versions younger than ``older_than`` seconds may still be in progress on another
        node and are left alone.
        """
        self._barrier.require_open()
        report = ReconcileReport()
        unfinished = [
            (name, version, report.discarded)
            for name, version in self._store.pending_versions(self._clock.now() - older_than)
        ] + [(name, version, report.deleted) for name, version in self._store.deleting_versions()]
        held = self._backend.handles()
        for name, version, bucket in unfinished:
            if version.handle in held:
                self._backend.destroy(version.handle)
                held.discard(version.handle)
            self._store.discard_version(name, version.number)
            bucket.append(f"{name}/v{version.number}")
        known = self._store.all_handles()
        unknown = sum(1 for handle in held if handle not in known)
        return ReconcileReport(report.discarded, report.deleted, unknown)

    def _new_version(self, number: int, now: float) -> KeyVersion:
        return KeyVersion(
            number=number,
            handle=self._random.bytes(16),
            state=VersionState.PENDING,
            created_at=now,
        )

    def _materialise(self, policy: KeyPolicy, version: KeyVersion) -> None:
        try:
            public_key = self._backend.generate(
                policy.key_type, version.handle, f"ekms/{policy.name}/v{version.number}"
            )
            wrapped = None
            if policy.residency is Residency.MEMORY:
                wrapped = self._wrap_working_key(policy.name, version)
        except BaseException:
            self._store.discard_version(policy.name, version.number)
            raise
        self._store.activate_version(policy.name, version.number, public_key, wrapped)

    # --- envelope encryption --------------------------------------------------------------

    def encrypt(
        self, policy: KeyPolicy, plaintext: bytes, context: bytes, version: int | None = None
    ) -> tuple[str, int]:
        self._require_symmetric(policy, "encryption")
        key_version = policy.version_for_encryption(version)
        aad = transit_aad(policy.name, key_version.number, context)
        if policy.residency is Residency.MEMORY:
            nonce = self._random.bytes(NONCE_BYTES)
            sealed = self._working_key(policy, key_version).encrypt(nonce, plaintext, aad)
        else:
            self._barrier.require_open()
            nonce, sealed = self._backend.encrypt(key_version.handle, aad, plaintext)
        return format_ciphertext(key_version.number, nonce, sealed), key_version.number

    def decrypt(self, policy: KeyPolicy, ciphertext: object, context: bytes) -> tuple[bytes, int]:
        self._require_symmetric(policy, "decryption")
        number, nonce, sealed = parse_ciphertext(ciphertext)
        key_version = policy.version_for_decryption(number)
        aad = transit_aad(policy.name, number, context)
        if policy.residency is Residency.MEMORY:
            try:
                return self._working_key(policy, key_version).decrypt(nonce, sealed, aad), number
            except InvalidTag:
                raise InvalidCiphertextError from None
        self._barrier.require_open()
        return self._backend.decrypt(key_version.handle, nonce, aad, sealed), number

    def datakey(
        self, policy: KeyPolicy, context: bytes, bits: int = 256
    ) -> tuple[bytearray, str, int]:
        """A fresh data key and its wrapped form; the caller wipes the plaintext after use."""
        if bits not in DATAKEY_BITS:
            raise InvalidRequestError("bits must be 128, 256 or 512")
        plaintext = bytearray(self._random.bytes(bits // 8))
        try:
            ciphertext, version = self.encrypt(policy, bytes(plaintext), context)
        except BaseException:
            wipe(plaintext)
            raise
        return plaintext, ciphertext, version

    def rewrap(
        self, policy: KeyPolicy, ciphertext: object, context: bytes, version: int | None = None
    ) -> tuple[str, int]:
        plaintext = bytearray(self.decrypt(policy, ciphertext, context)[0])
        try:
            return self.encrypt(policy, bytes(plaintext), context, version)
        finally:
            wipe(plaintext)

    # --- signatures -----------------------------------------------------------------------

    def sign(
        self,
        policy: KeyPolicy,
        data: bytes,
        *,
        hash_algorithm: HashAlgorithm = HashAlgorithm.SHA2_256,
        prehashed: bool = False,
        marshaling: Marshaling = Marshaling.ASN1,
        version: int | None = None,
    ) -> tuple[str, int]:
        self._barrier.require_open()
        if policy.key_type.is_symmetric:
            raise InvalidRequestError(f"key type {policy.key_type.value} does not support signing")
        key_version = policy.version_for_encryption(version)
        if policy.key_type is KeyType.ED25519:
            if prehashed:
                raise InvalidRequestError("ed25519 signs the message itself; prehashed is invalid")
            signature = self._backend.sign(key_version.handle, policy.key_type, data)
        else:
            digest = self._digest(data, hash_algorithm, prehashed)
            raw = self._backend.sign(key_version.handle, policy.key_type, digest)
            signature = raw if marshaling is Marshaling.JWS else _der_from_raw(raw)
        encoded = _b64(signature, urlsafe=marshaling is Marshaling.JWS)
        return f"{_SIGNATURE_PREFIX}{key_version.number}:{encoded}", key_version.number

    def sign_jws(self, policy: KeyPolicy, signing_input: bytes) -> tuple[bytes, int]:
        """ES256 over a JWS signing input with the latest version: raw r||s, as JWS wants."""
        self._barrier.require_open()
        if policy.key_type is not KeyType.ECDSA_P256:
            raise InvalidRequestError("JWS signing needs an ecdsa-p256 key")
        key_version = policy.version_for_encryption(None)
        digest = hashlib.sha256(signing_input).digest()
        return self._backend.sign(key_version.handle, policy.key_type, digest), key_version.number

    def verify(
        self,
        policy: KeyPolicy,
        data: bytes,
        signature: object,
        *,
        hash_algorithm: HashAlgorithm = HashAlgorithm.SHA2_256,
        prehashed: bool = False,
        marshaling: Marshaling = Marshaling.ASN1,
    ) -> bool:
        """Verification needs only public keys, so it runs in software."""
        self._barrier.require_open()
        if policy.key_type.is_symmetric:
            raise InvalidRequestError(f"key type {policy.key_type.value} does not support signing")
        number, raw = _parse_signature(signature, urlsafe=marshaling is Marshaling.JWS)
        key_version = policy.version_for_decryption(number)
        if key_version.public_key is None:
            raise InvalidRequestError("key version has no public key")
        public = serialization.load_der_public_key(key_version.public_key)
        try:
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(raw, data)
            elif isinstance(public, ec.EllipticCurvePublicKey):
                der = _der_from_raw(raw) if marshaling is Marshaling.JWS else raw
                digest = self._digest(data, hash_algorithm, prehashed)
                public.verify(der, digest, ec.ECDSA(Prehashed(hash_algorithm.primitive)))
            else:  # pragma: no cover - registry only stores the two types above
                return False
        except (InvalidSignature, ValueError):
            return False
        return True

    @staticmethod
    def _digest(data: bytes, algorithm: HashAlgorithm, prehashed: bool) -> bytes:
        if not prehashed:
            return algorithm.digest(data)
        if len(data) != algorithm.primitive.digest_size:
            raise InvalidRequestError(
                f"prehashed input must be a {algorithm.value} digest "
                f"({algorithm.primitive.digest_size} bytes)"
            )
        return data

    # --- memory-resident working keys (ADR 0003) --------------------------------------------

    def _wrap_working_key(self, name: str, version: KeyVersion) -> bytes:
        key = bytearray(self._random.bytes(32))
        try:
            nonce, sealed = self._backend.encrypt(
                version.handle, working_key_aad(name, version.number), bytes(key)
            )
        finally:
            wipe(key)
        return nonce + sealed

    def _working_key(self, policy: KeyPolicy, version: KeyVersion) -> AESGCM:
        self._barrier.require_open()
        cache_key = (policy.name, version.number)
        cipher = self._working_keys.get(cache_key)
        if cipher is not None:
            return cipher
        wrapped = version.wrapped_working_key
        if wrapped is None:
            raise InvalidCiphertextError
        key = bytearray(
            self._backend.decrypt(
                version.handle,
                wrapped[:NONCE_BYTES],
                working_key_aad(policy.name, version.number),
                wrapped[NONCE_BYTES:],
            )
        )
        try:
            cipher = AESGCM(bytes(key))
        finally:
            wipe(key)
        with self._working_lock:
            self._working_keys[cache_key] = cipher
        return cipher

    def _forget_working_keys(self) -> None:
        with self._working_lock:
            self._working_keys.clear()

    @staticmethod
    def _require_symmetric(policy: KeyPolicy, what: str) -> None:
        if not policy.key_type.is_symmetric:
            raise InvalidRequestError(f"key type {policy.key_type.value} does not support {what}")


def _der_from_raw(raw: bytes) -> bytes:
    if len(raw) != 64:
        raise InvalidRequestError("signature has the wrong length for ecdsa-p256")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _b64(data: bytes, *, urlsafe: bool) -> str:
    if urlsafe:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")
    return base64.b64encode(data).decode()


def _parse_signature(text: object, *, urlsafe: bool) -> tuple[int, bytes]:
    if not isinstance(text, str) or not text.startswith(_SIGNATURE_PREFIX):
        raise InvalidRequestError("signature is not in the form ekms:v<version>:<base64>")
    head, _, body = text[len(_SIGNATURE_PREFIX) :].partition(":")
    if not head.isdigit() or not body or len(head) > 9:
        raise InvalidRequestError("signature is not in the form ekms:v<version>:<base64>")
    try:
        if urlsafe:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        else:
            raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("signature is not valid base64") from None
    return int(head), raw
