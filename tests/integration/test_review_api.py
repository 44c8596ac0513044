"""Access reviews over HTTP: the report (JSON, CSV, filters) and review campaigns end to end.

A real server (SoftHSM, SQLite and PostgreSQL) with the parties of ``test_access``'s world plus
a second security officer and an auditor. Campaign races are driven through the service with a
store whose reads wait for each other, so both writers really hold the same version.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import requests
import sqlalchemy as sa

from kms.access import Identity
from kms.errors import ConflictError
from kms.identity import Role
from kms.ports import SystemClock
from kms.review import Campaign
from kms.review_service import LastOfficerError, ReviewService
from storage.schema import review_campaigns
from tests.integration.test_access import (
    Party,
    World,
    encrypt,
    grant,
)
from tests.integration.test_access import world as world_fixture  # noqa: F401 - the fixture

if TYPE_CHECKING:
    from storage.sql_store import SqlStore

REVIEW = "ekms/review"
CAMPAIGNS = f"{REVIEW}/campaigns"
ID_RE = re.compile(r"[a-z0-9-]{8,64}")
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass
class Review:
    """``test_access``'s world, with a second security officer and an auditor."""

    world: World
    officer2: Party
    auditor: Party

    @property
    def store(self) -> SqlStore:
        return self.world.server.runtime.store

    def call(self, method: str, path: str, token: str | None, body: Any = None) -> Any:
        return self.world.call(method, path, token, body=body)

    def ok(self, method: str, path: str, token: str, body: Any = None) -> dict[str, Any]:
        response = self.call(method, path, token, body)
        assert response.status_code == 200, response.text
        return dict(response.json()["data"])

    def login(self, party: Party) -> str:
        return self.world.login(party)

    def audit(self, operation: str) -> list[dict[str, Any]]:
        return [r for r in self.store.audit_records(100_000) if r["operation"] == operation]


@pytest.fixture
def review(world_fixture: World) -> Review:  # noqa: F811 - test_access's world, by that name
    world = world_fixture
    officer = world.login(world.officer)
    parties = Review(world, Party.ec("officer-2"), Party.ec("auditor"))
    for party, role in ((parties.officer2, "security-officer"), (parties.auditor, "auditor")):
        world.call(
            "POST", f"ekms/principals/{party.id}", officer, body={"roles": [role], "jwk": party.jwk}
        ).raise_for_status()
    return parties


def error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return "; ".join(response.json()["errors"])


# --- the report ---------------------------------------------------------------------------


def test_report_json_csv_and_filters(review: Review) -> None:
    world = review.world
    ciphertext = encrypt(world, "laws", b"gazette")
    request, credential = grant(world, ["laws"])
    body = {"ciphertext": ciphertext, "context": "Y3R4"}
    assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 200
    assert world.tool_call("transit/decrypt/registry", credential, body).status_code == 403
    officer = review.login(world.officer)

    data = review.ok("GET", f"{REVIEW}/report", officer)
    assert {p["id"] for p in data["principals"]} >= {"officer", "officer-2", "auditor"}
    assert [g["id"] for g in data["grants"]] == [request["id"]]
    assert data["grants"][0]["credentials_issued"] == 1
    used = [u for u in data["usage"] if u["principal"] == "restore-tool" and u["used"]]
    assert used == [
        {
            "principal": "restore-tool",
            "dataset": "laws",
            "site": "embassy-1",
            "issued": 1,
            "used": 1,
            "denied": 0,
        }
    ]
    assert data["unused_keys"] == ["registry"]
    assert any(d["key"] == "registry" for d in data["denials"]["listed"])
    assert {o["official"] for o in data["officials"]} == {"official-0", "official-1", "official-2"}
    assert data["skipped_records"] == 0

    # Filters: principal, dataset, site, a window, dormancy; one section in JSON.
    tool = review.ok("GET", f"{REVIEW}/report?principal=restore-tool", officer)
    assert [p["id"] for p in tool["principals"]] == ["restore-tool"]
    assert review.ok("GET", f"{REVIEW}/report?dataset=registry", officer)["grants"] == []
    assert review.ok("GET", f"{REVIEW}/report?site=elsewhere", officer)["usage"] == []
    future = "since=2999-01-01T00:00:00Z&until=2999-12-31T00:00:00%2B02:00"
    quiet = review.ok("GET", f"{REVIEW}/report?{future}", officer)
    assert quiet["usage"] == []
    assert quiet["denials"]["total"] == 0
    assert quiet["filters"]["window"]["start"] == 32472144000.0
    assert len(quiet["principals"]) == len(data["principals"])  # standing facts stay
    section = review.ok("GET", f"{REVIEW}/report?section=unused-keys&dormant_days=1", officer)
    assert set(section) == {"generated_at", "filters", "skipped_records", "unused_keys"}
    assert section["filters"]["dormant_after_days"] == 1

    # CSV: one section, as an attachment, with a header row.
    answer = world.call("GET", f"{REVIEW}/report?format=csv&section=principals", officer)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"] == (
        'attachment; filename="ekms-review-principals.csv"'
    )
    rows = list(csv.reader(io.StringIO(answer.text)))
    assert rows[0][:3] == ["id", "display_name", "roles"]
    assert {r[0] for r in rows[1:]} == {p["id"] for p in data["principals"]}
    usage = world.call("GET", f"{REVIEW}/report?format=csv&section=usage&since=0", officer)
    assert "restore-tool,laws,embassy-1,1,1,0" in usage.text

    # Bad input: a precise 400, never a 500.
    for query, message in (
        ("format=csv", "section is required with format=csv"),
        ("format=xml", "format must be json or csv"),
        ("section=secrets", "unknown report section"),
        ("since=yesterday", "since must be seconds since the epoch or an RFC 3339"),
        ("since=2026-01-01T00:00:00", "with a time zone"),
        ("since=20&until=10", "since must not be later than until"),
        ("dormant_days=0", "dormant_days must be a whole number"),
        ("dormant_days=-5", "dormant_days must be a whole number"),
        ("principal=", "principal must be 1-200 characters"),
        ("colour=red", "unknown query parameter 'colour'"),
    ):
        assert message in error(world.call("GET", f"{REVIEW}/report?{query}", officer), 400)

    # Readers: officers, auditors and the root token; nobody else.
    assert review.ok("GET", f"{REVIEW}/report", review.login(review.auditor))
    assert review.ok("GET", f"{REVIEW}/report", world.root)
    for party in (world.operator, world.officials[0]):
        assert world.call("GET", f"{REVIEW}/report", review.login(party)).status_code == 403
    assert world.call("GET", f"{REVIEW}/report").status_code == 403

    records = review.audit("review.report")
    assert {r["decision"] for r in records} == {"allow", "deny", "error"}
    assert any(r.get("details", {}).get("section") == "principals" for r in records)
    assert any(r.get("details", {}).get("principal") == "restore-tool" for r in records)


def test_store_pages_through_audit_records_and_tokens(review: Review) -> None:
    store = review.store
    for _ in range(3):
        review.login(review.auditor)
    stored = store.audit_records(100_000)
    paged = list(store.each_audit_record(page=4))
    assert [r["request_id"] for r in paged] == [r["request_id"] for r in stored]
    tokens = list(store.each_issued_token(page=2))
    assert sorted(t["jti"] for t in tokens) == sorted(
        t["jti"] for t in store.issued_tokens(limit=10_000)
    )
    assert len(tokens) >= 5


# --- campaigns ----------------------------------------------------------------------------


def test_campaign_from_open_to_close(review: Review) -> None:
    world = review.world
    officer, officer2 = review.login(world.officer), review.login(review.officer2)
    operator_token = review.login(world.operator)
    scope = ["officer", "officer-2", "operator", "restore-tool"]

    opened = review.ok("POST", CAMPAIGNS, officer, {"duration": "2h", "scope": scope})
    campaign = opened["campaign"]
    cid = campaign["id"]
    assert ID_RE.fullmatch(cid)
    assert campaign["state"] == "open"
    assert campaign["opened_by"] == "officer"
    assert campaign["closes_at"] - campaign["opened_at"] == 7200
    assert sorted(campaign["items"]) == sorted(scope)
    assert {i["state"] for i in campaign["items"].values()} == {"pending"}
    assert opened["principals"]["operator"] == {
        "roles": ["restore-operator"],
        "display_name": "",
        "active": True,
    }

    # Decisions: by an officer other than the principal; a revocation says why.
    certified = review.ok(
        "POST", f"{CAMPAIGNS}/{cid}/certify", officer2, {"principal": "officer", "note": "ok"}
    )
    assert certified["campaign"]["items"]["officer"]["decided_by"] == "officer-2"
    own = world.call(
        "POST", f"{CAMPAIGNS}/{cid}/certify", officer2, body={"principal": "officer-2"}
    )
    assert error(own, 403) == "permission denied"
    no_note = world.call(
        "POST", f"{CAMPAIGNS}/{cid}/revoke", officer, body={"principal": "restore-tool"}
    )
    assert "missing required field 'note'" in error(no_note, 400)
    blank = world.call(
        "POST",
        f"{CAMPAIGNS}/{cid}/revoke",
        officer,
        body={"principal": "restore-tool", "note": "  "},
    )
    assert "a revocation needs a note" in error(blank, 400)
    revoked = review.ok(
        "POST",
        f"{CAMPAIGNS}/{cid}/revoke",
        officer,
        {"principal": "restore-tool", "note": "tool retired"},
    )
    assert revoked["campaign"]["items"]["restore-tool"]["note"] == "tool retired"
    again = world.call(
        "POST", f"{CAMPAIGNS}/{cid}/certify", officer2, body={"principal": "officer"}
    )
    assert "already been certified" in error(again, 409)
    outside = world.call(
        "POST", f"{CAMPAIGNS}/{cid}/certify", officer, body={"principal": "auditor"}
    )
    assert "not under review" in error(outside, 404)

    # Reading: officers, auditors, root; the list has counts.
    auditor = review.login(review.auditor)
    shown = review.ok("GET", f"{CAMPAIGNS}/{cid}", auditor)
    assert shown["campaign"] == revoked["campaign"]
    listed = review.ok("GET", CAMPAIGNS, world.root)
    assert listed["keys"] == [cid]
    assert listed["campaigns"] == [
        {
            "id": cid,
            "state": "open",
            "opened_by": "officer",
            "opened_at": campaign["opened_at"],
            "closes_at": campaign["closes_at"],
            "pending": 2,
            "certified": 1,
            "revoked": 1,
        }
    ]
    assert world.call("LIST", CAMPAIGNS, auditor).json()["data"]["keys"] == [cid]
    assert review.ok("GET", f"{CAMPAIGNS}?list=true&state=open", officer)["keys"] == [cid]
    assert review.ok("GET", f"{CAMPAIGNS}?state=closed", officer)["keys"] == []

    # Close: the pending are suspended, the revoked disabled, their tokens dead at once.
    closed = review.ok("POST", f"{CAMPAIGNS}/{cid}/close", officer)
    assert closed["suspended"] == ["officer-2", "operator"]
    assert closed["revoked"] == ["restore-tool"]
    assert closed["left_to_quorum"] == []
    assert closed["campaign"]["state"] == "closed"
    assert closed["campaign"]["closed_by"] == "officer"
    assert world.call("GET", "auth/token/lookup-self", operator_token).status_code == 401
    assert world.call("GET", CAMPAIGNS, officer2).status_code == 401
    for party in (world.operator, review.officer2, world.tool):
        login = world.call("POST", "auth/jwt/login", body={"jwt": party.assertion()})
        assert login.status_code == 401
    gone = {p.id: p for p in review.store.list_principals()}
    assert all(gone[p].disabled_at is not None for p in ("officer-2", "operator", "restore-tool"))
    assert gone["officer"].active
    live = [
        t
        for t in review.store.each_issued_token()
        if t["principal"] in {"officer-2", "operator", "restore-tool"} and t["revoked_at"] is None
    ]
    assert live == []
    view = review.ok("GET", f"{CAMPAIGNS}/{cid}", officer)
    assert view["principals"]["operator"]["active"] is False

    # A closed campaign takes no more decisions, and closes once.
    late = world.call("POST", f"{CAMPAIGNS}/{cid}/certify", officer, body={"principal": "operator"})
    assert "the campaign is closed" in error(late, 409)
    assert "the campaign is closed" in error(
        world.call("POST", f"{CAMPAIGNS}/{cid}/close", officer), 409
    )
    assert review.ok("GET", f"{CAMPAIGNS}?state=closed", officer)["keys"] == [cid]

    # Every action is in the audit log, with the campaign and what was decided.
    opens = review.audit("review.campaign.open")
    assert opens[-1]["details"]["campaign"] == cid
    assert opens[-1]["principal"] == "officer"
    decided = [
        (r["details"]["target"], r["details"]["decision"], r["status"])
        for r in review.audit("review.campaign.certify") + review.audit("review.campaign.revoke")
        if "target" in r.get("details", {})
    ]
    assert ("officer", "certified", 200) in decided
    assert ("officer-2", "certified", 403) in decided
    assert ("restore-tool", "revoked", 200) in decided
    closes = review.audit("review.campaign.close")
    assert closes[0]["details"]["suspended"] == ["officer-2", "operator"]
    assert closes[1]["status"] == 409
    assert closes[1]["decision"] == "error"
    assert "closed" in closes[1]["reason"]
    assert review.audit("review.campaign.read")
    assert review.audit("review.campaign.list")


class _RacingStore:
    """The real store, but the first read of each thread waits until both threads have read."""

    def __init__(self, store: SqlStore, parties: int) -> None:
        self._store = store
        self._barrier = threading.Barrier(parties, timeout=10)
        self._seen: set[int] = set()
        self.lost = 0  # writes refused because the other thread stored its change first

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def campaign(self, campaign_id: str) -> tuple[Campaign, int] | None:
        found = self._store.campaign(campaign_id)
        if threading.get_ident() not in self._seen:
            self._seen.add(threading.get_ident())
            self._barrier.wait()
        return found

    def update_campaign(self, campaign: Campaign, *, version: int) -> bool:
        stored = self._store.update_campaign(campaign, version=version)
        self.lost += not stored
        return stored


def _race(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(n: int) -> None:
        try:
            results[n] = calls[n]()
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_two_officers_deciding_at_once_lose_nothing(review: Review) -> None:
    officer = review.login(review.world.officer)
    scope = ["auditor", "operator", "restore-tool"]
    cid = review.ok("POST", CAMPAIGNS, officer, {"duration": 7200, "scope": scope})["campaign"][
        "id"
    ]
    one = Identity("officer", frozenset({Role.SECURITY_OFFICER}))
    two = Identity("officer-2", frozenset({Role.SECURITY_OFFICER}))

    racing = _RacingStore(review.store, 2)
    service = ReviewService(store=racing, clock=SystemClock())
    results = _race(
        lambda: service.certify(one, cid, "operator"),
        lambda: service.revoke(two, cid, "restore-tool", "unused"),
    )
    assert not any(isinstance(r, Exception) for r in results), results
    campaign, version = review.store.campaign(cid) or (None, 0)
    assert campaign is not None
    assert racing.lost == 1  # both read version 1; the loser read again and re-applied
    assert version == 3
    assert campaign.items["operator"].state.value == "certified"
    assert campaign.items["restore-tool"].state.value == "revoked"

    # The same principal at once: one decision stands, the other is told it was decided.
    service = ReviewService(store=_RacingStore(review.store, 2), clock=SystemClock())
    results = _race(
        lambda: service.certify(one, cid, "auditor"),
        lambda: service.revoke(two, cid, "auditor", "not needed"),
    )
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 1
    assert isinstance(refused[0], ConflictError)
    assert "already been" in str(refused[0])
    assert review.store.campaign(cid)[1] == 4  # type: ignore[index]


# --- guards and errors --------------------------------------------------------------------


@sqlite_only
def test_last_officer_guard_and_officials(review: Review) -> None:
    world = review.world
    officer = review.login(world.officer)
    # officer-2 is disabled first, so "officer" is the only security officer left.
    assert world.call("POST", "ekms/principals/officer-2/disable", officer).status_code == 200
    opened = review.ok("POST", CAMPAIGNS, officer, {"duration": "1h"})
    cid = opened["campaign"]["id"]
    assert "officer-2" not in opened["campaign"]["items"]  # disabled: nothing to review
    assert "official-0" in opened["campaign"]["items"]

    message = error(world.call("POST", f"{CAMPAIGNS}/{cid}/close", officer), 409)
    assert "every active security officer (officer)" in message
    assert "register a second security officer" in message
    assert review.ok("GET", f"{CAMPAIGNS}/{cid}", officer)["campaign"]["state"] == "open"
    assert all(p.active for p in review.store.list_principals() if p.id != "officer-2")

    # The store refuses the same inside its transaction (two closings at once), changing nothing.
    stored, version = review.store.campaign(cid) or (None, 0)
    assert stored is not None
    closed = Campaign.from_json(
        {**stored.to_json(), "state": "closed", "closed_at": 1.0, "closed_by": "officer"}
    )
    with pytest.raises(LastOfficerError):
        review.store.close_campaign(closed, version=version, disable=["officer"], at=2.0)
    assert review.store.campaign(cid) == (stored, version)
    assert review.store.principal("officer").active  # type: ignore[union-attr]

    # A second officer, registered now, is outside the campaign: closing may go ahead.
    third = Party.ec("officer-3")
    world.call(
        "POST",
        "ekms/principals/officer-3",
        officer,
        body={"roles": ["security-officer"], "jwk": third.jwk},
    ).raise_for_status()
    result = review.ok("POST", f"{CAMPAIGNS}/{cid}/close", officer)
    assert "officer" in result["suspended"]
    # Officials stay: removing one needs a quorum of officials, not one officer.
    assert result["left_to_quorum"] == ["official-0", "official-1", "official-2"]
    assert not set(result["left_to_quorum"]) & set(result["suspended"])
    assert review.login(world.officials[0])
    assert world.call("GET", CAMPAIGNS, officer).status_code == 401
    assert review.ok("GET", CAMPAIGNS, review.login(third))["keys"] == [cid]


@sqlite_only
def test_who_may_act_and_bad_input(review: Review) -> None:
    world = review.world
    officer = review.login(world.officer)

    root = world.call("POST", CAMPAIGNS, world.root, body={"duration": "2h"})
    assert "the root token is not a principal" in error(root, 403)
    for party in (review.auditor, world.operator, world.officials[0]):
        token = review.login(party)
        assert error(world.call("POST", CAMPAIGNS, token, body={"duration": "2h"}), 403) == (
            "permission denied"
        )
    assert world.call("GET", CAMPAIGNS, review.login(world.operator)).status_code == 403
    assert world.call("GET", CAMPAIGNS).status_code == 403

    for body, status, message in (
        ({}, 400, "missing required field 'duration'"),
        ({"duration": "soon"}, 400, "duration must be a whole number of seconds or"),
        ({"duration": True}, 400, "duration must be a whole number"),
        ({"duration": 60}, 400, "duration must be between 3600 and"),
        ({"duration": "91d"}, 400, "duration must be between 3600 and"),
        ({"duration": "2h", "scope": ["nobody"]}, 404, "no principal 'nobody'"),
        ({"duration": "2h", "scope": []}, 400, "reviews at least one principal"),
        ({"duration": "2h", "scope": "operator"}, 400, "scope"),
        ({"duration": "2h", "extra": 1}, 400, "unknown field 'extra'"),
    ):
        assert message in error(world.call("POST", CAMPAIGNS, officer, body=body), status)
    assert world.call("POST", "ekms/principals/operator/disable", officer).status_code == 200
    disabled = world.call(
        "POST", CAMPAIGNS, officer, body={"duration": "2h", "scope": ["operator"]}
    )
    assert "is disabled: nothing to review" in error(disabled, 400)
    broken = world.server.url + f"/v1/{CAMPAIGNS}"
    raw = requests.post(broken, data=b"{", headers={"X-Vault-Token": officer}, timeout=30)
    assert "not valid JSON" in error(raw, 400)

    assert "no review campaign 'nope-nope'" in error(
        world.call("GET", f"{CAMPAIGNS}/nope-nope", officer), 404
    )
    assert world.call("POST", f"{CAMPAIGNS}/nope-nope/close", officer).status_code == 404
    assert "unknown state 'odd'; expected one of: open, closed" in error(
        world.call("GET", f"{CAMPAIGNS}?state=odd", officer), 400
    )
    assert "limit must be" in error(world.call("GET", f"{CAMPAIGNS}?limit=0", officer), 400)

    # A period that is over: decisions are refused with 409; closing still works.
    cid = review.ok(
        "POST", CAMPAIGNS, officer, {"duration": 3600, "scope": ["auditor", "restore-tool"]}
    )["campaign"]["id"]
    stored, _ = review.store.campaign(cid) or (None, 0)
    assert stored is not None
    past = {**stored.to_json(), "opened_at": 1_000_000.0, "closes_at": 1_003_600.0}
    with review.store._engine.begin() as conn:
        conn.execute(
            sa.update(review_campaigns)
            .where(review_campaigns.c.id == cid)
            .values(body=orjson.dumps(Campaign.from_json(past).to_json()).decode())
        )
    over = world.call("POST", f"{CAMPAIGNS}/{cid}/certify", officer, body={"principal": "auditor"})
    assert "review period is over" in error(over, 409)
    result = review.ok("POST", f"{CAMPAIGNS}/{cid}/close", officer)
    assert result["suspended"] == ["auditor", "restore-tool"]
    certify = review.audit("review.campaign.certify")
    assert certify[-1]["status"] == 409
    assert certify[-1]["details"]["campaign"] == cid
