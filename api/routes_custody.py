"""``/v1/ekms/shares`` and ``/v1/ekms/drills``: share checks and share-health drills.

A share check is a challenge-response done on the holder's machine (``kms.share_check``): the
holder fetches a one-time challenge, signs it with a key derived from their share, and sends
the signature with the member id. The share never reaches the service, and what the service
stores (one public key per member) cannot produce the share or answer a challenge.

Checks work sealed or unsealed (nothing here needs a key of the service). A plain check takes
an optional token, and the record then names the caller; a drill check-in needs an official's
token, so that the drill's report names official and member. Challenges are spent before the
proof is looked at, so each allows one attempt, and a proof cannot be replayed.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, envelope, parse_model
from kms import drill as drills
from kms import share_check
from kms.drill import Check
from kms.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    NotInitializedError,
    PermissionDeniedError,
)
from kms.identity import Role
from kms.jose import b64url_decode, b64url_encode
from kms.keyring import set_name

if TYPE_CHECKING:
    from api.runtime import Runtime
    from kms.access import Identity
    from kms.custody import ShareSetDescriptor
    from kms.keyring import SetName
    from kms.rekey import ShareMember

CHALLENGE_TTL = 300.0  # seconds: fetched, signed and sent back by one command
MAX_OUTSTANDING_CHALLENGES = 1000  # unauthenticated callers cannot grow the table past this
DEFAULT_DRILL_DURATION = 7 * drills.DAY
DEFAULT_STALE_AFTER_DAYS = 90
_READERS = frozenset({Role.SECURITY_OFFICER, Role.OFFICIAL, Role.AUDITOR})
_STARTERS = frozenset({Role.SECURITY_OFFICER, Role.OFFICIAL})
_NO_COMMITMENTS = (
    "the share set in force was made before share checks existed, so the service holds no "
    "commitment to check a share against; rekey (ekms operator rekey init) to make a set whose "
    "shares can be checked"
)


class ShareCheckRequest(Body):
    member: str = Field(max_length=8)
    set_identifier: int
    challenge: str = Field(max_length=64)
    proof: str = Field(max_length=128)


class DrillRequest(Body):
    duration: float | None = None
    deadline: float | None = None
    stale_after_days: int = DEFAULT_STALE_AFTER_DAYS


def _require(identity: Identity, roles: frozenset[Role], what: str) -> None:
    if not (identity.root or identity.roles & roles):
        raise PermissionDeniedError(f"{what} is for: {', '.join(sorted(roles))}, or root")


def _descriptor(runtime: Runtime) -> ShareSetDescriptor:
    descriptor = runtime.store.get_share_set()
    if descriptor is None:
        raise NotInitializedError
    return descriptor


def _decode(value: str, name: str, size: int) -> bytes:
    try:
        raw = b64url_decode(value)
    except AuthenticationError:
        raise InvalidRequestError(f"{name} must be base64url") from None
    if len(raw) != size:
        raise InvalidRequestError(f"{name} must be {size} bytes")
    return raw


def _claim(runtime: Runtime, name: SetName, stored: ShareMember, official: str) -> None:
    """A drill check-in records its official as the member's holder, unless another is."""
    if stored.holder is None:
        runtime.store.claim_holder(name, stored.member, official)
    elif stored.holder != official:
        raise ConflictError(
            f"member {stored.member} is recorded as held by {stored.holder}, not {official}: a "
            "check-in is made by the share's holder"
        )


def check_share(
    runtime: Runtime,
    call: Call,
    body: ShareCheckRequest,
    *,
    official: str | None,
    drill: str | None,
) -> dict[str, Any]:
    """Verify one proof against the set in force, record it, and say which member it proved."""
    descriptor = _descriptor(runtime)
    name = set_name(descriptor)
    member = body.member
    share_check.parse_member(member)
    call.details.update(
        {
            "member": member,
            "set": {"identifier": name[0], "generation": name[1]},
            "presented_set": body.set_identifier,
        }
    )
    if official is not None:
        call.details["official"] = official
    if drill is not None:
        call.details["drill"] = drill
    challenge = _decode(body.challenge, "challenge", share_check.CHALLENGE_BYTES)
    proof = _decode(body.proof, "proof", share_check.SIGNATURE_BYTES)
    now = runtime.clock.now()
    if not runtime.store.spend_challenge(hashlib.sha256(challenge).digest(), now):
        raise InvalidRequestError(
            "unknown, used or expired challenge: fetch a new one (GET /v1/ekms/shares/challenge)"
        )
    if body.set_identifier != descriptor.identifier:
        raise InvalidRequestError(
            f"this share belongs to share set {body.set_identifier}, not to the set in force "
            f"({descriptor.identifier}): it no longer unseals this service, if it ever did"
        )
    members = {m.member: m for m in runtime.store.share_members(name)}
    if not members:
        raise ConflictError(_NO_COMMITMENTS)
    stored = members.get(member)
    if stored is None or stored.commitment is None:
        raise InvalidRequestError(f"the set in force has no member {member}")
    if not share_check.verify(stored.commitment, body.set_identifier, member, challenge, proof):
        raise InvalidRequestError(
            f"the proof does not verify: the share is not member {member} of the set in force "
            "(mistyped, or another member's)"
        )
    if drill is not None and official is not None:
        _claim(runtime, name, stored, official)
    runtime.store.record_share_check(name, Check(member, now, official, drill))
    call.details["result"] = "confirmed"
    return {
        "member": member,
        "confirmed": True,
        "share_set": {"identifier": name[0], "generation": name[1]},
        "holder": stored.holder or (official if drill is not None else None),
        "checked_at": now,
    }


def build_router(handler: Handler) -> APIRouter:  # noqa: C901, PLR0915 - one closure per path
    router = APIRouter(prefix="/v1/ekms", tags=["custody"])
    runtime = handler.runtime

    async def run_open(request: Request, operation: str, work: Any, *, body: bool) -> Response:
        return await handler.run(
            request, operation, work, key_operation=False, authenticated=False, body=body
        )

    async def run_authenticated(
        request: Request, operation: str, work: Any, *, body: bool
    ) -> Response:
        return await handler.run(
            request, operation, work, key_operation=False, root_only=False, body=body
        )

    @router.get("/shares")
    async def shares(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _require(call.caller, _READERS, "the share set's members")
            descriptor = _descriptor(runtime)
            name = set_name(descriptor)
            members = {m.member: m for m in runtime.store.share_members(name)}
            checks = runtime.store.share_checks(name)
            rows = []
            for member in descriptor.members:
                found = members.get(member)
                last = max((c.at for c in checks if c.member == member), default=None)
                rows.append(
                    {
                        "member": member,
                        "holder": None if found is None else found.holder,
                        "checkable": found is not None and found.commitment is not None,
                        "last_confirmed_at": last,
                    }
                )
            data = {"share_set": descriptor.public_json(), "members": rows}
            return 200, envelope(call, data)

        return await run_authenticated(request, "custody.shares", work, body=False)

    @router.get("/shares/challenge")
    async def challenge(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            descriptor = _descriptor(runtime)
            name = set_name(descriptor)
            if not runtime.store.share_members(name):
                raise ConflictError(_NO_COMMITMENTS)
            value = runtime.random.bytes(share_check.CHALLENGE_BYTES)
            now = runtime.clock.now()
            expires = now + CHALLENGE_TTL
            digest = hashlib.sha256(value).digest()
            if not runtime.store.issue_challenge(digest, expires, now, MAX_OUTSTANDING_CHALLENGES):
                raise ConflictError(
                    "too many share-check challenges are outstanding; try again in a few minutes"
                )
            call.details = {"expires_at": expires}
            data = {
                "challenge": b64url_encode(value),
                "expires_at": expires,
                "share_set": {"identifier": name[0], "generation": name[1]},
            }
            return 200, envelope(call, data)

        return await run_open(request, "custody.share-challenge", work, body=False)

    @router.post("/shares/check")
    async def check(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            # A token is optional: given, it must be valid, and the record names its principal.
            if request.headers.get("x-vault-token") or request.headers.get("authorization"):
                handler.authenticate(request, call)
            official = call.identity.principal if call.identity is not None else None
            body = parse_model(ShareCheckRequest, data)
            result = check_share(runtime, call, body, official=official, drill=None)
            return 200, envelope(call, result)

        return await run_open(request, "custody.share-check", work, body=True)

    @router.post("/drills")
    async def start(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            caller = call.caller
            _require(caller, _STARTERS, "starting a drill")
            body = parse_model(DrillRequest, data)
            now = runtime.clock.now()
            if body.duration is not None and body.deadline is not None:
                raise InvalidRequestError("give a duration or a deadline, not both")
            duration = DEFAULT_DRILL_DURATION if body.duration is None else body.duration
            if body.deadline is not None:
                duration = body.deadline - now
            descriptor = _descriptor(runtime)
            drill = drills.start(
                set_name=set_name(descriptor),
                started_by=caller.principal,
                now=now,
                duration=duration,
                stale_after_days=body.stale_after_days,
                site=runtime.settings.site_name,
                node=runtime.settings.node_name,
            )
            if not runtime.store.share_members(drill.set_name):
                raise ConflictError(_NO_COMMITMENTS)
            runtime.store.insert_drill(drill)
            call.details = {"drill": drill.id, "deadline": drill.deadline}
            return 200, envelope(call, {**drill.to_json(), "open": True})

        return await run_authenticated(request, "custody.drill.start", work, body=True)

    @router.get("/drills")
    async def listing(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _require(call.caller, _READERS, "drills")
            now = runtime.clock.now()
            found = [{**d.to_json(), "open": d.is_open(now)} for d in runtime.store.list_drills()]
            return 200, envelope(call, {"drills": found})

        return await run_authenticated(request, "custody.drill.list", work, body=False)

    def find(drill_id: str) -> drills.Drill:
        if len(drill_id) > 64:
            raise NotFoundError(f"no drill {drill_id[:64]!r}")
        found = runtime.store.drill(drill_id)
        if found is None:
            raise NotFoundError(f"no drill {drill_id!r}")
        return found

    @router.get("/drills/{drill_id}")
    async def report(request: Request, drill_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _require(call.caller, _READERS, "drill reports")
            drill = find(drill_id)
            call.details = {"drill": drill.id}
            data = drills.report(
                drill,
                runtime.store.get_share_set(),
                runtime.store.share_members(drill.set_name),
                runtime.store.share_checks(drill.set_name),
                now=runtime.clock.now(),
            )
            call.details["quorum"] = data["quorum"]
            return 200, envelope(call, data)

        return await run_authenticated(request, "custody.drill.report", work, body=False)

    @router.post("/drills/{drill_id}/check-in")
    async def check_in(request: Request, drill_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            caller = call.caller
            if not caller.has(Role.OFFICIAL):
                raise PermissionDeniedError("drill check-ins are made by officials")
            drill = find(drill_id)
            call.details = {"drill": drill.id}
            now = runtime.clock.now()
            if not drill.is_open(now):
                raise ConflictError(f"drill {drill.id} closed at its deadline; start a new one")
            if set_name(_descriptor(runtime)) != drill.set_name:
                raise ConflictError(
                    f"drill {drill.id} is for a share set that a rekey has replaced; start a "
                    "new drill"
                )
            body = parse_model(ShareCheckRequest, data)
            result = check_share(runtime, call, body, official=caller.principal, drill=drill.id)
            return 200, envelope(call, {**result, "drill": drill.id})

        return await run_authenticated(request, "custody.drill.check-in", work, body=True)

    return router
