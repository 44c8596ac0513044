"""What every ceremony test shares: ``ekms ceremony run`` in a pseudo-terminal, a real site to run
it against, and the checks that a transcript landed in the audit log with valid signatures.

The runner is the installed console script, driven by pexpect prompt by prompt as the people in
the room would answer it; the server is a real one (SoftHSM, SQLite) in the test's process, or,
for the ceremonies that span two sites, one ``ekms server`` process per site
(``tests.support.sites``).
Fixtures here are imported by the ceremony test modules (``from tests.support.ceremony import
site``) so that there is one copy of each.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pexpect
import pytest

from api.runtime import create_runtime, prepare_hsm
from ceremonies.transcript import check_file, digest
from kms.jose import parse_public_jwk
from tests.conftest import ServerThread, make_settings
from tests.integration.test_access import Party, World
from tests.support.sites import SiteProcess, SiteSpec, bootstrap, data, provision

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

# A share shown on screen by the runner: four spaces, then 20 to 33 SLIP-39 words.
SHOWN_SHARE = re.compile(r"^ {4}([a-z]+(?: [a-z]+){19,32})\s*$", re.MULTILINE)
CONFIRM = r"{who}: confirmed\? \[y/n\]: "


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
    directory.mkdir(exist_ok=True)
    path = directory / f"{party.id}.jwk"
    path.write_text(json.dumps(party.private_jwk()))
    path.chmod(0o600)
    return str(path)


def key_files(directory: Path, people: Iterable[Party]) -> list[tuple[str, str]]:
    return [(p.id, key_file(directory, p)) for p in people]


def wrong_share(share: str) -> str:
    """The share with its last word changed: well-formed, so only its checksum gives it away."""
    words = share.split()
    return " ".join([*words[:-1], "academic" if words[-1] != "academic" else "acid"])


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

    def confirm(self, who: str, answer: str = "y") -> str:
        return self.answer(CONFIRM.format(who=who), answer)

    def present(self, people: list[tuple[str, str]]) -> None:
        for principal, path in people:
            self.answer(r"principal id[^:]*: ", principal)
            self.answer(r"key file[^:]*: ", path)
        self.answer(r"Official \d+: principal id[^:]*: ", "")

    def share(self, who: str, purpose: str, share: str) -> str:
        return self.answer(rf"{who}: type your share for {purpose}[^:]*: ", share)

    def take_shares(self, officials: Iterable[str]) -> dict[str, str]:
        """Each official confirms the share shown to them; returns what was shown."""
        shown = {}
        for official in officials:
            before = self.answer(
                rf"{official}: have you written it down and checked every word\? \[y/n\]: ", "y"
            )
            shown[official] = SHOWN_SHARE.findall(before)[-1]
        return shown

    def sign_all(self, count: int) -> None:
        for _ in range(count):
            self.answer(
                r"sign the transcript with your key \(digest [0-9a-f]+\.\.\.\)\? \[y/n\]: ", "y"
            )

    def kill(self) -> None:
        """SIGKILL: no handler runs, the journal has what was fsync'd before."""
        self.child.kill(signal.SIGKILL)
        self.child.close(force=True)

    def end(self) -> int:
        self.child.expect(pexpect.EOF, timeout=60)
        self.seen += str(self.child.before)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)


def transcript_of(directory: Path) -> dict[str, Any]:
    found = sorted(directory.glob("*.transcript.json"), key=lambda p: p.stat().st_mtime)
    assert found, f"no transcript in {directory}"
    return dict(json.loads(found[-1].read_text()))


def assert_no_secrets(directory: Path, secrets: Iterable[str]) -> None:
    """No share (nor its first words) and no token reached a file the runner wrote."""
    wanted = [s for s in secrets if s]
    for written in directory.iterdir():
        if not written.is_file():
            continue
        text = written.read_text()
        for secret in wanted:
            probe = " ".join(secret.split()[:4]) if " " in secret else secret
            assert probe not in text, written


def audit_record(world: World | SiteProcess, token: str, request_id: str) -> dict[str, Any]:
    response = world.call("GET", "ekms/audit/export", token)
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        obj = json.loads(line)
        if obj.get("type") == "record" and obj["record"].get("request_id") == request_id:
            return dict(obj["record"], index=obj["index"])
    raise AssertionError(f"no audit record {request_id}")


def check_landed(
    world: World | SiteProcess, officer: str, document: dict[str, Any]
) -> dict[str, Any]:
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
    assert record["details"]["transcript"] == document["transcript"]
    assert digest(record["details"]["transcript"]) == document["digest"]
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

    @property
    def people(self) -> list[Party]:
        """Administrator, witness and the three officials, in the order the runner asks."""
        return [self.world.officer, self.auditor, *self.world.officials]

    def status(self) -> dict[str, Any]:
        officer = self.world.login(self.world.officer)
        return dict(self.world.call("GET", "ekms/status", officer).json()["data"])


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
    """An embassy site, initialised 2 of 3 and unsealed: three officials, an officer, an auditor,
    two keys (``laws``, ``registry``)."""
    settings = make_settings(tmp_path, site_name="embassy-1", site_kind="embassy")
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        vault = hvac.Client(url=server.url)
        result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
        for share in result["keys"][:2]:
            vault.sys.submit_unseal_key(share)
        vault.token = result["root_token"]
        for name, classification in (("laws", "internal"), ("registry", "confidential")):
            vault.write(f"transit/keys/{name}", classification=classification)
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


@pytest.fixture
def blank(tmp_path: Path) -> Iterator[ServerThread]:
    """A server that was never initialised, as the init ceremony finds it."""
    settings = make_settings(tmp_path, site_name="embassy-1", site_kind="embassy")
    runtime = create_runtime(settings, module=prepare_hsm(settings))
    with ServerThread(runtime) as server:
        yield server
    runtime.close()


# --- two sites: the site ceremonies -----------------------------------------------------------
#
# Each site is its own ``ekms server`` process (``tests.support.sites``): two SoftHSM tokens
# cannot be open in one process. Home is initialised here with three officials (2 of 3), an
# officer, an auditor, a restore operator, a restore tool and a backup writer, and keys of three
# classifications with a data key wrapped under each. Other sites are launched as the test needs
# them (launched early and waited for late, so their start-ups overlap the test's work).

HOME_KEYS = {"laws": "internal", "registry": "confidential", "census": "secret"}


@dataclass(frozen=True)
class Wrapped:
    """A data key as a site made it: the plaintext to compare, the ciphertext to keep."""

    key: str
    context: str
    ciphertext: str
    plaintext: bytes

    def body(self) -> dict[str, str]:
        return {"ciphertext": self.ciphertext, "context": self.context}


@dataclass
class Crew:
    officials: list[Party]
    officer: Party
    auditor: Party
    operator: Party
    tool: Party
    writer: Party

    @classmethod
    def new(cls) -> Crew:
        return cls(
            [Party.ec(f"official-{n}") for n in range(3)],
            Party.ec("officer"),
            Party.ec("auditor"),
            Party.ec("operator"),
            Party.ed("restore-tool"),
            Party.ec("backup-writer"),
        )

    @property
    def ceremony(self) -> list[Party]:
        """Administrator, witness and the three officials, in the order the runner asks."""
        return [self.officer, self.auditor, *self.officials]


@dataclass
class Domain:
    tmp: Path
    crew: Crew
    home: SiteProcess
    shares: list[str] = field(default_factory=list)
    root: str = ""
    wrapped: list[Wrapped] = field(default_factory=list)
    started: list[SiteProcess] = field(default_factory=list)

    def launch(self, name: str, kind: str, directory: str = "") -> SiteProcess:
        """A new, uninitialised site's server, launched (``wait_ready`` before use)."""
        site = SiteProcess(SiteSpec(name, kind, self.tmp / (directory or name)))
        self.started.append(site)
        return site.launch()

    def key_files(self) -> list[tuple[str, str]]:
        return key_files(self.tmp / "keys", self.crew.ceremony)

    def officer(self, site: SiteProcess) -> str:
        return site.login(self.crew.officer)

    def provision(self, site: SiteProcess) -> dict[str, Any]:
        """What provision-site does, over the API: register, export, load, unseal (2 of 3),
        and pin the new site's audit key at home."""
        site.wait_ready()
        token = self.officer(self.home)
        self.home.register_site(token, site)
        exported = provision(self.home, token, site, self.shares[1:])
        there = self.officer(site)
        data(site.call("POST", "ekms/audit/tree-head", there))  # makes its audit key
        key = data(site.call("GET", "ekms/audit/heads", there))["public_key"]
        body = {"audit_public_key": key}
        data(self.home.call("POST", f"ekms/sites/{site.name}/audit-key", token, body))
        return exported

    def datakey(self, site: SiteProcess, key: str, obj: str) -> Wrapped:
        context = base64.b64encode(
            json.dumps({"dataset": key, "site": site.name, "object": obj}).encode()
        ).decode()
        writer = self.crew.writer
        path = f"transit/datakey/plaintext/{key}"
        made = data(site.dpop_call(writer, "POST", path, site.login(writer), {"context": context}))
        return Wrapped(key, context, made["ciphertext"], base64.b64decode(made["plaintext"]))

    def restore(self, site: SiteProcess, wrapped: list[Wrapped]) -> list[bytes]:
        """A restore at ``site``: filed, approved by two officials, the tool's DPoP-bound
        credential, and each data key unwrapped with it."""
        crew = self.crew
        request = data(
            site.propose(
                crew.operator,
                "restore",
                {
                    "datasets": sorted({w.key for w in wrapped}),
                    "reason": "disaster-recovery",
                    "justification": "restore after the ceremony",
                    "tool": crew.tool.id,
                    "ttl": 600,
                },
            )
        )
        for official in crew.officials[:2]:
            request = data(site.approve(official, request))
        assert request["state"] == "approved", request
        path = f"ekms/proposals/{request['id']}/credential"
        granted = site.dpop_call(crew.tool, "POST", path, site.login(crew.tool))
        assert granted.status_code == 200, granted.text
        credential = str(granted.json()["auth"]["client_token"])
        found = []
        for item in wrapped:
            answer = site.dpop_call(
                crew.tool, "POST", f"transit/decrypt/{item.key}", credential, item.body()
            )
            found.append(base64.b64decode(data(answer)["plaintext"]))
        return found


@pytest.fixture
def domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Domain]:
    """Home, initialised and unsealed, with the crew registered, keys and data keys made."""
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "EKMS_ADDR", "EKMS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    crew = Crew.new()
    home = SiteProcess(SiteSpec("home", "home", tmp_path / "home"))
    found = Domain(tmp_path, crew, home, started=[home])
    try:
        home.start()
        found.shares, found.root = bootstrap(
            home,
            officials=crew.officials,
            officer=crew.officer,
            others={
                "auditor": [crew.auditor],
                "restore-operator": [crew.operator],
                "restore-tool": [crew.tool],
                "backup-writer": [crew.writer],
            },
        )
        officer = found.officer(home)
        for name, classification in HOME_KEYS.items():
            body = {"classification": classification}
            data(home.call("POST", f"transit/keys/{name}", officer, body))
        found.wrapped = [found.datakey(home, name, f"home/{name}/1") for name in HOME_KEYS]
        yield found
    finally:
        for site in found.started:
            site.stop()


def approve_all(run: Terminal, officials: Iterable[str]) -> None:
    for official in officials:
        run.answer(rf"{official}: approve it\? \[y/n\]: ", "y")
