"""The PKCS#11 key backend (python-pkcs11), tested against SoftHSM2.

python-pkcs11 initialises the library without locking callbacks and releases the GIL during
calls, so two threads inside the library corrupt it for the whole process (measured: see
``shared/facts.md``). Every call into the library therefore goes through one process-wide lock.
A process logs in once; after ``fork`` the library must be re-initialised, which ``open`` does
when it notices a new pid.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.exceptions import (
    GeneralError,
    NoSuchKey,
    PinIncorrect,
    PKCS11Error,
    UserAlreadyLoggedIn,
)
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hsm.templates import PRIVATE_SIGNING_KEY, PUBLIC_VERIFY_KEY, SECRET_KEY
from kms.errors import BackendError, InvalidCiphertextError, InvalidRequestError
from kms.keys import KeyType

if TYPE_CHECKING:
    from collections.abc import Iterator

_LIB_LOCK = threading.RLock()
_LIBS: dict[str, Any] = {}
_LIB_PID: dict[str, int] = {}
_ED25519_OID_DER = bytes.fromhex("06032b6570")  # OBJECT IDENTIFIER 1.3.101.112
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
LABEL_PREFIX = "ekms/"
_GCM_NONCE_BYTES = 12
_AES_KEY_BYTES = 32
_LOOKUP_RETRY_DELAYS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_OPEN_SESSIONS: set[int] = set()  # backends of this process that hold a logged-in session


def load_library(module: str) -> Any:
    """One library object per process; re-initialised in a child after fork."""
    with _LIB_LOCK:
        lib = _LIBS.get(module)
        if lib is None:
            lib = pkcs11.lib(module)
            _LIBS[module] = lib
            _LIB_PID[module] = os.getpid()
        elif _LIB_PID[module] != os.getpid():
            lib.reinitialize()
            _LIB_PID[module] = os.getpid()
        return lib


class Pkcs11Backend:
    """Keys as token objects named by CKA_ID; operations serialised by one lock."""

    def __init__(self, *, module: str, token_label: str) -> None:
        self._module = module
        self._token_label = token_label
        self._session: Any = None
        self._objects: dict[bytes, Any] = {}

    def __repr__(self) -> str:
        return f"Pkcs11Backend(token={self._token_label!r}, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def _token(self) -> Any:
        lib = load_library(self._module)
        try:
            return lib.get_token(token_label=self._token_label)
        except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned) as exc:
            raise BackendError(
                f"PKCS#11 token {self._token_label!r} not found exactly once"
            ) from exc

    def open(self, pin: bytearray) -> None:
        with _LIB_LOCK:
            if self._session is not None:
                return
            try:
                try:
                    self._session = self._token().open(rw=True, user_pin=pin.decode())
                except PinIncorrect:
                    # SoftHSM keeps the PINs it read when this process loaded the token; after
                    # a rekey changed them elsewhere (hsm.pins) only a re-initialised library
                    # sees the new one. Safe only while this process holds no other session.
                    if _OPEN_SESSIONS:
                        raise
                    load_library(self._module).reinitialize()
                    self._session = self._token().open(rw=True, user_pin=pin.decode())
            except PinIncorrect as exc:
                raise BackendError("HSM refused the derived PIN: wrong token or share set") from exc
            except UserAlreadyLoggedIn as exc:
                raise BackendError("HSM token already logged in by this process") from exc
            except PKCS11Error as exc:
                raise BackendError(f"HSM login failed: {type(exc).__name__}") from exc
            _OPEN_SESSIONS.add(id(self))

    def close(self) -> None:
        with _LIB_LOCK:
            session, self._session = self._session, None
            self._objects.clear()
            _OPEN_SESSIONS.discard(id(self))
            if session is not None:
                # The token may already be gone; the session is forgotten either way.
                with contextlib.suppress(PKCS11Error):
                    session.close()

    def _require(self) -> Any:
        session = self._session
        if session is None:
            raise BackendError("HSM session is not open")
        return session

    def _object(self, handle: bytes, object_class: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
        cached = self._objects.get(handle)
        if cached is not None:
            return cached
        session = self._require()
        # SoftHSM in another process notices a token change only after a moment: a key that a
        # sibling worker has just made may be missing on the first look. Look again, briefly.
        for delay in _LOOKUP_RETRY_DELAYS:
            try:
                obj = session.get_key(object_class=object_class, id=handle)
            except NoSuchKey:
                time.sleep(delay)
                continue
            self._objects[handle] = obj
            return obj
        raise BackendError("key object missing from the HSM")

    def generate(self, key_type: KeyType, handle: bytes, label: str) -> bytes | None:
        with _LIB_LOCK:
            session = self._require()
            try:
                if key_type is KeyType.AES256_GCM96:
                    session.generate_key(
                        P11KeyType.AES,
                        256,
                        id=handle,
                        label=label,
                        store=True,
                        template=SECRET_KEY,
                    )
                    return None
                if key_type is KeyType.ECDSA_P256:
                    params = session.create_domain_parameters(
                        P11KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                        local=True,
                    )
                    public, _ = params.generate_keypair(
                        id=handle,
                        label=label,
                        store=True,
                        public_template=PUBLIC_VERIFY_KEY,
                        private_template=PRIVATE_SIGNING_KEY,
                    )
                    return bytes(encode_ec_public_key(public))
                params = session.create_domain_parameters(
                    P11KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_OID_DER}, local=True
                )
                public, _ = params.generate_keypair(
                    id=handle,
                    label=label,
                    store=True,
                    mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                    public_template=PUBLIC_VERIFY_KEY,
                    private_template=PRIVATE_SIGNING_KEY,
                )
                point = bytes(public[Attribute.EC_POINT])
                return _ED25519_SPKI_PREFIX + _ed25519_point(point)
            except PKCS11Error as exc:
                raise BackendError(f"HSM key generation failed: {type(exc).__name__}") from exc

    def import_key(
        self, handle: bytes, key_type: KeyType, material: bytes | bytearray, label: str
    ) -> None:
        """``C_CreateObject`` of an AES key under the ``SECRET_KEY`` template.

        The object is a token object, sensitive and non-extractable like a generated one; only
        CKA_LOCAL (false) tells them apart. The service makes the material itself so that a
        copy can be escrowed for the domain backup (docs/adr/0012 §3); python-pkcs11 takes it
        as ``bytes``, a copy this process cannot wipe, which lives only for the call.
        """
        if key_type is not KeyType.AES256_GCM96:
            raise InvalidRequestError("the PKCS#11 backend imports only aes256-gcm96 keys")
        if len(material) != _AES_KEY_BYTES:
            raise InvalidRequestError("aes256-gcm96 key material must be 32 bytes")
        with _LIB_LOCK:
            session = self._require()
            try:
                self._objects[handle] = session.create_object(
                    {
                        **SECRET_KEY,
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: P11KeyType.AES,
                        Attribute.VALUE: bytes(material),
                        Attribute.ID: handle,
                        Attribute.LABEL: label,
                    }
                )
            except PKCS11Error as exc:
                raise BackendError(f"HSM key import failed: {type(exc).__name__}") from exc

    def destroy(self, handle: bytes) -> None:
        with _LIB_LOCK:
            session = self._require()
            self._objects.pop(handle, None)
            try:
                found = list(session.get_objects({Attribute.ID: handle}))
                for obj in found:  # list first: destroying while iterating skips objects
                    obj.destroy()
            except PKCS11Error as exc:
                raise BackendError(f"HSM object deletion failed: {type(exc).__name__}") from exc

    def handles(self) -> set[bytes]:
        with _LIB_LOCK:
            session = self._require()
            found: set[bytes] = set()
            for obj in _iter_objects(session):
                label = obj[Attribute.LABEL]
                if isinstance(label, str) and label.startswith(LABEL_PREFIX):
                    found.add(bytes(obj[Attribute.ID]))
            return found

    def encrypt(self, handle: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(_GCM_NONCE_BYTES)  # the kernel CSPRNG; outside the lock
        with _LIB_LOCK:
            key = self._object(handle)
            try:
                return nonce, bytes(
                    key.encrypt(
                        plaintext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            except PKCS11Error as exc:
                raise BackendError(f"HSM encryption failed: {type(exc).__name__}") from exc

    def decrypt(self, handle: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        with _LIB_LOCK:
            key = self._object(handle)
            try:
                return bytes(
                    key.decrypt(
                        ciphertext,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, aad, 128),
                    )
                )
            except (GeneralError, pkcs11.exceptions.EncryptedDataInvalid) as exc:
                # SoftHSM reports a failed GCM tag as a bare CKR_GENERAL_ERROR.
                raise InvalidCiphertextError from exc
            except PKCS11Error as exc:
                raise BackendError(f"HSM decryption failed: {type(exc).__name__}") from exc

    def sign(self, handle: bytes, key_type: KeyType, message: bytes) -> bytes:
        with _LIB_LOCK:
            key = self._object(handle, ObjectClass.PRIVATE_KEY)
            mechanism = Mechanism.EDDSA if key_type is KeyType.ED25519 else Mechanism.ECDSA
            try:
                return bytes(key.sign(message, mechanism=mechanism))
            except PKCS11Error as exc:
                raise BackendError(f"HSM signing failed: {type(exc).__name__}") from exc


def _iter_objects(session: Any) -> Iterator[Any]:
    return iter(
        list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        + list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        + list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
    )


def _ed25519_point(point: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the 32-byte key in SoftHSM."""
    if len(point) == 34 and point[0] == 0x04 and point[1] == 32:
        return point[2:]
    if len(point) == 32:
        return point
    raise BackendError("unexpected Ed25519 public key encoding from the HSM")
