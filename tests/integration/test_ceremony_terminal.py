"""``ekms ceremony run`` in a real terminal (pexpect), against a real server.

Each test runs the installed console script in a pseudo-terminal and answers its prompts as the
participants would: principal ids and key files, y/n confirmations, shares typed at no-echo
prompts. The server is a real one (SoftHSM, SQLite) in this process; the rehearsal test lets
the runner start its own throwaway server. The shared parts are in ``tests/support/ceremony.py``.
"""

from __future__ import annotations

import json
import re
import signal
from typing import TYPE_CHECKING

from ceremonies.transcript import check_file
from tests.integration import test_access
from tests.support.ceremony import (
    Site,
    Terminal,
    add_auditor,
    audit_record,
    check_landed,
    database_url,
    key_file,
    site,
    transcript_of,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.integration.test_access import World

world = test_access.world  # the access tests' fixture: their World, reused as is
__all__ = ["database_url", "site", "world"]  # fixtures shared with the other ceremony tests


def test_unseal_after_restart_with_a_wrong_share(site: Site, tmp_path: Path) -> None:
    world = site.world
    world.call("PUT", "sys/seal", world.root).raise_for_status()
    keys = tmp_path / "keys"
    keys.mkdir()
    people = [world.officer, site.auditor, *world.officials]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "unseal-after-restart")
    run.present([(p.id, key_file(keys, p)) for p in people])
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    words = site.shares[0].split()
    wrong = " ".join([*words[:-1], "academic" if words[-1] != "academic" else "acid"])
    run.answer(
        r"official-0: type your share for unsealing \(hidden; press Enter to pass\): ", wrong
    )
    rejected = run.answer(
        r"official-0: type your share for unsealing \(hidden; press Enter to pass\): ",
        site.shares[0],
    )
    assert "Share rejected: 400" in rejected
    assert wrong not in rejected  # no echo
    accepted = run.answer(r"official-1: type your share for unsealing[^:]*: ", site.shares[1])
    assert "Share accepted (official-0, member 0.0)" in accepted
    assert site.shares[0] not in accepted
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen
    assert "Step 2: done. the service is unsealed" in run.seen

    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert body["rehearsal"] is False
    events = body["steps"][1]["events"]
    assert [e["what"] for e in events] == ["share-rejected", "share-accepted", "share-accepted"]
    assert events[0]["principal"] == "official-0"
    assert events[0]["error"].startswith("400")
    assert [e.get("member") for e in events[1:]] == ["0.0", "0.1"]
    assert len(body["steps"][1]["request_ids"]) == 3
    officer = world.login(world.officer)
    check_landed(world, officer, document)
    # The unseal records name the official who signed for each share.
    unsealed = audit_record(world, officer, body["steps"][1]["request_ids"][2])
    assert unsealed["details"]["official"] == "official-1"
    # Neither a share nor a token reached the files the runner wrote.
    for written in directory.iterdir():
        text = written.read_text()
        assert not any(" ".join(share.split()[:4]) in text for share in site.shares), written


def test_a_participant_without_the_role_is_refused_before_step_1(
    world: World, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    officer = world.login(world.officer)
    before = world.call("GET", "transit/keys/laws", officer).json()["data"]["latest_version"]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "rotate-keys")
    # The restore operator stands in for the administrator: not a security officer.
    for party in (world.operator, world.officer):
        run.answer(r"principal id[^:]*: ", party.id)
        run.answer(r"key file[^:]*: ", key_file(keys, party))
    run.expect("The ceremony cannot begin: operator \\(administrator\\) needs the service role")
    run.sign_all(2)
    assert run.end() == 1
    assert "Step 1" not in run.seen
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "aborted"
    assert body["steps"] == []
    assert "needs the service role security-officer" in body["abort_reason"]
    record = check_landed(world, officer, document)
    assert record["details"]["outcome"] == "aborted"
    after = world.call("GET", "transit/keys/laws", officer).json()["data"]["latest_version"]
    assert after == before


def test_declined_check_then_kill_and_resume(world: World, tmp_path: Path) -> None:
    auditor = add_auditor(world)
    keys = tmp_path / "keys"
    keys.mkdir()
    people = [world.officer, auditor, *world.officials]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "declare-emergency")
    run.present([(p.id, key_file(keys, p)) for p in people])
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    run.answer(r"officer: confirmed\? \[y/n\]: ", "n")
    run.answer(r"officer: why not\? \(recorded as a deviation\): ", "restores are filed after")
    run.answer(r"Duration of the emergency, in whole hours \[24\]: ", "")
    run.answer(r"official-0: the justification, for the record: ", "home data centre flooded")
    run.expect(r"official-1: approve it\? \[y/n\]: ")
    run.child.kill(signal.SIGKILL)
    run.child.close(force=True)

    officer = world.login(world.officer)
    filed = world.call("GET", "ekms/proposals?kind=declare-emergency", officer).json()["data"]
    assert len(filed["keys"]) == 1
    assert world.call("GET", "ekms/status", officer).json()["data"]["emergency"] is None

    again = Terminal(world.server.url, directory, "declare-emergency")
    again.answer(r"Resume or start over\?.*: ", "r")
    again.expect("Continuing with proposal")
    again.answer(r"official-1: approve it\? \[y/n\]: ", "y")
    again.answer(r"official-2: approve it\? \[y/n\]: ", "y")
    again.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    again.sign_all(len(people))
    assert again.end() == 0, again.seen

    filed = world.call("GET", "ekms/proposals?kind=declare-emergency", officer).json()["data"]
    assert len(filed["keys"]) == 1  # resumed, not filed twice
    assert world.call("GET", "ekms/status", officer).json()["data"]["emergency"] is not None
    document = transcript_of(directory)
    body = document["transcript"]
    assert body["outcome"] == "completed"
    assert body["resumptions"]
    assert body["resumptions"][0]["next_step"] == 3
    deviation = body["steps"][1]["deviations"][0]
    assert deviation == {
        "reason": "restores are filed after",
        "recorded_by": "officer",
        "at": deviation["at"],
    }
    assert body["steps"][1]["outcome"] == "deviation"
    decided = [e for e in body["steps"][2]["events"] if e["what"] == "decided"]
    assert [e["principal"] for e in decided] == ["official-1", "official-2"]
    check_landed(world, officer, document)


def test_rehearse_init_domain(tmp_path: Path) -> None:
    """A whole init ceremony against the runner's own throwaway server; the real one is never
    reached (EKMS_ADDR points at a closed port)."""
    directory = tmp_path / "transcripts"
    run = Terminal("http://127.0.0.1:9", directory, "init-domain", "--rehearse")
    banner = run.expect(r"={78}\r?\n\r?\n")
    people = re.findall(r"REHEARSAL \w+: principal (\S+), key file (\S+)", banner)
    assert [p for p, _ in people] == [
        "rehearsal-administrator",
        "rehearsal-witness",
        "rehearsal-official-1",
        "rehearsal-official-2",
    ]
    run.present(people)
    run.answer(r"rehearsal-witness: confirmed\? \[y/n\]: ", "y")
    run.answer(r"rehearsal-administrator: confirmed\? \[y/n\]: ", "y")
    shares = {}
    for official in ("rehearsal-official-1", "rehearsal-official-2"):
        shown = run.answer(
            rf"{official}: have you written it down and checked every word\? \[y/n\]: ", "y"
        )
        shares[official] = re.findall(r"^ {4}([a-z]+(?: [a-z]+){19,32})\s*$", shown, re.MULTILINE)[
            -1
        ]
    for official in ("rehearsal-official-1", "rehearsal-official-2"):
        run.answer(rf"{official}: type your share for unsealing[^:]*: ", shares[official])
    run.answer(r"rehearsal-witness: confirmed\? \[y/n\]: ", "y")
    run.sign_all(4)
    assert run.end() == 0, run.seen
    document = transcript_of(directory / "rehearsals")
    body = document["transcript"]
    assert body["rehearsal"] is True
    assert body["outcome"] == "completed"
    assert document["service_signature"]["request_id"]
    assert [s["outcome"] for s in body["steps"]] == ["done"] * 8
    assert body["service"]["audience"] == "embassy-kms/rehearsal"
    assert {p["principal"]: p["service_roles"] for p in body["participants"]} == {
        "rehearsal-administrator": ["security-officer"],
        "rehearsal-witness": ["auditor"],
        "rehearsal-official-1": ["official"],
        "rehearsal-official-2": ["official"],
    }
    assert check_file(document, None).digest_ok
    text = json.dumps(document)
    assert not any(share in text for share in shares.values())
