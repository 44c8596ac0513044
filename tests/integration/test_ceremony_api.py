"""``/v1/ekms/ceremonies``: the runner's start-up facts, and the transcript endpoint's refusals."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest

from ceremonies import transcript
from kms.jose import parse_public_jwk, verify_jws
from tests.integration import test_access
from tests.integration.test_access import AUDIENCE, Party, World

if TYPE_CHECKING:
    from pathlib import Path

world = test_access.world  # the access tests' fixture: their World, reused as is


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ekms.db'}"


def body_for(*parties: Party, outcome: str = "completed") -> dict[str, Any]:
    return {
        "version": 1,
        "ceremony": str(uuid.uuid4()),
        "script": {"name": "rotate-keys", "title": "Rotate", "sha256": "cd" * 32},
        "rehearsal": False,
        "service": {"audience": AUDIENCE},
        "participants": [
            {
                "principal": p.id,
                "role": "administrator" if n == 0 else "witness",
                "thumbprint": parse_public_jwk(p.jwk).thumbprint,
                "jwk": p.jwk,
            }
            for n, p in enumerate(parties)
        ],
        "started_at": "2025-06-15T15:06:40.000Z",
        "steps": [],
        "ended_at": "2025-06-15T15:07:40.000Z",
        "outcome": outcome,
    }


def sign(party: Party, body: dict[str, Any], audience: str = AUDIENCE) -> dict[str, str]:
    claims = transcript.signature_claims(body, party.id, audience, 1_750_000_000)
    return {"principal": party.id, "jws": party.sign(claims, typ=transcript.SIGNATURE_TYPE)}


def submit(world: World, token: str | None, body: dict[str, Any], signatures: list[Any]) -> Any:
    return world.call(
        "POST",
        "ekms/ceremonies/transcripts",
        token,
        body={"transcript": body, "signatures": signatures},
    )


def test_service_facts_need_no_token(world: World) -> None:
    answer = world.call("GET", "ekms/ceremonies/service")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert data["audience"] == AUDIENCE
    assert (data["initialized"], data["sealed"], data["threshold"]) == (True, False, 2)
    assert data["approvals_required"] == 2


def test_a_signed_transcript_is_signed_by_the_service(world: World) -> None:
    officer, official = world.officer, world.officials[0]
    body = body_for(officer, official)
    answer = submit(world, world.login(officer), body, [sign(officer, body), sign(official, body)])
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    claims = verify_jws(
        data["jws"], parse_public_jwk(data["public_key"]), typ=transcript.SERVICE_SIGNATURE_TYPE
    ).claims
    assert claims["digest"] == transcript.digest(body) == data["digest"]
    assert claims["request_id"] == data["request_id"] == answer.json()["request_id"]
    assert claims["signers"] == ["officer", "official-0"]


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("missing signature", 400, "needs every participant's signature: official-0"),
        ("forged", 400, "the signature of 'official-0' does not verify"),
        ("other audience", 400, "does not verify (signature for another deployment)"),
        ("stranger", 400, "'operator' is not a participant"),
        ("twice", 400, "'officer' signed twice"),
        ("other key", 400, "names another key than the one registered"),
        ("unregistered", 400, "is not a registered principal"),
        ("not json shape", 400, "transcript outcome must be completed or aborted"),
        ("float", 400, "float"),
        ("unknown field", 400, "unknown field 'extra'"),
        ("not a signer", 403, "permission denied"),
        ("no token", 403, "permission denied"),
    ],
)
def test_refusals(world: World, case: str, status: int, message: str) -> None:
    officer, official = world.officer, world.officials[0]
    body = body_for(officer, official)
    signatures = [sign(officer, body), sign(official, body)]
    token: str | None = world.login(officer)
    extra: dict[str, Any] = {}
    if case == "missing signature":
        signatures = signatures[:1]
    elif case == "forged":
        signatures[1] = sign(Party.ec("official-0"), body)
    elif case == "other audience":
        signatures[1] = sign(official, body, "embassy-kms/elsewhere")
    elif case == "stranger":
        signatures.append(sign(world.operator, body))
    elif case == "twice":
        signatures.append(signatures[0])
    elif case == "other key":
        impostor = Party.ec("official-0")
        body = body_for(officer, impostor)
        signatures = [sign(officer, body), sign(impostor, body)]
    elif case == "unregistered":
        ghost = Party.ec("ghost")
        body = body_for(officer, ghost)
        signatures = [sign(officer, body), sign(ghost, body)]
    elif case == "not json shape":
        body["outcome"] = "great"
    elif case == "float":
        body["steps"] = [{"number": 1, "kind": "check", "took": 1.5}]
    elif case == "unknown field":
        extra = {"extra": 1}
    elif case == "not a signer":
        token = world.login(world.officials[1])
    elif case == "no token":
        token = None
    answer = world.call(
        "POST",
        "ekms/ceremonies/transcripts",
        token,
        body={"transcript": body, "signatures": signatures, **extra},
    )
    assert answer.status_code == status, answer.text
    assert message in answer.json()["errors"][0]


def test_an_aborted_transcript_needs_one_signature(world: World) -> None:
    officer, official = world.officer, world.officials[0]
    body = body_for(officer, official, outcome="aborted")
    assert submit(world, world.login(officer), body, []).status_code == 400
    answer = submit(world, world.login(officer), body, [sign(officer, body)])
    assert answer.status_code == 200, answer.text


def test_sealed_service_refuses_with_503(world: World) -> None:
    officer = world.officer
    token = world.login(officer)
    world.call("PUT", "sys/seal", world.root).raise_for_status()
    body = body_for(officer, world.officials[0], outcome="aborted")
    answer = submit(world, token, body, [sign(officer, body)])
    assert answer.status_code == 503
