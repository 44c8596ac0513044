"""Rekey over HTTP against a real SoftHSM token: hvac, the JWE hand-over, and crash points.

Each test initialises a real node (SoftHSM token, SQLite or PostgreSQL), unseals it with a
quorum of the shares it keeps, and registers officials with their own keys (the access tests'
``World`` and ``Party``). What the HSM accepts is asked of a fresh process (``TokenPins``):
a process that has the token loaded keeps seeing the PINs it loaded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hvac
import hvac.exceptions
import pytest

from api.runtime import create_runtime, local_seal_control, prepare_hsm
from hsm.pins import TokenPins
from hsm.softhsm import find_module
from kms import jwe, keyring
from kms.custody import recover_secret
from kms.derivation import RootKeys
from kms.jose import parse_public_jwk
from kms.ports import SystemRandom
from kms.rekey import RekeyPlan
from kms.sealed_values import BACKEND_CREDENTIAL, Purpose, open_value, seal
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import Party, World

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from api.settings import Settings
    from kms.custody import ShareSetDescriptor


@dataclass
class Custody:
    world: World
    shares: list[str]
    settings: Settings

    @property
    def server(self) -> ServerThread:
        return self.world.server

    @property
    def root(self) -> str:
        return self.world.root

    def vault(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.server.url, token=token or self.root)

    def call(self, method: str, path: str, token: str | None = None, **body: Any) -> Any:
        return self.world.call(method, path, token, body=body or None)

    def descriptor(self) -> ShareSetDescriptor:
        found = self.server.runtime.store.get_share_set()
        assert found is not None
        return found

    def pins(self) -> TokenPins:
        return TokenPins(module=find_module(), token_label=self.settings.token_label)

    def keys_of(self, shares: list[str], descriptor: ShareSetDescriptor | None = None) -> RootKeys:
        secret = recover_secret(shares)
        return keyring.unlock(descriptor or self.descriptor(), secret)


@contextlib.contextmanager
def node(tmp_path: Path, database_url: str, officials: list[Party]) -> Iterator[Custody]:
    settings = make_settings(
        tmp_path, site_name="embassy-1", site_kind="embassy", database_url=database_url
    )
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    try:
        with ServerThread(runtime) as server:
            vault = hvac.Client(url=server.url)
            result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
            vault.sys.submit_unseal_keys(result["keys"][:2])
            root = result["root_token"]
            vault.token = root
            vault.write("transit/keys/laws", classification="internal")
            world = World(
                server, root, officials, Party.ec("officer"), Party.ec("operator"), Party.ed("tool")
            )
            for party, role in [
                *((o, "official") for o in officials),
                (world.officer, "security-officer"),
            ]:
                ok = world.call(
                    "POST",
                    f"ekms/principals/{party.id}",
                    root,
                    body={"roles": [role], "jwk": party.jwk},
                )
                assert ok.status_code == 200, ok.text
            yield Custody(world, list(result["keys"]), settings)
            vault.adapter.close()
    finally:
        runtime.close()


@pytest.fixture
def custody(tmp_path: Path) -> Iterator[Custody]:
    officials = [Party.ec("official-0"), Party.ec("official-1"), Party.ed("official-2")]
    with node(tmp_path, f"sqlite:///{tmp_path / 'ekms.db'}", officials) as running:
        yield running


@pytest.fixture
def custody_any_db(tmp_path: Path, database_url: str) -> Iterator[Custody]:
    officials = [Party.ec(f"official-{n}") for n in range(3)]
    with node(tmp_path, database_url, officials) as running:
        yield running


def encrypt(vault: hvac.Client, plaintext: bytes) -> str:
    data = base64.b64encode(plaintext).decode()
    return str(vault.secrets.transit.encrypt_data("laws", data)["data"]["ciphertext"])


def decrypts(vault: hvac.Client, ciphertext: str, plaintext: bytes) -> bool:
    out = vault.secrets.transit.decrypt_data("laws", ciphertext)["data"]["plaintext"]
    return base64.b64decode(out) == plaintext


SEALED = b'{"token":"sealed before the rekey"}'


def seal_a_value(store: Any, keys: RootKeys) -> None:
    """A value sealed under the barrier key, as a transit site's credential is (ADR 0012 §2)."""
    value = seal(keys, BACKEND_CREDENTIAL, Purpose.BARRIER, SEALED, SystemRandom())
    assert store.put_sealed_value(value, only_if_absent=True)


def assert_resealed(store: Any, keys: RootKeys) -> None:
    """Every sealed value opens with the new set's keys (the rekey commit resealed them)."""
    values = store.all_sealed_values()
    assert BACKEND_CREDENTIAL in {v.name for v in values}
    for value in values:
        opened = open_value(keys, value)
        assert value.name != BACKEND_CREDENTIAL or bytes(opened) == SEALED


def test_full_rekey_with_hvac_replaces_the_set_and_the_hsm_pins(custody_any_db: Custody) -> None:
    custody = custody_any_db
    vault = custody.vault()
    old = custody.shares
    old_keys = custody.keys_of(old[:2])
    seal_a_value(custody.server.runtime.store, old_keys)
    ciphertext = encrypt(vault, b"constitution")
    started = vault.sys.start_rekey(secret_shares=5, secret_threshold=3, require_verification=True)
    assert (started["started"], started["t"], started["n"], started["required"]) == (True, 3, 5, 2)
    assert started["verification_required"] is True
    first = vault.sys.rekey(old[2], nonce=started["nonce"])
    assert (first["progress"], first["complete"]) == (1, False)
    issued = vault.sys.rekey(old[0], nonce=started["nonce"])
    assert issued["complete"] is True
    assert issued["members"] == ["0.0", "0.1", "0.2", "0.3", "0.4"]
    new = issued["keys"]
    assert len(new) == 5
    assert issued["keys_base64"] == new
    assert issued["verification_nonce"]

    # Not in force yet: the old PIN still opens the token, the old shares still unseal.
    pins = custody.pins()
    assert pins.opens(old_keys.pin_text(old_keys.hsm_user_pin))
    progress = vault.sys.read_rekey_verify_progress()
    assert (progress["nonce"], progress["t"], progress["progress"]) == (
        issued["verification_nonce"],
        3,
        0,
    )
    for share in new[2:4]:
        assert vault.sys.rekey_verify(share, issued["verification_nonce"])["complete"] is False
    done = vault.sys.rekey_verify(new[4], issued["verification_nonce"])
    assert done == {"nonce": issued["verification_nonce"], "complete": True}
    assert vault.sys.read_rekey_progress()["started"] is False

    descriptor = custody.descriptor()
    assert (descriptor.generation, descriptor.shares_needed, descriptor.share_count) == (1, 3, 5)
    new_keys = custody.keys_of(new[:3], descriptor)
    assert new_keys.audit_hmac_key == old_keys.audit_hmac_key
    assert not pins.opens(old_keys.pin_text(old_keys.hsm_user_pin))
    assert not pins.opens(old_keys.pin_text(old_keys.hsm_so_pin), security_officer=True)
    assert pins.opens(new_keys.pin_text(new_keys.hsm_user_pin))
    assert pins.opens(new_keys.pin_text(new_keys.hsm_so_pin), security_officer=True)
    assert decrypts(vault, ciphertext, b"constitution")  # the session outlived the PIN change
    assert_resealed(custody.server.runtime.store, new_keys)

    vault.sys.seal()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.submit_unseal_key(old[1])
    for share in new[1:4]:
        vault.sys.submit_unseal_key(share)
    assert not vault.sys.is_sealed()
    assert decrypts(vault, ciphertext, b"constitution")

    records = custody.server.runtime.store.audit_records(10_000)
    rekey_records = [r for r in records if r["operation"].startswith("sys.rekey")]
    issuing = next(r for r in rekey_records if r["details"].get("issued"))
    assert issuing["details"]["issued"]["members"] == issued["members"]
    committed = [r for r in rekey_records if r["details"].get("complete")]
    assert committed[-1]["details"]["new_set"] == {
        "identifier": descriptor.identifier,
        "generation": 1,
    }
    dump = json.dumps(records)
    for share in [*old, *new]:
        words = share.split()
        for start in range(len(words) - 2):
            assert " ".join(words[start : start + 3]) not in dump


def test_cancel_expiry_and_a_half_finished_rekey_leave_the_old_set(custody: Custody) -> None:
    vault = custody.vault()
    old = custody.shares
    before = custody.descriptor()
    started = vault.sys.start_rekey(secret_shares=3, secret_threshold=2, require_verification=True)
    vault.sys.rekey(old[0], nonce=started["nonce"])
    cancelled = vault.sys.cancel_rekey()
    assert cancelled.status_code == 204
    assert vault.sys.read_rekey_progress()["started"] is False

    started = vault.sys.start_rekey(secret_shares=3, secret_threshold=2, require_verification=True)
    issued = vault.sys.rekey_multi(old[1:], nonce=started["nonce"])
    vault.sys.rekey_verify(issued["keys"][0], issued["verification_nonce"])
    vault.sys.seal()  # half-finished: the attempt goes with the seal
    vault.sys.submit_unseal_keys(old[:2])
    assert not vault.sys.is_sealed()
    assert vault.sys.read_rekey_progress()["started"] is False
    assert custody.descriptor() == before
    assert custody.server.runtime.store.pending_rekey() is None
    with pytest.raises(hvac.exceptions.InvalidRequest, match="no rekey in progress"):
        vault.sys.rekey_verify(issued["keys"][1], issued["verification_nonce"])
    vault.sys.seal()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.submit_unseal_key(issued["keys"][0])


def test_nonce_order_and_permissions_are_enforced(custody: Custody) -> None:
    old = custody.shares
    call, world = custody.call, custody.world
    unauthenticated = call("PUT", "sys/rekey/init", secret_shares=3, secret_threshold=2)
    assert unauthenticated.status_code == 403
    operator = world.call(
        "POST",
        "ekms/principals/operator",
        custody.root,
        body={"roles": ["restore-operator"], "jwk": world.operator.jwk},
    )
    assert operator.status_code == 200
    refused = call(
        "PUT", "sys/rekey/init", world.login(world.operator), secret_shares=3, secret_threshold=2
    )
    assert refused.status_code == 403
    assert call("PUT", "sys/rekey/init", custody.root, secret_shares=2).status_code == 400
    bad = call(
        "PUT", "sys/rekey/init", custody.root, secret_shares=3, secret_threshold=2, pgp_keys=["x"]
    )
    assert bad.status_code == 400
    assert "pgp_keys" in bad.json()["errors"][0]

    with pytest.raises(hvac.exceptions.InvalidRequest, match="require_verification"):
        custody.vault().sys.start_rekey(secret_shares=3, secret_threshold=2)  # hvac's default
    officer = world.login(world.officer)
    started = call("PUT", "sys/rekey/init", officer, secret_shares=3, secret_threshold=2).json()
    again = call("PUT", "sys/rekey/init", officer, secret_shares=3, secret_threshold=2)
    assert again.status_code == 400
    assert "already in progress" in again.json()["errors"][0]
    assert call("PUT", "sys/rekey/verify", key=old[0], nonce=started["nonce"]).status_code == 400
    call("PUT", "sys/rekey/update", key=old[0], nonce=started["nonce"])
    wrong = call("PUT", "sys/rekey/update", key=old[1], nonce="0" * 36)
    assert wrong.status_code == 400
    assert "nonce does not match" in wrong.json()["errors"][0]
    missing = call("PUT", "sys/rekey/update", key=old[1])
    assert missing.status_code == 400
    assert "nonce" in missing.json()["errors"][0]
    assert call("GET", "sys/rekey/init").json()["progress"] == 1
    bogus = call("PUT", "sys/rekey/update", key="not a share", nonce=started["nonce"])
    assert bogus.status_code == 400
    assert call("GET", "sys/rekey/init").json()["progress"] == 1
    issued = call("PUT", "sys/rekey/update", key=old[1], nonce=started["nonce"]).json()
    assert issued["complete"] is True
    late = call("PUT", "sys/rekey/update", key=old[2], nonce=started["nonce"])
    assert late.status_code == 400
    assert "already has its quorum" in late.json()["errors"][0]
    wrong_verify = call("PUT", "sys/rekey/verify", key=issued["keys"][0], nonce=started["nonce"])
    assert wrong_verify.status_code == 400
    assert call("DELETE", "sys/rekey/verify").status_code == 403
    reset = call("DELETE", "sys/rekey/verify", officer)
    assert reset.status_code == 200
    assert reset.json()["nonce"] not in ("", issued["verification_nonce"])
    assert call("DELETE", "sys/rekey/init").status_code == 403
    assert call("DELETE", "sys/rekey/init", officer).status_code == 204

    custody.vault().sys.seal()
    sealed = call("PUT", "sys/rekey/init", officer, secret_shares=3, secret_threshold=2)
    assert sealed.status_code == 503


def test_groups_two_of_three_and_two_of_three(custody: Custody) -> None:
    old, call = custody.shares, custody.call
    started = call(
        "PUT", "sys/rekey/init", custody.root, groups=[[2, 3], [2, 3]], group_threshold=2
    ).json()
    assert (started["t"], started["n"], started["groups"]) == (4, 6, [[2, 3], [2, 3]])
    call("PUT", "sys/rekey/update", key=old[0], nonce=started["nonce"])
    issued = call("PUT", "sys/rekey/update", key=old[2], nonce=started["nonce"]).json()
    assert issued["members"] == ["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"]
    new, nonce = issued["keys"], issued["verification_nonce"]
    for share in new[:3]:  # one whole group is not enough
        assert call("PUT", "sys/rekey/verify", key=share, nonce=nonce).json()["complete"] is False
    call("PUT", "sys/rekey/verify", key=new[4], nonce=nonce)
    assert call("PUT", "sys/rekey/verify", key=new[5], nonce=nonce).json()["complete"] is True
    custody.vault().sys.seal()
    vault = custody.vault()
    for share in (new[0], new[1], new[2], new[3]):
        vault.sys.submit_unseal_key(share)
    status = vault.sys.read_seal_status()
    assert (status["sealed"], status["t"], status["n"]) == (True, 4, 6)
    vault.sys.submit_unseal_key(new[5])
    assert not vault.sys.is_sealed()

    bad = call("PUT", "sys/rekey/init", custody.root, groups=[[2, 3], [2, 3]])
    assert bad.status_code == 400
    assert "group_threshold is required" in bad.json()["errors"][0]
    mixed = call(
        "PUT", "sys/rekey/init", custody.root, groups=[[2, 3]], secret_shares=3, secret_threshold=2
    )
    assert mixed.status_code == 400


def test_new_shares_encrypted_to_holders_open_with_their_keys_only(custody: Custody) -> None:
    old, call, world = custody.shares, custody.call, custody.world
    ec_officials = world.officials[:2]
    ed_official = world.officials[2]
    refused = call(
        "PUT",
        "sys/rekey/init",
        custody.root,
        secret_shares=3,
        secret_threshold=2,
        holders=[o.id for o in world.officials],
    )
    assert refused.status_code == 400
    assert "Ed25519" in refused.json()["errors"][0]
    assert ed_official.id in refused.json()["errors"][0]
    not_official = call(
        "PUT",
        "sys/rekey/init",
        custody.root,
        secret_shares=2,
        secret_threshold=2,
        holders=["officer", "official-0"],
    )
    assert "not an active official" in not_official.json()["errors"][0]
    started = call(
        "PUT",
        "sys/rekey/init",
        custody.root,
        secret_shares=2,
        secret_threshold=2,
        holders=[o.id for o in ec_officials],
    ).json()
    assert started["holders"] == ["official-0", "official-1"]
    call("PUT", "sys/rekey/update", key=old[0], nonce=started["nonce"])
    issued = call("PUT", "sys/rekey/update", key=old[1], nonce=started["nonce"]).json()
    assert issued["encrypted"] is True
    shares = []
    for official, token in zip(ec_officials, issued["keys"], strict=True):
        assert jwe.header_of(token)["kid"] == parse_public_jwk(official.jwk).thumbprint
        shares.append(jwe.decrypt(official.key, token).decode())  # type: ignore[arg-type]
    with pytest.raises(Exception, match="another holder"):
        jwe.decrypt(ec_officials[1].key, issued["keys"][0])  # type: ignore[arg-type]
    for share in shares:
        call("PUT", "sys/rekey/verify", key=share, nonce=issued["verification_nonce"])
    descriptor = custody.descriptor()
    members = custody.server.runtime.store.share_members(keyring.set_name(descriptor))
    assert [(m.member, m.holder) for m in members] == [("0.0", "official-0"), ("0.1", "official-1")]
    records = json.dumps(custody.server.runtime.store.audit_records(10_000))
    for share in shares:
        assert share.split()[5] + " " + share.split()[6] + " " + share.split()[7] not in records


# --- crash points of the commit -----------------------------------------------------------


class _DyingPins:
    """Kills its process at a point of the commit (``os._exit``: no cleanup, like a crash)."""

    def __init__(self, real: TokenPins, point: str) -> None:
        self.real, self.point = real, point

    def change(self, *pins: str) -> None:
        if self.point == "before-pins":
            os._exit(17)
        self.real.change(*pins)
        os._exit(17)  # after (2), before (3)


def _crashing_commit(settings: Settings, old: list[str], point: str, out: Any) -> None:
    """In a child process: unseal, rekey to verification, and die inside the commit."""
    runtime = create_runtime(settings, module=find_module())
    custodian = local_seal_control(runtime)
    for share in old[:2]:
        custodian.submit(share)
    started = custodian.start_rekey(RekeyPlan.of(group_threshold=1, groups=[(2, 3)]))
    custodian.submit_rekey_share(old[0], started.nonce)
    issued = custodian.submit_rekey_share(old[1], started.nonce)
    out.send(list(issued.keys))
    custodian._pins = _DyingPins(runtime.pins, point)  # type: ignore[arg-type]
    custodian.submit_rekey_verification(issued.keys[0], issued.verification_nonce)
    custodian.submit_rekey_verification(issued.keys[1], issued.verification_nonce)
    out.send("survived")


@pytest.mark.parametrize("point", ["before-pins", "after-pins"])
def test_a_commit_killed_midway_is_finished_by_the_next_unseal(tmp_path: Path, point: str) -> None:
    """The process dies between (1) and (2), or between (2) and (3); the node ends on one set."""
    settings = make_settings(tmp_path)
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    result = runtime.initialise(2, 3)
    old = result.mnemonics
    old_keys = RootKeys.derive(recover_secret(old[:2]))
    seal_a_value(runtime.store, old_keys)
    runtime.close()
    pins = TokenPins(module=find_module(), token_label=settings.token_label)

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_crashing_commit, args=(settings, old, point, child))
    process.start()
    new = parent.recv()
    process.join(timeout=60)
    assert process.exitcode == 17
    assert not parent.poll()  # it died inside the commit

    runtime = create_runtime(settings, module=find_module())
    try:
        store = runtime.store
        pending = store.pending_rekey()
        assert pending is not None
        assert store.get_share_set() is not None
        assert store.get_share_set().generation == 0  # type: ignore[union-attr]
        assert pins.opens(old_keys.pin_text(old_keys.hsm_user_pin)) == (point == "before-pins")
        custodian = local_seal_control(runtime)
        with pytest.raises(Exception, match="another share set"):
            custodian.submit(new[0])  # the new set is not in force until the commit ends
        custodian.submit(old[1])
        custodian.submit(old[2])
        assert not custodian.status().sealed
        descriptor = store.get_share_set()
        assert descriptor is not None
        assert descriptor.generation == 1
        assert store.pending_rekey() is None
        new_keys = keyring.unlock(descriptor, recover_secret(new[:2]))
        assert_resealed(store, new_keys)  # rolled forward with the descriptor
        assert not pins.opens(old_keys.pin_text(old_keys.hsm_user_pin))
        assert pins.opens(new_keys.pin_text(new_keys.hsm_user_pin))
        assert pins.opens(new_keys.pin_text(new_keys.hsm_so_pin), security_officer=True)
        custodian.seal()
        with pytest.raises(Exception, match="another share set"):
            custodian.submit(old[0])
        custodian.submit(new[2])
        custodian.submit(new[0])
        assert not custodian.status().sealed
    finally:
        runtime.close()
