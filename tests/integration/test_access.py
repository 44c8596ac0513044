"""Identities, login, quorum-approved restores and scoped DPoP-bound credentials, over HTTP.

A real server (SoftHSM, SQLite) at an embassy site. Officials, an operator, a security officer
and a restore tool each hold their own key; the private keys live only in this test.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hvac
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from api.principal_keys import KeyHolder
from api.runtime import create_runtime, prepare_hsm
from tests.conftest import ServerThread, make_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

AUDIENCE = "embassy-kms/embassy-1"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Party(KeyHolder):
    """A principal with its private key, as a smart card or a tool's keystore would hold it."""

    @classmethod
    def ec(cls, pid: str) -> Party:
        return cls(pid, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed(cls, pid: str) -> Party:
        return cls(pid, ed25519.Ed25519PrivateKey.generate())

    @property
    def id(self) -> str:
        return self.principal

    def assertion(self, audience: str = AUDIENCE, **changes: Any) -> str:  # type: ignore[override]
        return super().assertion(audience, **changes)

    def proof(self, method: str, url: str, token: str, **changes: Any) -> str:
        return self.dpop_proof(method, url, token, **changes)


@dataclass
class World:
    server: ServerThread
    root: str
    officials: list[Party]
    officer: Party
    operator: Party
    tool: Party

    def call(
        self, method: str, path: str, token: str | None = None, *, body: Any = None, **h: str
    ) -> requests.Response:
        headers = dict(h)
        if token:
            headers["X-Vault-Token"] = token
        return requests.request(
            method, f"{self.server.url}/v1/{path}", json=body, headers=headers, timeout=30
        )

    def login(self, party: Party) -> str:
        response = self.call("POST", "auth/jwt/login", body={"jwt": party.assertion()})
        assert response.status_code == 200, response.text
        return str(response.json()["auth"]["client_token"])

    def approve(self, official: Party, proposal: dict[str, Any], decision: str = "approve") -> Any:
        signature = official.approval(proposal, AUDIENCE, decision)
        return self.call(
            "POST",
            f"ekms/proposals/{proposal['id']}/decide",
            self.login(official),
            body={"signature": signature},
        )

    def tool_call(self, path: str, token: str, body: Any = None) -> requests.Response:
        url = f"{self.server.url}/v1/{path}"
        return self.call("POST", path, token, body=body, DPoP=self.tool.proof("POST", url, token))


@pytest.fixture
def world(tmp_path: Path, database_url: str) -> Iterator[World]:
    settings = make_settings(
        tmp_path, site_name="embassy-1", site_kind="embassy", database_url=database_url
    )
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        root = result["root_token"]
        vault.token = root
        for name, classification in (("laws", "internal"), ("registry", "confidential")):
            vault.write(f"transit/keys/{name}", classification=classification)
        world = World(
            server,
            root,
            [Party.ec(f"official-{n}") for n in range(3)],
            Party.ec("officer"),
            Party.ec("operator"),
            Party.ed("restore-tool"),
        )
        for official in world.officials:
            ok = world.call(
                "POST",
                f"ekms/principals/{official.id}",
                root,
                body={"roles": ["official"], "jwk": official.jwk},
            )
            assert ok.status_code == 200, ok.text
        world.call(
            "POST",
            "ekms/principals/officer",
            root,
            body={"roles": ["security-officer"], "jwk": world.officer.jwk},
        ).raise_for_status()
        officer = world.login(world.officer)
        for party, role in ((world.operator, "restore-operator"), (world.tool, "restore-tool")):
            world.call(
                "POST",
                f"ekms/principals/{party.id}",
                officer,
                body={"roles": [role], "jwk": party.jwk},
            ).raise_for_status()
        yield world
    runtime.close()


def encrypt(world: World, key: str, plaintext: bytes) -> str:
    response = world.call(
        "POST",
        f"transit/encrypt/{key}",
        world.root,
        body={"plaintext": base64.b64encode(plaintext).decode(), "context": "Y3R4"},
    )
    return str(response.json()["data"]["ciphertext"])


def file_restore(world: World, datasets: list[str], **extra: Any) -> dict[str, Any]:
    payload = {
        "datasets": datasets,
        "site": "embassy-1",
        "reason": "disaster-recovery",
        "justification": "home data centre flooded",
        "tool": world.tool.id,
        "ttl": 600,
        **extra,
    }
    response = world.call(
        "POST",
        "ekms/proposals",
        world.login(world.operator),
        body={"kind": "restore", "payload": payload},
    )
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def test_restore_from_request_to_decrypt(world: World) -> None:
    ciphertext = encrypt(world, "laws", b"constitution")
    request = file_restore(world, ["laws"], max_uses=3)
    assert request["state"] == "pending"

    first = world.approve(world.officials[0], request)
    assert first.json()["data"]["state"] == "pending"
    assert world.approve(world.officials[1], request).json()["data"]["state"] == "approved"

    tool_token = world.login(world.tool)
    granted = world.tool_call(f"ekms/proposals/{request['id']}/credential", tool_token)
    assert granted.status_code == 200, granted.text
    credential = granted.json()["auth"]["client_token"]
    assert granted.json()["auth"]["lease_duration"] <= 900

    body = {"ciphertext": ciphertext, "context": "Y3R4"}
    answer = world.tool_call("transit/decrypt/laws", credential, body)
    assert answer.status_code == 200, answer.text
    assert base64.b64decode(answer.json()["data"]["plaintext"]) == b"constitution"

    # The same proof twice: refused when its use is committed.
    url = f"{world.server.url}/v1/transit/decrypt/laws"
    proof = world.tool.proof("POST", url, credential)
    once = world.call("POST", "transit/decrypt/laws", credential, body=body, DPoP=proof)
    again = world.call("POST", "transit/decrypt/laws", credential, body=body, DPoP=proof)
    assert once.status_code == 200
    assert again.status_code == 401

    # Uses: three allowed, two spent above (the replay spent none).
    assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 200
    spent = world.tool_call("transit/decrypt/laws", credential, body)
    assert spent.status_code == 403
    assert "request_id" in spent.json()

    records = world.server.runtime.store.audit_records(10_000)
    decrypts = [r for r in records if r["operation"] == "transit.decrypt" and r.get("principal")]
    assert [r["decision"] for r in decrypts[-5:]] == ["allow", "allow", "deny", "allow", "deny"]


def test_scope_site_classification_and_emergency(world: World) -> None:
    ciphertext = encrypt(world, "registry", b"land register")
    request = file_restore(world, ["registry"])
    world.approve(world.officials[0], request)
    world.approve(world.officials[1], request)
    credential = world.tool_call(
        f"ekms/proposals/{request['id']}/credential", world.login(world.tool)
    ).json()["auth"]["client_token"]
    body = {"ciphertext": ciphertext, "context": "Y3R4"}

    # Confidential data at an embassy needs an emergency.
    assert world.tool_call("transit/decrypt/registry", credential, body).status_code == 403
    # A dataset outside the scope is refused whatever the state.
    assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 403
    # Key operations other than decrypt are refused.
    assert (
        world.tool_call("transit/encrypt/registry", credential, {"plaintext": ""}).status_code
        == 403
    )

    declare = world.call(
        "POST",
        "ekms/proposals",
        world.login(world.officials[0]),
        body={
            "kind": "declare-emergency",
            "payload": {"duration": 3600, "justification": "home site lost"},
        },
    ).json()["data"]
    world.approve(world.officials[1], declare)
    assert world.approve(world.officials[2], declare).json()["data"]["state"] == "approved"
    status = world.call("GET", "ekms/status", world.root).json()["data"]
    assert status["emergency"] is not None

    answer = world.tool_call("transit/decrypt/registry", credential, body)
    assert answer.status_code == 200, answer.text

    end = world.call(
        "POST",
        "ekms/proposals",
        world.login(world.officials[2]),
        body={"kind": "end-emergency", "payload": {"justification": "home restored"}},
    ).json()["data"]
    world.approve(world.officials[0], end)
    world.approve(world.officials[1], end)
    assert world.call("GET", "ekms/status", world.root).json()["data"]["emergency"] is None
    assert world.tool_call("transit/decrypt/registry", credential, body).status_code == 403


def test_approval_rules(world: World) -> None:
    request = file_restore(world, ["laws"])
    # Not an official.
    assert world.approve(world.operator, request).status_code == 403
    # A signature over another proposal's digest.
    other = file_restore(world, ["laws"])
    moved = world.approve(world.officials[0], {**request, "digest": other["digest"]})
    assert moved.status_code == 401
    # Deciding twice.
    assert world.approve(world.officials[0], request).status_code == 200
    assert world.approve(world.officials[0], request).status_code == 409
    # A deny vetoes.
    denied = world.approve(world.officials[1], request, "deny").json()["data"]
    assert denied["state"] == "denied"
    # The tool cannot get a credential for a denied request.
    tool_token = world.login(world.tool)
    refused = world.tool_call(f"ekms/proposals/{request['id']}/credential", tool_token)
    assert refused.status_code == 403

    # The requester cannot approve their own proposal.
    own = world.call(
        "POST",
        "ekms/proposals",
        world.login(world.officials[0]),
        body={"kind": "declare-emergency", "payload": {"duration": 600, "justification": "x"}},
    ).json()["data"]
    assert world.approve(world.officials[0], own).status_code == 403


def test_officials_beyond_the_bootstrap_need_a_quorum(world: World) -> None:
    newcomer = Party.ec("official-new")
    body = {"roles": ["official"], "jwk": newcomer.jwk}
    assert (
        world.call("POST", "ekms/principals/official-new", world.root, body=body).status_code == 403
    )
    officer = world.login(world.officer)
    assert world.call("POST", "ekms/principals/official-new", officer, body=body).status_code == 403
    proposal = world.call(
        "POST",
        "ekms/proposals",
        world.login(world.officials[0]),
        body={
            "kind": "add-official",
            "payload": {"principal": "official-new", "jwk": newcomer.jwk},
        },
    ).json()["data"]
    world.approve(world.officials[1], proposal)
    world.approve(world.officials[2], proposal)
    assert world.login(newcomer)


def test_attack_battery_is_refused_and_audited(world: World) -> None:
    tool_token = world.login(world.tool)
    operator_token = world.login(world.operator)
    stranger = Party.ec("operator")  # right name, wrong key
    now = int(time.time())

    def login_status(assertion: str) -> int:
        return world.call("POST", "auth/jwt/login", body={"jwt": assertion}).status_code

    header = b64u(b'{"alg":"none","typ":"JWT"}')
    unsigned = {"iss": "operator", "sub": "operator", "aud": AUDIENCE, "exp": now + 60, "jti": "x"}
    claims = b64u(json.dumps(unsigned).encode())
    assert login_status(f"{header}.{claims}.") == 401
    hs256 = jwt.encode(
        {"iss": "operator", "sub": "operator", "aud": AUDIENCE, "exp": now + 60, "jti": "y"},
        str(world.operator.jwk).encode(),
        algorithm="HS256",
    )
    assert login_status(hs256) == 401
    assert login_status(world.operator.assertion(audience="someone-else")) == 401
    assert login_status(world.operator.assertion(exp=now - 120)) == 401
    assert login_status(stranger.assertion()) == 401
    replayed = world.operator.assertion()
    assert login_status(replayed) == 200
    assert login_status(replayed) == 401

    # A token signed by another key, and a tampered token.
    forged = stranger.sign({"iss": AUDIENCE, "sub": "operator"}, kid="nope", typ="at+jwt")
    assert world.call("GET", "auth/token/lookup-self", forged).status_code == 401
    head, body, sig = operator_token.split(".")
    tampered = b64u(base64.urlsafe_b64decode(body + "==").replace(b"restore-operator", b"official"))
    assert world.call("GET", "auth/token/lookup-self", f"{head}.{tampered}.{sig}").status_code in (
        401,
        403,
    )

    # DPoP: missing, for another URL, for another method, signed by another key.
    url = f"{world.server.url}/v1/auth/token/lookup-self"
    assert world.call("GET", "auth/token/lookup-self", tool_token).status_code == 401
    wrong_url = world.tool.proof("GET", url.replace("lookup-self", "lookup"), tool_token)
    assert (
        world.call("GET", "auth/token/lookup-self", tool_token, DPoP=wrong_url).status_code == 401
    )
    wrong_method = world.tool.proof("POST", url, tool_token)
    assert (
        world.call("GET", "auth/token/lookup-self", tool_token, DPoP=wrong_method).status_code
        == 401
    )
    other_key = Party.ed("restore-tool").proof("GET", url, tool_token)
    assert (
        world.call("GET", "auth/token/lookup-self", tool_token, DPoP=other_key).status_code == 401
    )
    good = world.tool.proof("GET", url, tool_token)
    assert world.call("GET", "auth/token/lookup-self", tool_token, DPoP=good).status_code == 200

    # A revoked principal's tokens stop working at once.
    officer = world.login(world.officer)
    assert world.call("POST", "ekms/principals/operator/disable", officer).status_code == 200
    assert world.call("GET", "auth/token/lookup-self", operator_token).status_code == 401

    # Enabling lets them log in again; the token cut off by the disabling stays dead.
    enabled = world.call("POST", "ekms/principals/operator/enable", officer)
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["data"]["disabled_at"] is None
    assert world.call("GET", "auth/token/lookup-self", operator_token).status_code == 401
    time.sleep(1.0)  # tokens carry whole-second iat: one from the disabling second stays dead
    fresh = world.login(world.operator)
    assert world.call("GET", "auth/token/lookup-self", fresh).status_code == 200
    again = world.call("POST", "ekms/principals/operator/enable", officer)
    assert again.status_code in (400, 409)
    assert "already enabled" in again.text
    official = world.officials[0].id
    refused = world.call("POST", f"ekms/principals/{official}/enable", officer)
    assert refused.status_code == 403

    records = world.server.runtime.store.audit_records(10_000)
    refused = [r for r in records if r["status"] == 401]
    assert len(refused) >= 12
    assert all("reason" in r for r in refused)
    assert not any(operator_token in str(r) for r in records)


def grant(world: World, datasets: list[str], **extra: Any) -> tuple[dict[str, Any], str]:
    """A restore request approved by two officials, and the tool's scoped credential for it."""
    request = file_restore(world, datasets, **extra)
    world.approve(world.officials[0], request)
    assert world.approve(world.officials[1], request).json()["data"]["state"] == "approved"
    answer = world.tool_call(f"ekms/proposals/{request['id']}/credential", world.login(world.tool))
    assert answer.status_code == 200, answer.text
    return request, str(answer.json()["auth"]["client_token"])


def test_batch_items_count_as_uses(world: World) -> None:
    ciphertext = encrypt(world, "laws", b"gazette 1/2026")
    _, credential = grant(world, ["laws"], max_uses=3)
    item = {"ciphertext": ciphertext, "context": "Y3R4"}

    two = world.tool_call("transit/decrypt/laws", credential, {"batch_input": [item, item]})
    assert two.status_code == 200, two.text
    # Two more would make four: refused whole, and nothing is spent.
    again = world.tool_call("transit/decrypt/laws", credential, {"batch_input": [item, item]})
    assert again.status_code == 403
    assert world.tool_call("transit/decrypt/laws", credential, item).status_code == 200
    assert world.tool_call("transit/decrypt/laws", credential, item).status_code == 403


def test_unlimited_grant_is_revoked_at_once_and_audited_with_its_id(world: World) -> None:
    ciphertext = encrypt(world, "laws", b"land register extract")
    request, credential = grant(world, ["laws"])
    body = {"ciphertext": ciphertext, "context": "Y3R4"}
    for _ in range(3):
        assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 200

    officer = world.login(world.officer)
    revoked = world.call("POST", f"ekms/proposals/{request['id']}/revoke", officer)
    assert revoked.status_code == 200, revoked.text
    assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 401

    records = world.server.runtime.store.audit_records(10_000)
    decrypts = [r for r in records if r["operation"] == "transit.decrypt"]
    assert [r["decision"] for r in decrypts[-4:]] == ["allow", "allow", "allow", "deny"]
    assert all(r["details"]["grant"] == request["id"] for r in decrypts[-4:-1])


def test_security_officers_manage_keys_without_the_root_token(world: World) -> None:
    officer = world.login(world.officer)
    create = world.call(
        "POST", "transit/keys/state-gazette", officer, body={"classification": "internal"}
    )
    assert create.status_code == 200, create.text
    assert world.call("POST", "transit/keys/state-gazette/rotate", officer).status_code == 200
    read = world.call("GET", "transit/keys/state-gazette", officer)
    assert read.json()["data"]["latest_version"] == 2
    assert "state-gazette" in world.call("LIST", "transit/keys", officer).json()["data"]["keys"]
    config = world.call(
        "POST", "transit/keys/state-gazette/config", officer, body={"min_decryption_version": 1}
    )
    assert config.status_code == 200, config.text

    # Destroying data stays break-glass, and managing keys gives no use of them.
    allow_delete = world.call(
        "POST", "transit/keys/state-gazette/config", officer, body={"deletion_allowed": True}
    )
    assert allow_delete.status_code == 403
    assert world.call("DELETE", "transit/keys/state-gazette", officer).status_code == 403
    assert (
        world.call(
            "POST", "transit/datakey/plaintext/state-gazette", officer, body={"context": "Y3R4"}
        ).status_code
        == 403
    )
    plaintext = {"plaintext": "aGVsbG8=", "context": "Y3R4"}
    assert (
        world.call("POST", "transit/encrypt/state-gazette", officer, body=plaintext).status_code
        == 403
    )

    # Officials read key metadata; operators and tools do not; only officers change it.
    official = world.login(world.officials[0])
    assert world.call("GET", "transit/keys/state-gazette", official).status_code == 200
    assert world.call("POST", "transit/keys/another", official, body={}).status_code == 403
    operator = world.login(world.operator)
    assert world.call("GET", "transit/keys/state-gazette", operator).status_code == 403

    records = world.server.runtime.store.audit_records(10_000)
    created = [r for r in records if r["operation"] == "transit.key.create"]
    assert [(r["principal"], r["decision"]) for r in created[-2:]] == [
        ("officer", "allow"),
        ("official-0", "deny"),
    ]


def test_listing_proposals_shows_each_party_what_it_may_see(world: World) -> None:
    first = file_restore(world, ["laws"])
    second = file_restore(world, ["registry"])
    world.approve(world.officials[0], first)
    world.approve(world.officials[1], first)

    official = world.login(world.officials[2])
    listed = world.call("LIST", "ekms/proposals", official)
    assert listed.status_code == 200, listed.text
    # Newest first; both may share a creation second, so compare without order here.
    assert set(listed.json()["data"]["keys"]) == {first["id"], second["id"]}
    info = listed.json()["data"]["key_info"][first["id"]]
    assert info["state"] == "approved"
    assert info["approved_by"] == ["official-0", "official-1"]

    pending = world.call("GET", "ekms/proposals?kind=restore&state=pending", official)
    assert pending.json()["data"]["keys"] == [second["id"]]
    limited = world.call("GET", "ekms/proposals?limit=1", official)
    assert len(limited.json()["data"]["keys"]) == 1

    # The operator who filed them and the tool they name see them; another operator does not.
    assert (
        len(
            world.call("LIST", "ekms/proposals", world.login(world.operator)).json()["data"]["keys"]
        )
        == 2
    )
    tool = world.login(world.tool)
    url = f"{world.server.url}/v1/ekms/proposals"
    mine = world.call("GET", "ekms/proposals", tool, DPoP=world.tool.proof("GET", url, tool))
    assert mine.status_code == 200, mine.text
    assert len(mine.json()["data"]["keys"]) == 2
    stranger = Party.ec("operator-2")
    world.call(
        "POST",
        "ekms/principals/operator-2",
        world.login(world.officer),
        body={"roles": ["restore-operator"], "jwk": stranger.jwk},
    ).raise_for_status()
    assert world.call("LIST", "ekms/proposals", world.login(stranger)).status_code == 404

    for query, problem in (
        ("state=lost", "unknown state"),
        ("kind=coup", "unknown kind"),
        ("limit=0", "limit must be between"),
        ("limit=many", "limit must be a whole number"),
        ("colour=red", "unknown query parameter"),
    ):
        bad = world.call("GET", f"ekms/proposals?{query}", official)
        assert bad.status_code == 400, (query, bad.text)
        assert problem in bad.json()["errors"][0]
