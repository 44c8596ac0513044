"""Split custody of the root secret with SLIP-39 shares, and collection of shares at unseal.

Pure logic: time comes from an injected clock, randomness from an injected source. Nothing here
touches the HSM or the disk; the caller decides what happens once a quorum is reached.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shamir_mnemonic import MnemonicError, Share
from shamir_mnemonic.recovery import RecoveryState
from shamir_mnemonic.shamir import EncryptedMasterSecret, split_ems
from shamir_mnemonic.wordlist import WORD_INDEX_MAP

from kms.derivation import ROOT_SECRET_BYTES, root_verifier
from kms.errors import InvalidRequestError, InvalidShareError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kms.ports import Clock, RandomSource

MAX_SHARES = 16
MAX_GROUPS = 16
ITERATION_EXPONENT = 1
_VALID_WORD_COUNTS = (20, 33)  # 128-bit and 256-bit secrets
_IDENTIFIER_BITS = 15


@dataclass(frozen=True)
class ShareSetDescriptor:
    """What the service remembers about its share set: public parameters plus a verifier.

    Nothing here helps reconstruct the secret; it lets unseal reject a foreign share at once and
    recognise the right secret once a quorum is reached.
    """

    identifier: int
    extendable: bool
    iteration_exponent: int
    group_threshold: int
    groups: tuple[tuple[int, int], ...]  # (member threshold, member count) per group
    verifier: bytes
    created_at: float
    # 0 for the set made at init; each rekey adds one. With the identifier it names the set.
    generation: int = 0
    # From the first rekey on: the working keys, AES-GCM under a key derived from this set's
    # secret (kms.keyring). None: the keys are derived from the secret itself (generation 0).
    keyring: bytes | None = field(default=None, repr=False)

    @property
    def shares_needed(self) -> int:
        """Fewest shares that can unseal: the smallest ``group_threshold`` member thresholds."""
        return sum(sorted(t for t, _ in self.groups)[: self.group_threshold])

    @property
    def share_count(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def members(self) -> list[str]:
        """Every member id ("group.member", from 0), in the order the shares are handed out."""
        return [f"{g}.{m}" for g, (_, count) in enumerate(self.groups) for m in range(count)]

    def public_json(self) -> dict[str, Any]:
        """What may be shown to anyone: the parameters, never the verifier or the keyring."""
        return {
            "identifier": self.identifier,
            "generation": self.generation,
            "group_threshold": self.group_threshold,
            "groups": [list(g) for g in self.groups],
            "shares_needed": self.shares_needed,
            "share_count": self.share_count,
            "created_at": self.created_at,
        }

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "identifier": self.identifier,
            "extendable": self.extendable,
            "iteration_exponent": self.iteration_exponent,
            "group_threshold": self.group_threshold,
            "groups": [list(g) for g in self.groups],
            "verifier": self.verifier.hex(),
            "created_at": self.created_at,
        }
        if self.generation:
            data["generation"] = self.generation
        if self.keyring is not None:
            data["keyring"] = self.keyring.hex()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShareSetDescriptor:
        keyring = data.get("keyring")
        return cls(
            identifier=int(data["identifier"]),
            extendable=bool(data["extendable"]),
            iteration_exponent=int(data["iteration_exponent"]),
            group_threshold=int(data["group_threshold"]),
            groups=tuple((int(t), int(n)) for t, n in data["groups"]),
            verifier=bytes.fromhex(data["verifier"]),
            created_at=float(data["created_at"]),
            generation=int(data.get("generation", 0)),
            keyring=None if keyring is None else bytes.fromhex(keyring),
        )


def validate_quorum(threshold: int, shares: int) -> None:
    if shares == 1 and threshold == 1:
        return  # development only; the server refuses it outside dev mode
    if not 2 <= threshold <= shares <= MAX_SHARES:
        raise InvalidRequestError(
            f"secret_threshold must be between 2 and secret_shares, and secret_shares at most "
            f"{MAX_SHARES} (1 of 1 only for development); got {threshold} of {shares}"
        )


def validate_groups(
    group_threshold: int, groups: Sequence[tuple[int, int]], *, allow_single_share: bool = False
) -> None:
    """SLIP-39 group parameters this service accepts, with a message naming what is wrong.

    One group is the plain M-of-N set. Several groups ("2 of 3 from the ministry AND 2 of 3
    from the information-system authority") need ``group_threshold`` groups, each with its own
    member threshold. Whatever the shape, no single share may unseal outside development.
    """
    if len(groups) == 1 and group_threshold == 1:
        validate_quorum(groups[0][0], groups[0][1])
        if groups[0] == (1, 1) and not allow_single_share:
            raise InvalidRequestError("a single share (1 of 1) is allowed only in development mode")
        return
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise InvalidRequestError(f"groups must list 1 to {MAX_GROUPS} groups; got {len(groups)}")
    if not 1 <= group_threshold <= len(groups):
        raise InvalidRequestError(
            f"group_threshold must be between 1 and the number of groups ({len(groups)}); "
            f"got {group_threshold}"
        )
    for number, (threshold, count) in enumerate(groups, start=1):
        if not 1 <= threshold <= count <= MAX_SHARES:
            raise InvalidRequestError(
                f"group {number}: the member threshold must be between 1 and the member count, "
                f"and the count at most {MAX_SHARES}; got {threshold} of {count}"
            )
        if threshold == 1 and count > 1:
            raise InvalidRequestError(
                f"group {number}: 1 of {count} is not allowed by SLIP-39 (every share would be "
                "the group's secret); use 1 of 1"
            )
    total = sum(count for _, count in groups)
    if total > MAX_SHARES:
        raise InvalidRequestError(f"at most {MAX_SHARES} shares in all; the groups make {total}")
    needed = sum(sorted(t for t, _ in groups)[:group_threshold])
    if needed < 2 and not allow_single_share:
        raise InvalidRequestError(
            "these groups let a single share unseal; that is allowed only in development mode"
        )


def split_secret(
    secret: bytes | bytearray, threshold: int, shares: int, *, now: float
) -> tuple[list[str], ShareSetDescriptor]:
    """Split the root secret into ``shares`` mnemonics, any ``threshold`` of which unseal."""
    validate_quorum(threshold, shares)
    return split_groups(secret, 1, [(threshold, shares)], now=now)


def split_groups(
    secret: bytes | bytearray,
    group_threshold: int,
    groups: Sequence[tuple[int, int]],
    *,
    now: float,
    generation: int = 0,
    random: RandomSource | None = None,
    avoid_identifier: int | None = None,
) -> tuple[list[str], ShareSetDescriptor]:
    """Split the root secret into SLIP-39 groups; returns the mnemonics in member order.

    ``avoid_identifier`` is the set being replaced: a new set never reuses its identifier, so
    an old share is refused as another set's rather than taken for a member of the new one.
    """
    if len(secret) != ROOT_SECRET_BYTES:
        raise ValueError("root secret must be 32 bytes")
    identifier = _identifier(random)
    while identifier == avoid_identifier:
        identifier = _identifier(random)
    encrypted = EncryptedMasterSecret.from_master_secret(
        master_secret=bytes(secret),
        passphrase=b"",
        identifier=identifier,
        extendable=True,
        iteration_exponent=ITERATION_EXPONENT,
    )
    try:
        grouped = split_ems(group_threshold, list(groups), encrypted)
    except ValueError as exc:
        raise InvalidRequestError(f"SLIP-39 refuses these groups: {exc}") from None
    mnemonics = [share.mnemonic() for group in grouped for share in group]
    descriptor = ShareSetDescriptor(
        identifier=identifier,
        extendable=encrypted.extendable,
        iteration_exponent=ITERATION_EXPONENT,
        group_threshold=group_threshold,
        groups=tuple((int(t), int(n)) for t, n in groups),
        verifier=root_verifier(secret),
        created_at=now,
        generation=generation,
    )
    return mnemonics, descriptor


def _identifier(random: RandomSource | None) -> int:
    raw = random.bytes(2) if random is not None else secrets.token_bytes(2)
    return int.from_bytes(raw, "big") & ((1 << _IDENTIFIER_BITS) - 1)


def parse_share(mnemonic: str) -> Share:
    """Parse one mnemonic with errors that name the problem but never echo a word of the share."""
    if not isinstance(mnemonic, str):
        raise InvalidShareError("share must be a string of SLIP-39 words")
    words = mnemonic.strip().lower().split()
    if len(words) not in _VALID_WORD_COUNTS:
        raise InvalidShareError(
            f"share has {len(words)} words; a SLIP-39 share of this service has 20 or 33"
        )
    for position, word in enumerate(words, start=1):
        if word not in WORD_INDEX_MAP:
            raise InvalidShareError(f"word {position} of the share is not in the SLIP-39 word list")
    try:
        return Share.from_mnemonic(" ".join(words))
    except MnemonicError:
        raise InvalidShareError(
            "share checksum does not match: a word is mistyped or out of order"
        ) from None


def recover_secret(mnemonics: list[str], passphrase: bytes = b"") -> bytearray:
    """Combine a complete set of shares (used for test vectors and offline checks)."""
    state = RecoveryState()
    try:
        for mnemonic in mnemonics:
            state.add_share(parse_share(mnemonic))
        if not state.is_complete():
            raise InvalidShareError("not enough shares to reach the threshold")
        return bytearray(state.recover(passphrase))
    except MnemonicError:
        raise InvalidShareError("the shares are inconsistent") from None


@dataclass(frozen=True)
class UnsealProgress:
    threshold: int
    shares: int
    progress: int
    nonce: str
    secret: bytearray | None = field(default=None, repr=False)
    member: str | None = None  # "group.member" of the share just accepted, for the audit log


class ShareCollector:
    """Collects shares towards a quorum, in memory, for a bounded time.

    A malformed, foreign or duplicate share is rejected and leaves earlier progress intact; only
    a share that proves the set inconsistent (a conflicting share for a member already given, or
    a quorum that reconstructs the wrong secret) clears it, since it cannot be known which of the
    submitted shares is the bad one.
    """

    def __init__(
        self,
        descriptor: ShareSetDescriptor,
        clock: Clock,
        timeout: float,
        *,
        activity: str = "unseal",
    ) -> None:
        self._descriptor = descriptor
        self._clock = clock
        self._timeout = timeout
        self._activity = activity  # names the progress that a reset discards, in messages
        self._state = RecoveryState()
        self._count = 0
        self._started = 0.0
        self._nonce = ""

    @property
    def progress(self) -> int:
        self._expire()
        return self._count

    @property
    def nonce(self) -> str:
        self._expire()
        return self._nonce

    def reset(self) -> None:
        self._state = RecoveryState()
        self._count = 0
        self._nonce = ""

    def _expire(self) -> None:
        if self._count and self._clock.now() - self._started > self._timeout:
            self.reset()

    def _status(self, secret: bytearray | None = None, member: str | None = None) -> UnsealProgress:
        return UnsealProgress(
            threshold=self._descriptor.shares_needed,
            shares=self._descriptor.share_count,
            progress=self._count,
            nonce=self._nonce,
            secret=secret,
            member=member,
        )

    def status(self) -> UnsealProgress:
        self._expire()
        return self._status()

    def submit(self, mnemonic: str) -> UnsealProgress:
        """Add a share; when it completes the quorum, the result carries the secret (wipe it)."""
        share = parse_share(mnemonic)
        self._expire()
        d = self._descriptor
        if share.identifier != d.identifier or share.common_parameters() != (
            d.identifier,
            d.extendable,
            d.iteration_exponent,
            d.group_threshold,
            len(d.groups),
        ):
            raise InvalidShareError("share belongs to another share set than this service's")
        member = f"{share.group_index}.{share.index}"
        group = self._state.groups.get(share.group_index)
        if group is not None:
            for earlier in group:
                if earlier.index == share.index:
                    if hmac.compare_digest(earlier.value, share.value):
                        raise InvalidShareError("this share was already submitted")
                    self.reset()
                    raise InvalidShareError(
                        "share conflicts with an earlier share of the same member; "
                        f"{self._activity} progress was reset"
                    )
        try:
            self._state.add_share(share)
        except MnemonicError:
            self.reset()
            raise InvalidShareError(
                f"share parameters contradict earlier shares; {self._activity} progress was reset"
            ) from None
        if self._count == 0:
            self._started = self._clock.now()
            self._nonce = str(uuid.uuid4())
        self._count += 1
        if not self._state.is_complete():
            return self._status(member=member)
        return self._complete(member)

    def _complete(self, member: str) -> UnsealProgress:
        try:
            secret = bytearray(self._state.recover(b""))
        except MnemonicError:
            self.reset()
            raise InvalidShareError(
                f"the submitted shares are inconsistent; {self._activity} progress was reset"
            ) from None
        if not hmac.compare_digest(root_verifier(secret), self._descriptor.verifier):
            secret[:] = bytes(len(secret))
            self.reset()
            raise InvalidShareError(
                "the submitted shares do not reconstruct this service's root secret; "
                f"{self._activity} progress was reset"
            )
        status = self._status(secret=secret, member=member)
        self.reset()
        return status
