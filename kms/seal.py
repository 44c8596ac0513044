"""Seal state: initialisation, share collection and the unsealed barrier.

``Custodian`` runs once per node (in the supervisor when there are several worker processes)
and decides when the node opens; ``Barrier`` is the per-process unsealed state that a worker's
key operations check. The two are joined by callbacks so that the same logic serves a single
process and a supervisor that broadcasts to workers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from kms import keyring, rekey
from kms.audit import keyed_hash
from kms.custody import ShareCollector, ShareSetDescriptor, split_secret, validate_quorum
from kms.derivation import ROOT_SECRET_BYTES, RootKeys, wipe
from kms.errors import (
    BackendError,
    ConflictError,
    EkmsError,
    InvalidRequestError,
    NotInitializedError,
    SealedError,
)
from kms.ports import CustodyStore
from kms.rekey import Phase, Rekey, RekeyPlan, RekeyStatus, ShareMember
from kms.root_generation import RootGeneration, RootGenerationStatus
from kms.share_check import commitments
from kms.tokens import ROOT_POLICY, IssuedToken, issue_token

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kms.ports import Clock, KeyBackend, RandomSource, TokenStore
    from kms.rekey import PinChanger, RekeyStore

DEFAULT_UNSEAL_TIMEOUT = 600.0


class TokenProvisioner(Protocol):
    """Takes ownership of the HSM token at init: afterwards only the derived PINs open it."""

    def take_ownership(self, user_pin: str, so_pin: str) -> None: ...


class BackendLogin(Protocol):
    """How the barrier logs a process into its key backend with what the working keys unlock.

    A PKCS#11 token takes the derived user PIN (``PinLogin``); a transit site's credential is
    not derived from the root secret but stored sealed under the barrier key
    (``hsm.transit_backend.TransitLogin``). ``login`` leaves the backend open or raises.
    """

    def login(self, backend: KeyBackend, keys: RootKeys) -> None: ...


class PinLogin:
    """The PKCS#11 user PIN derived from the root secret (or held in the keyring)."""

    def login(self, backend: KeyBackend, keys: RootKeys) -> None:
        pin = bytearray(keys.pin_text(keys.hsm_user_pin).encode())
        try:
            backend.open(pin)
        finally:
            wipe(pin)


class NoToken:
    """A site without a PKCS#11 token (transit): no token to take over at init, no PIN to
    change at rekey. The transit credential is not derived from the root secret, so a rekey
    only reseals it (with every other sealed value, in the commit)."""

    def take_ownership(self, user_pin: str, so_pin: str) -> None:
        del user_pin, so_pin

    def change(self, old_user: str, new_user: str, old_so: str, new_so: str) -> None:
        del old_user, new_user, old_so, new_so


class InitStore(CustodyStore, Protocol):
    """``CustodyStore`` whose init also records the set's members (their share commitments)."""

    def complete_initialisation(
        self,
        descriptor: ShareSetDescriptor,
        root_token_hash: bytes,
        token_id: str,
        members: Sequence[ShareMember] = (),
    ) -> None: ...


@dataclass(frozen=True, repr=False)
class InitResult:
    mnemonics: list[str]
    root_token: IssuedToken
    threshold: int

    def __repr__(self) -> str:
        return f"InitResult(shares={len(self.mnemonics)}, threshold={self.threshold}, <redacted>)"


@dataclass(frozen=True)
class SealStatus:
    initialized: bool
    sealed: bool
    threshold: int = 0
    shares: int = 0
    progress: int = 0
    nonce: str = ""
    member: str | None = field(default=None, compare=False)


def initialise(
    *,
    threshold: int,
    shares: int,
    store: InitStore,
    provisioner: TokenProvisioner,
    clock: Clock,
    random: RandomSource,
    allow_single_share: bool = False,
    root_token: str | None = None,
) -> InitResult:
    """Generate the root secret, split it, hand the HSM token to it, and forget it.

    The node stays sealed afterwards, as Vault's does: the first unseal is the officials' proof
    that their shares work.
    """
    validate_quorum(threshold, shares)
    if shares == 1 and not allow_single_share:
        raise InvalidRequestError("a single share (1 of 1) is allowed only in development mode")
    now = clock.now()
    store.claim_initialisation(now)
    secret = bytearray(random.bytes(ROOT_SECRET_BYTES))
    keys = RootKeys.derive(secret)
    try:
        mnemonics, descriptor = split_secret(secret, threshold, shares, now=now)
        provisioner.take_ownership(keys.pin_text(keys.hsm_user_pin), keys.pin_text(keys.hsm_so_pin))
        token = issue_token(random, root_token)
        members = [ShareMember(m, c) for m, c in commitments(mnemonics).items()]
        store.complete_initialisation(descriptor, token.token_hash, token.token_id, members)
    except BaseException:
        store.abandon_initialisation()
        raise
    finally:
        wipe(secret)
        keys.wipe()
    return InitResult(mnemonics=mnemonics, root_token=token, threshold=threshold)


class Barrier:
    """One process's unsealed state: the derived keys and the backend's login.

    Every key operation asks the barrier first; while sealed it raises ``SealedError`` before
    anything reaches the backend.
    """

    def __init__(self, backend: KeyBackend, login: BackendLogin | None = None) -> None:
        self._backend = backend
        self._login = login or PinLogin()
        self._keys: RootKeys | None = None
        self._lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []

    @property
    def sealed(self) -> bool:
        return self._keys is None

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def open(self, keys: RootKeys) -> None:
        with self._lock:
            if self._keys is not None:
                keys.wipe()
                return
            try:
                self._login.login(self._backend, keys)
            except BaseException:
                if self._backend.is_open:  # logged in, but what follows the login failed
                    self._backend.close()
                raise
            self._keys = keys

    def replace(self, keys: RootKeys) -> None:
        """Take the keys of a share set that replaced the current one, without logging out.

        The HSM session stays logged in across the PIN change (a login outlives it); only the
        keys kept for later (the PINs for the next login, the barrier and domain keys) change.
        """
        with self._lock:
            old = self._keys
            if old is None:
                keys.wipe()
                return
            self._keys = keys
            # Not the audit HMAC key: it has the same value in both, and a request that read
            # the old object a moment ago may be hashing with it right now.
            for part in (
                old.hsm_user_pin,
                old.hsm_so_pin,
                old.barrier_key,
                old.domain_wrapping_key,
            ):
                wipe(part)

    def close(self) -> None:
        with self._lock:
            for callback in self._on_close:
                callback()
            keys, self._keys = self._keys, None
            if keys is not None:
                keys.wipe()
            if self._backend.is_open:
                self._backend.close()

    def require_open(self) -> RootKeys:
        keys = self._keys
        if keys is None:
            raise SealedError
        return keys

    def context_hash(self, value: bytes) -> str | None:
        """Keyed hash of a sensitive value for the audit log; ``None`` while sealed."""
        keys = self._keys
        if keys is None:
            return None
        return keyed_hash(keys.audit_hmac_key, value)

    def audit_hash(self, value: bytes) -> str:
        """``context_hash`` for an officer checking a known value (``sys/audit-hash``).

        The same function and key, so the answer equals a record's field byte for byte.
        """
        digest = self.context_hash(value)
        if digest is None:
            raise SealedError
        return digest


class Custodian:
    """Collects unseal shares for one node and opens or closes it.

    ``opener`` receives freshly derived keys (and owns them); ``closer`` seals every process of
    the node. The custodian keeps no secret of its own once the node is open, except the OTP
    of a root generation in progress. It also runs generate-root, so that shares sent to any
    worker count toward the one attempt, and no worker ever holds a reconstructed secret.
    """

    def __init__(
        self,
        *,
        store: CustodyStore,
        clock: Clock,
        opener: Callable[[RootKeys], None],
        closer: Callable[[], None],
        tokens: TokenStore,
        random: RandomSource,
        timeout: float = DEFAULT_UNSEAL_TIMEOUT,
        rekeys: RekeyStore | None = None,
        pins: PinChanger | None = None,
        rekeyed: Callable[[RootKeys], None] | None = None,
        allow_single_share: bool = False,
    ) -> None:
        self._store = store
        self._clock = clock
        self._opener = opener
        self._closer = closer
        self._tokens = tokens
        self._random = random
        self._timeout = timeout
        self._rekeys = rekeys
        self._pins = pins
        self._rekeyed = rekeyed
        self._allow_single_share = allow_single_share
        self._lock = threading.Lock()
        self._collector: ShareCollector | None = None
        self._descriptor: ShareSetDescriptor | None = None
        self._unsealed = False
        self._root: RootGeneration | None = None
        self._rekey: Rekey | None = None

    def _load(self) -> ShareSetDescriptor | None:
        if self._descriptor is None:
            self._set_descriptor(self._store.get_share_set())
        return self._descriptor

    def _set_descriptor(self, descriptor: ShareSetDescriptor | None) -> None:
        self._descriptor = descriptor
        self._collector = (
            None if descriptor is None else ShareCollector(descriptor, self._clock, self._timeout)
        )

    def _status(self, member: str | None = None) -> SealStatus:
        descriptor = self._load()
        if descriptor is None or self._collector is None:
            return SealStatus(initialized=False, sealed=True)
        progress = self._collector.status()
        return SealStatus(
            initialized=True,
            sealed=not self._unsealed,
            threshold=progress.threshold,
            shares=progress.shares,
            progress=0 if self._unsealed else progress.progress,
            nonce="" if self._unsealed else progress.nonce,
            member=member,
        )

    def status(self) -> SealStatus:
        with self._lock:
            return self._status()

    def submit(self, mnemonic: str) -> SealStatus:
        with self._lock:
            if self._unsealed:
                raise ConflictError("Vault is already unsealed")
            if self._collector is not None and self._collector.progress == 0:
                self._descriptor = None  # a new attempt reads the set in force (another node
                # may have rekeyed since)
            descriptor = self._load()
            if descriptor is None or self._collector is None:
                raise NotInitializedError
            progress = self._collector.submit(mnemonic)
            if progress.secret is None:
                return self._status(progress.member)
            try:
                keys = self._unlock(descriptor, progress.secret)
            finally:
                wipe(progress.secret)
            self._opener(keys)
            self._unsealed = True
            return self._status(progress.member)

    def _unlock(self, descriptor: ShareSetDescriptor, secret: bytearray) -> RootKeys:
        """The working keys of the set in force; first finishes a rekey commit left pending.

        A crash after a commit's first step leaves the old set in force and a pending row; the
        old quorum that unseals now carries the commit to its end (docs/adr/0010).
        """
        keys = keyring.unlock(descriptor, secret)
        if self._rekeys is None or self._pins is None:
            return keys
        try:
            rolled = rekey.roll_forward(
                self._rekeys, self._pins, descriptor, keys, random=self._random
            )
        except EkmsError as exc:
            keys.wipe()
            raise BackendError(
                f"the quorum is right, but finishing an interrupted rekey failed: {exc}. The "
                "node stays sealed; unseal again with the same shares to retry"
            ) from exc
        except BaseException:
            keys.wipe()
            raise
        if rolled is None:
            return keys
        keys.wipe()
        new_descriptor, new_keys = rolled
        self._set_descriptor(new_descriptor)
        return new_keys

    def reset(self) -> SealStatus:
        with self._lock:
            if self._collector is not None:
                self._collector.reset()
            return self._status()

    def seal(self) -> SealStatus:
        with self._lock:
            if self._load() is None:
                raise NotInitializedError
            self._closer()
            self._unsealed = False
            if self._collector is not None:
                self._collector.reset()
            self._drop_root_generation()
            self._drop_rekey()
            return self._status()

    # --- generate-root ------------------------------------------------------------------------

    def _require_unsealed(self) -> ShareSetDescriptor:
        descriptor = self._load()
        if descriptor is None:
            raise NotInitializedError
        if not self._unsealed:
            raise SealedError
        return self._in_force(descriptor)

    def _in_force(self, descriptor: ShareSetDescriptor) -> ShareSetDescriptor:
        """The set in force now: another node sharing the store may have rekeyed since.

        Shares collected for the replaced set must count for nothing, so attempts begun for it
        (generate-root, rekey) are dropped.
        """
        current = self._store.get_share_set()
        if current is None or current == descriptor:
            return descriptor
        self._set_descriptor(current)
        self._drop_root_generation()
        self._drop_rekey()
        return current

    def _current_root_generation(self) -> RootGeneration | None:
        if self._root is not None and self._root.expired:
            self._drop_root_generation()
        return self._root

    def _drop_root_generation(self) -> None:
        root, self._root = self._root, None
        if root is not None:
            root.wipe()

    def root_generation_status(self) -> RootGenerationStatus:
        with self._lock:
            descriptor = self._require_unsealed()
            root = self._current_root_generation()
            if root is None:
                return RootGenerationStatus(started=False, required=descriptor.shares_needed)
            return root.status()

    def start_root_generation(self, otp: str | None) -> RootGenerationStatus:
        """Start an attempt; without ``otp`` one is generated and returned in this answer only."""
        with self._lock:
            descriptor = self._require_unsealed()
            if self._current_root_generation() is not None:
                raise ConflictError(
                    "root generation already in progress: cancel it first "
                    "(DELETE sys/generate-root/attempt)"
                )
            root = RootGeneration(
                descriptor=descriptor,
                clock=self._clock,
                random=self._random,
                timeout=self._timeout,
                otp=otp,
            )
            self._root = root
            status = root.status()
            if root.generated_otp:
                return replace(status, otp=root.otp_text())
            return status

    def submit_root_share(self, mnemonic: str, nonce: str) -> RootGenerationStatus:
        """Add a share; the last one mints a root token and returns it encoded with the OTP."""
        with self._lock:
            self._require_unsealed()
            root = self._current_root_generation()
            if root is None:
                raise InvalidRequestError(
                    "no root generation in progress: start one with PUT sys/generate-root/attempt"
                )
            progress = root.submit(mnemonic, nonce)
            if progress.secret is None:
                return root.status(member=progress.member)
            wipe(progress.secret)  # the collector has checked it against the verifier
            self._root = None
            try:
                token = issue_token(self._random)
                self._tokens.insert_token(
                    token.token_id, token.token_hash, [ROOT_POLICY], self._clock.now()
                )
                encoded = root.encode(token.token)
            finally:
                root.wipe()
            return RootGenerationStatus(
                started=True,
                required=root.required,
                nonce=root.nonce,
                progress=root.required,
                complete=True,
                encoded_token=encoded,
                member=progress.member,
                token_id=token.token_id,
            )

    def cancel_root_generation(self) -> RootGenerationStatus:
        with self._lock:
            descriptor = self._require_unsealed()
            self._drop_root_generation()
            return RootGenerationStatus(started=False, required=descriptor.shares_needed)

    # --- rekey ------------------------------------------------------------------------------

    def _current_rekey(self) -> Rekey | None:
        if self._rekey is not None and self._rekey.expired:
            self._drop_rekey()
        return self._rekey

    def _drop_rekey(self) -> None:
        attempt, self._rekey = self._rekey, None
        if attempt is not None:
            attempt.wipe()

    def _require_rekey(self) -> Rekey:
        self._require_unsealed()
        if self._rekeys is None or self._pins is None:
            raise InvalidRequestError("rekey is not available on this node")
        attempt = self._current_rekey()
        if attempt is None:
            raise InvalidRequestError("no rekey in progress: start one with PUT sys/rekey/init")
        if attempt.phase is Phase.COMMITTING:
            self._finish_commit(attempt)  # an earlier commit failed after its first step: retry
            raise ConflictError("the rekey is complete: the new share set is in force")
        return attempt

    def rekey_status(self) -> RekeyStatus:
        with self._lock:
            descriptor = self._require_unsealed()
            attempt = self._current_rekey()
            if attempt is None:
                return RekeyStatus(
                    started=False,
                    t=descriptor.shares_needed,
                    n=descriptor.share_count,
                    required=descriptor.shares_needed,
                    group_threshold=descriptor.group_threshold,
                    groups=descriptor.groups,
                )
            if attempt.phase is Phase.COMMITTING:
                self._finish_commit(attempt)
                return RekeyStatus(started=False, complete=True, new_set=attempt.status().new_set)
            return attempt.status()

    def start_rekey(self, plan: RekeyPlan) -> RekeyStatus:
        """Start an attempt with a new nonce; the old set stays in force until it commits."""
        with self._lock:
            descriptor = self._require_unsealed()
            if self._rekeys is None or self._pins is None:
                raise InvalidRequestError("rekey is not available on this node")
            if self._current_rekey() is not None:
                raise ConflictError(
                    "a rekey is already in progress: cancel it first (DELETE sys/rekey/init)"
                )
            if self._rekeys.pending_rekey() is not None:
                raise ConflictError(
                    "a rekey commit is pending from an interrupted attempt: seal, then unseal "
                    "with the current shares to finish it"
                )
            if not self._allow_single_share:
                RekeyPlan.of(
                    group_threshold=plan.group_threshold,
                    groups=plan.groups,
                    holders=[(p, dict(items)) for p, items in plan.holders],
                )
            self._rekey = Rekey(
                descriptor=descriptor,
                plan=plan,
                clock=self._clock,
                random=self._random,
                timeout=self._timeout,
            )
            return self._rekey.status()

    def submit_rekey_share(self, mnemonic: str, nonce: str) -> RekeyStatus:
        """A current share; the last one returns the new shares (once) for verification."""
        with self._lock:
            attempt = self._require_rekey()
            progress = attempt.submit(mnemonic, nonce)
            if progress.secret is None:
                return attempt.status(member=progress.member)
            try:
                issued = attempt.issue(progress.secret, now=self._clock.now())
            except BaseException:
                self._drop_rekey()
                raise
            finally:
                wipe(progress.secret)
            return replace(issued, member=progress.member)

    def reset_rekey_verification(self) -> RekeyStatus:
        with self._lock:
            attempt = self._require_rekey()
            attempt.reset_verification()
            return attempt.status()

    def submit_rekey_verification(self, mnemonic: str, nonce: str) -> RekeyStatus:
        """A new share; once the new set's quorum is in, the new set is committed."""
        with self._lock:
            attempt = self._require_rekey()
            progress = attempt.verify(mnemonic, nonce)
            if progress.secret is None:
                return attempt.status(member=progress.member)
            wipe(progress.secret)  # the collector checked it against the new set's verifier
            status = attempt.status(member=progress.member)
            assert self._rekeys is not None
            assert self._pins is not None
            try:
                pending = attempt.pending_commit(
                    now=self._clock.now(), sealed=self._rekeys.all_sealed_values()
                )
                self._rekeys.begin_rekey_commit(pending)
            except BaseException:
                self._drop_rekey()  # nothing was written: the old set stays, alone
                raise
            self._finish_commit(attempt)
            return replace(status, complete=True, verification_progress=status.t)

    def _finish_commit(self, attempt: Rekey) -> None:
        """Steps (2) and (3); on failure the attempt stays, to be retried, and the row too."""
        assert self._rekeys is not None
        assert self._pins is not None
        assert attempt.new_descriptor is not None
        pending = attempt.pending_commit(now=self._clock.now())
        try:
            rekey.finish(
                self._rekeys,
                self._pins,
                pending,
                attempt.old_keys,
                attempt.new_keys,
                random=self._random,
            )
        except EkmsError as exc:
            raise BackendError(
                f"the new share set is verified, but its commit was interrupted: {exc}. Until "
                "it completes the current shares stay in force; it completes at the next "
                "rekey call (GET sys/rekey/init) or the next unseal with the current shares"
            ) from exc
        self._set_descriptor(attempt.new_descriptor)
        self._drop_root_generation()  # its shares are of the replaced set
        if self._rekeyed is not None:
            self._rekeyed(RootKeys.from_bytes(attempt.new_keys.to_bytes()))
        self._drop_rekey()

    def cancel_rekey(self) -> RekeyStatus:
        """Drop the attempt and its new shares; the current set was never touched."""
        with self._lock:
            descriptor = self._require_unsealed()
            attempt = self._current_rekey()
            if attempt is not None and attempt.phase is Phase.COMMITTING:
                raise ConflictError(
                    "the new share set is verified and being committed: it cannot be cancelled"
                )
            self._drop_rekey()
            return RekeyStatus(
                started=False,
                t=descriptor.shares_needed,
                n=descriptor.share_count,
                required=descriptor.shares_needed,
            )
