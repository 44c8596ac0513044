"""Unseal naming the official who presents each share, while the service is sealed.

A real server (SoftHSM, SQLite or PostgreSQL) at an embassy site: officials registered while it
was open, then sealed. Officials sign ``ekms-unseal+jwt`` statements with their own keys; every
refused statement must leave the unseal progress where it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hvac
import pytest

from api.runtime import create_runtime, prepare_hsm
from kms.unseal_assertion import share_member
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import AUDIENCE, Party, World
from tests.integration.test_audit_cli import EKMS

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import requests


@dataclass
class Sealed:
    world: World
    shares: list[str]

    def unseal(self, share: str, assertion: Any = None) -> requests.Response:
        body: dict[str, Any] = {"key": share}
        if assertion is not None:
            body["official_assertion"] = assertion
        return self.world.call("PUT", "sys/unseal", body=body)

    def status(self) -> dict[str, Any]:
        return dict(self.world.call("GET", "sys/seal-status").json())

    def unseal_records(self) -> list[dict[str, Any]]:
        records = self.world.server.runtime.store.audit_records(limit=100_000)
        return [r for r in records if r["operation"] == "sys.unseal"]


def sign(party: Party, share: str, nonce: str = "", **changes: Any) -> str:
    return party.unseal_assertion(AUDIENCE, nonce=nonce, member=share_member(share), **changes)


@pytest.fixture
def sealed(tmp_path: Path, database_url: str) -> Iterator[Sealed]:
    settings = make_settings(
        tmp_path, site_name="embassy-1", site_kind="embassy", database_url=database_url
    )
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        vault.adapter.close()
        root = result["root_token"]
        world = World(
            server,
            root,
            [Party.ec("official-0"), Party.ed("official-1"), Party.ec("official-2")],
            Party.ec("officer"),
            Party.ec("operator"),
            Party.ed("restore-tool"),
        )
        for party, role in (
            *((o, "official") for o in world.officials),
            (world.officer, "security-officer"),
        ):
            world.call(
                "POST",
                f"ekms/principals/{party.id}",
                root,
                body={"roles": [role], "jwk": party.jwk},
            ).raise_for_status()
        # official-2 was removed since: still registered, no longer active.
        store = runtime.store
        removed = store.principal("official-2")
        assert removed is not None
        store.update_principal(dataclasses.replace(removed, disabled_at=time.time()))
        assert world.call("PUT", "sys/seal", root).status_code == 204
        yield Sealed(world, result["keys"])
    runtime.close()


def test_officials_name_themselves_while_sealed(sealed: Sealed) -> None:
    first, second = sealed.shares[0], sealed.shares[1]
    official, other = sealed.world.officials[0], sealed.world.officials[1]
    answer = sealed.unseal(first, sign(official, first))
    assert answer.status_code == 200, answer.text
    assert answer.json()["progress"] == 1
    nonce = answer.json()["nonce"]
    answer = sealed.unseal(second, sign(other, second, nonce))
    assert answer.status_code == 200, answer.text
    assert answer.json()["sealed"] is False

    one, two = sealed.unseal_records()[-2:]
    assert one["principal"] == "official-0"
    assert one["details"] == {
        "member": share_member(first),
        "official": "official-0",
        "progress": 1,
        "unsealed": False,
    }
    assert two["principal"] == "official-1"
    assert two["details"]["official"] == "official-1"
    assert two["details"]["member"] == share_member(second)
    assert two["details"]["unsealed"] is True

    # An unseal statement is not a login, and a login assertion is not an unseal statement.
    login = sealed.world.call(
        "POST", "auth/jwt/login", body={"jwt": sign(official, first, nonce="")}
    )
    assert login.status_code == 401


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_refused_statement_does_not_count_the_share(sealed: Sealed) -> None:
    share, later = sealed.shares[0], sealed.shares[1]
    official = sealed.world.officials[0]
    impostor = Party.ec("official-0")  # the right name, another key
    now = time.time()
    cases: list[tuple[object, int, str, str]] = [
        (sign(impostor, share), 403, "permission denied", "'official-0': bad signature"),
        (sign(sealed.world.officer, share), 403, "permission denied", "not an active official"),
        (sign(sealed.world.officials[2], share), 403, "permission denied", "not an active"),
        (sign(Party.ec("nobody"), share), 403, "permission denied", "not an active official"),
        (official.assertion(), 403, "permission denied", "typ mismatch"),
        (sign(official, later), 400, "signed for share member", ""),
        (sign(official, share, nonce="another"), 400, "attempt that has ended", ""),
        (sign(official, share, now=now - 600), 400, "official_assertion refused: expired", ""),
        (sign(official, share, aud="elsewhere"), 400, "refused: aud mismatch", ""),
        (sign(official, share, exp=int(now) + 3600), 400, "lifetime too long", ""),
        (sign(official, share, unseal=None), 400, 'must carry "unseal"', ""),
        ("not-a-jws", 400, "not a usable compact JWS", ""),
        ("", 400, "must be a compact JWS", ""),
        (42, 400, "official_assertion: Input should be a valid string", ""),
        ("e" * 9000, 400, "longer than 8192 characters", ""),
    ]
    for assertion, status, message, reason in cases:
        answer = sealed.unseal(share, assertion)
        assert answer.status_code == status, (message, answer.text)
        assert message in answer.json()["errors"][0], answer.text
        if status != 400 or "Input should" not in message:
            assert "not counted" in answer.text or status == 403
        assert sealed.status()["progress"] == 0, message
        record = sealed.unseal_records()[-1]
        assert record["decision"] == ("deny" if status == 403 else "error")
        assert "official" not in record.get("details", {})
        if reason:
            assert reason in record["reason"]
            assert record["details"]["claimed_official"] in (
                "official-0",
                "officer",
                "official-2",
                "nobody",
            )

    # A statement to start an attempt, sent after another share started one, is refused;
    # signed again with the attempt's nonce it counts.
    started = sealed.unseal(share)
    assert started.status_code == 200
    nonce = started.json()["nonce"]
    other = sealed.world.officials[1]
    stale = sealed.unseal(later, sign(other, later))
    assert stale.status_code == 400
    assert f"attempt {nonce} is in progress: sign again" in stale.json()["errors"][0]
    assert sealed.status()["progress"] == 1
    done = sealed.unseal(later, sign(other, later, nonce))
    assert done.status_code == 200, done.text
    assert done.json()["sealed"] is False


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_replayed_statement_is_refused(sealed: Sealed) -> None:
    share = sealed.shares[0]
    statement = sign(sealed.world.officials[0], share)
    assert sealed.unseal(share, statement).json()["progress"] == 1
    assert sealed.world.call("PUT", "sys/unseal", body={"reset": True}).status_code == 200
    assert sealed.status()["progress"] == 0
    again = sealed.unseal(share, statement)
    assert again.status_code == 400
    assert "official_assertion was already used" in again.json()["errors"][0]
    assert sealed.status()["progress"] == 0


def test_vault_clients_unseal_as_before(sealed: Sealed) -> None:
    client = hvac.Client(url=sealed.world.server.url)
    try:
        assert client.sys.submit_unseal_key(sealed.shares[2])["progress"] == 1
        assert client.sys.submit_unseal_key(sealed.shares[0])["sealed"] is False
    finally:
        client.adapter.close()
    records = sealed.unseal_records()[-2:]
    assert all("official" not in r["details"] and "principal" not in r for r in records)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_cli_signs_for_the_official(sealed: Sealed, tmp_path: Path) -> None:
    official = sealed.world.officials[1]
    key_file = tmp_path / "official-1.jwk"
    key_file.write_text(json.dumps(official.private_jwk()))
    env = {**os.environ, "EKMS_ADDR": sealed.world.server.url, "EKMS_AUDIENCE": AUDIENCE}

    def ekms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EKMS, "operator", "unseal", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    unsealed = ekms("--official", "official-1", "--key", str(key_file), sealed.shares[1])
    assert unsealed.returncode == 0, unsealed.stderr
    assert "Unseal Progress 1/2" in unsealed.stdout
    record = sealed.unseal_records()[-1]
    assert record["details"]["official"] == "official-1"
    assert record["details"]["member"] == share_member(sealed.shares[1])

    missing = ekms("--official", "official-1", sealed.shares[2])
    assert missing.returncode == 2
    assert missing.stderr.startswith("Error: --official ID and --key FILE go together")
    broken = tmp_path / "broken.jwk"
    broken.write_text(json.dumps({**official.private_jwk(), "d": "AAAA"}))
    bad = ekms("--official", "official-1", "--key", str(broken), sealed.shares[2])
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"Error: --key {broken}: the JWK's 'd' must be 32 bytes"
    wrong = ekms("--official", "official-0", "--key", str(key_file), sealed.shares[2])
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "Error: 403: permission denied"
    assert "Traceback" not in bad.stderr + wrong.stderr + missing.stderr
    assert sealed.status()["progress"] == 1
