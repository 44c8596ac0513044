"""``ekms ceremony run --rehearse``: the same script against a throwaway service.

The rehearsal service is an ``ekms server`` subprocess with its own temporary data directory,
SoftHSM token and SQLite database, on a random loopback port, started the way every node starts
(``Settings`` with ``softhsm = true``: the helpers ``ekms server -dev`` uses). The runner talks
only to it: the real service's address is never read, and the real token is never opened. When
the script needs an initialised domain, the rehearsal makes one with throwaway shares and
throwaway participant keys and prints them, labelled REHEARSAL, for the participants to type at
the prompts as they would their own. Everything is deleted when the rehearsal ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from api.principal_keys import KeyHolder
from ceremonies.actions import Participant, login
from ceremonies.script import CeremonyRole, Quorum, Requirement, Script
from ceremonies.service import Service, ServiceError

if TYPE_CHECKING:
    from ceremonies.terminal import Terminal

START_TIMEOUT = 60.0
REHEARSAL_SHARES = 3
REHEARSAL_THRESHOLD = 2


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the runner dies (killed mid-rehearsal, say)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Rehearsal:
    def __init__(self, script: Script, term: Terminal) -> None:
        self.script = script
        self.term = term
        self.root = Path(tempfile.mkdtemp(prefix="ekms-rehearsal-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def _start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = self.root / "ekms.toml"
        data = self.root / "data"
        data.mkdir(mode=0o700)
        config.write_text(
            f'data_dir = "{data}"\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
            'site_name = "rehearsal"\nnode_name = "rehearsal"\naudit_head_interval = 0\n'
        )
        log = (self.root / "server.log").open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "api.cli", "server", "-config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - the runner starts no threads
        )
        self.address = f"http://127.0.0.1:{port}"
        service = Service(self.address)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                service.info()
            except ServiceError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the rehearsal service did not start:\n{tail}") from None
                time.sleep(0.2)
            else:
                return

    # --- the throwaway domain ----------------------------------------------------------------

    def prepare(self) -> None:
        """Bring the throwaway service to the state step 1 needs, and tell everyone what to use."""
        wanted = {p.require for p in self.script.preconditions if p.applies(1)}
        people = self._people()
        say = self.term.say
        say()
        say("=" * 78)
        say("REHEARSAL: a throwaway service and token. Nothing here is real; nothing is kept.")
        say(f"REHEARSAL service: {self.address}")
        for person in people:
            say(
                f"REHEARSAL {person.role.value}: principal {person.principal}, "
                f"key file {person.key_file}"
            )
        if Requirement.UNINITIALISED not in wanted:
            shares = self._initialise(people, wanted)
            for person, share in zip(self._officials(people), shares, strict=False):
                say(f"REHEARSAL share for {person.principal}: {share}")
        say("=" * 78)
        say()

    def _people(self) -> list[Participant]:
        keys = self.root / "keys"
        keys.mkdir(mode=0o700)
        people = []
        for requirement in self.script.roles:
            if requirement.role is CeremonyRole.OFFICIALS:
                minimum = requirement.minimum
                count = minimum if isinstance(minimum, int) else REHEARSAL_SHARES
                if minimum is Quorum.UNSEAL:
                    count = REHEARSAL_SHARES
                names = [f"rehearsal-official-{n}" for n in range(1, max(count, 1) + 1)]
            else:
                names = [f"rehearsal-{requirement.role.value}"]
            for name in names:
                holder = KeyHolder.generate(name)
                path = keys / f"{name}.jwk"
                path.write_text(json.dumps(holder.private_jwk()))
                path.chmod(0o600)
                people.append(Participant(name, requirement.role, holder, str(path)))
        return people

    @staticmethod
    def _officials(people: list[Participant]) -> list[Participant]:
        return [p for p in people if p.role is CeremonyRole.OFFICIALS]

    def _initialise(self, people: list[Participant], wanted: set[Requirement]) -> list[str]:
        service = Service(self.address)
        officials = self._officials(people)
        count = max(len(officials), REHEARSAL_SHARES)
        answer = service.call(
            "PUT", "sys/init", {"secret_shares": count, "secret_threshold": REHEARSAL_THRESHOLD}
        )
        shares: list[str] = list(answer["keys"])
        root = str(answer["root_token"])
        for share in shares[:REHEARSAL_THRESHOLD]:
            service.call("PUT", "sys/unseal", {"key": share})
        roles = {
            CeremonyRole.OFFICIALS: "official",
            CeremonyRole.ADMINISTRATOR: self._role(CeremonyRole.ADMINISTRATOR, "security-officer"),
            CeremonyRole.WITNESS: self._role(CeremonyRole.WITNESS, "auditor"),
        }
        for person in people:
            service.call(
                "POST",
                f"ekms/principals/{person.principal}",
                {"roles": [roles[person.role]], "jwk": dict(person.holder.jwk)},
                token=root,
            )
        for name, classification in (("rehearsal-data", "confidential"),):
            service.call(
                "POST", f"transit/keys/{name}", {"classification": classification}, token=root
            )
        if Requirement.EMERGENCY in wanted:
            self._declare_emergency(service, officials)
        if Requirement.SEALED in wanted:
            service.call("PUT", "sys/seal", token=root)
        service.call("POST", "auth/token/revoke-self", token=root)
        return shares

    def _role(self, role: CeremonyRole, default: str) -> str:
        requirement = self.script.role(role)
        if requirement is None or not requirement.service_roles:
            return default
        if default in requirement.service_roles:
            return default
        return min(requirement.service_roles)

    def _declare_emergency(self, service: Service, officials: list[Participant]) -> None:
        audience = str(service.info()["audience"])
        tokens = {p.principal: _token(service, p, audience) for p in officials}
        proposal: dict[str, Any] = service.call(
            "POST",
            "ekms/proposals",
            {
                "kind": "declare-emergency",
                "payload": {"duration": 3600, "justification": "rehearsal"},
            },
            token=tokens[officials[0].principal],
        )["data"]
        for official in officials[1:]:
            if proposal["state"] != "pending":
                break
            signature = official.holder.approval(proposal, audience)
            proposal = service.call(
                "POST",
                f"ekms/proposals/{proposal['id']}/decide",
                {"signature": signature},
                token=tokens[official.principal],
            )["data"]


def _token(service: Service, person: Participant, audience: str) -> str:
    login(service, person, audience)
    assert person.token is not None
    return person.token
