"""Rekey in the custodian, with in-memory fakes for the store and the HSM's PINs.

The HSM and the database are real in tests/integration/test_rekey_api.py; here each crash point
of the commit is reached exactly, and the keyring's cryptography is checked directly.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from api.principal_keys import KeyHolder
from kms import jwe, keyring
from kms.custody import ShareSetDescriptor, split_groups, split_secret
from kms.derivation import RootKeys
from kms.errors import (
    BackendError,
    ConflictError,
    InvalidRequestError,
    InvalidShareError,
    SealedError,
    StorageError,
)
from kms.rekey import PendingCommit, RekeyPlan, SealedValuesChangedError
from kms.seal import Custodian
from kms.sealed_values import BACKEND_CREDENTIAL, Purpose, SealedValue, open_value, seal

if TYPE_CHECKING:
    from collections.abc import Sequence

SECRET = bytes(range(32))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


class Urandom:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class Crash(Exception):  # noqa: N818 - stands for the process dying
    """The process died here (the test then builds a new custodian, as a restart would)."""


class FakeStore:
    """CustodyStore, TokenStore and RekeyStore in memory; ``crash_at`` simulates a death."""

    def __init__(self, descriptor: ShareSetDescriptor) -> None:
        self.descriptor = descriptor
        self.pending: PendingCommit | None = None
        self.members: dict[tuple[int, int], list[object]] = {}
        self.tokens: dict[str, tuple[bytes, list[str]]] = {}
        self.sealed: dict[str, SealedValue] = {}
        self.crash_at: str | None = None

    def get_share_set(self) -> ShareSetDescriptor | None:
        return self.descriptor

    def insert_token(
        self, token_id: str, token_hash: bytes, policies: Sequence[str], created_at: float
    ) -> None:
        assert created_at > 0
        self.tokens[token_id] = (token_hash, list(policies))

    def find_token(self, token_hash: bytes) -> tuple[str, Sequence[str]] | None:
        found = [(i, p) for i, (h, p) in self.tokens.items() if h == token_hash]
        return found[0] if found else None

    def pending_rekey(self) -> PendingCommit | None:
        return self.pending

    def begin_rekey_commit(self, pending: PendingCommit) -> None:
        if self.pending is not None:
            raise ConflictError("a rekey commit is pending")
        self.pending = pending
        self.members[pending.target] = list(pending.members)

    def all_sealed_values(self) -> list[SealedValue]:
        return list(self.sealed.values())

    def finish_rekey_commit(self, pending: PendingCommit) -> None:
        if self.crash_at == "swap":
            raise Crash
        if self.pending is None:
            assert self.descriptor == pending.descriptor
            return
        if {n: v.blob for n, v in self.sealed.items()} != {
            r.old.name: r.old.blob for r in pending.resealed
        }:
            raise SealedValuesChangedError("changed")
        self.sealed = {r.new.name: r.new for r in pending.resealed}
        self.descriptor, self.pending = pending.descriptor, None


class FakeToken:
    """The HSM token's two PINs; ``change`` is idempotent like hsm.pins.TokenPins."""

    def __init__(self, keys: RootKeys) -> None:
        self.user = keys.pin_text(keys.hsm_user_pin)
        self.so = keys.pin_text(keys.hsm_so_pin)
        self.crash_at: str | None = None
        self.calls = 0

    def change(self, old_user: str, new_user: str, old_so: str, new_so: str) -> None:
        self.calls += 1
        if self.crash_at == "before-pins":
            raise Crash
        for attr, old, new in (("user", old_user, new_user), ("so", old_so, new_so)):
            if getattr(self, attr) == old:
                setattr(self, attr, new)
            elif getattr(self, attr) != new:
                raise BackendError(f"neither PIN opens the token ({attr})")
            if self.crash_at == "between-pins":
                raise Crash

    def opens(self, keys: RootKeys) -> bool:
        return self.user == keys.pin_text(keys.hsm_user_pin)


class Node:
    """A custodian over the fakes; ``restart`` makes a new one over the same store and token."""

    def __init__(self, store: FakeStore, token: FakeToken, clock: FakeClock | None = None) -> None:
        self.store, self.token = store, token
        self.clock = clock or FakeClock()
        self.opened: list[RootKeys] = []
        self.swapped: list[RootKeys] = []
        self.custodian = Custodian(
            store=store,  # type: ignore[arg-type]
            clock=self.clock,
            opener=self._open,
            closer=lambda: None,
            tokens=store,
            random=Urandom(),
            timeout=600,
            rekeys=store,
            pins=token,
            rekeyed=self.swapped.append,
        )

    def _open(self, keys: RootKeys) -> None:
        if not self.token.opens(keys):
            raise BackendError("HSM refused the PIN")
        self.opened.append(keys)

    def restart(self) -> Node:
        return Node(self.store, self.token, self.clock)

    def unseal(self, shares: Sequence[str]) -> None:
        for share in shares:
            self.custodian.submit(share)
        assert not self.custodian.status().sealed

    @property
    def keys(self) -> RootKeys:
        return self.swapped[-1] if self.swapped else self.opened[-1]


@pytest.fixture
def old_set() -> tuple[list[str], ShareSetDescriptor]:
    return split_secret(SECRET, 2, 3, now=0.0)


@pytest.fixture
def node(old_set: tuple[list[str], ShareSetDescriptor]) -> Node:
    mnemonics, descriptor = old_set
    running = Node(FakeStore(descriptor), FakeToken(RootKeys.derive(SECRET)))
    running.unseal(mnemonics[:2])
    return running


def plan(threshold: int = 2, shares: int = 3, **kw: object) -> RekeyPlan:
    return RekeyPlan.of(group_threshold=1, groups=[(threshold, shares)], **kw)  # type: ignore[arg-type]


CREDENTIAL = b'{"token":"s.transit-credential"}'


def store_credential(node: Node, keys: RootKeys, value: bytes = CREDENTIAL) -> None:
    sealed = seal(keys, BACKEND_CREDENTIAL, Purpose.BARRIER, value, Urandom())
    node.store.sealed[BACKEND_CREDENTIAL] = sealed


def credential(node: Node, keys: RootKeys) -> bytes:
    return bytes(open_value(keys, node.store.sealed[BACKEND_CREDENTIAL]))


def rekey_to_verification(node: Node, old: list[str], new_plan: RekeyPlan) -> tuple[str, list[str]]:
    """Start and authorise a rekey; returns the verification nonce and the new shares."""
    started = node.custodian.start_rekey(new_plan)
    for share in old[: started.required - 1]:
        assert not node.custodian.submit_rekey_share(share, started.nonce).complete
    issued = node.custodian.submit_rekey_share(old[started.required - 1], started.nonce)
    assert issued.complete
    return issued.verification_nonce, list(issued.keys)


def test_full_rekey_replaces_the_set_and_keeps_the_audit_key(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, old_descriptor = old_set
    old_keys = RootKeys.from_bytes(node.keys.to_bytes())
    store_credential(node, old_keys)
    nonce, new = rekey_to_verification(node, old, plan(3, 5))
    assert len(new) == 5
    assert node.store.descriptor == old_descriptor  # not in force before verification
    first = node.custodian.submit_rekey_verification(new[4], nonce)
    assert (first.verification_progress, first.complete) == (1, False)
    node.custodian.submit_rekey_verification(new[0], nonce)
    done = node.custodian.submit_rekey_verification(new[2], nonce)
    assert done.complete
    committed = node.store.descriptor
    assert committed.generation == 1
    assert committed.identifier != old_descriptor.identifier
    assert committed.keyring is not None
    assert committed.groups == ((3, 5),)
    assert node.store.pending is None
    new_keys = node.swapped[-1]
    assert new_keys.audit_hmac_key == old_keys.audit_hmac_key
    for name in ("hsm_user_pin", "hsm_so_pin", "barrier_key", "domain_wrapping_key"):
        assert getattr(new_keys, name) != getattr(old_keys, name)
    assert node.token.opens(new_keys)
    assert not node.token.opens(old_keys)
    assert len(node.store.members[(committed.identifier, 1)]) == 5
    assert credential(node, new_keys) == CREDENTIAL
    with pytest.raises(StorageError, match="does not open"):
        credential(node, old_keys)

    restarted = node.restart()
    with pytest.raises(InvalidShareError, match="another share set"):
        restarted.custodian.submit(old[0])
    restarted.unseal(new[1:4])
    assert restarted.opened[-1].to_bytes() == new_keys.to_bytes()


def test_nonce_guards_every_step_and_a_wrong_one_changes_nothing(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    started = node.custodian.start_rekey(plan())
    node.custodian.submit_rekey_share(old[0], started.nonce)
    with pytest.raises(InvalidRequestError, match="nonce does not match"):
        node.custodian.submit_rekey_share(old[1], "0" * 36)
    assert node.custodian.rekey_status().progress == 1
    issued = node.custodian.submit_rekey_share(old[1], started.nonce)
    with pytest.raises(ConflictError, match="already has its quorum"):
        node.custodian.submit_rekey_share(old[2], started.nonce)
    with pytest.raises(InvalidRequestError, match="nonce does not match"):
        node.custodian.submit_rekey_verification(issued.keys[0], started.nonce)
    node.custodian.submit_rekey_verification(issued.keys[0], issued.verification_nonce)
    assert node.custodian.rekey_status().verification_progress == 1
    reset = node.custodian.reset_rekey_verification()
    assert reset.verification_nonce != issued.verification_nonce
    assert reset.verification_progress == 0
    with pytest.raises(InvalidRequestError, match="nonce does not match"):
        node.custodian.submit_rekey_verification(issued.keys[1], issued.verification_nonce)


def test_out_of_order_steps_are_refused(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    with pytest.raises(InvalidRequestError, match="no rekey in progress"):
        node.custodian.submit_rekey_share(old[0], "x")
    started = node.custodian.start_rekey(plan())
    with pytest.raises(ConflictError, match="already in progress"):
        node.custodian.start_rekey(plan())
    with pytest.raises(ConflictError, match="no new shares to verify yet"):
        node.custodian.submit_rekey_verification(old[0], started.nonce)
    with pytest.raises(InvalidShareError, match="another share set"):
        node.custodian.submit_rekey_share(split_secret(SECRET, 2, 3, now=0)[0][0], started.nonce)
    assert node.custodian.rekey_status().progress == 0


@pytest.mark.parametrize("how", ["cancel", "expire", "seal"])
def test_cancel_expiry_and_seal_leave_the_old_set_working(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor], how: str
) -> None:
    old, old_descriptor = old_set
    nonce, new = rekey_to_verification(node, old, plan())
    node.custodian.submit_rekey_verification(new[0], nonce)
    if how == "cancel":
        assert not node.custodian.cancel_rekey().started
    elif how == "expire":
        node.clock.t += 601
    else:
        node.custodian.seal()
        node.unseal(old[1:])
    assert not node.custodian.rekey_status().started
    with pytest.raises(InvalidRequestError, match="no rekey in progress"):
        node.custodian.submit_rekey_verification(new[1], nonce)
    assert node.store.descriptor == old_descriptor
    assert node.store.pending is None
    restarted = node.restart()
    restarted.unseal(old[:2])
    with pytest.raises(InvalidShareError, match="another share set"):
        node.restart().custodian.submit(new[0])


def test_rekey_needs_an_unsealed_node(old_set: tuple[list[str], ShareSetDescriptor]) -> None:
    _, descriptor = old_set
    sealed = Node(FakeStore(descriptor), FakeToken(RootKeys.derive(SECRET)))
    with pytest.raises(SealedError):
        sealed.custodian.start_rekey(plan())
    with pytest.raises(SealedError):
        sealed.custodian.rekey_status()


def test_groups_two_of_three_and_two_of_three(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    grouped = RekeyPlan.of(group_threshold=2, groups=[(2, 3), (2, 3)])
    assert (grouped.shares_needed, grouped.share_count) == (4, 6)
    nonce, new = rekey_to_verification(node, old, grouped)
    # Three shares of the first group are not a quorum: the second group must take part.
    for share in new[:3]:
        assert not node.custodian.submit_rekey_verification(share, nonce).complete
    node.custodian.submit_rekey_verification(new[3], nonce)
    assert node.custodian.submit_rekey_verification(new[5], nonce).complete
    assert node.store.descriptor.group_threshold == 2
    assert node.store.descriptor.shares_needed == 4
    restarted = node.restart()
    for share in (new[1], new[2], new[4]):
        restarted.custodian.submit(share)
    assert restarted.custodian.status().sealed
    restarted.custodian.submit(new[3])
    assert not restarted.custodian.status().sealed


@pytest.mark.parametrize(
    ("group_threshold", "groups", "message"),
    [
        (3, [(2, 3), (2, 3)], "group_threshold must be between 1 and the number of groups"),
        (1, [(1, 3), (2, 2)], "1 of 3 is not allowed"),
        (1, [(1, 1), (2, 2)], "a single share unseal"),
        (2, [(4, 3), (2, 3)], "member threshold must be between"),
        (2, [(2, 9), (2, 9)], "at most 16 shares"),
        (1, [(1, 1)], "only in development mode"),
        (1, [(3, 2)], "secret_threshold must be between 2 and secret_shares"),
    ],
)
def test_bad_group_shapes_are_refused(
    group_threshold: int, groups: list[tuple[int, int]], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        RekeyPlan.of(group_threshold=group_threshold, groups=groups)


def test_shares_encrypted_to_holders_open_only_with_their_keys(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    holders = [KeyHolder.generate(f"official-{n}") for n in range(3)]
    new_plan = plan(holders=[(h.principal, h.jwk) for h in holders])
    nonce, sealed = rekey_to_verification(node, old, new_plan)
    assert node.custodian.rekey_status().holders == tuple(h.principal for h in holders)
    shares = []
    for holder, token in zip(holders, sealed, strict=True):
        assert isinstance(holder.key, ec.EllipticCurvePrivateKey)
        assert token.count(".") == 4
        shares.append(jwe.decrypt(holder.key, token).decode())
        other = holders[(holders.index(holder) + 1) % 3].key
        assert isinstance(other, ec.EllipticCurvePrivateKey)
        with pytest.raises(InvalidRequestError, match="another holder"):
            jwe.decrypt(other, token)
    for share in shares[:2]:
        node.custodian.submit_rekey_verification(share, nonce)
    members = node.store.members[keyring.set_name(node.store.descriptor)]
    assert [(m.member, m.holder) for m in members] == [  # type: ignore[attr-defined]
        ("0.0", "official-0"),
        ("0.1", "official-1"),
        ("0.2", "official-2"),
    ]


def test_holders_must_be_p256_one_per_share_and_distinct() -> None:
    ed = KeyHolder("ed", ed25519.Ed25519PrivateKey.generate())
    ecs = [KeyHolder.generate(f"o{n}") for n in range(3)]
    with pytest.raises(InvalidRequestError, match="Ed25519"):
        plan(holders=[(ed.principal, ed.jwk), *((h.principal, h.jwk) for h in ecs[:2])])
    with pytest.raises(InvalidRequestError, match="one principal per new share"):
        plan(holders=[(h.principal, h.jwk) for h in ecs[:2]])
    with pytest.raises(InvalidRequestError, match="named twice"):
        plan(holders=[(ecs[0].principal, ecs[0].jwk)] * 3)


@pytest.mark.parametrize("crash_at", ["before-pins", "between-pins", "swap"])
def test_a_crash_in_the_commit_is_finished_by_the_old_set(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor], crash_at: str
) -> None:
    """(1) written, then death before (2), between the PINs, or between (2) and (3)."""
    old, old_descriptor = old_set
    old_keys = RootKeys.from_bytes(node.keys.to_bytes())
    store_credential(node, old_keys)
    nonce, new = rekey_to_verification(node, old, plan())
    if crash_at == "swap":
        node.store.crash_at = crash_at
    else:
        node.token.crash_at = crash_at
    node.custodian.submit_rekey_verification(new[0], nonce)
    with pytest.raises(Crash):
        node.custodian.submit_rekey_verification(new[1], nonce)
    assert node.store.pending is not None
    assert node.store.descriptor == old_descriptor
    assert credential(node, old_keys) == CREDENTIAL  # not swapped before (3)
    node.store.crash_at = node.token.crash_at = None

    restarted = node.restart()  # the process died: nothing of its memory is left
    with pytest.raises(InvalidShareError, match="another share set"):
        restarted.custodian.submit(new[0])
    restarted.unseal(old[1:])
    assert node.store.pending is None
    assert node.store.descriptor.generation == 1
    assert node.token.opens(restarted.opened[-1])
    assert credential(node, restarted.opened[-1]) == CREDENTIAL
    again = node.restart()
    with pytest.raises(InvalidShareError, match="another share set"):
        again.custodian.submit(old[0])
    again.unseal(new[1:])
    assert again.opened[-1].to_bytes() == restarted.opened[-1].to_bytes()


def test_a_failed_commit_is_retried_while_unsealed(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    nonce, new = rekey_to_verification(node, old, plan())
    real = node.token.change

    def flaky(*pins: str) -> None:
        raise BackendError("HSM unreachable")

    node.token.change = flaky  # type: ignore[method-assign]
    node.custodian.submit_rekey_verification(new[0], nonce)
    with pytest.raises(BackendError, match="commit was interrupted"):
        node.custodian.submit_rekey_verification(new[2], nonce)
    assert node.store.pending is not None
    node.token.change = real  # type: ignore[method-assign]
    assert node.custodian.rekey_status().complete
    assert node.store.pending is None
    assert node.store.descriptor.generation == 1


def test_a_value_sealed_during_the_commit_is_resealed_not_overwritten(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    """A rotation under the old keys between (1) and (3): the swap reseals what is there now."""
    old, _ = old_set
    old_keys = RootKeys.from_bytes(node.keys.to_bytes())
    store_credential(node, old_keys)
    nonce, new = rekey_to_verification(node, old, plan())
    rotate = node.token.change

    def rotating(*pins: str) -> None:
        rotate(*pins)
        store_credential(node, old_keys, b'{"token":"s.rotated"}')

    node.token.change = rotating  # type: ignore[method-assign]
    node.custodian.submit_rekey_verification(new[0], nonce)
    assert node.custodian.submit_rekey_verification(new[1], nonce).complete
    assert credential(node, node.swapped[-1]) == b'{"token":"s.rotated"}'


def test_a_pending_commit_blocks_a_new_rekey(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    old, _ = old_set
    node.store.pending = PendingCommit(
        source=keyring.set_name(node.store.descriptor),
        descriptor=replace(node.store.descriptor, generation=1),
        sealed_keys=b"",
        members=(),
        created_at=0.0,
    )
    with pytest.raises(ConflictError, match="commit is pending"):
        node.custodian.start_rekey(plan())
    node.custodian.seal()
    with pytest.raises(BackendError, match="finishing an interrupted rekey failed"):
        node.unseal(old[:2])


def test_keyring_is_bound_to_its_set() -> None:
    keys = RootKeys.derive(SECRET)
    sealed = keyring.seal_keyring(SECRET, (7, 1), keys, Urandom())
    _, descriptor = split_groups(SECRET, 1, [(2, 3)], now=0.0, generation=1)
    bound = replace(descriptor, identifier=7, keyring=sealed)
    assert keyring.unlock(bound, SECRET).to_bytes() == keys.to_bytes()
    for other in (replace(bound, generation=2), replace(bound, identifier=8)):
        with pytest.raises(StorageError, match="damaged or was altered"):
            keyring.unlock(other, SECRET)
    with pytest.raises(StorageError):
        keyring.unlock(bound, bytes(32))
    assert "keyring" not in repr(bound)
    assert ShareSetDescriptor.from_json(bound.to_json()) == bound
    generation_zero = replace(bound, keyring=None, generation=0)
    assert keyring.unlock(generation_zero, SECRET).to_bytes() == keys.to_bytes()
    assert "generation" not in generation_zero.to_json()  # existing rows stay as they were


def test_commit_blob_opens_only_with_the_old_keys() -> None:
    old, new = RootKeys.derive(SECRET), RootKeys.derive(bytes(32))
    sealed = keyring.seal_for_commit(old, new, (1, 0), (2, 1), Urandom())
    assert keyring.open_commit(old, sealed, (1, 0), (2, 1)).to_bytes() == new.to_bytes()
    with pytest.raises(StorageError):
        keyring.open_commit(new, sealed, (1, 0), (2, 1))
    with pytest.raises(StorageError):
        keyring.open_commit(old, sealed, (1, 0), (3, 1))


def test_old_shares_count_for_nothing_once_the_new_set_is_in_force(
    node: Node, old_set: tuple[list[str], ShareSetDescriptor]
) -> None:
    """A generate-root begun with old shares, here or on another node, dies with the old set."""
    old, _ = old_set
    other = node.restart()  # a second node on the same store
    other.unseal(old[1:])
    here = node.custodian.start_root_generation(None)
    node.custodian.submit_root_share(old[0], here.nonce)
    there = other.custodian.start_root_generation(None)
    other.custodian.submit_root_share(old[0], there.nonce)
    nonce, new = rekey_to_verification(node, old, plan())
    node.custodian.submit_rekey_verification(new[0], nonce)
    node.custodian.submit_rekey_verification(new[1], nonce)
    with pytest.raises(InvalidRequestError, match="no root generation in progress"):
        node.custodian.submit_root_share(old[1], here.nonce)
    with pytest.raises(InvalidRequestError, match="no root generation in progress"):
        other.custodian.submit_root_share(old[1], there.nonce)
    fresh = other.custodian.start_root_generation(None)
    with pytest.raises(InvalidShareError, match="another share set"):
        other.custodian.submit_root_share(old[1], fresh.nonce)
    other.custodian.submit_root_share(new[2], fresh.nonce)
    assert other.custodian.submit_root_share(new[0], fresh.nonce).complete
