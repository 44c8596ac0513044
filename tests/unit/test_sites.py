"""The site registry's rules, without a server: names, transitions, the gate, proposals, heads."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kms.approvals import ProposalKind
from kms.audit_export import TreeHead, sign_tree_head
from kms.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    SiteUnavailableError,
)
from kms.jose import jwk_thumbprint
from kms.policy import Site, SiteKind
from kms.sites import (
    SiteBackend,
    SiteRecord,
    SiteRegistry,
    SiteStatus,
    StatusChange,
    check_transition,
    may_serve,
    parse_audit_key,
    parse_url,
    validate_site_name,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

S = SiteStatus
FAILOVER, FAILBACK, RETIRE = (
    ProposalKind.SITE_FAILOVER,
    ProposalKind.SITE_FAILBACK,
    ProposalKind.SITE_RETIRE,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_750_000_000.0

    def now(self) -> float:
        return self.t


class FakeStore:
    """The store's contract: rows by name, compare-and-set changes, all or nothing."""

    def __init__(self) -> None:
        self.rows: dict[str, SiteRecord] = {}
        self.revocations = 0

    def sites(self) -> list[SiteRecord]:
        return list(self.rows.values())

    def site(self, name: str) -> SiteRecord | None:
        return self.rows.get(name)

    def insert_site(self, record: SiteRecord, *, only_if_absent: bool = False) -> bool:
        if record.name in self.rows:
            if only_if_absent:
                return False
            raise ConflictError("exists")
        self.rows[record.name] = record
        return True

    def set_site_audit_key(self, name: str, jwk: Mapping[str, str], at: float) -> bool:
        self.rows[name] = replace(self.rows[name], audit_public_key=dict(jwk), updated_at=at)
        return True

    def change_site_statuses(
        self, changes: Sequence[StatusChange], at: float, *, revoke_tokens: bool = False
    ) -> bool:
        if any(self.rows[c.name].status is not c.expect for c in changes):
            return False
        for c in changes:
            self.rows[c.name] = replace(self.rows[c.name], status=c.status, updated_at=at)
        self.revocations += revoke_tokens
        return True


class FakeKeys:
    def __init__(self, *names: str) -> None:
        self.names = list(names)
        self.allowed: set[str] = set()

    def list_names(self) -> list[str]:
        return list(self.names)

    def configure(self, name: str, *, deletion_allowed: bool | None = None) -> object:
        if deletion_allowed:
            self.allowed.add(name)
        return None

    def delete(self, name: str) -> None:
        assert name in self.allowed, "deleted without deletion_allowed"
        self.names.remove(name)


def registry(
    store: FakeStore | None = None, keys: FakeKeys | None = None, name: str = "embassy-1"
) -> SiteRegistry:
    return SiteRegistry(
        store=store or FakeStore(),
        clock=FakeClock(),
        here=Site(name, SiteKind.EMBASSY),
        backend=SiteBackend.PKCS11,
        keys=keys or FakeKeys(),
    )


def record(name: str, status: SiteStatus, **changes: Any) -> SiteRecord:
    values: dict[str, Any] = {
        "name": name,
        "kind": SiteKind.HOME,
        "backend": SiteBackend.PKCS11,
        "status": status,
        "registered_at": 1.0,
        "updated_at": 1.0,
    }
    return SiteRecord(**(values | changes))


class Signer:
    """A site's audit signing key, as its HSM would hold it."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64u(numbers.x.to_bytes(32, "big")),
            "y": _b64u(numbers.y.to_bytes(32, "big")),
        }

    def head(self, size: int = 5) -> dict[str, Any]:
        head = TreeHead(size, bytes(range(32)), 1_750_000_000_000)

        def sign(data: bytes) -> bytes:
            r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        jws = sign_tree_head(head, sign, alg="ES256", kid=jwk_thumbprint(self.jwk))
        return {"type": "head", **head.claims(), "jws": jws}


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- names, fields, transitions, the gate -------------------------------------------------


@pytest.mark.parametrize("name", ["home", "embassy-1", "a", "x" * 64, "0-9"])
def test_valid_site_names(name: str) -> None:
    assert validate_site_name(name) == name


@pytest.mark.parametrize("name", ["", "Home", "x" * 65, "embassy_1", "a b", "é", None, 3])
def test_invalid_site_names(name: object) -> None:
    with pytest.raises(InvalidRequestError, match="a-z, 0-9"):
        validate_site_name(name)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("", True),
        ("https://embassy-1.example:8200", True),
        ("http://10.0.0.1", True),
        ("ftp://x", False),
        ("https://user:pw@x", False),
        ("https://", False),
        ("https://a b", False),
        ("x" * 3000, False),
        (42, False),
    ],
)
def test_urls(url: object, ok: bool) -> None:
    if ok:
        assert parse_url(url) == url
    else:
        with pytest.raises(InvalidRequestError, match="url"):
            parse_url(url)


def test_audit_keys_are_p256_only() -> None:
    signer = Signer()
    assert parse_audit_key(signer.jwk) == signer.jwk
    ed = {"kty": "OKP", "crv": "Ed25519", "x": _b64u(bytes(32))}
    with pytest.raises(InvalidRequestError):
        parse_audit_key(ed)
    with pytest.raises(InvalidRequestError):
        parse_audit_key({"kty": "EC"})


TRANSITIONS = [
    (S.STANDBY, S.ACTIVE, True),
    (S.FAILED_OVER, S.ACTIVE, True),
    (S.ACTIVE, S.FAILED_OVER, True),
    (S.STANDBY, S.FAILED_OVER, True),
    (S.ACTIVE, S.RETIRED, True),
    (S.STANDBY, S.RETIRED, True),
    (S.FAILED_OVER, S.RETIRED, True),
    (S.ACTIVE, S.ACTIVE, True),  # the same status: nothing to do
    (S.ACTIVE, S.STANDBY, False),
    (S.FAILED_OVER, S.STANDBY, False),
    (S.RETIRED, S.ACTIVE, False),
    (S.RETIRED, S.RETIRED, False),
]


@pytest.mark.parametrize(("current", "new", "allowed"), TRANSITIONS)
def test_transitions(current: SiteStatus, new: SiteStatus, allowed: bool) -> None:
    if allowed:
        check_transition("x", current, new)
    else:
        with pytest.raises(ConflictError):
            check_transition("x", current, new)


def test_only_an_active_site_serves() -> None:
    assert may_serve(S.ACTIVE)
    for status in (S.STANDBY, S.FAILED_OVER, S.RETIRED):
        decision = may_serve(status)
        assert not decision
        assert getattr(decision, "reason", "").startswith(f"this site is {status.value}: ")
    assert not may_serve(None)


def test_records_round_trip_and_refuse_bad_documents() -> None:
    signer = Signer()
    row = record("home", S.ACTIVE, url="https://home.example", audit_public_key=signer.jwk)
    assert SiteRecord.from_json(row.to_json()) == row
    assert row.to_json()["audit_kid"] == jwk_thumbprint(signer.jwk)
    for bad in (
        {**row.to_json(), "status": "asleep"},
        {**row.to_json(), "kind": "moon"},
        {**row.to_json(), "backend": "floppy"},
        {**row.to_json(), "registered_at": "yesterday"},
        {**row.to_json(), "updated_at": True},
        {**row.to_json(), "name": "Home"},
        {**row.to_json(), "note": "\x00"},
        [],
    ):
        with pytest.raises(InvalidRequestError):
            SiteRecord.from_json(bad)


# --- the registry -----------------------------------------------------------------------------


def test_own_row_is_written_once_as_active_and_learns_its_audit_key() -> None:
    store = FakeStore()
    sites = registry(store)
    with pytest.raises(SiteUnavailableError, match="not in its own site registry"):
        sites.require_serving()
    own = sites.ensure_own(None)
    assert own.status is S.ACTIVE
    assert own.audit_public_key is None
    sites.require_serving()
    signer = Signer()
    assert sites.ensure_own(signer.jwk).audit_public_key == signer.jwk
    assert sites.refresh_audit_key(None) == store.rows["embassy-1"]


def test_a_standby_row_written_by_an_import_is_kept_and_refuses_key_operations() -> None:
    store = FakeStore()
    store.rows["embassy-1"] = record("embassy-1", S.STANDBY, kind=SiteKind.EMBASSY)
    sites = registry(store)
    assert sites.ensure_own(None).status is S.STANDBY
    with pytest.raises(SiteUnavailableError, match=r"^this site is standby: .*site-failover"):
        sites.require_serving()


def test_register_other_sites_as_standby() -> None:
    sites = registry()
    sites.ensure_own(None)
    signer = Signer()
    home = sites.register(
        "home",
        kind="home",
        backend="pkcs11",
        url="https://home.example",
        audit_public_key=signer.jwk,
    )
    assert home.status is S.STANDBY
    assert [s.name for s in sites.sites()] == ["embassy-1", "home"]
    assert sites.get("home") == home
    with pytest.raises(ConflictError, match="already registered"):
        sites.register("home", kind="home", backend="pkcs11")
    with pytest.raises(ConflictError, match="is this site"):
        sites.register("embassy-1", kind="embassy", backend="pkcs11")
    with pytest.raises(InvalidRequestError, match="unknown site kind"):
        sites.register("cloud", kind="moon", backend="transit")
    with pytest.raises(InvalidRequestError, match="unknown site backend"):
        sites.register("cloud", kind="public-cloud", backend="floppy")
    with pytest.raises(NotFoundError):
        sites.get("nowhere")


# --- proposals ------------------------------------------------------------------------------


def standby_embassy(**keys: Any) -> tuple[SiteRegistry, FakeStore]:
    store = FakeStore()
    store.rows["embassy-1"] = record("embassy-1", S.STANDBY, kind=SiteKind.EMBASSY)
    store.rows["home"] = record("home", S.ACTIVE)
    return registry(store, **keys), store


def test_failover_payload_and_execution() -> None:
    sites, store = standby_embassy()
    clean = sites.proposal_payload(FAILOVER, {"previous": "home", "justification": "flood"})
    assert clean == {"previous": "home", "justification": "flood"}
    assert sites.execute(FAILOVER, clean) == {"active": "embassy-1", "failed_over": "home"}
    assert store.rows["embassy-1"].status is S.ACTIVE
    assert store.rows["home"].status is S.FAILED_OVER
    sites.require_serving()
    with pytest.raises(ConflictError, match="already active"):
        sites.proposal_payload(FAILOVER, clean)
    with pytest.raises(ConflictError, match="already active"):
        sites.execute(FAILOVER, clean)


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        ({"justification": "x"}, InvalidRequestError, "previous is required"),
        ({"previous": "home"}, InvalidRequestError, "justification is required"),
        ({"previous": "home", "justification": "  "}, InvalidRequestError, "justification"),
        ({"previous": "home", "justification": "x" * 2001}, InvalidRequestError, "limited"),
        ({"previous": "embassy-1", "justification": "x"}, InvalidRequestError, "another site"),
        ({"previous": "Home", "justification": "x"}, InvalidRequestError, "a-z"),
        ({"previous": "nowhere", "justification": "x"}, NotFoundError, "no site"),
    ],
)
def test_failover_payload_errors(payload: dict[str, Any], error: type, match: str) -> None:
    sites, _ = standby_embassy()
    with pytest.raises(error, match=match):
        sites.proposal_payload(FAILOVER, payload)


def test_failover_from_a_retired_site_and_at_a_retired_site_is_refused() -> None:
    sites, store = standby_embassy()
    store.rows["home"] = replace(store.rows["home"], status=S.RETIRED)
    with pytest.raises(ConflictError, match="retired"):
        sites.proposal_payload(FAILOVER, {"previous": "home", "justification": "x"})
    store.rows["embassy-1"] = replace(store.rows["embassy-1"], status=S.RETIRED)
    payloads = {
        FAILOVER: {"previous": "home", "justification": "x"},
        FAILBACK: {"embassy": "home", "justification": "x"},
        RETIRE: {"justification": "x"},
    }
    for kind, payload in payloads.items():
        with pytest.raises(ConflictError, match="this site is retired"):
            sites.proposal_payload(kind, payload)
        with pytest.raises(ConflictError, match="this site is retired"):
            sites.execute(kind, payload)


def test_a_registry_changed_meanwhile_is_a_conflict_and_changes_nothing() -> None:
    sites, store = standby_embassy()
    clean = sites.proposal_payload(FAILOVER, {"previous": "home", "justification": "x"})
    real = store.change_site_statuses

    def racing(changes: Sequence[StatusChange], at: float, *, revoke_tokens: bool = False) -> bool:
        store.rows["home"] = replace(store.rows["home"], status=S.FAILED_OVER)  # another node
        return real(changes, at, revoke_tokens=revoke_tokens)

    store.change_site_statuses = racing  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="changed meanwhile"):
        sites.execute(FAILOVER, clean)
    assert store.rows["embassy-1"].status is S.STANDBY


def test_failback_retires_the_embassy() -> None:
    store = FakeStore()
    store.rows["home"] = record("home", S.STANDBY)
    store.rows["embassy-1"] = record("embassy-1", S.ACTIVE, kind=SiteKind.EMBASSY)
    sites = SiteRegistry(
        store=store,
        clock=FakeClock(),
        here=Site("home", SiteKind.HOME),
        backend=SiteBackend.PKCS11,
        keys=FakeKeys(),
    )
    with pytest.raises(NotFoundError):
        sites.proposal_payload(FAILBACK, {"embassy": "embassy-2", "justification": "x"})
    with pytest.raises(InvalidRequestError, match="embassy is required"):
        sites.proposal_payload(FAILBACK, {"justification": "x"})
    clean = sites.proposal_payload(FAILBACK, {"embassy": "embassy-1", "justification": "back"})
    assert sites.execute(FAILBACK, clean) == {"active": "home", "retired": "embassy-1"}
    assert store.rows["home"].status is S.ACTIVE
    assert store.rows["embassy-1"].status is S.RETIRED
    # A second failback (the embassy already retired) only confirms this site.
    assert sites.execute(FAILBACK, clean)["active"] == "home"


def test_retire_revokes_and_destroys_only_with_the_flag() -> None:
    keys = FakeKeys("laws", "registry")
    sites, store = standby_embassy(keys=keys)
    with pytest.raises(InvalidRequestError, match="destroy_keys"):
        sites.proposal_payload(RETIRE, {"justification": "x", "destroy_keys": "yes"})
    keep = sites.proposal_payload(RETIRE, {"justification": "closing"})
    assert keep == {"justification": "closing", "destroy_keys": False}
    assert sites.execute(RETIRE, keep) == {"retired": "embassy-1", "destroyed_keys": []}
    assert store.rows["embassy-1"].status is S.RETIRED
    assert store.revocations == 1
    assert keys.names == ["laws", "registry"]

    keys = FakeKeys("laws", "registry")
    sites, store = standby_embassy(keys=keys)
    destroy = sites.proposal_payload(RETIRE, {"justification": "x", "destroy_keys": True})
    assert sites.execute(RETIRE, destroy)["destroyed_keys"] == ["laws", "registry"]
    assert keys.names == []


def test_decommission_retires_another_site_only_from_the_active_one() -> None:
    decommission = ProposalKind.SITE_DECOMMISSION
    store = FakeStore()
    store.rows["home"] = record("home", S.STANDBY)
    store.rows["embassy-1"] = record("embassy-1", S.STANDBY, kind=SiteKind.EMBASSY)
    sites = SiteRegistry(
        store=store,
        clock=FakeClock(),
        here=Site("home", SiteKind.HOME),
        backend=SiteBackend.PKCS11,
        keys=FakeKeys(),
    )
    payload = {"site": "embassy-1", "justification": "closing the embassy"}
    with pytest.raises(ConflictError, match="only the active site"):
        sites.proposal_payload(decommission, payload)
    store.rows["home"] = record("home", S.ACTIVE)
    with pytest.raises(ConflictError, match="site-retire"):
        sites.proposal_payload(decommission, {"site": "home", "justification": "x"})
    with pytest.raises(NotFoundError):
        sites.proposal_payload(decommission, {"site": "embassy-9", "justification": "x"})
    with pytest.raises(InvalidRequestError, match="registered site"):
        sites.proposal_payload(decommission, {"site": 7, "justification": "x"})
    clean = sites.proposal_payload(decommission, payload)
    assert clean == payload
    assert sites.execute(decommission, clean) == {"retired": "embassy-1"}
    assert store.rows["embassy-1"].status is S.RETIRED
    assert store.rows["home"].status is S.ACTIVE
    assert store.revocations == 0  # this site's tokens are untouched
    with pytest.raises(ConflictError, match="retired already"):
        sites.proposal_payload(decommission, payload)


def test_unknown_kinds_are_not_site_proposals() -> None:
    sites, _ = standby_embassy()
    with pytest.raises(InvalidRequestError, match="not a site proposal"):
        sites.proposal_payload(ProposalKind.DECLARE_EMERGENCY, {"justification": "x"})
    with pytest.raises(InvalidRequestError, match="not a site proposal"):
        sites.execute(ProposalKind.RESTORE, {})


# --- other sites' tree heads -----------------------------------------------------------------


def test_tree_heads_verify_with_the_sites_registered_key() -> None:
    signer, stranger = Signer(), Signer()
    sites, store = standby_embassy()
    store.rows["home"] = replace(store.rows["home"], audit_public_key=signer.jwk)
    line = signer.head(7)
    head, jws = sites.check_tree_head("home", line)
    assert (head.size, jws) == (7, line["jws"])
    assert sites.check_tree_head("home", line["jws"])[0] == head  # the bare JWS carries the head
    with pytest.raises(InvalidRequestError, match="does not verify with site 'home'"):
        sites.check_tree_head("home", stranger.head())
    with pytest.raises(InvalidRequestError, match="does not match its signed payload"):
        sites.check_tree_head("home", {**line, "size": 8})
    with pytest.raises(InvalidRequestError, match="malformed tree head"):
        sites.check_tree_head("home", {**line, "extra": 1})
    with pytest.raises(InvalidRequestError, match="malformed"):
        sites.check_tree_head("home", "not-a-jws")
    with pytest.raises(NotFoundError):
        sites.check_tree_head("nowhere", line)
    with pytest.raises(InvalidRequestError, match="own heads"):
        sites.check_tree_head("embassy-1", line)
    store.rows["home"] = replace(store.rows["home"], audit_public_key=None)
    with pytest.raises(ConflictError, match="no registered audit public key"):
        sites.check_tree_head("home", line)
