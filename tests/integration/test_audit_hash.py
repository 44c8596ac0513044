"""``sys/audit-hash``: an officer checks a known value against the keyed hashes in records.

A real server (SoftHSM, SQLite or PostgreSQL). The hash must equal, byte for byte, what a
datakey or encrypt record holds for its context; the value itself must never be written.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

import hvac
import pytest

from kms.tokens import hash_token
from tests.integration import test_access

if TYPE_CHECKING:
    from tests.integration.test_access import World

CONTEXT = "dataset=laws;site=embassy-1;object=2025-06-15.tar"
BINARY = bytes(range(256))
world = test_access.world  # the fixture, under its own name


@pytest.fixture
def officer(world: World) -> str:
    return world.login(world.officer)


def record_contexts(world: World, operation: str) -> list[str]:
    records = world.server.runtime.store.audit_records(limit=100_000)
    found = [r for r in records if r["operation"] == operation]
    assert found, operation
    return list(found[-1]["details"]["contexts"])


def audit_hash(world: World, token: str | None, body: object, device: str = "ekms") -> object:
    return world.call("POST", f"sys/audit-hash/{device}", token, body=body)


def test_the_hash_is_the_records_context_hash(world: World, officer: str) -> None:
    context = base64.b64encode(CONTEXT.encode()).decode()
    datakey = world.call(
        "POST", "transit/datakey/wrapped/laws", world.root, body={"context": context}
    )
    assert datakey.status_code == 200, datakey.text
    [in_record] = record_contexts(world, "transit.datakey")
    assert in_record.startswith("hmac-sha256:")

    response = audit_hash(world, officer, {"input": CONTEXT})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["hash"] == answer["data"]["hash"] == in_record

    # A binary context, given as base64; and through hvac, as Vault's clients call it.
    encrypt = world.call(
        "POST",
        "transit/encrypt/laws",
        world.root,
        body={"plaintext": "eA==", "context": base64.b64encode(BINARY).decode()},
    )
    assert encrypt.status_code == 200, encrypt.text
    [binary_record] = record_contexts(world, "transit.encrypt")
    as_base64 = {"input": base64.b64encode(BINARY).decode(), "format": "base64"}
    assert audit_hash(world, officer, as_base64).json()["hash"] == binary_record

    client = hvac.Client(url=world.server.url, token=world.root)
    try:
        assert client.sys.calculate_hash("file", CONTEXT)["hash"] == in_record
    finally:
        client.adapter.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_input_is_never_written(
    world: World, officer: str, caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "never-written-" + "s3cr3t" * 4
    digest = audit_hash(world, officer, {"input": secret}).json()["hash"]
    refused = [
        audit_hash(world, officer, {"input": secret, "extra": secret}),
        audit_hash(world, officer, {"input": secret, "format": "hex"}),
        audit_hash(world, officer, {"input": secret * 3000}),
        audit_hash(world, world.login(world.operator), {"input": secret}),
    ]
    assert [r.status_code for r in refused] == [400, 400, 400, 403]
    for response in refused:
        assert secret not in response.text
    records = world.server.runtime.store.audit_records(limit=100_000)
    hashes = [r for r in records if r["operation"] == "sys.audit-hash"]
    assert len(hashes) == 5
    assert hashes[0]["details"] == {"device": "ekms", "format": "text"}
    assert hashes[0]["principal"] == "officer"
    text = repr(records)
    assert secret not in text
    assert secret[:20] not in text
    assert digest not in text
    assert secret not in caplog.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_refusals(world: World, officer: str, database_url: str) -> None:
    cases = [
        ({"input": ""}, 400, "input must not be empty"),
        ({"input": "x" * 65537}, 400, "input is longer than 65536 bytes"),
        ({"input": "not base64!", "format": "base64"}, 400, "input is not valid base64"),
        ({"input": "", "format": "base64"}, 400, "input must not be empty"),
        ({"input": 42}, 400, "input: Input should be a valid string"),
        ({}, 400, "missing required field 'input'"),
        ({"input": "x", "salt": "y"}, 400, "unknown field 'salt'"),
        ([1, 2], 400, "request body must be a JSON object"),
    ]
    for body, status, message in cases:
        response = audit_hash(world, officer, body)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["errors"][0], body
    bad_device = audit_hash(world, officer, {"input": "x"}, device="a%20b")
    assert bad_device.status_code == 400
    assert "audit device name" in bad_device.json()["errors"][0]
    for token in (None, world.login(world.officials[0]), world.login(world.operator)):
        denied = audit_hash(world, token, {"input": "x"})
        assert denied.status_code == 403
        assert denied.json()["errors"] == ["permission denied"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sealed_answers_503(world: World, officer: str, database_url: str) -> None:
    assert world.call("PUT", "sys/seal", world.root).status_code == 204
    response = audit_hash(world, officer, {"input": CONTEXT})
    assert response.status_code == 503
    assert response.json()["errors"] == ["Vault is sealed"]
    records = world.server.runtime.store.audit_records(limit=100_000)
    assert records[-1]["operation"] == "sys.audit-hash"
    assert records[-1]["decision"] == "deny"
    assert CONTEXT not in repr(records)
    # Who sealed is the root token's id, which the init record named.
    found = world.server.runtime.store.find_token(hash_token(world.root))
    assert found is not None
    seal = [r for r in records if r["operation"] == "sys.seal"][-1]
    init = [r for r in records if r["operation"] == "sys.init"][-1]
    assert seal["principal"] == init["details"]["root_token_id"] == found[0]
    assert seal["details"]["last_head_size"] >= 1
