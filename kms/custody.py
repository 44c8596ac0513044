"""Split custody of the root secret with SLIP-39 shares, and collection of shares at unseal.

Pure logic: time comes from an injected clock, randomness from an injected source. Nothing here
touches the HSM or the disk; the caller decides what happens once a quorum is reached.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shamir_mnemonic import MnemonicError, Share, generate_mnemonics
from shamir_mnemonic.recovery import RecoveryState
from shamir_mnemonic.wordlist import WORD_INDEX_MAP

from kms.derivation import ROOT_SECRET_BYTES, root_verifier
from kms.errors import InvalidRequestError, InvalidShareError

if TYPE_CHECKING:
    from kms.ports import Clock

MAX_SHARES = 16
ITERATION_EXPONENT = 1
_VALID_WORD_COUNTS = (20, 33)  # 128-bit and 256-bit secrets


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

    @property
    def shares_needed(self) -> int:
        """Fewest shares that can unseal: the smallest ``group_threshold`` member thresholds."""
        return sum(sorted(t for t, _ in self.groups)[: self.group_threshold])

    @property
    def share_count(self) -> int:
        return sum(n for _, n in self.groups)

    def to_json(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "extendable": self.extendable,
            "iteration_exponent": self.iteration_exponent,
            "group_threshold": self.group_threshold,
            "groups": [list(g) for g in self.groups],
            "verifier": self.verifier.hex(),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShareSetDescriptor:
        return cls(
            identifier=int(data["identifier"]),
            extendable=bool(data["extendable"]),
            iteration_exponent=int(data["iteration_exponent"]),
            group_threshold=int(data["group_threshold"]),
            groups=tuple((int(t), int(n)) for t, n in data["groups"]),
            verifier=bytes.fromhex(data["verifier"]),
            created_at=float(data["created_at"]),
        )


def validate_quorum(threshold: int, shares: int) -> None:
    if shares == 1 and threshold == 1:
        return  # development only; the server refuses it outside dev mode
    if not 2 <= threshold <= shares <= MAX_SHARES:
        raise InvalidRequestError(
            f"secret_threshold must be between 2 and secret_shares, and secret_shares at most "
            f"{MAX_SHARES} (1 of 1 only for development); got {threshold} of {shares}"
        )


def split_secret(
    secret: bytes | bytearray, threshold: int, shares: int, *, now: float
) -> tuple[list[str], ShareSetDescriptor]:
    """Split the root secret into ``shares`` mnemonics, any ``threshold`` of which unseal."""
    validate_quorum(threshold, shares)
    if len(secret) != ROOT_SECRET_BYTES:
        raise ValueError("root secret must be 32 bytes")
    groups = generate_mnemonics(
        1, [(threshold, shares)], bytes(secret), iteration_exponent=ITERATION_EXPONENT
    )
    mnemonics = groups[0]
    first = Share.from_mnemonic(mnemonics[0])
    descriptor = ShareSetDescriptor(
        identifier=first.identifier,
        extendable=first.extendable,
        iteration_exponent=first.iteration_exponent,
        group_threshold=1,
        groups=((threshold, shares),),
        verifier=root_verifier(secret),
        created_at=now,
    )
    return mnemonics, descriptor


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
