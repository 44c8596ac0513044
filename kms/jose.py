"""JOSE for Embassy KMS: compact JWS, public JWKs, client assertions and DPoP proofs.

Only what the service needs. A token never chooses how it is verified: the algorithm must equal
the one the key was registered for, keys are never fetched or taken from certificates (``jku``,
``x5u``, ``x5c``), extensions (``crit``, ``"b64": false``) are refused, and only ES256 and EdDSA
exist.

Every verification failure is one ``AuthenticationError``: the caller learns nothing, the audit
log gets a short reason that never quotes the token. Time is a parameter; there is no I/O.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from kms.errors import AuthenticationError, BackendError, InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Callable

ALLOWED_ALGS = frozenset({"ES256", "EdDSA"})
MAX_TOKEN_LENGTH = 8192
DPOP_TYPE = "dpop+jwt"
# An official's signed statement that it presents one unseal share (``sys/unseal``); a login
# refuses it, and unseal takes nothing else, so neither passes for the other.
UNSEAL_ASSERTION_TYPE = "ekms-unseal+jwt"

_MAX_ID_LENGTH = 128
_MAX_TIME = 2**40  # JSON numbers beyond this are not times (and cannot overflow a float)
_SIGNATURE_LENGTH = 64  # ES256 r || s and Ed25519 alike
_COORDINATE_LENGTH = 32
_FROM_URLSAFE = bytes.maketrans(b"-_+/=", b"+/!!!")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_REFUSED_HEADERS = ("crit", "jku", "x5u", "x5c")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "oth")
_OPTIONAL_MEMBERS = frozenset({"kid", "alg", "use"})
_NOT_ASSERTION_TYPES = frozenset({DPOP_TYPE, "at+jwt", UNSEAL_ASSERTION_TYPE})
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# RFC 7638 section 3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


@dataclass(frozen=True)
class _KeyType:
    kty: str
    crv: str
    alg: str
    members: tuple[str, ...]


_KEY_TYPES = {
    "EC": _KeyType("EC", "P-256", "ES256", _THUMBPRINT_MEMBERS["EC"]),
    "OKP": _KeyType("OKP", "Ed25519", "EdDSA", _THUMBPRINT_MEMBERS["OKP"]),
}


# --- base64url ----------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_TO_URLSAFE).decode()


def b64url_decode(text: str) -> bytes:
    """RFC 7515 base64url: URL-safe alphabet, no padding, and the one canonical spelling.

    Canonical means unused trailing bits are zero, so no two strings decode to the same bytes.
    """
    if not isinstance(text, str) or len(text) % 4 == 1 or not text.isascii():
        raise AuthenticationError("malformed base64url")
    standard = text.encode().translate(_FROM_URLSAFE)  # "+", "/" and "=" become invalid
    try:
        data = binascii.a2b_base64(standard + b"=" * (-len(standard) % 4), strict_mode=True)
    except binascii.Error:
        raise AuthenticationError("malformed base64url") from None
    if binascii.b2a_base64(data, newline=False).rstrip(b"=") != standard:
        raise AuthenticationError("malformed base64url")
    return data


# --- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicJwk:
    """A verified public key: its algorithm, RFC 7638 thumbprint and required members."""

    alg: str
    thumbprint: str
    members: Mapping[str, str] = field(hash=False)
    key: Any = field(repr=False, compare=False, hash=False)

    def to_json(self) -> dict[str, str]:
        return dict(self.members)

    def verify(self, signing_input: bytes, signature: bytes) -> None:
        if len(signature) != _SIGNATURE_LENGTH:
            raise AuthenticationError("bad signature")
        try:
            if self.alg == "ES256":
                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                self.key.verify(encode_dss_signature(r, s), signing_input, _ECDSA_SHA256)
            else:
                self.key.verify(signature, signing_input)
        except InvalidSignature:
            raise AuthenticationError("bad signature") from None


class _JwkError(Exception):
    """A JWK refused; the caller decides whether that is a bad request or a bad credential."""


def parse_public_jwk(obj: object) -> PublicJwk:
    """A public key an administrator registers: anything but EC P-256 or Ed25519 is refused."""
    try:
        return _parse_jwk(obj)
    except _JwkError as exc:
        raise InvalidRequestError(str(exc)) from None


def ec_jwk_from_der(der: bytes) -> PublicJwk:
    """The JWK of a P-256 public key as the HSM reports it (DER SubjectPublicKeyInfo)."""
    key = load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidRequestError("signing key is not an EC P-256 key")
    numbers = key.public_numbers()
    return parse_public_jwk(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }
    )


def jwk_thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members as sorted, whitespace-free JSON, base64url."""
    kty = members.get("kty")
    required = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if required is None or not all(isinstance(members.get(name), str) for name in required):
        raise InvalidRequestError("jwk thumbprint needs kty EC, OKP or RSA and its members")
    canonical = orjson.dumps({name: members[name] for name in required})
    return b64url_encode(hashlib.sha256(canonical).digest())


def _parse_jwk(obj: object) -> PublicJwk:
    if not isinstance(obj, Mapping):
        raise _JwkError("jwk must be a JSON object")
    for name in _PRIVATE_MEMBERS:
        if name in obj:
            raise _JwkError(f"jwk must not contain private member {name!r}")
    kty = obj.get("kty")
    key_type = _KEY_TYPES.get(kty) if isinstance(kty, str) else None
    if key_type is None:
        raise _JwkError("jwk kty must be EC (P-256) or OKP (Ed25519)")
    _check_members(obj, key_type)
    _check_optional_members(obj, key_type)
    return _public_jwk(key_type, *(obj[name] for name in key_type.members))


@functools.lru_cache(maxsize=1024)
def _public_jwk(key_type: _KeyType, *values: str) -> PublicJwk:
    """Build the key from the required members alone; cached, since a client reuses its key."""
    members = dict(zip(key_type.members, values, strict=True))
    coordinates = [_coordinate(members, name) for name in ("x", "y") if name in members]
    try:
        if key_type.kty == "EC":
            key: Any = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + b"".join(coordinates)
            )
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(coordinates[0])
    except ValueError:
        raise _JwkError(f"jwk is not a valid {key_type.crv} public key") from None
    return PublicJwk(key_type.alg, jwk_thumbprint(members), MappingProxyType(members), key)


def _check_members(obj: Mapping[Any, Any], key_type: _KeyType) -> None:
    allowed = _OPTIONAL_MEMBERS.union(key_type.members)
    if not set(obj) <= allowed:
        names = ", ".join(sorted(allowed))
        raise _JwkError(f"jwk members for kty {key_type.kty} are limited to {names}")
    for name in key_type.members:
        if not isinstance(obj.get(name), str):
            raise _JwkError(f"jwk member {name!r} must be present and a string")
    if obj["crv"] != key_type.crv:
        raise _JwkError(f"jwk crv must be {key_type.crv} for kty {key_type.kty}")


def _check_optional_members(obj: Mapping[Any, Any], key_type: _KeyType) -> None:
    if "alg" in obj:
        alg = obj["alg"]
        if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
            raise _JwkError("jwk alg must be ES256 or EdDSA")
        if alg != key_type.alg:
            raise _JwkError(f"jwk alg {alg} does not match kty {key_type.kty}")
    if "use" in obj and obj["use"] != "sig":
        raise _JwkError("jwk use must be sig")
    if "kid" in obj and not isinstance(obj["kid"], str):
        raise _JwkError("jwk kid must be a string")


def _coordinate(obj: Mapping[Any, Any], name: str) -> bytes:
    try:
        value = b64url_decode(obj[name])
    except AuthenticationError:
        raise _JwkError(f"jwk {name} must be unpadded base64url") from None
    if len(value) != _COORDINATE_LENGTH:
        raise _JwkError(f"jwk {name} must encode {_COORDINATE_LENGTH} bytes")
    return value


# --- JWS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jws:
    """A parsed compact JWS. Parsed is not verified: see ``verify_jws``."""

    header: Mapping[str, Any] = field(hash=False)
    claims: Mapping[str, Any] = field(hash=False)
    signing_input: bytes
    signature: bytes


def parse_jws(token: str) -> Jws:
    """Split and decode without verifying, so the caller can pick the key (``iss``, ``kid``)."""
    if not isinstance(token, str):
        raise AuthenticationError("token is not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthenticationError("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationError("token is not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object(header_b64, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise AuthenticationError("alg not allowed")
    for name in _REFUSED_HEADERS:
        if name in header:
            raise AuthenticationError(f"header {name} not allowed")
    if header.get("b64", True) is not True:
        raise AuthenticationError("unencoded payload not allowed")
    claims = _json_object(payload_b64, "payload")
    signature = b64url_decode(signature_b64)
    return Jws(header, claims, f"{header_b64}.{payload_b64}".encode("ascii"), signature)


def verify_jws(token: str | Jws, key: PublicJwk, *, typ: str | None = None) -> Jws:
    """Verify under ``key``, whose algorithm the header must name exactly."""
    jws = token if isinstance(token, Jws) else parse_jws(token)
    if jws.header.get("alg") != key.alg:
        raise AuthenticationError("alg does not match key")
    if typ is not None and _media_type(jws.header.get("typ")) != typ.lower():
        raise AuthenticationError("typ mismatch")
    key.verify(jws.signing_input, jws.signature)
    return jws


def encode_jws(
    header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """Compact JWS; ``sign`` returns the raw 64-byte signature (an HSM's CKM_ECDSA or EdDSA)."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise ValueError("header alg must be ES256 or EdDSA")
    header_b64 = b64url_encode(orjson.dumps(dict(header)))
    signing_input = f"{header_b64}.{b64url_encode(orjson.dumps(dict(claims)))}"
    signature = sign(signing_input.encode("ascii"))
    if len(signature) != _SIGNATURE_LENGTH:
        raise BackendError(f"signer returned {len(signature)} bytes, not a raw JWS signature")
    return f"{signing_input}.{b64url_encode(bytes(signature))}"


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(b64url_decode(segment))
    except orjson.JSONDecodeError:
        raise AuthenticationError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise AuthenticationError(f"{what} is not a JSON object")
    return value


def _media_type(value: object) -> str | None:
    """RFC 7515 section 4.1.9: compared case-insensitively, ``application/`` optional."""
    if not isinstance(value, str):
        return None
    return value.lower().removeprefix("application/")


# --- client assertions (RFC 7523 private_key_jwt) -----------------------------------------


@dataclass(frozen=True)
class AssertionClaims:
    subject: str
    jti: str
    issued_at: float | None
    expires_at: float


def unverified_issuer(token: str) -> str:
    """Whose key to fetch for a login assertion. Nothing here is verified yet."""
    issuer = parse_jws(token).claims.get("iss")
    if not isinstance(issuer, str) or not 0 < len(issuer) <= _MAX_ID_LENGTH:
        raise AuthenticationError("assertion iss missing or malformed")
    return issuer


def verify_client_assertion(
    token: str,
    key: PublicJwk,
    *,
    principal_id: str,
    audience: str,
    now: float,
    max_lifetime: float = 300.0,
    leeway: float = 30.0,
) -> AssertionClaims:
    """RFC 7523 section 3, for a principal authenticating with its registered key."""
    try:
        jws = parse_jws(token)
        _check_assertion_type(jws.header)
        verify_jws(jws, key)
        return assertion_claims(
            jws.claims,
            principal_id=principal_id,
            audience=audience,
            now=now,
            max_lifetime=max_lifetime,
            leeway=leeway,
        )
    except AuthenticationError as exc:
        raise AuthenticationError(f"assertion {exc.reason}") from None


def _check_assertion_type(header: Mapping[str, Any]) -> None:
    """Any ``typ`` but a DPoP proof's or an access token's, so neither passes for a login."""
    if "typ" in header:
        media_type = _media_type(header["typ"])
        if media_type is None or media_type in _NOT_ASSERTION_TYPES:
            raise AuthenticationError("typ not allowed")


def assertion_claims(
    claims: Mapping[str, Any],
    *,
    principal_id: str,
    audience: str,
    now: float,
    max_lifetime: float,
    leeway: float,
) -> AssertionClaims:
    """The claims of a verified assertion: issuer, audience, a short life, and a ``jti``."""
    if claims.get("iss") != principal_id:
        raise AuthenticationError("iss mismatch")
    if claims.get("sub") != principal_id:
        raise AuthenticationError("sub mismatch")
    aud = claims.get("aud")
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise AuthenticationError("aud mismatch")
    exp = _time(claims, "exp")
    if exp is None:
        raise AuthenticationError("exp missing")
    if exp <= now - leeway:
        raise AuthenticationError("expired")
    if exp - now > max_lifetime + leeway:
        raise AuthenticationError("lifetime too long")
    nbf = _time(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise AuthenticationError("not yet valid")
    iat = _time(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise AuthenticationError("issued in the future")
    if iat is not None and iat < now - max_lifetime - leeway:
        raise AuthenticationError("issued too long ago")
    return AssertionClaims(principal_id, _jti(claims), iat, exp)


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate, or None if absent; present but not a plausible time is refused."""
    if name not in claims:
        return None
    value = claims[name]
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 <= value < _MAX_TIME  # also refuses NaN and infinities
    ):
        raise AuthenticationError(f"{name} malformed")
    return float(value)


def _jti(claims: Mapping[str, Any]) -> str:
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= _MAX_ID_LENGTH:
        raise AuthenticationError("jti missing or malformed")
    return jti


# --- DPoP (RFC 9449) ----------------------------------------------------------------------


@dataclass(frozen=True)
class DpopProof:
    jti: str
    issued_at: float
    thumbprint: str


DPOP_LEEWAY = 5.0  # seconds a proof's iat may lie ahead of our clock
_DEFAULT_PORTS = {"http": 80, "https": 443}
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@functools.lru_cache(maxsize=256)
def normalise_htu(url: str) -> str:
    """RFC 9449 section 4.3 with RFC 3986 section 6.2.2-6.2.3 normalisation.

    Scheme and host lower-cased, default port dropped, empty path as ``/``, percent-escapes
    upper-cased (unreserved characters decoded), query and fragment dropped. Only http(s) URLs
    with a host and without userinfo are accepted.
    """
    if not isinstance(url, str) or not _VISIBLE_ASCII.fullmatch(url):
        raise AuthenticationError("malformed htu")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise AuthenticationError("malformed htu") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc:
        raise AuthenticationError("malformed htu")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    path = _PERCENT_ESCAPE.sub(_normalise_escape, parts.path) or "/"
    return f"{scheme}://{host}{path}"


def _normalise_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group()[1:], 16))
    return char if char in _UNRESERVED else match.group().upper()


def verify_dpop_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str | None,
    expected_thumbprint: str | None,
    now: float,
    max_age: float = 60.0,
    leeway: float = DPOP_LEEWAY,
) -> DpopProof:
    """RFC 9449 section 4.3. The caller enforces one-time use of the returned ``jti``."""
    try:
        return _dpop_proof(
            proof,
            method=method,
            url=url,
            access_token=access_token,
            expected_thumbprint=expected_thumbprint,
            now=now,
            max_age=max_age,
            leeway=leeway,
        )
    except AuthenticationError as exc:
        raise AuthenticationError(f"DPoP proof {exc.reason}") from None


def _dpop_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str | None,
    expected_thumbprint: str | None,
    now: float,
    max_age: float,
    leeway: float,
) -> DpopProof:
    jws = parse_jws(proof)
    if _media_type(jws.header.get("typ")) != DPOP_TYPE:
        raise AuthenticationError("typ mismatch")
    try:
        key = _parse_jwk(jws.header.get("jwk"))
    except _JwkError as exc:
        raise AuthenticationError(str(exc)) from None
    if expected_thumbprint is not None and not _equal(key.thumbprint, expected_thumbprint):
        raise AuthenticationError("key does not match the token's binding")
    verify_jws(jws, key)
    claims = jws.claims
    jti = _jti(claims)
    if claims.get("htm") != method:
        raise AuthenticationError("htm mismatch")
    htu = claims.get("htu")
    if not isinstance(htu, str) or normalise_htu(htu) != normalise_htu(url):
        raise AuthenticationError("htu mismatch")
    iat = _time(claims, "iat")
    if iat is None:
        raise AuthenticationError("iat missing")
    if iat < now - max_age:
        raise AuthenticationError("too old")
    if iat > now + leeway:
        raise AuthenticationError("issued in the future")
    if access_token is not None:
        _check_ath(claims.get("ath"), access_token)
    return DpopProof(jti, iat, key.thumbprint)


def _check_ath(ath: object, access_token: str) -> None:
    if not isinstance(ath, str):
        raise AuthenticationError("ath missing")
    if not access_token.isascii():
        raise AuthenticationError("access token is not ASCII")
    expected = b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())
    if not _equal(ath, expected):
        raise AuthenticationError("ath mismatch")


def _equal(a: str, b: str) -> bool:
    """Constant-time string comparison that cannot raise (compare_digest refuses non-ASCII)."""
    return a.isascii() and b.isascii() and hmac.compare_digest(a, b)
