"""Rekey: a quorum of current shares makes a new share set, which takes effect once verified.

One attempt (``Rekey``) goes through three phases, each bounded in time like generate-root:

1. *authorising*: current shares are collected, each with the attempt's nonce (a share sent
   with another nonce is refused and changes nothing, so nobody can slip their own attempt in
   midway: hashicorp/vault#844);
2. *verifying*: the quorum reconstructed the current secret; a new secret was made and split
   (optionally in SLIP-39 groups, optionally each share encrypted to its holder's key), and the
   new shares were returned once. They are **not in force**: the old set still unseals. Holders
   submit new shares with the verification nonce until the new set's quorum reconstructs the
   new secret (hashicorp/vault#8278);
3. *committing*: the new set replaces the old one in three steps that survive a crash at any
   point (``commit``, ``roll_forward``; docs/adr/0010-rekey-and-keyring.md):
   (1) a pending-commit row holds the new descriptor, the member commitments, the new working
   keys sealed under the *old* keys, and every sealed value resealed from the old keys to the
   new (ADR 0012 §2); (2) the HSM PINs are set to the new values (user, then SO); (3) one
   transaction swaps the descriptor and the resealed values in and deletes the row. An unseal
   with the old set finishes a commit that (1) began.

Cancelling or letting an attempt expire before (1) leaves nothing behind: the new shares, never
stored, are worthless. Pure: the store, the PIN changer, the clock and randomness are ports.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from kms import jwe, keyring
from kms.custody import ShareCollector, ShareSetDescriptor, split_groups, validate_groups
from kms.derivation import ROOT_SECRET_BYTES, wipe
from kms.errors import ConflictError, InvalidRequestError, StorageError
from kms.jose import parse_public_jwk
from kms.sealed_values import Purpose, SealedValue, reseal
from kms.share_check import commitments

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from kms.custody import UnsealProgress
    from kms.derivation import RootKeys
    from kms.keyring import SetName
    from kms.ports import Clock, RandomSource


class Phase(StrEnum):
    AUTHORISING = "authorising"
    VERIFYING = "verifying"
    COMMITTING = "committing"


class PinChanger(Protocol):
    """Sets the HSM token's PINs (``hsm.pins.TokenPins``).

    Must be idempotent: a PIN that already has its new value is left as it is, so that a commit
    interrupted between the two PIN changes can be finished.
    """

    def change(self, old_user: str, new_user: str, old_so: str, new_so: str) -> None: ...


@dataclass(frozen=True)
class ShareMember:
    """One member of a share set as stored: its commitment and, if known, who holds it."""

    member: str
    commitment: bytes | None
    holder: str | None = None


_RESEAL_ATTEMPTS = 3


class SealedValuesChangedError(ConflictError):
    """Step (3) found a sealed value other than the one the commit resealed; nothing written."""


@dataclass(frozen=True, repr=False)
class Resealed:
    """One sealed value as the old keys sealed it, and as the new keys seal it.

    Step (3) swaps ``new`` in only where the store still holds ``old``, so a value written
    meanwhile (under the old keys) is never overwritten by a stale copy: it is resealed again.
    """

    old: SealedValue
    new: SealedValue

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.old.name,
            "purpose": self.old.purpose.value,
            "old": self.old.blob.hex(),
            "new": self.new.blob.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Resealed:
        name, purpose = str(data["name"]), Purpose(data["purpose"])
        return cls(
            SealedValue(name, purpose, bytes.fromhex(data["old"])),
            SealedValue(name, purpose, bytes.fromhex(data["new"])),
        )


def reseal_all(
    values: Iterable[SealedValue], old: RootKeys, new: RootKeys, random: RandomSource
) -> tuple[Resealed, ...]:
    current = list(values)
    return tuple(
        Resealed(before, after)
        for before, after in zip(current, reseal(current, old, new, random), strict=True)
    )


@dataclass(frozen=True, repr=False)
class PendingCommit:
    """The row written at step (1): enough for the old set to finish the commit alone.

    ``resealed`` holds no secret in the clear: each value is sealed under keys derived from
    the new working keys, which the row keeps sealed under the old ones.
    """

    source: SetName
    descriptor: ShareSetDescriptor
    sealed_keys: bytes
    members: tuple[ShareMember, ...]
    created_at: float
    resealed: tuple[Resealed, ...] = ()

    @property
    def target(self) -> SetName:
        return keyring.set_name(self.descriptor)

    def __repr__(self) -> str:
        return f"PendingCommit(source={self.source}, target={self.target})"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": list(self.source),
            "descriptor": self.descriptor.to_json(),
            "sealed_keys": self.sealed_keys.hex(),
            "created_at": self.created_at,
            "resealed": [value.to_json() for value in self.resealed],
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], members: Sequence[ShareMember] = ()
    ) -> PendingCommit:
        identifier, generation = data["source"]
        return cls(
            source=(int(identifier), int(generation)),
            descriptor=ShareSetDescriptor.from_json(data["descriptor"]),
            sealed_keys=bytes.fromhex(data["sealed_keys"]),
            members=tuple(members),
            created_at=float(data["created_at"]),
            resealed=tuple(Resealed.from_json(v) for v in data.get("resealed", ())),
        )


class RekeyStore(Protocol):
    """Durable rekey state (``storage.sql_store.SqlStore``)."""

    def pending_rekey(self) -> PendingCommit | None: ...

    def all_sealed_values(self) -> list[SealedValue]: ...

    def begin_rekey_commit(self, pending: PendingCommit) -> None:
        """Step (1): write the row and the new set's members; ``ConflictError`` if one exists."""
        ...

    def finish_rekey_commit(self, pending: PendingCommit) -> None:
        """Step (3): in one transaction, make ``pending.descriptor`` the set in force, put each
        of ``pending.resealed`` in place of its old value, and delete the row; a no-op if the
        row is already gone and the set already in force.

        ``SealedValuesChangedError`` (nothing written) unless the stored values are exactly
        the ``old`` ones of ``pending.resealed``.
        """
        ...


@dataclass(frozen=True)
class RekeyPlan:
    """The new set's shape and, optionally, one holder per new share (in member order)."""

    group_threshold: int
    groups: tuple[tuple[int, int], ...]
    holders: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (principal, JWK items)

    @classmethod
    def of(
        cls,
        *,
        group_threshold: int,
        groups: Sequence[tuple[int, int]],
        holders: Sequence[tuple[str, Mapping[str, str]]] = (),
        allow_single_share: bool = False,
    ) -> RekeyPlan:
        shape = tuple((int(t), int(n)) for t, n in groups)
        validate_groups(group_threshold, shape, allow_single_share=allow_single_share)
        count = sum(n for _, n in shape)
        if holders and len(holders) != count:
            raise InvalidRequestError(
                f"holders must name one principal per new share ({count}), in member order; "
                f"got {len(holders)}"
            )
        seen: set[str] = set()
        for principal, jwk in holders:
            if principal in seen:
                raise InvalidRequestError(
                    f"holder {principal!r} is named twice: each new share goes to another holder"
                )
            seen.add(principal)
            _holder_key(principal, jwk)
        return cls(
            group_threshold=group_threshold,
            groups=shape,
            holders=tuple((p, tuple(sorted(dict(j).items()))) for p, j in holders),
        )

    @property
    def share_count(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def shares_needed(self) -> int:
        return sum(sorted(t for t, _ in self.groups)[: self.group_threshold])


def _holder_key(principal: str, jwk: Mapping[str, str]) -> Any:
    key = parse_public_jwk(dict(jwk))
    if key.alg != "ES256":
        raise InvalidRequestError(
            f"holder {principal!r} registered an Ed25519 (EdDSA) key; a share can be encrypted "
            "only to an EC P-256 key (ECDH-ES). Register a P-256 key for them, or leave holders "
            "out and hand the shares over in the room"
        )
    return key


@dataclass(frozen=True, repr=False)
class RekeyStatus:
    """Vault's rekey and rekey-verify status, plus what the audit record may name.

    ``keys`` is set only in the answer that issued the new shares (mnemonics, or JWEs when the
    attempt has holders); never kept, never logged.
    """

    started: bool
    t: int = 0  # the new set's threshold (shares needed)
    n: int = 0  # the new set's share count
    required: int = 0  # current shares needed to authorise
    nonce: str = ""
    progress: int = 0
    phase: str = ""
    group_threshold: int = 1
    groups: tuple[tuple[int, int], ...] = ()
    holders: tuple[str, ...] = ()
    verification_nonce: str = ""
    verification_progress: int = 0
    complete: bool = False  # update: the new shares were issued; verify: the new set is in force
    keys: tuple[str, ...] = field(default=(), repr=False)
    members: tuple[str, ...] = ()
    member: str | None = None  # "group.member" of the share just accepted
    new_set: SetName | None = None

    def __repr__(self) -> str:
        return (
            f"RekeyStatus(started={self.started}, phase={self.phase!r}, progress="
            f"{self.progress}/{self.required}, verification_progress={self.verification_progress}"
            f"/{self.t}, complete={self.complete}, <redacted>)"
        )


class Rekey:
    """One rekey attempt, held by the node's custodian (``kms.seal.Custodian``)."""

    def __init__(
        self,
        *,
        descriptor: ShareSetDescriptor,
        plan: RekeyPlan,
        clock: Clock,
        random: RandomSource,
        timeout: float,
    ) -> None:
        self.plan = plan
        self.nonce = str(uuid.UUID(bytes=random.bytes(16), version=4))
        self.phase = Phase.AUTHORISING
        self.verification_nonce = ""
        self.new_descriptor: ShareSetDescriptor | None = None
        self._descriptor = descriptor
        self._clock = clock
        self._random = random
        self._timeout = timeout
        self._phase_started = clock.now()
        self._collector = ShareCollector(descriptor, clock, timeout, activity="rekey")
        self._verifier: ShareCollector | None = None
        self._old_keys: RootKeys | None = None
        self._new_keys: RootKeys | None = None
        self._members: tuple[ShareMember, ...] = ()
        self._pending: PendingCommit | None = None

    def __repr__(self) -> str:
        return f"Rekey(nonce={self.nonce!r}, phase={self.phase.value!r}, <redacted>)"

    @property
    def expired(self) -> bool:
        if self.phase is Phase.COMMITTING:
            return False  # the pending row decides now, not the clock
        return self._clock.now() - self._phase_started > self._timeout

    @property
    def required(self) -> int:
        return self._descriptor.shares_needed

    def status(self, *, member: str | None = None) -> RekeyStatus:
        verifying = self._verifier is not None and self.phase is Phase.VERIFYING
        authorising = self.phase is Phase.AUTHORISING
        return RekeyStatus(
            started=True,
            t=self.plan.shares_needed,
            n=self.plan.share_count,
            required=self.required,
            nonce=self.nonce,
            progress=self._collector.progress if authorising else self.required,
            phase=self.phase.value,
            group_threshold=self.plan.group_threshold,
            groups=self.plan.groups,
            holders=tuple(p for p, _ in self.plan.holders),
            verification_nonce=self.verification_nonce,
            verification_progress=self._verifier.progress if verifying and self._verifier else 0,
            members=tuple(m.member for m in self._members),
            member=member,
            new_set=None if self.new_descriptor is None else keyring.set_name(self.new_descriptor),
        )

    # --- phase 1 ---------------------------------------------------------------------------

    def submit(self, mnemonic: str, nonce: str) -> UnsealProgress:
        """A current share; on the last one the result carries the secret (pass it to issue)."""
        _check_nonce(nonce, self.nonce, "the rekey in progress", "GET sys/rekey/init")
        if self.phase is not Phase.AUTHORISING:
            raise ConflictError(
                "the rekey already has its quorum of current shares; the new shares await "
                "verification: submit them to PUT sys/rekey/verify with the verification nonce"
            )
        return self._collector.submit(mnemonic)

    def issue(self, secret: bytearray, *, now: float) -> RekeyStatus:
        """Make the new set from the verified current secret; returns the new shares once.

        The caller wipes ``secret``. Nothing is stored: until verification ends, the new set
        exists only in this object and in the answer.
        """
        old = keyring.unlock(self._descriptor, secret)
        new_secret = bytearray(self._random.bytes(ROOT_SECRET_BYTES))
        new_keys = keyring.rotated(old, self._random)
        try:
            mnemonics, descriptor = split_groups(
                new_secret,
                self.plan.group_threshold,
                self.plan.groups,
                now=now,
                generation=self._descriptor.generation + 1,
                random=self._random,
                avoid_identifier=self._descriptor.identifier,
            )
            sealed = keyring.seal_keyring(
                new_secret, keyring.set_name(descriptor), new_keys, self._random
            )
        except BaseException:
            old.wipe()
            new_keys.wipe()
            raise
        finally:
            wipe(new_secret)
        self.new_descriptor = replace(descriptor, keyring=sealed)
        self._old_keys, self._new_keys = old, new_keys
        found = commitments(mnemonics)
        holders: list[str | None] = [p for p, _ in self.plan.holders] or [None] * len(mnemonics)
        self._members = tuple(
            ShareMember(member, found[member], holder)
            for member, holder in zip(self.new_descriptor.members, holders, strict=True)
        )
        keys = tuple(self._hand_out(mnemonics))
        self._start_verification()
        return replace(self.status(), complete=True, keys=keys)

    def _hand_out(self, mnemonics: list[str]) -> list[str]:
        if not self.plan.holders:
            return mnemonics
        return [
            jwe.encrypt(_holder_key(principal, dict(items)), mnemonic.encode(), self._random)
            for (principal, items), mnemonic in zip(self.plan.holders, mnemonics, strict=True)
        ]

    # --- phase 2 ---------------------------------------------------------------------------

    def _start_verification(self) -> None:
        assert self.new_descriptor is not None
        self.phase = Phase.VERIFYING
        self._phase_started = self._clock.now()
        self._verifier = ShareCollector(
            self.new_descriptor, self._clock, self._timeout, activity="rekey verification"
        )
        self.verification_nonce = str(uuid.UUID(bytes=self._random.bytes(16), version=4))

    def reset_verification(self) -> None:
        """Vault's ``DELETE sys/rekey/verify``: drop the new shares given so far, new nonce."""
        if self.phase is not Phase.VERIFYING:
            raise ConflictError("no rekey awaits verification")
        self._start_verification()

    def verify(self, mnemonic: str, nonce: str) -> UnsealProgress:
        """A new share; once the new set's quorum is in, the result carries the new secret."""
        if self.phase is Phase.AUTHORISING:
            raise ConflictError(
                "no new shares to verify yet: the rekey still needs current shares "
                "(PUT sys/rekey/update)"
            )
        if self.phase is Phase.COMMITTING:
            raise ConflictError("the new share set is already verified; its commit is under way")
        _check_nonce(
            nonce, self.verification_nonce, "the rekey verification", "GET sys/rekey/verify"
        )
        assert self._verifier is not None
        progress = self._verifier.submit(mnemonic)
        if progress.secret is not None:
            self.phase = Phase.COMMITTING
        return progress

    # --- phase 3 ---------------------------------------------------------------------------

    def pending_commit(self, *, now: float, sealed: Sequence[SealedValue] = ()) -> PendingCommit:
        """The row of step (1); made once, so that a retried commit finishes the same one.

        ``sealed``: the values stored now, resealed into the row (read only on the first call).
        """
        if self._pending is None:
            assert self.new_descriptor is not None
            assert self._old_keys is not None
            assert self._new_keys is not None
            source = keyring.set_name(self._descriptor)
            target = keyring.set_name(self.new_descriptor)
            self._pending = PendingCommit(
                source=source,
                descriptor=self.new_descriptor,
                sealed_keys=keyring.seal_for_commit(
                    self._old_keys, self._new_keys, source, target, self._random
                ),
                members=self._members,
                created_at=now,
                resealed=reseal_all(sealed, self._old_keys, self._new_keys, self._random),
            )
        return self._pending

    @property
    def old_keys(self) -> RootKeys:
        assert self._old_keys is not None
        return self._old_keys

    @property
    def new_keys(self) -> RootKeys:
        assert self._new_keys is not None
        return self._new_keys

    def wipe(self) -> None:
        self._collector.reset()
        if self._verifier is not None:
            self._verifier.reset()
        for keys in (self._old_keys, self._new_keys):
            if keys is not None:
                keys.wipe()


def _check_nonce(given: str, expected: str, what: str, where: str) -> None:
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise InvalidRequestError(
            f"nonce does not match {what}: read it with {where}. Nothing was counted"
        )


def commit(
    store: RekeyStore,
    pins: PinChanger,
    pending: PendingCommit,
    old: RootKeys,
    new: RootKeys,
    *,
    random: RandomSource,
) -> None:
    """Steps (1) to (3). A failure after (1) leaves the row: the next unseal finishes it."""
    store.begin_rekey_commit(pending)
    finish(store, pins, pending, old, new, random=random)


def finish(
    store: RekeyStore,
    pins: PinChanger,
    pending: PendingCommit,
    old: RootKeys,
    new: RootKeys,
    *,
    random: RandomSource,
) -> None:
    """Steps (2) and (3); safe to repeat (the PIN changer and the swap are idempotent).

    A sealed value written after the row was made (under the old keys: no process holds the
    new ones before step 3) makes the swap refuse; the values are then resealed as they are
    now and the swap tried again.
    """
    pins.change(
        old.pin_text(old.hsm_user_pin),
        new.pin_text(new.hsm_user_pin),
        old.pin_text(old.hsm_so_pin),
        new.pin_text(new.hsm_so_pin),
    )
    for attempt in range(_RESEAL_ATTEMPTS):
        try:
            store.finish_rekey_commit(pending)
        except SealedValuesChangedError:
            if attempt == _RESEAL_ATTEMPTS - 1:
                raise
            current = reseal_all(store.all_sealed_values(), old, new, random)
            pending = replace(pending, resealed=current)
        else:
            return


def roll_forward(
    store: RekeyStore,
    pins: PinChanger,
    descriptor: ShareSetDescriptor,
    old: RootKeys,
    *,
    random: RandomSource,
) -> tuple[ShareSetDescriptor, RootKeys] | None:
    """At unseal with the set in force: finish a commit that a crash interrupted.

    Returns the new set and its keys (the caller opens with them and wipes ``old``), or None
    when no commit is pending.
    """
    pending = store.pending_rekey()
    if pending is None:
        return None
    if pending.source != keyring.set_name(descriptor):
        raise StorageError(
            f"a pending rekey commit names share set {pending.source}, but set "
            f"{keyring.set_name(descriptor)} is in force: the metadata store is inconsistent"
        )
    new = keyring.open_commit(old, pending.sealed_keys, pending.source, pending.target)
    try:
        finish(store, pins, pending, old, new, random=random)
    except BaseException:
        new.wipe()
        raise
    return pending.descriptor, new
