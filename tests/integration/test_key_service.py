"""KeyService against a real SoftHSM token, with SQLite and PostgreSQL registries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.runtime import Runtime, create_runtime, local_seal_control, prepare_hsm
from kms.errors import (
    ConflictError,
    InvalidCiphertextError,
    InvalidRequestError,
    NotFoundError,
    SealedError,
)
from kms.keys import Classification, KeyType, Residency, VersionState
from tests.conftest import make_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from kms.seal import InitResult


@pytest.fixture
def opened(tmp_path: Path, database_url: str) -> Iterator[tuple[Runtime, InitResult]]:
    s = make_settings(tmp_path, database_url=database_url, dev=True)
    rt = create_runtime(s, module=prepare_hsm(s))
    result = rt.initialise(2, 3)
    custodian = local_seal_control(rt)
    for share in result.mnemonics[:2]:
        custodian.submit(share)
    yield rt, result
    rt.close()


AES, SECRET, HSM = KeyType.AES256_GCM96, Classification.SECRET, Residency.HSM


def test_sealed_service_refuses_before_touching_the_hsm(runtime: Runtime) -> None:
    with pytest.raises(SealedError):
        runtime.keys.create_key("k", AES, SECRET)
    with pytest.raises(SealedError):
        runtime.keys.list_names()
    assert not runtime.backend.is_open


def test_envelope_round_trip_binds_key_version_and_context(
    opened: tuple[Runtime, InitResult],
) -> None:
    rt, _ = opened
    keys = rt.keys
    a = keys.create_key("a", AES, SECRET)
    b = keys.create_key("b", AES, SECRET)
    plaintext, ciphertext, version = keys.datakey(a, b"ctx")
    assert version == 1
    assert ciphertext.startswith("ekms:v1:")
    assert keys.decrypt(a, ciphertext, b"ctx")[0] == bytes(plaintext)
    with pytest.raises(InvalidCiphertextError):
        keys.decrypt(a, ciphertext, b"other")
    with pytest.raises(InvalidCiphertextError):
        keys.decrypt(keys.policy("b"), ciphertext, b"ctx")
    del b
    forged = ciphertext[:-4] + ("AAAA" if not ciphertext.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidCiphertextError):
        keys.decrypt(a, forged, b"ctx")
    with pytest.raises(InvalidCiphertextError):
        keys.decrypt(a, ciphertext.replace("ekms:v1:", "ekms:v2:"), b"ctx")


def test_rotation_and_min_decryption_version(opened: tuple[Runtime, InitResult]) -> None:
    rt, _ = opened
    keys = rt.keys
    policy = keys.create_key("r", AES, SECRET)
    old, _ = keys.encrypt(policy, b"law text", b"")
    policy = keys.rotate("r")
    assert policy.latest_version == 2
    new, version = keys.encrypt(policy, b"law text", b"")
    assert version == 2
    assert keys.decrypt(policy, old, b"")[0] == b"law text"
    rewrapped, version = keys.rewrap(policy, old, b"")
    assert version == 2
    policy = keys.configure("r", min_decryption_version=2)
    with pytest.raises(InvalidRequestError, match="min_decryption_version"):
        keys.decrypt(policy, old, b"")
    assert keys.decrypt(policy, rewrapped, b"")[0] == b"law text"
    assert keys.decrypt(policy, new, b"")[0] == b"law text"
    with pytest.raises(InvalidRequestError):
        keys.configure("r", min_decryption_version=3)


def test_deletion_needs_explicit_permission(opened: tuple[Runtime, InitResult]) -> None:
    rt, _ = opened
    keys = rt.keys
    policy = keys.create_key("d", AES, SECRET)
    handle = policy.versions[1].handle
    with pytest.raises(InvalidRequestError, match="deletion is not allowed"):
        keys.delete("d")
    keys.configure("d", deletion_allowed=True)
    keys.delete("d")
    with pytest.raises(NotFoundError):
        keys.policy("d")
    assert handle not in rt.backend.handles()


def test_duplicate_name_conflicts(opened: tuple[Runtime, InitResult]) -> None:
    rt, _ = opened
    rt.keys.create_key("dup", AES, SECRET)
    with pytest.raises(ConflictError):
        rt.keys.create_key("dup", AES, SECRET)


def test_memory_residency_round_trip_and_seal_forgets(opened: tuple[Runtime, InitResult]) -> None:
    rt, result = opened
    keys = rt.keys
    with pytest.raises(InvalidRequestError):
        keys.create_key("m", AES, Classification.SECRET, Residency.MEMORY)
    policy = keys.create_key("m", AES, Classification.INTERNAL, Residency.MEMORY)
    assert policy.versions[1].wrapped_working_key is not None
    ciphertext, _ = keys.encrypt(policy, b"x" * 32, b"c")
    assert keys.decrypt(policy, ciphertext, b"c")[0] == b"x" * 32
    assert keys._working_keys
    rt.barrier.close()
    assert not keys._working_keys
    with pytest.raises(SealedError):
        keys.decrypt(policy, ciphertext, b"c")
    custodian = local_seal_control(rt)
    for share in result.mnemonics[1:]:
        custodian.submit(share)
    assert keys.decrypt(policy, ciphertext, b"c")[0] == b"x" * 32


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ED25519])
def test_sign_and_verify(opened: tuple[Runtime, InitResult], key_type: KeyType) -> None:
    rt, _ = opened
    keys = rt.keys
    policy = keys.create_key(f"s-{key_type.value}", key_type, Classification.PUBLIC)
    signature, version = keys.sign(policy, b"State Gazette 2026/41")
    assert version == 1
    assert keys.verify(policy, b"State Gazette 2026/41", signature)
    assert not keys.verify(policy, b"State Gazette 2026/42", signature)
    with pytest.raises(InvalidRequestError):
        keys.encrypt(policy, b"x", b"")


def test_crash_between_hsm_and_registry_is_reconciled(opened: tuple[Runtime, InitResult]) -> None:
    rt, _ = opened
    keys = rt.keys
    policy = keys.create_key("c", AES, SECRET)
    # A rotation that crashed after the HSM object was made but before activation:
    version = keys._new_version(2, 0.0)
    rt.store.insert_pending_version("c", version)
    rt.backend.generate(AES, version.handle, "ekms/c/v2")
    # A deletion that crashed after marking, before destroying:
    doomed = keys.create_key("gone", AES, SECRET)
    rt.store.mark_deleting("gone")
    # An object no row names (a registry restored from an older backup): reported, kept.
    rt.backend.generate(AES, b"\x01" * 16, "ekms/ghost/v1")
    assert keys.policy("c").versions[2].state is VersionState.PENDING
    report = keys.reconcile()
    assert report.discarded == ["c/v2"]
    assert report.deleted == ["gone/v1"]
    assert report.unknown_objects == 1
    held = rt.backend.handles()
    assert version.handle not in held
    assert doomed.versions[1].handle not in held
    assert b"\x01" * 16 in held
    assert policy.versions[1].handle in held
    assert set(keys.policy("c").versions) == {1}
    with pytest.raises(NotFoundError):
        keys.policy("gone")
    assert keys.rotate("c").latest_version == 2


def test_creation_failure_in_the_hsm_leaves_no_row(opened: tuple[Runtime, InitResult]) -> None:
    rt, _ = opened
    rt.backend.close()  # the HSM refuses: session gone
    with pytest.raises(Exception, match="HSM"):
        rt.keys.create_key("half", AES, SECRET)
    assert rt.store.get_policy("half") is None
    assert "half" not in rt.store.list_names()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plaintext=st.binary(max_size=2048), context=st.binary(max_size=64))
def test_wrap_unwrap_round_trip(
    opened: tuple[Runtime, InitResult], plaintext: bytes, context: bytes
) -> None:
    rt, _ = opened
    keys = rt.keys
    try:
        policy = keys.policy("prop")
    except NotFoundError:
        policy = keys.create_key("prop", AES, SECRET)
    ciphertext, _ = keys.encrypt(policy, plaintext, context)
    assert keys.decrypt(policy, ciphertext, context)[0] == plaintext
