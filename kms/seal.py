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

from kms.audit import keyed_hash
from kms.custody import ShareCollector, ShareSetDescriptor, split_secret, validate_quorum
from kms.derivation import ROOT_SECRET_BYTES, RootKeys, wipe
from kms.errors import ConflictError, InvalidRequestError, NotInitializedError, SealedError
from kms.root_generation import RootGeneration, RootGenerationStatus
from kms.tokens import ROOT_POLICY, IssuedToken, issue_token

if TYPE_CHECKING:
    from collections.abc import Callable

    from kms.ports import Clock, CustodyStore, KeyBackend, RandomSource, TokenStore

DEFAULT_UNSEAL_TIMEOUT = 600.0


class TokenProvisioner(Protocol):
    """Takes ownership of the HSM token at init: afterwards only the derived PINs open it."""

    def take_ownership(self, user_pin: str, so_pin: str) -> None: ...


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
    store: CustodyStore,
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
        store.complete_initialisation(descriptor, token.token_hash, token.token_id)
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

    def __init__(self, backend: KeyBackend) -> None:
        self._backend = backend
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
            pin = bytearray(keys.pin_text(keys.hsm_user_pin).encode())
            try:
                self._backend.open(pin)
            finally:
                wipe(pin)
            self._keys = keys

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
    ) -> None:
        self._store = store
        self._clock = clock
        self._opener = opener
        self._closer = closer
        self._tokens = tokens
        self._random = random
        self._timeout = timeout
        self._lock = threading.Lock()
        self._collector: ShareCollector | None = None
        self._descriptor: ShareSetDescriptor | None = None
        self._unsealed = False
        self._root: RootGeneration | None = None

    def _load(self) -> ShareSetDescriptor | None:
        if self._descriptor is None:
            self._descriptor = self._store.get_share_set()
            if self._descriptor is not None:
                self._collector = ShareCollector(self._descriptor, self._clock, self._timeout)
        return self._descriptor

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
            if self._load() is None or self._collector is None:
                raise NotInitializedError
            if self._unsealed:
                raise ConflictError("Vault is already unsealed")
            progress = self._collector.submit(mnemonic)
            if progress.secret is None:
                return self._status(progress.member)
            keys = RootKeys.derive(progress.secret)
            wipe(progress.secret)
            self._opener(keys)
            self._unsealed = True
            return self._status(progress.member)

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
            return self._status()

    # --- generate-root ------------------------------------------------------------------------

    def _require_unsealed(self) -> ShareSetDescriptor:
        descriptor = self._load()
        if descriptor is None:
            raise NotInitializedError
        if not self._unsealed:
            raise SealedError
        return descriptor

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
