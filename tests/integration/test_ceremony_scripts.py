"""Every shipped ceremony that changes the service, run end to end by ``ekms ceremony run`` in a
pseudo-terminal against a real server, then checked on the service itself: the effect is there,
the transcript is signed by every participant and by the service and sits in the audit log, and
no share or token reached a file the runner wrote. Also the ways a ceremony goes wrong: a quorum
that cannot be reached, a service not in the state a step expects, a runner killed mid-way.

(unseal-after-restart, rekey-custodians and share-drill run in ``test_ceremony_terminal.py`` and
``test_custody_ceremonies.py``.)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import hvac
import hvac.exceptions
import pytest

from tests.integration.test_access import Party, World
from tests.support.ceremony import (
    Site,
    Terminal,
    assert_no_secrets,
    blank,
    check_landed,
    key_files,
    site,
    transcript_of,
    wrong_share,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import ServerThread

__all__ = ["blank", "site"]  # the shared ceremony fixtures

ROOT_TOKEN = re.compile(r"^ {4}(ekms\.[A-Za-z0-9_-]+)\s*$", re.MULTILINE)


def test_rotate_keys(site: Site, tmp_path: Path) -> None:
    world = site.world
    officer = world.login(world.officer)

    def versions() -> dict[str, int]:
        return {
            name: world.call("GET", f"transit/keys/{name}", officer).json()["data"][
                "latest_version"
            ]
            for name in ("laws", "registry")
        }

    assert versions() == {"laws": 1, "registry": 1}
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "rotate-keys")
    for principal, path in key_files(tmp_path / "keys", [world.officer, site.auditor]):
        run.answer(r"principal id[^:]*: ", principal)
        run.answer(r"key file[^:]*: ", path)
    run.confirm("auditor")
    run.confirm("auditor")
    run.sign_all(2)
    assert run.end() == 0, run.seen
    assert versions() == {"laws": 2, "registry": 2}

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    rotated = {
        e["key"]: e["to_version"] for e in body["steps"][1]["events"] if e["what"] == "rotated"
    }
    assert rotated == {"laws": 2, "registry": 2}
    record = check_landed(world, officer, document)
    assert [s["name"] for s in record["details"]["steps"]] == ["check", "keys.rotate", "check"]


def test_declare_then_end_an_emergency(site: Site, tmp_path: Path) -> None:
    world = site.world
    keys = key_files(tmp_path / "keys", site.people)
    declare = Terminal(world.server.url, tmp_path / "declare", "declare-emergency")
    declare.present(keys)
    declare.confirm("auditor")
    declare.confirm("officer")
    declare.answer(r"Duration of the emergency, in whole hours \[24\]: ", "6")
    declare.answer(r"official-0: the justification, for the record: ", "home site flooded")
    declare.answer(r"official-1: approve it\? \[y/n\]: ", "y")
    declare.answer(r"official-2: approve it\? \[y/n\]: ", "y")
    declare.confirm("auditor")
    declare.sign_all(len(keys))
    assert declare.end() == 0, declare.seen
    emergency = site.status()["emergency"]
    assert emergency is not None
    assert emergency["ends_at"] - emergency["declared_at"] == 6 * 3600

    end = Terminal(world.server.url, tmp_path / "end", "end-emergency")
    end.present(keys)
    end.confirm("auditor")
    end.answer(r"official-0: the justification, for the record: ", "home site back")
    end.answer(r"official-1: approve it\? \[y/n\]: ", "y")
    end.answer(r"official-2: approve it\? \[y/n\]: ", "y")
    end.confirm("auditor")
    end.sign_all(len(keys))
    assert end.end() == 0, end.seen
    assert site.status()["emergency"] is None

    officer = world.login(world.officer)
    for directory in (tmp_path / "declare", tmp_path / "end"):
        document = transcript_of(directory)
        assert document["transcript"]["outcome"] == "completed"
        check_landed(world, officer, document)


def test_generate_root(site: Site, tmp_path: Path) -> None:
    """The token works while the work is done, is revoked at the end, and is never written."""
    world = site.world
    people = [world.officer, site.auditor, *world.officials[:2]]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "generate-root")
    run.present(key_files(tmp_path / "keys", people))
    run.confirm("auditor")
    run.share("official-0", "root generation", site.shares[0])
    run.share("official-1", "root generation", site.shares[1])
    shown = run.answer(r"officer: have you taken the root token\? \[y/n\]: ", "y")
    token = ROOT_TOKEN.findall(shown)[-1]
    cleared = run.expect(r"officer: confirmed\? \[y/n\]: ")
    assert token not in cleared  # the screen was cleared before the next step
    looked_up = world.call("GET", "auth/token/lookup-self", token)
    assert looked_up.status_code == 200, looked_up.text
    assert looked_up.json()["data"]["policies"] == ["root"]
    run.child.sendline("y")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen
    assert world.call("GET", "auth/token/lookup-self", token).status_code == 403

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert [s["outcome"] for s in body["steps"]] == ["done"] * 5
    generated = next(e for e in body["steps"][1]["events"] if e["what"] == "root-token-generated")
    revoked = next(e for e in body["steps"][4]["events"] if e["what"] == "root-token-revoked")
    assert generated["token_id"] == revoked["token_id"] == looked_up.json()["data"]["accessor"]
    check_landed(world, world.login(world.officer), document)
    assert_no_secrets(directory, [token, *site.shares])


def _replace(world: World, leaver: Party, newcomer: Party) -> None:
    """add-official and remove-official, each decided by a quorum of officials."""
    for kind, payload in (
        ("add-official", {"principal": newcomer.id, "jwk": newcomer.jwk}),
        ("remove-official", {"principal": leaver.id}),
    ):
        proposal = world.call(
            "POST",
            "ekms/proposals",
            world.login(world.officials[0]),
            body={"kind": kind, "payload": payload},
        ).json()["data"]
        for official in world.officials[1:3]:
            decided = world.approve(official, proposal)
            assert decided.status_code == 200, decided.text
        assert decided.json()["data"]["state"] == "approved"


def test_replace_custodian(site: Site, tmp_path: Path) -> None:
    world, old = site.world, site.shares
    leaver, newcomer = world.officials[2], Party.ec("official-new")
    _replace(world, leaver, newcomer)
    people = [world.officer, site.auditor, world.officials[0], world.officials[1], newcomer]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "replace-custodian")
    run.present(key_files(tmp_path / "keys", people))
    run.confirm("auditor")
    run.share("official-0", "rekey", old[0])
    run.share("official-1", "rekey", old[1])
    new = run.take_shares(["official-0", "official-1", "official-new"])
    run.share("official-0", "verifying the new shares", new["official-0"])
    run.share("official-1", "verifying the new shares", "")  # passes: two are enough
    run.share("official-new", "verifying the new shares", new["official-new"])
    for official in ("official-0", "official-1", "official-new"):
        run.share(official, "a share check", new[official])
    run.confirm("auditor")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    handed = [e for e in body["steps"][2]["events"] if e["what"] == "new-share-member"]
    assert [e["principal"] for e in handed] == ["official-0", "official-1", "official-new"]
    officer = world.login(world.officer)
    check_landed(world, officer, document)
    assert_no_secrets(directory, [*old, *new.values()])

    members = world.call("GET", "ekms/shares", officer).json()["data"]["members"]
    assert [m["holder"] for m in members] == ["official-0", "official-1", "official-new"]
    vault = hvac.Client(url=world.server.url, token=world.root)
    vault.sys.seal()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.submit_unseal_key(old[2])  # the leaver's share is worthless
    vault.sys.submit_unseal_keys([new["official-new"], new["official-1"]])
    assert not vault.sys.is_sealed()


# --- init-domain -----------------------------------------------------------------------------


def _init_people() -> list[Party]:
    return [Party.ec("admin"), Party.ec("witness"), *(Party.ec(f"official-{n}") for n in range(3))]


def _world(server: ServerThread, people: list[Party]) -> World:
    admin, _witness, *officials = people
    return World(server, "", officials, admin, Party.ec("operator"), Party.ed("tool"))


def test_init_domain(blank: ServerThread, tmp_path: Path) -> None:
    people = _init_people()
    officials = [p.id for p in people[2:]]
    directory = tmp_path / "transcripts"
    run = Terminal(blank.url, directory, "init-domain")
    run.present(key_files(tmp_path / "keys", people))
    run.confirm("witness")
    run.confirm("admin")
    shares = run.take_shares(officials)
    run.share("official-0", "unsealing", shares["official-0"])
    run.share("official-1", "unsealing", wrong_share(shares["official-1"]))
    run.share("official-1", "unsealing", shares["official-1"])
    run.confirm("witness")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen

    world = _world(blank, people)
    officer = world.login(world.officer)
    document = transcript_of(directory)
    body = document["transcript"]
    assert [s["outcome"] for s in body["steps"]] == ["done"] * 8
    assert {p["principal"]: p["service_roles"] for p in body["participants"]} == {
        "admin": ["security-officer"],
        "witness": ["auditor"],
        **{o: ["official"] for o in officials},
    }
    check_landed(world, officer, document)
    assert_no_secrets(directory, shares.values())
    # Nobody holds a root token: the one init made is revoked.
    init = next(e for e in body["steps"][2]["events"] if e["what"] == "initialised")
    init_record = world.call(
        "GET", f"ekms/audit/records?request_id={init['request_id']}", officer
    ).json()["data"]["records"][0]["record"]
    revoked = next(e for e in body["steps"][6]["events"] if e["what"] == "root-token-revoked")
    assert revoked["token_id"] == init_record["details"]["root_token_id"]
    # The shares handed out are the domain's: any two unseal it.
    blank.custodian.seal()
    vault = hvac.Client(url=blank.url)
    vault.sys.submit_unseal_keys([shares["official-2"], shares["official-0"]])
    assert not vault.sys.is_sealed()


def _init_record(world: World, token: str, body: dict[str, Any]) -> dict[str, Any]:
    init = next(e for e in body["steps"][2]["events"] if e["what"] == "initialised")
    found = world.call("GET", f"ekms/audit/records?request_id={init['request_id']}", token)
    return dict(found.json()["data"]["records"][0]["record"])


def test_init_domain_killed_while_the_shares_are_handed_out(
    blank: ServerThread, tmp_path: Path
) -> None:
    """The shares not yet shown exist nowhere: resuming says so and stops; --restart is refused
    by the initialised service (wipe it first, docs/operations.md)."""
    people = _init_people()
    keys = key_files(tmp_path / "keys", people)
    directory = tmp_path / "transcripts"
    run = Terminal(blank.url, directory, "init-domain")
    run.present(keys)
    run.confirm("witness")
    run.confirm("admin")
    run.take_shares(["official-0"])
    run.expect(r"official-1: have you written it down")
    run.kill()

    again = Terminal(blank.url, directory, "init-domain")
    again.answer(r"Resume or start over\?.*: ", "r")
    failed = again.answer(r"admin: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    assert "can never be unsealed" in failed
    again.sign_all(len(people))
    assert again.end() == 1, again.seen  # sealed: nobody can log in to submit it
    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "aborted"
    assert body["resumptions"][0]["next_step"] == 3
    assert [s["outcome"] for s in body["steps"]] == ["done", "done", "failed"]

    restart = Terminal(blank.url, directory, "init-domain", "--restart")
    restart.present(keys)
    refused = restart.expect(r"sign the transcript")
    assert "precondition uninitialised does not hold: the service is sealed" in refused
    restart.child.sendline("y")
    restart.sign_all(len(people) - 1)
    assert restart.end() == 1
    assert "Step 1" not in restart.seen


def test_init_domain_killed_after_the_shares_resumes(blank: ServerThread, tmp_path: Path) -> None:
    """Every share was handed out; the runner dies while the officials unseal. Resumed, it
    finishes: the lost init root token is revoked with a new one the officials generate, which
    is revoked in its turn, so nobody holds a root token."""
    people = _init_people()
    officials = [p.id for p in people[2:]]
    directory = tmp_path / "transcripts"
    run = Terminal(blank.url, directory, "init-domain")
    run.present(key_files(tmp_path / "keys", people))
    run.confirm("witness")
    run.confirm("admin")
    shares = run.take_shares(officials)
    run.share("official-0", "unsealing", shares["official-0"])
    run.expect(r"official-1: type your share for unsealing")
    run.kill()

    again = Terminal(blank.url, directory, "init-domain")
    again.answer(r"Resume or start over\?.*: ", "r")
    again.share("official-1", "unsealing", shares["official-1"])  # official-0's share counted
    again.expect("This step needs a root token")
    again.share("official-0", "root generation", shares["official-0"])
    again.share("official-1", "root generation", shares["official-1"])
    again.confirm("witness")
    again.sign_all(len(people))
    assert again.end() == 0, again.seen

    world = _world(blank, people)
    officer = world.login(world.officer)
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert body["resumptions"][0]["next_step"] == 4
    check_landed(world, officer, document)
    lost = next(e for e in body["steps"][4]["events"] if e["what"] == "lost-root-token-revoked")
    assert lost["init"] is True
    assert lost["token_id"] == _init_record(world, officer, body)["details"]["root_token_id"]
    generated = next(e for e in body["steps"][4]["events"] if e["what"] == "root-token-generated")
    revoked = next(e for e in body["steps"][6]["events"] if e["what"] == "root-token-revoked")
    assert revoked["token_id"] == generated["token_id"] != lost["token_id"]
    for request_id in (lost["request_id"], revoked["request_id"]):
        record = world.call("GET", f"ekms/audit/records?request_id={request_id}", officer)
        assert record.json()["data"]["records"][0]["record"]["status"] == 204
    assert_no_secrets(directory, shares.values())


def test_generate_root_killed_after_the_token_was_made(site: Site, tmp_path: Path) -> None:
    """The token lived only in the runner: resumed, the officials make another one, the lost
    one is revoked by its id, and the new one is handed over and revoked at the end."""
    world = site.world
    people = [world.officer, site.auditor, *world.officials[:2]]
    keys = key_files(tmp_path / "keys", people)
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "generate-root")
    run.present(keys)
    run.confirm("auditor")
    run.share("official-0", "root generation", site.shares[0])
    run.share("official-1", "root generation", site.shares[1])
    first = ROOT_TOKEN.findall(run.expect(r"officer: have you taken the root token\?"))[-1]
    run.kill()
    assert world.call("GET", "auth/token/lookup-self", first).status_code == 200

    again = Terminal(world.server.url, directory, "generate-root")
    again.answer(r"Resume or start over\?.*: ", "r")
    again.share("official-0", "root generation", site.shares[0])
    again.share("official-1", "root generation", site.shares[1])
    shown = again.answer(r"officer: have you taken the root token\? \[y/n\]: ", "y")
    second = ROOT_TOKEN.findall(shown)[-1]
    assert world.call("GET", "auth/token/lookup-self", first).status_code == 403
    assert world.call("GET", "auth/token/lookup-self", second).status_code == 200
    again.confirm("officer")
    again.sign_all(len(people))
    assert again.end() == 0, again.seen
    assert world.call("GET", "auth/token/lookup-self", second).status_code == 403

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert body["resumptions"][0]["next_step"] == 3
    lost = [e for e in body["steps"][2]["events"] if e["what"] == "lost-root-token-revoked"]
    made = [e for e in body["steps"][1]["events"] if e["what"] == "root-token-generated"]
    assert [e["token_id"] for e in lost] == [made[0]["token_id"]]
    check_landed(world, world.login(world.officer), document)
    assert_no_secrets(directory, [first, second, *site.shares])


# --- refused before step 1, or at the step ---------------------------------------------------


def _refused(run: Terminal, signers: int) -> str:
    before = run.expect(r"sign the transcript with your key")
    run.child.sendline("y")
    run.sign_all(signers - 1)
    assert run.end() == 1, run.seen
    assert "Step 1" not in run.seen
    return before


def test_a_quorum_not_present_is_refused_before_step_1(site: Site, tmp_path: Path) -> None:
    world = site.world
    people = [world.officer, site.auditor, world.officials[0]]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "generate-root")
    run.present(key_files(tmp_path / "keys", people))
    refused = _refused(run, len(people))
    assert "quorum cannot be reached: 1 officials present, 2 needed" in refused
    document = transcript_of(directory)
    assert document["transcript"]["steps"] == []
    record = check_landed(world, world.login(world.officer), document)
    assert record["details"]["outcome"] == "aborted"
    attempt = world.call("GET", "sys/generate-root/attempt").json()
    assert attempt["started"] is False


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ("unseal-after-restart", "precondition sealed does not hold: the service is unsealed"),
        ("end-emergency", "precondition emergency does not hold: an emergency is not in force"),
    ],
)
def test_a_service_not_in_the_state_the_script_starts_from(
    site: Site, tmp_path: Path, script: str, problem: str
) -> None:
    world = site.world
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, script)
    run.present(key_files(tmp_path / "keys", site.people))
    assert problem in _refused(run, len(site.people))
    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "aborted"
    assert problem in body["abort_reason"]


def test_a_rekey_already_in_progress_stops_the_step(site: Site, tmp_path: Path) -> None:
    """Someone else's rekey is not this ceremony's to take over or cancel: step 2 fails and says
    so, the administrator stops, and the other rekey and the share set are untouched."""
    world = site.world
    officer = world.login(world.officer)
    other = world.call(
        "PUT",
        "sys/rekey/init",
        officer,
        body={"secret_shares": 3, "secret_threshold": 2, "require_verification": True},
    )
    assert other.status_code == 200, other.text
    nonce = other.json()["nonce"]
    before = world.server.runtime.store.get_share_set()
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "rekey-custodians")
    run.present(key_files(tmp_path / "keys", site.people))
    run.confirm("auditor")
    failed = run.answer(r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    assert f"another rekey (nonce {nonce}) is in progress" in failed
    run.sign_all(len(site.people))
    assert run.end() == 1, run.seen
    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "aborted"
    assert [s["outcome"] for s in body["steps"]] == ["done", "failed"]
    assert world.call("GET", "sys/rekey/init").json()["nonce"] == nonce
    assert world.server.runtime.store.get_share_set() == before


def test_a_refused_proposal_stops_the_step_and_nothing_changes(site: Site, tmp_path: Path) -> None:
    """The quorum is present but not reached: one official refuses, which vetoes the proposal.
    The step fails with the tally, and no emergency is in force."""
    world = site.world
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "declare-emergency")
    run.present(key_files(tmp_path / "keys", site.people))
    run.confirm("auditor")
    run.confirm("officer")
    run.answer(r"Duration of the emergency, in whole hours \[24\]: ", "")
    run.answer(r"official-0: the justification, for the record: ", "a rumour")
    run.answer(r"official-1: approve it\? \[y/n\]: ", "n")
    failed = run.answer(r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a")
    assert "is denied with 0 of 2 approvals" in failed
    run.sign_all(len(site.people))
    assert run.end() == 1, run.seen
    assert site.status()["emergency"] is None
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "aborted"
    decided = [e for e in body["steps"][2]["events"] if e["what"] == "decided"]
    assert [(e["principal"], e["decision"]) for e in decided] == [("official-1", "deny")]
    check_landed(world, world.login(world.officer), document)
