"""``ekms ceremony run`` in a real terminal (pexpect), against a real server.

Each test runs the installed console script in a pseudo-terminal and answers its prompts as the
participants would: principal ids and key files, y/n confirmations, shares typed at no-echo
prompts. The server is a real one (SoftHSM, SQLite) in this process; the rehearsal test lets
the runner start its own throwaway server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pexpect
import pytest

from api.runtime import create_runtime, prepare_hsm
from ceremonies.transcript import check_file, digest
from kms.jose import parse_public_jwk
from tests.conftest import ServerThread, make_settings
from tests.integration import test_access
from tests.integration.test_access import Party, World

if TYPE_CHECKING:
    from collections.abc import Iterator

world = test_access.world  # the access tests' fixture: their World, reused as is


def _ekms() -> str:
    beside = Path(sys.executable).with_name("ekms")
    found = str(beside) if beside.exists() else shutil.which("ekms")
    if found is None:
        pytest.fail("the ekms console script is not installed (pip install -e .)")
    return found


EKMS = _ekms()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the runner is a client; the store's dialects are tested elsewhere."""
    return f"sqlite:///{tmp_path / 'ekms.db'}"


def key_file(directory: Path, party: Party) -> str:
    path = directory / f"{party.id}.jwk"
    path.write_text(json.dumps(party.private_jwk()))
    path.chmod(0o600)
    return str(path)


class Terminal:
    """The runner in a pseudo-terminal, answered prompt by prompt."""

    def __init__(self, address: str, directory: Path, *args: str) -> None:
        env = {**os.environ, "EKMS_ADDR": address, "COLUMNS": "200"}
        env.pop("EKMS_TOKEN", None)
        env.pop("VAULT_TOKEN", None)
        self.child = pexpect.spawn(
            EKMS,
            ["ceremony", "run", *args, "--transcript-dir", str(directory)],
            env=env,
            encoding="utf-8",
            timeout=30,
            dimensions=(50, 200),
        )
        self.seen = ""

    def expect(self, pattern: str) -> str:
        self.child.expect(pattern)
        self.seen += str(self.child.before) + str(self.child.after)
        return str(self.child.before)

    def answer(self, pattern: str, text: str) -> str:
        before = self.expect(pattern)
        self.child.sendline(text)
        return before

    def present(self, people: list[tuple[str, str]]) -> None:
        for principal, path in people:
            self.answer(r"principal id[^:]*: ", principal)
            self.answer(r"key file[^:]*: ", path)
        self.answer(r"Official \d+: principal id[^:]*: ", "")

    def sign_all(self, count: int) -> None:
        for _ in range(count):
            self.answer(
                r"sign the transcript with your key \(digest [0-9a-f]+\.\.\.\)\? \[y/n\]: ", "y"
            )

    def end(self) -> int:
        self.child.expect(pexpect.EOF, timeout=60)
        self.seen += str(self.child.before)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)


def transcript_of(directory: Path) -> dict[str, Any]:
    found = sorted(directory.glob("*.transcript.json"), key=lambda p: p.stat().st_mtime)
    assert found, f"no transcript in {directory}"
    return dict(json.loads(found[-1].read_text()))


def audit_record(world: World, token: str, request_id: str) -> dict[str, Any]:
    response = world.call("GET", "ekms/audit/export", token)
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        obj = json.loads(line)
        if obj.get("type") == "record" and obj["record"].get("request_id") == request_id:
            return dict(obj["record"], index=obj["index"])
    raise AssertionError(f"no audit record {request_id}")


def check_landed(world: World, officer: str, document: dict[str, Any]) -> dict[str, Any]:
    """The transcript's signatures verify, and its digest is in a ceremony.transcript record."""
    heads = world.call("GET", "ekms/audit/heads", officer).json()["data"]
    audit_key = parse_public_jwk(heads["public_key"])
    check = check_file(document, audit_key)
    assert check.digest_ok, check.problems
    assert not check.problems, check.problems
    assert set(check.signed_by) == {p["principal"] for p in document["transcript"]["participants"]}
    assert check.service is not None
    assert check.service["digest"] == digest(document["transcript"])
    record = audit_record(world, officer, document["service_signature"]["request_id"])
    assert record["operation"] == "ceremony.transcript"
    assert record["details"]["digest"] == document["digest"]
    assert record["details"]["ceremony"] == document["transcript"]["ceremony"]
    world.call("POST", "ekms/audit/tree-head", officer).raise_for_status()
    proof = world.call("GET", f"ekms/audit/proof/{record['index']}", officer)
    assert proof.status_code == 200, proof.text
    assert proof.json()["data"]["record"]["details"]["digest"] == document["digest"]
    return record


@dataclass
class Site:
    """A World whose shares the test kept, plus an auditor to witness."""

    world: World
    shares: list[str]
    auditor: Party


def add_auditor(world: World) -> Party:
    auditor = Party.ec("auditor")
    world.call(
        "POST",
        "ekms/principals/auditor",
        world.login(world.officer),
        body={"roles": ["auditor"], "jwk": auditor.jwk},
    ).raise_for_status()
    return auditor


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = make_settings(tmp_path, site_name="embassy-1", site_kind="embassy")
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        world = World(
            server,
            result["root_token"],
            [Party.ec(f"official-{n}") for n in range(3)],
            Party.ec("officer"),
            Party.ec("operator"),
            Party.ed("restore-tool"),
        )
        for party, role in [(o, "official") for o in world.officials] + [
            (world.officer, "security-officer")
        ]:
            world.call(
                "POST",
                f"ekms/principals/{party.id}",
                world.root,
                body={"roles": [role], "jwk": party.jwk},
            ).raise_for_status()
        yield Site(world, list(result["keys"]), add_auditor(world))
    runtime.close()


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
