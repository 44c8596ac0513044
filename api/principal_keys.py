"""The client side of a principal's key: login assertions, DPoP proofs and signed approvals.

The service only ever sees public keys; this is what a person's smart card middleware or a
restore tool's keystore does with the private half. The CLI, the benchmark and the tests use
it so that every client signs exactly the way the protocol documents (docs/access-control.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kms.jose import UNSEAL_ASSERTION_TYPE

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
ASSERTION_TTL = 60  # seconds: an assertion is used at once, so it may live only briefly


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk_bytes(jwk: dict[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"the JWK has no {name!r} member")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise ValueError(f"the JWK's {name!r} is not base64url") from None
    if len(raw) != size:
        raise ValueError(f"the JWK's {name!r} must be {size} bytes")
    return raw


def _jwk_int(jwk: dict[str, Any], name: str, size: int) -> int:
    return int.from_bytes(_jwk_bytes(jwk, name, size), "big")


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

    @classmethod
    def from_jwk(cls, principal: str, jwk: object) -> KeyHolder:
        """A private JWK (RFC 7517/8037: EC P-256 or OKP Ed25519 with ``d``), as key files hold.

        Errors name the member at fault, never its value.
        """
        if not isinstance(jwk, dict):
            message = "a private key file must hold one JWK, a JSON object"
            raise ValueError(message)  # noqa: TRY004 - bad file content, not a caller's type
        kty, crv = jwk.get("kty"), jwk.get("crv")
        if kty == "EC" and crv == "P-256":
            d, x, y = (_jwk_int(jwk, name, 32) for name in ("d", "x", "y"))
            try:
                key = ec.EllipticCurvePrivateNumbers(
                    d, ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1())
                ).private_key()
            except ValueError:
                raise ValueError("the JWK's d, x and y are not one P-256 key pair") from None
            return cls(principal, key)
        if kty == "OKP" and crv == "Ed25519":
            seed = _jwk_bytes(jwk, "d", 32)
            ed_key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
            public = jwk.get("x")
            if public is not None and public != b64url(ed_key.public_key().public_bytes_raw()):
                raise ValueError("the JWK's x is not the public half of its d")
            return cls(principal, ed_key)
        raise ValueError("the JWK must be an EC P-256 or an OKP Ed25519 private key")

    @classmethod
    def load(cls, principal: str, path: str | Path) -> KeyHolder:
        """A key file: a private JWK as JSON (the CLI's format), or an unencrypted PEM."""
        raw = Path(path).read_bytes()
        if raw.lstrip().startswith(b"-----BEGIN"):
            return cls.from_pem(principal, raw)
        try:
            jwk = json.loads(raw)
        except ValueError:
            raise ValueError("not a private JWK (JSON) nor a PEM private key") from None
        return cls.from_jwk(principal, jwk)

    def private_jwk(self) -> dict[str, str]:
        """The private JWK a key file holds: the public members plus ``d``. Keep it secret."""
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            d = self.key.private_numbers().private_value.to_bytes(32, "big")
        else:
            d = self.key.private_bytes_raw()
        return {**self.jwk, "d": b64url(d)}

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
        return self._assertion(audience, now, changes)

    def _assertion(
        self, audience: str, now: float | None, changes: dict[str, Any], **headers: Any
    ) -> str:
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
        return self.sign(claims, **headers)

    def unseal_assertion(
        self, audience: str, *, nonce: str, member: str, now: float | None = None, **changes: Any
    ) -> str:
        """An official's statement "I present share member ``member`` to unseal attempt ``nonce``".

        ``nonce`` is the attempt's nonce from ``sys/seal-status`` ("" before the first share);
        ``member`` is the share's "group.member", read from its public header. Nothing derived
        from the share's value is included. Used once (``jti``) and short-lived.
        """
        claims = {"unseal": {"nonce": nonce, "member": member}, **changes}
        return self._assertion(audience, now, claims, typ=UNSEAL_ASSERTION_TYPE)

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
