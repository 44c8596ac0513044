"""Audit log export, and an offline verifier that names the first thing wrong with one.

The service keeps its audit records in a Merkle tree (``kms.merkle``) and signs the tree head
from time to time. An export hands an auditor the records, the signed heads and, for each
record, its inclusion proof, so that the auditor, with nothing but the log's public key, can
tell whether any record was edited, removed, inserted or reordered, whether the log was cut
short, and whether it still extends the head the auditor kept from the last export.

Format, version 1: JSON lines, each exactly ``canonical_json`` of its object (``kms.canonical``;
a line in any other spelling is refused, so an export has one byte form and no parser can read
a record differently from the one that hashed it), joined by ``\\n``::

    {"kid":"audit-1","public_key":{"crv":"P-256","kty":"EC","x":"…","y":"…"},"type":"export","version":1}
    {"index":0,"proof":["9f3c…",…],"record":{"op":"decrypt",…},"type":"record"}
    …
    {"index":9,"proof":[…],"record":{…},"type":"record"}
    {"jws":"eyJ…","root_hash":"5dc9…","size":10,"timestamp_ms":1750000000000,"type":"head"}
    {"index":10,"proof":[…],"record":{…},"type":"record"}
    …

* The header comes first. Records follow in index order from 0, each record's leaf being
  ``leaf_hash(canonical_json(record))``.
* A signed tree head is written directly after the record that completes it (a head of size
  ``s`` follows record ``s - 1``; a head of size 0 follows the header), so a reader sees each
  head as soon as it can be checked. Head sizes never decrease; nor do their timestamps.
* A record's ``proof`` is its inclusion proof (hex) against the *first* head whose size covers
  it. Records after the last head have no ``proof``: they are reported as a warning, not an
  error, since a live log always has a few records its next head has not signed yet; nothing
  vouches for them, and the auditor should treat them as such. A record that carries a proof
  no head in the export covers is an error: its head was removed.
* A head covering more records than the export holds means the export was truncated (an
  error). An export cut right after a head reads as a shorter, valid log; only a head the
  auditor kept from before (``previous_head``) shows that records are missing.
* Blank lines are skipped, so a final newline is harmless; ``\r\n`` endings are accepted.
* A head's signature is a compact JWS (ES256 or EdDSA, ``kms.jose``) whose payload is the
  head's claims ``{"root_hash", "size", "timestamp_ms"}`` and whose protected header carries
  ``"typ": "ekms-sth+jwt"``. The typed header is the domain separation (RFC 8725 section 3.11):
  it is part of what is signed, so no other signature the key makes can pass for a tree head.

The verifier takes the key from the export itself, which proves nothing on its own: whoever
rewrites the log can re-sign it with a key of their own. An auditor must pin the log's key,
obtained out of band (from the key ceremony record), with ``trusted_key``, and should keep the
newest head line of each export to pass as ``previous_head`` next time: only that catches an
export cut short at a head boundary or a log rewritten from some point on.

The verifier reports the first problem, checking in an order that blames the most specific
thing: the header and key, then the record indexes, the heads' signatures and order, each
record against its head, truncation, each head's root recomputed from the records (which also
makes the heads consistent with one another), the previous head, and last the heads' places.
Everything here is pure: the caller reads the file and passes its lines or bytes.
"""

from __future__ import annotations

import bisect
import hmac
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from kms.canonical import MAX_SAFE_INTEGER, canonical_json
from kms.errors import AuthenticationError, InvalidRequestError
from kms.jose import encode_jws, parse_jws, parse_public_jwk, verify_jws
from kms.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    MerkleTree,
    leaf_hash,
    verify_inclusion,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from kms.jose import PublicJwk

EXPORT_VERSION = 1
TREE_HEAD_TYPE = "ekms-sth+jwt"
MAX_LINE_BYTES = 1 << 20  # an audit record is a few hundred bytes; this bounds a hostile line

_MAX_KID_LENGTH = 128
_MAX_INCLUSION_PROOF = 64
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_HEADER_FIELDS = frozenset({"type", "version", "public_key", "kid"})
_RECORD_FIELDS = frozenset({"type", "index", "record", "proof"})
_HEAD_FIELDS = frozenset({"type", "size", "root_hash", "timestamp_ms", "jws"})


# --- tree heads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeHead:
    """What the log commits to at one moment: its size and root, and when it was signed."""

    size: int
    root_hash: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        if not _is_uint(self.size) or not _is_uint(self.timestamp_ms):
            raise InvalidRequestError("tree head size and timestamp must be integers >= 0")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise InvalidRequestError(f"tree head root must be {HASH_SIZE} bytes")

    def claims(self) -> dict[str, Any]:
        return {
            "root_hash": self.root_hash.hex(),
            "size": self.size,
            "timestamp_ms": self.timestamp_ms,
        }


def sign_tree_head(head: TreeHead, sign: Callable[[bytes], bytes], *, alg: str, kid: str) -> str:
    """The head's JWS; ``sign`` returns a raw 64-byte signature, e.g. from the HSM."""
    return encode_jws({"alg": alg, "kid": kid, "typ": TREE_HEAD_TYPE}, head.claims(), sign)


def _head_problem(
    head: TreeHead, token: str, key: PublicJwk, kid: str, *, key_name: str = "the export key"
) -> str | None:
    """Why ``token`` is not this head's signature by ``key``, or None if it is."""
    try:
        jws = parse_jws(token)
    except AuthenticationError as exc:
        return f"its JWS is malformed ({exc.reason})"
    if jws.header.get("typ") != TREE_HEAD_TYPE:
        return f'its JWS is not a tree head signature (typ must be "{TREE_HEAD_TYPE}")'
    try:
        verify_jws(jws, key)
    except AuthenticationError as exc:
        return f"signature does not verify with {key_name} ({exc.reason})"
    if "kid" in jws.header and jws.header["kid"] != kid:
        return f"its JWS names another key than {key_name}'s kid"
    expected = head.claims()
    differ = sorted(
        name
        for name in set(expected).union(jws.claims)
        if not _same(jws.claims.get(name), expected.get(name))
    )
    if differ:
        return f"the head line does not match its signed payload ({', '.join(differ)})"
    return None


def verify_tree_head(
    value: object, key: PublicJwk, *, key_name: str = "the log's key"
) -> tuple[TreeHead, str]:
    """Another log's signed head, checked as an export's heads are, against that log's key.

    Sites record each other's heads to reconcile their logs (ADR 0012, ``kms.sites``).
    ``value`` is a head line, as an export or ``POST /v1/ekms/audit/tree-head`` writes it, or
    the bare JWS, whose payload is the head. Anything wrong is the caller's input (400).
    """
    if isinstance(value, str):
        try:
            claims = parse_jws(value).claims
        except AuthenticationError as exc:
            raise InvalidRequestError(f"the tree head's JWS is malformed ({exc.reason})") from None
        value = {**claims, "type": "head", "jws": value}
    try:
        head, token = _parse_head(value)
    except _MalformedError as exc:
        raise InvalidRequestError(f"malformed tree head: {exc.message}") from None
    problem = _head_problem(head, token, key, key.thumbprint, key_name=key_name)
    if problem is not None:
        raise InvalidRequestError(f"tree head refused: {problem}")
    return head, token


# --- building an export ---------------------------------------------------------------------


def build_export(
    records: Sequence[Mapping[str, Any]],
    heads_with_jws: Sequence[tuple[TreeHead, str]],
    public_jwk: Mapping[str, Any],
    *,
    kid: str | None = None,
    check: bool = True,
    leaves: Sequence[bytes] | None = None,
) -> list[bytes]:
    """The export's lines, without line endings. ``records[i]`` is the record at index i.

    Every head is checked against the records and its signature before anything is written,
    so the service never hands out an export its own verifier would refuse. ``kid`` defaults
    to the key's RFC 7638 thumbprint.

    ``check=False`` skips those checks, for a log whose stored records no longer match its
    signed heads: the export then shows the auditor what is stored, and the verifier names the
    first record that does not match. Heads that cover more records than given are written at
    the end. ``leaves``, the leaf hashes kept from when the records were written, are what the
    proofs are then computed from: proofs from the changed records themselves would make the
    first record under the same head fail instead of the changed one.
    """
    key = parse_public_jwk(public_jwk)
    kid = key.thumbprint if kid is None else kid
    if not _is_kid(kid):
        raise InvalidRequestError(f"kid must be a string of 1 to {_MAX_KID_LENGTH} characters")
    tree = MerkleTree(_leaf(i, record) for i, record in enumerate(records))
    heads = list(heads_with_jws)
    if check:
        _check_heads_to_export(heads, tree, key, kid)
    if leaves is not None:
        if len(leaves) != tree.size:
            raise InvalidRequestError("give one leaf hash per record")
        tree = MerkleTree(leaves)

    lines = [
        canonical_json(
            {"type": "export", "version": EXPORT_VERSION, "public_key": key.to_json(), "kid": kid}
        )
    ]
    next_head = _write_heads(lines, heads, 0, 0)
    for index, record in enumerate(records):
        line: dict[str, Any] = {"type": "record", "index": index, "record": record}
        # The first head not yet written is the first covering index (when heads are in order).
        if next_head < len(heads) and index < heads[next_head][0].size <= tree.size:
            proof = tree.inclusion_proof(index, heads[next_head][0].size)
            line["proof"] = [node.hex() for node in proof]
        lines.append(canonical_json(line))
        next_head = _write_heads(lines, heads, next_head, index + 1)
    lines.extend(canonical_json(_head_line(*head)) for head in heads[next_head:])  # unchecked only
    return lines


def _leaf(index: int, record: object) -> bytes:
    if not isinstance(record, dict):
        raise InvalidRequestError(f"record {index} must be a JSON object")
    try:
        return leaf_hash(canonical_json(record))
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"record {index}: {exc}") from None


def _check_heads_to_export(
    heads: list[tuple[TreeHead, str]], tree: MerkleTree, key: PublicJwk, kid: str
) -> None:
    previous = TreeHead(0, EMPTY_ROOT, 0)
    for number, (head, token) in enumerate(heads, 1):
        if head.size < previous.size or head.timestamp_ms < previous.timestamp_ms:
            raise InvalidRequestError(f"signed head {number}: heads must be in log order")
        if head.size > tree.size:
            raise InvalidRequestError(f"signed head {number} covers more than the records given")
        if not hmac.compare_digest(tree.root(head.size), head.root_hash):
            raise InvalidRequestError(f"signed head {number}: root does not match the records")
        problem = _head_problem(head, token, key, kid)
        if problem is not None:
            raise InvalidRequestError(f"signed head {number}: {problem}")
        previous = head


def _write_heads(
    lines: list[bytes], heads: list[tuple[TreeHead, str]], start: int, size: int
) -> int:
    """Write the heads of exactly ``size`` from ``start``; return the first one not written."""
    while start < len(heads) and heads[start][0].size == size:
        lines.append(canonical_json(_head_line(*heads[start])))
        start += 1
    return start


def _head_line(head: TreeHead, token: str) -> dict[str, Any]:
    return {"type": "head", **head.claims(), "jws": token}


# --- the verifier's report ------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """The first problem found, with where it is: a record index, a head number, a line."""

    message: str
    line: int | None = None  # 1-based line of the export
    record: int | None = None  # the record's index in the log
    head: int | None = None  # 1-based, in the order heads appear in the export

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    heads: int
    first_error: Failure | None = None
    warnings: tuple[str, ...] = ()


# --- parsing ----------------------------------------------------------------------------------


class _MalformedError(Exception):
    def __init__(self, message: str, *, record: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.record = record


@dataclass(frozen=True)
class _Header:
    line: int
    key: PublicJwk
    kid: str


@dataclass(frozen=True)
class _Record:
    line: int
    index: int
    record: dict[str, Any]
    proof: tuple[bytes, ...] | None


@dataclass(frozen=True)
class _Head:
    line: int
    number: int
    head: TreeHead
    jws: str
    after: int  # how many record lines come before it


@dataclass(frozen=True)
class _Export:
    header: _Header
    records: list[_Record]
    heads: list[_Head]


class _Parser:
    """Reads lines in order; a line that cannot be read raises ``_MalformedError``."""

    def __init__(self) -> None:
        self.header: _Header | None = None
        self.records: list[_Record] = []
        self.heads: list[_Head] = []

    def feed(self, number: int, raw: object) -> None:
        text = _line_bytes(raw)
        if not text:
            return  # blank lines carry nothing; a final newline leaves one
        obj = _json_line(text)
        kind = obj.get("type")
        if self.header is None:
            self.header = _parse_header(obj, number)
        elif kind == "record":
            self.records.append(_parse_record(obj, number))
        elif kind == "head":
            head, token = _parse_head(obj)
            self.heads.append(_Head(number, len(self.heads) + 1, head, token, len(self.records)))
        elif kind == "export":
            raise _MalformedError("a second export header")
        else:
            raise _MalformedError("type must be record or head")


def _parse(lines: Iterable[object]) -> _Export | Failure:
    parser = _Parser()
    for number, raw in enumerate(lines, 1):
        try:
            parser.feed(number, raw)
        except _MalformedError as exc:
            where = (
                f"line {number}" if exc.record is None else f"line {number} (record {exc.record})"
            )
            return Failure(f"{where}: {exc.message}", line=number, record=exc.record)
    if parser.header is None:
        return Failure("the export is empty: it has no header line")
    return _Export(parser.header, parser.records, parser.heads)


def _line_bytes(raw: object) -> bytes:
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise _MalformedError("not valid Unicode") from None
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _MalformedError("not a line of text")
    text = bytes(raw)
    text = text.removesuffix(b"\n").removesuffix(b"\r")
    if len(text) > MAX_LINE_BYTES:
        raise _MalformedError(f"longer than {MAX_LINE_BYTES} bytes")
    return text


def _json_line(text: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _MalformedError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise _MalformedError("not a JSON object")
    try:
        canonical = canonical_json(obj)
    except InvalidRequestError as exc:
        raise _MalformedError(str(exc)) from None
    if canonical != text:
        raise _MalformedError(
            "not in canonical JSON form (keys sorted, no whitespace, minimal escapes)"
        )
    return obj


def _parse_header(obj: dict[str, Any], line: int) -> _Header:
    if obj.get("type") != "export":
        raise _MalformedError('the export must start with its header ("type": "export")')
    _check_fields(obj, _HEADER_FIELDS, _HEADER_FIELDS)
    version = obj["version"]
    if type(version) is not int or version != EXPORT_VERSION:
        raise _MalformedError(f"unsupported export version (this verifier reads {EXPORT_VERSION})")
    try:
        key = parse_public_jwk(obj["public_key"])
    except InvalidRequestError as exc:
        raise _MalformedError(f"public_key: {exc}") from None
    if not _is_kid(obj["kid"]):
        raise _MalformedError(f"kid must be a string of 1 to {_MAX_KID_LENGTH} characters")
    return _Header(line, key, obj["kid"])


def _parse_record(obj: dict[str, Any], line: int) -> _Record:
    _check_fields(obj, _RECORD_FIELDS, _RECORD_FIELDS - {"proof"})
    index = obj["index"]
    if not _is_uint(index):
        raise _MalformedError("index must be an integer >= 0")
    if not isinstance(obj["record"], dict):
        raise _MalformedError("record must be a JSON object", record=index)
    proof = None
    if "proof" in obj:
        nodes = obj["proof"]
        if not isinstance(nodes, list) or len(nodes) > _MAX_INCLUSION_PROOF:
            raise _MalformedError(
                f"proof must be a list of at most {_MAX_INCLUSION_PROOF} hashes", record=index
            )
        proof = tuple(_hash(node, "proof", index) for node in nodes)
    return _Record(line, index, obj["record"], proof)


def _parse_head(obj: object) -> tuple[TreeHead, str]:
    if not isinstance(obj, dict) or obj.get("type") != "head":
        raise _MalformedError('a head must be a JSON object with "type": "head"')
    _check_fields(obj, _HEAD_FIELDS, _HEAD_FIELDS)
    size, timestamp, token = obj["size"], obj["timestamp_ms"], obj["jws"]
    if not _is_uint(size) or not _is_uint(timestamp):
        raise _MalformedError("size and timestamp_ms must be integers >= 0")
    if not isinstance(token, str):
        raise _MalformedError("jws must be a string")
    return TreeHead(size, _hash(obj["root_hash"], "root_hash"), timestamp), token


def _check_fields(obj: dict[str, Any], allowed: frozenset[str], required: frozenset[str]) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise _MalformedError(f"unknown field {min(unknown)!r}")
    missing = required - set(obj)
    if missing:
        raise _MalformedError(f"missing field {min(missing)!r}")


def _hash(value: object, name: str, record: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX_HASH.fullmatch(value):
        raise _MalformedError(f"{name} must hold 64 lowercase hex digits per hash", record=record)
    return bytes.fromhex(value)


# --- verifying --------------------------------------------------------------------------------


def verify_export(
    lines: bytes | str | Iterable[bytes | str],
    *,
    trusted_key: Mapping[str, Any] | None = None,
    previous_head: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check an export; never raises on what the export or ``previous_head`` contain.

    ``lines`` is the export's bytes or text, or its lines. ``trusted_key`` is the log's public
    JWK obtained out of band; without it the signatures are only checked against the key the
    export brings along. ``previous_head`` is a head line kept from an earlier export.
    """
    if isinstance(lines, (bytes, bytearray)):
        lines = bytes(lines).split(b"\n")
    elif isinstance(lines, str):
        lines = lines.split("\n")  # not splitlines(): canonical JSON keeps U+2028 unescaped
    parsed = _parse(lines)
    if isinstance(parsed, Failure):
        return VerifyReport(ok=False, records=0, heads=0, first_error=parsed)
    warnings: list[str] = []
    failure = _verify(parsed, trusted_key, previous_head, warnings)
    return VerifyReport(
        ok=failure is None,
        records=len(parsed.records),
        heads=len(parsed.heads),
        first_error=failure,
        warnings=tuple(warnings),
    )


def _verify(
    export: _Export,
    trusted_key: Mapping[str, Any] | None,
    previous_head: Mapping[str, Any] | None,
    warnings: list[str],
) -> Failure | None:
    """The checks in an order that blames the most specific thing: a record before a head."""
    header = export.header
    failure = (
        _check_key(header, trusted_key, warnings)
        or _check_indexes(export.records)
        or _check_heads(export.heads, header)
    )
    if failure is not None:
        return failure
    previous: TreeHead | None = None
    if previous_head is not None:
        checked = _previous_head(previous_head, header)
        if isinstance(checked, Failure):
            return checked
        previous = checked
    roots, failure = _check_records(export, previous)
    failure = (
        failure
        or _check_truncation(export)
        or _check_roots(export.heads, roots)
        or _check_previous(previous, roots, len(export.records))
        or _check_placement(export.heads)
    )
    if failure is None:
        _warn_uncovered(export, previous, warnings)
    return failure


def _warn_uncovered(export: _Export, previous: TreeHead | None, warnings: list[str]) -> None:
    covered = max(export.heads[-1].head.size, previous.size if previous else 0)
    count = len(export.records)
    if count > covered:
        warnings.append(
            f"records {covered} to {count - 1} ({count - covered}) are not yet covered by a "
            "signed head: nothing vouches for their content"
        )


def _check_key(
    header: _Header, trusted_key: Mapping[str, Any] | None, warnings: list[str]
) -> Failure | None:
    if trusted_key is None:
        warnings.append(
            "no trusted key given: the signatures were checked only against the key the export "
            "carries, which whoever rewrote the log could have replaced; pin the log's key"
        )
        return None
    try:
        trusted = parse_public_jwk(trusted_key)
    except InvalidRequestError as exc:
        return Failure(f"the trusted key is not a valid public JWK: {exc}")
    if not hmac.compare_digest(header.key.thumbprint.encode(), trusted.thumbprint.encode()):
        return Failure(
            f"the export's public key (thumbprint {header.key.thumbprint}) is not the trusted key "
            f"(thumbprint {trusted.thumbprint}): its signatures prove nothing",
            line=header.line,
        )
    return None


def _check_indexes(records: list[_Record]) -> Failure | None:
    first_line: dict[int, int] = {}
    for record in records:
        first_line.setdefault(record.index, record.line)
    for expected, record in enumerate(records):
        index, line = record.index, record.line
        if index == expected:
            continue
        if index < expected:
            return Failure(
                f"record {index} duplicated: lines {first_line[index]} and {line}",
                line=line,
                record=index,
            )
        if expected in first_line:
            return Failure(
                f"records out of order: line {line} holds record {index} where record "
                f"{expected} was expected (record {expected} is at line {first_line[expected]})",
                line=line,
                record=expected,
            )
        jump = (
            f"index jumps from {expected - 1} to {index}"
            if expected
            else f"export starts at {index}"
        )
        return Failure(
            f"record {expected} missing: {jump} (line {line})", line=line, record=expected
        )
    return None


def _check_heads(heads: list[_Head], header: _Header) -> Failure | None:
    if not heads:
        return Failure("the export has no signed tree head, so nothing in it is authenticated")
    for head in heads:
        problem = _head_problem(head.head, head.jws, header.key, header.kid)
        if problem is not None:
            return _head_failure(head, problem)
    return _check_head_order(heads)


def _check_head_order(heads: list[_Head]) -> Failure | None:
    for earlier, later in itertools.pairwise(heads):
        if later.head.size < earlier.head.size:
            return _head_failure(
                later,
                f"size {later.head.size} is smaller than signed head {earlier.number}'s "
                f"({earlier.head.size}): heads must appear in log order",
            )
        if later.head.timestamp_ms < earlier.head.timestamp_ms:
            return _head_failure(
                later, f"its timestamp is earlier than signed head {earlier.number}'s"
            )
    return None


def _previous_head(obj: object, header: _Header) -> TreeHead | Failure:
    try:
        head, token = _parse_head(dict(obj) if isinstance(obj, Mapping) else obj)
    except _MalformedError as exc:
        return Failure(f"previous head: {exc.message}")
    problem = _head_problem(head, token, header.key, header.kid)
    if problem is not None:
        return Failure(f"previous head: {problem}")
    return head


def _check_records(
    export: _Export, previous: TreeHead | None
) -> tuple[dict[int, bytes], Failure | None]:
    """Check each record against the first head covering it; collect the roots heads need."""
    sizes = [head.head.size for head in export.heads]
    wanted = set(sizes) | ({previous.size} if previous else set())
    roots = {0: EMPTY_ROOT}
    compact = CompactRange()
    for record in export.records:
        index = record.index
        leaf = leaf_hash(canonical_json(record.record))  # canonical: its line was
        covering = bisect.bisect_right(sizes, index)
        if covering < len(sizes):
            head = export.heads[covering]
            failure = _check_proof(record, leaf, head)
            if failure is not None:
                return roots, failure
        elif record.proof is not None:
            return roots, _record_failure(
                record,
                "carries an inclusion proof, but no signed head in the export covers it: the head "
                "it was proved against is missing (export cut short?)",
            )
        compact.append(leaf)
        if compact.size in wanted:
            roots[compact.size] = compact.root()
    return roots, None


def _check_proof(record: _Record, leaf: bytes, head: _Head) -> Failure | None:
    if record.proof is None:
        return _record_failure(
            record, f"has no inclusion proof, but signed head {head.number} covers it"
        )
    if not verify_inclusion(leaf, record.index, head.head.size, record.proof, head.head.root_hash):
        return _record_failure(
            record,
            f"content does not match its inclusion proof against signed head {head.number} "
            "(edited, reordered or replaced)",
        )
    return None


def _check_truncation(export: _Export) -> Failure | None:
    count = len(export.records)
    for head in export.heads:
        if head.head.size > count:
            return _head_failure(
                head,
                f"log truncated: signed head {head.number} covers {head.head.size} records, "
                f"export has {count}",
                prefix=False,
            )
    return None


def _check_roots(heads: list[_Head], roots: dict[int, bytes]) -> Failure | None:
    for head in heads:
        if not hmac.compare_digest(roots[head.head.size], head.head.root_hash):
            return _head_failure(
                head,
                f"its root does not match the first {head.head.size} records "
                "(records edited, inserted, removed or reordered)",
            )
    return None


def _check_previous(
    previous: TreeHead | None, roots: dict[int, bytes], count: int
) -> Failure | None:
    if previous is None:
        return None
    if previous.size > count:
        return Failure(
            f"log truncated or rolled back: the previous signed head covers {previous.size} "
            f"records, this export has {count}"
        )
    if not hmac.compare_digest(roots[previous.size], previous.root_hash):
        return Failure(
            f"the previous signed head (size {previous.size}) is not consistent with this export: "
            f"the first {previous.size} records have another root (history rewritten or forked)"
        )
    return None


def _check_placement(heads: list[_Head]) -> Failure | None:
    """Last, since placement means nothing for security: a tampered export names its record."""
    for head in heads:
        if head.after != head.head.size:
            follows = "the header" if head.head.size == 0 else f"record {head.head.size - 1}"
            return _head_failure(head, f"is out of place: it must directly follow {follows}")
    return None


def _head_failure(head: _Head, problem: str, *, prefix: bool = True) -> Failure:
    message = f"signed head {head.number}: {problem}" if prefix else problem
    return Failure(message, line=head.line, head=head.number)


def _record_failure(record: _Record, problem: str) -> Failure:
    return Failure(f"record {record.index}: {problem}", line=record.line, record=record.index)


# --- small helpers ------------------------------------------------------------------------------


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_SAFE_INTEGER


def _is_kid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_KID_LENGTH


def _same(a: object, b: object) -> bool:
    """Equal and of one type, so that ``true`` never stands in for ``1``."""
    return type(a) is type(b) and a == b
