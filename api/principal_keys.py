"""The client side of a principal's key: login assertions, DPoP proofs and signed approvals.

The service only ever sees public keys; this is what a person's smart card middleware or a
restore tool's keystore does with the private half. The CLI, the benchmark and the tests use
it so that every client signs exactly the way the protocol documents (docs/access-control.md).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
ASSERTION_TTL = 60  # seconds: an assertion is used at once, so it may live only briefly


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class KeyHolder:
    """A principal id with its private key (ES256 on P-256, or EdDSA on Ed25519)."""

    principal: str
    key: PrivateKey

    def __repr__(self) -> str:
        return f"KeyHolder(principal={self.principal!r}, alg={self.alg!r})"

    @classmethod
    def generate(cls, principal: str, alg: str = "ES256") -> KeyHolder:
        if alg == "ES256":
            return cls(principal, ec.generate_private_key(ec.SECP256R1()))
        if alg == "EdDSA":
            return cls(principal, ed25519.Ed25519PrivateKey.generate())
        raise ValueError(f"unsupported algorithm {alg!r}; use ES256 or EdDSA")

    @classmethod
    def from_pem(cls, principal: str, pem: bytes, password: bytes | None = None) -> KeyHolder:
        key = serialization.load_pem_private_key(pem, password=password)
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return cls(principal, key)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return cls(principal, key)
        raise ValueError("the key must be an EC P-256 or an Ed25519 private key")

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def alg(self) -> str:
        return "ES256" if isinstance(self.key, ec.EllipticCurvePrivateKey) else "EdDSA"

    @property
    def jwk(self) -> dict[str, str]:
        """The public JWK to register with the service; never includes the private member."""
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            numbers = self.key.public_key().public_numbers()
            return {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(numbers.x.to_bytes(32, "big")),
                "y": b64url(numbers.y.to_bytes(32, "big")),
            }
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url(self.key.public_key().public_bytes_raw()),
        }

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(claims, self.key, algorithm=self.alg, headers=headers or None)

    def assertion(self, audience: str, *, now: float | None = None, **changes: Any) -> str:
        """RFC 7523 client assertion for ``auth/jwt/login``; a fresh ``jti`` every time."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.principal,
            "sub": self.principal,
            "aud": audience,
            "iat": issued,
            "exp": issued + ASSERTION_TTL,
            "jti": str(uuid.uuid4()),
        }
        claims.update(changes)
        return self.sign(claims)

    def dpop_proof(
        self, method: str, url: str, access_token: str, *, now: float | None = None, **changes: Any
    ) -> str:
        """RFC 9449 proof for one request: method, URL, time, a fresh ``jti``, token hash."""
        claims: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "htm": method,
            "htu": url,
            "iat": int(time.time() if now is None else now),
            "ath": b64url(hashlib.sha256(access_token.encode()).digest()),
        }
        claims.update(changes)
        return self.sign(claims, typ="dpop+jwt", jwk=self.jwk)

    def approval(
        self, proposal: dict[str, Any], audience: str, decision: str = "approve", **changes: Any
    ) -> str:
        """An official's signature over a proposal's canonical digest, so it cannot be moved."""
        claims: dict[str, Any] = {
            "iss": self.principal,
            "aud": audience,
            "proposal": proposal["id"],
            "digest": proposal["digest"],
            "decision": decision,
            "iat": int(time.time()),
            "jti": str(uuid.uuid4()),
        }
        claims.update(changes)
        return self.sign(claims)
