"""``ekms ceremony run``: walk the participants through a script, journal it, sign the transcript.

The order of a run: find an unfinished journal (offer resume or restart), ask who is present
and load their keys, check the preconditions, the quorum and (when the service is unsealed) each
participant's roles by logging them in, then run the steps from the first one not yet recorded.
Each step's record is journaled (fsync) before the next begins. At the end, or when a step fails
and the ceremony stops, the transcript is built from the journal, each participant signs its
digest with their key, and the administrator's session submits it to the service, which signs
it too and appends it to the audit log.

A ceremony that spans two sites also talks to a **peer** (``--peer URL``): the steps marked
``at: peer`` run there, with the same participants logged in there under its own audience.
Each step's record names the service and site it touched, the journal's start names the peer
(a resumed run must be given the same one), and the main service signs the transcript.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from api.principal_keys import KeyHolder
from ceremonies import transcript
from ceremonies.actions import (
    REGISTRY,
    Participant,
    Session,
    SiteHandle,
    StepContext,
    StepFailedError,
    login,
    verify_identities,
)
from ceremonies.journal import Journal, active_path, write_atomically
from ceremonies.script import (
    VERIFY_ACTION,
    At,
    CeremonyRole,
    OnFailure,
    Quorum,
    Requirement,
    Script,
    Step,
)
from ceremonies.service import Service, ServiceError
from ceremonies.state import Progress, utc_text
from kms.errors import InvalidRequestError
from kms.identity import validate_principal_id

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ceremonies.terminal import Terminal


class Runner:
    def __init__(
        self,
        script: Script,
        service: Service,
        term: Terminal,
        directory: Path,
        *,
        rehearsal: bool = False,
        clock: Callable[[], float] = time.time,
        peer: Service | None = None,
    ) -> None:
        if script.uses_peer and peer is None:
            raise InvalidRequestError(
                f"{script.name} spans two sites: give the other site's address with --peer URL"
            )
        if peer is not None and not script.uses_peer:
            raise InvalidRequestError(f"{script.name} happens at one site: it takes no --peer")
        self.script = script
        self.service = service
        self.peer = peer
        self.peer_session = Session({})
        self.peer_participants: list[Participant] = []
        self.term = term
        self.directory = directory
        self.rehearsal = rehearsal
        self.clock = clock
        self.journal: Journal | None = None
        self.progress = Progress(len(script.steps))
        self.participants: list[Participant] = []
        self.session = Session({})

    # --- journal ---------------------------------------------------------------------------

    def now(self) -> str:
        return utc_text(self.clock())

    def record(self, entry: dict[str, Any]) -> None:
        assert self.journal is not None
        self.progress.apply(entry)
        self.journal.append(entry)

    def _open_journal(self, mode: str) -> list[dict[str, Any]]:
        """Resume the unfinished ceremony (returns no abandoned attempts), or set it aside."""
        path = active_path(self.directory, self.script.name)
        if not path.exists():
            if mode == "resume":
                raise InvalidRequestError(
                    f"there is no unfinished {self.script.name} ceremony in {self.directory} "
                    "to resume"
                )
            return []
        journal = Journal.open(path)
        progress = Progress.replay(len(self.script.steps), journal.entries)
        if progress.start is None:  # killed before the start was written: nothing happened
            path.unlink()
            return []
        same_script = progress.start["script"]["sha256"] == self.script.sha256
        self.term.heading("An unfinished ceremony was found")
        self.term.say(
            f"Ceremony {progress.ceremony}, started {progress.start['at']}; "
            f"{len(progress.steps)} of {len(self.script.steps)} steps recorded"
            + (", ended; its transcript is not finished" if progress.ended else "")
            + "."
        )
        if not same_script:
            self.term.say("The script file changed since it began, so it cannot be resumed.")
        choice = {"resume": "r", "restart": "s"}.get(mode)
        if choice is None:
            options = {"r": "resume it", "s": "start over (it is kept as abandoned)"}
            if not same_script:
                options = {"s": options["s"], "q": "quit"}
            choice = self.term.choose("Resume or start over?", {**options, "q": "quit"})
        if choice == "q":
            raise InvalidRequestError("nothing done: the unfinished ceremony is still there")
        if choice == "r":
            if not same_script:
                raise InvalidRequestError(
                    "the script changed since the unfinished ceremony began: run with --restart"
                )
            self.journal, self.progress = journal, progress
            return []
        kept = self.directory / f"{self.script.name}-{progress.ceremony}.abandoned.journal.jsonl"
        journal.move(kept)
        self.term.say(f"The unfinished ceremony's journal is kept as {kept.name}.")
        return [
            {
                "ceremony": progress.ceremony,
                "journal": kept.name,
                "last_hash": journal.head,
                "steps_completed": len(progress.steps),
                "started_at": progress.start["at"],
            }
        ]

    # --- participants ----------------------------------------------------------------------

    def _gather(self) -> list[Participant]:
        self.term.heading("Who is present")
        self.term.say("Each participant gives their principal id and the file of their key.")
        found: list[Participant] = []
        for requirement in self.script.roles:
            role = requirement.role
            if role is not CeremonyRole.OFFICIALS:
                person = self._participant(f"Ceremony {role.value}", role, found)
                assert person is not None
                found.append(person)
                continue
            while True:
                label = f"Official {sum(p.role is role for p in found) + 1}"
                participant = self._participant(label, role, found, optional=True)
                if participant is None:
                    break
                found.append(participant)
        return found

    def _participant(
        self, label: str, role: CeremonyRole, found: list[Participant], *, optional: bool = False
    ) -> Participant | None:
        while True:
            hint = " (press Enter when every official present is entered)" if optional else ""
            principal = self.term.ask(f"{label}: principal id{hint}", allow_empty=optional)
            if not principal:
                return None
            try:
                validate_principal_id(principal)
            except InvalidRequestError as exc:
                self.term.say(str(exc))
                continue
            if any(p.principal == principal for p in found):
                self.term.say(
                    f"{principal} is already taking part: each role is held by a different person"
                )
                continue
            holder, path = self._load_key(principal)
            participant = Participant(principal, role, holder, path)
            if any(p.thumbprint == participant.thumbprint for p in found):
                self.term.say("That key is already presented by another participant.")
                continue
            return participant

    def _load_key(self, principal: str, default: str = "") -> tuple[KeyHolder, str]:
        while True:
            path = self.term.ask(f"{principal}: key file", default=default)
            try:
                holder = KeyHolder.load(principal, path)
            except OSError as exc:
                self.term.say(f"Cannot read {path}: {exc.strerror or exc}")
                continue
            except ValueError as exc:
                self.term.say(f"{path}: {exc}")
                continue
            return holder, path

    def _reload(self, start: dict[str, Any]) -> list[Participant]:
        """The participants of a resumed ceremony: the same people, with the same keys."""
        found = []
        for item in start["participants"]:
            principal, wanted = item["principal"], item["thumbprint"]
            path = str(item["key_file"])
            try:
                holder = KeyHolder.load(principal, path)
            except (OSError, ValueError):
                self.term.say(f"{principal}: the key file used before cannot be read.")
                holder, path = self._load_key(principal, path)
            participant = Participant(principal, CeremonyRole(item["role"]), holder, path)
            while participant.thumbprint != wanted:
                self.term.say(f"{principal}: that is not the key used when the ceremony began.")
                participant.holder, participant.key_file = self._load_key(principal)
            found.append(participant)
        return found

    # --- checks before step 1 --------------------------------------------------------------

    def _state_problems(self, info: dict[str, Any], next_step: int, at: At = At.MAIN) -> list[str]:
        initialised, sealed = bool(info.get("initialized")), bool(info.get("sealed"))
        holds = {
            Requirement.UNINITIALISED: not initialised,
            Requirement.INITIALISED: initialised,
            Requirement.SEALED: initialised and sealed,
            Requirement.UNSEALED: initialised and not sealed,
        }
        state = "uninitialised" if not initialised else "sealed" if sealed else "unsealed"
        return [
            f"precondition {p.require.value} does not hold: the service is {state}"
            for p in self.script.preconditions
            if p.at is at and p.require in holds and p.applies(next_step) and not holds[p.require]
        ]

    def _emergency_problems(self, next_step: int) -> list[str]:
        wanted = [
            p
            for p in self.script.preconditions
            if p.require in (Requirement.EMERGENCY, Requirement.NO_EMERGENCY)
            and p.applies(next_step)
        ]
        if not wanted:
            return []
        admin = next(p for p in self.participants if p.role is CeremonyRole.ADMINISTRATOR)
        token = admin.token or ""
        status = self.service.call("GET", "ekms/status", token=token)["data"]
        active = status.get("emergency") is not None
        return [
            f"precondition {p.require.value} does not hold: an emergency is "
            + ("in force" if active else "not in force")
            for p in wanted
            if active != (p.require is Requirement.EMERGENCY)
        ]

    def _quorum_problem(self, info: dict[str, Any]) -> str | None:
        requirement = self.script.role(CeremonyRole.OFFICIALS)
        if requirement is None:
            return None
        minimum = requirement.minimum
        if minimum is Quorum.UNSEAL:
            needed = int(info.get("threshold") or 0)
        elif minimum is Quorum.APPROVAL:
            needed = int(info.get("approvals_required") or 0) + 1
        else:
            needed = int(minimum)
        present = sum(p.role is CeremonyRole.OFFICIALS for p in self.participants)
        if present < needed:
            return f"quorum cannot be reached: {present} officials present, {needed} needed"
        return None

    # --- the run ---------------------------------------------------------------------------

    def run(self, mode: str = "ask") -> int:
        self.session = Session(self.service.info())  # unreachable: stop before asking anything
        if self.peer is not None:
            try:
                self.peer_session = Session(self.peer.info())
            except ServiceError as exc:
                raise ServiceError(
                    f"the peer at {self.peer.address}: {exc}", exc.status, exc.request_id
                ) from None
        abandoned = self._open_journal(mode)
        resumed = self.journal is not None
        if self.journal is None:
            self.participants = self._gather()
            self.journal = Journal.create(active_path(self.directory, self.script.name))
            self.progress = Progress(len(self.script.steps))
            self.record(
                {
                    "type": "start",
                    "ceremony": str(uuid.uuid4()),
                    "at": self.now(),
                    "script": {
                        "name": self.script.name,
                        "title": self.script.title,
                        "sha256": self.script.sha256,
                    },
                    "rehearsal": self.rehearsal,
                    "service": {
                        "address": self.service.address,
                        "audience": self.session.audience,
                        "site": self.session.info.get("site"),
                    },
                    "participants": [p.journal_json() for p in self.participants],
                    "abandoned": abandoned,
                    **({"peer": self._peer_json()} if self.peer is not None else {}),
                }
            )
        else:
            assert self.progress.start is not None
            self._same_peer(self.progress.start)
            self.participants = self._reload(self.progress.start)
            if self.progress.ended:
                return self.finish()
            self.record({"type": "resume", "at": self.now(), "next_step": self.progress.next_step})
        # The same people at the peer: their own logins there, under the peer's audience.
        self.peer_participants = [
            Participant(p.principal, p.role, p.holder, p.key_file) for p in self.participants
        ]
        self.term.say(f"Ceremony {self.progress.ceremony}: {self.script.title}")
        if self.peer is not None:
            self.term.say(f"Main service: {self._where(At.MAIN)}")
            self.term.say(f"Peer: {self._where(At.PEER)}")
        refusal = self._checks_before(resumed)
        if refusal is not None:
            self.term.say(f"The ceremony cannot begin: {refusal}")
            self.record({"type": "end", "at": self.now(), "outcome": "aborted", "reason": refusal})
            return self.finish()
        for number in range(self.progress.next_step, len(self.script.steps) + 1):
            entry = self._run_step(self.script.step(number))
            self.record(entry)
            if entry["outcome"] == "failed":
                reason = f"step {number} ({entry['title']}) failed: {entry['summary']}"
                self.record(
                    {"type": "end", "at": self.now(), "outcome": "aborted", "reason": reason}
                )
                return self.finish()
        self.record({"type": "end", "at": self.now(), "outcome": "completed"})
        return self.finish()

    def _checks_before(self, resumed: bool) -> str | None:
        """Why the run must not go on, or None: state, quorum, roles, emergency, in that order."""
        next_step = self.progress.next_step
        problems = self._state_problems(self.session.info, next_step)
        if self.peer is not None:
            problems += self._peer_problems(next_step)
        quorum = self._quorum_problem(self.session.info)
        if quorum is not None:
            problems.append(quorum)
        if problems:
            return "; ".join(problems)
        if self.peer is not None and (
            self.script.identities_checked_at_start_at(At.PEER)
            or (resumed and self._verified_before(At.PEER))
        ):
            checked, problems = verify_identities(
                self.peer, self.script, self.peer_participants, self.peer_session.audience
            )
            self.record(
                {"type": "identities", "at": self.now(), "checked": checked, "service": "peer"}
            )
            if problems:
                return "; ".join(f"at the peer: {p}" for p in problems)
        if self.script.identities_checked_at_start or (resumed and self._verified_before(At.MAIN)):
            checked, problems = verify_identities(
                self.service, self.script, self.participants, self.session.audience
            )
            self.record({"type": "identities", "at": self.now(), "checked": checked})
            if problems:
                return "; ".join(problems)
            problems = self._emergency_problems(next_step)
            if self.peer is not None:
                problems += self._registered_peer_problems()
            if problems:
                return "; ".join(problems)
        return None

    def _verified_before(self, at: At) -> bool:
        """Whether a resumed run's participants were confirmed by a step already recorded."""
        return any(
            s.action == VERIFY_ACTION and s.at is at and s.number < self.progress.next_step
            for s in self.script.steps
        )

    # --- the peer --------------------------------------------------------------------------

    def _where(self, at: At) -> str:
        service, info = (
            (self.service, self.session.info)
            if at is At.MAIN
            else (self.peer, self.peer_session.info)
        )
        assert service is not None
        return f"site {info.get('site')} ({info.get('site_kind')}) at {service.address}"

    def _peer_json(self) -> dict[str, Any]:
        assert self.peer is not None
        info = self.peer_session.info
        return {
            "address": self.peer.address,
            "audience": self.peer_session.audience,
            "site": info.get("site"),
            "site_kind": info.get("site_kind"),
        }

    def _same_peer(self, start: dict[str, Any]) -> None:
        """A resumed two-site ceremony goes on with the peer it began with, and no other."""
        before = start.get("peer")
        if before is None or self.peer is None:
            return
        now = self._peer_json()
        if (before.get("site"), before.get("audience")) != (now["site"], now["audience"]):
            raise InvalidRequestError(
                f"the unfinished ceremony's peer was site {before.get('site')} at "
                f"{before.get('address')}; {self.peer.address} is site {now['site']}: resume "
                "with the same peer, or start over (--restart)"
            )

    def _peer_problems(self, next_step: int) -> list[str]:
        """The peer's own preconditions, and that it is another site than the main service."""
        info = self.peer_session.info
        problems = [
            f"at the peer: {problem}" for problem in self._state_problems(info, next_step, At.PEER)
        ]
        if info.get("site") == self.session.info.get("site"):
            problems.append(
                f"the peer is site {info.get('site')}, the same site as the main service: give "
                "the other site's address with --peer"
            )
        return problems

    def _registered_peer_problems(self) -> list[str]:
        """Whether the peer is the site the main service knows by that name (kind, audit key).

        An unsealed main service that has the peer's site in its registry with an audit key
        tells an impostor (or a wrong address) from the site itself: the peer's audit key is
        the one its tree heads and transcripts are signed with.
        """
        info = self.peer_session.info
        admin = next(p for p in self.participants if p.role is CeremonyRole.ADMINISTRATOR)
        try:
            known = self.service.call(
                "GET", f"ekms/sites/{info.get('site')}", token=admin.token or ""
            )["data"]
        except ServiceError as exc:
            if exc.status in (400, 403, 404):
                return []
            raise
        problems = []
        name = info.get("site")
        if known.get("kind") != info.get("site_kind"):
            problems.append(
                f"the peer answers as site {name} of kind {info.get('site_kind')}, but the main "
                f"service registered {name} as {known.get('kind')}: it is not the expected site"
            )
        if known.get("audit_kid") and info.get("kid") and known["audit_kid"] != info["kid"]:
            problems.append(
                f"the peer answers as site {name}, but its audit key ({info['kid']}) is not the "
                f"one the main service registered for {name} ({known['audit_kid']}): it is not "
                "the expected site"
            )
        return problems

    def _run_step(self, step: Step) -> dict[str, Any]:
        total = len(self.script.steps)
        performers = [p for p in self.participants if p.role is step.by]
        self.term.heading(f"Step {step.number} of {total}: {step.title}")
        if self.peer is not None:
            self.term.say(f"At: {self._where(step.at)}")
        self.term.say(f"By: {', '.join(p.principal for p in performers)} ({step.by.value})")
        if step.note:
            self.term.say(step.note)
        started = self.now()
        deviations: list[dict[str, Any]] = []
        if step.check is not None:
            outcome, summary = self._run_check(step, performers, deviations)
        else:
            outcome, summary = self._run_action(step, deviations)
        entry: dict[str, Any] = {
            "type": "step",
            "step": step.number,
            "at": self.now(),
            "started_at": started,
            "title": step.title,
            "kind": step.kind,
            "by": [p.principal for p in performers],
            "outcome": outcome,
            "summary": summary,
            "deviations": deviations,
        }
        entry["action" if step.action else "check"] = step.action or step.check
        if self.peer is not None:  # which site the step touched; the events name theirs
            info = self.session.info if step.at is At.MAIN else self.peer_session.info
            entry["service"] = step.at.value
            entry["site"] = info.get("site")
        self.term.say(f"Step {step.number}: {outcome}. {summary}")
        return entry

    def _deviation(self, who: Participant, prompt: str) -> dict[str, Any]:
        reason = self.term.ask(prompt)[:2000]
        return {"reason": reason, "recorded_by": who.principal, "at": self.now()}

    def _run_check(
        self, step: Step, performers: list[Participant], deviations: list[dict[str, Any]]
    ) -> tuple[str, str]:
        assert step.check is not None
        self.term.say(step.check)
        declined = []
        for person in performers:
            if self.term.confirm(f"{person.principal}: confirmed?"):
                continue
            declined.append(person.principal)
            deviations.append(
                self._deviation(person, f"{person.principal}: why not? (recorded as a deviation)")
            )
            if step.on_failure is OnFailure.STOP:
                return "failed", f"not confirmed by {person.principal}: {deviations[-1]['reason']}"
        if declined:
            return (
                "deviation",
                f"not confirmed by {', '.join(declined)}; continued as the script allows",
            )
        return "done", f"confirmed by {', '.join(p.principal for p in performers)}"

    def _run_action(self, step: Step, deviations: list[dict[str, Any]]) -> tuple[str, str]:
        assert step.action is not None
        action = REGISTRY[step.action]
        admin = next(p for p in self.participants if p.role is CeremonyRole.ADMINISTRATOR)
        sites = {At.MAIN: SiteHandle(self.service, self.session, self.participants)}
        if self.peer is not None:
            sites[At.PEER] = SiteHandle(self.peer, self.peer_session, self.peer_participants)
        while True:
            ctx = StepContext(
                step=step,
                script=self.script,
                service=self.service,
                term=self.term,
                participants=self.participants,
                session=self.session,
                earlier=list(self.progress.step_events(step.number)),
                journal=self.record,
                clock=self.clock,
                history=self._events,
                sites=sites,
                directory=self.directory,
                ceremony=self.progress.ceremony,
            ).at_site(step.at)
            try:
                return "done", action.run(ctx)
            except (StepFailedError, ServiceError, InvalidRequestError) as exc:
                message = str(exc)
            failed = {
                "type": "event",
                "step": step.number,
                "at": self.now(),
                "what": "failed",
                "error": message,
            }
            if self.peer is not None:
                failed["service"] = step.at.value
            self.record(failed)
            self.term.say(f"Step {step.number} failed: {message}")
            options = {"r": "retry the step", "a": "stop the ceremony"}
            if step.on_failure is OnFailure.CONTINUE:
                options["d"] = "record a deviation and continue"
            choice = self.term.choose(f"{admin.principal}: what now?", options)
            if choice == "r":
                continue
            if choice == "d":
                deviations.append(
                    self._deviation(admin, f"{admin.principal}: the reason for continuing")
                )
                return "deviation", f"failed ({message}); continued by a recorded deviation"
            return "failed", message

    def _events(self) -> list[dict[str, Any]]:
        return [e for number in sorted(self.progress.events) for e in self.progress.events[number]]

    # --- the end ---------------------------------------------------------------------------

    def finish(self) -> int:
        """Build, sign and submit the transcript; archive the journal beside it."""
        assert self.journal is not None
        body = transcript.build(self.progress)
        body_digest = transcript.digest(body)
        name = f"{self.script.name}-{self.progress.ceremony}"
        path = self.directory / f"{name}.transcript.json"
        document: dict[str, Any] = {"transcript": body, "digest": body_digest, "signatures": []}
        if path.exists():
            earlier = orjson.loads(path.read_bytes())
            if earlier.get("digest") == body_digest:
                document = earlier
        write_atomically(path, _pretty(document))
        self.term.heading(f"Transcript: {body['outcome']}")
        self.term.say(f"Transcript digest (SHA-256): {body_digest}")
        self._sign(document, body)
        write_atomically(path, _pretty(document))
        submitted = self._submit(document)
        write_atomically(path, _pretty(document))
        self.journal.move(self.directory / f"{name}.journal.jsonl")
        self.term.say(f"Transcript written to {path}")
        self.term.say(f"Print it for paper signatures: ekms ceremony render {path}")
        if body["outcome"] != "completed":
            self.term.say(f"The ceremony was aborted: {body.get('abort_reason', '')}")
        return 0 if body["outcome"] == "completed" and submitted else 1

    def _sign(self, document: dict[str, Any], body: dict[str, Any]) -> None:
        signed = {s["principal"] for s in document["signatures"]}
        for person in self.participants:
            if person.principal in signed:
                continue
            if not self.term.confirm(
                f"{person.principal}: sign the transcript with your key (digest "
                f"{document['digest'][:16]}...)?"
            ):
                continue
            claims = transcript.signature_claims(
                body, person.principal, self.session.audience, self.clock()
            )
            document["signatures"].append(
                {
                    "principal": person.principal,
                    "jws": person.holder.sign(claims, typ=transcript.SIGNATURE_TYPE),
                }
            )

    def _submit(self, document: dict[str, Any]) -> bool:
        if document.get("service_signature"):
            return True
        signers = {s["principal"] for s in document["signatures"]}
        tokens = [self.session.root_token] if self.session.root_token else []
        for person in self.participants:
            if person.principal not in signers:
                continue
            try:
                tokens.append(person.token or _login_token(self.service, person, self.session))
            except ServiceError:
                continue
        body = {"transcript": document["transcript"], "signatures": document["signatures"]}
        problem = "no signer could log in to the service"
        for token in tokens:
            try:
                answer = self.service.call("POST", "ekms/ceremonies/transcripts", body, token=token)
            except ServiceError as exc:
                problem = str(exc)
                continue
            data = answer["data"]
            document["service_signature"] = {
                "jws": data["jws"],
                "kid": data["kid"],
                "request_id": data["request_id"],
            }
            self.term.say(
                f"The service signed the transcript and appended it to the audit log "
                f"(request id {data['request_id']})."
            )
            return True
        self.term.say(
            f"The transcript was not submitted to the service ({problem}). Submit it once the "
            "service can take it: ekms ceremony submit FILE"
        )
        return False


def _login_token(service: Service, person: Participant, session: Session) -> str:
    login(service, person, session.audience)
    assert person.token is not None
    return person.token


def _pretty(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
