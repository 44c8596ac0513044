"""The ceremonies that span sites, run by ``ekms ceremony run`` in a pseudo-terminal against real
sites: provision-site, failover, failback and decommission-site.

Every site is its own ``ekms server`` process with its own data directory, SQLite database and
SoftHSM token (``tests.support.sites``); home is set up by the ``domain`` fixture
(``tests.support.ceremony``). Each test checks what the ceremony changed at both sites (their
statuses, the keys imported and decrypting there, the tree head recorded, the tokens revoked),
that the transcript names the site of every step and landed, signed, in the main service's
audit log, and one way the ceremony goes wrong.
"""

from __future__ import annotations

import hashlib
import json
import stat
from typing import TYPE_CHECKING, Any

import pytest

from api.cli import main as ekms
from tests.support.ceremony import (
    Domain,
    Terminal,
    approve_all,
    assert_no_secrets,
    check_landed,
    domain,
    transcript_of,
    wrong_share,
)
from tests.support.sites import data, error

if TYPE_CHECKING:
    from tests.support.sites import SiteProcess

__all__ = ["domain"]  # the shared two-site fixture

pytestmark = pytest.mark.slow

SIGNERS = 5  # administrator, witness, three officials


def status_of(d: Domain, site: SiteProcess) -> dict[str, Any]:
    return data(site.call("GET", "ekms/site", d.officer(site)))


def versions(d: Domain, site: SiteProcess) -> dict[str, list[int]]:
    token = d.officer(site)
    listed = site.call("GET", "transit/keys?list=true", token)
    if listed.status_code == 404:
        return {}
    return {
        name: sorted(int(v) for v in data(site.call("GET", f"transit/keys/{name}", token))["keys"])
        for name in data(listed)["keys"]
    }


def steps_where(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["service"], s["site"]) for s in body["steps"]]


def fail_over(d: Domain, site: SiteProcess) -> None:
    """What the failover ceremony does, over the API: an emergency, then site-failover."""
    officials = d.crew.officials
    site.decided("declare-emergency", {"duration": 3600, "justification": "home lost"}, officials)
    site.decided("site-failover", {"previous": "home", "justification": "home lost"}, officials)


# --- provision-site -----------------------------------------------------------------------------


def test_provision_site(domain: Domain) -> None:
    d, home = domain, domain.home
    embassy = d.launch("embassy-1", "embassy").wait_ready()
    directory = d.tmp / "transcripts"

    # A peer that is not the site meant: the administrator says so, nothing is registered.
    refused = Terminal(home.url, d.tmp / "refused", "provision-site", "--peer", embassy.url)
    refused.present(d.key_files())
    refused.confirm("auditor")
    refused.answer(
        r"officer: the peer at \S+ answers as site embassy-1 \(embassy\)\. Is it the "
        r"site to provision\? \[y/n\]: ",
        "n",
    )
    refused.answer(r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    refused.sign_all(SIGNERS)
    assert refused.end() == 1, refused.seen
    body = transcript_of(d.tmp / "refused")["transcript"]
    assert body["outcome"] == "aborted"
    assert "is not the site to provision: nothing was changed" in body["abort_reason"]
    error(home.call("GET", "ekms/sites/embassy-1", d.officer(home)), 404)
    assert embassy.call("GET", "sys/seal-status").json()["initialized"] is False

    run = Terminal(home.url, directory, "provision-site", "--peer", embassy.url)
    run.present(d.key_files())
    run.expect(r"Peer: site embassy-1 \(embassy\) at ")
    run.confirm("auditor")
    run.answer(r"Is it the site to provision\? \[y/n\]: ", "y")
    run.answer(r"officer: the key backend of site embassy-1 \(pkcs11 or transit\) \[pkcs11\]: ", "")
    exported = run.expect(r"auditor: confirmed\? \[y/n\]: ")
    assert "Left out of the backup" not in exported
    assert "Backup written to" in exported
    run.kill()  # the runner dies with the backup exported; the journal has every step so far

    # Resumed with another peer (home itself): refused, and the journal is left as it was.
    wrong = Terminal(home.url, directory, "provision-site", "--peer", home.url)
    wrong.answer(r"Resume or start over\?.*: ", "r")
    assert wrong.end() == 2
    assert "the unfinished ceremony's peer was site embassy-1" in wrong.seen
    run = Terminal(home.url, directory, "provision-site", "--peer", embassy.url)
    run.answer(r"Resume or start over\?.*: ", "r")
    run.confirm("auditor")
    # A wrong share at the new site is refused and recorded; the official tries again.
    run.share("official-0", "unsealing", wrong_share(d.shares[0]))
    rejected = run.share("official-0", "unsealing", d.shares[0])
    assert "Share rejected: 400" in rejected
    run.share("official-1", "unsealing", d.shares[1])
    checked = run.expect(r"auditor: confirmed\? \[y/n\]: ")
    assert "Site embassy-1 (embassy): standby, not serving" in checked
    run.child.sendline("y")
    run.sign_all(SIGNERS)
    assert run.end() == 0, run.seen

    # Home registered the site; the site holds every key home has, and waits.
    officer = d.officer(home)
    registered = data(home.call("GET", "ekms/sites/embassy-1", officer))
    assert (registered["kind"], registered["backend"], registered["status"]) == (
        "embassy",
        "pkcs11",
        "standby",
    )
    assert registered["url"] == embassy.url
    # ... and pinned its audit key, read from the site, to check its heads later.
    there = data(embassy.call("GET", "ekms/audit/heads", d.officer(embassy)))
    assert registered["audit_kid"] == there["kid"]
    assert (status_of(d, embassy)["status"], status_of(d, embassy)["serving"]) == ("standby", False)
    assert (
        versions(d, embassy)
        == versions(d, home)
        == {k: [1] for k in ("census", "laws", "registry")}
    )
    (imported,) = embassy.records(d.officer(embassy), "domain.import")
    assert imported["details"]["at"] == "first unseal"

    # The transcript: which site each step touched, the backup's file and its SHA-256.
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert [r["next_step"] for r in body["resumptions"]] == [4]
    assert body["peer"]["site"] == "embassy-1"
    assert body["peer"]["address"] == embassy.url
    assert body["service"]["site"] == "home"
    assert (
        steps_where(body)
        == [("main", "home")] * 4 + [("peer", "embassy-1")] * 4 + [("main", "home")] * 2
    )
    (event,) = [e for e in body["steps"][2]["events"] if e["what"] == "exported"]
    backup = directory / event["file"]
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert hashlib.sha256(backup.read_bytes()).hexdigest() == event["sha256"]
    assert json.loads(backup.read_text())["backup_id"] == event["backup_id"]
    (exported_record,) = home.records(officer, "domain.export")
    assert exported_record["details"]["digest"] == event["digest"]
    assert exported_record["request_id"] in body["steps"][2]["request_ids"]
    unseal = body["steps"][5]
    assert [e["what"] for e in unseal["events"]] == [
        "share-rejected",
        "share-accepted",
        "share-accepted",
    ]
    assert {e["service"] for e in unseal["events"]} == {"peer"}
    assert unseal["request_ids"] == []
    assert len(unseal["peer_request_ids"]) == 3
    assert {p["principal"] for p in body["peer_identity_check"]} == set()  # checked at step 7
    record = check_landed(home, officer, document)
    assert [s.get("site") for s in record["details"]["steps"]] == [s for _, s in steps_where(body)]
    assert_no_secrets(directory, d.shares)


# --- failover ------------------------------------------------------------------------------------


def test_failover(domain: Domain) -> None:
    d = domain
    embassy = d.launch("embassy-1", "embassy")
    d.provision(embassy)
    d.home.destroy()  # home is lost: stopped, its token and data directory gone
    embassy.stop()  # the embassy restarts, sealed, for the officials to open
    embassy.start()
    directory = d.tmp / "transcripts"

    run = Terminal(embassy.url, directory, "failover")
    run.present(d.key_files())
    run.confirm("auditor")
    run.share("official-0", "unsealing", d.shares[0])
    run.share("official-1", "unsealing", d.shares[2])
    # The embassy holds a confidential key, which its policy restores only in an emergency.
    needed = run.answer(r"Duration of the emergency, in whole hours \[24\]: ", "12")
    assert "restores confidential, secret keys here only in an emergency" in needed
    run.answer(r"official-0: the justification, for the record: ", "home flooded")
    approve_all(run, ["official-1", "official-2"])
    run.answer(r"official-0: the previous site \[home\]: ", "")
    run.answer(r"official-0: the justification, for the record: ", "home flooded")
    approve_all(run, ["official-1", "official-2"])
    run.confirm("auditor")
    run.sign_all(SIGNERS)
    assert run.end() == 0, run.seen

    site = status_of(d, embassy)
    assert (site["status"], site["serving"]) == ("active", True)
    assert site["emergency"]["ends_at"] - site["emergency"]["declared_at"] == 12 * 3600
    officer = d.officer(embassy)
    assert data(embassy.call("GET", "ekms/sites/home", officer))["status"] == "failed-over"
    # The embassy serves restores of home's data keys: internal, and confidential (emergency).
    laws, registry, _census = d.wrapped
    assert d.restore(embassy, [laws, registry]) == [laws.plaintext, registry.plaintext]

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert "peer" not in body
    assert [s["outcome"] for s in body["steps"]] == ["done"] * 8
    assert "emergency-needed" in [e["what"] for e in body["steps"][4]["events"]]
    assert "site embassy-1 is active and site home failed-over" in body["steps"][5]["summary"]
    check_landed(embassy, officer, document)

    # Failing over to a site that is active already: the service refuses, nothing changes.
    again = Terminal(embassy.url, d.tmp / "again", "failover")
    again.present(d.key_files())
    again.confirm("auditor")
    again.answer(r"official-0: the previous site: ", "home")
    again.answer(r"official-0: the justification, for the record: ", "once more")
    again.answer(r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    again.sign_all(SIGNERS)
    assert again.end() == 1, again.seen
    body = transcript_of(d.tmp / "again")["transcript"]
    assert body["outcome"] == "aborted"
    assert "409: this site is already active: there is nothing to fail over" in body["abort_reason"]
    assert [e["what"] for e in body["steps"][4]["events"]] == ["emergency-in-force"]
    assert status_of(d, embassy)["status"] == "active"


# --- failback ------------------------------------------------------------------------------------


def test_failback(domain: Domain) -> None:
    d = domain
    embassy = d.launch("embassy-1", "embassy")
    d.provision(embassy)
    d.home.destroy()
    rebuilt = d.launch("home", "home", directory="rebuilt-home")
    fail_over(d, embassy)
    # During the crisis a key is rotated at the embassy and a data key made under it.
    officer = d.officer(embassy)
    data(embassy.call("POST", "transit/keys/laws/rotate", officer))
    crisis = d.datakey(embassy, "laws", "embassy/laws/2")
    assert crisis.ciphertext.startswith("ekms:v2:")
    crisis_token = d.officer(embassy)
    rebuilt.wait_ready()

    # A peer that is not the embassy (the rebuilt home itself): refused before step 1.
    wrong = Terminal(rebuilt.url, d.tmp / "wrong-peer", "failback", "--peer", rebuilt.url)
    wrong.present(d.key_files())
    refusal = wrong.expect("The ceremony cannot begin: .*\r?\n")
    assert "the peer is site home, the same site as the main service" in refusal + wrong.seen
    wrong.sign_all(SIGNERS)
    assert wrong.end() == 1  # not submitted: the rebuilt home has nobody to log in yet
    assert rebuilt.call("GET", "sys/seal-status").json()["initialized"] is False

    directory = d.tmp / "transcripts"
    run = Terminal(rebuilt.url, directory, "failback", "--peer", embassy.url)
    run.present(d.key_files())
    run.confirm("auditor")
    run.confirm("auditor")
    run.share("official-0", "unsealing", d.shares[0])
    run.share("official-1", "unsealing", d.shares[1])
    run.answer(r"official-0: the justification, for the record: ", "crisis over")
    approve_all(run, ["official-1", "official-2"])
    run.answer(r"official-0: the justification, for the record: ", "crisis over")
    approve_all(run, ["official-1", "official-2"])
    run.confirm("auditor")
    run.sign_all(SIGNERS)
    assert run.end() == 0, run.seen

    # Home serves again, with every key version, the crisis's included; the embassy is retired.
    home = rebuilt
    site = status_of(d, home)
    assert (site["name"], site["status"], site["serving"]) == ("home", "active", True)
    home_officer = d.officer(home)
    assert data(home.call("GET", "ekms/sites/embassy-1", home_officer))["status"] == "retired"
    assert versions(d, home)["laws"] == [1, 2]
    laws, registry, census = d.wrapped
    assert d.restore(home, [laws, registry, census, crisis]) == [
        laws.plaintext,
        registry.plaintext,
        census.plaintext,
        crisis.plaintext,
    ]
    assert status_of(d, embassy)["status"] == "retired"
    assert versions(d, embassy) == {}  # its copies destroyed
    assert embassy.call("GET", "ekms/site", crisis_token).status_code == 401  # revoked
    # Home's log holds the embassy's final head, checked with the embassy's audit key.
    (recorded,) = home.records(home_officer, "site.tree_head")
    heads = data(embassy.call("GET", "ekms/audit/heads", d.officer(embassy)))["heads"]
    (final,) = [h for h in heads if h["jws"] == recorded["details"]["jws"]]
    assert recorded["details"]["site"] == "embassy-1"

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert steps_where(body) == [
        ("main", "home"),
        ("peer", "embassy-1"),
        *[("main", "home")] * 6,
        ("peer", "embassy-1"),
        *[("main", "home")] * 3,
    ]
    assert {p["principal"] for p in body["peer_identity_check"]} == {p.id for p in d.crew.ceremony}
    recorded_event = next(e for e in body["steps"][9]["events"] if e["what"] == "head-recorded")
    assert recorded_event["size"] == final["size"]
    assert recorded["request_id"] in body["steps"][9]["request_ids"]
    assert body["steps"][9]["peer_request_ids"]  # the head signed at the embassy
    check_landed(home, home_officer, document)
    assert_no_secrets(directory, d.shares)
    auditor_reconciles(d, home, embassy)


def auditor_reconciles(d: Domain, home: SiteProcess, embassy: SiteProcess) -> None:
    """docs/sites.md: each export verifies on its own, and the embassy's log extends the head
    recorded in home's log (that head, taken from home's export, is the --previous-head)."""
    exports = {}
    for site in (home, embassy):
        token = site.login(d.crew.auditor)
        exports[site.name] = d.tmp / f"{site.name}-export.jsonl"
        exports[site.name].write_bytes(site.call("GET", "ekms/audit/export", token).content)
        key = data(site.call("GET", "ekms/audit/heads", token))["public_key"]
        (d.tmp / f"{site.name}-key.jwk").write_text(json.dumps(key))
    lines = [json.loads(line) for line in exports["home"].read_text().splitlines()]
    recorded = [
        line["record"]["details"]
        for line in lines
        if line.get("type") == "record" and line["record"]["operation"] == "site.tree_head"
    ]
    head = {k: recorded[-1][k] for k in ("size", "root_hash", "timestamp_ms", "jws")}
    (d.tmp / "embassy-head.json").write_text(json.dumps({"type": "head", **head}))
    for name in ("home", "embassy-1"):
        args = [str(exports[name]), "--trusted-key", str(d.tmp / f"{name}-key.jwk")]
        assert ekms(["audit", "verify", *args]) == 0
    previous = ["--previous-head", str(d.tmp / "embassy-head.json")]
    key = ["--trusted-key", str(d.tmp / "embassy-1-key.jwk")]
    assert ekms(["audit", "verify", str(exports["embassy-1"]), *key, *previous]) == 0


# --- decommission-site ---------------------------------------------------------------------------


def test_decommission_site(domain: Domain) -> None:
    d, home = domain, domain.home
    embassy = d.launch("embassy-1", "embassy")
    d.provision(embassy)
    before = d.officer(embassy)
    directory = d.tmp / "transcripts"

    run = Terminal(home.url, directory, "decommission-site", "--peer", embassy.url)
    run.present(d.key_files())
    run.confirm("auditor")
    run.answer(r"official-0: the justification, for the record: ", "embassy closed")
    approve_all(run, ["official-1", "official-2"])
    run.answer(r"official-0: the justification, for the record: ", "embassy closed")
    approve_all(run, ["official-1", "official-2"])
    run.confirm("auditor")
    run.sign_all(SIGNERS)
    assert run.end() == 0, run.seen

    assert status_of(d, embassy)["status"] == "retired"
    assert versions(d, embassy) == {}
    assert embassy.call("GET", "ekms/site", before).status_code == 401  # revoked
    officer = d.officer(home)
    assert data(home.call("GET", "ekms/sites/embassy-1", officer))["status"] == "retired"
    assert status_of(d, home)["status"] == "active"
    (recorded,) = home.records(officer, "site.tree_head")
    heads = data(embassy.call("GET", "ekms/audit/heads", d.officer(embassy)))["heads"]
    assert recorded["details"]["jws"] in [h["jws"] for h in heads]
    # Home exports nothing to a retired site.
    refused = home.call("POST", "ekms/domain/export", officer, {"target_site": "embassy-1"})
    error(refused, 409)
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert steps_where(body) == [
        ("main", "home"),
        ("peer", "embassy-1"),
        ("main", "home"),
        ("main", "home"),
        ("peer", "embassy-1"),
        ("main", "home"),
    ]
    check_landed(home, officer, document)

    # Decommissioning it again: the retired site refuses, nothing changes.
    again = Terminal(home.url, d.tmp / "again", "decommission-site", "--peer", embassy.url)
    again.present(d.key_files())
    again.confirm("auditor")
    again.answer(r"official-0: the justification, for the record: ", "once more")
    again.answer(r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    again.sign_all(SIGNERS)
    assert again.end() == 1, again.seen
    body = transcript_of(d.tmp / "again")["transcript"]
    assert "409: this site is retired" in body["abort_reason"]
    assert len(home.records(officer, "site.tree_head")) == 1
