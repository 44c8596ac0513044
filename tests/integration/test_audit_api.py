"""The audit log over HTTP and through the CLI: signed heads, exports, proofs, who may see them.

A real server (SoftHSM, SQLite or PostgreSQL); heads are signed by the HSM's audit key, and the
trusted key in each check is that key's public half read from the key registry, not from the
export or the API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pytest
import requests
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from api.audit_log import AUDIT_SIGNING_KEY
from api.principal_keys import KeyHolder
from api.runtime import create_runtime, prepare_hsm
from api.settings import ConfigError
from kms.audit_export import TREE_HEAD_TYPE, verify_export
from kms.canonical import canonical_json
from kms.jose import parse_jws, parse_public_jwk, verify_jws
from kms.merkle import leaf_hash, root_from_leaves, verify_consistency, verify_inclusion
from tests.conftest import ServerThread, make_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

AUDIENCE = "embassy-kms/home"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class World:
    server: ServerThread
    root: str
    auditor: KeyHolder
    officer: KeyHolder
    operator: KeyHolder
    tool: KeyHolder

    def call(
        self, method: str, path: str, token: str | None = None, **headers: str
    ) -> requests.Response:
        if token:
            headers["X-Vault-Token"] = token
        return requests.request(method, f"{self.server.url}/v1/{path}", headers=headers, timeout=30)

    def login(self, party: KeyHolder) -> str:
        response = requests.post(
            f"{self.server.url}/v1/auth/jwt/login",
            json={"jwt": party.assertion(AUDIENCE)},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["auth"]["client_token"])

    def sign_head(self, token: str) -> dict[str, Any]:
        response = self.call("POST", "ekms/audit/tree-head", token)
        assert response.status_code == 200, response.text
        return dict(response.json()["data"])

    def trusted_key(self) -> dict[str, str]:
        """The audit key's public half, from the registry the HSM key was recorded in."""
        policy = self.server.runtime.store.get_policy(AUDIT_SIGNING_KEY)
        assert policy is not None
        der = policy.versions[policy.latest_version].public_key
        assert der is not None
        key = load_der_public_key(der)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64u(numbers.x.to_bytes(32, "big")),
            "y": b64u(numbers.y.to_bytes(32, "big")),
        }

    def activity(self) -> None:
        """Some allowed and some denied requests, so the log has something in it."""
        for n in range(3):
            assert self.call("POST", f"transit/keys/k{n}", self.root).status_code == 200
        assert self.call("GET", "ekms/audit/heads", "ekms.wrong").status_code == 403


@pytest.fixture
def world(tmp_path: Path, database_url: str) -> Iterator[World]:
    settings = make_settings(tmp_path, database_url=database_url)
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        vault.adapter.close()
        root = result["root_token"]
        parties = {
            "auditor": KeyHolder.generate("auditor"),
            "officer": KeyHolder.generate("officer"),
            "operator": KeyHolder.generate("operator"),
            "tool": KeyHolder.generate("restore-tool", "EdDSA"),
        }
        roles = {
            "auditor": "auditor",
            "officer": "security-officer",
            "operator": "restore-operator",
            "tool": "restore-tool",
        }
        for name, party in parties.items():
            response = requests.post(
                f"{server.url}/v1/ekms/principals/{party.principal}",
                json={"roles": [roles[name]], "jwk": party.jwk},
                headers={"X-Vault-Token": root},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        yield World(server, root, **parties)
    runtime.close()


def export_lines(world: World, token: str) -> tuple[list[bytes], requests.Response]:
    response = world.call("GET", "ekms/audit/export", token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return response.content.split(b"\n"), response


def test_signed_head_covers_the_stored_tree(world: World) -> None:
    world.activity()
    auditor = world.login(world.auditor)
    head = world.sign_head(auditor)
    store = world.server.runtime.store
    size, _ = store.tree_state()
    assert 0 < head["size"] <= size
    leaves = [leaf_hash(data) for data in store.audit_leaf_data(0, head["size"])]
    assert head["root_hash"] == root_from_leaves(leaves).hex()

    jws = parse_jws(head["jws"])
    assert jws.header["typ"] == TREE_HEAD_TYPE
    verify_jws(jws, parse_public_jwk(world.trusted_key()))
    assert jws.claims == {k: head[k] for k in ("root_hash", "size", "timestamp_ms")}

    listed = world.call("GET", "ekms/audit/heads", auditor).json()["data"]
    assert listed["heads"][-1] == head
    assert listed["public_key"] == world.trusted_key()
    assert listed["kid"] == parse_public_jwk(world.trusted_key()).thumbprint


def test_export_verifies_and_a_changed_row_is_named(world: World) -> None:
    world.activity()
    officer = world.login(world.officer)
    world.sign_head(officer)
    world.activity()
    world.sign_head(officer)
    world.activity()  # records after the last head: a warning, not an error

    lines, response = export_lines(world, officer)
    assert "x-ekms-audit-problem" not in response.headers
    report = verify_export(lines, trusted_key=world.trusted_key())
    assert report.ok, report.first_error
    assert report.heads == 2
    assert any("not yet covered" in w for w in report.warnings)
    records = [json.loads(line) for line in lines if line.startswith(b'{"index"')]
    assert [r["index"] for r in records] == list(range(len(records)))
    assert all("time_us" in r["record"] for r in records)

    # Someone with write access to the database turns a denial into an allow.
    denied = next(r for r in records if r["record"]["decision"] == "deny" and "proof" in r)
    forged = {**denied["record"], "decision": "allow", "status": 200}
    forged.pop("reason", None)
    with world.server.runtime.store._engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE audit_log SET record = :r WHERE seq = :i"),
            {"r": canonical_json(forged).decode(), "i": denied["index"]},
        )
    lines, response = export_lines(world, officer)
    assert "root does not match" in response.headers["x-ekms-audit-problem"]
    report = verify_export(lines, trusted_key=world.trusted_key())
    assert not report.ok
    assert report.first_error is not None
    assert report.first_error.record == denied["index"], report.first_error
    assert "content does not match its inclusion proof" in report.first_error.message
    operations = [r["operation"] for r in world.server.runtime.store.audit_records(10_000)]
    assert operations.count("audit.export") == 2  # each export is itself audited


def test_inclusion_and_consistency_proofs(world: World) -> None:
    world.activity()
    auditor = world.login(world.auditor)
    first = world.sign_head(auditor)
    world.activity()
    second = world.sign_head(auditor)
    old, new = first["size"], second["size"]
    assert old < new
    trusted = parse_public_jwk(world.trusted_key())
    for head in (first, second):
        verify_jws(parse_jws(head["jws"]), trusted)

    for index, size, against in ((0, old, first), (old - 1, new, second), (new - 1, None, second)):
        query = "" if size is None else f"?size={size}"
        answer = world.call("GET", f"ekms/audit/proof/{index}{query}", auditor)
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert data["head"] == against
        leaf = leaf_hash(canonical_json(data["record"]))
        assert data["leaf_hash"] == leaf.hex()
        proof = [bytes.fromhex(node) for node in data["proof"]]
        root = bytes.fromhex(against["root_hash"])
        assert verify_inclusion(leaf, index, against["size"], proof, root)
        assert not verify_inclusion(leaf, index ^ 1, against["size"], proof, root)

    answer = world.call("GET", f"ekms/audit/consistency?first={old}&second={new}", auditor)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert (data["first"], data["second"]) == (first, second)
    proof = [bytes.fromhex(node) for node in data["proof"]]
    roots = bytes.fromhex(first["root_hash"]), bytes.fromhex(second["root_hash"])
    assert verify_consistency(old, new, *roots, proof)
    assert not verify_consistency(old, new, roots[1], roots[0], proof)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("proof/abc", "index must be an integer"),
        ("proof/-1", "index must be an integer"),
        ("proof/1e3", "index must be an integer"),
        ("proof/99999999999999999999", "index must be an integer"),
        ("proof/0?size=x", "size must be an integer"),
        ("proof/0?size=1", "no signed tree head of size 1"),
        ("proof/100000", "is not in the signed tree head"),
        ("consistency", "first is required"),
        ("consistency?first=1", "no signed tree head of size 1"),
        ("consistency?first=100000", "must not be larger than second"),
        ("consistency?first=0&second=%20", "second must be an integer"),
    ],
)
def test_bad_input_is_a_400_with_a_reason(world: World, path: str, message: str) -> None:
    auditor = world.login(world.auditor)
    world.sign_head(auditor)
    answer = world.call("GET", f"ekms/audit/{path}", auditor)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["errors"][0]


def test_before_any_head_the_answers_say_what_to_do(world: World) -> None:
    auditor = world.login(world.auditor)
    for path in ("export", "proof/0", "consistency?first=0"):
        answer = world.call("GET", f"ekms/audit/{path}", auditor)
        assert answer.status_code == 400, answer.text
        assert "POST /v1/ekms/audit/tree-head" in answer.json()["errors"][0]
    heads = world.call("GET", "ekms/audit/heads", auditor).json()["data"]
    assert heads == {"heads": [], "public_key": None, "kid": None}


def test_only_auditors_security_officers_and_root(world: World) -> None:
    world.sign_head(world.root)
    for party in (world.auditor, world.officer):
        assert world.call("GET", "ekms/audit/export", world.login(party)).status_code == 200
    operator = world.login(world.operator)
    tool = world.login(world.tool)
    url = f"{world.server.url}/v1/ekms/audit/export"
    attempts = [
        world.call("GET", "ekms/audit/export", operator),
        world.call("GET", "ekms/audit/heads", operator),
        world.call("POST", "ekms/audit/tree-head", operator),
        world.call("GET", "ekms/audit/export", tool, DPoP=world.tool.dpop_proof("GET", url, tool)),
        world.call("GET", "ekms/audit/export"),
    ]
    for answer in attempts:
        assert answer.status_code == 403, answer.text
    records = world.server.runtime.store.audit_records(10_000)
    refused = [r for r in records if r["operation"].startswith("audit.") and r["status"] == 403]
    assert len(refused) == len(attempts)
    assert {r.get("principal") for r in refused} == {"operator", "restore-tool", None}
    assert any(
        r["reason"] == "the audit log is for security officers and auditors" for r in refused
    )


def test_sealing_signs_a_last_head(world: World) -> None:
    world.activity()
    store = world.server.runtime.store
    size_before_seal, _ = store.tree_state()
    assert world.call("PUT", "sys/seal", world.root).status_code == 204
    head, _ = store.tree_head() or (None, None)
    assert head is not None
    assert head.size == size_before_seal  # everything up to the seal request itself
    assert store.tree_state()[0] == size_before_seal + 1  # the seal's own record
    # Sealed: no HSM, yet an auditor with the root token can still export and verify.
    lines, _ = export_lines(world, world.root)
    assert verify_export(lines, trusted_key=world.trusted_key()).ok


def test_heads_are_signed_on_a_schedule(world: World) -> None:
    audit_log = world.server.runtime.audit_log
    world.activity()

    async def run_for_a_moment() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(audit_log.sign_periodically(0.05), timeout=0.5)

    asyncio.run(run_for_a_moment())
    heads = world.server.runtime.store.tree_heads()
    assert len(heads) == 1  # the log did not grow after the first one
    assert heads[0][0].size == world.server.runtime.store.tree_state()[0]


# --- the CLI --------------------------------------------------------------------------------------


def _ekms() -> str:
    beside = Path(sys.executable).with_name("ekms")
    found = str(beside) if beside.exists() else shutil.which("ekms")
    if found is None:
        pytest.fail("the ekms console script is not installed (pip install -e .)")
    return found


def ekms(world: World, token: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "VAULT_ADDR": world.server.url,
        "VAULT_TOKEN": token,
        "EKMS_ADDR": "",
        "EKMS_TOKEN": "",
    }
    result = subprocess.run(
        [_ekms(), "audit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_cli_export_then_verify(world: World, tmp_path: Path) -> None:
    world.activity()
    auditor = world.login(world.auditor)
    world.sign_head(auditor)
    key = tmp_path / "audit-key.jwk"
    key.write_text(json.dumps(world.trusted_key()))
    target = tmp_path / "export.jsonl"

    exported = ekms(world, auditor, "export", "-o", target)
    assert exported.returncode == 0, exported.stderr
    assert not (tmp_path / "export.jsonl.partial").exists()
    verified = ekms(world, auditor, "verify", target, "--trusted-key", key)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: ")

    to_stdout = ekms(world, auditor, "export")
    assert to_stdout.returncode == 0
    assert verify_export(to_stdout.stdout, trusted_key=world.trusted_key()).ok

    refused = ekms(world, world.login(world.operator), "export", "-o", tmp_path / "no.jsonl")
    assert refused.returncode == 2
    assert "403" in refused.stderr
    assert not (tmp_path / "no.jsonl").exists()
    assert not (tmp_path / "no.jsonl.partial").exists()


@pytest.mark.parametrize(("interval", "ok"), [(0, True), (10, True), (300, True), (5, False)])
def test_head_interval_setting(tmp_path: Path, interval: int, ok: bool) -> None:
    if ok:
        assert make_settings(tmp_path, audit_head_interval=interval).audit_head_interval == interval
    else:
        with pytest.raises(ConfigError, match="audit_head_interval"):
            make_settings(tmp_path, audit_head_interval=interval)
