"""The service actions a ceremony step may name, one small function each.

Adding an action::

    @action("share.check", "prove a share belongs to the current set", member=(str,))
    def check_share(ctx: StepContext) -> str:
        official = ctx.performers()[0]
        answer = ctx.call("POST", "sys/shares/check", {...}, token=ctx.token(official))
        ctx.event("share-checked", official.principal, member=answer["member"])
        return "the share belongs to the current set"   # the step's summary

The function gets a ``StepContext``: the step and its parameters (checked against the types
declared in ``@action``), the participants, the terminal, and the service. It returns the
step's one-line summary, or raises ``StepFailedError`` (or lets a ``ServiceError`` through)
to fail the step; the runner then offers retry, a deviation (if the script allows), or abort.

Rules every action keeps:

- **Safe to run again.** The runner may be killed at any moment and the step resumed. Before a
  change, record an event (``ctx.event``: written and fsync'd to the journal at once) naming
  what is about to happen; on resume, ``ctx.earlier`` holds the events of the interrupted
  attempt, and the action compares them with the service's state before changing anything;
  ``ctx.history()`` holds every step's events (a root token an earlier step lost, say).
- **No secrets in events.** Never a share, token, OTP or private key: share member ids, the
  service's answers, and request ids only. Shares are read with ``ctx.term.secret`` and dropped
  after one request.
- **The service decides.** An action never works around a refusal; it records it.

In a ceremony that spans two sites, ``ctx`` is bound to the service the step names (``at:``);
``ctx.other()`` is the same step bound to the other site, for the actions that carry something
from one to the other (a domain backup, a signed tree head). Events then say which service
they happened at (``service``), so that each request id can be looked up in the right log.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec

from ceremonies.script import ActionInfo, At, CeremonyRole, RoleRequirement, Script, Step
from ceremonies.service import Service, ServiceError
from ceremonies.state import utc_text
from kms.errors import InvalidRequestError
from kms.jose import parse_public_jwk
from kms.tokens import decode_with_otp
from kms.unseal_assertion import share_member

if TYPE_CHECKING:
    from pathlib import Path

    from api.principal_keys import KeyHolder
    from ceremonies.terminal import Terminal

MAX_SHARE_ATTEMPTS = 3
ROOT_LOST = (
    "the root token exists only in the runner's memory and is never written down; it was lost "
    "when the runner stopped"
)


class StepFailedError(Exception):
    """The step did not do what the script says; the message is for the transcript."""


@dataclass
class Participant:
    principal: str
    role: CeremonyRole
    holder: KeyHolder
    key_file: str
    service_roles: list[str] | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def thumbprint(self) -> str:
        return parse_public_jwk(self.holder.jwk).thumbprint

    def journal_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "role": self.role.value,
            "thumbprint": self.thumbprint,
            "jwk": dict(self.holder.jwk),
            "key_file": self.key_file,
        }


@dataclass
class Session:
    """What lives only in the runner's memory for one run: never journaled, never printed."""

    info: dict[str, Any]
    root_token: str | None = field(default=None, repr=False)
    root_token_id: str | None = None
    root_token_from_init: bool = False  # the token sys/init answered, not a generated one
    rekey_nonce: str | None = None  # announced at rekey.start, checked by rekey.submit-share
    drill: str | None = None  # the drill drill.start began, for the check-ins and the report

    @property
    def audience(self) -> str:
        return str(self.info["audience"])


@dataclass(frozen=True)
class SiteHandle:
    """One service of the ceremony, with the participants' logins there."""

    service: Service
    session: Session
    participants: list[Participant]


@dataclass
class StepContext:
    step: Step
    script: Script
    service: Service
    term: Terminal
    participants: list[Participant]
    session: Session
    earlier: list[dict[str, Any]]
    journal: Callable[[dict[str, Any]], None]
    clock: Callable[[], float] = time.time
    # Every event journaled so far, of every step: what earlier steps (or runs) left behind.
    history: Callable[[], list[dict[str, Any]]] = list
    at: At = At.MAIN  # the service this context is bound to
    sites: Mapping[At, SiteHandle] = field(default_factory=dict)
    directory: Path | None = None  # the transcript directory: files handed between sites
    ceremony: str = ""  # the ceremony id, to name those files

    def at_site(self, at: At) -> StepContext:
        """This step, bound to the main service or to the peer."""
        if not self.sites:
            return self
        handle = self.sites.get(at)
        if handle is None:
            raise StepFailedError(
                "this step needs the other site's service: run the ceremony with --peer URL"
            )
        return replace(
            self,
            at=at,
            service=handle.service,
            session=handle.session,
            participants=handle.participants,
        )

    def other(self) -> StepContext:
        """This step, bound to the other site of a two-site ceremony."""
        return self.at_site(At.PEER if self.at is At.MAIN else At.MAIN)

    @property
    def site(self) -> str:
        """The name of the site this context is bound to, as its service says."""
        return str(self.session.info.get("site") or "")

    @property
    def params(self) -> Mapping[str, Any]:
        return self.step.params

    def with_role(self, role: CeremonyRole) -> list[Participant]:
        return [p for p in self.participants if p.role is role]

    def performers(self) -> list[Participant]:
        return self.with_role(self.step.by)

    def officials(self) -> list[Participant]:
        return self.with_role(CeremonyRole.OFFICIALS)

    def administrator(self) -> Participant:
        return self.with_role(CeremonyRole.ADMINISTRATOR)[0]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self.service.call(method, path, body, **kw)

    def event(self, what: str, principal: str | None = None, **fields: Any) -> None:
        """Journal what just happened (fsync'd before the runner goes on)."""
        entry: dict[str, Any] = {"type": "event", "step": self.step.number, "what": what}
        entry["at"] = utc_text(self.clock())
        if At.PEER in self.sites:
            entry["service"] = self.at.value
        if principal is not None:
            entry["principal"] = principal
        entry.update({k: v for k, v in fields.items() if v is not None})
        self.journal(entry)

    def earlier_events(self, what: str) -> list[dict[str, Any]]:
        return [e for e in self.earlier if e.get("what") == what]

    def token(self, participant: Participant) -> str:
        """The participant's access token, logging in with their key if there is none yet."""
        if participant.token is None:
            login(self.service, participant, self.session.audience)
        assert participant.token is not None
        return participant.token


Run = Callable[[StepContext], str]


@dataclass(frozen=True)
class Action:
    name: str
    run: Run
    info: ActionInfo


REGISTRY: dict[str, Action] = {}


def action(
    name: str, summary: str, *, needs_peer: bool = False, **params: tuple[type, ...]
) -> Callable[[Run], Run]:
    """Register ``run`` under ``name``; ``params`` are the script parameters and their types.

    ``needs_peer``: the action reads or names the other site, so its script spans two sites.
    """

    def register(run: Run) -> Run:
        REGISTRY[name] = Action(name, run, ActionInfo(params, summary, needs_peer))
        return run

    return register


def known_actions() -> dict[str, ActionInfo]:
    return {name: a.info for name, a in REGISTRY.items()}


# --- identities ------------------------------------------------------------------------------


def login(service: Service, participant: Participant, audience: str) -> list[str]:
    """Log in with the participant's key; the answer lists the roles the service gives them."""
    answer = service.call("POST", "auth/jwt/login", {"jwt": participant.holder.assertion(audience)})
    auth = answer["auth"]
    participant.token = str(auth["client_token"])
    participant.service_roles = sorted(str(r) for r in auth.get("policies") or [])
    return participant.service_roles


def role_problem(participant: Participant, requirement: RoleRequirement | None) -> str | None:
    wanted = requirement.service_roles if requirement is not None else frozenset()
    if not wanted or wanted & set(participant.service_roles or []):
        return None
    held = ", ".join(participant.service_roles or []) or "no role"
    return (
        f"{participant.principal} ({participant.role.value}) needs the service role "
        f"{' or '.join(sorted(wanted))}, and has {held}"
    )


def verify_identities(
    service: Service, script: Script, participants: list[Participant], audience: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Log every participant in and compare their roles with the script's; nothing is changed."""
    checked: list[dict[str, Any]] = []
    problems: list[str] = []
    for participant in participants:
        try:
            roles = login(service, participant, audience)
        except ServiceError as exc:
            problems.append(
                f"{participant.principal} could not log in with the key presented ({exc}): "
                "not a registered principal, disabled, or another key"
            )
            checked.append(
                {
                    "principal": participant.principal,
                    "login": "refused",
                    "request_id": exc.request_id,
                }
            )
            continue
        checked.append(
            {
                "principal": participant.principal,
                "service_roles": roles,
                "request_id": service.last_request_id(),
            }
        )
        problem = role_problem(participant, script.role(participant.role))
        if problem is not None:
            problems.append(problem)
    return checked, problems


@action("participants.verify", "log each participant in with their key and check their roles")
def verify_participants(ctx: StepContext) -> str:
    checked, problems = verify_identities(
        ctx.service, ctx.script, ctx.participants, ctx.session.audience
    )
    for item in checked:
        ctx.event("identity-checked", **item)
    if problems:
        raise StepFailedError("; ".join(problems))
    return f"{len(checked)} participants logged in with their keys and hold the roles needed"


# --- shares ----------------------------------------------------------------------------------


def member_of(share: str) -> str | None:
    """The share's "group.member", from its public header; None if it does not parse."""
    try:
        return share_member(share)
    except InvalidRequestError:
        return None


@dataclass
class ShareRound:
    """Officials give shares in turn until ``done``; a rejected share is recorded, not fatal."""

    ctx: StepContext
    purpose: str
    submit: Callable[[Participant, str], dict[str, Any]]
    progress: Callable[[], tuple[int, int]]  # (accepted so far, needed)
    done: Callable[[dict[str, Any]], bool]

    def run(self, already: set[str]) -> dict[str, Any]:
        ctx = self.ctx
        on_wrong = str(ctx.params.get("on_wrong_share", "retry"))
        attempts = int(ctx.params.get("attempts", MAX_SHARE_ATTEMPTS))
        queue = [p for p in ctx.officials() if p.principal not in already]
        while queue:
            official = queue.pop(0)
            tries = 0
            while True:
                answer, rejected = self.one(official)
                if answer is not None:
                    if self.done(answer):
                        return answer
                    already.add(official.principal)
                    break
                if rejected is None:  # the official passed
                    break
                if on_wrong == "stop":
                    raise StepFailedError(f"{official.principal}'s share was rejected: {rejected}")
                if already and self.progress()[0] == 0:
                    ctx.term.say(
                        "The service reset the progress: those who gave a share give it again."
                    )
                    ctx.event("progress-reset", reason=rejected)
                    queue = [p for p in ctx.officials() if p.principal in already] + queue
                    already.clear()
                tries += 1
                if tries >= attempts:
                    ctx.term.say(f"{official.principal} has had {attempts} tries; moving on.")
                    break
        accepted, needed = self.progress()
        raise StepFailedError(
            f"quorum not reached for {self.purpose}: {accepted} of {needed} shares accepted "
            "and no official present has a share left to give"
        )

    def one(self, official: Participant) -> tuple[dict[str, Any] | None, str | None]:
        """One share typed (hidden) and submitted: (answer, None), (None, why), or (None, None)."""
        ctx = self.ctx
        share = ctx.term.secret(
            f"{official.principal}: type your share for {self.purpose} "
            "(hidden; press Enter to pass): "
        )
        if not share:
            ctx.event("share-passed", official.principal)
            return None, None
        member = member_of(share)
        try:
            answer = self.submit(official, share)
        except ServiceError as exc:
            if exc.status is None or exc.status >= 500:
                raise
            ctx.term.say(f"Share rejected: {exc}")
            ctx.event(
                "share-rejected",
                official.principal,
                member=member,
                error=str(exc),
                request_id=exc.request_id,
            )
            return None, str(exc)
        finally:
            del share
        request_id = ctx.service.last_request_id()
        accepted, needed = self.progress_of(answer)
        ctx.event(
            "share-accepted",
            official.principal,
            member=answer.get("member") or member,
            progress=f"{accepted}/{needed}",
            request_id=request_id,
        )
        ctx.term.say(f"Share accepted ({official.principal}, member {member}).")
        return answer, None

    def progress_of(self, answer: dict[str, Any]) -> tuple[int, int]:
        if self.done(answer):
            _, needed = self.progress()
            return needed, needed
        return self.progress()


def _unseal_progress(ctx: StepContext) -> tuple[int, int]:
    status = ctx.call("GET", "sys/seal-status")
    return int(status.get("progress") or 0), int(status.get("t") or 0)


def _submit_unseal(ctx: StepContext, official: Participant, share: str) -> dict[str, Any]:
    """One share; signed for by the official (``kms.unseal_assertion``) unless the script says
    not to (at init, before the officials are registered). The audit record then names them.
    """
    member = member_of(share)
    if not ctx.params.get("signed", True) or member is None:
        return dict(ctx.call("PUT", "sys/unseal", {"key": share}))
    for attempt in (1, 2):
        nonce = str(ctx.call("GET", "sys/seal-status").get("nonce") or "")
        assertion = official.holder.unseal_assertion(
            ctx.session.audience, nonce=nonce, member=member
        )
        try:
            return dict(
                ctx.call("PUT", "sys/unseal", {"key": share, "official_assertion": assertion})
            )
        except ServiceError as exc:  # another share began or ended the attempt meanwhile
            if attempt == 2 or "sign again" not in str(exc):
                raise
    raise AssertionError  # unreachable


@action(
    "unseal.submit-shares",
    "officials type their shares (hidden) until the service unseals",
    on_wrong_share=(str,),
    attempts=(int,),
    signed=(bool,),
)
def unseal(ctx: StepContext) -> str:
    status = ctx.call("GET", "sys/seal-status")
    if not status.get("initialized"):
        raise StepFailedError("the service is not initialised")
    if not status.get("sealed"):
        ctx.event("already-unsealed")
        return "the service was already unsealed when this step began"
    already = set()
    if int(status.get("progress") or 0) > 0:
        already = {str(e["principal"]) for e in ctx.earlier_events("share-accepted")}
    elif ctx.earlier_events("share-accepted"):
        ctx.event("progress-expired")
        ctx.term.say("Unseal progress from the interrupted attempt has expired: start again.")
    ctx.term.say(f"The service needs {status.get('t')} shares; each official types theirs.")
    ShareRound(
        ctx,
        "unsealing",
        submit=lambda official, share: _submit_unseal(ctx, official, share),
        progress=lambda: _unseal_progress(ctx),
        done=lambda answer: not answer.get("sealed", True),
    ).run(already)
    return "the service is unsealed"


# --- initialisation --------------------------------------------------------------------------


@action(
    "domain.init", "create the root secret and hand one share to each official", threshold=(int,)
)
def init_domain(ctx: StepContext) -> str:
    officials = ctx.officials()
    threshold = int(ctx.params.get("threshold", 2))
    status = ctx.call("GET", "sys/seal-status")
    handed = {e["principal"] for e in ctx.earlier_events("share-handed-out")}
    if status.get("initialized"):
        if ctx.earlier_events("initialised") and handed >= {o.principal for o in officials}:
            ctx.event("init-resumed", note="every share was handed out before the runner stopped")
            return (
                f"initialised with {threshold} of {len(officials)} shares before the runner "
                "stopped; each official holds one"
            )
        if ctx.earlier_events("initialised"):
            raise StepFailedError(
                "the service was initialised by this ceremony, but the runner stopped before "
                f"every share was handed out ({len(handed)} of {len(officials)}). The shares "
                "exist nowhere else, so this domain can never be unsealed: wipe the data "
                "directory and the token (docs/operations.md, 'Init interrupted by a crash') "
                "and run the ceremony again with --restart"
            )
        raise StepFailedError("the service is already initialised, and not by this ceremony")
    ctx.event("init-requested", threshold=threshold, shares=len(officials))
    answer = ctx.call(
        "PUT", "sys/init", {"secret_shares": len(officials), "secret_threshold": threshold}
    )
    ctx.session.root_token = str(answer["root_token"])
    ctx.session.root_token_from_init = True
    ctx.event(
        "initialised",
        threshold=threshold,
        shares=len(officials),
        request_id=ctx.service.last_request_id(),
    )
    for number, (official, share) in enumerate(zip(officials, answer["keys"], strict=True), 1):
        _hand_out(ctx, official, share, number, len(officials))
    answer.clear()
    return f"initialised with {threshold} of {len(officials)} shares; each official holds one"


def _hand_out(ctx: StepContext, official: Participant, share: str, number: int, total: int) -> None:
    term = ctx.term
    while True:
        term.clear()
        term.say(
            f"Share {number} of {total}, for {official.principal} ONLY. Everyone else looks away."
        )
        term.say()
        term.say(f"    {share}")
        term.say()
        if term.confirm(f"{official.principal}: have you written it down and checked every word?"):
            break
    term.clear()
    ctx.event("share-handed-out", official.principal, member=member_of(share))


# --- root tokens -----------------------------------------------------------------------------


def _generate_root(ctx: StepContext) -> str:
    """A new root token from the officials' shares; kept in memory only."""
    attempt = ctx.call("GET", "sys/generate-root/attempt")
    ours = {e.get("nonce") for e in ctx.earlier_events("root-generation-started")}
    if attempt.get("started"):
        if attempt.get("nonce") not in ours:
            raise StepFailedError(
                f"another root generation (nonce {attempt.get('nonce')}) is in progress: find "
                "out who started it, cancel it (ekms operator generate-root -cancel), then retry"
            )
        ctx.call("DELETE", "sys/generate-root/attempt")  # ours, but its OTP died with the runner
        ctx.event(
            "root-generation-cancelled",
            nonce=attempt.get("nonce"),
            reason="interrupted attempt; its one-time pad was lost with the runner",
        )
    started = ctx.call("PUT", "sys/generate-root/attempt", {})
    otp, nonce = str(started["otp"]), str(started["nonce"])
    ctx.event("root-generation-started", nonce=nonce, request_id=ctx.service.last_request_id())
    ctx.term.say(f"Root generation nonce: {nonce}. Each official checks it before typing a share.")
    answer = ShareRound(
        ctx,
        f"root generation {nonce[:8]}",
        submit=lambda _official, share: dict(
            ctx.call("PUT", "sys/generate-root/update", {"key": share, "nonce": nonce})
        ),
        progress=lambda: _root_progress(ctx),
        done=lambda answer: bool(answer.get("complete")),
    ).run(set())
    token = decode_with_otp(str(answer["encoded_token"]), otp)
    ctx.session.root_token = token
    ctx.session.root_token_from_init = False
    looked_up = ctx.call("GET", "auth/token/lookup-self", token=token)
    ctx.session.root_token_id = str(looked_up["data"]["accessor"])
    ctx.event("root-token-generated", token_id=ctx.session.root_token_id)
    return token


def _root_progress(ctx: StepContext) -> tuple[int, int]:
    status = ctx.call("GET", "sys/generate-root/attempt")
    return int(status.get("progress") or 0), int(status.get("required") or 0)


def root_token(ctx: StepContext) -> str:
    """The ceremony's root token; if the runner lost it, the officials generate a new one, and
    the lost one (still valid in the service, though nobody holds it) is revoked with it."""
    if ctx.session.root_token is None:
        ctx.term.say(f"This step needs a root token: {ROOT_LOST}. The officials generate one.")
        token = _generate_root(ctx)
        _revoke_lost(ctx, token)
        return token
    return ctx.session.root_token


_REVOKED = ("root-token-revoked", "lost-root-token-revoked")


def _lost_root_tokens(ctx: StepContext) -> tuple[list[str], str | None]:
    """Root tokens this ceremony made and the runner lost (it was killed) that no event shows
    revoked: the ids of generated ones, and the request id of the init that made one."""
    events = ctx.history()
    revoked = {e.get("token_id") for e in events if e.get("what") in _REVOKED}
    generated = [
        str(e["token_id"])
        for e in events
        if e.get("what") == "root-token-generated"
        and e.get("token_id") not in revoked
        and e.get("token_id") != ctx.session.root_token_id
    ]
    init_revoked = any(e.get("init") for e in events if e.get("what") in _REVOKED)
    inits = [e for e in events if e.get("what") == "initialised"]
    lost_init = None
    if inits and not init_revoked and not ctx.session.root_token_from_init:
        lost_init = str(inits[-1].get("request_id") or "")
    return list(dict.fromkeys(generated)), lost_init


def _revoke_lost(ctx: StepContext, token: str) -> None:
    """Revoke by id the root tokens the runner lost; the init's audit record names its token."""
    generated, init_request = _lost_root_tokens(ctx)
    lost = [(token_id, False) for token_id in generated]
    if init_request is not None:
        found = ctx.call("GET", f"ekms/audit/records?request_id={init_request}", token=token)
        records = found["data"]["records"]
        if not records:
            raise StepFailedError(
                f"the init's audit record ({init_request or 'no request id'}) does not name the "
                "root token it made: revoke it by its id (auth/token/revoke-accessor)"
            )
        lost.append((str(records[0]["record"]["details"]["root_token_id"]), True))
    for token_id, from_init in lost:
        note = "revoked"
        try:
            ctx.call("POST", "auth/token/revoke-accessor", {"accessor": token_id}, token=token)
        except ServiceError as exc:
            if exc.status != 400 or "no live token" not in str(exc):
                raise
            note = "revoked already (before the runner stopped)"
        ctx.event(
            "lost-root-token-revoked",
            token_id=token_id,
            init=from_init or None,
            note=note,
            request_id=ctx.service.last_request_id(),
        )
        ctx.term.say(f"The root token {token_id} the runner lost is {note}.")


@action("root.generate", "officials generate a root token with their shares")
def generate_root(ctx: StepContext) -> str:
    _generate_root(ctx)
    return f"root token {ctx.session.root_token_id} generated (held by the runner, in memory)"


@action("root.hand-over", "show the root token once to the administrator, then clear the screen")
def hand_over_root(ctx: StepContext) -> str:
    token = root_token(ctx)  # lost with the runner: the officials generate another
    admin = ctx.administrator()
    term = ctx.term
    while True:
        term.clear()
        term.say(f"Root token, for {admin.principal} ONLY:")
        term.say()
        term.say(f"    {token}")
        term.say()
        if term.confirm(f"{admin.principal}: have you taken the root token?"):
            break
    term.clear()
    ctx.event("root-token-handed-over", admin.principal, token_id=ctx.session.root_token_id)
    return f"root token {ctx.session.root_token_id} handed to {admin.principal}"


@action("root.revoke", "revoke the ceremony's root token")
def revoke_root(ctx: StepContext) -> str:
    token = ctx.session.root_token
    if token is None:
        generated, init_request = _lost_root_tokens(ctx)
        if not generated and init_request is None:
            ctx.event("no-root-token")
            return "no root token of this ceremony was left to revoke"
        # The runner lost a token that is still valid: a new one revokes it, then itself.
        token = root_token(ctx)
    else:
        _revoke_lost(ctx, token)
    if ctx.session.root_token_id is None:
        ctx.session.root_token_id = str(
            ctx.call("GET", "auth/token/lookup-self", token=token)["data"]["accessor"]
        )
    ctx.call("POST", "auth/token/revoke-self", token=token)
    ctx.session.root_token = None
    ctx.event(
        "root-token-revoked",
        token_id=ctx.session.root_token_id,
        init=ctx.session.root_token_from_init or None,
        request_id=ctx.service.last_request_id(),
    )
    return f"root token {ctx.session.root_token_id} revoked"


# --- principals ------------------------------------------------------------------------------


@action(
    "principals.register",
    "register the participants' public keys: officials, the administrator and the witness",
    administrator_role=(str,),
    witness_role=(str,),
)
def register_principals(ctx: StepContext) -> str:
    roles = {
        CeremonyRole.OFFICIALS: "official",
        CeremonyRole.ADMINISTRATOR: str(ctx.params.get("administrator_role", "security-officer")),
        CeremonyRole.WITNESS: str(ctx.params.get("witness_role", "auditor")),
    }
    bootstrap = int(ctx.session.info.get("approvals_required", 2)) + 1
    officials = ctx.officials()
    if len(officials) > bootstrap:
        raise StepFailedError(
            f"the root token may register only the first {bootstrap} officials; register the "
            "others afterwards by add-official proposals"
        )
    token = root_token(ctx)
    registered = 0
    for participant in officials + [p for p in ctx.participants if p not in officials]:
        role = roles[participant.role]
        try:
            found = ctx.call("GET", f"ekms/principals/{participant.principal}", token=token)
        except ServiceError as exc:
            if exc.status != 404:
                raise
        else:
            if found["data"]["thumbprint"] != participant.thumbprint:
                raise StepFailedError(
                    f"{participant.principal} is registered already, with another key"
                )
            ctx.event("already-registered", participant.principal, role=role)
            continue
        ctx.call(
            "POST",
            f"ekms/principals/{participant.principal}",
            {"roles": [role], "jwk": dict(participant.holder.jwk)},
            token=token,
        )
        registered += 1
        ctx.event(
            "registered",
            participant.principal,
            role=role,
            thumbprint=participant.thumbprint,
            request_id=ctx.service.last_request_id(),
        )
    return f"{registered} principals registered ({len(ctx.participants) - registered} were already)"


# --- keys ------------------------------------------------------------------------------------


def _key_names(ctx: StepContext, token: str) -> list[str]:
    wanted = ctx.params.get("keys", "all")
    if isinstance(wanted, list):
        return [str(k) for k in wanted]
    try:
        listed = ctx.call("GET", "transit/keys?list=true", token=token)
    except ServiceError as exc:
        if exc.status == 404:
            return []
        raise
    return [str(k) for k in listed["data"]["keys"]]


@action("keys.create", "create the named keys (name: classification)", keys=(dict,))
def create_keys(ctx: StepContext) -> str:
    token = ctx.token(ctx.administrator())
    wanted = dict(ctx.params.get("keys", {}))
    created = 0
    for name, classification in wanted.items():
        try:
            found = ctx.call("GET", f"transit/keys/{name}", token=token)
        except ServiceError as exc:
            if exc.status != 404:
                raise
        else:
            ctx.event("key-exists", key=name, classification=found["data"].get("classification"))
            continue
        ctx.call(
            "POST", f"transit/keys/{name}", {"classification": str(classification)}, token=token
        )
        created += 1
        ctx.event(
            "key-created",
            key=name,
            classification=str(classification),
            request_id=ctx.service.last_request_id(),
        )
    return f"{created} keys created, {len(wanted) - created} existed already"


@action("keys.rotate", "rotate keys to a new version (keys: all, or a list)", keys=(str, list))
def rotate_keys(ctx: StepContext) -> str:
    token = ctx.token(ctx.administrator())
    intents = {str(e["key"]): int(e["from_version"]) for e in ctx.earlier_events("rotating")}
    done = {str(e["key"]) for e in ctx.earlier_events("rotated")}
    names = _key_names(ctx, token)
    if not names:
        raise StepFailedError("there are no keys to rotate")
    rotated = []
    for name in names:
        if name in done:
            continue
        current = int(
            ctx.call("GET", f"transit/keys/{name}", token=token)["data"]["latest_version"]
        )
        if name in intents and current > intents[name]:
            ctx.event(
                "rotated", key=name, to_version=current, note="rotated before the runner stopped"
            )
            rotated.append(name)
            continue
        ctx.event("rotating", key=name, from_version=current)
        answer = ctx.call("POST", f"transit/keys/{name}/rotate", token=token)
        ctx.event(
            "rotated",
            key=name,
            to_version=answer["data"]["latest_version"],
            request_id=ctx.service.last_request_id(),
        )
        rotated.append(name)
    return f"rotated {len(rotated) + len(done)} keys: {', '.join(names)}"


# --- proposals: emergencies ------------------------------------------------------------------


def _proposal(ctx: StepContext, kind: str, payload: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """File a proposal by the first official and let the others decide it, each at the terminal."""
    officials = ctx.officials()
    if not officials:
        raise StepFailedError("no official is present")
    filed = ctx.earlier_events("proposed")
    if filed:
        proposal_id = str(filed[-1]["proposal"])
        proposal = ctx.call("GET", f"ekms/proposals/{proposal_id}", token=ctx.token(officials[0]))[
            "data"
        ]
        ctx.term.say(f"Continuing with proposal {proposal_id} filed before the runner stopped.")
    else:
        proposer = officials[0]
        proposal = ctx.call(
            "POST",
            "ekms/proposals",
            {"kind": kind, "payload": payload()},
            token=ctx.token(proposer),
        )["data"]
        ctx.event(
            "proposed",
            proposer.principal,
            proposal=proposal["id"],
            kind=kind,
            digest=proposal["digest"],
            request_id=ctx.service.last_request_id(),
        )
    for official in officials:
        if proposal["state"] != "pending":
            break
        if official.principal == proposal["requester"] or official.principal in (
            proposal["approved_by"] + proposal["denied_by"]
        ):
            continue
        ctx.term.say(
            f"Proposal {proposal['id']} ({kind}) by {proposal['requester']}: "
            f"{_payload_text(proposal['payload'])}; digest {proposal['digest']}"
        )
        decision = "approve" if ctx.term.confirm(f"{official.principal}: approve it?") else "deny"
        signature = official.holder.approval(proposal, ctx.session.audience, decision)
        proposal = ctx.call(
            "POST",
            f"ekms/proposals/{proposal['id']}/decide",
            {"signature": signature},
            token=ctx.token(official),
        )["data"]
        ctx.event(
            "decided",
            official.principal,
            proposal=proposal["id"],
            decision=decision,
            state=proposal["state"],
            request_id=ctx.service.last_request_id(),
        )
    if proposal["state"] != "approved":
        raise StepFailedError(
            f"proposal {proposal['id']} is {proposal['state']} with {proposal['approvals']} of "
            f"{proposal['required']} approvals"
        )
    return dict(proposal)


def _payload_text(payload: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(payload.items()))


def _justification(ctx: StepContext) -> str:
    earlier = ctx.earlier_events("justification")
    if earlier:
        return str(earlier[-1]["text"])
    text = ctx.term.ask(f"{ctx.officials()[0].principal}: the justification, for the record")
    ctx.event("justification", ctx.officials()[0].principal, text=text[:2000])
    return text[:2000]


def _emergency_needed(ctx: StepContext) -> tuple[list[str], dict[str, Any] | None]:
    """The classifications of this site's keys that its policy restores here only in an
    emergency, and the emergency in force (None if none)."""
    token = _admin_token(ctx)
    status = ctx.call("GET", "ekms/status", token=token)["data"]
    kind, policy = status["site_kind"], status["restore_policy"]
    held = {k["classification"] for k in _key_versions(ctx, token).values()}
    needing = sorted(
        c
        for c in held
        if kind in policy.get(c, {}).get("emergency", [])
        and kind not in policy.get(c, {}).get("always", [])
    )
    return needing, status.get("emergency")


@action(
    "emergency.declare",
    "an official proposes an emergency and a quorum of officials approves it (when: needed "
    "declares one only if this site's policy restores a class of its keys only in an emergency)",
    duration_hours=(int,),
    when=(str,),
)
def declare_emergency(ctx: StepContext) -> str:
    when = str(ctx.params.get("when", "always"))
    if when not in ("always", "needed"):
        raise StepFailedError(f"emergency.declare: when is always or needed, not {when!r}")
    if when == "needed" and not ctx.earlier_events("proposed"):
        needing, in_force = _emergency_needed(ctx)
        if in_force is not None:
            ends = utc_text(float(in_force["ends_at"]))
            ctx.event("emergency-in-force", needed_for=needing, ends_at=ends)
            return f"an emergency is in force already, until {ends}"
        if not needing:
            ctx.event("emergency-not-needed", site=ctx.site)
            return (
                f"no key at site {ctx.site} needs an emergency to be restored here: none declared"
            )
        ctx.event("emergency-needed", needed_for=needing)
        ctx.term.say(
            f"Site {ctx.site}'s policy restores {', '.join(needing)} keys here only in an "
            "emergency: the officials declare one."
        )

    def payload() -> dict[str, Any]:
        hours = ctx.params.get("duration_hours")
        while hours is None:
            answer = ctx.term.ask("Duration of the emergency, in whole hours", default="24")
            hours = int(answer) if answer.isdigit() and int(answer) > 0 else None
        return {"duration": int(hours) * 3600, "justification": _justification(ctx)}

    proposal = _proposal(ctx, "declare-emergency", payload)
    hours = int(proposal["payload"]["duration"]) // 3600
    return f"emergency declared for {hours} h by proposal {proposal['id']}"


@action("emergency.end", "an official proposes to end the emergency and a quorum approves")
def end_emergency(ctx: StepContext) -> str:
    proposal = _proposal(ctx, "end-emergency", lambda: {"justification": _justification(ctx)})
    return f"emergency ended by proposal {proposal['id']}"


# --- custody lifecycle: rekey, share checks, drills ------------------------------------------


def _groups_param(text: str) -> list[list[int]]:
    groups = []
    for part in text.split(","):
        threshold, _, count = part.strip().partition("/")
        if not (threshold.isdigit() and count.isdigit()):
            raise StepFailedError(f"groups {text!r}: write each group as THRESHOLD/COUNT")
        groups.append([int(threshold), int(count)])
    return groups


def _rekey_body(ctx: StepContext) -> dict[str, Any]:
    """The new set: one share per official present, each encrypted to its holder if it can be."""
    officials = ctx.officials()
    body: dict[str, Any] = {"require_verification": True}
    groups = ctx.params.get("groups")
    if groups:
        body["groups"] = _groups_param(str(groups))
        body["group_threshold"] = int(ctx.params.get("group_threshold", 1))
        count = sum(n for _, n in body["groups"])
        if count != len(officials):
            raise StepFailedError(
                f"the groups make {count} shares but {len(officials)} officials are present: "
                "each official present receives one share"
            )
    else:
        current = int(ctx.session.info.get("threshold") or 2)
        body["secret_shares"] = len(officials)
        body["secret_threshold"] = int(ctx.params.get("threshold", min(current, len(officials))))
    encrypt = ctx.params.get("encrypt")
    if encrypt is None:
        encrypt = all(o.holder.alg == "ES256" for o in officials)
    if encrypt:
        body["holders"] = [o.principal for o in officials]
    return body


@action(
    "rekey.start",
    "start a rekey: a new share set, one share for each official present",
    threshold=(int,),
    groups=(str,),
    group_threshold=(int,),
    encrypt=(bool,),
)
def start_rekey(ctx: StepContext) -> str:
    token = ctx.token(ctx.administrator())
    status = ctx.call("GET", "sys/rekey/init")
    intended = ctx.earlier_events("rekey-starting")
    if status.get("started"):
        ours = {e.get("nonce") for e in ctx.earlier_events("rekey-started")}
        if status.get("nonce") not in ours and not (
            intended
            and ctx.term.confirm(
                f"{ctx.administrator().principal}: a rekey (nonce {status.get('nonce')}) is in "
                "progress; the runner stopped just after starting one. Is it this ceremony's?"
            )
        ):
            raise StepFailedError(
                f"another rekey (nonce {status.get('nonce')}) is in progress: find out who "
                "started it, cancel it (ekms operator rekey cancel), then retry"
            )
        ctx.event("rekey-resumed", nonce=status.get("nonce"))
        nonce = str(status["nonce"])
    else:
        body = _rekey_body(ctx)
        ctx.event(
            "rekey-starting",
            shares=body.get("secret_shares"),
            threshold=body.get("secret_threshold"),
            groups=body.get("groups"),
            holders=body.get("holders"),
        )
        status = ctx.call("PUT", "sys/rekey/init", body, token=token)
        nonce = str(status["nonce"])
        ctx.event(
            "rekey-started",
            nonce=nonce,
            new_threshold=status.get("t"),
            new_shares=status.get("n"),
            request_id=ctx.service.last_request_id(),
        )
    ctx.session.rekey_nonce = nonce
    ctx.term.say(f"Rekey nonce: {nonce}. Each official checks it before typing a share.")
    return (
        f"rekey {nonce} started: {status.get('n')} new shares, {status.get('t')} to unseal; "
        "the current shares stay in force until the new ones are verified"
    )


def _rekey_nonce(ctx: StepContext) -> str:
    status = ctx.call("GET", "sys/rekey/init")
    if not status.get("started"):
        raise StepFailedError(
            "no rekey is in progress (cancelled, expired, or lost with a sealed node); the "
            "current shares stay in force: run the ceremony again with --restart"
        )
    nonce = str(status["nonce"])
    if ctx.session.rekey_nonce is None:
        if not ctx.term.confirm(
            f"{ctx.administrator().principal}: the service's rekey nonce is {nonce}. Is it the "
            "one announced when this ceremony started the rekey?"
        ):
            raise StepFailedError(f"rekey {nonce} is not this ceremony's; cancel it and restart")
        ctx.session.rekey_nonce = nonce
    if ctx.session.rekey_nonce != nonce:
        raise StepFailedError(
            f"the rekey in progress (nonce {nonce}) is not the one this ceremony started"
        )
    return nonce


def _cancel_lost_rekey(ctx: StepContext, nonce: str) -> None:
    ctx.call("DELETE", "sys/rekey/init", token=ctx.token(ctx.administrator()))
    ctx.event("rekey-cancelled", nonce=nonce, reason="the new shares were lost with the runner")
    raise StepFailedError(
        "the new shares existed only in the runner's memory and were lost when it stopped; the "
        "rekey was cancelled and the current shares stay in force: run the ceremony again "
        "with --restart"
    )


def _hand_out_new(ctx: StepContext, answer: dict[str, Any]) -> None:
    """Show each new share to its official only: decrypted with their key if it was encrypted."""
    from kms import jwe  # noqa: PLC0415 - cryptography only when shares are handed out

    officials = ctx.officials()
    holders = list(answer.get("holders") or [])
    keys, members = list(answer["keys"]), list(answer["members"])
    answer.clear()
    for number, (member, key) in enumerate(zip(members, keys, strict=True), 1):
        if holders:
            official = next(o for o in officials if o.principal == holders[number - 1])
            private = official.holder.key
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise StepFailedError(f"{official.principal}'s key cannot open an encrypted share")
            share = jwe.decrypt(private, key).decode()
        else:
            official = officials[number - 1]
            share = key
        _hand_out(ctx, official, share, number, len(keys))
        ctx.event("new-share-member", official.principal, member=member)
        del share


@action(
    "rekey.submit-share",
    "officials type their current shares (hidden); then each new share is shown to its holder",
    on_wrong_share=(str,),
    attempts=(int,),
)
def submit_rekey_shares(ctx: StepContext) -> str:
    nonce = _rekey_nonce(ctx)
    status = ctx.call("GET", "sys/rekey/init")
    if status.get("phase") != "authorising":
        if ctx.earlier_events("new-share-member") and len(
            ctx.earlier_events("new-share-member")
        ) == int(status.get("n") or 0):
            return "the new shares were handed out before the runner stopped"
        _cancel_lost_rekey(ctx, nonce)
    already = set()
    if int(status.get("progress") or 0) > 0:
        already = {str(e["principal"]) for e in ctx.earlier_events("share-accepted")}
    answer = ShareRound(
        ctx,
        f"rekey {nonce[:8]}",
        submit=lambda _official, share: dict(
            ctx.call("PUT", "sys/rekey/update", {"key": share, "nonce": nonce})
        ),
        progress=lambda: _rekey_progress(ctx),
        done=lambda answer: bool(answer.get("keys")),
    ).run(already)
    count = len(answer["keys"])
    ctx.event("new-shares-issued", members=answer.get("members"), holders=answer.get("holders"))
    _hand_out_new(ctx, answer)
    return (
        f"a quorum of current shares authorised the rekey; {count} new shares handed out "
        "(not in force until verified)"
    )


def _rekey_progress(ctx: StepContext) -> tuple[int, int]:
    status = ctx.call("GET", "sys/rekey/init")
    return int(status.get("progress") or 0), int(status.get("required") or 0)


def _verify_progress(ctx: StepContext) -> tuple[int, int]:
    status = ctx.call("GET", "sys/rekey/verify")
    return int(status.get("progress") or 0), int(status.get("t") or 0)


def _set_in_force(ctx: StepContext) -> dict[str, int]:
    """The share set in force: its identifier and generation (never a share)."""
    shares = ctx.call("GET", "ekms/shares", token=ctx.token(ctx.officials()[0]))
    found = shares["data"]["share_set"]
    return {"identifier": int(found["identifier"]), "generation": int(found["generation"])}


@action(
    "rekey.verify",
    "holders type their new shares (hidden) until the new set is verified and in force",
    on_wrong_share=(str,),
    attempts=(int,),
)
def verify_rekey(ctx: StepContext) -> str:
    status = ctx.call("GET", "sys/rekey/init")
    before = ctx.earlier_events("verifying")
    if not status.get("started"):
        current = _set_in_force(ctx)
        if before and (current["identifier"], current["generation"]) != (
            before[-1]["identifier"],
            before[-1]["generation"],
        ):
            ctx.event(
                "rekey-committed",
                note="committed before the runner stopped",
                identifier=current["identifier"],
                generation=current["generation"],
            )
            return "the new share set was verified and put in force before the runner stopped"
        raise StepFailedError(
            "no rekey awaits verification (cancelled, expired, or lost when the node sealed); "
            "the current shares stay in force: run the ceremony again with --restart"
        )
    if status.get("phase") != "verifying":
        raise StepFailedError("the rekey has not issued its new shares yet (step before)")
    if not before:
        old = _set_in_force(ctx)
        ctx.event("verifying", identifier=old["identifier"], generation=old["generation"])
    verify = ctx.call("GET", "sys/rekey/verify")
    nonce = str(verify["nonce"])
    already = set()
    if int(verify.get("progress") or 0) > 0:
        already = {str(e["principal"]) for e in ctx.earlier_events("share-accepted")}
    ShareRound(
        ctx,
        f"verifying the new shares (nonce {nonce[:8]})",
        submit=lambda _official, share: dict(
            ctx.call("PUT", "sys/rekey/verify", {"key": share, "nonce": nonce})
        ),
        progress=lambda: _verify_progress(ctx),
        done=lambda answer: bool(answer.get("complete")),
    ).run(already)
    current = _set_in_force(ctx)
    ctx.event(
        "rekey-committed",
        request_id=ctx.service.last_request_id(),
        identifier=current["identifier"],
        generation=current["generation"],
    )
    return (
        f"the new share set (identifier {current['identifier']}, generation "
        f"{current['generation']}) is verified and in force; the old shares no longer unseal"
    )


def _prove_share(ctx: StepContext, share: str) -> dict[str, Any]:
    from kms import share_check  # noqa: PLC0415 - cryptography only when a share is checked

    challenge = ctx.call("GET", "ekms/shares/challenge")["data"]["challenge"]
    return share_check.check_request(share, challenge)


def _each_official_proves(ctx: StepContext, purpose: str, path: str, done_event: str) -> int:
    """Each official types their share (hidden) and proves it; returns how many succeeded."""
    attempts = int(ctx.params.get("attempts", MAX_SHARE_ATTEMPTS))
    done = {str(e["principal"]) for e in ctx.earlier_events(done_event)}
    confirmed = len(done)
    for official in ctx.officials():
        if official.principal in done:
            continue
        for _ in range(attempts):
            share = ctx.term.secret(
                f"{official.principal}: type your share for {purpose} (hidden; press Enter to "
                "pass): "
            )
            if not share:
                ctx.event("share-passed", official.principal)
                break
            try:
                body = _prove_share(ctx, share)
            except InvalidRequestError as exc:
                ctx.term.say(f"Share refused: {exc}")
                ctx.event("share-rejected", official.principal, error=str(exc))
                continue
            finally:
                del share
            try:
                answer = ctx.call("POST", path, body, token=ctx.token(official))["data"]
            except ServiceError as exc:
                if exc.status is None or exc.status >= 500:
                    raise
                ctx.term.say(f"Share refused: {exc}")
                ctx.event(
                    "share-rejected",
                    official.principal,
                    member=body["member"],
                    error=str(exc),
                    request_id=exc.request_id,
                )
                continue
            confirmed += 1
            ctx.term.say(f"Share confirmed ({official.principal}, member {answer['member']}).")
            ctx.event(
                done_event,
                official.principal,
                member=answer["member"],
                request_id=ctx.service.last_request_id(),
            )
            break
    return confirmed


@action(
    "share.check",
    "each official proves their share belongs to the set in force, without revealing it",
    attempts=(int,),
)
def check_shares(ctx: StepContext) -> str:
    officials = ctx.officials()
    confirmed = _each_official_proves(ctx, "a share check", "ekms/shares/check", "share-checked")
    if confirmed < len(officials):
        raise StepFailedError(
            f"{len(officials) - confirmed} of {len(officials)} officials could not prove their "
            "share belongs to the set in force"
        )
    return f"all {confirmed} officials proved their share belongs to the set in force"


@action(
    "drill.start",
    "start a share-health drill",
    hours=(int, float),
    stale_after_days=(int,),
)
def start_drill(ctx: StepContext) -> str:
    earlier = ctx.earlier_events("drill-started")
    if earlier:
        ctx.session.drill = str(earlier[-1]["drill"])
        return f"drill {ctx.session.drill} was started before the runner stopped"
    body = {
        "duration": float(ctx.params.get("hours", 24)) * 3600.0,
        "stale_after_days": int(ctx.params.get("stale_after_days", 90)),
    }
    answer = ctx.call("POST", "ekms/drills", body, token=ctx.token(ctx.administrator()))["data"]
    ctx.session.drill = str(answer["id"])
    ctx.event(
        "drill-started",
        drill=answer["id"],
        deadline=utc_text(float(answer["deadline"])),
        request_id=ctx.service.last_request_id(),
    )
    return f"drill {answer['id']} started, open until {utc_text(float(answer['deadline']))}"


def _drill_id(ctx: StepContext) -> str:
    if ctx.session.drill is not None:
        return ctx.session.drill
    admin = ctx.administrator()
    listed = ctx.call("GET", "ekms/drills", token=ctx.token(admin))["data"]["drills"]
    mine = [d for d in listed if d["open"] and d["started_by"] == admin.principal]
    if not mine:
        raise StepFailedError("no open drill started by the administrator: restart the ceremony")
    ctx.session.drill = str(mine[0]["id"])
    return ctx.session.drill


@action("drill.check-in", "each official checks in with their share (never revealed)")
def drill_check_in(ctx: StepContext) -> str:
    drill = _drill_id(ctx)
    confirmed = _each_official_proves(
        ctx, f"drill {drill[:8]}", f"ekms/drills/{drill}/check-in", "checked-in"
    )
    return f"{confirmed} of {len(ctx.officials())} officials checked in to drill {drill}"


@action("drill.report", "read the drill's report: confirmed, stale and missing shares, quorum")
def drill_report(ctx: StepContext) -> str:
    drill = _drill_id(ctx)
    reader = ctx.performers()[0]
    report = ctx.call("GET", f"ekms/drills/{drill}", token=ctx.token(reader))["data"]
    for member in report["members"]:
        holder = member["holder"] or "no holder recorded"
        ctx.term.say(f"  member {member['member']}: {member['state']} ({holder})")
    quorum = report["quorum"]
    ctx.event(
        "drill-report",
        drill=drill,
        counts=report["counts"],
        quorum=quorum,
        site=report["site"],
        request_id=ctx.service.last_request_id(),
    )
    counts = ", ".join(f"{n} {state}" for state, n in report["counts"].items())
    reachable = "reachable" if quorum["with_confirmed"] else "NOT reachable"
    return f"drill {drill}: {counts}; a quorum is {reachable} with the shares confirmed"


# --- sites: provisioning, failover, failback, decommissioning --------------------------------


def _admin_token(ctx: StepContext) -> str:
    return ctx.token(ctx.administrator())


def _registered(ctx: StepContext, name: str, token: str) -> dict[str, Any] | None:
    """The site's row in this service's registry, or None if it has none."""
    try:
        return dict(ctx.call("GET", f"ekms/sites/{name}", token=token)["data"])
    except ServiceError as exc:
        if exc.status == 404:
            return None
        raise


def _confirm_peer(ctx: StepContext, purpose: str) -> None:
    """The administrator confirms that the other service is the site meant, once per step."""
    other = ctx.other()
    info = other.session.info
    if ctx.earlier_events("peer-confirmed"):
        return
    admin = ctx.administrator()
    if not ctx.term.confirm(
        f"{admin.principal}: the peer at {other.service.address} answers as site {other.site} "
        f"({info.get('site_kind')}). Is it the site {purpose}?"
    ):
        raise StepFailedError(
            f"the peer at {other.service.address} (site {other.site}, {info.get('site_kind')}) "
            f"is not the site {purpose}: nothing was changed"
        )
    ctx.event("peer-confirmed", admin.principal, site=other.site, address=other.service.address)


def _backend_choice(ctx: StepContext, name: str) -> str:
    wanted = ctx.params.get("backend")
    while wanted not in ("pkcs11", "transit"):
        if wanted is not None:
            ctx.term.say("Answer pkcs11 (an HSM token) or transit (Vault/OpenBao transit).")
        wanted = ctx.term.ask(
            f"{ctx.administrator().principal}: the key backend of site {name} (pkcs11 or transit)",
            default="pkcs11",
        )
    return str(wanted)


@action(
    "site.register",
    "register the peer's site here as standby, once the administrator confirms it is that site",
    needs_peer=True,
    backend=(str,),
)
def register_site(ctx: StepContext) -> str:
    other = ctx.other()
    name, kind = other.site, str(other.session.info.get("site_kind") or "")
    _confirm_peer(ctx, "to provision")
    token = _admin_token(ctx)
    known = _registered(ctx, name, token)
    if known is not None:
        if known["status"] == "retired":
            raise StepFailedError(
                f"site {name} is retired in this site's registry: a retired site is never "
                "provisioned again; give the new site a new name"
            )
        if known["kind"] != kind:
            raise StepFailedError(
                f"site {name} is registered here as {known['kind']}, but the peer is of kind "
                f"{kind}: it is not the site registered under that name"
            )
        ctx.event("already-registered", site=name, kind=kind, status=known["status"])
        return f"site {name} ({kind}) was registered here already, {known['status']}"
    backend = _backend_choice(ctx, name)
    ctx.event("registering", site=name, kind=kind, backend=backend, url=other.service.address)
    body = {
        "kind": kind,
        "backend": backend,
        "url": other.service.address,
        "note": f"registered by ceremony {ctx.ceremony}"[:500],
    }
    record = ctx.call("POST", f"ekms/sites/{name}", body, token=token)["data"]
    ctx.event(
        "site-registered",
        site=name,
        kind=kind,
        backend=backend,
        status=record["status"],
        request_id=ctx.service.last_request_id(),
    )
    return f"site {name} ({kind}, {backend}) registered at site {ctx.site} as {record['status']}"


def _backup_path(ctx: StepContext, target: str) -> Path:
    if ctx.directory is None:
        raise StepFailedError("the runner gave this step no transcript directory for the backup")
    return ctx.directory / f"{ctx.script.name}-{ctx.ceremony}.{target}.domain-backup.json"


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@action(
    "domain.export",
    "export the domain backup for the other site into the transcript directory (mode 0600)",
    needs_peer=True,
)
def export_domain(ctx: StepContext) -> str:
    from api.cli import CliError  # noqa: PLC0415 - the CLI's file helper, only when exporting
    from api.cli_domain import write_private  # noqa: PLC0415

    target = ctx.other().site
    for done in reversed(ctx.earlier_events("exported")):
        if ctx.directory is not None and _sha256_of(ctx.directory / done["file"]) == done["sha256"]:
            return (
                f"backup {done['backup_id']} for site {target} was exported to {done['file']} "
                "before the runner stopped"
            )
    token = _admin_token(ctx)
    ctx.event("exporting", target=target)
    data = ctx.call("POST", "ekms/domain/export", {"target_site": target}, token=token)["data"]
    request_id = ctx.service.last_request_id()
    raw = json.dumps(data["backup"], indent=2, sort_keys=True).encode() + b"\n"
    path = _backup_path(ctx, target)
    try:
        write_private(path, raw)
    except CliError as exc:
        raise StepFailedError(str(exc)) from None
    digest = hashlib.sha256(raw).hexdigest()
    summary, skipped = data["summary"], list(data.get("skipped") or [])
    for reason in skipped:
        ctx.term.say(f"Left out of the backup: {reason}")
    ctx.event(
        "exported",
        file=path.name,
        sha256=digest,
        backup_id=summary["backup_id"],
        digest=summary["digest"],
        source=ctx.site,
        target=target,
        keys=summary["keys"],
        versions=summary["versions"],
        skipped=skipped,
        request_id=request_id,
    )
    ctx.term.say(f"Backup written to {path} (SHA-256 {digest}).")
    return (
        f"backup {summary['backup_id']} of site {ctx.site} for site {target}: "
        f"{summary['keys']} keys, {summary['versions']} versions, {len(skipped)} left out; "
        f"written to {path.name} (SHA-256 {digest})"
    )


def _exported_for(ctx: StepContext, site: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The latest backup this ceremony exported for ``site``, read back and checked."""
    exported = [e for e in ctx.history() if e.get("what") == "exported" and e.get("target") == site]
    if not exported:
        raise StepFailedError(f"no earlier step of this ceremony exported a backup for site {site}")
    event = exported[-1]
    if ctx.directory is None:
        raise StepFailedError("the runner gave this step no transcript directory")
    path = ctx.directory / str(event["file"])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StepFailedError(
            f"cannot read the backup {path}: {exc.strerror or exc}; export it again (--restart)"
        ) from None
    if hashlib.sha256(raw).hexdigest() != event["sha256"]:
        raise StepFailedError(
            f"the backup {path.name} is not the file exported (its SHA-256 changed since): "
            "export it again (--restart)"
        )
    return event, dict(json.loads(raw))


@action("domain.load", "load the backup an earlier step exported for this site onto its new node")
def load_domain(ctx: StepContext) -> str:
    event, document = _exported_for(ctx, ctx.site)
    status = ctx.call("GET", "sys/seal-status")
    if status.get("initialized"):
        if any(e.get("digest") == event["digest"] for e in ctx.earlier_events("loading")):
            ctx.event("load-resumed", backup_id=event["backup_id"])
            return f"backup {event['backup_id']} was loaded before the runner stopped"
        raise StepFailedError(
            f"site {ctx.site} at {ctx.service.address} is initialised already: a domain backup "
            "is loaded only on a new node (a new data directory and token). A site that lacks "
            "only newer keys is refreshed instead (ekms domain import FILE; docs/sites.md)"
        )
    ctx.event("loading", backup_id=event["backup_id"], digest=event["digest"])
    answer = ctx.call("POST", "ekms/domain/load", document)["data"]
    ctx.event(
        "loaded",
        backup_id=answer.get("backup_id"),
        digest=answer.get("digest"),
        request_id=ctx.service.last_request_id(),
    )
    return (
        f"backup {event['backup_id']} loaded at site {ctx.site}: initialised and sealed; a "
        "quorum's first unseal imports the keys"
    )


def _key_versions(ctx: StepContext, token: str) -> dict[str, dict[str, Any]]:
    """Every key this site holds: name -> its classification and version numbers."""
    try:
        names = ctx.call("GET", "transit/keys?list=true", token=token)["data"]["keys"]
    except ServiceError as exc:
        if exc.status == 404:
            return {}
        raise
    found = {}
    for name in names:
        data = ctx.call("GET", f"transit/keys/{name}", token=token)["data"]
        found[str(name)] = {
            "classification": data.get("classification"),
            "versions": sorted(int(v) for v in data.get("keys") or {}),
        }
    return found


@action(
    "site.check",
    "read this site's status and keys; every key version of the backup loaded must be here",
    expect_status=(str,),
)
def check_site(ctx: StepContext) -> str:
    token = _admin_token(ctx)
    site = ctx.call("GET", "ekms/site", token=token)["data"]
    held = _key_versions(ctx, token)
    serving = "serving" if site.get("serving") else f"not serving ({site.get('refusal')})"
    ctx.term.say(f"Site {site.get('name')} ({site.get('kind')}): {site.get('status')}, {serving}")
    for name, key in sorted(held.items()):
        versions = ", ".join(map(str, key["versions"])) or "none"
        ctx.term.say(f"  key {name} ({key['classification']}): versions {versions}")
    missing: list[str] = []
    compared = ""
    if any(e.get("what") == "exported" and e.get("target") == ctx.site for e in ctx.history()):
        event, document = _exported_for(ctx, ctx.site)
        for key in document.get("keys", []):
            have = set(held.get(str(key.get("name")), {}).get("versions", []))
            missing += [
                f"{key.get('name')}/v{v.get('number')}"
                for v in key.get("versions", [])
                if v.get("number") not in have
            ]
        compared = f"; every key version of backup {event['backup_id']} is here"
    ctx.event(
        "site-checked",
        site=site.get("name"),
        status=site.get("status"),
        serving=bool(site.get("serving")),
        keys=len(held),
        versions=sum(len(k["versions"]) for k in held.values()),
        missing=missing or None,
        request_id=ctx.service.last_request_id(),
    )
    wanted = ctx.params.get("expect_status")
    if wanted is not None and site.get("status") != wanted:
        raise StepFailedError(f"site {site.get('name')} is {site.get('status')}, not {wanted}")
    if missing:
        raise StepFailedError(
            f"site {site.get('name')} lacks key versions the backup carried: {', '.join(missing)}"
        )
    return (
        f"site {site.get('name')} is {site.get('status')}, {serving}; {len(held)} keys, "
        f"{sum(len(k['versions']) for k in held.values())} versions{compared}"
    )


def _sites_with(ctx: StepContext, status: str) -> list[str]:
    token = ctx.token(ctx.officials()[0])
    listed = ctx.call("GET", "ekms/sites?list=true", token=token)["data"]["key_info"]
    return sorted(n for n, s in listed.items() if n != ctx.site and s["status"] == status)


def _site_named(ctx: StepContext, what: str, default: str) -> str:
    """A site name: the script's parameter, or typed by the proposing official."""
    given = ctx.params.get(what)
    if given:
        return str(given)
    earlier = ctx.earlier_events(f"{what}-named")
    if earlier:
        return str(earlier[-1]["site"])
    proposer = ctx.officials()[0].principal
    name = ctx.term.ask(f"{proposer}: the {what} site", default=default)
    ctx.event(f"{what}-named", proposer, site=name[:64])
    return name[:64]


def _other_site(ctx: StepContext, what: str) -> str:
    """The site a proposal names: the ceremony's peer when it has one, else ``_site_named``."""
    if At.PEER in ctx.sites:
        return ctx.other().site
    return _site_named(ctx, what, "")


@action(
    "site.failover",
    "officials propose that this site takes over from another (site-failover); a quorum approves",
    previous=(str,),
)
def failover(ctx: StepContext) -> str:
    def payload() -> dict[str, Any]:
        active = _sites_with(ctx, "active")
        previous = _site_named(ctx, "previous", active[0] if len(active) == 1 else "")
        return {"previous": previous, "justification": _justification(ctx)}

    proposal = _proposal(ctx, "site-failover", payload)
    previous = proposal["payload"]["previous"]
    return (
        f"site {ctx.site} is active and site {previous} failed-over, by proposal {proposal['id']}"
    )


@action(
    "site.failback",
    "officials propose that this site resumes and the other is retired (site-failback); a "
    "quorum approves",
    embassy=(str,),
)
def failback(ctx: StepContext) -> str:
    def payload() -> dict[str, Any]:
        return {"embassy": _other_site(ctx, "embassy"), "justification": _justification(ctx)}

    proposal = _proposal(ctx, "site-failback", payload)
    embassy = proposal["payload"]["embassy"]
    return (
        f"site {ctx.site} is active and site {embassy} is retired in its registry, by proposal "
        f"{proposal['id']}"
    )


@action(
    "site.decommission",
    "officials propose that this active site records the other as retired "
    "(site-decommission); a quorum approves",
    site=(str,),
)
def decommission(ctx: StepContext) -> str:
    def payload() -> dict[str, Any]:
        return {"site": _other_site(ctx, "site"), "justification": _justification(ctx)}

    proposal = _proposal(ctx, "site-decommission", payload)
    return (
        f"site {proposal['payload']['site']} is retired in {ctx.site}'s registry, by proposal "
        f"{proposal['id']}"
    )


@action(
    "site.retire",
    "officials propose that this site retires for good (site-retire); a quorum approves; every "
    "token issued there is revoked",
    destroy_keys=(bool,),
)
def retire(ctx: StepContext) -> str:
    destroy = ctx.params.get("destroy_keys", False) is True
    proposal = _proposal(
        ctx,
        "site-retire",
        lambda: {"justification": _justification(ctx), "destroy_keys": destroy},
    )
    for participant in ctx.participants:  # revoked with every token of the site
        participant.token = None
    left = _key_versions(ctx, _admin_token(ctx))
    ctx.event(
        "site-retired",
        site=ctx.site,
        proposal=proposal["id"],
        destroy_keys=destroy,
        keys_left=sorted(left),
        request_id=ctx.service.last_request_id(),
    )
    if destroy and left:
        raise StepFailedError(
            f"site {ctx.site} is retired, but keys were not destroyed: {', '.join(sorted(left))}; "
            "delete them with a root token generated there (docs/sites.md)"
        )
    keys = "its keys destroyed" if destroy else f"{len(left)} keys kept (serving nothing)"
    return (
        f"site {ctx.site} is retired by proposal {proposal['id']}: every token issued there is "
        f"revoked, {keys}"
    )


def _audit_key_of(ctx: StepContext) -> dict[str, Any]:
    """This site's audit public key, read from it; made first (by signing a head) if none."""
    token = _admin_token(ctx)
    heads = ctx.call("GET", "ekms/audit/heads", token=token)["data"]
    if heads.get("public_key") is None:  # the key is made with the site's first signed head
        ctx.call("POST", "ekms/audit/tree-head", token=token)
        heads = ctx.call("GET", "ekms/audit/heads", token=token)["data"]
    return dict(heads["public_key"])


@action(
    "site.pin-audit-key",
    "read the other site's audit public key from it and pin it in this site's registry, so "
    "that this site can check that site's signed tree heads later",
    needs_peer=True,
)
def pin_audit_key(ctx: StepContext) -> str:
    there = ctx.other()
    key = _audit_key_of(there)
    kid = parse_public_jwk(key).thumbprint
    there.event("audit-key-read", site=there.site, kid=kid)
    token = _admin_token(ctx)
    known = _registered(ctx, there.site, token)
    if known is None:
        raise StepFailedError(f"site {there.site} is not registered at site {ctx.site}")
    if known.get("audit_kid") == kid:
        ctx.event("audit-key-pinned-already", site=there.site, kid=kid)
        return f"site {there.site}'s audit key {kid} was pinned at site {ctx.site} already"
    if known.get("audit_kid"):
        raise StepFailedError(
            f"site {ctx.site} has another audit key pinned for site {there.site} "
            f"({known['audit_kid']}, and the site answers with {kid}): it is not the site "
            "registered under that name, or it was rebuilt; find out which before going on"
        )
    ctx.term.say(f"Site {there.site}'s audit key: {kid} (ekms site status there shows it).")
    ctx.call("POST", f"ekms/sites/{there.site}/audit-key", {"audit_public_key": key}, token=token)
    ctx.event(
        "audit-key-pinned", site=there.site, kid=kid, request_id=ctx.service.last_request_id()
    )
    return f"site {there.site}'s audit key {kid} is pinned at site {ctx.site}"


@action(
    "site.record-head",
    "the other site signs a tree head of its audit log; this site checks it with that site's "
    "registered audit key and records it",
    needs_peer=True,
)
def record_head(ctx: StepContext) -> str:
    there = ctx.other()
    head = there.call("POST", "ekms/audit/tree-head", token=there.token(there.administrator()))[
        "data"
    ]
    there.event(
        "head-signed",
        site=there.site,
        size=head.get("size"),
        root_hash=head.get("root_hash"),
        request_id=there.service.last_request_id(),
    )
    answer = ctx.call(
        "POST",
        f"ekms/sites/{there.site}/tree-heads",
        {"tree_head": head},
        token=_admin_token(ctx),
    )["data"]
    request_id = ctx.service.last_request_id()
    ctx.event(
        "head-recorded",
        site=there.site,
        size=answer.get("size"),
        root_hash=answer.get("root_hash"),
        request_id=request_id,
    )
    return (
        f"site {there.site}'s signed tree head (size {answer.get('size')}, root "
        f"{str(answer.get('root_hash'))[:16]}...) is recorded in site {ctx.site}'s audit log "
        f"(request {request_id})"
    )
