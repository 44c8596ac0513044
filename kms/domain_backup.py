"""The security-domain backup: one signed document that provisions another site (ADR 0012 §4, §5).

A site is provisioned by loading a backup exported for it. The document carries what the
new site needs to become the same domain, and nothing that opens without a quorum:

- the share-set descriptor and its members' share-check commitments (public);
- the security-domain key, sealed under the domain wrapping key (as the source stores it);
- the KEKs the target's kind may ever hold (``select_keys``), each version as its escrow
  (``kms.domain``) and, for memory residency, its wrapped working key;
- every signing key's public versions (``verify_keys``), with the site whose backend holds
  the private ones (``origin``): the target registers them verify-only, so that what was
  signed at home (backup manifests) verifies there, while signing stays at the origin;
- the principal and site registries, the source's latest signed audit tree head and its
  audit public key;
- ``mac``: HMAC-SHA-256 under ``HKDF(domain wrapping key, "domain-backup-mac")`` over the
  canonical body, so that only quorum-unlocked keys make or check it;
- ``signature``: a detached compact JWS (RFC 7515 Appendix F), ES256 by the source's audit
  signing key over the same bytes, so an auditor can attribute a backup to a site without a
  share. Its signing input is ``BASE64URL(header) || "." || BASE64URL(body)``.

The body is every field but ``mac`` and ``signature`` as canonical JSON (``kms.canonical``:
no floats, so every time is integer microseconds, ``*_us``). ``parse`` checks the shape
strictly (unknown fields, types, sizes), naming the field that is wrong, and verifies the
signature against the document's own audit key; ``verify_mac`` needs the working keys of the
share set, so it runs at the first unseal. ``import_backup`` then brings the KEKs into this
site's backend through ``KeyService.import_escrowed``, and the public versions into its
registry through ``KeyService.import_public``, resumable after a crash.

Pure: no I/O; the store, the key service and the signer are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kms import domain, jose
from kms.audit import time_us
from kms.audit_export import TreeHead, verify_tree_head
from kms.canonical import canonical_json
from kms.custody import MAX_SHARES, ShareSetDescriptor
from kms.derivation import hkdf, wipe
from kms.errors import AuthenticationError, ConflictError, InvalidRequestError, StorageError
from kms.identity import Principal, Role, parse_roles, validate_principal_id
from kms.keys import (
    SYSTEM_KEY_PREFIX,
    Classification,
    KeyPolicy,
    KeyType,
    KeyVersion,
    Residency,
    VersionState,
    validate_key_name,
)
from kms.policy import Site, SiteKind, parse_choice
from kms.rekey import ShareMember
from kms.sealed_values import SECURITY_DOMAIN_KEY, Purpose, SealedValue
from kms.share_check import parse_member
from kms.sites import (
    SiteBackend,
    SiteRecord,
    SiteStatus,
    parse_audit_key,
    parse_note,
    parse_url,
    validate_site_name,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from kms.derivation import RootKeys
    from kms.policy import RestoreMatrix
    from kms.service import KeyService

FORMAT = "embassy-kms/domain-backup/v1"
SIGNATURE_TYPE = "ekms-domain-backup+jws"
SIGNATURE_ALG = "ES256"
MAX_KEYS = 10_000
MAX_VERSIONS = 100_000  # in all keys together
MAX_PRINCIPALS = 10_000
MAX_SITES = 256
MAX_BODY_BYTES = 64 * 1024 * 1024
_MAC_LABEL = "domain-backup-mac"
_UNSIGNED = frozenset({"mac", "signature"})
_TOP = _UNSIGNED | {
    "format",
    "backup_id",
    "created_at_us",
    "source",
    "target",
    "share_set",
    "domain_key",
    "keys",
    "verify_keys",
    "principals",
    "sites",
    "audit",
}
_SITE_REF = frozenset({"name", "kind"})
_SHARE_SET = frozenset({"descriptor", "members"})
_DESCRIPTOR = frozenset(
    [
        "identifier",
        "extendable",
        "iteration_exponent",
        "group_threshold",
        "groups",
        "verifier",
        "created_at_us",
        "generation",
        "keyring",
    ]
)
_MEMBER = frozenset({"member", "commitment", "holder"})
_KEY = frozenset(
    [
        "name",
        "type",
        "classification",
        "residency",
        "created_at_us",
        "min_decryption_version",
        "min_encryption_version",
        "deletion_allowed",
        "versions",
    ]
)
_VERSION = frozenset({"number", "created_at_us", "escrow", "wrapped_working_key"})
_VERIFY_KEY = frozenset(
    [
        "name",
        "type",
        "classification",
        "origin",
        "created_at_us",
        "min_decryption_version",
        "versions",
    ]
)
_PUBLIC_VERSION = frozenset({"number", "created_at_us", "public_key"})
_MAX_PUBLIC_KEY_BYTES = 256  # DER SubjectPublicKeyInfo of P-256 is 91 bytes, of Ed25519 44
_PRINCIPAL = frozenset(
    [
        "id",
        "display_name",
        "roles",
        "jwk",
        "thumbprint",
        "created_at_us",
        "created_by",
        "disabled_at_us",
        "tokens_valid_after_us",
    ]
)
_SITE = frozenset(
    [
        "name",
        "kind",
        "backend",
        "status",
        "url",
        "audit_public_key",
        "registered_at_us",
        "updated_at_us",
        "note",
    ]
)
_AUDIT = frozenset({"public_key", "tree_head"})
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_MAC = re.compile(r"[0-9a-f]{64}")
_MAX_US = 2**53 - 1
_MAX_VERSION = 2**31 - 1
_WRAPPED_WORKING_KEY_BYTES = 12 + 32 + 16
_SEALED_DOMAIN_KEY_BYTES = 1 + 12 + domain.DOMAIN_KEY_BYTES + 16
_MAX_KEYRING_BYTES = 4096
_MAX_JWS = 8192
_LISTED_VERIFY_ONLY = 200  # names listed in an answer or audit record; the count is always there


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class BackupVersion:
    number: int
    created_at: float
    escrow: bytes
    wrapped_working_key: bytes | None = None

    def __repr__(self) -> str:
        return f"BackupVersion({self.number}, <escrow>)"


@dataclass(frozen=True)
class BackupKey:
    """A KEK's policy (``versions`` left empty) and the versions the backup carries."""

    policy: KeyPolicy
    versions: tuple[BackupVersion, ...]


@dataclass(frozen=True)
class PublicVersion:
    number: int
    created_at: float
    public_key: bytes  # DER SubjectPublicKeyInfo


@dataclass(frozen=True)
class VerifyKey:
    """A signing key's public versions, which the target registers verify-only.

    ``policy.origin_site`` names the site whose backend holds the private versions: the source
    for its own keys, or the origin it recorded for a verify-only key it holds itself (so an
    embassy's backup sent home names home, not the embassy). ``None`` only before ``build``.
    """

    policy: KeyPolicy
    versions: tuple[PublicVersion, ...]


@dataclass(frozen=True, repr=False)
class DomainBackup:
    """A parsed, signature-checked backup; ``verify_mac`` is what proves it is the domain's."""

    backup_id: str
    created_at: float
    source: Site
    target: Site
    descriptor: ShareSetDescriptor
    members: tuple[ShareMember, ...]
    domain_key: SealedValue
    keys: tuple[BackupKey, ...]
    verify_keys: tuple[VerifyKey, ...]
    principals: tuple[Principal, ...]
    sites: tuple[SiteRecord, ...]
    audit_key: jose.PublicJwk
    tree_head: tuple[TreeHead, str] | None
    body: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    signature: str = field(repr=False)
    document: dict[str, Any] = field(repr=False, compare=False, hash=False)

    def __repr__(self) -> str:
        return (
            f"DomainBackup({self.backup_id}, {self.source.name} -> {self.target.name}, "
            f"keys={len(self.keys)})"
        )

    @property
    def digest(self) -> str:
        """What audit records name the backup by: SHA-256 of the canonical body."""
        return "sha256:" + hashlib.sha256(self.body).hexdigest()

    @property
    def version_count(self) -> int:
        return sum(len(k.versions) for k in self.keys)

    def summary(self) -> dict[str, Any]:
        """For answers and audit records: what it is, never what it holds."""
        return {
            "backup_id": self.backup_id,
            "digest": self.digest,
            "source": {"name": self.source.name, "kind": self.source.kind.value},
            "target": {"name": self.target.name, "kind": self.target.kind.value},
            "keys": len(self.keys),
            "versions": self.version_count,
            "verify_keys": len(self.verify_keys),
            "principals": len(self.principals),
            "sites": len(self.sites),
            "share_set": {
                "identifier": self.descriptor.identifier,
                "generation": self.descriptor.generation,
            },
        }

    def head_json(self) -> dict[str, Any] | None:
        """The source's signed tree head as a head line (``verify_tree_head`` reads it)."""
        if self.tree_head is None:
            return None
        head, jws = self.tree_head
        return {"type": "head", **head.claims(), "jws": jws}


# --- choosing what goes in ----------------------------------------------------------------


def select_keys(
    policies: Iterable[KeyPolicy],
    target: SiteKind,
    matrix: RestoreMatrix,
    *,
    escrow_opens: Callable[[KeyPolicy, KeyVersion], bool] = lambda _p, _v: True,
) -> tuple[list[BackupKey | VerifyKey], list[str]]:
    """The keys a backup for a ``target`` site carries, and why others are left out.

    KEKs (``BackupKey``): a key whose classification the restore matrix never allows at that
    kind of site, even in an emergency, is left out, so a public cloud never holds a secret
    KEK. A version without escrow (made before KEK escrow existed) or whose escrow does not
    open cannot leave its site. Signing keys (``VerifyKey``) go as their public versions
    only, whatever their classification: a public key opens nothing, and restores at the
    target verify manifests signed here with them. The service's own keys (``ekms/...``)
    never go: each site has its own.
    """
    chosen: list[BackupKey | VerifyKey] = []
    skipped: list[str] = []
    for policy in sorted(policies, key=lambda p: p.name):
        name = policy.name
        if name.startswith(SYSTEM_KEY_PREFIX):
            continue
        if not policy.key_type.is_symmetric:
            public = _public_versions(policy)
            if public:
                chosen.append(VerifyKey(policy.with_changes(versions={}), public))
            continue
        if not matrix.decide(policy.classification, target, emergency=True):
            skipped.append(
                f"{name}: {policy.classification.value} keys may never be restored at a "
                f"{target.value} site"
            )
            continue
        versions, left = _escrowed_versions(policy, escrow_opens)
        if left:
            skipped.append(
                f"{name}: version(s) {', '.join(map(str, left))} have no usable escrow (made "
                "before KEK escrow existed) and cannot leave this site; rotate the key"
            )
        if versions:
            chosen.append(BackupKey(policy.with_changes(versions={}), tuple(versions)))
    return chosen, skipped


def _escrowed_versions(
    policy: KeyPolicy, escrow_opens: Callable[[KeyPolicy, KeyVersion], bool]
) -> tuple[list[BackupVersion], list[int]]:
    """The active versions that can travel, and the numbers of those that cannot."""
    versions: list[BackupVersion] = []
    left: list[int] = []
    for number in sorted(policy.versions):
        version = policy.versions[number]
        if version.state is not VersionState.ACTIVE:
            continue
        if version.escrow is None or not escrow_opens(policy, version):
            left.append(number)
            continue
        versions.append(
            BackupVersion(number, version.created_at, version.escrow, version.wrapped_working_key)
        )
    return versions, left


def _public_versions(policy: KeyPolicy) -> tuple[PublicVersion, ...]:
    return tuple(
        PublicVersion(number, version.created_at, version.public_key)
        for number, version in sorted(policy.versions.items())
        if version.state is VersionState.ACTIVE and version.public_key is not None
    )


# --- building -----------------------------------------------------------------------------


def build(
    *,
    backup_id: str,
    created_at: float,
    source: Site,
    target: Site,
    descriptor: ShareSetDescriptor,
    members: Sequence[ShareMember],
    domain_key: SealedValue,
    keys: Sequence[BackupKey | VerifyKey],
    principals: Sequence[Principal],
    sites: Sequence[SiteRecord],
    audit_key: jose.PublicJwk,
    tree_head: tuple[TreeHead, str] | None,
    root_keys: RootKeys,
    sign: Callable[[bytes], bytes],
) -> DomainBackup:
    """The document, MACed under the domain wrapping key and signed with ``sign`` (raw ES256,
    r||s, by the key ``audit_key`` names; the audit signing key in the HSM).

    ``keys`` as ``select_keys`` chose them: KEKs go to ``keys``, signing keys' public versions
    to ``verify_keys``, with ``source`` as their origin unless they came from another site.
    """
    keks = [k for k in keys if isinstance(k, BackupKey)]
    public = [k for k in keys if isinstance(k, VerifyKey)]
    body_json: dict[str, Any] = {
        "format": FORMAT,
        "backup_id": backup_id,
        "created_at_us": time_us(created_at),
        "source": _site_ref(source),
        "target": _site_ref(target),
        "share_set": {
            "descriptor": _descriptor_json(descriptor),
            "members": [_member_json(m) for m in members],
        },
        "domain_key": jose.b64url_encode(domain_key.blob),
        "keys": [_key_json(k) for k in keks],
        "verify_keys": [_verify_key_json(k, source) for k in public],
        "principals": [_principal_json(p) for p in principals],
        "sites": [_site_json(s) for s in sites],
        "audit": {
            "public_key": dict(audit_key.members),
            "tree_head": None
            if tree_head is None
            else {"type": "head", **tree_head[0].claims(), "jws": tree_head[1]},
        },
    }
    body = canonical_json(body_json)
    header = {"alg": SIGNATURE_ALG, "kid": audit_key.thumbprint, "typ": SIGNATURE_TYPE}
    header_b64 = jose.b64url_encode(orjson.dumps(header))
    raw = sign(_signing_input(header_b64, body))
    if len(raw) != 64:
        raise StorageError("the audit signing key returned a signature of the wrong length")
    document = {
        **body_json,
        "mac": _mac(root_keys, body).hex(),
        "signature": f"{header_b64}..{jose.b64url_encode(bytes(raw))}",
    }
    return parse(document)


def _signing_input(header_b64: str, body: bytes) -> bytes:
    return f"{header_b64}.{jose.b64url_encode(body)}".encode("ascii")


def _mac(root_keys: RootKeys, body: bytes) -> bytes:
    key = hkdf(root_keys.domain_wrapping_key, _MAC_LABEL)
    try:
        return hmac.new(bytes(key), body, hashlib.sha256).digest()
    finally:
        wipe(key)


def verify_mac(backup: DomainBackup, root_keys: RootKeys) -> None:
    """Only a holder of this share set's working keys made the backup; else ``InvalidRequest``."""
    if not hmac.compare_digest(_mac(root_keys, backup.body), backup.mac):
        raise InvalidRequestError(
            "the domain backup's MAC does not verify with this share set's keys: it was "
            "altered after export, or it belongs to another domain or share set"
        )


def open_domain_key(backup: DomainBackup, root_keys: RootKeys) -> bytearray:
    """The backup's security-domain key (the caller wipes it); after ``verify_mac``."""
    try:
        return domain.open_domain_key(root_keys, backup.domain_key)
    except StorageError:
        raise InvalidRequestError(
            "the domain backup's security-domain key does not open with this share set's keys"
        ) from None


def check_escrows(backup: DomainBackup, sdk: bytes | bytearray) -> None:
    """Every escrow opens with ``sdk``: checked before anything is written."""
    for key in backup.keys:
        for version in key.versions:
            material = domain.unwrap_escrow(
                sdk, key.policy.name, version.number, key.policy.key_type, version.escrow
            )
            wipe(material)


# --- the JSON shapes ----------------------------------------------------------------------


def _site_ref(site: Site) -> dict[str, Any]:
    return {"name": site.name, "kind": site.kind.value}


def _b64(data: bytes | None) -> str | None:
    return None if data is None else jose.b64url_encode(data)


def _descriptor_json(d: ShareSetDescriptor) -> dict[str, Any]:
    return {
        "identifier": d.identifier,
        "extendable": d.extendable,
        "iteration_exponent": d.iteration_exponent,
        "group_threshold": d.group_threshold,
        "groups": [list(g) for g in d.groups],
        "verifier": jose.b64url_encode(d.verifier),
        "created_at_us": time_us(d.created_at),
        "generation": d.generation,
        "keyring": _b64(d.keyring),
    }


def _member_json(m: ShareMember) -> dict[str, Any]:
    return {"member": m.member, "commitment": _b64(m.commitment), "holder": m.holder}


def _key_json(key: BackupKey) -> dict[str, Any]:
    p = key.policy
    return {
        "name": p.name,
        "type": p.key_type.value,
        "classification": p.classification.value,
        "residency": p.residency.value,
        "created_at_us": time_us(p.created_at),
        "min_decryption_version": p.min_decryption_version,
        "min_encryption_version": p.min_encryption_version,
        "deletion_allowed": p.deletion_allowed,
        "versions": [
            {
                "number": v.number,
                "created_at_us": time_us(v.created_at),
                "escrow": jose.b64url_encode(v.escrow),
                "wrapped_working_key": _b64(v.wrapped_working_key),
            }
            for v in key.versions
        ],
    }


def _verify_key_json(key: VerifyKey, source: Site) -> dict[str, Any]:
    p = key.policy
    return {
        "name": p.name,
        "type": p.key_type.value,
        "classification": p.classification.value,
        "origin": p.origin_site or source.name,
        "created_at_us": time_us(p.created_at),
        "min_decryption_version": p.min_decryption_version,
        "versions": [
            {
                "number": v.number,
                "created_at_us": time_us(v.created_at),
                "public_key": jose.b64url_encode(v.public_key),
            }
            for v in key.versions
        ],
    }


def _principal_json(p: Principal) -> dict[str, Any]:
    return {
        "id": p.id,
        "display_name": p.display_name,
        "roles": sorted(r.value for r in p.roles),
        "jwk": dict(p.jwk),
        "thumbprint": p.thumbprint,
        "created_at_us": time_us(p.created_at),
        "created_by": p.created_by,
        "disabled_at_us": None if p.disabled_at is None else time_us(p.disabled_at),
        "tokens_valid_after_us": time_us(p.tokens_valid_after),
    }


def _site_json(s: SiteRecord) -> dict[str, Any]:
    return {
        "name": s.name,
        "kind": s.kind.value,
        "backend": s.backend.value,
        "status": s.status.value,
        "url": s.url,
        "audit_public_key": None if s.audit_public_key is None else dict(s.audit_public_key),
        "registered_at_us": time_us(s.registered_at),
        "updated_at_us": time_us(s.updated_at),
        "note": s.note,
    }


# --- parsing ------------------------------------------------------------------------------


def _refused(path: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"domain backup: {path} {problem}")


class _Obj:
    """One JSON object of the document, read field by field; errors name the field's path."""

    def __init__(self, value: object, path: str, fields: frozenset[str]) -> None:
        where = path or "the document"
        if not isinstance(value, dict):
            raise _refused(where, "must be a JSON object")
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            raise _refused(where, f"has unknown field {unknown[0]!r}")
        missing = sorted(fields - set(value))
        if missing:
            raise _refused(where, f"lacks field {missing[0]!r}")
        self.value: dict[str, Any] = value
        self.path = path

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def text(self, name: str, limit: int, *, empty: bool = False) -> str:
        value = self.value[name]
        if not isinstance(value, str) or len(value) > limit or (not value and not empty):
            size = f"0-{limit}" if empty else f"1-{limit}"
            raise _refused(self.at(name), f"must be a string of {size} characters")
        return value

    def optional_text(self, name: str, limit: int) -> str | None:
        return None if self.value[name] is None else self.text(name, limit)

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.value[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refused(self.at(name), f"must be an integer from {low} to {high}")
        return value

    def time(self, name: str) -> float:
        return self.integer(name, 0, _MAX_US) / 1_000_000

    def optional_time(self, name: str) -> float | None:
        return None if self.value[name] is None else self.time(name)

    def flag(self, name: str) -> bool:
        value = self.value[name]
        if not isinstance(value, bool):
            raise _refused(self.at(name), "must be true or false")
        return value

    def blob(self, name: str, *, size: int | None = None, limit: int = 1024) -> bytes:
        value = self.value[name]
        malformed = _refused(self.at(name), "must be unpadded base64url")
        if not isinstance(value, str) or len(value) > limit * 2:
            raise malformed
        try:
            raw = jose.b64url_decode(value)
        except AuthenticationError:
            raise malformed from None
        if size is not None and len(raw) != size:
            raise _refused(self.at(name), f"must encode {size} bytes")
        if len(raw) > limit:
            raise _refused(self.at(name), f"must encode at most {limit} bytes")
        return raw

    def optional_blob(self, name: str, *, size: int | None = None) -> bytes | None:
        return None if self.value[name] is None else self.blob(name, size=size)

    def items(self, name: str, limit: int) -> list[Any]:
        value = self.value[name]
        if not isinstance(value, list) or len(value) > limit:
            raise _refused(self.at(name), f"must be a list of at most {limit} entries")
        return value

    def choice(self, name: str, kind: Any) -> Any:
        try:
            return parse_choice(kind, self.text(name, 64), name)
        except InvalidRequestError as exc:
            raise _refused(self.at(name), f"is wrong: {exc}") from None

    def checked(self, name: str, check: Callable[[Any], Any]) -> Any:
        """A field through one of the registry's own validators, named in its error."""
        try:
            return check(self.value[name])
        except InvalidRequestError as exc:
            raise _refused(self.at(name), f"is wrong: {exc}") from None


def parse(document: object) -> DomainBackup:
    """Check the document's shape and its signature; ``InvalidRequestError`` names the field.

    The MAC is only read here: checking it needs the share set's working keys
    (``verify_mac``).
    """
    top = _Obj(document, "", _TOP)
    if top.value["format"] != FORMAT:
        raise _refused("format", f'must be "{FORMAT}" (this service reads that version only)')
    body_json = {k: v for k, v in top.value.items() if k not in _UNSIGNED}
    body = canonical_json(body_json)
    if len(body) > MAX_BODY_BYTES:
        raise _refused("body", f"is larger than {MAX_BODY_BYTES} bytes")
    backup_id = top.text("backup_id", 36)
    if not _UUID.fullmatch(backup_id):
        raise _refused("backup_id", "must be a lower-case UUID")
    mac_text = top.text("mac", 64)
    if not _HEX_MAC.fullmatch(mac_text):
        raise _refused("mac", "must be 64 lower-case hex digits (HMAC-SHA-256)")
    audit = _Obj(top.value["audit"], "audit", _AUDIT)
    audit_key = audit.checked("public_key", lambda v: jose.parse_public_jwk(parse_audit_key(v)))
    tree_head = None
    if audit.value["tree_head"] is not None:
        tree_head = audit.checked(
            "tree_head",
            lambda v: verify_tree_head(v, audit_key, key_name="audit.public_key"),
        )
    signature = top.text("signature", _MAX_JWS)
    _verify_signature(signature, body, audit_key)
    keys = _keys(top.items("keys", MAX_KEYS))
    verify_keys = _verify_keys(
        top.items("verify_keys", MAX_KEYS),
        {k.policy.name for k in keys},
        MAX_VERSIONS - sum(len(k.versions) for k in keys),
    )
    share_set = _Obj(top.value["share_set"], "share_set", _SHARE_SET)
    descriptor = _descriptor(
        _Obj(share_set.value["descriptor"], "share_set.descriptor", _DESCRIPTOR)
    )
    return DomainBackup(
        backup_id=backup_id,
        created_at=top.time("created_at_us"),
        source=_site(_Obj(top.value["source"], "source", _SITE_REF)),
        target=_site(_Obj(top.value["target"], "target", _SITE_REF)),
        descriptor=descriptor,
        members=_members(share_set.items("members", MAX_SHARES), descriptor),
        domain_key=SealedValue(
            SECURITY_DOMAIN_KEY,
            Purpose.DOMAIN,
            top.blob("domain_key", size=_SEALED_DOMAIN_KEY_BYTES),
        ),
        keys=keys,
        verify_keys=verify_keys,
        principals=_principals(top.items("principals", MAX_PRINCIPALS)),
        sites=_sites(top.items("sites", MAX_SITES)),
        audit_key=audit_key,
        tree_head=tree_head,
        body=body,
        mac=bytes.fromhex(mac_text),
        signature=signature,
        document=top.value,
    )


def _verify_signature(token: str, body: bytes, key: jose.PublicJwk) -> None:
    parts = token.split(".")
    if len(parts) != 3 or parts[1]:
        raise _refused("signature", "must be a detached compact JWS (header..signature)")
    try:
        header = orjson.loads(jose.b64url_decode(parts[0]))
        raw = jose.b64url_decode(parts[2])
    except (AuthenticationError, orjson.JSONDecodeError):
        raise _refused("signature", "is not a well-formed JWS") from None
    if not isinstance(header, dict) or set(header) != {"alg", "kid", "typ"}:
        raise _refused("signature", "header must hold exactly alg, kid and typ")
    if header["alg"] != SIGNATURE_ALG or header["typ"] != SIGNATURE_TYPE:
        raise _refused(
            "signature", f'header must name alg {SIGNATURE_ALG} and typ "{SIGNATURE_TYPE}"'
        )
    if header["kid"] != key.thumbprint:
        raise _refused("signature", "names another key than audit.public_key")
    try:
        key.verify(_signing_input(parts[0], body), raw)
    except AuthenticationError:
        raise _refused(
            "signature", "does not verify with audit.public_key: the document was altered"
        ) from None


def _site(obj: _Obj) -> Site:
    return Site(obj.checked("name", validate_site_name), obj.choice("kind", SiteKind))


def _descriptor(obj: _Obj) -> ShareSetDescriptor:
    groups_raw = obj.items("groups", 16)
    groups: list[tuple[int, int]] = []
    for index, group in enumerate(groups_raw):
        if (
            not isinstance(group, list)
            or len(group) != 2
            or not all(type(n) is int and 1 <= n <= MAX_SHARES for n in group)
        ):
            raise _refused(obj.at(f"groups[{index}]"), "must be [threshold, count], 1 to 16")
        groups.append((group[0], group[1]))
    if not groups:
        raise _refused(obj.at("groups"), "must list at least one group")
    keyring = obj.value["keyring"]
    return ShareSetDescriptor(
        identifier=obj.integer("identifier", 0, 2**15 - 1),
        extendable=obj.flag("extendable"),
        iteration_exponent=obj.integer("iteration_exponent", 0, 15),
        group_threshold=obj.integer("group_threshold", 1, len(groups)),
        groups=tuple(groups),
        verifier=obj.blob("verifier", size=32),
        created_at=obj.time("created_at_us"),
        generation=obj.integer("generation", 0, 2**31 - 1),
        keyring=None if keyring is None else obj.blob("keyring", limit=_MAX_KEYRING_BYTES),
    )


def _members(items: list[Any], descriptor: ShareSetDescriptor) -> tuple[ShareMember, ...]:
    members: list[ShareMember] = []
    expected = set(descriptor.members)
    for index, item in enumerate(items):
        obj = _Obj(item, f"share_set.members[{index}]", _MEMBER)
        member = obj.checked("member", lambda v: (parse_member(v), v)[1])
        if member not in expected:
            raise _refused(obj.at("member"), "is not a member of the share set's groups")
        expected.discard(member)
        holder = obj.value["holder"]
        members.append(
            ShareMember(
                member,
                obj.optional_blob("commitment", size=32),
                None if holder is None else obj.checked("holder", validate_principal_id),
            )
        )
    return tuple(members)


def _keys(items: list[Any]) -> tuple[BackupKey, ...]:
    keys: list[BackupKey] = []
    names: set[str] = set()
    total = 0
    for index, item in enumerate(items):
        obj = _Obj(item, f"keys[{index}]", _KEY)
        name = obj.checked("name", validate_key_name)
        if name in names:
            raise _refused(obj.at("name"), f"repeats key {name!r}")
        names.add(name)
        key_type = obj.choice("type", KeyType)
        if key_type is not KeyType.AES256_GCM96:
            raise _refused(obj.at("type"), "must be aes256-gcm96: only KEKs are carried")
        residency = obj.choice("residency", Residency)
        classification = obj.choice("classification", Classification)
        if residency is Residency.MEMORY and classification is Classification.SECRET:
            raise _refused(obj.at("residency"), "may not be memory for a secret key")
        versions = _versions(obj, residency)
        total += len(versions)
        if total > MAX_VERSIONS:
            raise _refused("keys", f"carry more than {MAX_VERSIONS} versions in all")
        policy = KeyPolicy(
            name=name,
            key_type=key_type,
            classification=classification,
            residency=residency,
            created_at=obj.time("created_at_us"),
            min_decryption_version=obj.integer("min_decryption_version", 1, _MAX_VERSION),
            min_encryption_version=obj.integer("min_encryption_version", 0, _MAX_VERSION),
            deletion_allowed=obj.flag("deletion_allowed"),
        )
        keys.append(BackupKey(policy, versions))
    return tuple(keys)


def _versions(key: _Obj, residency: Residency) -> tuple[BackupVersion, ...]:
    versions: list[BackupVersion] = []
    for index, item in enumerate(key.items("versions", MAX_VERSIONS)):
        obj = _Obj(item, key.at(f"versions[{index}]"), _VERSION)
        number = obj.integer("number", 1, _MAX_VERSION)
        if versions and number <= versions[-1].number:
            raise _refused(obj.at("number"), "must be larger than the previous version's")
        wrapped = obj.optional_blob("wrapped_working_key", size=_WRAPPED_WORKING_KEY_BYTES)
        if (wrapped is None) != (residency is Residency.HSM):
            raise _refused(
                obj.at("wrapped_working_key"),
                "must be present exactly for memory residency",
            )
        versions.append(
            BackupVersion(
                number,
                obj.time("created_at_us"),
                obj.blob("escrow", size=domain.ESCROW_BYTES),
                wrapped,
            )
        )
    if not versions:
        raise _refused(key.at("versions"), "must list at least one version")
    return tuple(versions)


def _verify_keys(items: list[Any], taken: set[str], budget: int) -> tuple[VerifyKey, ...]:
    """Signing keys' public versions; ``taken``: the KEKs' names, ``budget``: versions left."""
    keys: list[VerifyKey] = []
    names = set(taken)
    for index, item in enumerate(items):
        obj = _Obj(item, f"verify_keys[{index}]", _VERIFY_KEY)
        name = obj.checked("name", validate_key_name)
        if name in names:
            raise _refused(obj.at("name"), f"repeats key {name!r}")
        names.add(name)
        key_type = obj.choice("type", KeyType)
        if key_type.is_symmetric:
            raise _refused(obj.at("type"), "must be a signing key type (ecdsa-p256 or ed25519)")
        versions: list[PublicVersion] = []
        for number_index, raw in enumerate(obj.items("versions", MAX_VERSIONS)):
            entry = _Obj(raw, obj.at(f"versions[{number_index}]"), _PUBLIC_VERSION)
            number = entry.integer("number", 1, _MAX_VERSION)
            if versions and number <= versions[-1].number:
                raise _refused(entry.at("number"), "must be larger than the previous version's")
            public_key = entry.blob("public_key", limit=_MAX_PUBLIC_KEY_BYTES)
            _check_public_key(public_key, key_type, entry.at("public_key"))
            versions.append(PublicVersion(number, entry.time("created_at_us"), public_key))
        if not versions:
            raise _refused(obj.at("versions"), "must list at least one version")
        budget -= len(versions)
        if budget < 0:
            raise _refused("verify_keys", f"and keys carry more than {MAX_VERSIONS} versions")
        policy = KeyPolicy(
            name=name,
            key_type=key_type,
            classification=obj.choice("classification", Classification),
            residency=Residency.HSM,
            created_at=obj.time("created_at_us"),
            min_decryption_version=obj.integer("min_decryption_version", 1, _MAX_VERSION),
            origin_site=obj.checked("origin", validate_site_name),
        )
        keys.append(VerifyKey(policy, tuple(versions)))
    return tuple(keys)


def _check_public_key(der: bytes, key_type: KeyType, path: str) -> None:
    """A DER SubjectPublicKeyInfo of the key's type, so that ``verify`` can always load it."""
    try:
        public = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise _refused(path, "is not a DER SubjectPublicKeyInfo") from None
    expected = (
        isinstance(public, ed25519.Ed25519PublicKey)
        if key_type is KeyType.ED25519
        else isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    )
    if not expected:
        raise _refused(path, f"is not an {key_type.value} public key")


def _principals(items: list[Any]) -> tuple[Principal, ...]:
    principals: list[Principal] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        obj = _Obj(item, f"principals[{index}]", _PRINCIPAL)
        principal_id = obj.checked("id", validate_principal_id)
        if principal_id in seen:
            raise _refused(obj.at("id"), f"repeats principal {principal_id!r}")
        seen.add(principal_id)
        obj.items("roles", len(Role))
        roles = obj.checked("roles", parse_roles)
        jwk = obj.checked("jwk", jose.parse_public_jwk)
        if obj.text("thumbprint", 64) != jwk.thumbprint:
            raise _refused(obj.at("thumbprint"), "is not the thumbprint of the jwk")
        principals.append(
            Principal(
                id=principal_id,
                roles=roles,
                jwk=dict(jwk.members),
                thumbprint=jwk.thumbprint,
                created_at=obj.time("created_at_us"),
                created_by=obj.text("created_by", 64),
                disabled_at=obj.optional_time("disabled_at_us"),
                tokens_valid_after=obj.time("tokens_valid_after_us"),
                display_name=obj.text("display_name", 200, empty=True),
            )
        )
    return tuple(principals)


def _sites(items: list[Any]) -> tuple[SiteRecord, ...]:
    sites: list[SiteRecord] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        obj = _Obj(item, f"sites[{index}]", _SITE)
        name = obj.checked("name", validate_site_name)
        if name in seen:
            raise _refused(obj.at("name"), f"repeats site {name!r}")
        seen.add(name)
        key = obj.value["audit_public_key"]
        sites.append(
            SiteRecord(
                name=name,
                kind=obj.choice("kind", SiteKind),
                backend=obj.choice("backend", SiteBackend),
                status=obj.choice("status", SiteStatus),
                registered_at=obj.time("registered_at_us"),
                updated_at=obj.time("updated_at_us"),
                url=obj.checked("url", parse_url),
                audit_public_key=None
                if key is None
                else obj.checked("audit_public_key", parse_audit_key),
                note=obj.checked("note", parse_note),
            )
        )
    return tuple(sites)


# --- importing ----------------------------------------------------------------------------


class DomainStore(Protocol):
    """What an import needs from the metadata store (``storage.sql_store.SqlStore``)."""

    def stored_key(self, name: str) -> KeyPolicy | None: ...
    def sealed_value(self, name: str) -> SealedValue | None: ...
    def put_sealed_value(self, value: SealedValue, *, only_if_absent: bool = False) -> bool: ...
    def principal(self, principal_id: str) -> Principal | None: ...
    def list_principals(self) -> list[Principal]: ...
    def insert_principal(self, principal: Principal) -> None: ...
    def update_principal(self, principal: Principal) -> None: ...
    def site(self, name: str) -> SiteRecord | None: ...
    def insert_site(self, record: SiteRecord, *, only_if_absent: bool = False) -> bool: ...


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)  # "name/vN", KEK versions
    verify_only: list[str] = field(default_factory=list)  # "name/vN", public versions
    present: int = 0
    principals_added: int = 0
    sites_added: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "versions_imported": len(self.imported),
            "verify_only_imported": self.verify_only[:_LISTED_VERIFY_ONLY],
            "verify_only_versions_imported": len(self.verify_only),
            "versions_present": self.present,
            "principals_added": self.principals_added,
            "sites_added": self.sites_added,
        }


def check_target(backup: DomainBackup, here: Site, matrix: RestoreMatrix) -> None:
    """The backup was made for this site, and holds nothing this site may never hold."""
    if backup.target.name != here.name:
        raise InvalidRequestError(
            f"the domain backup is for site {backup.target.name!r}, and this site is "
            f"{here.name!r} (site_name): export one for this site"
        )
    if backup.target.kind is not here.kind:
        raise InvalidRequestError(
            f"the domain backup is for a site of kind {backup.target.kind.value!r}, and this "
            f"site is configured as {here.kind.value!r} (site_kind)"
        )
    for key in backup.keys:
        if not matrix.decide(key.policy.classification, here.kind, emergency=True):
            raise InvalidRequestError(
                f"the domain backup carries key {key.policy.name!r}, classified "
                f"{key.policy.classification.value}, which may never be restored at a "
                f"{here.kind.value} site"
            )


def _conflicts(backup: DomainBackup, store: DomainStore) -> None:
    """Refuse, before anything is written, a version that exists here with other material,
    or a principal this site lacks whose key another principal here holds."""
    holders = {p.thumbprint: p.id for p in store.list_principals()}
    for principal in backup.principals:
        holder = holders.get(principal.thumbprint, principal.id)
        if holder != principal.id:
            raise ConflictError(
                f"principal {principal.id!r} of the backup has the key of principal {holder!r} "
                "here: nothing was imported"
            )
    for public in backup.verify_keys:
        _verify_key_conflicts(public, store.stored_key(public.policy.name))
    for key in backup.keys:
        stored = store.stored_key(key.policy.name)
        if stored is None:
            continue
        if stored.key_type is not key.policy.key_type:
            raise ConflictError(
                f"key {stored.name!r} is {stored.key_type.value} here and "
                f"{key.policy.key_type.value} in the backup"
            )
        for version in key.versions:
            have = stored.versions.get(version.number)
            if have is None:
                continue
            if (
                have.state is not VersionState.ACTIVE
                or have.escrow is None
                or not hmac.compare_digest(have.escrow, version.escrow)
            ):
                raise ConflictError(
                    f"key {stored.name!r} version {version.number} exists here with other "
                    "key material (or is being changed): nothing was imported"
                )


def _verify_key_conflicts(public: VerifyKey, stored: KeyPolicy | None) -> None:
    """What ``KeyService.import_public`` would refuse, checked before the refresh writes."""
    if stored is None:
        return
    name, origin = stored.name, public.policy.origin_site
    if stored.key_type is not public.policy.key_type:
        raise ConflictError(
            f"key {name!r} is {stored.key_type.value} here and "
            f"{public.policy.key_type.value} in the backup: nothing was imported"
        )
    for version in public.versions:
        have = stored.versions.get(version.number)
        if have is not None and have.state is VersionState.ACTIVE:
            if have.public_key != version.public_key:
                raise ConflictError(
                    f"key {name!r} version {version.number} exists here with another public "
                    "key (two sites made a signing key of that name): nothing was imported"
                )
            continue
        if stored.origin_site != origin:
            held = (
                "this site's own signing key"
                if stored.origin_site is None
                else f"verify-only from site {stored.origin_site!r}"
            )
            raise ConflictError(
                f"key {name!r} is {held} here, and the backup carries a version "
                f"{version.number} of it from site {origin!r}: nothing was imported"
            )
        if have is not None:
            raise ConflictError(
                f"key {name!r} version {version.number} is being created or deleted here; retry"
            )


def import_backup(
    backup: DomainBackup,
    *,
    root_keys: RootKeys,
    keys: KeyService,
    store: DomainStore,
    here: SiteRecord,
    initial: bool,
) -> ImportReport:
    """Bring the backup's KEKs, signing keys' public versions (verify-only), principals and
    sites into this site; resumable.

    ``initial``: the first unseal after ``load`` on a new site. The backup's security-domain
    key becomes this site's, principals are written as the backup has them, and ``here`` (this
    site's own row, ``standby``) is registered unless it exists. Otherwise (a refresh with a
    newer backup) the backup must be of this site's domain, and only what is missing is added:
    versions, principals and sites this site lacks; nothing it has is changed. Every check runs
    before the first write: the MAC, the domain key, every escrow and, for a refresh, every
    version that would clash.
    """
    _take_domain_key(backup, root_keys=root_keys, keys=keys, store=store, initial=initial)
    report = ImportReport()
    for key in backup.keys:
        for version in key.versions:
            done = keys.import_escrowed(
                key.policy,
                version.number,
                version.escrow,
                version.wrapped_working_key,
                resume=initial,
            )
            if done:
                report.imported.append(f"{key.policy.name}/v{version.number}")
            else:
                report.present += 1
    for public in backup.verify_keys:
        for entry in public.versions:
            if keys.import_public(public.policy, entry.number, entry.public_key, resume=initial):
                report.verify_only.append(f"{public.policy.name}/v{entry.number}")
            else:
                report.present += 1
    _import_registries(backup, store=store, here=here, initial=initial, report=report)
    return report


def _take_domain_key(
    backup: DomainBackup,
    *,
    root_keys: RootKeys,
    keys: KeyService,
    store: DomainStore,
    initial: bool,
) -> None:
    """The checks before any write, then (``initial``) the backup's domain key made this
    site's; afterwards ``keys`` holds it."""
    verify_mac(backup, root_keys)
    sdk = open_domain_key(backup, root_keys)
    try:
        check_escrows(backup, sdk)
        if not initial:
            if not keys.same_domain_key(sdk):
                raise ConflictError(
                    "the domain backup carries another security-domain key than this site's: "
                    "it is of another domain"
                )
            _conflicts(backup, store)
        elif not store.put_sealed_value(
            backup.domain_key, only_if_absent=True
        ) and not keys.same_domain_key(sdk):
            raise ConflictError("this site already holds another security-domain key")
    finally:
        wipe(sdk)
    if not keys.open_domain_key(create=False):
        raise StorageError("the security-domain key was not stored")


def _import_registries(
    backup: DomainBackup,
    *,
    store: DomainStore,
    here: SiteRecord,
    initial: bool,
    report: ImportReport,
) -> None:
    for principal in backup.principals:
        existing = store.principal(principal.id)
        if existing is None:
            store.insert_principal(principal)
            report.principals_added += 1
        elif initial and existing != principal:
            store.update_principal(principal)
    if initial and store.insert_site(here, only_if_absent=True):
        report.sites_added += 1
    for site in backup.sites:
        if site.name != here.name and store.insert_site(site, only_if_absent=True):
            report.sites_added += 1
