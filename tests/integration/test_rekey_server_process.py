"""Rekey through the real ``ekms server`` with two worker processes, driven by the CLI.

The custodian lives in the supervisor: each CLI call is a new connection that any worker may
take, and the commit must reach every worker (each keeps its HSM login and takes the new keys),
then survive a restart.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import pytest
import requests

from kms import keyring
from kms.custody import recover_secret
from kms.derivation import RootKeys
from storage.sql_store import SqlStore
from tests.integration.test_rekey_api import assert_resealed, seal_a_value
from tests.integration.test_server_process import ServerProcess, cli, ekms, server_config

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow
__all__ = ["ekms", "server_config"]  # fixtures, reused from the server-process tests


def test_rekey_with_the_cli_reaches_every_worker_and_survives_a_restart(
    ekms: ServerProcess, tmp_path: Path
) -> None:
    client = hvac.Client(url=ekms.url)
    init = client.sys.initialize(secret_shares=3, secret_threshold=2)
    root, old = init["root_token"], init["keys"]
    client.token = root
    client.sys.submit_unseal_keys(old[:2])
    store = SqlStore.open(f"sqlite:///{tmp_path / 'data' / 'ekms.db'}", run_migrations=False)
    seal_a_value(store, RootKeys.derive(recover_secret(old[:2])))
    client.secrets.transit.create_key("registry")
    context = base64.b64encode(b"dataset=land-register").decode()
    wrapped = [
        client.secrets.transit.generate_data_key("registry", "plaintext", context=context)["data"]
        for _ in range(8)
    ]
    client.adapter.close()

    start = cli(
        ekms,
        "operator",
        "rekey",
        "init",
        "-key-shares",
        "3",
        "-key-threshold",
        "2",
        "-format",
        "json",
        token=root,
    )
    assert start.returncode == 0, start.stderr
    nonce = json.loads(start.stdout)["nonce"]
    assert (
        cli(ekms, "operator", "rekey", "-nonce", nonce, "--file", "-", stdin=old[1]).returncode == 0
    )
    issued = cli(
        ekms, "operator", "rekey", "-nonce", nonce, "--file", "-", "-format", "json", stdin=old[2]
    )
    assert issued.returncode == 0, issued.stderr
    answer = json.loads(issued.stdout)
    new, verify_nonce = answer["keys"], answer["verification_nonce"]
    for share in new[:2]:
        step = cli(
            ekms, "operator", "rekey", "verify", "-nonce", verify_nonce, "--file", "-", stdin=share
        )
        assert step.returncode == 0, step.stderr
    assert "in force" in step.stdout

    def decrypt_all() -> None:
        for item in wrapped:  # a fresh connection each: both workers answer
            out = requests.post(
                f"{ekms.url}/v1/transit/decrypt/registry",
                headers={"X-Vault-Token": root},
                json={"ciphertext": item["ciphertext"], "context": context},
                timeout=10,
            )
            assert out.status_code == 200, out.text
            assert out.json()["data"]["plaintext"] == item["plaintext"]

    decrypt_all()
    hashed = {
        requests.post(
            f"{ekms.url}/v1/sys/audit-hash/ekms",
            headers={"X-Vault-Token": root},
            json={"input": "dataset=land-register"},
            timeout=10,
        ).json()["hash"]
        for _ in range(6)
    }
    assert len(hashed) == 1  # every worker hashes with the same (kept) audit key

    ekms.stop()
    ekms.start()
    refused = cli(ekms, "operator", "unseal", "--file", "-", stdin=old[0])
    assert refused.returncode == 2
    assert "another share set" in refused.stderr
    for share in new[1:]:
        assert cli(ekms, "operator", "unseal", "--file", "-", stdin=share).returncode == 0
    decrypt_all()
    descriptor = store.get_share_set()
    assert descriptor is not None
    assert_resealed(store, keyring.unlock(descriptor, recover_secret(new[1:])))
    store.dispose()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
