from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import jose
from kms.errors import AuthenticationError, BackendError, InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Callable

NOW = 1_750_000_000
AUD = "https://kms.example/v1/auth/login"
PRINCIPAL = "tool-1"
URL = "https://kms.example/v1/transit/decrypt/ds-1"
ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0b29sLTEifQ.c2lnbmF0dXJl"
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_OTHER = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_OTHER = ed25519.Ed25519PrivateKey.generate()
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# --- helpers --------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }


def ed_jwk(key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}


def jwk_of(key: PrivateKey) -> dict[str, str]:
    return ec_jwk(key) if isinstance(key, ec.EllipticCurvePrivateKey) else ed_jwk(key)


def alg_of(key: PrivateKey) -> str:
    return "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "EdDSA"


def public(key: PrivateKey) -> jose.PublicJwk:
    return jose.parse_public_jwk(jwk_of(key))


def sign_raw(key: PrivateKey, data: bytes) -> bytes:
    """The raw JWS signature: r || s for ES256, as an HSM's CKM_ECDSA returns it."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return key.sign(data)


def token(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey | None = None) -> str:
    """A compact JWS built by hand, so headers can say anything; unsigned if no key."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    signature = b"" if key is None else sign_raw(key, signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def with_signature(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return f"{b64json(header)}.{b64json(claims)}.{b64(signature)}"


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; an override of None removes the member."""
    out = {**base, **overrides}
    return {k: v for k, v in out.items() if v is not None}


def assertion_claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "iss": PRINCIPAL,
        "sub": PRINCIPAL,
        "aud": AUD,
        "iat": NOW,
        "exp": NOW + 120,
        "jti": "assertion-1",
    }
    return merged(base, overrides)


def assertion(key: PrivateKey = EC_KEY, header: dict[str, Any] | None = None, **claims: Any) -> str:
    return token(
        merged({"alg": alg_of(key), "typ": "JWT"}, header or {}), assertion_claims(**claims), key
    )


def check_assertion(tok: str, key: PrivateKey = EC_KEY, **kwargs: Any) -> jose.AssertionClaims:
    return jose.verify_client_assertion(
        tok, public(key), principal_id=PRINCIPAL, audience=AUD, now=float(NOW), **kwargs
    )


def ath(access_token: str) -> str:
    return b64(hashlib.sha256(access_token.encode()).digest())


def proof_claims(**overrides: Any) -> dict[str, Any]:
    base = {"jti": "proof-1", "htm": "POST", "htu": URL, "iat": NOW, "ath": ath(ACCESS_TOKEN)}
    return merged(base, overrides)


def proof(key: PrivateKey = ED_KEY, header: dict[str, Any] | None = None, **claims: Any) -> str:
    base = {"typ": "dpop+jwt", "alg": alg_of(key), "jwk": jwk_of(key)}
    return token(merged(base, header or {}), proof_claims(**claims), key)


def check_proof(tok: str, **kwargs: Any) -> jose.DpopProof:
    options: dict[str, Any] = {
        "method": "POST",
        "url": URL,
        "access_token": ACCESS_TOKEN,
        "expected_thumbprint": None,
        "now": float(NOW),
    }
    options.update(kwargs)
    return jose.verify_dpop_proof(tok, **options)


def refused(call: Any, tok: object, *args: Any, **kwargs: Any) -> str:
    """Run ``call``; it must raise AuthenticationError whose reason quotes nothing of ``tok``."""
    with pytest.raises(AuthenticationError) as info:
        call(tok, *args, **kwargs)
    error = info.value
    assert str(error) == "authentication failed"
    assert error.args == ("authentication failed",)
    assert len(error.reason) <= 120
    if isinstance(tok, str):
        for segment in tok.split("."):
            if len(segment) >= 8:
                assert segment not in error.reason
    return error.reason


def tampered(tok: str, **changes: Any) -> str:
    """Change claims and keep the original header and signature."""
    header, payload, signature = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64json(merged(claims, changes))}.{signature}"


# --- base64url ------------------------------------------------------------------------------


def test_b64url_known_values() -> None:
    assert jose.b64url_encode(b"") == ""
    assert jose.b64url_encode(b"\xfb\xff") == "-_8"
    assert jose.b64url_encode(b"\x00\x00") == "AAA"
    assert jose.b64url_decode("-_8") == b"\xfb\xff"
    assert jose.b64url_decode("") == b""


@given(st.binary(max_size=200))
def test_b64url_round_trip(data: bytes) -> None:
    text = jose.b64url_encode(data)
    assert "=" not in text
    assert text == b64(data)
    assert jose.b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "A",  # a length no encoding has
        "AAAAA",
        "AA==",  # padding
        "AAA=",
        "-_8=",
        "=AA",
        "A=A",
        "+/8",  # standard alphabet
        "ab/c",
        "ab c",  # whitespace
        "AB\n",
        "\u00e9A",  # not ASCII
        "AB",  # non-canonical: unused trailing bits set ("AA" is the spelling of b"\0")
        "AAB",
    ],
)
def test_b64url_decode_is_strict(text: str) -> None:
    assert refused(jose.b64url_decode, text) == "malformed base64url"


# --- thumbprints ----------------------------------------------------------------------------


def test_thumbprint_rfc8037_a3_ed25519() -> None:
    members = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    expected = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert jose.jwk_thumbprint(members) == expected
    assert jose.parse_public_jwk(members).thumbprint == expected


def test_thumbprint_rfc7638_3_1_rsa() -> None:
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    members = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jose.jwk_thumbprint(members) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_thumbprint_matches_independent_computation(key: PrivateKey) -> None:
    members = jwk_of(key)
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    expected = b64(hashlib.sha256(canonical).digest())
    assert jose.jwk_thumbprint(members) == expected
    shuffled = dict(reversed([*members.items(), ("kid", "k1"), ("use", "sig")]))
    assert jose.jwk_thumbprint(shuffled) == expected
    assert public(key).thumbprint == expected


@pytest.mark.parametrize(
    "members",
    [{}, {"kty": "oct", "k": "AAAA"}, {"kty": "EC", "crv": "P-256", "x": "AA"}, {"kty": 1}],
)
def test_thumbprint_needs_known_type_and_members(members: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        jose.jwk_thumbprint(members)


# --- public JWKs ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_parse_public_jwk_keeps_required_members_only(key: PrivateKey) -> None:
    members = jwk_of(key)
    parsed = jose.parse_public_jwk({**members, "kid": "k1", "alg": alg_of(key), "use": "sig"})
    assert parsed.alg == alg_of(key)
    assert dict(parsed.members) == members
    assert parsed.to_json() == members
    assert parsed == jose.parse_public_jwk(members)
    assert len({parsed, jose.parse_public_jwk(members)}) == 1
    assert "key=" not in repr(parsed)
    with pytest.raises(TypeError):
        parsed.members["x"] = "changed"  # type: ignore[index]


def test_public_key_objects_match_the_private_keys() -> None:
    assert public(EC_KEY).key.public_numbers() == EC_KEY.public_key().public_numbers()
    raw = ED_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert public(ED_KEY).key.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw


def _coordinate(value: int) -> str:
    return b64(value.to_bytes(32, "big"))


def _bad_jwks() -> list[tuple[str, object, str]]:
    ecj, edj = ec_jwk(EC_KEY), ed_jwk(ED_KEY)
    numbers = EC_KEY.private_numbers()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    y = EC_KEY.public_key().public_numbers().y
    return [
        ("d in EC", {**ecj, "d": _coordinate(numbers.private_value)}, "private member 'd'"),
        ("d in OKP", {**edj, "d": edj["x"]}, "private member 'd'"),
        *[(f"{m} member", {**ecj, m: "AQAB"}, f"private member {m!r}") for m in ("p", "q")],
        *[(f"{m} member", {**ecj, m: "AQAB"}, f"private member {m!r}") for m in ("dp", "dq")],
        ("qi member", {**ecj, "qi": "AQAB"}, "private member 'qi'"),
        ("oth member", {**ecj, "oth": []}, "private member 'oth'"),
        ("oct", {"kty": "oct", "k": "c2VjcmV0"}, "private member 'k'"),
        ("oct without k", {"kty": "oct"}, "kty must be EC"),
        ("RSA", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "kty must be EC"),
        ("kty missing", {"crv": "P-256", "x": ecj["x"], "y": ecj["y"]}, "kty must be EC"),
        ("kty not a string", {**ecj, "kty": ["EC"]}, "kty must be EC"),
        ("kty lower case", {**ecj, "kty": "ec"}, "kty must be EC"),
        (
            "P-384",
            {"kty": "EC", "crv": "P-384", "x": b64(p384.x.to_bytes(48, "big")), "y": ecj["y"]},
            "crv must be P-256",
        ),
        ("secp256k1", {**ecj, "crv": "secp256k1"}, "crv must be P-256"),
        ("X25519", {**edj, "crv": "X25519"}, "crv must be Ed25519"),
        ("Ed448", {**edj, "crv": "Ed448"}, "crv must be Ed25519"),
        ("EC with OKP curve", {**ecj, "crv": "Ed25519"}, "crv must be P-256"),
        ("x short", {**ecj, "x": b64(b"\x01" * 31)}, "x must encode 32 bytes"),
        ("x long", {**ecj, "x": b64(b"\x01" * 33)}, "x must encode 32 bytes"),
        ("P-384 sized y", {**ecj, "y": b64(p384.y.to_bytes(48, "big"))}, "y must encode"),
        ("OKP x short", {**edj, "x": b64(b"\x01" * 31)}, "x must encode 32 bytes"),
        ("x padded", {**ecj, "x": ecj["x"] + "="}, "x must be unpadded base64url"),
        ("x standard alphabet", {**edj, "x": "+" + edj["x"][1:]}, "unpadded base64url"),
        ("y missing", {k: v for k, v in ecj.items() if k != "y"}, "member 'y'"),
        ("x not a string", {**edj, "x": 12345}, "member 'x'"),
        ("crv not a string", {**ecj, "crv": None}, "member 'crv'"),
        ("off the curve", {**ecj, "y": _coordinate((y + 1) % P256_P)}, "valid P-256"),
        ("x beyond the field", {**ecj, "x": _coordinate(P256_P)}, "valid P-256"),
        ("alg EdDSA on EC", {**ecj, "alg": "EdDSA"}, "alg EdDSA does not match kty EC"),
        ("alg ES256 on OKP", {**edj, "alg": "ES256"}, "alg ES256 does not match kty OKP"),
        ("alg RS256", {**ecj, "alg": "RS256"}, "alg must be ES256 or EdDSA"),
        ("alg ES384", {**ecj, "alg": "ES384"}, "alg must be ES256 or EdDSA"),
        ("alg none", {**ecj, "alg": "none"}, "alg must be ES256 or EdDSA"),
        ("use enc", {**ecj, "use": "enc"}, "use must be sig"),
        ("kid not a string", {**ecj, "kid": 7}, "kid must be a string"),
        ("x5c", {**ecj, "x5c": ["MIIB"]}, "members for kty EC are limited"),
        ("y in OKP", {**edj, "y": ecj["y"]}, "members for kty OKP are limited"),
        ("list", [ecj], "JSON object"),
        ("string", json.dumps(ecj), "JSON object"),
        ("None", None, "JSON object"),
    ]


@pytest.mark.parametrize(
    ("jwk", "message"),
    [pytest.param(jwk, message, id=name) for name, jwk, message in _bad_jwks()],
)
def test_parse_public_jwk_refusals(jwk: object, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        jose.parse_public_jwk(jwk)
    assert type(info.value) is InvalidRequestError
    assert message in str(info.value)


def test_parse_cache_does_not_skip_checks() -> None:
    jose.parse_public_jwk(ec_jwk(EC_KEY))  # now cached
    with pytest.raises(InvalidRequestError, match="private member 'd'"):
        jose.parse_public_jwk({**ec_jwk(EC_KEY), "d": "AAAA"})
    with pytest.raises(InvalidRequestError, match="does not match"):
        jose.parse_public_jwk({**ec_jwk(EC_KEY), "alg": "EdDSA"})


# --- JWS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_encode_verify_round_trip(key: PrivateKey) -> None:
    header = {"alg": alg_of(key), "typ": "at+jwt", "kid": "k1"}
    claims = {"sub": "tool-1", "roles": ["restore-tool"], "cnf": {"jkt": "abc"}}
    tok = jose.encode_jws(header, claims, lambda data: sign_raw(key, data))
    jws = jose.verify_jws(tok, public(key), typ="at+jwt")
    assert dict(jws.header) == header
    assert dict(jws.claims) == claims
    assert jws.signing_input == tok.rsplit(".", 1)[0].encode()
    assert " " not in base64.urlsafe_b64decode(tok.split(".")[0] + "==").decode()
    assert jose.verify_jws(jose.parse_jws(tok), public(key)) == jws
    # interoperable: PyJWT verifies what we mint
    decoded = jwt.decode(tok, key.public_key(), algorithms=[alg_of(key)])
    assert decoded == claims


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_pyjwt_assertions_verify(key: PrivateKey) -> None:
    tok = jwt.encode(assertion_claims(), key, algorithm=alg_of(key), headers={"kid": "k1"})
    result = check_assertion(tok, key)
    assert result == jose.AssertionClaims(PRINCIPAL, "assertion-1", float(NOW), NOW + 120.0)


def test_encode_jws_refuses_other_algs_and_der_signatures() -> None:
    with pytest.raises(ValueError, match="alg"):
        jose.encode_jws({"alg": "HS256"}, {}, lambda _: b"\0" * 64)
    with pytest.raises(ValueError, match="alg"):
        jose.encode_jws({"typ": "JWT"}, {}, lambda _: b"\0" * 64)
    with pytest.raises(BackendError):
        jose.encode_jws(
            {"alg": "ES256"}, {}, lambda data: EC_KEY.sign(data, ec.ECDSA(hashes.SHA256()))
        )


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+JWT"])
def test_verify_jws_typ_accepted(typ: str) -> None:
    tok = token({"alg": "ES256", "typ": typ}, {"sub": "x"}, EC_KEY)
    jose.verify_jws(tok, public(EC_KEY), typ="at+jwt")


@pytest.mark.parametrize("typ", [None, "JWT", "dpop+jwt", "at+jwt+x", "application/jwt", 1])
def test_verify_jws_typ_refused(typ: object) -> None:
    tok = token(merged({"alg": "ES256"}, {"typ": typ}), {"sub": "x"}, EC_KEY)
    assert refused(jose.verify_jws, tok, public(EC_KEY), typ="at+jwt") == "typ mismatch"


def test_parse_jws_does_not_verify() -> None:
    tok = token({"alg": "ES256", "kid": "k1"}, {"iss": "someone"}, EC_OTHER)
    jws = jose.parse_jws(tok)
    assert jws.header["kid"] == "k1"
    assert jws.claims["iss"] == "someone"
    assert len(jws.signature) == 64


def test_token_length_limit() -> None:
    def sized(length: int) -> str:
        claims = {"sub": "x", "pad": ""}
        base = len(token({"alg": "EdDSA"}, claims, ED_KEY))
        claims["pad"] = "p" * ((length - base) * 3 // 4)  # base64 grows by 4/3
        tok = token({"alg": "EdDSA"}, claims, ED_KEY)
        while len(tok) < length:
            claims["pad"] += "p"
            tok = token({"alg": "EdDSA"}, claims, ED_KEY)
        return tok

    fits = sized(8190)
    assert len(fits) <= 8192
    jose.verify_jws(fits, public(ED_KEY))
    too_long = sized(8193)
    assert len(too_long) > 8192
    assert refused(jose.verify_jws, too_long, public(ED_KEY)) == "token too long"
    assert refused(jose.parse_jws, "." * 9000) == "token too long"
    assert refused(jose.parse_jws, "a" * 8192) == "token is not a compact JWS"
    assert refused(jose.parse_jws, "a" * 8193) == "token too long"


# --- the attack battery ---------------------------------------------------------------------


def _hs256(secret: bytes, claims: dict[str, Any]) -> str:
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _ec_pem() -> bytes:
    return EC_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _attacks() -> list[tuple[str, str, str]]:
    """(name, token, expected reason) for a principal whose registered key is EC_KEY."""
    good = assertion()
    header, payload, signature = good.split(".")
    es256 = {"alg": "ES256", "typ": "JWT"}
    claims = assertion_claims()
    jwk_json = json.dumps(ec_jwk(EC_KEY), separators=(",", ":")).encode()
    der = EC_KEY.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    forged_es256_hmac = hmac.new(
        _ec_pem(), f"{b64json(es256)}.{b64json(claims)}".encode(), "sha512"
    )
    return [
        ("alg none", token({"alg": "none", "typ": "JWT"}, claims), "alg not allowed"),
        ("alg None", token({"alg": "None"}, claims), "alg not allowed"),
        ("alg NONE", token({"alg": "NONE"}, claims), "alg not allowed"),
        (
            "alg none, real signature",
            f"{b64json({'alg': 'none'})}.{payload}.{signature}",
            "alg not allowed",
        ),
        ("HS256 with JWK JSON", _hs256(jwk_json, claims), "alg not allowed"),
        ("HS256 with PEM", _hs256(_ec_pem(), claims), "alg not allowed"),
        (
            "HS256 with thumbprint",
            _hs256(public(EC_KEY).thumbprint.encode(), claims),
            "alg not allowed",
        ),
        (
            "ES256 header, HMAC-SHA512 of PEM",
            with_signature(es256, claims, forged_es256_hmac.digest()),
            "bad signature",
        ),
        ("RS256", with_signature({"alg": "RS256"}, claims, b"\x01" * 256), "alg not allowed"),
        ("PS256", with_signature({"alg": "PS256"}, claims, b"\x01" * 256), "alg not allowed"),
        ("ES384", with_signature({"alg": "ES384"}, claims, b"\x01" * 96), "alg not allowed"),
        ("ES256K", token({"alg": "ES256K"}, claims, EC_KEY), "alg not allowed"),
        ("es256 lower case", token({"alg": "es256"}, claims, EC_KEY), "alg not allowed"),
        ("alg missing", token({"typ": "JWT"}, claims, EC_KEY), "alg not allowed"),
        ("alg a list", token({"alg": ["ES256"]}, claims, EC_KEY), "alg not allowed"),
        ("alg null", token({"alg": None}, claims, EC_KEY), "alg not allowed"),
        ("EdDSA header, EC key", token({"alg": "EdDSA"}, claims, EC_KEY), "alg does not match key"),
        ("wrong aud", assertion(aud="https://other.example/"), "aud mismatch"),
        ("aud list without us", assertion(aud=["https://a/", "https://b/"]), "aud mismatch"),
        ("aud missing", assertion(aud=None), "aud mismatch"),
        ("aud an object", assertion(aud={"aud": AUD}), "aud mismatch"),
        ("expired", assertion(iat=NOW - 200, exp=NOW - 31), "expired"),
        ("expired at the leeway", assertion(iat=NOW - 200, exp=NOW - 30), "expired"),
        ("lifetime too long", assertion(exp=NOW + 331), "lifetime too long"),
        ("not yet valid", assertion(nbf=NOW + 31), "not yet valid"),
        ("issued in the future", assertion(iat=NOW + 31), "issued in the future"),
        ("issued too long ago", assertion(iat=NOW - 331), "issued too long ago"),
        ("exp missing", assertion(exp=None), "exp missing"),
        ("exp a string", assertion(exp=str(NOW + 60)), "exp malformed"),
        ("exp true", assertion(exp=True), "exp malformed"),
        ("exp null", token(es256, {**claims, "exp": None}, EC_KEY), "exp malformed"),
        ("exp negative", assertion(exp=-1), "exp malformed"),
        ("exp huge", assertion(exp=1e300), "exp malformed"),
        ("nbf a string", assertion(nbf="now"), "nbf malformed"),
        ("iss != sub", assertion(sub="admin"), "sub mismatch"),
        ("iss other principal", assertion(iss="admin", sub="admin"), "iss mismatch"),
        ("iss missing", assertion(iss=None), "iss mismatch"),
        ("jti missing", assertion(jti=None), "jti missing or malformed"),
        ("jti empty", assertion(jti=""), "jti missing or malformed"),
        ("jti too long", assertion(jti="j" * 129), "jti missing or malformed"),
        ("jti a number", assertion(jti=7), "jti missing or malformed"),
        ("tampered sub", tampered(good, sub="admin", iss="admin"), "bad signature"),
        ("tampered exp", tampered(good, exp=NOW + 200), "bad signature"),
        ("another key", assertion(EC_OTHER), "bad signature"),
        ("Ed25519 key, EdDSA header", assertion(ED_KEY), "alg does not match key"),
        (
            "signature truncated to 63 bytes",
            f"{header}.{payload}.{b64(b'x' * 63)}",
            "bad signature",
        ),
        ("signature cut short", f"{header}.{payload}.{signature[:-2]}", "bad signature"),
        ("signature empty", f"{header}.{payload}.", "bad signature"),
        ("signature zero", f"{header}.{payload}.{b64(bytes(64))}", "bad signature"),
        (
            "DER signature",
            f"{header}.{payload}.{b64(der)}",
            "bad signature",
        ),
        ("signature not base64url", f"{header}.{payload}.{signature}=", "malformed base64url"),
        ("extra segment", f"{good}.{signature}", "token is not a compact JWS"),
        ("two segments", f"{header}.{payload}", "token is not a compact JWS"),
        (
            "JWE shape",
            f"{header}.{payload}.{signature}.{signature}.{signature}",
            "token is not a compact JWS",
        ),
        ("jku", assertion(header={"jku": "https://evil.example/jwks"}), "header jku not allowed"),
        ("x5u", assertion(header={"x5u": "https://evil.example/cert"}), "header x5u not allowed"),
        ("x5c", assertion(header={"x5c": ["MIIB"]}), "header x5c not allowed"),
        ("crit", assertion(header={"crit": ["exp"], "exp": 1}), "header crit not allowed"),
        ("b64 false", assertion(header={"b64": False}), "unencoded payload not allowed"),
        ("typ dpop+jwt", assertion(header={"typ": "dpop+jwt"}), "typ not allowed"),
        ("typ at+jwt", assertion(header={"typ": "at+jwt"}), "typ not allowed"),
        (
            "typ application/AT+JWT",
            assertion(header={"typ": "application/AT+JWT"}),
            "typ not allowed",
        ),
        ("typ not a string", assertion(header={"typ": ["JWT"]}), "typ not allowed"),
        (
            "header an array",
            f"{b64json([es256])}.{payload}.{signature}",
            "header is not a JSON object",
        ),
        ("header not JSON", f"{b64(b'{alg')}.{payload}.{signature}", "header is not JSON"),
        (
            "payload an array",
            f"{header}.{b64json([claims])}.{signature}",
            "payload is not a JSON object",
        ),
        ("payload empty", f"{header}..{signature}", "payload is not JSON"),
    ]


@pytest.mark.parametrize(
    ("tok", "reason"), [pytest.param(tok, reason, id=name) for name, tok, reason in _attacks()]
)
def test_assertion_attack_battery(tok: str, reason: str) -> None:
    assert refused(check_assertion, tok) == f"assertion {reason}"


def test_hs256_refused_even_past_the_parser() -> None:
    """If a forged HS256 token ever reached verification, the key's own alg would still decide."""
    for secret in (_ec_pem(), json.dumps(ec_jwk(EC_KEY)).encode()):
        header, payload, signature = _hs256(secret, assertion_claims()).split(".")
        jws = jose.Jws(
            {"alg": "HS256"},
            assertion_claims(),
            f"{header}.{payload}".encode(),
            b64decode(signature),
        )
        assert refused(jose.verify_jws, jws, public(EC_KEY)) == "alg does not match key"


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_assertion_accepted(key: PrivateKey) -> None:
    result = check_assertion(assertion(key), key)
    assert result == jose.AssertionClaims(PRINCIPAL, "assertion-1", float(NOW), NOW + 120.0)


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        pytest.param({"typ": None}, {}, id="no typ"),
        pytest.param({"typ": "client-authentication+jwt"}, {}, id="other typ"),
        pytest.param({}, {"aud": ["https://other/", AUD]}, id="aud list"),
        pytest.param({}, {"iat": None}, id="no iat"),
        pytest.param({}, {"exp": NOW - 29}, id="expired within leeway"),
        pytest.param({}, {"exp": NOW + 330}, id="longest lifetime"),
        pytest.param({}, {"nbf": NOW + 30}, id="nbf within leeway"),
        pytest.param({}, {"iat": NOW + 30}, id="iat within leeway"),
        pytest.param({}, {"iat": NOW - 330}, id="oldest iat"),
        pytest.param({}, {"exp": NOW + 60.5, "iat": NOW - 0.5}, id="fractional times"),
        pytest.param({}, {"jti": "j" * 128}, id="longest jti"),
    ],
)
def test_assertion_edges_accepted(header: dict[str, Any], claims: dict[str, Any]) -> None:
    result = check_assertion(assertion(EC_KEY, header, **claims))
    assert result.subject == PRINCIPAL


def test_assertion_limits_are_parameters() -> None:
    tok = assertion(exp=NOW + 100)
    assert refused(check_assertion, tok, max_lifetime=60.0, leeway=0.0) == (
        "assertion lifetime too long"
    )
    assert check_assertion(tok, max_lifetime=100.0, leeway=0.0).expires_at == NOW + 100


def test_unverified_issuer() -> None:
    assert jose.unverified_issuer(assertion()) == PRINCIPAL
    assert jose.unverified_issuer(assertion(EC_OTHER, iss="x" * 128)) == "x" * 128
    for tok in (
        assertion(iss=None),
        assertion(iss=""),
        assertion(iss="x" * 129),
        assertion(iss=["tool-1"]),
        token({"alg": "none"}, assertion_claims()),
    ):
        refused(jose.unverified_issuer, tok)


# --- DPoP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [EC_KEY, ED_KEY], ids=["ES256", "EdDSA"])
def test_dpop_proof_accepted(key: PrivateKey) -> None:
    thumbprint = public(key).thumbprint
    result = check_proof(proof(key), expected_thumbprint=thumbprint)
    assert result == jose.DpopProof("proof-1", float(NOW), thumbprint)


@pytest.mark.parametrize(
    ("tok", "kwargs"),
    [
        pytest.param(proof(htu=URL + "?a=1#frag"), {"url": URL + "?b=2"}, id="query ignored"),
        pytest.param(proof(htu="HTTPS://KMS.example:443/v1/transit/decrypt/ds-1"), {}, id="case"),
        pytest.param(
            proof(htu="http://kms.example:80/x"), {"url": "http://kms.example/x"}, id="80"
        ),
        pytest.param(proof(iat=NOW - 60), {}, id="oldest iat"),
        pytest.param(proof(iat=NOW + 5), {}, id="newest iat"),
        pytest.param(proof(ath=None), {"access_token": None}, id="no token, no ath"),
        pytest.param(proof(), {"access_token": None}, id="no token, ath ignored"),
        pytest.param(proof(header={"typ": "application/DPoP+JWT"}), {}, id="typ spelling"),
        pytest.param(
            proof(header={"jwk": {**ed_jwk(ED_KEY), "kid": "k", "use": "sig"}}), {}, id="kid"
        ),
        pytest.param(proof(htm="LIST"), {"method": "LIST"}, id="LIST"),
    ],
)
def test_dpop_proof_edges_accepted(tok: str, kwargs: dict[str, Any]) -> None:
    assert check_proof(tok, **kwargs).jti == "proof-1"


def _dpop_attacks() -> list[tuple[str, str, dict[str, Any], str]]:
    """(name, proof, verify_dpop_proof overrides, expected reason)."""
    good = proof()
    ecj = ec_jwk(EC_KEY)
    private_ec = {**ecj, "d": b64(EC_KEY.private_numbers().private_value.to_bytes(32, "big"))}
    ed_thumbprint = public(ED_KEY).thumbprint
    return [
        ("wrong htm", proof(htm="GET"), {}, "htm mismatch"),
        ("lower-case htm", proof(htm="post"), {}, "htm mismatch"),
        ("htm missing", proof(htm=None), {}, "htm mismatch"),
        ("other path", proof(htu=URL[:-1] + "2"), {}, "htu mismatch"),
        ("path prefix", proof(htu=URL[: URL.rindex("/")]), {}, "htu mismatch"),
        ("other host", proof(htu=URL.replace("kms.example", "evil.example")), {}, "htu mismatch"),
        ("other scheme", proof(htu=URL.replace("https", "http")), {}, "htu mismatch"),
        ("other port", proof(htu=URL.replace("example/", "example:8443/")), {}, "htu mismatch"),
        ("htu missing", proof(htu=None), {}, "htu mismatch"),
        ("htu relative", proof(htu="/v1/transit/decrypt/ds-1"), {}, "malformed htu"),
        ("htu userinfo", proof(htu=URL.replace("//", "//u@")), {}, "malformed htu"),
        ("stale iat", proof(iat=NOW - 61), {}, "too old"),
        ("future iat", proof(iat=NOW + 6), {}, "issued in the future"),
        ("iat missing", proof(iat=None), {}, "iat missing"),
        ("iat a string", proof(iat=str(NOW)), {}, "iat malformed"),
        ("wrong ath", proof(ath=ath("another token")), {}, "ath mismatch"),
        ("ath not ASCII", proof(ath="\u00e9" * 43), {}, "ath mismatch"),
        ("missing ath", proof(ath=None), {}, "ath missing"),
        ("token not ASCII", proof(), {"access_token": "t\u00f6ken"}, "access token is not ASCII"),
        (
            "wrong thumbprint",
            proof(),
            {"expected_thumbprint": public(ED_OTHER).thumbprint},
            "key does not match the token's binding",
        ),
        (
            "thumbprint not ASCII",
            proof(),
            {"expected_thumbprint": "\u00e9"},
            "key does not match the token's binding",
        ),
        (
            "private d in jwk",
            proof(EC_KEY, header={"jwk": private_ec}),
            {},
            "jwk must not contain private member 'd'",
        ),
        ("jwk missing", proof(header={"jwk": None}), {}, "jwk must be a JSON object"),
        ("jwk a thumbprint", proof(header={"jwk": ed_thumbprint}), {}, "jwk must be a JSON object"),
        (
            "jwk oct",
            proof(header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
            {},
            "jwk must not contain private member 'k'",
        ),
        (
            "jwk alg disagrees",
            proof(header={"jwk": {**ed_jwk(ED_KEY), "alg": "ES256"}}),
            {},
            "jwk alg ES256 does not match kty OKP",
        ),
        ("jwk of another key", proof(header={"jwk": ed_jwk(ED_OTHER)}), {}, "bad signature"),
        ("ES256 header, Ed25519 jwk", proof(header={"alg": "ES256"}), {}, "alg does not match key"),
        (
            "alg none",
            token({"typ": "dpop+jwt", "alg": "none", "jwk": ed_jwk(ED_KEY)}, proof_claims()),
            {},
            "alg not allowed",
        ),
        ("typ missing", proof(header={"typ": None}), {}, "typ mismatch"),
        ("typ JWT", proof(header={"typ": "JWT"}), {}, "typ mismatch"),
        ("typ at+jwt", proof(header={"typ": "at+jwt"}), {}, "typ mismatch"),
        ("jti missing", proof(jti=None), {}, "jti missing or malformed"),
        ("jti too long", proof(jti="j" * 129), {}, "jti missing or malformed"),
        (
            "tampered htu",
            tampered(good, htu=URL[:-1] + "2"),
            {"url": URL[:-1] + "2"},
            "bad signature",
        ),
        ("tampered iat", tampered(good, iat=NOW + 1), {}, "bad signature"),
        ("x5c header", proof(header={"x5c": ["MIIB"]}), {}, "header x5c not allowed"),
        ("an assertion", assertion(ED_KEY), {}, "typ mismatch"),
        (
            "an assertion typed as a proof",
            assertion(ED_KEY, header={"typ": "dpop+jwt"}),
            {},
            "jwk must be a JSON object",
        ),
    ]


@pytest.mark.parametrize(
    ("tok", "kwargs", "reason"),
    [pytest.param(tok, kwargs, reason, id=name) for name, tok, kwargs, reason in _dpop_attacks()],
)
def test_dpop_attack_battery(tok: str, kwargs: dict[str, Any], reason: str) -> None:
    assert refused(check_proof, tok, **kwargs) == f"DPoP proof {reason}"


def test_dpop_limits_are_parameters() -> None:
    tok = proof(iat=NOW - 100)
    assert refused(check_proof, tok) == "DPoP proof too old"
    assert check_proof(tok, max_age=100.0).issued_at == NOW - 100
    assert refused(check_proof, proof(iat=NOW + 2), leeway=1.0) == "DPoP proof issued in the future"


def test_a_proof_is_neither_an_assertion_nor_an_access_token() -> None:
    """A proof signed by the principal's own key, carrying every assertion claim."""
    tok = proof(EC_KEY, **assertion_claims())
    assert refused(check_assertion, tok) == "assertion typ not allowed"
    assert refused(jose.verify_jws, tok, public(EC_KEY), typ="at+jwt") == "typ mismatch"


def test_an_access_token_is_not_an_assertion() -> None:
    tok = assertion(header={"typ": "at+jwt"})
    assert refused(check_assertion, tok) == "assertion typ not allowed"


# --- htu normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTPS://Example.COM:443/a/b?x=1#f", "https://example.com/a/b"),
        ("http://example.com:80", "http://example.com/"),
        ("https://example.com", "https://example.com/"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://example.com:443/x", "http://example.com:443/x"),
        ("https://[::1]:8200/v1", "https://[::1]:8200/v1"),
        ("https://[::1]:443/v1", "https://[::1]/v1"),
        ("https://example.com/%7euser/%2f%41", "https://example.com/~user/%2FA"),
        ("https://example.com/A/b/", "https://example.com/A/b/"),
        ("https://example.com/?", "https://example.com/"),
    ],
)
def test_normalise_htu(url: str, normal: str) -> None:
    assert jose.normalise_htu(url) == normal
    assert jose.normalise_htu(normal) == normal


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/relative",
        "ftp://example.com/",
        "https://",
        "https:///path",
        "https://user@example.com/",
        "https://example.com:99999/",
        "https://example.com:port/",
        "https://[::1/",
        "https://exa mple.com/",
        "https://example.com/\t",
        "https://\u00e9xample.com/",
        "javascript:alert(1)",
    ],
)
def test_normalise_htu_refuses(url: str) -> None:
    assert refused(jose.normalise_htu, url) == "malformed htu"


# --- fuzz: malformed input raises AuthenticationError and nothing else ---------------------


def _every_verifier(tok: Any) -> None:
    ec_key, ed_key = public(EC_KEY), public(ED_KEY)
    calls: list[Callable[[], object]] = [
        lambda: jose.parse_jws(tok),
        lambda: jose.unverified_issuer(tok),
        lambda: jose.verify_jws(tok, ec_key, typ="at+jwt"),
        lambda: jose.verify_jws(tok, ed_key),
        lambda: check_assertion(tok),
        lambda: check_assertion(tok, ED_KEY),
        lambda: check_proof(tok),
        lambda: check_proof(tok, expected_thumbprint=ec_key.thumbprint),
    ]
    for call in calls:
        with contextlib.suppress(AuthenticationError):
            call()


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
INTERESTING = st.sampled_from(
    [
        "ES256",
        "EdDSA",
        "none",
        "HS256",
        "dpop+jwt",
        "at+jwt",
        "JWT",
        "EC",
        "OKP",
        "P-256",
        "Ed25519",
        "sig",
        PRINCIPAL,
        AUD,
        URL,
        "POST",
        NOW,
        NOW + 60,
        NOW - 600,
        ec_jwk(EC_KEY)["x"],
        ec_jwk(EC_KEY)["y"],
        ed_jwk(ED_KEY)["x"],
        ath(ACCESS_TOKEN),
    ]
)
VALUE = INTERESTING | JSON
JWK = (
    st.sampled_from([ec_jwk(EC_KEY), ed_jwk(ED_KEY)])
    | st.dictionaries(
        st.sampled_from(["kty", "crv", "x", "y", "d", "alg", "use", "kid", "k"]), VALUE
    )
    | JSON
)
HEADER = st.fixed_dictionaries(
    {"alg": st.sampled_from(["ES256", "EdDSA"]) | VALUE},
    optional={"typ": VALUE, "jwk": JWK, "b64": VALUE, "kid": VALUE, "crit": VALUE},
)
CLAIMS = st.dictionaries(
    st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "htm", "htu", "ath"]),
    VALUE,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.text(alphabet="ab.=-_+/\x00", max_size=60))
def test_fuzz_random_strings(text: str) -> None:
    _every_verifier(text)
    with contextlib.suppress(AuthenticationError):
        jose.b64url_decode(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=3, max_size=3))
def test_fuzz_three_base64_segments(segments: list[bytes]) -> None:
    _every_verifier(".".join(b64(s) for s in segments))


@settings(max_examples=150, deadline=None)
@given(HEADER, CLAIMS, st.binary(min_size=0, max_size=70))
def test_fuzz_structured_tokens(header: dict[str, Any], claims: dict[str, Any], sig: bytes) -> None:
    _every_verifier(f"{b64json(header)}.{b64json(claims)}.{b64(sig)}")


@settings(max_examples=100, deadline=None)
@given(JWK)
def test_fuzz_parse_public_jwk(obj: object) -> None:
    with contextlib.suppress(InvalidRequestError):
        jose.parse_public_jwk(obj)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_one_character_change_is_refused(data: st.DataObject) -> None:
    keys: list[PrivateKey] = [EC_KEY, ED_KEY]
    key = data.draw(st.sampled_from(keys))
    tok = proof(key)
    position = data.draw(st.integers(0, len(tok) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_.09az"))
    forged = tok[:position] + replacement + tok[position + 1 :]
    if forged != tok:
        refused(check_proof, forged)


def test_non_string_tokens() -> None:
    for value in (None, b"a.b.c", 7, ["a", "b", "c"]):
        _every_verifier(value)
        refused(jose.parse_jws, value)
