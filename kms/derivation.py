"""Everything the service needs is derived from the root secret with HKDF (RFC 5869).

One secret, many purposes: each purpose gets its own ``info`` label so that knowing one derived
key says nothing about another. The root secret itself is wiped as soon as these are derived.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ROOT_SECRET_BYTES = 32
_SALT = b"embassy-kms/v1/root"
_LABELS = ("hsm-user-pin", "hsm-so-pin", "barrier-key", "domain-wrapping-key", "audit-hmac-key")


def wipe(buffer: bytearray) -> None:
    """Overwrite a secret in place. Best effort: Python may hold other copies."""
    buffer[:] = bytes(len(buffer))


def hkdf(
    secret: bytes | bytearray, label: str | bytes, length: int = 32, salt: bytes = _SALT
) -> bytearray:
    info = label.encode() if isinstance(label, str) else label
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info)
    return bytearray(kdf.derive(bytes(secret)))


def root_verifier(secret: bytes | bytearray) -> bytes:
    """A one-way fingerprint of the root secret, stored at init to recognise it at unseal.

    HMAC under an HKDF-derived key: it cannot be reversed to the secret, and it proves that a
    quorum of shares reconstructed *this* service's secret rather than some other set's.
    """
    key = hkdf(secret, "root-verifier")
    try:
        return hmac.new(bytes(key), b"embassy-kms root secret verifier", hashlib.sha256).digest()
    finally:
        wipe(key)


@dataclass(repr=False)
class RootKeys:
    """The keys derived from the root secret. Lives only in memory while unsealed."""

    hsm_user_pin: bytearray
    hsm_so_pin: bytearray
    barrier_key: bytearray
    domain_wrapping_key: bytearray
    audit_hmac_key: bytearray
    _wiped: bool = field(default=False)

    @classmethod
    def derive(cls, secret: bytes | bytearray) -> RootKeys:
        pin, so_pin, barrier, domain, audit = (hkdf(secret, label) for label in _LABELS)
        return cls(pin, so_pin, barrier, domain, audit)

    def pin_text(self, pin: bytearray) -> str:
        """PKCS#11 PINs must be printable; hex keeps all 256 bits."""
        return pin.hex()

    def to_bytes(self) -> bytearray:
        """Serialise for the supervisor-to-worker channel (never for disk)."""
        out = bytearray()
        for part in self._parts():
            out += part
        return out

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray) -> RootKeys:
        if len(blob) != 32 * len(_LABELS):
            raise ValueError("root key blob has the wrong length")
        pin, so_pin, barrier, domain, audit = (
            bytearray(blob[i * 32 : (i + 1) * 32]) for i in range(len(_LABELS))
        )
        return cls(pin, so_pin, barrier, domain, audit)

    def _parts(self) -> tuple[bytearray, ...]:
        return (
            self.hsm_user_pin,
            self.hsm_so_pin,
            self.barrier_key,
            self.domain_wrapping_key,
            self.audit_hmac_key,
        )

    def wipe(self) -> None:
        for part in self._parts():
            wipe(part)
        self._wiped = True

    def __repr__(self) -> str:
        return "RootKeys(<redacted>)"
