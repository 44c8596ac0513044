"""Ceremony scripts: the shipped ones are valid, and each kind of mistake is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from api.cli import main as ekms
from ceremonies.actions import known_actions
from ceremonies.script import (
    At,
    CeremonyRole,
    Quorum,
    Requirement,
    load_script,
    require_runnable,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "ceremonies" / "scripts"
RUNNABLE = [
    "init-domain",
    "unseal-after-restart",
    "rotate-keys",
    "declare-emergency",
    "end-emergency",
    "generate-root",
    "rekey-custodians",
    "replace-custodian",
    "share-drill",
    "provision-site",
    "failover",
    "failback",
    "decommission-site",
]
CUSTODY = {
    "rekey-custodians": {"rekey.start", "rekey.submit-share", "rekey.verify", "share.check"},
    "replace-custodian": {"rekey.start", "rekey.submit-share", "rekey.verify", "share.check"},
    "share-drill": {"drill.start", "drill.check-in", "drill.report"},
    "provision-site": {
        "site.register",
        "domain.export",
        "domain.load",
        "site.check",
        "site.pin-audit-key",
    },
    "failover": {"unseal.submit-shares", "emergency.declare", "site.failover", "site.check"},
    "failback": {"domain.export", "domain.load", "site.failback", "site.retire"},
    "decommission-site": {"site.retire", "site.record-head", "site.decommission"},
}
# Which shipped scripts span two sites (ekms ceremony run --peer URL), and where each step is.
TWO_SITES = {
    "provision-site": "mmmmppppmm",
    "failback": "mpmmmmmmpmmm",
    "decommission-site": "mpmmpm",
}

MINIMAL = {
    "schema": 1,
    "name": "tiny",
    "title": "Tiny",
    "purpose": "A test.",
    "roles": {"administrator": {}, "witness": {}},
    "preconditions": ["unsealed"],
    "steps": [{"n": 1, "title": "Look", "by": "witness", "check": "All well?"}],
}


def check(data: object) -> tuple[list[str], list[str]]:
    report = load_script(yaml.safe_dump(data).encode(), known_actions())
    return list(report.errors), list(report.unknown_actions)


def with_steps(*steps: dict[str, object]) -> dict[str, object]:
    return {**MINIMAL, "steps": list(steps)}


@pytest.mark.parametrize("name", RUNNABLE)
def test_shipped_scripts_are_runnable(name: str) -> None:
    raw = (SCRIPTS / f"{name}.yaml").read_bytes()
    report = load_script(raw, known_actions())
    assert report.errors == ()
    assert report.runnable
    assert require_runnable(report, name).name == name


@pytest.mark.parametrize(("name", "actions"), sorted(CUSTODY.items()))
def test_custody_scripts_use_the_custody_actions(name: str, actions: set[str]) -> None:
    report = load_script((SCRIPTS / f"{name}.yaml").read_bytes(), known_actions())
    assert report.errors == ()
    assert report.unknown_actions == ()
    assert report.script is not None
    assert {step.action for step in report.script.steps if step.action} >= actions


def test_every_shipped_script_is_tested() -> None:
    assert {p.stem for p in SCRIPTS.glob("*.yaml")} == set(RUNNABLE)


def test_minimal_script() -> None:
    report = load_script(yaml.safe_dump(MINIMAL).encode(), known_actions())
    assert report.runnable
    assert report.script is not None
    assert report.script.identities_checked_at_start
    assert report.script.preconditions[0].require is Requirement.UNSEALED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "schema must be 1"),
        ({"name": "Bad Name"}, "name must be"),
        ({"colour": "red"}, "unknown top-level key 'colour'"),
        ({"roles": {"administrator": {}}}, "needs an witness"),
        ({"roles": {**MINIMAL["roles"], "judge": {}}}, "unknown ceremony role 'judge'"),  # type: ignore[dict-item]
        (
            {"roles": {"administrator": {"service_roles": ["king"]}, "witness": {}}},
            "unknown role 'king'",
        ),
        (
            {"roles": {**MINIMAL["roles"], "officials": {"minimum": "most"}}},  # type: ignore[dict-item]
            "unknown quorum 'most'",
        ),
        ({"preconditions": ["sunny"]}, "unknown precondition 'sunny'"),
        ({"preconditions": []}, "add a participants.verify step"),
        ({"steps": []}, "steps must be a non-empty list"),
    ],
)
def test_script_errors(change: dict[str, object], message: str) -> None:
    errors, _ = check({**MINIMAL, **change})
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"n": 2, "title": "T", "by": "witness", "check": "?"}, "n must be 1"),
        ({"n": 1, "title": "T", "by": "witness"}, "exactly one of action"),
        (
            {"n": 1, "title": "T", "by": "witness", "check": "?", "action": "keys.rotate"},
            "exactly one of action",
        ),
        ({"n": 1, "title": "T", "by": "officials", "check": "?"}, "do not include them"),
        ({"n": 1, "title": "T", "by": "witness", "check": "?", "on_failure": "x"}, "on_failure"),
        (
            {"n": 1, "title": "T", "by": "witness", "action": "keys.rotate", "params": {"k": 1}},
            "keys.rotate has no parameter 'k'",
        ),
        (
            {"n": 1, "title": "T", "by": "witness", "action": "keys.rotate", "params": {"keys": 3}},
            "parameter 'keys' must be str or list",
        ),
        ({"n": 1, "title": "T", "by": "witness", "action": "Rotate"}, "dotted name"),
        ({"n": 1, "title": "T", "by": "witness", "check": "?", "then": 2}, "unknown key 'then'"),
    ],
)
def test_step_errors(step: dict[str, object], message: str) -> None:
    errors, _ = check(with_steps(step))
    assert any(message in e for e in errors), errors


def test_unknown_actions_are_listed_not_errors() -> None:
    errors, unknown = check(
        with_steps({"n": 1, "title": "T", "by": "witness", "action": "vault.teleport"})
    )
    assert errors == []
    assert unknown == ["vault.teleport"]


def test_quorum_names_and_numbers() -> None:
    data = {**MINIMAL, "roles": {**MINIMAL["roles"], "officials": {"minimum": "approval-quorum"}}}  # type: ignore[dict-item]
    report = load_script(yaml.safe_dump(data).encode(), known_actions())
    assert report.script is not None
    role = report.script.role(CeremonyRole.OFFICIALS)
    assert role is not None
    assert role.minimum is Quorum.APPROVAL


def test_not_yaml_and_too_large() -> None:
    assert "not valid YAML" in load_script(b"a: [", known_actions()).errors[0]
    assert "larger than" in load_script(b"#" * 300_000, known_actions()).errors[0]
    assert "YAML mapping" in load_script(b"- 1\n", known_actions()).errors[0]


def test_yaml_tags_are_refused() -> None:
    """safe_load only: a tag that would build a Python object is an error, not an object."""
    report = load_script(b"!!python/object/apply:os.system ['true']\n", known_actions())
    assert report.script is None
    assert "not valid YAML" in report.errors[0]


def test_precondition_before_step() -> None:
    data = {**MINIMAL, "preconditions": ["unsealed", {"require": "no-emergency", "before_step": 2}]}
    report = load_script(yaml.safe_dump(data).encode(), known_actions())
    assert report.script is not None
    later = report.script.preconditions[1]
    assert later.applies(1)
    assert not later.applies(2)


@pytest.mark.parametrize("name", RUNNABLE)
def test_which_scripts_span_two_sites(name: str) -> None:
    report = load_script((SCRIPTS / f"{name}.yaml").read_bytes(), known_actions())
    assert report.script is not None
    assert report.script.uses_peer is (name in TWO_SITES)
    if name in TWO_SITES:
        where = "".join(step.at.value[0] for step in report.script.steps)
        assert where == TWO_SITES[name]


def test_steps_and_preconditions_at_the_peer() -> None:
    data = {
        **MINIMAL,
        "preconditions": ["unsealed", {"require": "uninitialised", "at": "peer", "before_step": 2}],
        "steps": [
            {"n": 1, "title": "Look", "by": "witness", "check": "?", "at": "peer"},
            {
                "n": 2,
                "title": "Who",
                "by": "witness",
                "action": "participants.verify",
                "at": "peer",
            },
        ],
    }
    report = load_script(yaml.safe_dump(data).encode(), known_actions())
    assert report.errors == ()
    assert report.script is not None
    assert report.script.uses_peer
    assert [s.at for s in report.script.steps] == [At.PEER, At.PEER]
    assert report.script.preconditions[1].at is At.PEER
    assert report.script.identities_checked_at_start  # the main service is unsealed
    assert not report.script.identities_checked_at_start_at(At.PEER)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # The peer is not unsealed at the start and no step logs the participants in there.
        (
            with_steps({"n": 1, "title": "T", "by": "witness", "check": "?", "at": "peer"}),
            "add a participants.verify step at: peer",
        ),
        # An action that names the other site makes the script a two-site one too.
        (
            with_steps({"n": 1, "title": "T", "by": "administrator", "action": "domain.export"}),
            "the peer is not unsealed before step 1",
        ),
        (
            with_steps({"n": 1, "title": "T", "by": "witness", "check": "?", "at": "moon"}),
            "unknown site (at) 'moon'",
        ),
        (
            {**MINIMAL, "preconditions": ["unsealed", {"require": "emergency", "at": "peer"}]},
            "emergency preconditions are checked at the main service only",
        ),
        (
            {**MINIMAL, "preconditions": [{"require": "unsealed", "where": "peer"}]},
            "only require, before_step and at are allowed",
        ),
    ],
)
def test_two_site_errors(data: dict[str, object], message: str) -> None:
    errors, _ = check(data)
    assert any(message in e for e in errors), errors


def test_an_action_naming_the_other_site_needs_a_peer() -> None:
    data = {
        **MINIMAL,
        "preconditions": ["unsealed", {"require": "unsealed", "at": "peer"}],
        "steps": [{"n": 1, "title": "T", "by": "administrator", "action": "site.record-head"}],
    }
    report = load_script(yaml.safe_dump(data).encode(), known_actions())
    assert report.errors == ()
    assert report.script is not None
    assert report.script.needs_peer
    assert report.script.uses_peer


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["provision-site"], "provision-site spans two sites: give the other site's address"),
        (["rotate-keys", "--peer", "http://127.0.0.1:9"], "rotate-keys happens at one site"),
        (["failback", "--peer-ca", "ca.pem"], "--peer-ca needs --peer"),
        (
            ["decommission-site", "--peer", "http://127.0.0.1:9", "--rehearse"],
            "decommission-site needs two sites (a home and a site provisioned from it)",
        ),
        (["failover", "--rehearse"], "failover needs two sites"),
        (
            ["failback", "--peer", "https://127.0.0.1:9", "--peer-ca", "/nonexistent/ca.pem"],
            "cannot use the CA file /nonexistent/ca.pem",
        ),
    ],
)
def test_the_runner_checks_the_peer_before_anything_runs(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the service is asked anything (the address is a closed port)."""
    code = ekms(
        [
            "ceremony",
            "run",
            *args,
            "-address",
            "http://127.0.0.1:9",
            "--transcript-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
