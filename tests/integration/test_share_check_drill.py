"""Share checks and share-health drills over HTTP, and the custody commands of the ``ekms`` CLI.

A real node (SoftHSM, SQLite) with officials holding their own keys; shares are checked by
challenge-response, so the tests assert both what is accepted and that nothing stored or
recorded could stand in for a share.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import delete, select

from kms import share_check
from kms.custody import parse_share, split_secret
from kms.drill import DAY, Check, Drill
from kms.jose import b64url_encode
from kms.keyring import set_name
from storage.schema import share_challenges, share_members
from tests.integration.test_access import Party
from tests.integration.test_rekey_api import Custody, node

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).parents[2]


@pytest.fixture
def custody(tmp_path: Path) -> Iterator[Custody]:
    officials = [Party.ec(f"official-{n}") for n in range(3)]
    with node(tmp_path, f"sqlite:///{tmp_path / 'ekms.db'}", officials) as running:
        yield running


def prove(custody: Custody, share: str, **changes: Any) -> dict[str, Any]:
    challenge = custody.call("GET", "ekms/shares/challenge").json()["data"]["challenge"]
    body = share_check.check_request(share, challenge)
    body.update(changes)
    return body


def check(custody: Custody, body: dict[str, Any], token: str | None = None) -> Any:
    return custody.world.call("POST", "ekms/shares/check", token, body=body)


def test_share_check_accepts_the_right_share_and_refuses_the_rest(custody: Custody) -> None:
    shares = custody.shares
    first = prove(custody, shares[0])
    ok = check(custody, first)
    assert ok.status_code == 200, ok.text
    data = ok.json()["data"]
    assert (data["member"], data["confirmed"]) == ("0.0", True)
    assert data["share_set"]["identifier"] == custody.descriptor().identifier

    replayed = check(custody, first)
    assert replayed.status_code == 400
    assert "unknown, used or expired challenge" in replayed.json()["errors"][0]
    wrong_member = check(custody, prove(custody, shares[1], member="0.2"))
    assert wrong_member.status_code == 400
    assert "not member 0.2" in wrong_member.json()["errors"][0]
    foreign, _ = split_secret(os.urandom(32), 2, 3, now=0)
    other_set = check(custody, prove(custody, foreign[0]))
    assert other_set.status_code == 400
    assert "not to the set in force" in other_set.json()["errors"][0]
    forged = check(custody, prove(custody, shares[2], proof=b64url_encode(bytes(64))))
    assert forged.status_code == 400
    assert check(custody, prove(custody, shares[2], proof="AAAA")).status_code == 400
    assert check(custody, prove(custody, shares[2], member="9")).status_code == 400
    no_member = check(custody, prove(custody, shares[2], member="0.7"))
    assert "no member 0.7" in no_member.json()["errors"][0]

    token = custody.world.login(custody.world.officials[1])
    named = check(custody, prove(custody, shares[1]), token)
    assert named.status_code == 200
    bad_token = check(custody, prove(custody, shares[1]), "ekms.nonsense")
    assert bad_token.status_code == 403

    records = custody.server.runtime.store.audit_records(10_000)
    checks = [r for r in records if r["operation"] == "custody.share-check"]
    assert [r["status"] for r in checks] == [200, 400, 400, 400, 400, 400, 400, 400, 200, 403]
    assert checks[0]["details"]["member"] == "0.0"
    assert checks[0]["details"]["result"] == "confirmed"
    assert checks[-2]["details"]["official"] == "official-1"
    assert checks[-2]["principal"] == "official-1"
    dump = json.dumps(records)
    assert first["proof"] not in dump
    assert first["challenge"] not in dump
    for share in shares:
        words = share.split()
        for start in range(len(words) - 2):
            assert " ".join(words[start : start + 3]) not in dump


def test_nothing_stored_can_stand_in_for_a_share(custody: Custody) -> None:
    """The stored commitments are public keys: neither the share nor its derived seed."""
    runtime = custody.server.runtime
    descriptor = custody.descriptor()
    stored = runtime.store.share_members(set_name(descriptor))
    assert [m.member for m in stored] == ["0.0", "0.1", "0.2"]
    commitments = {m.member: m.commitment for m in stored}
    public = [descriptor.verifier, descriptor.identifier.to_bytes(2, "big"), b"", bytes(32)]
    guesses = set()
    for member in commitments:
        group, index = share_check.parse_member(member)
        label = b"embassy-kms/v1/share-check\x00" + descriptor.identifier.to_bytes(2, "big")
        message = label + bytes([group, index])
        for key in public:
            guesses.add(hmac.new(key, message, hashlib.sha256).digest())
            guesses.add(hashlib.sha256(key + message).digest())
    for share_text in custody.shares:
        share = parse_share(share_text)
        commitment = commitments[share_check.member_id(share)]
        assert commitment is not None
        assert commitment not in guesses
        assert commitment != share.value
        assert commitment != share_check._seed(share)  # the private seed is never stored
        assert commitment == share_check.commitment(share)
    assert len(set(commitments.values())) == 3
    with runtime.store._engine.connect() as conn:
        rows = conn.execute(select(share_members)).all()
    dump = repr(rows).encode()
    for share_text in custody.shares:
        share = parse_share(share_text)
        assert share.value not in b"".join(bytes(r.commitment) for r in rows)
        assert share_check._seed(share).hex().encode() not in dump


def test_a_set_made_before_share_checks_says_so(custody: Custody) -> None:
    runtime = custody.server.runtime
    with runtime.store._engine.begin() as conn:
        conn.execute(delete(share_members))
    answer = custody.call("GET", "ekms/shares/challenge")
    assert answer.status_code == 409
    assert "made before share checks existed" in answer.json()["errors"][0]
    assert "rekey" in answer.json()["errors"][0]
    with runtime.store._engine.begin() as conn:
        conn.execute(
            share_challenges.insert().values(
                id=hashlib.sha256(b"c" * 32).digest(), expires_at=time.time() + 60
            )
        )
    body = share_check.check_request(custody.shares[0], b64url_encode(b"c" * 32))
    refused = check(custody, body)
    assert refused.status_code == 409
    assert "made before share checks existed" in refused.json()["errors"][0]


def test_drill_report_states_and_quorum(custody: Custody) -> None:
    world, runtime = custody.world, custody.server.runtime
    shares = custody.shares
    name = set_name(custody.descriptor())
    now = time.time()
    runtime.store.record_share_check(name, Check("0.1", now - 40 * DAY, "official-1"))
    runtime.store.record_share_check(name, Check("0.2", now - 5 * DAY, "official-2"))
    officer = world.login(world.officer)
    assert custody.call("POST", "ekms/drills", None).status_code == 403
    started = custody.call("POST", "ekms/drills", officer, duration=3600, stale_after_days=30)
    assert started.status_code == 200, started.text
    drill = started.json()["data"]
    assert drill["site"] == "embassy-1"
    assert drill["node"] == "test-node"
    assert drill["stale_after_days"] == 30

    def report() -> dict[str, Any]:
        answer = custody.call("GET", f"ekms/drills/{drill['id']}", officer)
        assert answer.status_code == 200, answer.text
        return dict(answer.json()["data"])

    before = report()
    assert {m["member"]: m["state"] for m in before["members"]} == {
        "0.0": "missing",
        "0.1": "stale",
        "0.2": "recent",
    }
    assert before["quorum"] == {"with_confirmed": False, "with_confirmed_or_recent": False}
    assert before["sites"][0]["site"] == "embassy-1"
    assert "sites are not modelled yet" in before["site_note"]

    official = [world.login(o) for o in world.officials]
    path = f"ekms/drills/{drill['id']}/check-in"
    by_officer = world.call("POST", path, officer, body=prove(custody, shares[0]))
    assert by_officer.status_code == 403
    checked = world.call("POST", path, official[0], body=prove(custody, shares[0]))
    assert checked.status_code == 200, checked.text
    assert checked.json()["data"]["holder"] == "official-0"
    middle = report()
    assert {m["member"]: m["state"] for m in middle["members"]}["0.0"] == "confirmed"
    assert middle["quorum"] == {"with_confirmed": False, "with_confirmed_or_recent": True}
    assert middle["members"][0]["confirmed_by"] == "official-0"

    not_theirs = world.call("POST", path, official[1], body=prove(custody, shares[0]))
    assert not_theirs.status_code == 409
    assert "recorded as held by official-0" in not_theirs.json()["errors"][0]
    world.call("POST", path, official[1], body=prove(custody, shares[1])).raise_for_status()
    after = report()
    assert after["counts"] == {"confirmed": 2, "recent": 1, "stale": 0, "missing": 0}
    assert after["quorum"] == {"with_confirmed": True, "with_confirmed_or_recent": True}

    listed = custody.call("GET", "ekms/drills", officer).json()["data"]["drills"]
    assert [d["id"] for d in listed] == [drill["id"]]
    members = custody.call("GET", "ekms/shares", official[2]).json()["data"]["members"]
    assert [(m["member"], m["holder"]) for m in members] == [
        ("0.0", "official-0"),
        ("0.1", "official-1"),
        ("0.2", None),
    ]
    assert custody.call("GET", "ekms/drills/nope", officer).status_code == 404
    closed = Drill("closed-1", name, now - 7200, now - 3600, 30, "officer", "embassy-1", "n")
    runtime.store.insert_drill(closed)
    late = world.call(
        "POST", "ekms/drills/closed-1/check-in", official[2], body=prove(custody, shares[2])
    )
    assert late.status_code == 409
    assert "closed at its deadline" in late.json()["errors"][0]
    assert custody.call("POST", "ekms/drills", officer, duration=10).status_code == 400
    both = custody.call("POST", "ekms/drills", officer, duration=3600, deadline=now + 60)
    assert both.status_code == 400


# --- the CLI ----------------------------------------------------------------------------------


def ekms(
    custody: Custody, *args: str, token: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAULT_ADDR": custody.server.url}
    env.pop("VAULT_TOKEN", None)
    env.pop("EKMS_TOKEN", None)
    if token:
        env["EKMS_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        check=False,
    )


def test_cli_rekey_to_holders_then_share_check_and_drill(custody: Custody, tmp_path: Path) -> None:
    world, old, root = custody.world, custody.shares, custody.root
    holders = world.officials[:2]
    key_files = []
    for official in holders:
        path = tmp_path / f"{official.id}.jwk"
        path.write_text(json.dumps(official.private_jwk()))
        key_files.append(str(path))

    no_token = ekms(custody, "operator", "rekey", "init", "-key-shares", "2", "-key-threshold", "2")
    assert no_token.returncode == 2
    assert no_token.stderr.startswith("Error: 403")
    init = ekms(
        custody,
        "operator",
        "rekey",
        "init",
        "-key-shares",
        "2",
        "-key-threshold",
        "2",
        "--holder",
        "official-0",
        "--holder",
        "official-1",
        "-format",
        "json",
        token=root,
    )
    assert init.returncode == 0, init.stderr
    nonce = json.loads(init.stdout)["nonce"]
    status = ekms(custody, "operator", "rekey", "status")
    assert "Rekey Progress         0/2" in status.stdout
    no_nonce = ekms(custody, "operator", "rekey", "--file", "-", stdin=old[0] + "\n")
    assert no_nonce.returncode == 2
    assert "-nonce" in no_nonce.stderr
    first = ekms(custody, "operator", "rekey", "-nonce", nonce, "--file", "-", stdin=old[0] + "\n")
    assert first.returncode == 0, first.stderr
    assert "Rekey Progress         1/2" in first.stdout
    last = ekms(
        custody,
        "operator",
        "rekey",
        "-nonce",
        nonce,
        "--file",
        "-",
        "-format",
        "json",
        stdin=old[2] + "\n",
    )
    assert last.returncode == 0, last.stderr
    issued = json.loads(last.stdout)
    assert issued["encrypted"] is True
    verify_nonce = issued["verification_nonce"]
    table = ekms(custody, "operator", "rekey", "status")
    assert "Phase                  verifying" in table.stdout

    new = []
    for key_file, token in zip(key_files, issued["keys"], strict=True):
        opened = ekms(custody, "operator", "rekey", "decrypt", "--key", key_file, token)
        assert opened.returncode == 0, opened.stderr
        new.append(opened.stdout.strip())
    wrong = ekms(custody, "operator", "rekey", "decrypt", "--key", key_files[1], issued["keys"][0])
    assert wrong.returncode == 2
    assert "another holder" in wrong.stderr
    for share in new:
        verified = ekms(
            custody,
            "operator",
            "rekey",
            "verify",
            "-nonce",
            verify_nonce,
            "--file",
            "-",
            stdin=share + "\n",
        )
        assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("Success! The new share set is verified and in force")

    checked = ekms(custody, "operator", "share", "check", "--file", "-", stdin=new[1] + "\n")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("Share OK: member 0.1")
    stale = ekms(custody, "operator", "share", "check", "--file", "-", stdin=old[1] + "\n")
    assert stale.returncode == 2
    assert "not to the set in force" in stale.stderr

    officer, official = world.login(world.officer), world.login(holders[0])
    started = ekms(custody, "drill", "start", "--hours", "2", "-format", "json", token=officer)
    assert started.returncode == 0, started.stderr
    drill = json.loads(started.stdout)["id"]
    anonymous = ekms(custody, "drill", "check-in", drill, "--file", "-", stdin=new[0] + "\n")
    assert anonymous.returncode == 2
    assert "log in first" in anonymous.stderr
    checked_in = ekms(
        custody, "drill", "check-in", drill, "--file", "-", token=official, stdin=new[0] + "\n"
    )
    assert checked_in.returncode == 0, checked_in.stderr
    report = ekms(custody, "drill", "report", drill, token=officer)
    assert report.returncode == 0, report.stderr
    assert "0.0     confirmed  official-0" in report.stdout
    assert "Quorum reachable with confirmed shares: NO" in report.stdout
    listing = ekms(custody, "drill", "list", token=officer)
    assert drill in listing.stdout
    assert "Traceback" not in report.stderr + listing.stderr + checked_in.stderr
