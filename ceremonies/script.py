"""Ceremony scripts: the YAML schema, read into typed values and checked before anything runs.

A script is declarative: who must be present, what must hold before step 1, and numbered steps,
each either an action of the service (named, with parameters) or a human check (a prompt that a
named participant confirms). Nothing here runs a step or reads a file; ``load_script`` takes the
file's bytes and the actions this version of the runner knows, so that ``ekms ceremony check``
and the runner judge a script by the same rules, and a script naming an action that does not
exist yet is reported as such rather than failing half-way through a ceremony.

Most ceremonies happen at one service. Those that span two sites (provisioning a site from
home, failing back to a rebuilt home, decommissioning a site) name the other site's service as
the **peer** (``ekms ceremony run --peer URL``): a step or precondition with ``at: peer``
happens there, anything else at the main service, which is the one that signs the transcript.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import yaml

from kms.errors import InvalidRequestError
from kms.policy import parse_choice

if TYPE_CHECKING:
    from collections.abc import Mapping

SCHEMA_VERSION = 1
MAX_SCRIPT_BYTES = 256 * 1024
MAX_STEPS = 64
MAX_TEXT = 2000
MAX_OFFICIALS = 16
VERIFY_ACTION = "participants.verify"  # logs each participant in; its roles are checked

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_ACTION_RE = re.compile(r"[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+")
_TOP_LEVEL = frozenset(
    {"schema", "name", "title", "purpose", "roles", "preconditions", "steps", "rehearsal"}
)
_STEP_KEYS = frozenset(
    {"n", "title", "by", "at", "action", "check", "params", "on_failure", "note"}
)
_ROLE_KEYS = frozenset({"service_roles", "minimum", "holds"})
SERVICE_ROLES = frozenset({"official", "restore-operator", "security-officer", "auditor"})


class CeremonyRole(StrEnum):
    """The parts people play in a ceremony; each is played by different people."""

    ADMINISTRATOR = "administrator"
    WITNESS = "witness"
    OFFICIALS = "officials"


class At(StrEnum):
    """Which service a step or precondition concerns: the main one, or the ``--peer``."""

    MAIN = "main"  # the service the runner is pointed at; it signs the transcript
    PEER = "peer"  # the other site's service, given with --peer


class OnFailure(StrEnum):
    STOP = "stop"  # a failed check or action ends the ceremony (aborted)
    CONTINUE = "continue"  # the administrator may record a deviation with a reason and go on


class Requirement(StrEnum):
    """What a precondition asks of the service, answered by its unauthenticated status."""

    UNINITIALISED = "uninitialised"
    INITIALISED = "initialised"
    SEALED = "sealed"
    UNSEALED = "unsealed"
    NO_EMERGENCY = "no-emergency"
    EMERGENCY = "emergency"


class Quorum(StrEnum):
    """How many officials a ceremony needs, when the script cannot say a number."""

    UNSEAL = "unseal-threshold"  # the share set's threshold, from sys/seal-status
    APPROVAL = "approval-quorum"  # a proposer plus approvals_required approvers


@dataclass(frozen=True)
class ActionInfo:
    """What the script checker needs to know of an action: its parameters and their types."""

    params: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    summary: str = ""
    # The action reads or names the other site (the domain export's target, say), so the
    # script needs a peer even if every step runs at the main service.
    needs_peer: bool = False


@dataclass(frozen=True)
class RoleRequirement:
    role: CeremonyRole
    service_roles: frozenset[str]  # any one of these; empty: no role needed (init-domain)
    minimum: int | Quorum = 1
    holds: str = ""  # what the person brings and takes away, for the printed document


@dataclass(frozen=True)
class Precondition:
    require: Requirement
    # Checked when a run starts or resumes before this step (a step that changes what is
    # required, as unsealing does); None: at every start and resume.
    before_step: int | None = None
    at: At = At.MAIN

    def applies(self, next_step: int) -> bool:
        return self.before_step is None or next_step < self.before_step


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    by: CeremonyRole
    action: str | None = None
    at: At = At.MAIN
    check: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    on_failure: OnFailure = OnFailure.STOP
    note: str = ""

    @property
    def kind(self) -> str:
        return "action" if self.action is not None else "check"


@dataclass(frozen=True)
class Script:
    name: str
    title: str
    purpose: str
    roles: tuple[RoleRequirement, ...]
    preconditions: tuple[Precondition, ...]
    steps: tuple[Step, ...]
    sha256: str  # of the file's bytes, as the transcript names the script
    rehearsal: Mapping[str, Any] = field(default_factory=dict)
    needs_peer: bool = False  # an action reads or names the other site (ActionInfo.needs_peer)

    def role(self, role: CeremonyRole) -> RoleRequirement | None:
        return next((r for r in self.roles if r.role is role), None)

    def step(self, number: int) -> Step:
        return self.steps[number - 1]

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.action for s in self.steps if s.action is not None))

    @property
    def identities_checked_at_start(self) -> bool:
        """Whether the service can confirm roles before step 1: only an unsealed one logs in."""
        return self.identities_checked_at_start_at(At.MAIN)

    def identities_checked_at_start_at(self, at: At) -> bool:
        return any(
            p.require is Requirement.UNSEALED and p.before_step is None and p.at is at
            for p in self.preconditions
        )

    def verifies_at(self, at: At) -> bool:
        """Whether a step logs the participants in at that service (``participants.verify``)."""
        return any(s.action == VERIFY_ACTION and s.at is at for s in self.steps)

    @property
    def uses_peer(self) -> bool:
        """Whether the ceremony spans two sites: ``ekms ceremony run`` then needs ``--peer``."""
        return (
            self.needs_peer
            or any(s.at is At.PEER for s in self.steps)
            or any(p.at is At.PEER for p in self.preconditions)
        )


@dataclass(frozen=True)
class ScriptReport:
    """The checker's verdict: problems in the file, and actions this version does not have."""

    script: Script | None
    errors: tuple[str, ...] = ()
    unknown_actions: tuple[str, ...] = ()

    @property
    def runnable(self) -> bool:
        return self.script is not None and not self.errors and not self.unknown_actions


def load_script(raw: bytes, actions: Mapping[str, ActionInfo]) -> ScriptReport:
    """Parse and check a script; never raises for a bad file, the report lists every problem."""
    if len(raw) > MAX_SCRIPT_BYTES:
        return ScriptReport(None, (f"the script is larger than {MAX_SCRIPT_BYTES} bytes",))
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        return ScriptReport(None, (f"not valid YAML{line}: {getattr(exc, 'problem', exc)}",))
    checker = _Checker(actions)
    script = checker.script(data, hashlib.sha256(raw).hexdigest())
    unknown = tuple(sorted(checker.unknown))
    return ScriptReport(None if checker.errors else script, tuple(checker.errors), unknown)


def require_runnable(report: ScriptReport, source: str) -> Script:
    """The script, or one error naming every problem (what ``ekms ceremony run`` refuses)."""
    if report.errors:
        raise InvalidRequestError(f"{source}: " + "; ".join(report.errors))
    if report.unknown_actions:
        raise InvalidRequestError(
            f"{source}: needs actions not available in this version of the service: "
            + ", ".join(report.unknown_actions)
        )
    assert report.script is not None
    return report.script


class _Checker:
    def __init__(self, actions: Mapping[str, ActionInfo]) -> None:
        self.actions = actions
        self.errors: list[str] = []
        self.unknown: set[str] = set()
        self.peer_actions: set[str] = set()

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def text(self, value: object, where: str, *, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            self.fail(f"{where} must be a non-empty string")
            return ""
        if len(value) > MAX_TEXT:
            self.fail(f"{where} is longer than {MAX_TEXT} characters")
        return value.strip()

    def script(self, data: object, sha256: str) -> Script | None:
        if not isinstance(data, dict):
            self.fail("the script must be a YAML mapping (schema, name, title, purpose, ...)")
            return None
        for key in sorted(set(data) - _TOP_LEVEL, key=str):
            self.fail(f"unknown top-level key {key!r}")
        if data.get("schema") != SCHEMA_VERSION:
            self.fail(f"schema must be {SCHEMA_VERSION}")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            self.fail("name must be 1-64 lower-case letters, digits and '-'")
            name = ""
        title = self.text(data.get("title"), "title")
        purpose = self.text(data.get("purpose"), "purpose")
        roles = self.roles(data.get("roles"))
        preconditions = self.preconditions(data.get("preconditions", []))
        steps = self.steps(data.get("steps"), {r.role for r in roles})
        rehearsal = data.get("rehearsal", {})
        if not isinstance(rehearsal, dict):
            self.fail("rehearsal must be a mapping")
            rehearsal = {}
        script = Script(
            name=name,
            title=title,
            purpose=purpose,
            roles=roles,
            preconditions=preconditions,
            steps=steps,
            sha256=sha256,
            rehearsal=rehearsal,
            needs_peer=bool(self.peer_actions),
        )
        if steps and not script.identities_checked_at_start and not script.verifies_at(At.MAIN):
            self.fail(
                "the service is not unsealed before step 1, so it cannot confirm the "
                f"participants' roles then: add a {VERIFY_ACTION} step after the service opens"
            )
        if (
            steps
            and script.uses_peer
            and not script.identities_checked_at_start_at(At.PEER)
            and not script.verifies_at(At.PEER)
        ):
            self.fail(
                "the peer is not unsealed before step 1, so it cannot confirm the participants' "
                f"roles then: add a {VERIFY_ACTION} step at: peer after the peer opens (or the "
                "precondition unsealed at: peer)"
            )
        return script

    def roles(self, data: object) -> tuple[RoleRequirement, ...]:
        if not isinstance(data, dict) or not data:
            self.fail("roles must map administrator, witness and officials to requirements")
            return ()
        found: list[RoleRequirement] = []
        for key, value in data.items():
            try:
                role = parse_choice(CeremonyRole, key, "ceremony role")
            except InvalidRequestError as exc:
                self.fail(f"roles: {exc}")
                continue
            found.append(self.role(role, value if value is not None else {}))
        present = {r.role for r in found}
        for needed in (CeremonyRole.ADMINISTRATOR, CeremonyRole.WITNESS):
            if needed not in present:
                self.fail(f"roles: a ceremony needs an {needed.value}")
        return tuple(found)

    def role(self, role: CeremonyRole, data: object) -> RoleRequirement:  # noqa: C901 - per key
        where = f"roles.{role.value}"
        if not isinstance(data, dict):
            self.fail(f"{where} must be a mapping")
            return RoleRequirement(role, frozenset())
        for key in sorted(set(data) - _ROLE_KEYS, key=str):
            self.fail(f"{where}: unknown key {key!r}")
        wanted = data.get("service_roles", [])
        if not isinstance(wanted, list) or not all(isinstance(r, str) for r in wanted):
            self.fail(f"{where}.service_roles must be a list of role names")
            wanted = []
        for bad in sorted(set(wanted) - SERVICE_ROLES):
            self.fail(f"{where}.service_roles: unknown role {bad!r}")
        minimum: int | Quorum = 1
        raw = data.get("minimum", 1)
        if role is not CeremonyRole.OFFICIALS:
            if raw != 1:
                self.fail(f"{where}.minimum: there is exactly one {role.value}")
        elif isinstance(raw, bool) or not isinstance(raw, (int, str)):
            self.fail(f"{where}.minimum must be a number or one of: {_choices(Quorum)}")
        elif isinstance(raw, int):
            if not 0 <= raw <= MAX_OFFICIALS:
                self.fail(f"{where}.minimum must be between 0 and {MAX_OFFICIALS}")
            minimum = raw
        else:
            try:
                minimum = parse_choice(Quorum, raw, "quorum")
            except InvalidRequestError as exc:
                self.fail(f"{where}.minimum: {exc}")
        holds = self.text(data.get("holds"), f"{where}.holds", required=False)
        return RoleRequirement(role, frozenset(wanted), minimum, holds)

    def preconditions(self, data: object) -> tuple[Precondition, ...]:
        if not isinstance(data, list):
            self.fail("preconditions must be a list")
            return ()
        found = []
        for n, item in enumerate(data, 1):
            where = f"preconditions[{n}]"
            raw, before = (item, None) if isinstance(item, str) else (None, None)
            at = At.MAIN
            if isinstance(item, dict):
                if set(item) - {"require", "before_step", "at"}:
                    self.fail(f"{where}: only require, before_step and at are allowed")
                raw, before = item.get("require"), item.get("before_step")
                try:
                    at = parse_choice(At, item.get("at", "main"), "site (at)")
                except InvalidRequestError as exc:
                    self.fail(f"{where}: {exc}")
                    continue
            try:
                require = parse_choice(Requirement, raw, "precondition")
            except InvalidRequestError as exc:
                self.fail(f"{where}: {exc}")
                continue
            if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
                self.fail(f"{where}.before_step must be a step number")
                before = None
            if at is At.PEER and require in (Requirement.EMERGENCY, Requirement.NO_EMERGENCY):
                self.fail(f"{where}: emergency preconditions are checked at the main service only")
                continue
            found.append(Precondition(require, before, at))
        return tuple(found)

    def steps(self, data: object, roles: set[CeremonyRole]) -> tuple[Step, ...]:
        if not isinstance(data, list) or not data:
            self.fail("steps must be a non-empty list")
            return ()
        if len(data) > MAX_STEPS:
            self.fail(f"a script has at most {MAX_STEPS} steps")
            return ()
        found = []
        for position, item in enumerate(data, 1):
            step = self.step(item, position, roles)
            if step is not None:
                found.append(step)
        return tuple(found)

    def step(  # noqa: C901 - one check per key, in the order of the file
        self, data: object, position: int, roles: set[CeremonyRole]
    ) -> Step | None:
        where = f"step {position}"
        if not isinstance(data, dict):
            self.fail(f"{where} must be a mapping")
            return None
        for key in sorted(set(data) - _STEP_KEYS, key=str):
            self.fail(f"{where}: unknown key {key!r}")
        if data.get("n") != position:
            self.fail(f"{where}: n must be {position}: steps are numbered 1, 2, ... in order")
        title = self.text(data.get("title"), f"{where}.title")
        try:
            by = parse_choice(CeremonyRole, data.get("by"), "participant (by)")
        except InvalidRequestError as exc:
            self.fail(f"{where}: {exc}")
            by = CeremonyRole.ADMINISTRATOR
        if by not in roles:
            self.fail(f"{where}: by {by.value}, but the script's roles do not include them")
        try:
            at = parse_choice(At, data.get("at", "main"), "site (at)")
        except InvalidRequestError as exc:
            self.fail(f"{where}: {exc}")
            at = At.MAIN
        action, check = data.get("action"), data.get("check")
        params = data.get("params", {})
        if (action is None) == (check is None):
            self.fail(f"{where}: give exactly one of action (a service action) or check (a prompt)")
        if action is not None:
            action = self.action(action, params, where)
        elif check is not None:
            check = self.text(check, f"{where}.check")
            if params:
                self.fail(f"{where}: a check takes no params")
        try:
            on_failure = parse_choice(OnFailure, data.get("on_failure", "stop"), "on_failure")
        except InvalidRequestError as exc:
            self.fail(f"{where}: {exc}")
            on_failure = OnFailure.STOP
        note = self.text(data.get("note"), f"{where}.note", required=False)
        return Step(
            number=position,
            title=title,
            by=by,
            action=action,
            at=at,
            check=check,
            params=params if isinstance(params, dict) else {},
            on_failure=on_failure,
            note=note,
        )

    def action(self, name: object, params: object, where: str) -> str | None:
        if not isinstance(name, str) or not _ACTION_RE.fullmatch(name):
            self.fail(f"{where}: action must be a dotted name such as unseal.submit-shares")
            return None
        if not isinstance(params, dict):
            self.fail(f"{where}.params must be a mapping")
            return name
        info = self.actions.get(name)
        if info is None:
            self.unknown.add(name)
            return name
        if info.needs_peer:
            self.peer_actions.add(name)
        for key, value in params.items():
            types = info.params.get(str(key))
            if types is None:
                allowed = ", ".join(sorted(info.params)) or "none"
                self.fail(f"{where}: {name} has no parameter {key!r} (parameters: {allowed})")
            elif (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                kinds = " or ".join(t.__name__ for t in types)
                self.fail(f"{where}: {name} parameter {key!r} must be {kinds}")
        return name


def _choices(kind: type[StrEnum]) -> str:
    return ", ".join(m.value for m in kind)
