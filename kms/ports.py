"""The small interfaces through which the pure core talks to the world.

Each adapter (``hsm/``, ``storage/``, ``api/``) implements one of these; the core never imports
the adapters. Tests pass in-memory fakes.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from typing import Any

    from kms.access import StoredProposalView
    from kms.audit import Admission, AuditRecord, JournalEntry, JournalMark, Refusal
    from kms.custody import ShareSetDescriptor
    from kms.identity import Principal
    from kms.keys import KeyPolicy, KeyType, KeyVersion
    from kms.review import Campaign
    from kms.sealed_values import SealedValue


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class RandomSource(Protocol):
    def bytes(self, n: int) -> bytes: ...


class SystemRandom:
    """The kernel CSPRNG; the HSM's RNG is not faster and no better seeded on Linux."""

    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class KeyBackend(Protocol):
    """Where key material lives and is used: a PKCS#11 token or a Vault/OpenBao transit mount.

    ``handle`` is the backend's opaque, non-secret name for one key version (a PKCS#11 CKA_ID).
    Implementations serialise their own calls where the library requires it.
    """

    def open(self, secret: bytearray, /) -> None:
        """Log in; called on unseal. ``secret`` is wiped by the caller afterwards.

        The PKCS#11 user PIN, or a transit backend's credential (``hsm.transit_backend``).
        """
        ...

    def close(self) -> None:
        """Log out and forget every session; called on seal."""
        ...

    @property
    def is_open(self) -> bool: ...

    def generate(self, key_type: KeyType, handle: bytes, label: str) -> bytes | None:
        """Create a key; returns the public key (DER SubjectPublicKeyInfo) for asymmetric keys."""
        ...

    def import_key(
        self, handle: bytes, key_type: KeyType, material: bytes | bytearray, label: str
    ) -> None:
        """Create a non-extractable key from material the service made (a KEK's 32 bytes).

        KEKs are made this way rather than by ``generate`` so that a copy can be escrowed under
        the security-domain key first (``kms.domain``, docs/adr/0012 §3), and so that another
        site can import the same KEK from a domain backup. The caller wipes ``material``;
        the backend never logs it or puts it in an error.
        """
        ...

    def destroy(self, handle: bytes) -> None: ...

    def handles(self) -> set[bytes]:
        """Every key handle this backend holds for the service (for crash reconciliation)."""
        ...

    def encrypt(self, handle: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM; returns (12-byte nonce, ciphertext || 16-byte tag).

        The backend picks the nonce because transit always picks its own; every backend must
        take it from a CSPRNG, never a counter it could repeat after a restart.
        """
        ...

    def decrypt(self, handle: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """Raises ``InvalidCiphertextError`` when the tag does not verify."""
        ...

    def sign(self, handle: bytes, key_type: KeyType, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(message) as raw r||s, or Ed25519 over message."""
        ...


class KeyStore(Protocol):
    """Durable key metadata, shared by every node. Never holds key material in the clear."""

    def get_policy(self, name: str) -> KeyPolicy | None: ...

    def list_names(self) -> list[str]: ...

    def insert_pending_key(self, policy: KeyPolicy, version: KeyVersion) -> None:
        """Raises ``ConflictError`` if the name exists."""
        ...

    def insert_pending_version(self, name: str, version: KeyVersion) -> None:
        """Raises ``ConflictError`` if that version number exists (a concurrent rotation)."""
        ...

    def activate_version(
        self,
        name: str,
        version: int,
        public_key: bytes | None,
        wrapped: bytes | None = None,
        escrow: bytes | None = None,
    ) -> None:
        """Mark a version usable and make it the latest, in one transaction."""
        ...

    def stored_key(self, name: str) -> KeyPolicy | None:
        """The key as stored, uncached, with versions in every state (``latest_version`` 0
        while its creation is pending); for imports that must resume after a crash."""
        ...

    def sealed_value(self, name: str) -> SealedValue | None: ...

    def put_sealed_value(self, value: SealedValue, *, only_if_absent: bool = False) -> bool:
        """Store ``value``; with ``only_if_absent``, False (nothing written) if one exists."""
        ...

    def update_policy(self, policy: KeyPolicy) -> None: ...

    def mark_deleting(self, name: str) -> None:
        """Hide the key and mark every version for destruction, in one transaction."""
        ...

    def deleting_versions(self) -> list[tuple[str, KeyVersion]]: ...

    def pending_versions(self, older_than: float) -> list[tuple[str, KeyVersion]]: ...

    def discard_version(self, name: str, version: int) -> None:
        """Drop a pending or deleting version row; a key left with none goes too."""
        ...

    def all_handles(self) -> set[bytes]: ...


class CustodyStore(Protocol):
    """Durable custody state: what the share set looks like and how to recognise its secret."""

    def get_share_set(self) -> ShareSetDescriptor | None: ...

    def claim_initialisation(self, started_at: float) -> None:
        """Atomically mark init as in progress; ``ConflictError`` if already claimed."""
        ...

    def complete_initialisation(
        self, descriptor: ShareSetDescriptor, root_token_hash: bytes, token_id: str
    ) -> None: ...

    def abandon_initialisation(self) -> None: ...


class TokenStore(Protocol):
    def find_token(self, token_hash: bytes) -> tuple[str, Sequence[str]] | None:
        """Returns (token id, policies) for a live token with that hash."""
        ...

    def revoke_token(self, token_id: str, at: float) -> bool:
        """Revoke at once, on every node; False if no live token has that id."""
        ...

    def insert_token(
        self, token_id: str, token_hash: bytes, policies: Sequence[str], created_at: float
    ) -> None:
        """Store a new token by its hash (never its value); usable at once on every node."""
        ...


class AuditSink(Protocol):
    def append(self, records: Iterable[AuditRecord]) -> None:
        """Durably append records, in order; raises on failure (the caller fails closed)."""
        ...

    def commit(
        self,
        batch: Sequence[tuple[AuditRecord, Admission | None]],
        journaled: Sequence[JournalEntry] = (),
        mark: JournalMark | None = None,
    ) -> list[Refusal | None]:
        """Append ``journaled``, then check each admission and append each record, at once.

        One transaction holds it all, with ``mark`` (how far its journal file now is in the
        log), so a journal is taken into the log exactly once even across a crash. Returns,
        per ``batch`` entry, ``None`` if admitted or the ``Refusal``; a refused entry's record
        is stored as a denial with that reason. Raises on failure (the caller fails closed).
        """
        ...

    def journal_offset(self, name: str) -> int:
        """How much of journal ``name`` the log holds (0 if none of it)."""
        ...

    def forget_journal(self, name: str) -> None:
        """Drop a journal's mark once its file is gone."""
        ...


class ReviewStore(Protocol):
    """What access reviews read and write (``storage.sql_store.SqlStore``).

    The ``each_*`` readers yield rows in pages, so a report over a long audit log never holds
    the stored rows and their decoded form at once. Campaigns carry a version: a write names
    the version it read and is refused (``False``) if another writer got there first.
    """

    def principal(self, principal_id: str) -> Principal | None: ...

    def list_principals(self) -> list[Principal]: ...

    def list_names(self) -> list[str]: ...

    def each_issued_token(self) -> Iterator[dict[str, Any]]: ...

    def all_proposals(self) -> Sequence[StoredProposalView]: ...

    def each_audit_record(self) -> Iterator[dict[str, Any]]:
        """Every audit record as stored (``time_us``), in log order."""
        ...

    def insert_campaign(self, campaign: Campaign) -> None:
        """Store a new campaign at version 1; ``ConflictError`` if the id is taken."""
        ...

    def campaign(self, campaign_id: str) -> tuple[Campaign, int] | None:
        """The campaign and its version."""
        ...

    def list_campaigns(
        self, *, state: str | None = None, limit: int = 100
    ) -> list[tuple[Campaign, int]]:
        """Newest first."""
        ...

    def update_campaign(self, campaign: Campaign, *, version: int) -> bool:
        """Store ``campaign`` if it is still at ``version``; False if someone changed it."""
        ...

    def close_campaign(
        self, campaign: Campaign, *, version: int, disable: Sequence[str], at: float
    ) -> bool:
        """In one transaction: store the closed campaign if still at ``version``, disable each
        principal in ``disable`` and revoke every token issued to them.

        Raises ``LastOfficerError`` (and changes nothing) if no active security officer would
        remain; returns False (changing nothing) if the campaign moved on.
        """
        ...
