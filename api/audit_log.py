"""The service's own audit log as an auditor sees it: signed tree heads, exports and proofs.

The records and the tree's compact range are written by ``SqlStore.commit`` with every request.
This service signs tree heads with an ecdsa-p256 system key in the HSM (``AUDIT_SIGNING_KEY``,
a name no API caller can address), and builds exports (``kms.audit_export``) and RFC 9162
inclusion and consistency proofs from what the database holds.

Proofs and exports are computed from the stored records, never from a cached tree: if a row
was changed after it was written, what the auditor receives shows it, and the offline verifier
names the record. The export, proof and head reads need no HSM and work while sealed; signing
a head needs the barrier open.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from kms import jose
from kms.audit import time_us
from kms.audit_export import TreeHead, build_export, sign_tree_head
from kms.errors import ConflictError, EkmsError, InvalidRequestError, NotFoundError, StorageError
from kms.keys import SYSTEM_KEY_PREFIX, Classification, KeyPolicy, KeyType, VersionState
from kms.merkle import MerkleTree, leaf_hash

if TYPE_CHECKING:
    from kms.ports import Clock
    from kms.seal import Barrier
    from kms.service import KeyService
    from storage.sql_store import SqlStore

log = logging.getLogger("ekms.audit")

AUDIT_SIGNING_KEY = SYSTEM_KEY_PREFIX + "audit-signing"
HEAD_ALG = "ES256"
# A search reads at most this many leaf indexes, then answers with what it found and ``next``.
SEARCH_SCAN_LIMIT = 10_000
# Usage reads every record of its window; a window holding more is refused (400), not cut short.
USAGE_SCAN_LIMIT = 1_000_000
# How far records' times may run out of log order: a record's time is taken when its request
# ends, and workers and nodes commit in batches, with clocks of their own. Time windows are
# located by a binary search over the leaf index widened by this much, then checked exactly.
TIME_SKEW = 300.0
_CHUNK = 2_000


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ERROR = "error"


class Bucket(StrEnum):
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return 3600 if self is Bucket.HOUR else 86_400


@dataclass(frozen=True)
class RecordQuery:
    """One page of ``GET /v1/ekms/audit/records``, checked by the route.

    ``after`` pages forward (ascending, what ``ekms audit tail -f`` polls with); ``before``, or
    neither, pages back from the newest. ``operation`` ending in ``*`` is a prefix. Filters
    are ANDed; ``since`` is inclusive and ``until`` exclusive, in seconds since the epoch.
    """

    after: int | None = None
    before: int | None = None
    limit: int = 100
    principal: str | None = None
    operation: str | None = None
    decision: Decision | None = None
    key: str | None = None
    request_id: str | None = None
    since: float | None = None
    until: float | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        if not _in_window(record, self.since, self.until):
            return False
        decision = None if self.decision is None else self.decision.value
        exact = (("principal", self.principal), ("key", self.key), ("decision", decision))
        if any(wanted is not None and record.get(name) != wanted for name, wanted in exact):
            return False
        if self.operation is None:
            return True
        operation = record.get("operation")
        if not isinstance(operation, str):
            return False
        if self.operation.endswith("*"):
            return operation.startswith(self.operation[:-1])
        return operation == self.operation


@dataclass(frozen=True)
class Export:
    lines: list[bytes]
    records: int
    heads: int
    problem: str | None = None  # why the stored log contradicts its own signed heads


def head_json(head: TreeHead, jws: str) -> dict[str, Any]:
    """A head as the export writes it: the line an auditor keeps for ``--previous-head``."""
    return {"type": "head", **head.claims(), "jws": jws}


class AuditLog:
    def __init__(
        self, *, keys: KeyService, store: SqlStore, barrier: Barrier, clock: Clock
    ) -> None:
        self._keys = keys
        self._store = store
        self._barrier = barrier
        self._clock = clock

    # --- the signing key ----------------------------------------------------------------

    def _signing_policy(self) -> KeyPolicy:
        try:
            return self._keys.policy(AUDIT_SIGNING_KEY)
        except NotFoundError:
            pass
        try:
            return self._keys.create_key(
                AUDIT_SIGNING_KEY, KeyType.ECDSA_P256, Classification.SECRET
            )
        except ConflictError:  # another worker or node created it first
            return self._keys.policy(AUDIT_SIGNING_KEY)

    def public_key(self) -> jose.PublicJwk | None:
        """The key heads are signed with, from the registry (no HSM, so also while sealed)."""
        policy = self._store.get_policy(AUDIT_SIGNING_KEY)
        return None if policy is None else _latest_jwk(policy)

    # --- tree heads -----------------------------------------------------------------------

    def sign_head(self) -> tuple[TreeHead, str]:
        """Sign the tree as it stands and store the head; the barrier must be open.

        If another worker or node stored a head of the same or a larger size meanwhile, that
        one is returned: heads are kept in log order, one per size.
        """
        size, root = self._store.tree_state()
        latest = self._store.tree_head()
        if latest is not None and latest[0].size >= size:
            return latest
        now_ms = int(self._clock.now() * 1000)
        timestamp = max(now_ms, latest[0].timestamp_ms) if latest is not None else now_ms
        head = TreeHead(size, root, timestamp)
        policy = self._signing_policy()
        kid = _latest_jwk(policy).thumbprint

        def sign(signing_input: bytes) -> bytes:
            return self._keys.sign_jws(policy, signing_input)[0]

        jws = sign_tree_head(head, sign, alg=HEAD_ALG, kid=kid)
        if self._store.add_tree_head(head, jws):
            log.info("signed audit tree head of size %d", size)
            return head, jws
        stored = self._store.tree_head(size) or self._store.tree_head()
        if stored is None or stored[0].size < size:
            raise ConflictError("another node signed a tree head at the same moment; retry")
        return stored

    def sign_if_grown(self, *, create_key: bool = True) -> tuple[TreeHead, str] | None:
        """Sign a head if the log grew since the last one and the barrier is open.

        ``create_key=False`` signs only with a key that exists already (at shutdown, say).
        """
        if self._barrier.sealed:
            return None
        if not create_key and self._store.get_policy(AUDIT_SIGNING_KEY) is None:
            return None
        size, _ = self._store.tree_state()
        latest = self._store.tree_head()
        if latest is not None and latest[0].size >= size:
            return None
        return self.sign_head()

    def sign_quietly(self, when: str, *, create_key: bool = True) -> None:
        """``sign_if_grown`` where a failure must not stop what follows (sealing, shutdown)."""
        try:
            self.sign_if_grown(create_key=create_key)
        except EkmsError as exc:
            log.warning("could not sign an audit tree head %s: %s", when, exc)
        except Exception as exc:  # noqa: BLE001 - logged by type; sealing goes on regardless
            log.error("could not sign an audit tree head %s: %s", when, type(exc).__name__)

    async def sign_periodically(self, seconds: float) -> None:
        """Sign a head every ``seconds`` (±10 %, so workers drift apart) while the log grows."""
        while True:
            await asyncio.sleep(seconds * random.uniform(0.9, 1.1))  # noqa: S311 - jitter only
            self.sign_quietly("on schedule")

    def heads(self) -> list[tuple[TreeHead, str]]:
        return self._store.tree_heads()

    def _head(self, size: int | None) -> tuple[TreeHead, str]:
        found = self._store.tree_head(size)
        if found is not None:
            return found
        if size is None:
            raise InvalidRequestError(
                "no tree head has been signed yet: sign one with POST /v1/ekms/audit/tree-head"
            )
        raise InvalidRequestError(f"there is no signed tree head of size {size}")

    # --- search and usage -----------------------------------------------------------------

    def search(self, query: RecordQuery) -> dict[str, Any]:
        """A page of records, filtered in Python over a bounded scan of the leaf index.

        The stored record is canonical JSON with no index on its fields, and this adds no
        migration: the scan walks the primary key in ``_CHUNK`` steps, reads at most
        ``SEARCH_SCAN_LIMIT`` indexes, and stops early once ``limit`` records matched.
        ``since``/``until`` first narrow the range by a binary search on the index (records'
        times rise with it, to within ``TIME_SKEW``), then are checked on each row;
        ``request_id`` is checked in SQL on its column. ``next`` is where to continue (pass it
        as ``after`` or ``before``), also when the scan ran out before the page filled; it is
        None when the scan reached the end in its direction (the oldest record, or the tree
        size read at the start). Every returned record is below ``size``.
        """
        size, _ = self._store.tree_state()
        low, high = self._window(size, query.since, query.until)
        ascending = query.after is not None
        if query.after is not None:
            low = max(low, query.after + 1)
        if query.before is not None:
            high = min(high, query.before)
        position = low if ascending else high  # ascending: next to read; else: one past it
        found: list[dict[str, Any]] = []
        budget = SEARCH_SCAN_LIMIT
        while len(found) < query.limit and budget > 0 and low < high:
            width = min(_CHUNK, budget)
            start, end = (
                (position, min(high, position + width))
                if ascending
                else (max(low, position - width), position)
            )
            if start >= end:
                break
            budget -= end - start
            since, until = _rough(query.since, query.until)
            rows = self._store.audit_rows(
                start, end, since=since, until=until, request_id=query.request_id
            )
            position = end if ascending else start
            for index, _time, data, leaf in rows if ascending else reversed(rows):
                record = _decoded(index, data)
                if not query.matches(record):
                    continue
                found.append({"index": index, "leaf_hash": leaf.hex(), "record": record})
                if len(found) == query.limit:
                    position = index + 1 if ascending else index
                    break
        if ascending:
            more = position < high
            next_index = position - 1 if more else None
        else:
            more = position > low
            next_index = position if more else None
        return {"records": found, "size": size, "next": next_index}

    def usage(
        self, *, bucket: Bucket, since: float, until: float, key: str | None
    ) -> dict[str, Any]:
        """Key operations (records naming a key) per bucket: allowed and denied counts.

        Records that ended in an error (bad input, sealed) are not counted. Buckets are
        aligned to UTC hours or days; only non-empty ones are listed, oldest first.
        """
        size, _ = self._store.tree_state()
        low, high = self._window(size, since, until)
        if high - low > USAGE_SCAN_LIMIT:
            raise InvalidRequestError(
                f"the window holds about {high - low} audit records, more than the "
                f"{USAGE_SCAN_LIMIT} one request may read: narrow since/until"
            )
        width = bucket.seconds
        rough_since, rough_until = _rough(since, until)
        counts: dict[str, dict[int, list[int]]] = {}
        for start in range(low, high, _CHUNK * 10):
            end = min(high, start + _CHUNK * 10)
            for index, _time, data, _leaf in self._store.audit_rows(
                start, end, since=rough_since, until=rough_until
            ):
                record = _decoded(index, data)
                name = record.get("key")
                decision = record.get("decision")
                if not isinstance(name, str) or (key is not None and name != key):
                    continue
                if decision not in (Decision.ALLOW, Decision.DENY):
                    continue
                if not _in_window(record, since, until):
                    continue
                slot = record["time_us"] // 1_000_000 // width * width
                point = counts.setdefault(name, {}).setdefault(slot, [0, 0])
                point[0 if decision == Decision.ALLOW else 1] += 1
        series = [
            {"key": name, "points": [[slot, *counts[name][slot]] for slot in sorted(counts[name])]}
            for name in sorted(counts)
        ]
        return {"bucket": width, "since": since, "until": until, "series": series}

    def _window(self, size: int, since: float | None, until: float | None) -> tuple[int, int]:
        """Leaf indexes ``[low, high)`` that can hold records of ``[since, until)``."""
        low = 0 if since is None else self._store.audit_index_at(since - TIME_SKEW, size)
        high = size if until is None else self._store.audit_index_at(until + TIME_SKEW, size)
        return low, max(low, high)

    # --- exports and proofs ---------------------------------------------------------------

    def export(self) -> Export:
        """Every record and signed head, as ``kms.audit_export.build_export`` writes them.

        Heads are read before records: records only grow, so every head is covered. If the
        stored records contradict a signed head, the export is still built (``check=False``)
        so that the auditor's verifier names the record; ``problem`` says what is wrong.
        """
        key = self.public_key()
        if key is None:
            raise InvalidRequestError(
                "the audit log has no signing key yet: sign a tree head first "
                "(POST /v1/ekms/audit/tree-head)"
            )
        heads = self._store.tree_heads()
        rows = self._store.audit_export_rows()
        records = [record for _, record, _ in rows]
        problem = next(
            (f"audit record {i} is missing" for i, (index, _, _) in enumerate(rows) if index != i),
            None,
        )
        if problem is None:
            try:
                lines = build_export(records, heads, key.to_json())
            except InvalidRequestError as exc:
                problem = str(exc)
        if problem is not None:
            log.error("the stored audit log contradicts its signed heads: %s", problem)
            kept = [leaf for _, _, leaf in rows]
            lines = build_export(records, heads, key.to_json(), check=False, leaves=kept)
        return Export(lines, len(records), len(heads), problem)

    def inclusion(self, index: int, size: int | None) -> dict[str, Any]:
        """The audit path of record ``index`` against the signed head of ``size``."""
        head, jws = self._head(size)
        if not 0 <= index < head.size:
            raise InvalidRequestError(
                f"record {index} is not in the signed tree head of size {head.size}"
            )
        tree = MerkleTree(self._store.leaves(0, head.size))
        data = self._store.audit_leaf_data(index, index + 1)[0]
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StorageError(f"audit record {index} is not valid JSON") from None
        return {
            "index": index,
            "record": record,
            "leaf_hash": leaf_hash(data).hex(),
            "tree_size": head.size,
            "proof": [node.hex() for node in tree.inclusion_proof(index, head.size)],
            "head": head_json(head, jws),
        }

    def consistency(self, first: int, second: int | None) -> dict[str, Any]:
        """Proof that the signed head of ``first`` is a prefix of the one of ``second``."""
        new, new_jws = self._head(second)
        if first > new.size:
            raise InvalidRequestError(
                f"first ({first}) must not be larger than second ({new.size})"
            )
        old, old_jws = self._head(first)
        tree = MerkleTree(self._store.leaves(0, new.size))
        proof = tree.consistency_proof(old.size, new.size)
        return {
            "first": head_json(old, old_jws),
            "second": head_json(new, new_jws),
            "proof": [node.hex() for node in proof],
        }


def _rough(since: float | None, until: float | None) -> tuple[float | None, float | None]:
    """The window for SQL on the float ``time`` column, a millisecond wider on each side.

    The record's ``time_us`` (what it commits to) is checked exactly by ``_in_window``.
    """
    return (
        None if since is None else since - 0.001,
        None if until is None else until + 0.001,
    )


def _in_window(record: dict[str, Any], since: float | None, until: float | None) -> bool:
    """``since <= time < until`` on the record's integer microseconds."""
    moment = record.get("time_us")
    if not isinstance(moment, int):
        return since is None and until is None
    if since is not None and moment < time_us(since):
        return False
    return until is None or moment < time_us(until)


def _decoded(index: int, data: str) -> dict[str, Any]:
    """A stored record; one that is not a JSON object was changed outside the service."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise StorageError(
            f"audit record {index} is not a JSON object: it was changed outside the service "
            "(export the log and verify it)"
        )
    return record


def _latest_jwk(policy: KeyPolicy) -> jose.PublicJwk:
    version = policy.versions.get(policy.latest_version)
    if version is None or version.state is not VersionState.ACTIVE or version.public_key is None:
        raise StorageError("the audit signing key has no active version")
    try:
        return jose.ec_jwk_from_der(version.public_key)
    except InvalidRequestError as exc:
        raise StorageError("the audit signing key is not an EC P-256 key") from exc
