"""Transit-shaped key operations: the key registry and envelope encryption.

Creating a key touches the backend and the registry. The registry row is written first as
``pending`` with the backend handle it will get, then the backend object is made, then the row is
activated. Deleting runs the other way: rows are marked ``deleting``, objects destroyed, rows
dropped. A crash at any step leaves a row that says what to finish, and ``reconcile`` finishes it
(an unfinished creation is undone, an unfinished deletion completed). So the HSM never holds a
key that no row names. An object that no row names anyway means the registry was restored from an
older backup: ``reconcile`` reports it and never destroys it, since data may depend on it.

An AES version's material is made here, escrowed under the security-domain key and imported
(``kms.domain``, docs/adr/0012 §3), so that a domain backup can carry it to another site; the
escrow is stored when the row is activated. Importing a version from a domain backup
(``import_escrowed``) takes the same three steps.

A signing key's private versions never leave their site; the domain backup carries their
public keys, which another site registers as a **verify-only** key (``import_public``,
``KeyPolicy.origin_site``): rows with the public key and no backend object. Verification
needs nothing else; signing and rotation are refused with a message that names the site
that can sign. Such a version's handle is random and names no object, so ``reconcile``
never finds it missing nor destroys anything for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
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

from kms import domain
from kms.derivation import wipe
from kms.errors import (
    ConflictError,
    InvalidCiphertextError,
    InvalidRequestError,
    NotFoundError,
    StorageError,
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
from kms.sealed_values import SECURITY_DOMAIN_KEY

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
        self._domain_key: bytearray | None = None
        self._domain_lock = threading.Lock()
        barrier.on_close(self._forget_working_keys)
        barrier.on_close(self._forget_domain_key)

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
        _require_own(policy, "rotate it")
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
            if not policy.verify_only:  # a verify-only version has no backend object
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
        label = _label(policy.name, version.number)
        escrow = None
        try:
            if policy.key_type.is_symmetric:
                public_key = None
                escrow = self._make_kek(policy, version, label)
            else:  # signing keys are never escrowed: each site makes its own
                public_key = self._backend.generate(policy.key_type, version.handle, label)
            wrapped = None
            if policy.residency is Residency.MEMORY:
                wrapped = self._wrap_working_key(policy.name, version)
        except BaseException:
            self._store.discard_version(policy.name, version.number)
            raise
        self._store.activate_version(policy.name, version.number, public_key, wrapped, escrow)

    def _make_kek(self, policy: KeyPolicy, version: KeyVersion, label: str) -> bytes:
        """Draw the KEK, escrow it, import it, wipe it; returns the escrow."""
        sdk = self._domain_key_copy()
        material = bytearray(self._random.bytes(domain.KEK_BYTES))
        try:
            escrow = domain.wrap_escrow(
                sdk, policy.name, version.number, policy.key_type, material, random=self._random
            )
            self._backend.import_key(version.handle, policy.key_type, material, label)
        finally:
            wipe(material)
            wipe(sdk)
        return escrow

    # --- the security-domain key and KEK escrow (docs/adr/0012 §3) ------------------------

    def open_domain_key(self, *, create: bool) -> bool:
        """Open the security-domain key for this unseal, first making it on a node with none.

        ``create`` is False while a domain backup waits to be imported: the backup brings the
        domain's key, and one made here would split the domain. Workers and nodes may race to
        make it; the first one stored wins and the others open it. Returns whether this
        process now holds the key.
        """
        keys = self._barrier.require_open()
        with self._domain_lock:
            if self._domain_key is not None:
                return True
            sealed = self._store.sealed_value(SECURITY_DOMAIN_KEY)
            if sealed is None:
                if not create:
                    return False
                sdk, fresh = domain.new_domain_key(keys, self._random)
                if self._store.put_sealed_value(fresh, only_if_absent=True):
                    self._domain_key = sdk
                    return True
                wipe(sdk)
                sealed = self._store.sealed_value(SECURITY_DOMAIN_KEY)
                if sealed is None:
                    raise StorageError("the security-domain key was stored and is gone again")
            self._domain_key = domain.open_domain_key(keys, sealed)
            return True

    def _domain_key_copy(self) -> bytearray:
        """A copy for one use (the caller wipes it): sealing wipes the original at any time."""
        if not self.open_domain_key(create=False):
            raise StorageError(
                "this node holds no security-domain key, so no KEK can be made: a domain "
                "backup is still waiting to be imported, or the key was removed from the store"
            )
        with self._domain_lock:
            if self._domain_key is None:
                raise StorageError("the node was sealed while a key was being made")
            return bytearray(self._domain_key)

    def same_domain_key(self, other: bytes | bytearray) -> bool:
        """Whether ``other`` (a backup's security-domain key) is this node's."""
        sdk = self._domain_key_copy()
        try:
            return hmac.compare_digest(bytes(sdk), bytes(other))
        finally:
            wipe(sdk)

    def escrow_opens(self, name: str, key_type: KeyType, version: KeyVersion) -> bool:
        """Whether the version's escrow opens with this node's security-domain key."""
        if version.escrow is None:
            return False
        sdk = self._domain_key_copy()
        try:
            material = domain.unwrap_escrow(sdk, name, version.number, key_type, version.escrow)
        except domain.EscrowError:
            return False
        finally:
            wipe(sdk)
        wipe(material)
        return True

    def import_escrowed(
        self,
        template: KeyPolicy,
        number: int,
        escrow: bytes,
        wrapped_working_key: bytes | None,
        *,
        resume: bool,
    ) -> bool:
        """Import one KEK version from its escrow (a domain backup); False if already here.

        The caller has made sure that the escrow is under this node's security-domain key.
        Same crash-safe steps as a new version: a pending row, the backend object, then the
        active row with the escrow. A version already active here with the same escrow is
        skipped; with another escrow it is a ``ConflictError``. With ``resume`` (the import at
        unseal, which nothing else runs at the same time) a pending row left by a crash is
        undone and the version imported again; otherwise a pending row means someone is
        changing that version here right now, also a conflict.
        """
        self._barrier.require_open()
        name = template.name
        stored = self._store.stored_key(name)
        if stored is not None and stored.key_type is not template.key_type:
            raise ConflictError(
                f"key {name!r} is {stored.key_type.value} here and {template.key_type.value} "
                "in the backup"
            )
        existing = None if stored is None else stored.versions.get(number)
        if existing is not None:
            if existing.state is VersionState.ACTIVE:
                if existing.escrow is not None and hmac.compare_digest(existing.escrow, escrow):
                    return False
                raise ConflictError(
                    f"key {name!r} version {number} exists here with other key material: both "
                    "sites made a version with that number"
                )
            if existing.state is not VersionState.PENDING or not resume:
                raise ConflictError(
                    f"key {name!r} version {number} is being created or deleted here; retry"
                )
            if existing.handle in self._backend.handles():
                self._backend.destroy(existing.handle)
            self._store.discard_version(name, number)
            stored = self._store.stored_key(name)  # the key row goes with its last version
        version = self._new_version(number, self._clock.now())
        if stored is None:
            self._store.insert_pending_key(
                template.with_changes(latest_version=0, versions={}), version
            )
        else:
            self._store.insert_pending_version(name, version)
        try:
            sdk = self._domain_key_copy()
            try:
                material = domain.unwrap_escrow(sdk, name, number, template.key_type, escrow)
            finally:
                wipe(sdk)
            try:
                self._backend.import_key(
                    version.handle, template.key_type, material, _label(name, number)
                )
            finally:
                wipe(material)
        except BaseException:
            self._store.discard_version(name, number)
            raise
        self._store.activate_version(name, number, None, wrapped_working_key, escrow)
        return True

    def import_public(
        self, template: KeyPolicy, number: int, public_key: bytes, *, resume: bool
    ) -> bool:
        """Register one public version of another site's signing key; False if already here.

        ``template.origin_site`` names the site that holds the private key. Nothing reaches
        the backend: a pending row with a random handle that names no object, then the active
        row with the public key, so a crash between the two leaves a pending row that the
        next ``resume`` or ``reconcile`` drops. A version active here with the same public key
        is skipped; with another public key, or a version missing from a key of this site's
        own or of another origin, it is a ``ConflictError``. ``resume`` as for
        ``import_escrowed``.
        """
        self._barrier.require_open()
        name, origin = template.name, template.origin_site
        if origin is None or template.key_type.is_symmetric:
            raise InvalidRequestError("only signing keys of another site are imported public")
        stored = self._store.stored_key(name)
        if stored is not None:
            if stored.key_type is not template.key_type:
                raise ConflictError(
                    f"key {name!r} is {stored.key_type.value} here and "
                    f"{template.key_type.value} in the backup"
                )
            existing = stored.versions.get(number)
            if existing is not None and existing.state is VersionState.ACTIVE:
                if existing.public_key == public_key:
                    return False
                raise ConflictError(
                    f"key {name!r} version {number} exists here with another public key: two "
                    "sites made a signing key of that name"
                )
            if stored.origin_site != origin:
                held = (
                    "this site's own key"
                    if stored.origin_site is None
                    else f"verify-only from site {stored.origin_site!r}"
                )
                raise ConflictError(
                    f"key {name!r} is {held} here, and the backup carries a version {number} "
                    f"of it from site {origin!r}"
                )
            if existing is not None:
                if existing.state is not VersionState.PENDING or not resume:
                    raise ConflictError(
                        f"key {name!r} version {number} is being created or deleted here; retry"
                    )
                self._store.discard_version(name, number)  # a crash's leftover; no object
                stored = self._store.stored_key(name)
        version = self._new_version(number, self._clock.now())
        if stored is None:
            self._store.insert_pending_key(
                template.with_changes(latest_version=0, versions={}), version
            )
        else:
            self._store.insert_pending_version(name, version)
        self._store.activate_version(name, number, public_key)
        return True

    def _forget_domain_key(self) -> None:
        with self._domain_lock:
            sdk, self._domain_key = self._domain_key, None
            if sdk is not None:
                wipe(sdk)

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
        _require_own(policy, "sign")
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
        _require_own(policy, "sign")
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


def _require_own(policy: KeyPolicy, what: str) -> None:
    """A verify-only key has no private key here: say where to go instead of failing in the
    backend over an object that does not exist."""
    if policy.origin_site is not None:
        raise ConflictError(
            f"key {policy.name!r} is a verify-only key imported from site "
            f"{policy.origin_site!r}: {what} at its home site {policy.origin_site!r}, or create "
            "a new key here"
        )


def _label(name: str, version: int) -> str:
    """The backend object's label: ``hsm.pkcs11_backend`` counts ``ekms/`` objects as ours."""
    return f"ekms/{name}/v{version}"


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
