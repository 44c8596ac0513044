from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.audit_export import (
    TREE_HEAD_TYPE,
    TreeHead,
    VerifyReport,
    build_export,
    sign_tree_head,
    verify_export,
)
from kms.canonical import canonical_json
from kms.errors import InvalidRequestError
from kms.jose import encode_jws, parse_public_jwk
from kms.merkle import MerkleTree, leaf_hash

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
KID = "audit-1"
T0 = 1_750_000_000_000
RECORD_COUNT = 50
HEAD_SIZES = (10, 25, 40, 50)
UNCOVERED_40_TO_49 = (
    "records 40 to 49 (10) are not yet covered by a signed head: nothing vouches for their content"
)


# --- helpers ----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> dict[str, str]:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }


def signer(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def make_records(count: int, tag: str = "") -> list[dict[str, Any]]:
    return [
        {
            "time_us": (T0 + i) * 1000,
            "request_id": f"req-{tag}{i:04d}",
            "operation": "transit/decrypt" if i % 3 else "sys/unseal",
            "decision": "deny" if i % 7 == 0 else "allow",
            "status": 403 if i % 7 == 0 else 200,
            "principal": f"tool-{i % 4}",
            "details": {"key": "ds-1", "version": i % 5, "note": "Grüße ✓"},
        }
        for i in range(count)
    ]


def make_heads(
    records: Sequence[dict[str, Any]],
    sizes: Sequence[int],
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = KEY,
    kid: str = KID,
) -> list[tuple[TreeHead, str]]:
    tree = MerkleTree(leaf_hash(canonical_json(r)) for r in records)
    alg = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"
    heads = []
    for n, size in enumerate(sizes):
        head = TreeHead(size, tree.root(size), T0 + 60_000 * n)
        heads.append((head, sign_tree_head(head, signer(key), alg=alg, kid=kid)))
    return heads


def export(
    records: Sequence[dict[str, Any]] | None = None,
    sizes: Sequence[int] = HEAD_SIZES,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = KEY,
) -> list[bytes]:
    records = make_records(RECORD_COUNT) if records is None else records
    return build_export(records, make_heads(records, sizes, key), jwk(key), kid=KID)


GENUINE = export()


def lines() -> list[bytes]:
    return list(GENUINE)


def parse(line: bytes) -> dict[str, Any]:
    return json.loads(line)


def dump(obj: dict[str, Any]) -> bytes:
    return canonical_json(obj)


def position(lines: list[bytes], *, record: int | None = None, head: int | None = None) -> int:
    """Where a record (by index) or a head (1-based) is, as a list position."""
    heads = 0
    for i, line in enumerate(lines):
        obj = parse(line)
        if record is not None and obj["type"] == "record" and obj["index"] == record:
            return i
        if obj["type"] == "head":
            heads += 1
            if heads == head:
                return i
    raise AssertionError("not found")


def edit(lines: list[bytes], at: int, change: Callable[[dict[str, Any]], None]) -> list[bytes]:
    obj = parse(lines[at])
    change(obj)
    lines[at] = dump(obj)
    return lines


def check(
    report: VerifyReport, message: str, *, record: int | None = None, head: int | None = None
) -> None:
    assert not report.ok
    assert report.first_error is not None
    assert message in report.first_error.message, report.first_error.message
    assert report.first_error.record == record
    assert report.first_error.head == head


def head_line(lines: list[bytes], number: int) -> dict[str, Any]:
    return parse(lines[position(lines, head=number)])


# --- genuine exports --------------------------------------------------------------------------


def test_genuine_export_verifies() -> None:
    report = verify_export(GENUINE, trusted_key=jwk(KEY))
    assert report.ok, report.first_error
    assert (report.records, report.heads) == (RECORD_COUNT, len(HEAD_SIZES))
    assert report.first_error is None
    assert report.warnings == ()


def test_format() -> None:
    header = parse(GENUINE[0])
    assert header == {"type": "export", "version": 1, "public_key": jwk(KEY), "kid": KID}
    record = parse(GENUINE[1])
    assert set(record) == {"type", "index", "record", "proof"}
    assert record["index"] == 0
    assert len(record["proof"]) == 4  # against the head of size 10
    head = parse(GENUINE[11])  # directly after record 9
    assert head["type"] == "head"
    assert head["size"] == 10
    header_b64 = head["jws"].split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(header_b64 + "==")) == {
        "alg": "ES256",
        "kid": KID,
        "typ": TREE_HEAD_TYPE,
    }
    assert all(line == canonical_json(parse(line)) for line in GENUINE)
    assert len(GENUINE) == 1 + RECORD_COUNT + len(HEAD_SIZES)


def test_bytes_text_and_windows_line_endings_are_accepted() -> None:
    data = b"\n".join(GENUINE) + b"\n"
    assert verify_export(data).ok
    assert verify_export(data.decode()).ok
    assert verify_export([line + b"\r\n" for line in GENUINE]).ok
    assert verify_export([line.decode() for line in GENUINE]).ok


def test_ed25519_export_verifies() -> None:
    lines = export(key=ED_KEY)
    assert verify_export(lines, trusted_key=jwk(ED_KEY)).ok
    check(verify_export(lines, trusted_key=jwk(KEY)), "is not the trusted key")


def test_without_a_trusted_key_there_is_a_warning() -> None:
    report = verify_export(GENUINE)
    assert report.ok
    assert any("no trusted key" in w for w in report.warnings)


def test_records_beyond_the_last_head_are_a_warning() -> None:
    report = verify_export(export(sizes=(10, 25, 40)), trusted_key=jwk(KEY))
    assert report.ok, report.first_error
    assert report.warnings == (UNCOVERED_40_TO_49,)


def test_heads_of_equal_size_and_of_size_zero() -> None:
    lines = export(sizes=(0, 10, 10, 50))
    assert parse(lines[1])["size"] == 0
    assert verify_export(lines, trusted_key=jwk(KEY)).ok
    empty = export(records=[], sizes=(0,))
    assert verify_export(empty, trusted_key=jwk(KEY)).ok


# --- tampering with records ---------------------------------------------------------------------


def test_edited_field() -> None:
    tampered = edit(
        lines(), position(GENUINE, record=17), lambda o: o["record"].update(decision="deny")
    )
    check(
        verify_export(tampered, trusted_key=jwk(KEY)),
        "record 17: content does not match its inclusion proof against signed head 2 "
        "(edited, reordered or replaced)",
        record=17,
    )


def test_edited_field_in_the_last_covered_record() -> None:
    tampered = edit(lines(), position(GENUINE, record=49), lambda o: o["record"].pop("details"))
    check(verify_export(tampered), "record 49: content does not match", record=49)


def test_deleted_record() -> None:
    tampered = lines()
    del tampered[position(tampered, record=17)]
    check(verify_export(tampered), "record 17 missing: index jumps from 16 to 18", record=17)


def test_deleted_first_record() -> None:
    tampered = lines()
    del tampered[position(tampered, record=0)]
    check(verify_export(tampered), "record 0 missing: export starts at 1", record=0)


def test_deleted_record_with_renumbering() -> None:
    tampered = lines()
    del tampered[position(tampered, record=17)]
    for i, line in enumerate(tampered):
        obj = parse(line)
        if obj["type"] == "record" and obj["index"] > 17:
            obj["index"] -= 1
            tampered[i] = dump(obj)
    check(verify_export(tampered), "record 17: content does not match", record=17)


def test_swapped_records() -> None:
    tampered = lines()
    a, b = position(tampered, record=17), position(tampered, record=30)
    first, second = parse(tampered[a]), parse(tampered[b])
    first["record"], second["record"] = second["record"], first["record"]
    tampered[a], tampered[b] = dump(first), dump(second)
    check(verify_export(tampered), "record 17: content does not match", record=17)


def test_swapped_lines() -> None:
    tampered = lines()
    a, b = position(tampered, record=17), position(tampered, record=30)
    tampered[a], tampered[b] = tampered[b], tampered[a]
    check(
        verify_export(tampered),
        f"records out of order: line {a + 1} holds record 30 where record 17 was expected "
        f"(record 17 is at line {b + 1})",
        record=17,
    )


def test_inserted_record_with_a_duplicate_index() -> None:
    tampered = lines()
    at = position(tampered, record=17)
    forged = parse(tampered[at])
    forged["record"]["decision"] = "allow"
    tampered.insert(at + 1, dump(forged))
    check(
        verify_export(tampered),
        f"record 17 duplicated: lines {at + 1} and {at + 2}",
        record=17,
    )


def test_inserted_record_with_renumbering() -> None:
    tampered = lines()
    at = position(tampered, record=17)
    for i, line in enumerate(tampered):
        obj = parse(line)
        if obj["type"] == "record" and obj["index"] >= 17:
            obj["index"] += 1
            tampered[i] = dump(obj)
    forged = parse(tampered[at])
    forged["index"] = 17
    forged["record"] = {"operation": "sys/rotate", "note": "never happened"}
    tampered.insert(at, dump(forged))
    check(verify_export(tampered), "record 17: content does not match", record=17)


def test_record_without_its_proof() -> None:
    tampered = edit(lines(), position(GENUINE, record=3), lambda o: o.pop("proof"))
    check(verify_export(tampered), "record 3: has no inclusion proof, but signed head 1", record=3)


def test_proof_against_the_wrong_head() -> None:
    tree = MerkleTree(leaf_hash(canonical_json(r)) for r in make_records(RECORD_COUNT))
    proof = [node.hex() for node in tree.inclusion_proof(3, 25)]  # a true proof, for head 2

    tampered = edit(lines(), position(GENUINE, record=3), lambda o: o.update(proof=proof))
    check(verify_export(tampered), "record 3: content does not match", record=3)


# --- truncation -------------------------------------------------------------------------------


def test_records_cut_from_the_tail_under_a_kept_head() -> None:
    tampered = [line for line in lines() if parse(line).get("index", -1) < 45]
    check(
        verify_export(tampered),
        "log truncated: signed head 4 covers 50 records, export has 45",
        head=4,
    )


def test_export_cut_mid_way_between_heads() -> None:
    tampered = lines()[: position(GENUINE, record=44) + 1]  # head 4 and records 45.. are gone
    check(
        verify_export(tampered),
        "record 40: carries an inclusion proof, but no signed head in the export covers it",
        record=40,
    )


def test_export_cut_at_a_head_is_caught_only_by_a_kept_head() -> None:
    tampered = lines()[: position(GENUINE, head=3) + 1]
    assert verify_export(tampered, trusted_key=jwk(KEY)).ok  # on its own, a shorter log
    kept = head_line(GENUINE, 4)
    check(
        verify_export(tampered, trusted_key=jwk(KEY), previous_head=kept),
        "log truncated or rolled back: the previous signed head covers 50 records, "
        "this export has 40",
    )


def test_no_head_at_all() -> None:
    tampered = [line for line in lines() if parse(line)["type"] != "head"]
    tampered = [edit([line], 0, lambda o: o.pop("proof", None))[0] for line in tampered]
    check(verify_export(tampered), "the export has no signed tree head")


# --- forged tree heads --------------------------------------------------------------------------


def test_head_signed_by_another_key() -> None:
    records = make_records(RECORD_COUNT)
    _, forged = make_heads(records, [25], key=OTHER_KEY)[0]
    tampered = edit(lines(), position(GENUINE, head=2), lambda o: o.update(jws=forged))
    check(
        verify_export(tampered),
        "signed head 2: signature does not verify with the export key (bad signature)",
        head=2,
    )


def test_head_with_a_changed_root() -> None:
    other = MerkleTree(leaf_hash(canonical_json(r)) for r in make_records(25, "x")).root()
    tampered = edit(lines(), position(GENUINE, head=2), lambda o: o.update(root_hash=other.hex()))
    check(
        verify_export(tampered),
        "signed head 2: the head line does not match its signed payload (root_hash)",
        head=2,
    )


def test_head_with_a_changed_size() -> None:
    tampered = edit(lines(), position(GENUINE, head=2), lambda o: o.update(size=26))
    check(
        verify_export(tampered),
        "signed head 2: the head line does not match its signed payload (size)",
        head=2,
    )


def test_head_payload_changed_without_the_key() -> None:
    def change(obj: dict[str, Any]) -> None:
        header, _, signature = obj["jws"].split(".")
        claims = {"root_hash": "00" * 32, "size": obj["size"], "timestamp_ms": obj["timestamp_ms"]}
        obj["jws"] = ".".join([header, b64(json.dumps(claims).encode()), signature])
        obj["root_hash"] = "00" * 32

    tampered = edit(lines(), position(GENUINE, head=3), change)
    check(verify_export(tampered), "signed head 3: signature does not verify", head=3)


def test_head_signed_for_another_purpose() -> None:
    head = TreeHead(25, bytes.fromhex(head_line(GENUINE, 2)["root_hash"]), T0 + 60_000)
    token = encode_jws({"alg": "ES256", "typ": "at+jwt"}, head.claims(), signer(KEY))
    tampered = edit(lines(), position(GENUINE, head=2), lambda o: o.update(jws=token))
    check(verify_export(tampered), "signed head 2: its JWS is not a tree head signature", head=2)


def test_head_naming_another_kid() -> None:
    records = make_records(RECORD_COUNT)
    _, token = make_heads(records, [25], kid="audit-2")[0]
    tampered = edit(lines(), position(GENUINE, head=2), lambda o: o.update(jws=token))
    check(verify_export(tampered), "signed head 2: its JWS names another key", head=2)


def test_log_rewritten_and_re_signed_with_another_key() -> None:
    records = make_records(RECORD_COUNT)
    records[17]["decision"] = "allow"
    forged = export(records, key=OTHER_KEY)
    assert verify_export(forged).ok  # self-consistent: only a pinned key tells
    check(
        verify_export(forged, trusted_key=jwk(KEY)),
        "the export's public key (thumbprint",
    )


def test_heads_out_of_order() -> None:
    tampered = lines()
    a, b = position(tampered, head=2), position(tampered, head=3)
    tampered[a], tampered[b] = tampered[b], tampered[a]
    check(
        verify_export(tampered),
        "signed head 3: size 25 is smaller than signed head 2's (40)",
        head=3,
    )


def test_head_out_of_place() -> None:
    tampered = lines()
    moved = tampered.pop(position(tampered, head=1))
    tampered.insert(position(tampered, record=12), moved)
    check(
        verify_export(tampered),
        "signed head 1: is out of place: it must directly follow record 9",
        head=1,
    )


# --- malformed input ------------------------------------------------------------------------------


def replace(at: int, line: bytes | str) -> Callable[[list[Any]], list[Any]]:
    def change(lines: list[Any]) -> list[Any]:
        lines[at] = line
        return lines

    return change


def edited(at: int, change: Callable[[dict[str, Any]], None]) -> Callable[[list[Any]], list[Any]]:
    return lambda lines: edit(lines, at, change)


MALFORMED: list[tuple[str, Callable[[list[Any]], list[Any]], int, str]] = [
    ("not json", replace(5, b"{not json"), 6, "line 6: not valid JSON"),
    ("array", replace(5, b"[1,2]"), 6, "line 6: not a JSON object"),
    ("invalid utf-8", replace(5, b'{"type":"record","x":"\xff"}'), 6, "line 6: not valid JSON"),
    ("lone surrogate", replace(5, '{"a":"\ud800"}'), 6, "line 6: not valid Unicode"),
    ("not text", replace(5, 12345), 6, "line 6: not a line of text"),
    ("too long", replace(5, b" " * (2**20 + 1)), 6, "line 6: longer than"),
    (
        "whitespace",
        lambda ls: [*ls[:5], ls[5].replace(b":", b": ", 1), *ls[6:]],
        6,
        "line 6: not in canonical JSON form",
    ),
    ("float", replace(5, b'{"index":4.0}'), 6, "float 4.0 is not allowed"),
    ("unknown type", replace(5, b'{"type":"note"}'), 6, "line 6: type must be record or head"),
    ("second header", lambda ls: [*ls[:5], ls[0], *ls[5:]], 6, "line 6: a second export header"),
    (
        "no header",
        lambda ls: ls[1:],
        1,
        'line 1: the export must start with its header ("type": "export")',
    ),
    ("missing field", edited(5, lambda o: o.pop("record")), 6, "line 6: missing field 'record'"),
    ("unknown field", edited(5, lambda o: o.update(extra=1)), 6, "line 6: unknown field 'extra'"),
    (
        "index as string",
        edited(5, lambda o: o.update(index="4")),
        6,
        "line 6: index must be an integer >= 0",
    ),
    (
        "negative index",
        edited(5, lambda o: o.update(index=-1)),
        6,
        "line 6: index must be an integer >= 0",
    ),
    (
        "index as bool",
        edited(1, lambda o: o.update(index=False)),
        2,
        "line 2: index must be an integer",
    ),
    (
        "record not object",
        edited(5, lambda o: o.update(record=[1])),
        6,
        "line 6 (record 4): record must be a JSON object",
    ),
    (
        "proof not list",
        edited(5, lambda o: o.update(proof="ab")),
        6,
        "line 6 (record 4): proof must be a list",
    ),
    (
        "proof too long",
        edited(5, lambda o: o.update(proof=["00" * 32] * 65)),
        6,
        "proof must be a list of at most 64",
    ),
    (
        "proof upper hex",
        edited(5, lambda o: o["proof"].__setitem__(0, o["proof"][0].upper())),
        6,
        "line 6 (record 4): proof must hold 64 lowercase hex",
    ),
    (
        "proof short hash",
        edited(5, lambda o: o["proof"].__setitem__(0, "00")),
        6,
        "proof must hold 64 lowercase hex",
    ),
    (
        "size as bool",
        edited(11, lambda o: o.update(size=True)),
        12,
        "line 12: size and timestamp_ms must be integers",
    ),
    (
        "jws not string",
        edited(11, lambda o: o.update(jws=None)),
        12,
        "line 12: jws must be a string",
    ),
    (
        "root not hex",
        edited(11, lambda o: o.update(root_hash="zz" * 32)),
        12,
        "line 12: root_hash must hold",
    ),
    (
        "version 2",
        edited(0, lambda o: o.update(version=2)),
        1,
        "line 1: unsupported export version",
    ),
    (
        "version true",
        edited(0, lambda o: o.update(version=True)),
        1,
        "line 1: unsupported export version",
    ),
    (
        "private key",
        edited(0, lambda o: o["public_key"].update(d=b64(b"x" * 32))),
        1,
        "line 1: public_key: jwk must not contain private member 'd'",
    ),
    (
        "rsa key",
        edited(0, lambda o: o.update(public_key={"kty": "RSA", "n": "AQAB", "e": "AQAB"})),
        1,
        "line 1: public_key: jwk kty must be EC",
    ),
    ("empty kid", edited(0, lambda o: o.update(kid="")), 1, "line 1: kid must be a string"),
    ("empty", lambda _: [], None, "the export is empty"),
    ("only blank lines", lambda _: [b"", b""], None, "the export is empty"),
]


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_lines(
    change: Callable[[list[Any]], list[Any]], line: int | None, message: str
) -> None:
    report = verify_export(change(lines()))
    assert not report.ok
    assert report.first_error is not None
    assert message in report.first_error.message, report.first_error.message
    assert report.first_error.line == line


def test_blank_lines_are_skipped_and_counted() -> None:
    spaced = [GENUINE[0], b"", *GENUINE[1:]]
    assert verify_export(spaced).ok
    spaced[5] = b"{"
    report = verify_export(spaced)
    assert report.first_error is not None
    assert report.first_error.line == 6


def test_malformed_head_jws() -> None:
    tampered = edit(lines(), position(GENUINE, head=1), lambda o: o.update(jws="not.a-jws"))
    check(verify_export(tampered), "signed head 1: its JWS is malformed", head=1)


def test_invalid_trusted_key_is_reported() -> None:
    report = verify_export(GENUINE, trusted_key={"kty": "EC"})
    assert report.first_error is not None
    assert report.first_error.message.startswith("the trusted key is not a valid public JWK")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_is_caught_and_never_raises(data: st.DataObject) -> None:
    tampered = lines()
    at = data.draw(st.integers(0, len(tampered) - 1))
    line = bytearray(tampered[at])
    offset = data.draw(st.integers(0, len(line) - 1))
    line[offset] = data.draw(st.integers(0, 255).filter(lambda b: b != line[offset]))
    tampered[at] = bytes(line)
    report = verify_export(b"\n".join(tampered), trusted_key=jwk(KEY))
    assert not report.ok
    assert report.first_error is not None


# --- the head an auditor kept -------------------------------------------------------------------


def test_previous_head_from_this_export() -> None:
    for number in range(1, len(HEAD_SIZES) + 1):
        kept = head_line(GENUINE, number)
        report = verify_export(GENUINE, trusted_key=jwk(KEY), previous_head=kept)
        assert report.ok, report.first_error


def test_previous_head_from_an_earlier_export() -> None:
    records = make_records(RECORD_COUNT)
    earlier = export(records[:33], sizes=(10, 33))
    kept = head_line(earlier, 2)
    report = verify_export(GENUINE, trusted_key=jwk(KEY), previous_head=kept)
    assert report.ok, report.first_error


def test_previous_head_covering_records_the_export_has_not_signed_yet() -> None:
    later = export(sizes=(10, 25))
    kept = head_line(GENUINE, 3)  # size 40
    report = verify_export(later, trusted_key=jwk(KEY), previous_head=kept)
    assert report.ok, report.first_error
    assert report.warnings == (UNCOVERED_40_TO_49,)


def test_previous_head_from_another_log() -> None:
    other = export(make_records(RECORD_COUNT, "other-"))
    kept = head_line(other, 2)
    check(
        verify_export(GENUINE, trusted_key=jwk(KEY), previous_head=kept),
        "the previous signed head (size 25) is not consistent with this export: the first 25 "
        "records have another root (history rewritten or forked)",
    )


def test_previous_head_from_a_forked_history() -> None:
    records = make_records(RECORD_COUNT)
    forked = [*records[:20], *make_records(RECORD_COUNT, "fork-")[20:]]
    kept = head_line(export(forked), 2)
    check(
        verify_export(GENUINE, trusted_key=jwk(KEY), previous_head=kept),
        "the previous signed head (size 25) is not consistent with this export",
    )
    assert verify_export(GENUINE, previous_head=head_line(export(forked), 1)).ok  # shared prefix


def test_previous_head_with_a_bad_signature() -> None:
    kept = head_line(GENUINE, 2)
    kept["timestamp_ms"] += 1
    check(
        verify_export(GENUINE, previous_head=kept),
        "previous head: the head line does not match its signed payload (timestamp_ms)",
    )
    _, forged = make_heads(make_records(RECORD_COUNT), [25], key=OTHER_KEY)[0]
    kept = {**head_line(GENUINE, 2), "jws": forged}
    check(verify_export(GENUINE, previous_head=kept), "previous head: signature does not verify")


@pytest.mark.parametrize(
    "kept",
    [[], "head", {}, {"type": "head"}, {"type": "record"}, {**head_line(GENUINE, 1), "size": "10"}],
)
def test_malformed_previous_head(kept: Any) -> None:
    report = verify_export(GENUINE, previous_head=kept)
    assert report.first_error is not None
    assert report.first_error.message.startswith("previous head: ")


# --- building -----------------------------------------------------------------------------------


def test_build_refuses_what_would_not_verify() -> None:
    records = make_records(RECORD_COUNT)
    heads = make_heads(records, HEAD_SIZES)
    with pytest.raises(InvalidRequestError, match="log order"):
        build_export(records, [heads[1], heads[0]], jwk(KEY), kid=KID)
    with pytest.raises(InvalidRequestError, match="covers more than the records"):
        build_export(records[:30], heads, jwk(KEY), kid=KID)
    with pytest.raises(InvalidRequestError, match="root does not match"):
        build_export(make_records(RECORD_COUNT, "x"), heads, jwk(KEY), kid=KID)
    with pytest.raises(InvalidRequestError, match="signature does not verify"):
        build_export(records, heads, jwk(OTHER_KEY), kid=KID)
    with pytest.raises(InvalidRequestError, match="names another key"):
        build_export(records, heads, jwk(KEY), kid="audit-2")
    with pytest.raises(InvalidRequestError, match="record 3: canonical JSON: float"):
        build_export([*records[:3], {"time": 1.5}], [], jwk(KEY))
    with pytest.raises(InvalidRequestError, match="record 0 must be a JSON object"):
        build_export([[1]], [], jwk(KEY))  # type: ignore[list-item]


def test_kid_defaults_to_the_key_thumbprint() -> None:
    records = make_records(12)
    thumbprint = parse_public_jwk(jwk(KEY)).thumbprint
    heads = make_heads(records, [12], kid=thumbprint)
    lines = build_export(records, heads, jwk(KEY))
    assert parse(lines[0])["kid"] == thumbprint
    assert verify_export(lines, trusted_key=jwk(KEY)).ok


def test_unchecked_build_shows_a_changed_record_to_the_verifier() -> None:
    records = make_records(RECORD_COUNT)
    heads = make_heads(records, HEAD_SIZES)
    records[21]["status"] = 200  # a denial turned into an allow
    records[21]["decision"] = "allow"
    with pytest.raises(InvalidRequestError, match="root does not match"):
        build_export(records, heads, jwk(KEY), kid=KID)
    kept = [leaf_hash(canonical_json(r)) for r in make_records(RECORD_COUNT)]
    lines = build_export(records, heads, jwk(KEY), kid=KID, check=False, leaves=kept)
    check(
        verify_export(lines, trusted_key=jwk(KEY)), "record 21: content does not match", record=21
    )
    # Proofs from the changed records blame the first record under the same head instead.
    lines = build_export(records, heads, jwk(KEY), kid=KID, check=False)
    check(
        verify_export(lines, trusted_key=jwk(KEY)), "record 10: content does not match", record=10
    )
    with pytest.raises(InvalidRequestError, match="one leaf hash per record"):
        build_export(records, heads, jwk(KEY), kid=KID, check=False, leaves=kept[:-1])


def test_unchecked_build_of_a_log_cut_short_names_the_truncation() -> None:
    records = make_records(RECORD_COUNT)
    heads = make_heads(records, HEAD_SIZES)
    lines = build_export(records[:45], heads, jwk(KEY), kid=KID, check=False)
    assert parse(lines[-1])["size"] == 50  # heads beyond the records go at the end
    message = "record 40: has no inclusion proof, but signed head 4 covers it"
    check(verify_export(lines, trusted_key=jwk(KEY)), message, record=40)


def test_unchecked_build_of_a_sound_log_is_the_checked_one() -> None:
    records = make_records(RECORD_COUNT)
    heads = make_heads(records, HEAD_SIZES)
    checked = build_export(records, heads, jwk(KEY), kid=KID)
    assert build_export(records, heads, jwk(KEY), kid=KID, check=False) == checked
