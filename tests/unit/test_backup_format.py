"""The backup archive format with no service: paths, manifest parsing, commitments, signatures.

Signatures are made here with keys of the test's own, the way the HSM makes them (ECDSA P-256
over a prehashed digest, DER; Ed25519 over the digest as the message).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import posixpath
import threading
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given
from hypothesis import strategies as st

from api.backup.aead import CountingWriter, StreamCipher, tink_error
from api.backup.archive import (
    STATE_DIR,
    Entry,
    IntegrityError,
    Manifest,
    Signature,
    UsageError,
    associated_data,
    check_signing_key,
    check_tree,
    commitment_matches,
    key_commitment,
    parse_manifest,
    parse_signature,
    sign_request,
    validate_path,
    verify_signature,
)
from api.backup.progress import render
from api.backup.restore import _Capacity, _Hasher
from api.backup.work import MAX_WORKERS, check_workers
from kms.canonical import canonical_json

ARCHIVE_ID = "0123456789abcdef0123456789abcdef"


def entry(index: int, path: str, size: int = 10) -> Entry:
    return Entry(
        index=index,
        path=path,
        size=size,
        sha256=hashlib.sha256(path.encode()).hexdigest(),
        ciphertext_size=size + 56,
        wrapped_key="ekms:v1:" + base64.b64encode(os.urandom(60)).decode(),
        key_commitment="ab" * 32,
    )


def manifest(*paths: str) -> Manifest:
    return Manifest(
        archive_id=ARCHIVE_ID,
        dataset="laws",
        site="embassy-1",
        writer="backup-writer",
        created_at=1_750_000_000,
        entries=tuple(entry(n, p) for n, p in enumerate(paths or ("a.txt", "dir/b.bin"))),
    )


def edited(m: Manifest, change: Any) -> bytes:
    obj = m.to_json()
    change(obj)
    # Not canonical_json: some changes are what canonical JSON itself refuses (a float).
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["a", "a/b/c.pdf", "tähtis määrus.txt", ".hidden", "a/.ekms-restore", "x" * 255, "a..b"],
)
def test_valid_paths(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "non-empty"),
        ("/etc/passwd", "absolute"),
        ("..", "'..'"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/./b", "'.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "control"),
        ("a\x1b[2Jb", "control"),
        ("a\nb", "control"),
        (f"{STATE_DIR}/journal", "state directory"),
        (STATE_DIR, "state directory"),
        ("x" * 256, "longer than 255"),
        ("/".join(["x" * 200] * 21), "longer than 4096"),
        ("\ud800", "Unicode"),
    ],
)
def test_invalid_paths(path: str, problem: str) -> None:
    with pytest.raises(IntegrityError, match=problem):
        validate_path(path)


def test_non_strings_are_refused() -> None:
    for value in (None, 3, b"a", ["a"]):
        with pytest.raises(IntegrityError):
            validate_path(value)


@given(st.text(min_size=1, max_size=40, alphabet=st.sampled_from("ab./\\\x00é ")))
def test_an_accepted_path_never_leaves_the_root(path: str) -> None:
    try:
        validate_path(path)
    except IntegrityError:
        return
    joined = posixpath.normpath(posixpath.join("/restore/root", path))
    assert joined.startswith("/restore/root/")
    assert posixpath.relpath(joined, "/restore/root") == path


def test_tree_rules() -> None:
    check_tree(["a", "b/c", "b/d"])
    with pytest.raises(IntegrityError, match="twice"):
        check_tree(["a", "a"])
    with pytest.raises(IntegrityError, match="both a file and a directory"):
        check_tree(["a", "a/b"])


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    m = manifest("z", "a/b", "ä")
    raw = m.canonical()
    assert parse_manifest(raw) == m
    assert raw == canonical_json(json.loads(raw))
    obj = json.loads(raw)
    assert obj["totals"] == {"objects": 3, "bytes": 30}
    assert [o["file"] for o in obj["objects"]] == [
        "objects/00000000",
        "objects/00000001",
        "objects/00000002",
    ]
    assert obj["objects"][1]["context"] == {
        "archive": ARCHIVE_ID,
        "dataset": "laws",
        "object": "a/b",
        "site": "embassy-1",
    }
    assert m.context(m.entries[1]) == canonical_json(obj["objects"][1]["context"])


def test_empty_manifest() -> None:
    m = replace(manifest(), entries=())
    assert parse_manifest(m.canonical()).entries == ()


def _set(path: list[Any], value: Any) -> Any:
    def change(obj: Any) -> None:
        for part in path[:-1]:
            obj = obj[part]
        obj[path[-1]] = value

    return change


def _delete(path: list[Any]) -> Any:
    def change(obj: Any) -> None:
        for part in path[:-1]:
            obj = obj[part]
        del obj[path[-1]]

    return change


def _duplicate(obj: Any) -> None:
    obj["objects"][1]["path"] = obj["objects"][0]["path"]
    obj["objects"][1]["context"]["object"] = obj["objects"][0]["path"]


def _swap(obj: Any) -> None:
    obj["objects"][0], obj["objects"][1] = obj["objects"][1], obj["objects"][0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_set(["format"], "embassy-kms/backup/v0"), "format"),
        (_set(["aead"], "aes-gcm-homemade"), "AEAD"),
        (_set(["archive_id"], "XYZ"), "archive_id"),
        (_set(["dataset"], "../laws"), "dataset"),
        (_set(["site"], "a b"), "site"),
        (_set(["writer"], "Writer!"), "writer"),
        (_set(["created_at"], -1), "created_at"),
        (_set(["extra"], 1), "unknown field 'extra'"),
        (_delete(["totals"]), "lacks 'totals'"),
        (_set(["totals", "bytes"], 21), "totals"),
        (_swap, "reordered"),
        (_set(["objects", 0, "index"], value=True), "reordered"),
        (_duplicate, "twice"),
        (_set(["objects", 0, "path"], "../x"), "'..'"),
        (_set(["objects", 0, "size"], 1.5), "refuses"),
        (_set(["objects", 0, "size"], -1), "size"),
        (_set(["objects", 0, "ciphertext_size"], 10), "ciphertext_size"),
        (_set(["objects", 0, "sha256"], "AB" * 32), "sha256"),
        (_set(["objects", 0, "file"], "objects/00000001"), "file"),
        (_set(["objects", 0, "context", "site"], "home"), "context"),
        (_set(["objects", 0, "wrapped_key"], "vault:v1:AAAA"), "wrapped_key"),
        (_set(["objects", 0, "key_commitment"], "00"), "key_commitment"),
        (_set(["objects", 0, "unknown"], 0), "unknown field"),
        (_set(["objects"], {}), "list"),
    ],
)
def test_manifest_refusals(change: Any, problem: str) -> None:
    with pytest.raises(IntegrityError, match=problem):
        parse_manifest(edited(manifest(), change))


def test_entry_errors_name_the_object() -> None:
    with pytest.raises(IntegrityError) as caught:
        parse_manifest(edited(manifest(), _set(["objects", 1, "size"], -3)))
    assert caught.value.path == "dir/b.bin"
    assert str(caught.value).startswith("object dir/b.bin:")


def test_only_canonical_bytes_are_accepted() -> None:
    raw = manifest().canonical()
    for variant in (
        json.dumps(json.loads(raw), indent=1).encode(),
        raw + b"\n",
        b" " + raw,
        json.dumps(json.loads(raw), ensure_ascii=True, separators=(",", ":")).encode(),
    ):
        if variant == raw:
            continue
        with pytest.raises(IntegrityError, match=r"canonical|JSON"):
            parse_manifest(variant)
    for junk in (b"", b"[]", b"{", b"\xff", b"[" * 10_000):
        with pytest.raises(IntegrityError):
            parse_manifest(junk)


# --- associated data and key commitment -----------------------------------------------------------


def _aad(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "dataset": "laws",
        "site": "embassy-1",
        "index": 0,
        "path": "a",
        "size": 1,
    }
    fields.update(changes)
    archive = fields.pop("archive", ARCHIVE_ID)
    return associated_data(archive, **fields)


def test_associated_data_binds_every_field() -> None:
    base = _aad()
    for change in (
        {"archive": "f" * 32},
        {"dataset": "registry"},
        {"site": "home"},
        {"index": 1},
        {"path": "b"},
        {"size": 2},
    ):
        assert _aad(**change) != base, change


def test_key_commitment() -> None:
    key = bytearray(os.urandom(32))
    aad = _aad()
    commitment = key_commitment(key, aad)
    assert len(commitment) == 64
    assert commitment_matches(key, aad, commitment)
    assert not commitment_matches(bytearray(os.urandom(32)), aad, commitment)
    assert not commitment_matches(key, _aad(index=1), commitment)


# --- signatures -------------------------------------------------------------------------------


def _pem(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _signed(m: Manifest, key: Any, version: int = 1) -> Signature:
    digest = m.digest()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        raw = key.sign(digest)
    text = f"ekms:v{version}:{base64.b64encode(raw).decode()}"
    return Signature("backup-manifest", version, digest.hex(), text)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ecdsa-p256"),
        (ed25519.Ed25519PrivateKey.generate, "ed25519"),
    ],
)
def test_signature_round_trip_and_tampering(make: Any, kind: str) -> None:
    key = make()
    m = manifest()
    signature = parse_signature(_signed(m, key).canonical())
    verify_signature(signature, m.canonical(), _pem(key.public_key()), kind)

    other = replace(m, site="home").canonical()
    with pytest.raises(IntegrityError, match="does not match the digest"):
        verify_signature(signature, other, _pem(key.public_key()), kind)
    forged = replace(signature, manifest_sha256=hashlib.sha256(b"x").hexdigest())
    with pytest.raises(IntegrityError):
        verify_signature(forged, m.canonical(), _pem(key.public_key()), kind)
    stranger = make()
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(signature, m.canonical(), _pem(stranger.public_key()), kind)
    with pytest.raises(UsageError, match="does not match its public key"):
        verify_signature(signature, m.canonical(), _pem(key.public_key()), "aes256-gcm96")


def test_signature_file_rules() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signature = _signed(manifest(), key, version=2)
    assert parse_signature(signature.canonical()) == signature
    wrong_version = replace(signature, key_version=1).canonical()
    with pytest.raises(IntegrityError, match="named version"):
        parse_signature(wrong_version)
    with pytest.raises(IntegrityError, match="canonical"):
        parse_signature(json.dumps(signature.to_json(), indent=2).encode())
    check_signing_key(signature, "backup-manifest")
    with pytest.raises(IntegrityError, match="not the expected"):
        check_signing_key(signature, "backup-manifest-2")
    with pytest.raises(UsageError, match="backup-manifest"):
        check_signing_key(signature, "release-signer")


def test_sign_request_shapes() -> None:
    digest = hashlib.sha256(b"m").digest()
    assert sign_request(digest, "ecdsa-p256") == {
        "input": base64.b64encode(digest).decode(),
        "prehashed": True,
        "hash_algorithm": "sha2-256",
    }
    assert sign_request(digest, "ed25519") == {"input": base64.b64encode(digest).decode()}
    with pytest.raises(UsageError):
        sign_request(digest, "aes256-gcm96")


# --- the streaming AEAD ----------------------------------------------------------------------


def _encrypt(key: bytearray, plaintext: bytes, aad: bytes, tmp_fd: int) -> int:
    sink = CountingWriter(tmp_fd)
    with StreamCipher(key).encrypting(sink, aad) as stream:  # type: ignore[arg-type]
        stream.write(plaintext)
    return sink.count


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 56, 1 << 20, 3 * (1 << 20) + 7])
def test_stream_round_trip_and_binding(tmp_path: Any, size: int) -> None:
    key = bytearray(os.urandom(32))
    plaintext = os.urandom(size)
    path = tmp_path / "object"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = _encrypt(key, plaintext, _aad(), fd)
    finally:
        os.close(fd)
    ciphertext = path.read_bytes()
    assert len(ciphertext) == written > size
    with StreamCipher(key).decrypting(io.BytesIO(ciphertext), _aad()) as stream:
        assert stream.read() == plaintext
    for aad, data in ((_aad(index=1), ciphertext), (_aad(), ciphertext[:-1])):
        with (
            pytest.raises(tink_error()),
            StreamCipher(key).decrypting(io.BytesIO(data), aad) as stream,
        ):
            stream.read()


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 56, 3 * (1 << 20) + 7])
def test_plaintext_pieces_are_the_stream_and_close_the_source(tmp_path: Any, size: int) -> None:
    """The restore's path (Tink's raw stream, no BufferedReader): same bytes, same checks."""
    key = bytearray(os.urandom(32))
    plaintext = os.urandom(size)
    path = tmp_path / "object"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        _encrypt(key, plaintext, _aad(), fd)
    finally:
        os.close(fd)
    ciphertext = path.read_bytes()
    with path.open("rb", buffering=0) as source:
        pieces = list(StreamCipher(key).plaintext(source, _aad()))
        assert source.closed
    assert b"".join(pieces) == plaintext
    assert all(0 < len(p) <= 1 << 20 for p in pieces)

    # Abandoned part-way (the restore stops at a size beyond the manifest's): closed too.
    if size:
        source = io.BytesIO(ciphertext)
        pieces_iter = StreamCipher(key).plaintext(source, _aad())
        next(pieces_iter)
        pieces_iter.close()
        assert source.closed

    altered = bytearray(ciphertext)
    altered[len(altered) // 2] ^= 1
    for aad, data in (
        (_aad(index=1), ciphertext),
        (_aad(), bytes(altered)),
        (_aad(), ciphertext[:-1]),
    ):
        with pytest.raises(tink_error()):
            list(StreamCipher(key).plaintext(io.BytesIO(data), aad))


def test_stream_cipher_needs_a_256_bit_key() -> None:
    with pytest.raises(IntegrityError):
        StreamCipher(bytearray(16))
    assert "redacted" in repr(StreamCipher(bytearray(32)))


def test_progress_line() -> None:
    line = render(
        "restoring", done=512 << 20, total=1 << 30, objects=3, total_objects=10, elapsed=2.0
    )
    assert "50%" in line
    assert "3/10 files" in line
    assert "512.0 MiB/1.0 GiB" in line
    assert "268 MB/s" in line
    assert "ETA 0:00:02" in line
    assert "ETA ?" in render("x", done=0, total=0, objects=0, total_objects=0, elapsed=0.0)


# --- restore's work sharing: the hash thread and the idle workers it borrows ----------------


@pytest.mark.parametrize("switch_at", [0, 1, 5, 9])
def test_hasher_gives_the_same_digest_inline_and_in_a_thread(switch_at: int) -> None:
    chunks = [os.urandom(n * 1000 + 1) for n in range(9)]
    hasher = _Hasher()
    for n, chunk in enumerate(chunks):
        if n == switch_at:
            hasher.in_thread()
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    hasher.stop()  # a second stop (the restore's finally) is harmless
    assert not [t for t in threading.enumerate() if t.name == "ekms-restore-hash"]


def test_hasher_thread_ends_when_the_object_fails_part_way() -> None:
    """stop() in the restore's finally: a Tink error mid-object leaves no thread behind, even
    with the queue full."""
    hasher = _Hasher()
    hasher.in_thread()
    for _ in range(20):
        hasher.update(b"x" * 4096)
    hasher.stop()
    assert not [t for t in threading.enumerate() if t.name == "ekms-restore-hash"]


def test_capacity_lends_only_workers_that_will_never_get_an_object() -> None:
    busy = _Capacity(workers=2, objects=4)
    assert not busy.borrow()
    busy.give_back()  # the first two objects finish; the last two are running
    busy.give_back()
    assert not busy.borrow()
    busy.give_back()  # the third finishes: nothing left to start, its thread is idle for good
    assert busy.borrow()
    assert not busy.borrow()  # lent once, not twice

    lone = _Capacity(workers=4, objects=1)
    assert [lone.borrow() for _ in range(4)] == [True, True, True, False]
    assert not _Capacity(workers=1, objects=1).borrow()  # --workers 1 means one thread


@pytest.mark.parametrize("workers", [0, -1, MAX_WORKERS + 1])
def test_workers_out_of_range_are_refused(workers: int) -> None:
    with pytest.raises(UsageError, match="--workers must be between 1 and"):
        check_workers(workers)
    assert check_workers(MAX_WORKERS) == MAX_WORKERS
