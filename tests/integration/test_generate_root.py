"""Generate-root and root token revocation over HTTP, with hvac and the real ``bao`` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import pytest
import requests

from kms.custody import split_secret
from kms.tokens import TOKEN_LENGTH, decode_with_otp, hash_token

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import ServerThread

ROOT = Path(__file__).parents[2]


@pytest.fixture
def vault(server: ServerThread) -> Iterator[hvac.Client]:
    client = hvac.Client(url=server.url)
    yield client
    client.adapter.close()


@pytest.fixture
def unsealed(vault: hvac.Client) -> tuple[hvac.Client, list[str]]:
    result = vault.sys.initialize(secret_shares=5, secret_threshold=3)
    vault.token = result["root_token"]
    vault.sys.submit_unseal_keys(result["keys"][:3])
    return vault, result["keys"]


def raw(server: ServerThread, method: str, path: str, **kwargs: object) -> requests.Response:
    return requests.request(method, f"{server.url}/v1/{path}", timeout=10, **kwargs)  # type: ignore[arg-type]


def generate_root(vault: hvac.Client, shares: list[str]) -> tuple[str, dict[str, object]]:
    """Run one attempt with a generated OTP; returns the new token and the last answer."""
    started = vault.sys.start_root_token_generation()
    for share in shares:
        done = vault.sys.generate_root(key=share, nonce=started["nonce"])
    return decode_with_otp(done["encoded_token"], started["otp"]), done


def bao_binary() -> str:
    found = ROOT / ".venv" / "bin" / "bao"
    if found.exists():
        return str(found)
    which = shutil.which("bao")
    if which is None:
        pytest.skip("the OpenBao CLI (bao) is not installed")
    return which


def test_generate_root_with_hvac_mints_a_working_root_token(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, shares = unsealed
    old = vault.token
    idle = vault.sys.read_root_generation_progress()
    assert idle == {
        "started": False,
        "nonce": "",
        "progress": 0,
        "required": 3,
        "complete": False,
        "encoded_token": "",
        "encoded_root_token": "",
        "pgp_fingerprint": "",
        "otp_length": TOKEN_LENGTH,
        "otp": "",
    }
    started = vault.sys.start_root_token_generation()
    assert started["started"] is True
    assert len(started["otp"]) == started["otp_length"] == TOKEN_LENGTH
    assert started["nonce"]
    progress = vault.sys.read_root_generation_progress()
    assert (progress["nonce"], progress["otp"]) == (started["nonce"], "")
    steps = [vault.sys.generate_root(key=s, nonce=started["nonce"]) for s in shares[1:4]]
    assert [(s["progress"], s["complete"]) for s in steps[:2]] == [(1, False), (2, False)]
    done = steps[-1]
    assert done["complete"] is True
    assert done["encoded_token"] == done["encoded_root_token"]
    assert vault.sys.read_root_generation_progress()["started"] is False

    new = decode_with_otp(done["encoded_token"], started["otp"])
    assert new.startswith("ekms.")
    assert new != old
    fresh = hvac.Client(url=server.url, token=new)
    fresh.secrets.transit.create_key("made-by-new-root")
    vault.secrets.transit.read_key("made-by-new-root")  # the old token works until revoked

    records = server.runtime.store.audit_records(10_000)
    steps_audited = [r for r in records if r["operation"].startswith("sys.generate-root")]
    assert [r["operation"] for r in steps_audited] == [
        "sys.generate-root.status",
        "sys.generate-root.start",
        "sys.generate-root.status",
        *["sys.generate-root.update"] * 3,
        "sys.generate-root.status",
    ]
    minted = server.runtime.store.find_token(hash_token(new))
    assert minted is not None
    assert steps_audited[-2]["details"]["token_id"] == minted[0]
    assert {r["details"].get("member") for r in steps_audited[3:6]} == {"0.1", "0.2", "0.3"}
    dump = json.dumps(records)
    for secret in [new, old, started["otp"], done["encoded_token"], *shares]:
        assert secret not in dump
    for share in shares:  # nor any three consecutive words of a share
        words = share.split()
        for start in range(len(words) - 2):
            assert " ".join(words[start : start + 3]) not in dump


def test_generate_root_refusals_keep_progress(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, shares = unsealed
    with pytest.raises(hvac.exceptions.InvalidRequest, match="no root generation in progress"):
        vault.sys.generate_root(key=shares[0], nonce="none")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="pgp_key is not supported"):
        vault.sys.start_root_token_generation(pgp_key="mQENBFx...")
    with pytest.raises(hvac.exceptions.InvalidRequest, match=f"otp must be {TOKEN_LENGTH}"):
        vault.sys.start_root_token_generation(otp="c2hvcnQ=")
    nonce = vault.sys.start_root_token_generation()["nonce"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already in progress"):
        vault.sys.start_root_token_generation()
    vault.sys.generate_root(key=shares[0], nonce=nonce)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="nonce does not match"):
        vault.sys.generate_root(key=shares[1], nonce="0" * 36)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already submitted"):
        vault.sys.generate_root(key=shares[0], nonce=nonce)
    foreign, _ = split_secret(os.urandom(32), 3, 5, now=0.0)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.generate_root(key=foreign[1], nonce=nonce)
    assert vault.sys.read_root_generation_progress()["progress"] == 1

    bad = [
        ("PUT", "sys/generate-root/update", {"key": shares[1]}, "missing required field 'nonce'"),
        ("PUT", "sys/generate-root/update", {"nonce": nonce}, "missing required field 'key'"),
        ("PUT", "sys/generate-root/update", {"key": 5, "nonce": nonce}, "key"),
        ("PUT", "sys/generate-root/update", {"key": "x" * 2000, "nonce": nonce}, "too long"),
        ("PUT", "sys/generate-root/update", {"key": "x", "nonce": "n" * 100}, "too long"),
        ("PUT", "sys/generate-root/update", {"key": "a b", "nonce": nonce, "x": 1}, "'x'"),
        ("PUT", "sys/generate-root/attempt", {"otp": 7}, "otp"),
        ("POST", "sys/generate-root/attempt", {"colour": "red"}, "unknown field 'colour'"),
    ]
    for method, path, body, message in bad:
        response = raw(server, method, path, json=body)
        assert response.status_code == 400, (body, response.text)
        assert message in response.json()["errors"][0], (body, response.text)
    not_json = raw(server, "PUT", "sys/generate-root/update", data=b"{nope")
    assert not_json.status_code == 400
    assert vault.sys.read_root_generation_progress()["progress"] == 1

    vault.sys.cancel_root_generation()
    assert vault.sys.read_root_generation_progress()["started"] is False
    with pytest.raises(hvac.exceptions.InvalidRequest, match="no root generation in progress"):
        vault.sys.generate_root(key=shares[1], nonce=nonce)
    fresh, _ = generate_root(vault, shares[2:])  # a new attempt starts from nothing
    assert server.runtime.store.find_token(hash_token(fresh)) is not None


def test_generate_root_needs_an_initialised_unsealed_node(
    vault: hvac.Client, server: ServerThread
) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = raw(server, method, "sys/generate-root/attempt", json={})
        assert response.status_code == 400
        assert response.json()["errors"] == ["Vault is not initialized"]
    result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
    for call in (
        vault.sys.read_root_generation_progress,
        vault.sys.start_root_token_generation,
        vault.sys.cancel_root_generation,
        lambda: vault.sys.generate_root(key=result["keys"][0], nonce="n"),
    ):
        with pytest.raises(hvac.exceptions.VaultDown, match="Vault is sealed"):
            call()
    vault.token = result["root_token"]
    vault.sys.submit_unseal_keys(result["keys"][:2])
    nonce = vault.sys.start_root_token_generation()["nonce"]
    vault.sys.generate_root(key=result["keys"][0], nonce=nonce)
    vault.sys.seal()  # sealing drops the attempt and its shares
    vault.sys.submit_unseal_keys(result["keys"][1:])
    assert vault.sys.read_root_generation_progress()["started"] is False


def test_revoke_self_and_revoke_accessor(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread
) -> None:
    vault, shares = unsealed
    store = server.runtime.store
    old = vault.token
    old_id = store.find_token(hash_token(old))[0]  # type: ignore[index]
    second, _ = generate_root(vault, shares[:3])
    third, _ = generate_root(vault, shares[2:])
    second_id = store.find_token(hash_token(second))[0]  # type: ignore[index]

    assert vault.auth.token.revoke_self().status_code == 204
    with pytest.raises(hvac.exceptions.Forbidden):
        vault.secrets.transit.list_keys()
    assert (
        raw(server, "POST", "auth/token/revoke-self", headers={"X-Vault-Token": old}).status_code
        == 403
    )

    admin = hvac.Client(url=server.url, token=third)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="no live token has accessor"):
        admin.auth.token.revoke_accessor(old_id)  # revoked already
    for accessor, message in (
        ("", "24 hexadecimal"),
        (third, "24 hexadecimal"),
        ("f" * 24, "no live"),
    ):
        response = raw(
            server,
            "POST",
            "auth/token/revoke-accessor",
            headers={"X-Vault-Token": third},
            json={"accessor": accessor},
        )
        assert response.status_code == 400
        assert message in response.json()["errors"][0]
    missing = raw(
        server, "PUT", "auth/token/revoke-accessor", headers={"X-Vault-Token": third}, json={}
    )
    assert missing.status_code == 400
    assert "missing required field 'accessor'" in missing.json()["errors"][0]

    store.insert_token("ab" * 12, hash_token("ekms.not-root"), [], server.runtime.clock.now())
    denied = raw(
        server,
        "POST",
        "auth/token/revoke-accessor",
        headers={"X-Vault-Token": "ekms.not-root"},
        json={"accessor": second_id},
    )
    assert denied.status_code == 403
    assert admin.auth.token.revoke_accessor(second_id).status_code == 204
    assert store.find_token(hash_token(second)) is None
    admin.secrets.transit.create_key("still-working")

    records = store.audit_records(10_000)
    revocations = [r for r in records if r["operation"].startswith("auth.token.revoke")]
    assert {r["details"].get("accessor") for r in revocations if r["status"] == 204} == {
        old_id,
        second_id,
    }
    dump = json.dumps(records)
    for secret in (old, second, third):
        assert secret not in dump


def test_bao_cli_generates_and_decodes_our_root_token(
    unsealed: tuple[hvac.Client, list[str]], server: ServerThread, tmp_path: Path
) -> None:
    """The real OpenBao CLI (2.6+ speaks sys/generate-root-token/*) against this server."""
    binary = bao_binary()
    vault, shares = unsealed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))} | {
        "BAO_ADDR": server.url,
        "HOME": str(tmp_path),
    }

    def bao(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "operator", "generate-root", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
            check=False,
        )

    init = bao("-init", "-format=json")
    assert init.returncode == 0, init.stderr
    attempt = json.loads(init.stdout)
    assert attempt["otp_length"] == TOKEN_LENGTH
    for share in shares[:3]:
        step = bao("-nonce", attempt["nonce"], "-format=json", "-", stdin=share + "\n")
        assert step.returncode == 0, step.stderr
    encoded = json.loads(step.stdout)["encoded_token"]
    decoded = bao(f"-decode={encoded}", f"-otp={attempt['otp']}")
    assert decoded.returncode == 0, decoded.stderr
    token = decoded.stdout.strip()
    assert token == decode_with_otp(encoded, attempt["otp"])
    assert server.runtime.store.find_token(hash_token(token)) is not None

    # A token generated through hvac (Vault's sys/generate-root paths) decodes the same way.
    started = vault.sys.start_root_token_generation()
    for share in shares[2:]:
        done = vault.sys.generate_root(key=share, nonce=started["nonce"])
    via_bao = bao(f"-decode={done['encoded_token']}", f"-otp={started['otp']}")
    assert via_bao.returncode == 0, via_bao.stderr
    assert via_bao.stdout.strip() == decode_with_otp(done["encoded_token"], started["otp"])

    status = bao("-status", "-format=json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["started"] is False
    cancel = bao("-cancel")
    assert cancel.returncode == 0, cancel.stderr

    revoke = subprocess.run(
        [binary, "token", "revoke", "-self"],
        env=env | {"BAO_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert revoke.returncode == 0, revoke.stderr
    assert server.runtime.store.find_token(hash_token(token)) is None
