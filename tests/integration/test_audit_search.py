"""Searching the audit log and counting key use, over HTTP, as officers and auditors do.

A real server (SoftHSM, SQLite or PostgreSQL) with the officials, officer, operator and tool of
``test_access``. Every answer is checked against the records as stored, not against itself.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest

import api.audit_log
from kms.canonical import canonical_json
from kms.merkle import leaf_hash
from tests.integration import test_access
from tests.integration.test_access import Party, World

world = test_access.world  # the fixture, under its own name


@pytest.fixture
def auditor(world: World) -> str:
    """An auditor's token, registered by the officer."""
    party = Party.ec("auditor")
    world.call(
        "POST",
        "ekms/principals/auditor",
        world.login(world.officer),
        body={"roles": ["auditor"], "jwk": party.jwk},
    ).raise_for_status()
    return world.login(party)


def encrypt(world: World, key: str, token: str) -> int:
    body = {"plaintext": base64.b64encode(b"x").decode(), "context": "Y3R4"}
    return world.call("POST", f"transit/encrypt/{key}", token, body=body).status_code


def activity(world: World) -> None:
    """Allowed key use by root, denied key use by the operator, and an error."""
    for _ in range(3):
        assert encrypt(world, "laws", world.root) == 200
    assert encrypt(world, "registry", world.root) == 200
    operator = world.login(world.operator)
    body = {"ciphertext": "vault:v1:AAAA", "context": "Y3R4"}
    assert world.call("POST", "transit/decrypt/laws", operator, body=body).status_code == 403
    assert world.call("POST", "transit/encrypt/nope", world.root, body={}).status_code in (
        400,
        404,
    )


def search(world: World, token: str, **params: Any) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    response = world.call("GET", f"ekms/audit/records?{query}", token)
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def stored(world: World) -> list[dict[str, Any]]:
    return world.server.runtime.store.audit_records(limit=100_000)


def test_pages_newest_first_and_forward(world: World, auditor: str) -> None:
    activity(world)
    first = search(world, auditor, limit=3)
    size = first["size"]
    assert [r["index"] for r in first["records"]] == [size - 1, size - 2, size - 3]
    assert first["next"] == size - 3

    seen, page = [], first
    while True:
        seen += [r["index"] for r in page["records"]]
        for item in page["records"]:
            assert item["leaf_hash"] == leaf_hash(canonical_json(item["record"])).hex()
        if page["next"] is None:
            break
        page = search(world, auditor, before=page["next"], limit=4)
    assert seen == list(reversed(range(size)))

    rows = {row["seq"]: row for row in stored(world)}
    forward, after = [], -1
    while True:
        page = search(world, auditor, after=after, limit=5)
        assert [r["index"] for r in page["records"]] == sorted(r["index"] for r in page["records"])
        forward += page["records"]
        if page["next"] is None:
            break
        after = page["next"]
    assert [r["index"] for r in forward][:size] == list(range(size))
    for item in forward[:size]:
        row = rows[item["index"]]
        assert item["record"] == {k: v for k, v in row.items() if k not in ("seq", "leaf_index")}

    # Following: polling after the newest index finds what was written since.
    newest = search(world, auditor, limit=1)["size"] - 1
    assert encrypt(world, "laws", world.root) == 200
    new = search(world, auditor, after=newest, operation="transit.encrypt")
    assert [r["record"]["key"] for r in new["records"]] == ["laws"]
    assert new["next"] is None
    assert new["records"][0]["index"] > newest
    beyond = search(world, auditor, after=10**6)
    assert beyond == {"records": [], "size": beyond["size"], "next": None}


def test_filters(world: World, auditor: str) -> None:
    activity(world)
    allowed = search(world, auditor, key="laws", decision="allow", limit=100)["records"]
    assert [r["record"]["operation"] for r in allowed] == [
        *["transit.encrypt"] * 3,
        "transit.key.create",
    ]
    denied = search(world, auditor, key="laws", decision="deny")["records"]
    assert [(r["record"]["principal"], r["record"]["operation"]) for r in denied] == [
        ("operator", "transit.decrypt")
    ]
    transit = search(world, auditor, operation="transit.*", limit=1000)["records"]
    assert {r["record"]["operation"] for r in transit} == {
        "transit.encrypt",
        "transit.decrypt",
        "transit.key.create",
    }
    exact = search(world, auditor, operation="transit.decrypt")["records"]
    assert len(exact) == 1
    assert search(world, auditor, operation="transit")["records"] == []
    logins = search(world, auditor, principal="operator", operation="auth.login")["records"]
    assert logins
    assert all(r["record"]["principal"] == "operator" for r in logins)

    one = stored(world)[-1]
    found = search(world, auditor, request_id=one["request_id"])["records"]
    assert [r["index"] for r in found] == [one["seq"]]

    moment = one["time_us"] / 1_000_000
    iso = datetime.fromtimestamp(moment, UTC).isoformat()
    newer = search(world, auditor, since=f"{moment:.6f}", limit=1000)["records"]
    assert one["seq"] in {r["index"] for r in newer}
    assert all(r["record"]["time_us"] >= one["time_us"] for r in newer)
    older = search(world, auditor, until=iso.replace("+00:00", "Z"), limit=1000)["records"]
    assert one["seq"] not in {r["index"] for r in older}
    assert all(r["record"]["time_us"] < one["time_us"] for r in older)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_bounded_scan_answers_with_where_to_go_on(
    world: World, auditor: str, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """With a rare match, a page may hold fewer than ``limit``; ``next`` still leads to all."""
    activity(world)
    monkeypatch.setattr(api.audit_log, "SEARCH_SCAN_LIMIT", 4)
    expected = [r["seq"] for r in stored(world) if r.get("key") == "laws"]
    found: list[int] = []
    page = search(world, auditor, key="laws", limit=100)
    pages = 1
    while True:
        found += [r["index"] for r in page["records"]]
        if page["next"] is None:
            break
        page = search(world, auditor, key="laws", limit=100, before=page["next"])
        pages += 1
    assert pages > 2
    assert sorted(found) == [i for i in expected if i < page["size"]]


BAD_RECORD_QUERIES = [
    ("after=1&before=5", "not both"),
    ("limit=0", "limit must be from 1 to 1000"),
    ("limit=1001", "limit must be from 1 to 1000"),
    ("limit=ten", "limit must be an integer"),
    ("after=-2", "after must be an integer"),
    ("before=1e3", "before must be an integer"),
    ("decision=maybe", "unknown decision 'maybe'; expected one of: allow, deny, error"),
    ("operation=tr*nsit", "'*' only at its end"),
    ("since=yesterday", "since must be seconds since the epoch or an RFC 3339"),
    ("until=2025-01-01T00:00:00", "with a time zone"),
    ("since=20&until=10", "since must be earlier than until"),
    ("color=red", "unknown query parameter 'color'"),
    ("key=a&key=b", "'key' is given more than once"),
    ("principal=" + "p" * 300, "principal must be 1 to 256 printable characters"),
    ("key=", "key must be 1 to 256 printable characters"),
]
BAD_USAGE_QUERIES = [
    ("bucket=week", "unknown bucket 'week'; expected one of: hour, day"),
    ("since=2000&until=1000", "since must be earlier than until"),
    ("since=0&until=86400000", "at most 2000 buckets"),
    ("bucket=day&since=0&until=1000000000", "at most 2000 buckets"),
    ("since=soon", "since must be seconds since the epoch"),
    ("limit=5", "unknown query parameter 'limit'"),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_parameters(world: World, database_url: str) -> None:
    cases = [("records", *case) for case in BAD_RECORD_QUERIES]
    cases += [("usage", *case) for case in BAD_USAGE_QUERIES]
    for path, query, message in cases:
        response = world.call("GET", f"ekms/audit/{path}?{query}", world.root)
        assert response.status_code == 400, (query, response.text)
        assert message in response.json()["errors"][0], query


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_only_officers_auditors_and_root(world: World, auditor: str, database_url: str) -> None:
    officer = world.login(world.officer)
    for token in (world.root, officer, auditor):
        for path in ("ekms/audit/records", "ekms/audit/usage"):
            assert world.call("GET", path, token).status_code == 200
    others = (
        world.login(world.operator),
        world.login(world.officials[0]),
        None,
        "ekms.not-a-token",
    )
    for token in others:
        for path in ("ekms/audit/records", "ekms/audit/usage"):
            response = world.call("GET", path, token)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["errors"] == ["permission denied"]


def test_usage_buckets(world: World, auditor: str) -> None:
    activity(world)
    records = [r for r in stored(world) if "key" in r and r["decision"] in ("allow", "deny")]
    hourly = world.call("GET", "ekms/audit/usage", auditor)
    assert hourly.status_code == 200, hourly.text
    data = hourly.json()["data"]
    assert data["bucket"] == 3600
    assert data["until"] % 3600 == 0
    assert data["until"] - data["since"] == 7 * 86_400
    series = {s["key"]: s["points"] for s in data["series"]}
    for name in ("laws", "registry"):
        mine = [r for r in records if r["key"] == name]
        expected: dict[int, list[int]] = {}
        for r in mine:
            slot = r["time_us"] // 1_000_000 // 3600 * 3600
            point = expected.setdefault(slot, [0, 0])
            point[0 if r["decision"] == "allow" else 1] += 1
        assert series[name] == [[slot, *expected[slot]] for slot in sorted(expected)]
    laws = series["laws"]
    assert sum(p[1] for p in laws) >= 3
    assert sum(p[2] for p in laws) == 1

    daily = world.call("GET", "ekms/audit/usage?bucket=day&key=laws", auditor).json()["data"]
    assert daily["bucket"] == 86_400
    assert daily["until"] - daily["since"] == 90 * 86_400
    assert [s["key"] for s in daily["series"]] == ["laws"]
    assert sum(p[1] for p in daily["series"][0]["points"]) == sum(p[1] for p in laws)

    past = world.call("GET", "ekms/audit/usage?since=0&until=86400&bucket=day", auditor)
    assert past.json()["data"]["series"] == []
