"""Compact JWE with ECDH-ES (direct key agreement) and A256GCM, to hand a share to its holder.

RFC 7516 compact serialisation, RFC 7518 section 4.6: an ephemeral P-256 key agrees a secret
with the holder's registered P-256 key; the Concat KDF (NIST SP 800-56A, as RFC 7518 profiles
it) turns it into the content key; AES-256-GCM encrypts the share with the protected header as
AAD. Only ECDH-ES with A256GCM is produced or accepted: no key wrapping, no compression, no
``crit``. The KDF is checked against RFC 7518 Appendix C in the tests.

Used so that a rekey's new shares pass through the service's answer, a load balancer and the
operator's screen without anyone but their holder being able to read them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.errors import AuthenticationError, InvalidRequestError
from kms.jose import b64url_decode, b64url_encode

if TYPE_CHECKING:
    from kms.jose import PublicJwk
    from kms.ports import RandomSource

ALG = "ECDH-ES"
ENC = "A256GCM"
MAX_JWE_LENGTH = 4096
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)
_HEADER_MEMBERS = frozenset({"alg", "enc", "epk", "kid", "cty", "apu", "apv"})


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def concat_kdf(z: bytes, enc: str, key_bits: int, apu: bytes = b"", apv: bytes = b"") -> bytes:
    """RFC 7518 section 4.6.2: SHA-256 rounds over counter || Z || OtherInfo."""
    other = (
        _length_prefixed(enc.encode())
        + _length_prefixed(apu)
        + _length_prefixed(apv)
        + key_bits.to_bytes(4, "big")
    )
    output = b""
    counter = 1
    while len(output) * 8 < key_bits:
        output += hashlib.sha256(counter.to_bytes(4, "big") + z + other).digest()
        counter += 1
    return output[: key_bits // 8]


def _point(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }


def encrypt(recipient: PublicJwk, plaintext: bytes, random: RandomSource) -> str:
    """A compact JWE of ``plaintext`` that only the holder of ``recipient``'s private key opens."""
    if recipient.alg != "ES256":
        raise InvalidRequestError("shares can be encrypted only to an EC P-256 key")
    scalar = int.from_bytes(random.bytes(32), "big") % (_P256_ORDER - 1) + 1
    ephemeral = ec.derive_private_key(scalar, ec.SECP256R1())
    z = ephemeral.exchange(ec.ECDH(), recipient.key)
    header = {
        "alg": ALG,
        "enc": ENC,
        "kid": recipient.thumbprint,
        "epk": _point(ephemeral.public_key()),
    }
    protected = b64url_encode(orjson.dumps(header))
    iv = random.bytes(12)
    sealed = AESGCM(concat_kdf(z, ENC, 256)).encrypt(iv, plaintext, protected.encode())
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ".".join(
        (protected, "", b64url_encode(iv), b64url_encode(ciphertext), b64url_encode(tag))
    )


def header_of(token: str) -> dict[str, Any]:
    """The protected header, unverified (to say which key a JWE is for)."""
    parts = _parts(token)
    return _header(parts[0])


def _parts(token: object) -> list[str]:
    if not isinstance(token, str) or len(token) > MAX_JWE_LENGTH:
        raise InvalidRequestError("not a compact JWE: expected five base64url parts")
    parts = token.strip().split(".")
    if len(parts) != 5:
        raise InvalidRequestError("not a compact JWE: expected five base64url parts")
    return parts


def _decode(segment: str, what: str) -> bytes:
    try:
        return b64url_decode(segment)
    except AuthenticationError:
        raise InvalidRequestError(f"the JWE's {what} is not base64url") from None


def _header(segment: str) -> dict[str, Any]:
    try:
        header = orjson.loads(_decode(segment, "header"))
    except orjson.JSONDecodeError:
        raise InvalidRequestError("the JWE's header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidRequestError("the JWE's header is not a JSON object")
    if header.get("alg") != ALG or header.get("enc") != ENC:
        raise InvalidRequestError(f"only alg {ALG} with enc {ENC} is accepted")
    unknown = set(header) - _HEADER_MEMBERS
    if unknown:
        raise InvalidRequestError(f"the JWE's header has unsupported members: {sorted(unknown)}")
    return header


def decrypt(private_key: ec.EllipticCurvePrivateKey, token: str) -> bytes:
    """Open a JWE made by ``encrypt`` with the holder's private key."""
    protected, encrypted_key, iv_text, ciphertext_text, tag_text = _parts(token)
    header = _header(protected)
    if encrypted_key:
        raise InvalidRequestError("ECDH-ES (direct) has an empty encrypted key part")
    epk = header.get("epk")
    if not isinstance(epk, dict) or epk.get("kty") != "EC" or epk.get("crv") != "P-256":
        raise InvalidRequestError("the JWE's epk must be an EC P-256 public key")
    try:
        x = int.from_bytes(_decode(str(epk.get("x", "")), "epk"), "big")
        y = int.from_bytes(_decode(str(epk.get("y", "")), "epk"), "big")
        ephemeral = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise InvalidRequestError("the JWE's epk is not a point on P-256") from None
    z = private_key.exchange(ec.ECDH(), ephemeral)
    apu = _decode(str(header.get("apu", "")), "apu")
    apv = _decode(str(header.get("apv", "")), "apv")
    iv, ciphertext, tag = (
        _decode(iv_text, "iv"),
        _decode(ciphertext_text, "ciphertext"),
        _decode(tag_text, "tag"),
    )
    if len(iv) != 12 or len(tag) != 16:
        raise InvalidRequestError("the JWE's iv must be 12 bytes and its tag 16")
    try:
        return AESGCM(concat_kdf(z, ENC, 256, apu, apv)).decrypt(
            iv, ciphertext + tag, protected.encode()
        )
    except InvalidTag:
        raise InvalidRequestError(
            "the JWE does not open with this key: it was encrypted to another holder, or altered"
        ) from None
