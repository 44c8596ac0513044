"""The Vault-shaped HTTP API with hvac as the client, over a real socket and SoftHSM token."""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import pytest
import requests

if TYPE_CHECKING:
    from tests.conftest import ServerThread


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def vault(server: ServerThread) -> hvac.Client:
    client = hvac.Client(url=server.url)
    yield client
    client.adapter.close()


@pytest.fixture
def initialised(vault: hvac.Client) -> tuple[hvac.Client, list[str]]:
    result = vault.sys.initialize(secret_shares=5, secret_threshold=3)
    vault.token = result["root_token"]
    return vault, result["keys"]


@pytest.fixture
def unsealed(initialised: tuple[hvac.Client, list[str]]) -> tuple[hvac.Client, list[str]]:
    vault, shares = initialised
    vault.sys.submit_unseal_keys(shares[:3])
    return vault, shares


def raw(
    server: ServerThread, method: str, path: str, token: str | None = None, **kwargs: object
) -> requests.Response:
    headers = {"X-Vault-Token": token} if token else {}
    return requests.request(
        method, f"{server.url}/v1/{path}", headers=headers, timeout=10, **kwargs
    )  # type: ignore[arg-type]


def test_init_and_unseal_with_several_subsets(
    initialised: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, shares = initialised
    assert vault.sys.is_initialized()
    assert vault.sys.read_seal_status()["sealed"] is True
    assert vault.sys.read_health_status(method="GET").status_code == 503
    assert vault.sys.read_health_status().status_code == 503  # hvac's default is HEAD
    for subset in list(itertools.combinations(range(5), 3))[::3]:
        progress = [vault.sys.submit_unseal_key(shares[i]) for i in subset]
        assert [p["progress"] for p in progress[:2]] == [1, 2]
        assert (progress[0]["t"], progress[0]["n"]) == (3, 5)
        assert progress[-1]["sealed"] is False
        vault.secrets.transit.create_key("probe", mount_point="transit")
        vault.sys.seal()
        assert vault.sys.is_sealed()
    records = server.runtime.store.audit_records(10_000)
    unseals = [r for r in records if r["operation"] == "sys.unseal"]
    assert all("member" in r["details"] for r in unseals)


def test_sealed_refuses_every_key_operation(
    initialised: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, _ = initialised
    calls = [
        lambda: vault.secrets.transit.create_key("k"),
        lambda: vault.secrets.transit.read_key("k"),
        vault.secrets.transit.list_keys,
        lambda: vault.secrets.transit.rotate_key("k"),
        lambda: vault.secrets.transit.generate_data_key("k", key_type="plaintext"),
        lambda: vault.secrets.transit.encrypt_data("k", plaintext=b64(b"x")),
        lambda: vault.secrets.transit.decrypt_data("k", ciphertext="ekms:v1:AAAA"),
        lambda: vault.secrets.transit.sign_data("k", hash_input=b64(b"x")),
    ]
    for call in calls:
        with pytest.raises(hvac.exceptions.VaultDown, match="sealed"):
            call()
    assert not server.runtime.backend.is_open


def test_transit_key_lifecycle(unsealed: tuple[hvac.Client, list[str]]) -> None:
    vault, _ = unsealed
    transit = vault.secrets.transit
    vault.adapter.post("/v1/transit/keys/registry", json={"classification": "confidential"})
    transit.create_key("gazette", key_type="ecdsa-p256")
    key = transit.read_key("registry")["data"]
    assert key["type"] == "aes256-gcm96"
    assert key["classification"] == "confidential"
    assert key["deletion_allowed"] is False
    assert sorted(transit.list_keys()["data"]["keys"]) == ["gazette", "registry"]
    assert transit.rotate_key("registry")["data"]["latest_version"] == 2
    transit.update_key_configuration("registry", min_decryption_version=2)
    assert transit.read_key("registry")["data"]["min_decryption_version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest, match="deletion is not allowed"):
        transit.delete_key("registry")
    transit.update_key_configuration("registry", deletion_allowed=True)
    transit.delete_key("registry")
    with pytest.raises(hvac.exceptions.InvalidPath):
        transit.read_key("registry")
    public = transit.read_key("gazette")["data"]["keys"]["1"]["public_key"]
    assert public.startswith("-----BEGIN PUBLIC KEY-----")


def test_datakeys_encrypt_decrypt_rewrap(unsealed: tuple[hvac.Client, list[str]]) -> None:
    vault, _ = unsealed
    transit = vault.secrets.transit
    transit.create_key("ds")
    context = b64(b'{"dataset":"population-register","site":"home","object":"part-0001"}')
    plain = transit.generate_data_key("ds", key_type="plaintext", context=context)["data"]
    wrapped = transit.generate_data_key("ds", key_type="wrapped", context=context)["data"]
    assert "plaintext" not in wrapped
    assert len(base64.b64decode(plain["plaintext"])) == 32
    out = transit.decrypt_data("ds", ciphertext=plain["ciphertext"], context=context)
    assert out["data"]["plaintext"] == plain["plaintext"]
    transit.rotate_key("ds")
    rewrapped = transit.rewrap_data("ds", ciphertext=plain["ciphertext"], context=context)["data"]
    assert rewrapped["ciphertext"].startswith("ekms:v2:")
    again = transit.decrypt_data("ds", ciphertext=rewrapped["ciphertext"], context=context)
    assert again["data"]["plaintext"] == plain["plaintext"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid ciphertext"):
        transit.decrypt_data("ds", ciphertext=plain["ciphertext"], context=b64(b"other"))
    enc = transit.encrypt_data("ds", plaintext=b64(b"Riigi Teataja"), context=context)
    dec = transit.decrypt_data("ds", ciphertext=enc["data"]["ciphertext"], context=context)
    assert base64.b64decode(dec["data"]["plaintext"]) == b"Riigi Teataja"


def test_batch_with_mixed_items(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, _ = unsealed
    transit = vault.secrets.transit
    transit.create_key("b")
    transit.create_key("other")
    items = [
        {"plaintext": b64(f"object {i}".encode()), "context": b64(b"c"), "reference": str(i)}
        for i in range(5)
    ]
    encrypted = transit.encrypt_data("b", plaintext=None, batch_input=items)["data"][
        "batch_results"
    ]
    foreign = transit.encrypt_data("other", plaintext=b64(b"x"), context=b64(b"c"))
    batch = [{"ciphertext": r["ciphertext"], "context": b64(b"c")} for r in encrypted]
    batch += [
        {"ciphertext": encrypted[0]["ciphertext"], "context": b64(b"wrong")},
        {"ciphertext": foreign["data"]["ciphertext"], "context": b64(b"c")},
        {"ciphertext": "not-a-ciphertext"},
        {"ciphertext": encrypted[0]["ciphertext"][:-6], "context": b64(b"c")},
        {"context": b64(b"c")},
        {"ciphertext": encrypted[1]["ciphertext"], "context": "%%%"},
    ]
    response = raw(server, "POST", "transit/decrypt/b", vault.token, json={"batch_input": batch})
    assert response.status_code == 400  # Vault: any failed item makes the batch a 400
    results = response.json()["data"]["batch_results"]
    assert [base64.b64decode(r["plaintext"]) for r in results[:5]] == [
        f"object {i}".encode() for i in range(5)
    ]
    errors = [r.get("error", "") for r in results[5:]]
    assert all(errors), errors
    assert "missing required field 'ciphertext'" in errors[4]
    assert "context is not valid base64" in errors[5]
    partial = raw(
        server,
        "POST",
        "transit/decrypt/b",
        vault.token,
        json={"batch_input": batch, "partial_failure_response_code": 207},
    )
    assert partial.status_code == 207
    records = server.runtime.store.audit_records(10_000)
    last = [r for r in records if r["operation"] == "transit.decrypt"][-1]
    assert (last["details"]["items"], last["details"]["failed_items"]) == (11, 6)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519"])
def test_sign_and_verify(unsealed: tuple[hvac.Client, list[str]], key_type: str) -> None:
    vault, _ = unsealed
    transit = vault.secrets.transit
    transit.create_key("manifest", key_type=key_type)
    manifest = b64(b"sha256 of every object in backup 2026-11-23")
    signature = transit.sign_data("manifest", hash_input=manifest)["data"]["signature"]
    assert signature.startswith("ekms:v1:")
    assert (
        transit.verify_signed_data("manifest", hash_input=manifest, signature=signature)["data"][
            "valid"
        ]
        is True
    )
    tampered = b64(b"sha256 of every object in backup 2026-11-24")
    assert (
        transit.verify_signed_data("manifest", hash_input=tampered, signature=signature)["data"][
            "valid"
        ]
        is False
    )


BAD_REQUESTS = [
    ("POST", "transit/keys/ok", b"{not json", 400, "not valid JSON"),
    ("POST", "transit/keys/ok", b"[1, 2]", 400, "JSON object"),
    ("POST", "transit/keys/ok", b'{"type": 5}', 400, "type"),
    ("POST", "transit/keys/ok", b'{"type": "rsa-4096"}', 400, "type must be one of"),
    ("POST", "transit/keys/ok", b'{"colour": "red"}', 400, "unknown field 'colour'"),
    ("POST", "transit/keys/ok", b'{"exportable": true}', 400, "never leave the HSM"),
    ("POST", "transit/keys/bad%20name", b"{}", 400, "key name"),
    ("POST", "transit/encrypt/missing", b'{"plaintext": ""}', 404, "no key named"),
    ("POST", "transit/datakey/plaintext/ok", b'{"bits": 100}', 400, "bits must be"),
    ("POST", "transit/datakey/secret/ok", b"{}", 400, "plaintext' or 'wrapped'"),
    ("POST", "transit/encrypt/ok", b'{"plaintext": "@@"}', 400, "plaintext is not valid base64"),
    ("POST", "transit/encrypt/ok", b'{"plaintext": "", "nonce": "AAAA"}', 400, "nonce"),
    ("POST", "transit/decrypt/ok", b'{"ciphertext": "vault:v1:abc"}', 400, "ekms:v"),
    ("POST", "transit/decrypt/ok", b'{"ciphertext": "ekms:v1:!!!"}', 400, "invalid ciphertext"),
    ("POST", "transit/decrypt/ok", b'{"batch_input": []}', 400, "non-empty list"),
    ("POST", "transit/decrypt/ok", b'{"batch_input": "x"}', 400, "non-empty list"),
    ("POST", "transit/keys/ok/config", b'{"min_decryption_version": 9}', 400, "between"),
    ("POST", "transit/keys/ok/config", b'{"deletion_allowed": "maybe"}', 400, "deletion_allowed"),
    ("POST", "transit/sign/ok", b'{"input": ""}', 400, "does not support signing"),
    ("GET", "transit/keys", b"", 405, "LIST"),
    ("POST", "transit/decrypt/ok", b'{"batch_input": [{}], "colour": 1}', 400, "'colour'"),
    ("GET", "transit/nowhere", b"", 404, "unsupported path"),
    # Writes under /v1/transit/ that the direct dispatch does not serve still get FastAPI's answer.
    ("POST", "transit/keys", b"{}", 405, "unsupported operation"),
    ("PUT", "transit/nowhere/ok", b"{}", 404, "unsupported path"),
    ("POST", "transit/encrypt/ok/extra", b"{}", 404, "unsupported path"),
]


def test_bad_input_gets_a_precise_4xx(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, _ = unsealed
    vault.secrets.transit.create_key("ok")
    before = server.runtime.store.list_names()
    for method, path, body, status, message in BAD_REQUESTS:
        response = raw(server, method, path, vault.token, data=body)
        assert response.status_code == status, (path, body, response.text)
        assert message in json.dumps(response.json()["errors"]), (path, body, response.text)
    assert server.runtime.store.list_names() == before


def test_oversized_body_is_refused(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, _ = unsealed
    body = json.dumps({"plaintext": "A" * (2 * 1024 * 1024)})
    response = raw(server, "POST", "transit/encrypt/ok", vault.token, data=body)
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["errors"][0]


def test_custody_errors(initialised: tuple[hvac.Client, list[str]], server: ServerThread) -> None:
    vault, shares = initialised
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already initialized"):
        vault.sys.initialize(secret_shares=5, secret_threshold=3)
    for shares_n, threshold in ((5, 1), (3, 4), (20, 3), (1, 1)):
        response = raw(
            server,
            "PUT",
            "sys/init",
            json={"secret_shares": shares_n, "secret_threshold": threshold},
        )
        assert response.status_code == 400
    with pytest.raises(hvac.exceptions.InvalidRequest, match="word"):
        vault.sys.submit_unseal_key("not a share at all")
    vault.sys.submit_unseal_key(shares[0])
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already submitted"):
        vault.sys.submit_unseal_key(shares[0])
    assert vault.sys.read_seal_status()["progress"] == 1
    assert vault.sys.submit_unseal_key(reset=True)["progress"] == 0
    vault.sys.submit_unseal_keys(shares[2:])
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already unsealed"):
        vault.sys.submit_unseal_key(shares[0])


def test_tokens_and_audit(unsealed: tuple[hvac.Client, list[str]], server: ServerThread) -> None:
    vault, shares = unsealed
    root = vault.token
    for token in (None, "ekms.wrong", "x" * 600):
        response = raw(server, "POST", "transit/keys/t", token, json={})
        assert response.status_code == 403
        assert response.json()["errors"] == ["permission denied"]
        assert response.json()["request_id"]
    put = raw(server, "PUT", "transit/keys/via-put", token=root, json={})
    assert put.status_code == 200  # the bao CLI writes with PUT
    response = raw(server, "PUT", "sys/seal", "ekms.wrong")
    assert response.status_code == 403
    context = b64(b"secret-context-value")
    vault.secrets.transit.create_key("t")
    data = vault.secrets.transit.generate_data_key("t", key_type="plaintext", context=context)
    dump = json.dumps(server.runtime.store.audit_records(10_000))
    words = " ".join(shares[0].split()[6:12])  # single words may occur in field names
    for secret in [root, data["data"]["plaintext"], context, *shares, words]:
        assert secret not in dump
    records = server.runtime.store.audit_records(10_000)
    denied = [r for r in records if r["decision"] == "deny"]
    assert {r["reason"] for r in denied} >= {"no token presented", "unknown or revoked token"}
    datakey = [r for r in records if r["operation"] == "transit.datakey"][-1]
    assert datakey["details"]["contexts"][0].startswith("hmac-sha256:")


def test_audit_failure_fails_closed(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    """No answer leaves without its record: a full disk under the journal means 503."""
    vault, _ = unsealed
    vault.secrets.transit.create_key("fc")
    journal = server.runtime.audit._journal
    assert journal is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, journal._fd)
    os.close(full)
    response = raw(server, "POST", "transit/datakey/plaintext/fc", vault.token, json={})
    assert response.status_code == 503
    assert "audit" in response.json()["errors"][0]
    assert "ciphertext" not in response.text


def test_a_lost_log_fails_closed_once_the_journal_cannot_be_taken_in(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    """The answer that was journaled stands; the ones after it wait for the log, and fail."""
    vault, _ = unsealed
    vault.secrets.transit.create_key("fc")
    store = server.runtime.store
    real_commit = store.commit
    store.audit_records(1)  # what came before is in the log

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    store.commit = broken  # type: ignore[method-assign]
    try:
        first = raw(server, "POST", "transit/datakey/plaintext/fc", vault.token, json={})
        assert first.status_code == 200  # its record is durable in the journal
        time.sleep(0.05)  # the journal's flush fails meanwhile
        second = raw(server, "POST", "transit/datakey/plaintext/fc", vault.token, json={})
        assert second.status_code == 503
        assert "ciphertext" not in second.text
    finally:
        store.commit = real_commit  # type: ignore[method-assign]
    third = raw(server, "POST", "transit/datakey/plaintext/fc", vault.token, json={})
    assert third.status_code == 200
    ids = [r["request_id"] for r in store.audit_records(10_000)]
    assert first.headers["X-Request-Id"] in ids
    assert third.headers["X-Request-Id"] in ids
    assert second.headers.get("X-Request-Id") not in ids
