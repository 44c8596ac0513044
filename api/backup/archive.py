"""The backup archive format, version 1: pure, no files, no network, no clock.

An archive is a directory::

    manifest.json     canonical JSON (RFC 8785) of the manifest below
    manifest.sig      canonical JSON: which manifest key signed which manifest digest
    objects/00000000  one Tink streaming-AEAD ciphertext per object, in manifest order
    objects/00000001  ...

Everything the restore tool trusts is in the signed manifest: the archive id, dataset and site,
and for each object, in order, its path, size, SHA-256, ciphertext size, wrapped data key and
key commitment. The associated data of each object's encryption names the archive, dataset,
site, index, path and size, so an object moved to another place in this archive, or replayed
from another archive, fails to decrypt. The key commitment makes the signed manifest name
exactly one data key per object, which AES-GCM alone does not (ADR 0009).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms.canonical import canonical_json
from kms.errors import EkmsError
from kms.policy import MANIFEST_KEY_PREFIX, is_manifest_key

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

FORMAT = "embassy-kms/backup/v1"
AEAD = "tink/AES256_GCM_HKDF_1MB"  # Tink's streaming AEAD key template, 1 MiB segments
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
OBJECTS_DIR = "objects"
STATE_DIR = ".ekms-restore"  # the restore tool's own files under --to; no archive path may use it
DEFAULT_SIGNING_KEY = MANIFEST_KEY_PREFIX
DATA_KEY_BYTES = 32

MAX_MANIFEST_BYTES = 256 << 20  # about 500,000 objects
MAX_SIGNATURE_BYTES = 4096
MAX_OBJECTS = 500_000
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_OBJECT_BYTES = 2**53 - 1  # what canonical JSON holds exactly
MAX_WRAPPED_KEY_CHARS = 1024

_MANIFEST_DOMAIN = b"embassy-kms/backup/v1 manifest\n"
_AAD_DOMAIN = b"embassy-kms/backup/v1 object\n"
_COMMIT_DOMAIN = b"embassy-kms/backup/v1 key commitment\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ARCHIVE_ID = re.compile(r"[0-9a-f]{32}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRINCIPAL = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SIGNATURE = re.compile(r"ekms:v([1-9][0-9]{0,8}):([A-Za-z0-9+/]+={0,2})")
_WRAPPED = re.compile(r"ekms:v[1-9][0-9]{0,8}:[A-Za-z0-9+/]+={0,2}")


# --- errors -------------------------------------------------------------------------------


class BackupError(EkmsError):
    """A seal or restore that cannot go on. ``exit_status`` is what the CLI exits with."""

    exit_status = 2


class UsageError(BackupError):
    """The operator's input or the local files do not allow the operation (exit 2)."""


class IntegrityError(BackupError):
    """The archive is not what its signed manifest says: altered, truncated, swapped (exit 1).

    ``path`` names the object at fault, when there is one, so the operator knows which law or
    register entry to distrust.
    """

    exit_status = 1

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"object {path}: {message}" if path is not None else message)
        self.path = path


class Reason(StrEnum):
    """Why the service refuses, or would refuse, a restore: stable codes for scripts."""

    UNAUTHENTICATED = "unauthenticated"  # the tool's key or principal is not accepted
    UNKNOWN_REQUEST = "unknown-request"
    NOT_APPROVED = "not-approved"  # pending, denied or expired before a quorum approved
    REVOKED = "revoked"
    EXPIRED = "expired"  # the request's window has closed
    USES_EXHAUSTED = "uses-exhausted"
    OUT_OF_SCOPE = "out-of-scope"  # the archive's dataset is not in the request
    WRONG_SITE = "wrong-site"
    DENIED = "denied"  # refused for another reason (policy matrix, emergency ended, ...)
    SEALED = "sealed"
    SERVICE_ERROR = "service-error"


class RefusedError(BackupError):
    """The service refused (or, from what it publishes, would refuse) the restore (exit 2)."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        detail = f"{reason.value}: {message}"
        if status is not None:
            detail += f" (service answered {status}"
            detail += f", request_id {request_id})" if request_id else ")"
        super().__init__(detail)
        self.reason = reason
        self.status = status
        self.request_id = request_id


# --- paths --------------------------------------------------------------------------------


def validate_path(path: object) -> str:
    """A relative POSIX path that stays inside the restore directory, or ``IntegrityError``.

    Refused: absolute paths, empty, ``.`` and ``..`` components, backslashes, control
    characters (a name is printed in messages, and must not drive the terminal), over-long
    names, and the restore tool's own state directory.
    """
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"path {path!r} is not a non-empty string")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise IntegrityError(f"path {path!r} is not valid Unicode") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise IntegrityError(f"path {path[:60]!r}... is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise IntegrityError(f"path {path!r} is absolute")
    if "\\" in path or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in path):
        raise IntegrityError(f"path {path!r} holds a backslash or a control character")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise IntegrityError(f"path {path!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise IntegrityError(f"path {path!r} has a name longer than {MAX_COMPONENT_BYTES}")
    if parts[0] == STATE_DIR:
        raise IntegrityError(f"path {path!r} is inside the restore tool's state directory")
    return path


def check_tree(paths: Iterable[str]) -> None:
    """No duplicate paths, and no path that is both a file and another file's directory."""
    files: set[str] = set()
    parents: set[str] = set()
    for path in paths:
        if path in files:
            raise IntegrityError(f"path {path!r} appears twice")
        files.add(path)
        parts = path.split("/")
        parents.update("/".join(parts[:n]) for n in range(1, len(parts)))
    clash = sorted(files & parents)
    if clash:
        raise IntegrityError(f"path {clash[0]!r} is both a file and a directory")


# --- manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One object: what the restore tool will write, and what it must check."""

    index: int
    path: str
    size: int
    sha256: str  # of the plaintext, hex
    ciphertext_size: int
    wrapped_key: str  # the service's ciphertext of the data key, ekms:v<N>:...
    key_commitment: str  # hex, see key_commitment()

    @property
    def file(self) -> str:
        return object_file(self.index)


def object_file(index: int) -> str:
    return f"{OBJECTS_DIR}/{index:08d}"


@dataclass(frozen=True)
class Manifest:
    archive_id: str
    dataset: str
    site: str
    writer: str
    created_at: int
    entries: tuple[Entry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def context(self, entry: Entry) -> bytes:
        """The encryption context the data key was made with: dataset, site and object."""
        return context_bytes(self.archive_id, self.dataset, self.site, entry.path)

    def context_b64(self, entry: Entry) -> str:
        return base64.b64encode(self.context(entry)).decode()

    def aad(self, entry: Entry) -> bytes:
        return associated_data(
            self.archive_id,
            dataset=self.dataset,
            site=self.site,
            index=entry.index,
            path=entry.path,
            size=entry.size,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "aead": AEAD,
            "archive_id": self.archive_id,
            "dataset": self.dataset,
            "site": self.site,
            "writer": self.writer,
            "created_at": self.created_at,
            "totals": {"objects": len(self.entries), "bytes": self.total_bytes},
            "objects": [
                {
                    "index": e.index,
                    "path": e.path,
                    "size": e.size,
                    "sha256": e.sha256,
                    "file": e.file,
                    "ciphertext_size": e.ciphertext_size,
                    "wrapped_key": e.wrapped_key,
                    "context": _context_json(self.archive_id, self.dataset, self.site, e.path),
                    "key_commitment": e.key_commitment,
                }
                for e in self.entries
            ],
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    def digest(self) -> bytes:
        return manifest_digest(self.canonical())


def manifest_digest(canonical: bytes) -> bytes:
    """What the manifest key signs: SHA-256 over a domain label and the canonical manifest."""
    return hashlib.sha256(_MANIFEST_DOMAIN + canonical).digest()


def _context_json(archive_id: str, dataset: str, site: str, path: str) -> dict[str, str]:
    return {"archive": archive_id, "dataset": dataset, "object": path, "site": site}


def context_bytes(archive_id: str, dataset: str, site: str, path: str) -> bytes:
    return canonical_json(_context_json(archive_id, dataset, site, path))


def associated_data(
    archive_id: str, *, dataset: str, site: str, index: int, path: str, size: int
) -> bytes:
    """Binds an object's ciphertext to its place: this archive, dataset, site, index and path."""
    fields = {
        "archive": archive_id,
        "dataset": dataset,
        "index": index,
        "path": path,
        "site": site,
        "size": size,
    }
    return _AAD_DOMAIN + canonical_json(fields)


def key_commitment(data_key: bytes | bytearray, aad: bytes) -> str:
    """HMAC-SHA256 under the data key: the signed manifest then names exactly one key.

    Checked right after the unwrap, before any byte is decrypted: a wrapped key swapped for
    another (even one the service would unwrap) is caught by name, not by a failed tag later.
    """
    return hmac.new(bytes(data_key), _COMMIT_DOMAIN + aad, hashlib.sha256).hexdigest()


def commitment_matches(data_key: bytes | bytearray, aad: bytes, expected: str) -> bool:
    return hmac.compare_digest(key_commitment(data_key, aad), expected)


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest as stored: canonical JSON of exactly the fields above, or IntegrityError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    obj = _canonical_object(raw, "manifest")
    _fields(
        obj,
        {
            "format",
            "aead",
            "archive_id",
            "dataset",
            "site",
            "writer",
            "created_at",
            "totals",
            "objects",
        },
        "manifest",
    )
    if obj["format"] != FORMAT:
        raise IntegrityError(f"manifest format is {obj['format']!r}, not {FORMAT!r}")
    if obj["aead"] != AEAD:
        raise IntegrityError(f"manifest names AEAD {obj['aead']!r}; this tool reads {AEAD!r}")
    archive_id = _match(obj["archive_id"], _ARCHIVE_ID, "manifest archive_id")
    dataset = _match(obj["dataset"], _KEY_NAME, "manifest dataset")
    site = validate_site(obj["site"], IntegrityError)
    writer = _match(obj["writer"], _PRINCIPAL, "manifest writer")
    created_at = _count(obj["created_at"], "manifest created_at")
    objects = obj["objects"]
    if not isinstance(objects, list) or len(objects) > MAX_OBJECTS:
        raise IntegrityError(f"manifest objects must be a list of at most {MAX_OBJECTS}")
    entries = tuple(_entry(item, n, archive_id, dataset, site) for n, item in enumerate(objects))
    check_tree(e.path for e in entries)
    totals = obj["totals"]
    expected_totals = {"objects": len(entries), "bytes": sum(e.size for e in entries)}
    if totals != expected_totals:
        raise IntegrityError("manifest totals do not match its objects")
    return Manifest(archive_id, dataset, site, writer, created_at, entries)


def _entry(item: object, index: int, archive_id: str, dataset: str, site: str) -> Entry:
    where = f"objects[{index}]"
    if not isinstance(item, dict):
        raise IntegrityError(f"manifest {where} is not an object")
    _fields(
        item,
        {
            "index",
            "path",
            "size",
            "sha256",
            "file",
            "ciphertext_size",
            "wrapped_key",
            "context",
            "key_commitment",
        },
        where,
    )
    if item["index"] != index or isinstance(item["index"], bool):
        raise IntegrityError(f"manifest {where} has index {item['index']!r}: objects reordered")
    path = validate_path(item["path"])
    try:
        return _entry_fields(item, index, path, _context_json(archive_id, dataset, site, path))
    except IntegrityError as exc:
        raise IntegrityError(f"manifest objects[{index}]: {exc}", path=path) from None


def _entry_fields(item: dict[str, Any], index: int, path: str, context: object) -> Entry:
    size = _count(item["size"], "size")
    ciphertext_size = _count(item["ciphertext_size"], "ciphertext_size")
    if ciphertext_size <= size:
        raise IntegrityError("ciphertext_size is not larger than size")
    if item["file"] != object_file(index):
        raise IntegrityError(f"file is not {object_file(index)!r}")
    if item["context"] != context:
        raise IntegrityError("context does not name this object")
    wrapped = item["wrapped_key"]
    if (
        not isinstance(wrapped, str)
        or len(wrapped) > MAX_WRAPPED_KEY_CHARS
        or not _WRAPPED.fullmatch(wrapped)
    ):
        raise IntegrityError("wrapped_key is not an ekms ciphertext")
    return Entry(
        index=index,
        path=path,
        size=size,
        sha256=_match(item["sha256"], _HEX64, "sha256"),
        ciphertext_size=ciphertext_size,
        wrapped_key=wrapped,
        key_commitment=_match(item["key_commitment"], _HEX64, "key_commitment"),
    )


def validate_site(value: object, error: type[BackupError] = UsageError) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 64
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value)
    ):
        raise error(f"site {value!r} must be 1-64 printable characters without spaces")
    return value


def validate_dataset(value: str) -> str:
    if not _KEY_NAME.fullmatch(value):
        raise UsageError(
            f"dataset {value!r} must be a key name: 1-128 letters, digits, '.', '_' or '-'"
        )
    return value


def new_archive_id(random_bytes: bytes) -> str:
    if len(random_bytes) != 16:
        raise ValueError("an archive id takes 16 random bytes")
    return random_bytes.hex()


# --- signature ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """``manifest.sig``: which manifest key, which version, over which digest."""

    key: str
    key_version: int
    manifest_sha256: str
    signature: str  # ekms:v<N>:<base64>, as transit/sign answers

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": self.key,
            "key_version": self.key_version,
            "manifest_sha256": self.manifest_sha256,
            "signature": self.signature,
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())


def parse_signature(raw: bytes) -> Signature:
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise IntegrityError("manifest signature file is too large")
    obj = _canonical_object(raw, "manifest signature")
    _fields(
        obj,
        {"format", "key", "key_version", "manifest_sha256", "signature"},
        "manifest signature",
    )
    if obj["format"] != FORMAT:
        raise IntegrityError(f"manifest signature format is {obj['format']!r}")
    key = _match(obj["key"], _KEY_NAME, "manifest signature key")
    version = _count(obj["key_version"], "manifest signature key_version")
    signature = obj["signature"]
    found = _SIGNATURE.fullmatch(signature) if isinstance(signature, str) else None
    if found is None or int(found.group(1)) != version:
        raise IntegrityError("manifest signature is not an ekms signature of the named version")
    digest = _match(obj["manifest_sha256"], _HEX64, "manifest signature manifest_sha256")
    return Signature(key, version, digest, signature)


def require_manifest_key(name: str) -> str:
    if not _KEY_NAME.fullmatch(name) or not is_manifest_key(name):
        raise UsageError(f"--signing-key must name a {MANIFEST_KEY_PREFIX}* key")
    return name


def check_signing_key(signature: Signature, expected: str) -> None:
    """The manifest must be signed by the key the operator expects, and a manifest key."""
    require_manifest_key(expected)
    if signature.key != expected:
        raise IntegrityError(
            f"manifest is signed by key {signature.key!r}, not the expected {expected!r}"
        )


def verify_signature(
    signature: Signature, canonical: bytes, public_key_pem: bytes, key_type: str
) -> None:
    """Offline check of the manifest signature with the manifest key's public half."""
    digest = manifest_digest(canonical)
    if not hmac.compare_digest(digest.hex(), signature.manifest_sha256):
        raise IntegrityError("manifest does not match the digest its signature covers")
    raw = base64.b64decode(signature.signature.rsplit(":", 1)[1])
    try:
        public = serialization.load_pem_public_key(public_key_pem)
    except ValueError:
        raise UsageError("the manifest key's public key is not a PEM public key") from None
    try:
        if key_type == "ecdsa-p256" and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(raw, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        elif key_type == "ed25519" and isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(raw, digest)
        else:
            raise UsageError(f"manifest key type {key_type!r} does not match its public key")
    except InvalidSignature:
        raise IntegrityError("manifest signature does not verify") from None


def sign_request(digest: bytes, key_type: str) -> dict[str, Any]:
    """The ``transit/sign`` body: ECDSA signs the digest as a prehash, Ed25519 as a message."""
    body: dict[str, Any] = {"input": base64.b64encode(digest).decode()}
    if key_type == "ecdsa-p256":
        body["prehashed"] = True
        body["hash_algorithm"] = "sha2-256"
    elif key_type != "ed25519":
        raise UsageError(f"key type {key_type!r} cannot sign manifests")
    return body


# --- helpers ------------------------------------------------------------------------------


def _canonical_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise IntegrityError(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    try:
        canonical = canonical_json(obj)
    except EkmsError:
        raise IntegrityError(f"{what} holds values canonical JSON refuses") from None
    if canonical != raw:
        raise IntegrityError(f"{what} is not in canonical form: it was edited")
    return obj


def _fields(obj: Mapping[str, Any], expected: set[str], where: str) -> None:
    missing = sorted(expected - set(obj))
    extra = sorted(set(obj) - expected)
    if missing or extra:
        problem = f"lacks {missing[0]!r}" if missing else f"has unknown field {extra[0]!r}"
        raise IntegrityError(f"{where} {problem}")


def _match(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise IntegrityError(f"{what} is malformed")
    return value


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_OBJECT_BYTES:
        raise IntegrityError(f"{what} is not a whole number")
    return value


def chunks(items: Sequence[Entry], size: int) -> list[Sequence[Entry]]:
    return [items[n : n + size] for n in range(0, len(items), size)]
