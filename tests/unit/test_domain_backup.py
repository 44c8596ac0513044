"""The domain backup's document and the KEK escrow, without an HSM or a store.

The format is built and parsed here with a software ES256 key standing in for the audit signing
key; tests/integration/test_domain_backup.py exports, loads and imports with real SoftHSM
tokens, servers and OpenBao.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from api.principal_keys import KeyHolder
from kms import domain, domain_backup, jose
from kms.audit_export import TreeHead, sign_tree_head
from kms.canonical import canonical_json
from kms.custody import split_secret
from kms.derivation import RootKeys
from kms.domain_backup import BackupKey, BackupVersion, DomainBackup, VerifyKey
from kms.errors import ConflictError, InvalidRequestError
from kms.identity import Principal, Role
from kms.keys import (
    Classification,
    KeyPolicy,
    KeyType,
    KeyVersion,
    Residency,
    VersionState,
)
from kms.policy import DEFAULT_MATRIX, Site, SiteKind
from kms.rekey import ShareMember
from kms.share_check import commitments
from kms.sites import SiteBackend, SiteRecord, SiteStatus

NOW = 1_760_000_000.123456


class Urandom:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


RANDOM = Urandom()


class AuditSigner:
    """The source's audit signing key, in software: raw r||s over SHA-256, as the HSM gives."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.jwk = jose.ec_jwk_from_der(der)

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class Domain:
    """One share set's working keys, its security-domain key, and a source site's registry."""

    def __init__(self) -> None:
        secret = os.urandom(32)
        self.mnemonics, self.descriptor = split_secret(secret, 2, 3, now=NOW)
        self.keys = RootKeys.derive(secret)
        self.sdk, self.sealed_sdk = domain.new_domain_key(self.keys, RANDOM)
        self.signer = AuditSigner()
        self.members = [ShareMember(m, c) for m, c in commitments(self.mnemonics).items()]
        self.policies = [
            self.kek("notices", Classification.PUBLIC, versions=2),
            self.kek("laws", Classification.INTERNAL),
            self.kek("memo", Classification.INTERNAL, residency=Residency.MEMORY),
            self.kek("registry", Classification.CONFIDENTIAL),
            self.kek("census", Classification.SECRET, versions=3),
        ]
        # Signing keys travel as public versions only: home's own, and one that home holds
        # verify-only from the embassy (its origin must survive a second trip).
        self.private: dict[tuple[str, int], Any] = {}
        self.signers = [
            self.signing("backup-manifest", KeyType.ECDSA_P256, Classification.SECRET, 2),
            self.signing("notary", KeyType.ED25519, Classification.INTERNAL),
            self.signing(
                "embassy-manifest", KeyType.ECDSA_P256, Classification.INTERNAL, origin="embassy"
            ),
        ]
        self.policies += self.signers
        officer = KeyHolder.generate("officer")
        self.principals = [
            Principal(
                id="officer",
                roles=frozenset({Role.SECURITY_OFFICER}),
                jwk=officer.jwk,
                thumbprint=jose.parse_public_jwk(officer.jwk).thumbprint,
                created_at=NOW,
                created_by="root",
                display_name="Chief Security Officer",
            )
        ]
        self.sites = [
            SiteRecord("home", SiteKind.HOME, SiteBackend.PKCS11, SiteStatus.ACTIVE, NOW, NOW),
            SiteRecord(
                "embassy", SiteKind.EMBASSY, SiteBackend.PKCS11, SiteStatus.STANDBY, NOW, NOW
            ),
        ]
        head = TreeHead(42, bytes(range(32)), 1_760_000_000_000)
        self.head = (
            head,
            sign_tree_head(head, self.signer.sign, alg="ES256", kid=self.signer.jwk.thumbprint),
        )

    def kek(
        self,
        name: str,
        classification: Classification,
        *,
        versions: int = 1,
        residency: Residency = Residency.HSM,
    ) -> KeyPolicy:
        made = {}
        for number in range(1, versions + 1):
            material = os.urandom(32)
            made[number] = KeyVersion(
                number=number,
                handle=os.urandom(16),
                state=VersionState.ACTIVE,
                created_at=NOW + number,
                wrapped_working_key=os.urandom(60) if residency is Residency.MEMORY else None,
                escrow=domain.wrap_escrow(
                    self.sdk, name, number, KeyType.AES256_GCM96, material, random=RANDOM
                ),
            )
        return KeyPolicy(
            name=name,
            key_type=KeyType.AES256_GCM96,
            classification=classification,
            residency=residency,
            created_at=NOW,
            latest_version=versions,
            versions=made,
        )

    def signing(
        self,
        name: str,
        key_type: KeyType,
        classification: Classification,
        versions: int = 1,
        *,
        origin: str | None = None,
    ) -> KeyPolicy:
        made = {}
        for number in range(1, versions + 1):
            private: Any = (
                ec.generate_private_key(ec.SECP256R1())
                if key_type is KeyType.ECDSA_P256
                else ed25519.Ed25519PrivateKey.generate()
            )
            self.private[name, number] = private
            made[number] = KeyVersion(
                number=number,
                handle=os.urandom(16),
                state=VersionState.ACTIVE,
                created_at=NOW + number,
                public_key=private.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        return KeyPolicy(
            name=name,
            key_type=key_type,
            classification=classification,
            residency=Residency.HSM,
            created_at=NOW,
            latest_version=versions,
            versions=made,
            origin_site=origin,
        )

    def build(self, target: Site, **changes: Any) -> DomainBackup:
        chosen, _ = domain_backup.select_keys(self.policies, target.kind, DEFAULT_MATRIX)
        values: dict[str, Any] = {
            "backup_id": str(uuid.uuid4()),
            "created_at": NOW,
            "source": Site("home", SiteKind.HOME),
            "target": target,
            "descriptor": self.descriptor,
            "members": self.members,
            "domain_key": self.sealed_sdk,
            "keys": chosen,
            "principals": self.principals,
            "sites": self.sites,
            "audit_key": self.signer.jwk,
            "tree_head": self.head,
            "root_keys": self.keys,
            "sign": self.signer.sign,
        }
        values.update(changes)
        return domain_backup.build(**values)

    def resign(self, document: dict[str, Any]) -> dict[str, Any]:
        """What someone holding the audit signing key, but no quorum, could do."""
        try:
            body = canonical_json(
                {k: v for k, v in document.items() if k not in ("mac", "signature")}
            )
        except InvalidRequestError:
            return document  # not canonical JSON at all: nothing to sign
        header = document["signature"].split(".")[0]
        signing_input = f"{header}.{jose.b64url_encode(body)}".encode()
        return {
            **document,
            "signature": f"{header}..{jose.b64url_encode(self.signer.sign(signing_input))}",
        }


EMBASSY = Site("embassy", SiteKind.EMBASSY)
CLOUD = Site("cloud", SiteKind.PUBLIC_CLOUD)


@pytest.fixture(scope="module")
def world() -> Domain:
    return Domain()


@pytest.fixture(scope="module")
def backup(world: Domain) -> DomainBackup:
    return world.build(EMBASSY)


def wire(document: dict[str, Any]) -> dict[str, Any]:
    """Through JSON text and back, as over HTTP or in a file."""
    loaded: dict[str, Any] = json.loads(json.dumps(document, indent=2))
    return loaded


# --- the format ---------------------------------------------------------------------------


def test_a_backup_survives_json_and_verifies(world: Domain, backup: DomainBackup) -> None:
    parsed = domain_backup.parse(wire(backup.document))
    assert parsed.body == backup.body
    assert parsed.digest == backup.digest
    assert parsed.digest.startswith("sha256:")
    domain_backup.verify_mac(parsed, world.keys)
    assert parsed.descriptor.identifier == world.descriptor.identifier
    assert parsed.descriptor.verifier == world.descriptor.verifier
    assert parsed.members == tuple(world.members)
    assert parsed.domain_key == world.sealed_sdk
    assert [p.id for p in parsed.principals] == ["officer"]
    assert parsed.principals[0].roles == frozenset({Role.SECURITY_OFFICER})
    assert [s.name for s in parsed.sites] == ["home", "embassy"]
    assert parsed.tree_head is not None
    assert parsed.tree_head[0].size == 42
    assert parsed.head_json() == {"type": "head", **world.head[0].claims(), "jws": world.head[1]}
    assert parsed.source == Site("home", SiteKind.HOME)
    assert parsed.target == EMBASSY
    census = next(k for k in parsed.keys if k.policy.name == "census")
    assert [v.number for v in census.versions] == [1, 2, 3]
    memo = next(k for k in parsed.keys if k.policy.name == "memo")
    assert memo.policy.residency is Residency.MEMORY
    assert memo.versions[0].wrapped_working_key is not None
    sdk = domain_backup.open_domain_key(parsed, world.keys)
    try:
        domain_backup.check_escrows(parsed, sdk)
    finally:
        sdk[:] = bytes(32)


def test_the_document_holds_no_key_in_the_clear(world: Domain, backup: DomainBackup) -> None:
    text = orjson.dumps(backup.document)
    for secret in (bytes(world.sdk), bytes(world.keys.domain_wrapping_key)):
        for form in (secret, secret.hex().encode(), jose.b64url_encode(secret).encode()):
            assert form not in text
    assert "escrow" not in repr(backup)
    assert "domain_key" not in repr(backup)
    assert (
        repr(backup.keys[0].versions[0])
        == f"BackupVersion({backup.keys[0].versions[0].number}, <escrow>)"
    )


def test_the_body_is_canonical_json_without_floats(backup: DomainBackup) -> None:
    body = orjson.loads(backup.body)
    assert set(body) == set(backup.document) - {"mac", "signature"}
    assert canonical_json(body) == backup.body
    assert body["format"] == "embassy-kms/domain-backup/v1"
    assert body["created_at_us"] == round(NOW * 1_000_000)


# --- which keys go where ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (SiteKind.HOME, {"notices", "laws", "memo", "registry", "census"}),
        (SiteKind.EMBASSY, {"notices", "laws", "memo", "registry", "census"}),
        (SiteKind.PUBLIC_CLOUD, {"notices"}),
    ],
)
def test_keys_are_filtered_by_the_targets_kind(
    world: Domain, target: SiteKind, expected: set[str]
) -> None:
    chosen, skipped = domain_backup.select_keys(world.policies, target, DEFAULT_MATRIX)
    assert {k.policy.name for k in chosen if isinstance(k, BackupKey)} == expected
    # A public key opens nothing: every signing key goes, whatever the target's kind.
    signers = {p.name for p in world.signers}
    assert {k.policy.name for k in chosen if isinstance(k, VerifyKey)} == signers
    left = {s.split(":")[0] for s in skipped}
    assert left == {p.name for p in world.policies} - expected - signers
    if target is SiteKind.PUBLIC_CLOUD:
        assert "census: secret keys may never be restored at a public-cloud site" in skipped


def test_system_signing_pending_and_unescrowed_versions_stay_home(world: Domain) -> None:
    laws = world.policies[1]
    pending = KeyVersion(2, os.urandom(16), VersionState.PENDING, NOW)
    unescrowed = KeyVersion(3, os.urandom(16), VersionState.ACTIVE, NOW)
    signer = world.signers[0]
    policies = [
        laws.with_changes(versions={**laws.versions, 2: pending, 3: unescrowed}, latest_version=3),
        world.kek("ekms/system", Classification.SECRET),
        signer.with_changes(name="ekms/token-signing"),
        signer.with_changes(versions={1: signer.versions[1], 3: pending}),
        KeyPolicy("unmade", KeyType.ED25519, Classification.INTERNAL, Residency.HSM, NOW),
        world.kek("broken", Classification.INTERNAL),
    ]
    chosen, skipped = domain_backup.select_keys(
        policies,
        SiteKind.EMBASSY,
        DEFAULT_MATRIX,
        escrow_opens=lambda p, _v: p.name != "broken",
    )
    assert [(k.policy.name, [v.number for v in k.versions]) for k in chosen] == [
        ("backup-manifest", [1]),  # a pending version does not go; a key without one neither
        ("laws", [1]),
    ]
    assert all(not s.startswith("ekms/") for s in skipped)
    assert any(s.startswith("laws: version(s) 3 have no usable escrow") for s in skipped)
    assert any(s.startswith("broken: version(s) 1") for s in skipped)
    assert not any("signing" in s or "manifest" in s for s in skipped)


def test_signing_keys_travel_as_verify_only_public_keys(
    world: Domain, backup: DomainBackup
) -> None:
    parsed = domain_backup.parse(wire(backup.document))
    assert parsed.summary()["verify_keys"] == 3
    by_name = {k.policy.name: k for k in parsed.verify_keys}
    assert set(by_name) == {"backup-manifest", "notary", "embassy-manifest"}
    assert {k["name"] for k in backup.document["keys"]}.isdisjoint(by_name)
    # The origin: the source for its own keys; the recorded one for a key it holds verify-only.
    assert by_name["backup-manifest"].policy.origin_site == "home"
    assert by_name["embassy-manifest"].policy.origin_site == "embassy"
    assert all(k.policy.verify_only for k in parsed.verify_keys)
    manifest = by_name["backup-manifest"]
    assert manifest.policy.key_type is KeyType.ECDSA_P256
    assert manifest.policy.classification is Classification.SECRET
    assert [v.number for v in manifest.versions] == [1, 2]
    for version in manifest.versions:
        private = world.private["backup-manifest", version.number]
        signature = private.sign(b"manifest", ec.ECDSA(hashes.SHA256()))
        public = serialization.load_der_public_key(version.public_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"manifest", ec.ECDSA(hashes.SHA256()))
    notary = by_name["notary"]
    public = serialization.load_der_public_key(notary.versions[0].public_key)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(world.private["notary", 1].sign(b"m"), b"m")
    # Nothing private: the private keys' bytes appear nowhere in the document.
    text = orjson.dumps(backup.document)
    for (name, _), private in world.private.items():
        if name == "notary":
            raw = private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        else:
            raw = private.private_numbers().private_value.to_bytes(32, "big")
        assert jose.b64url_encode(raw).encode() not in text
        assert raw.hex().encode() not in text
    # Even a public-cloud backup carries them: restores there verify manifests too.
    assert {k.policy.name for k in world.build(CLOUD).verify_keys} == set(by_name)


def test_a_public_cloud_backup_carries_only_what_the_matrix_allows_there(world: Domain) -> None:
    cloud = world.build(CLOUD)
    assert [k.policy.name for k in cloud.keys] == ["notices"]
    domain_backup.check_target(cloud, CLOUD, DEFAULT_MATRIX)


def test_check_target_names_the_mismatch(world: Domain, backup: DomainBackup) -> None:
    with pytest.raises(InvalidRequestError, match=r"is for site 'embassy'.*this site is 'other'"):
        domain_backup.check_target(backup, Site("other", SiteKind.EMBASSY), DEFAULT_MATRIX)
    with pytest.raises(InvalidRequestError, match=r"of kind 'embassy'.*configured as 'home'"):
        domain_backup.check_target(backup, Site("embassy", SiteKind.HOME), DEFAULT_MATRIX)
    # A backup made for a public cloud that holds a secret KEK anyway (another source's
    # configuration) is refused by the site that would hold it.
    chosen, _ = domain_backup.select_keys(world.policies, SiteKind.EMBASSY, DEFAULT_MATRIX)
    rogue = world.build(CLOUD, keys=chosen)
    with pytest.raises(
        InvalidRequestError, match="key 'census', classified secret, which may never"
    ):
        domain_backup.check_target(rogue, CLOUD, DEFAULT_MATRIX)


def test_a_refresh_refuses_public_versions_that_clash_before_writing(
    world: Domain, backup: DomainBackup
) -> None:
    """What a site already holds decides: the same public key is present, anything else is a
    conflict (the refresh checks every key before its first write)."""
    manifest = next(k for k in backup.verify_keys if k.policy.name == "backup-manifest")
    assert manifest.policy.origin_site == "home"
    here = world.signers[0]  # home's own key, both versions: a failback backup brings them back
    check = domain_backup._verify_key_conflicts
    check(manifest, None)  # a key this site lacks: added
    check(manifest, here)  # this site's own key with the same public keys: left as it is
    check(manifest, here.with_changes(origin_site="home", versions={1: here.versions[1]}))
    other = world.signers[2]  # another key's public key under the same name and number
    clashing = here.with_changes(versions={**here.versions, 2: other.versions[1]})
    with pytest.raises(ConflictError, match="version 2 exists here with another public key"):
        check(manifest, clashing)
    with pytest.raises(ConflictError, match="is this site's own signing key here"):
        check(manifest, here.with_changes(versions={1: here.versions[1]}))
    foreign = here.with_changes(origin_site="embassy", versions={1: here.versions[1]})
    with pytest.raises(ConflictError, match="is verify-only from site 'embassy' here"):
        check(manifest, foreign)
    with pytest.raises(ConflictError, match="is ed25519 here"):
        check(manifest, world.signers[1].with_changes(name="backup-manifest"))
    pending = KeyVersion(2, os.urandom(16), VersionState.PENDING, NOW)
    with pytest.raises(ConflictError, match="version 2 is being created or deleted"):
        check(
            manifest,
            here.with_changes(origin_site="home", versions={1: here.versions[1], 2: pending}),
        )


# --- MAC and signature --------------------------------------------------------------------


def _edit(document: dict[str, Any], change: Any) -> dict[str, Any]:
    edited = copy.deepcopy(document)
    change(edited)
    return edited


TAMPERS = {
    "classification": lambda d: d["keys"][0].__setitem__("classification", "public"),
    "escrow swapped": lambda d: d["keys"][1]["versions"][0].__setitem__(
        "escrow", d["keys"][2]["versions"][0]["escrow"]
    ),
    "principal role": lambda d: d["principals"][0].__setitem__("roles", ["official"]),
    "site status": lambda d: d["sites"][1].__setitem__("status", "active"),
    "target": lambda d: d["target"].__setitem__("name", "elsewhere"),
    "key dropped": lambda d: d["keys"].pop(),
    "public key swapped": lambda d: d["verify_keys"][0]["versions"][0].__setitem__(
        "public_key", d["verify_keys"][1]["versions"][0]["public_key"]
    ),
    "origin": lambda d: d["verify_keys"][0].__setitem__("origin", "embassy"),
    "verify key dropped": lambda d: d["verify_keys"].pop(),
}


@pytest.mark.parametrize("change", TAMPERS.values(), ids=TAMPERS.keys())
def test_a_change_breaks_the_signature_and_resigned_the_mac(
    world: Domain, backup: DomainBackup, change: Any
) -> None:
    tampered = _edit(backup.document, change)
    with pytest.raises(InvalidRequestError, match="signature does not verify"):
        domain_backup.parse(tampered)
    # With the audit signing key (no quorum), the signature can be made again; the MAC not.
    resigned = domain_backup.parse(world.resign(tampered))
    with pytest.raises(InvalidRequestError, match="MAC does not verify"):
        domain_backup.verify_mac(resigned, world.keys)


def test_another_domains_keys_refuse_the_mac(backup: DomainBackup) -> None:
    other = RootKeys.derive(os.urandom(32))
    with pytest.raises(InvalidRequestError, match="MAC does not verify"):
        domain_backup.verify_mac(backup, other)
    with pytest.raises(InvalidRequestError, match="security-domain key does not open"):
        domain_backup.open_domain_key(backup, other)


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (lambda s: s.replace("..", ".e30."), "detached compact JWS"),
        (lambda s: s[: s.rindex(".") + 1] + "AAAA", "does not verify|well-formed"),
        (lambda _s: "not a jws", "detached compact JWS"),
        (
            lambda s: (
                jose.b64url_encode(b'{"alg":"ES256","kid":"x","typ":"ekms-domain-backup+jws"}')
                + s[s.index("..") :]
            ),
            "names another key",
        ),
        (
            lambda s: (
                jose.b64url_encode(b'{"alg":"EdDSA","kid":"x","typ":"other"}') + s[s.index("..") :]
            ),
            "must name alg ES256",
        ),
    ],
)
def test_malformed_signatures_are_named(backup: DomainBackup, signature: Any, message: str) -> None:
    document = {**backup.document, "signature": signature(backup.document["signature"])}
    with pytest.raises(InvalidRequestError, match=f"domain backup: signature .*({message})"):
        domain_backup.parse(document)


def test_the_mac_is_compared_in_full(world: Domain, backup: DomainBackup) -> None:
    flipped = backup.document["mac"][:-1] + ("0" if backup.document["mac"][-1] != "0" else "1")
    parsed = domain_backup.parse({**backup.document, "mac": flipped})
    with pytest.raises(InvalidRequestError, match="MAC does not verify"):
        domain_backup.verify_mac(parsed, world.keys)


# --- structure: precise errors ------------------------------------------------------------


STRUCTURE = [
    (lambda d: d.pop("sites"), "the document lacks field 'sites'"),
    (lambda d: d.__setitem__("extra", 1), "the document has unknown field 'extra'"),
    (lambda d: d.__setitem__("format", "embassy-kms/domain-backup/v2"), "format must be"),
    (lambda d: d.__setitem__("backup_id", "nope"), "backup_id must be a lower-case UUID"),
    (lambda d: d.__setitem__("mac", "00"), "mac must be 64 lower-case hex digits"),
    (lambda d: d.__setitem__("created_at_us", 1.5), "float"),
    (lambda d: d.__setitem__("domain_key", "AAAA"), "domain_key must encode 61 bytes"),
    (
        lambda d: d["keys"][0]["versions"][0].__setitem__("escrow", "***"),
        r"keys\[0\]\.versions\[0\]\.escrow must be unpadded base64url",
    ),
    (
        lambda d: d["keys"][0]["versions"].reverse(),
        r"keys\[0\]\.versions\[1\]\.number must be larger than the previous",
    ),
    (
        lambda d: d["keys"][0].__setitem__("type", "ed25519"),
        r"keys\[0\]\.type must be aes256-gcm96",
    ),
    (
        lambda d: d["keys"][1].__setitem__("name", d["keys"][0]["name"]),
        r"keys\[1\]\.name repeats key",
    ),
    (lambda d: d["keys"][0].__setitem__("name", "ekms/x"), r"keys\[0\]\.name is wrong"),
    (
        lambda d: d["keys"][2]["versions"][0].__setitem__("wrapped_working_key", None),
        r"wrapped_working_key must be present exactly for memory residency",
    ),
    (
        lambda d: d["principals"][0].__setitem__("thumbprint", "x"),
        r"principals\[0\]\.thumbprint is not the thumbprint of the jwk",
    ),
    (
        lambda d: d["principals"][0].__setitem__("roles", ["king"]),
        r"principals\[0\]\.roles is wrong: unknown role",
    ),
    (lambda d: d["sites"][0].__setitem__("status", "asleep"), r"sites\[0\]\.status is wrong"),
    (
        lambda d: d["share_set"]["members"][0].__setitem__("member", "9.9"),
        r"share_set\.members\[0\]\.member is not a member",
    ),
    (
        lambda d: d["audit"]["tree_head"].__setitem__("size", 43),
        r"audit\.tree_head is wrong: tree head refused",
    ),
    (lambda d: d["target"].__setitem__("kind", "moon"), r"target\.kind is wrong"),
    (lambda d: d.pop("verify_keys"), "the document lacks field 'verify_keys'"),
    (
        lambda d: d["verify_keys"][0].__setitem__("type", "aes256-gcm96"),
        r"verify_keys\[0\]\.type must be a signing key type",
    ),
    (
        lambda d: d["verify_keys"][0].__setitem__("name", d["keys"][0]["name"]),
        r"verify_keys\[0\]\.name repeats key",
    ),
    (
        lambda d: d["verify_keys"][0]["versions"][0].__setitem__("public_key", "AAAA"),
        r"verify_keys\[0\]\.versions\[0\]\.public_key is not a DER SubjectPublicKeyInfo",
    ),
    (  # an Ed25519 key where a P-256 key belongs
        lambda d: d["verify_keys"][0]["versions"][0].__setitem__(
            "public_key",
            next(k for k in d["verify_keys"] if k["type"] == "ed25519")["versions"][0][
                "public_key"
            ],
        ),
        r"verify_keys\[0\]\.versions\[0\]\.public_key is not an ecdsa-p256 public key",
    ),
    (
        lambda d: d["verify_keys"][0]["versions"].reverse(),
        r"verify_keys\[0\]\.versions\[1\]\.number must be larger than the previous",
    ),
    (
        lambda d: d["verify_keys"][0].__setitem__("versions", []),
        r"verify_keys\[0\]\.versions must list at least one version",
    ),
    (lambda d: d["verify_keys"][0].__setitem__("origin", "Home!"), r"origin is wrong"),
    (
        lambda d: d["verify_keys"][0]["versions"][0].__setitem__("escrow", "AAAA"),
        r"verify_keys\[0\]\.versions\[0\] has unknown field 'escrow'",
    ),
]


@pytest.mark.parametrize(("change", "message"), STRUCTURE)
def test_structure_errors_name_the_field(
    world: Domain, backup: DomainBackup, change: Any, message: str
) -> None:
    document = world.resign(_edit(backup.document, change))  # so only the structure is wrong
    with pytest.raises(InvalidRequestError, match=message):
        domain_backup.parse(document)


def test_size_limits(world: Domain, backup: DomainBackup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domain_backup, "MAX_KEYS", 2)
    with pytest.raises(InvalidRequestError, match="keys must be a list of at most 2 entries"):
        domain_backup.parse(backup.document)
    monkeypatch.setattr(domain_backup, "MAX_KEYS", 100)
    monkeypatch.setattr(domain_backup, "MAX_BODY_BYTES", 1000)
    with pytest.raises(InvalidRequestError, match="body is larger than 1000 bytes"):
        domain_backup.parse(backup.document)
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        domain_backup.parse(["not", "an", "object"])


# --- escrow -------------------------------------------------------------------------------


def test_escrow_is_bound_to_key_version_type_and_domain() -> None:
    sdk, other = os.urandom(32), os.urandom(32)
    material = os.urandom(32)
    aes = KeyType.AES256_GCM96
    escrow = domain.wrap_escrow(sdk, "laws", 1, aes, material, random=RANDOM)
    assert len(escrow) == domain.ESCROW_BYTES
    assert material not in escrow
    assert bytes(domain.unwrap_escrow(sdk, "laws", 1, aes, escrow)) == material
    for args in (
        (sdk, "laws", 2, aes),
        (sdk, "law", 1, aes),
        (sdk, "laws", 1, KeyType.ED25519),
        (other, "laws", 1, aes),
    ):
        with pytest.raises(domain.EscrowError) as refused:
            domain.unwrap_escrow(*args, escrow)  # type: ignore[arg-type]
        assert material.hex() not in str(refused.value)
        assert "does not open" in str(refused.value)
    for damaged in (escrow[:-1], b"\x02" + escrow[1:], escrow[:20] + bytes(1) + escrow[21:]):
        with pytest.raises(domain.EscrowError):
            domain.unwrap_escrow(sdk, "laws", 1, aes, damaged)


def test_escrow_aad_cannot_be_confused() -> None:
    aes = KeyType.AES256_GCM96
    assert domain.escrow_aad("ab", 1, aes) != domain.escrow_aad("a", 0x62_00_00_00 + 1, aes)
    with pytest.raises(InvalidRequestError, match="only aes256-gcm96 keys are escrowed"):
        domain.wrap_escrow(os.urandom(32), "s", 1, KeyType.ECDSA_P256, b"x" * 32, random=RANDOM)


def test_the_domain_key_is_sealed_under_the_domain_wrapping_key(world: Domain) -> None:
    assert bytes(domain.open_domain_key(world.keys, world.sealed_sdk)) == bytes(world.sdk)
    assert world.sealed_sdk.name == "security-domain-key"
    assert bytes(world.sdk) not in world.sealed_sdk.blob


def test_escrows_that_do_not_open_are_refused_before_anything(
    world: Domain, backup: DomainBackup
) -> None:
    versions = list(backup.keys[0].versions)
    versions[0] = BackupVersion(versions[0].number, NOW, backup.keys[1].versions[0].escrow)
    keys = [BackupKey(backup.keys[0].policy, tuple(versions)), *backup.keys[1:]]
    moved = world.build(EMBASSY, keys=keys)
    domain_backup.verify_mac(moved, world.keys)  # made by the domain, yet the escrow is moved
    sdk = domain_backup.open_domain_key(moved, world.keys)
    name = backup.keys[0].policy.name
    with pytest.raises(domain.EscrowError, match=f"escrow of key {name!r} version 1"):
        domain_backup.check_escrows(moved, sdk)
