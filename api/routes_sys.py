"""``/v1/sys``: health, init, seal status, unseal, seal, generate-root, audit-hash, as Vault.

Unseal takes no token, as in Vault; an official may add a signed statement naming itself as the
one presenting the share (``kms.unseal_assertion``), and the audit record then names it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, envelope, json_response, parse_model
from api.routes_audit import require_auditor
from kms import jose
from kms.errors import (
    ConflictError,
    EkmsError,
    InvalidRequestError,
    NotInitializedError,
    PermissionDeniedError,
)
from kms.identity import Role
from kms.keys import decode_b64_field
from kms.rekey import RekeyPlan
from kms.unseal_assertion import claimed_official, share_member, verify_unseal_assertion

if TYPE_CHECKING:
    from api.runtime import Runtime, SealControl
    from kms.access import Identity
    from kms.rekey import RekeyStatus
    from kms.root_generation import RootGenerationStatus
    from kms.seal import SealStatus

VERSION = "0.1.0"
AUDIT_HASH_INPUT_LIMIT = 65536  # bytes: far more than a context holds; the body limit is larger
_DEVICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class InitRequest(Body):
    secret_shares: int
    secret_threshold: int
    pgp_keys: list[str] | None = None
    root_token_pgp_key: str | None = None
    stored_shares: int | None = None
    recovery_shares: int | None = None
    recovery_threshold: int | None = None
    recovery_pgp_keys: list[str] | None = None


class UnsealRequest(Body):
    key: str | None = None
    reset: bool = False
    migrate: bool = False
    official_assertion: str | None = None  # ours, optional: Vault's clients never send it


class AuditHashRequest(Body):
    input: str
    format: Literal["text", "base64"] = "text"


class GenerateRootStartRequest(Body):
    otp: str | None = None
    pgp_key: str | None = None


class GenerateRootUpdateRequest(Body):
    key: str
    nonce: str


class RekeyInitRequest(Body):
    """Vault's rekey init, plus SLIP-39 groups and holders (ours)."""

    secret_shares: int | None = None
    secret_threshold: int | None = None
    groups: list[tuple[int, int]] | None = Field(default=None, max_length=16)
    group_threshold: int | None = None
    holders: list[str] | None = Field(default=None, max_length=16)
    require_verification: bool = True
    pgp_keys: list[str] | None = None
    backup: bool = False


class RekeyUpdateRequest(Body):
    key: str = Field(max_length=1024)
    nonce: str | None = Field(default=None, max_length=64)


def rekey_body(status: RekeyStatus) -> dict[str, Any]:
    """Vault's rekey status; ``groups``, ``group_threshold``, ``holders`` and ``phase`` are ours.

    ``t`` and ``n`` describe the new set (as in Vault), ``required`` the current shares needed.
    Verification is always required: new shares are in force only once a quorum of them is
    verified (``PUT sys/rekey/verify``).
    """
    return {
        "started": status.started,
        "nonce": status.nonce,
        "t": status.t,
        "n": status.n,
        "progress": status.progress,
        "required": status.required,
        "pgp_fingerprints": None,
        "backup": False,
        "verification_required": True,
        "verification_nonce": status.verification_nonce,
        "complete": status.complete,
        "share_scheme": "slip39",
        "group_threshold": status.group_threshold,
        "groups": [list(g) for g in status.groups],
        "holders": list(status.holders),
        "phase": status.phase,
    }


def rekey_issued_body(status: RekeyStatus) -> dict[str, Any]:
    """The one answer that carries the new shares (mnemonics, or JWEs when holders are set)."""
    keys = list(status.keys)
    return {
        **rekey_body(status),
        "complete": True,
        "keys": keys,
        "keys_base64": keys,
        "members": list(status.members),
        "encrypted": bool(status.holders),
    }


def rekey_verify_body(status: RekeyStatus) -> dict[str, Any]:
    """Vault's rekey verification status (``nonce`` is the verification nonce)."""
    return {
        "started": bool(status.verification_nonce),
        "nonce": status.verification_nonce,
        "t": status.t,
        "n": status.n,
        "progress": status.verification_progress,
        "complete": status.complete,
    }


def rekey_details(status: RekeyStatus) -> dict[str, Any]:
    """What the audit record keeps of a rekey step: never a share or a key."""
    details: dict[str, Any] = {"phase": status.phase, "progress": status.progress}
    if status.member is not None:
        details["member"] = status.member
    if status.verification_progress:
        details["verification_progress"] = status.verification_progress
    if status.new_set is not None:
        details["new_set"] = {"identifier": status.new_set[0], "generation": status.new_set[1]}
    if status.complete:
        details["complete"] = True
    return details


def rekey_plan(runtime: Runtime, body: RekeyInitRequest) -> RekeyPlan:
    if body.pgp_keys or body.backup:
        raise InvalidRequestError(
            "pgp_keys and backup are not supported: give holders (principal ids) to have each "
            "new share encrypted to its holder's registered P-256 key"
        )
    if not body.require_verification:
        raise InvalidRequestError(
            "require_verification cannot be false: new shares are in force only once a quorum "
            "of them is verified (PUT sys/rekey/verify)"
        )
    if body.groups is not None:
        if body.secret_shares is not None or body.secret_threshold is not None:
            raise InvalidRequestError(
                "give either secret_shares and secret_threshold, or groups (with "
                "group_threshold), not both"
            )
        if body.group_threshold is None and len(body.groups) != 1:
            raise InvalidRequestError("group_threshold is required with several groups")
        group_threshold, groups = body.group_threshold or 1, body.groups
    else:
        if body.secret_shares is None or body.secret_threshold is None:
            raise InvalidRequestError(
                "missing required fields 'secret_shares' and 'secret_threshold' (or 'groups')"
            )
        if body.group_threshold not in (None, 1):
            raise InvalidRequestError("group_threshold goes with groups")
        group_threshold, groups = 1, [(body.secret_threshold, body.secret_shares)]
    holders = [_holder(runtime, principal) for principal in body.holders or []]
    return RekeyPlan.of(
        group_threshold=group_threshold,
        groups=groups,
        holders=holders,
        allow_single_share=runtime.settings.dev,
    )


def _holder(runtime: Runtime, principal: str) -> tuple[str, dict[str, str]]:
    if not isinstance(principal, str) or len(principal) > 64:
        raise InvalidRequestError("holders must be principal ids")
    found = runtime.store.principal(principal)
    if found is None:
        raise InvalidRequestError(f"holder {principal!r} is not a registered principal")
    if not found.has(Role.OFFICIAL):
        raise InvalidRequestError(
            f"holder {principal!r} is not an active official: only officials hold shares"
        )
    return principal, dict(found.jwk)


def require_custody_starter(identity: Identity) -> None:
    """Starting or cancelling a rekey: the root token, a security officer or an official."""
    if not (identity.root or identity.has(Role.SECURITY_OFFICER) or identity.has(Role.OFFICIAL)):
        raise PermissionDeniedError(
            "a rekey is started or cancelled by a security officer, an official or root"
        )


def root_generation_body(status: RootGenerationStatus) -> dict[str, Any]:
    """Vault's generate-root status; ``encoded_root_token`` is the pre-1.10 name of the token."""
    return {
        "started": status.started,
        "nonce": status.nonce,
        "progress": status.progress,
        "required": status.required,
        "complete": status.complete,
        "encoded_token": status.encoded_token,
        "encoded_root_token": status.encoded_token,
        "pgp_fingerprint": "",
        "otp_length": status.otp_length,
        "otp": status.otp,
    }


def root_generation_details(status: RootGenerationStatus) -> dict[str, Any]:
    """What the audit record keeps of a generate-root step: never a share, the OTP or a token."""
    details: dict[str, Any] = {"started": status.started, "progress": status.progress}
    if status.member is not None:
        details["member"] = status.member
    if status.complete:
        details["complete"] = True
        details["token_id"] = status.token_id
    return details


def seal_status_body(status: SealStatus, storage: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "shamir",
        "share_scheme": "slip39",
        "initialized": status.initialized,
        "sealed": status.sealed,
        "t": status.threshold,
        "n": status.shares,
        "progress": status.progress,
        "nonce": status.nonce,
        "version": VERSION,
        "build_date": "",
        "migration": False,
        "recovery_seal": False,
        "storage_type": storage,
    }
    if not status.sealed:
        body["cluster_name"] = "embassy-kms"
    return body


def build_router(handler: Handler, seal: SealControl) -> APIRouter:  # noqa: C901, PLR0915 - one closure per path
    router = APIRouter(prefix="/v1/sys", tags=["sys"])
    runtime = handler.runtime
    storage = runtime.store._engine.dialect.name  # noqa: SLF001 - shown as Vault's storage_type

    @router.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        status = seal.status()
        q = request.query_params
        if not status.initialized:
            code = _int_param(q.get("uninitcode"), 501)
        elif status.sealed:
            code = _int_param(q.get("sealedcode"), 503)
        else:
            code = _int_param(q.get("activecode"), 200)
        body = {
            "initialized": status.initialized,
            "sealed": status.sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VERSION,
            "cluster_name": "embassy-kms",
        }
        if request.method == "HEAD":
            return Response(status_code=code)
        return json_response(code, body, "")

    @router.get("/seal-status")
    async def seal_status() -> Response:
        return json_response(200, seal_status_body(seal.status(), storage), "")

    @router.get("/init")
    async def init_status() -> Response:
        return json_response(200, {"initialized": seal.status().initialized}, "")

    @router.api_route("/init", methods=["PUT", "POST"])
    async def init(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(InitRequest, data)
            unsupported = [
                name
                for name in ("pgp_keys", "root_token_pgp_key", "recovery_pgp_keys")
                if getattr(body, name)
            ]
            if unsupported or body.recovery_shares or body.recovery_threshold:
                raise InvalidRequestError(
                    "PGP-encrypted shares and recovery keys are not supported: shares are "
                    "SLIP-39 mnemonics handed to each official"
                )
            if body.stored_shares:
                raise InvalidRequestError("stored_shares is not supported: no share is stored")
            result = runtime.initialise(body.secret_threshold, body.secret_shares)
            # The root token's id is the principal its requests are recorded under.
            call.details = {
                "threshold": body.secret_threshold,
                "shares": body.secret_shares,
                "root_token_id": result.root_token.token_id,
            }
            return 200, {
                "keys": result.mnemonics,
                "keys_base64": result.mnemonics,
                "root_token": result.root_token.token,
            }

        return await handler.run(
            request, "sys.init", work, key_operation=False, authenticated=False
        )

    def presenter(call: Call, share: str, assertion: str) -> str:
        """The official who signed for this share; refused (and not counted) unless valid.

        The one-time id is spent here, before the share counts: the audit commit comes after
        the share is in the custodian's memory, too late to undo it. The nonce is read just
        before; a share another official sends in between is caught by neither side, and
        costs only that a "new attempt" statement joins the attempt that share began.
        """
        if len(assertion) > jose.MAX_TOKEN_LENGTH:
            raise InvalidRequestError(
                f"official_assertion is longer than {jose.MAX_TOKEN_LENGTH} characters; "
                "the share was not counted"
            )
        member = share_member(share)
        call.details = {"member": member}
        status = seal.status()
        if not status.initialized:
            raise NotInitializedError
        if not status.sealed:
            raise ConflictError("Vault is already unsealed")
        try:
            verified = verify_unseal_assertion(
                assertion,
                registry=runtime.store,
                audience=runtime.access.config.audience,
                now=runtime.clock.now(),
                member=member,
                nonce=status.nonce,
            )
        except EkmsError:
            claimed = claimed_official(assertion)
            if claimed is not None:
                call.details["claimed_official"] = claimed
            raise
        if not runtime.store.spend_once(*verified.once):
            call.details["claimed_official"] = verified.official
            raise InvalidRequestError(
                "official_assertion was already used: a statement presents one share, once; "
                "sign a new one. The share was not counted"
            )
        return verified.official

    @router.api_route("/unseal", methods=["PUT", "POST"])
    async def unseal(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(UnsealRequest, data)
            if body.migrate:
                raise InvalidRequestError("seal migration is not supported")
            if body.reset:
                status = seal.reset()
                call.details = {"reset": True}
            elif body.key is None:
                raise InvalidRequestError("missing required field 'key' (or reset: true)")
            else:
                if len(body.key) > 1024:
                    raise InvalidRequestError("share is too long to be a SLIP-39 mnemonic")
                official = None
                if body.official_assertion is not None:
                    official = presenter(call, body.key, body.official_assertion)
                    call.principal = official
                    call.details["official"] = official
                status = seal.submit(body.key)
                call.details = {
                    "member": status.member,
                    "progress": status.progress,
                    "unsealed": not status.sealed,
                }
                if official is not None:
                    call.details["official"] = official
            if not status.initialized:
                raise NotInitializedError
            return 200, seal_status_body(status, storage)

        return await handler.run(
            request, "sys.unseal", work, key_operation=False, authenticated=False
        )

    @router.api_route("/seal", methods=["PUT", "POST"])
    async def seal_now(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            # The last head the keys can sign before they go; sealing goes on if it fails.
            runtime.audit_log.sign_quietly("before sealing")
            seal.seal()
            # The record's principal is who sealed (the token's); the head is the last signed.
            try:
                head = runtime.store.tree_head()
            except EkmsError:
                head = None  # the node is sealed all the same; the record says what is known
            call.details = {"last_head_size": None if head is None else head[0].size}
            return 204, None

        return await handler.run(request, "sys.seal", work, key_operation=False, root_only=True)

    @router.api_route("/audit-hash/{device}", methods=["POST", "PUT"])
    async def audit_hash(request: Request, device: str) -> Response:
        """Vault's audit-hash: the keyed hash records hold in place of a context.

        There is one audit device, the integrated log, and no ``sys/audit`` listing: any
        device name (a path segment) is accepted and recorded. The input is a secret: neither
        it nor its hash goes into the record, a log or an error message.
        """

        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
            if not 0 < len(device) <= 64 or not set(device) <= _DEVICE_CHARS:
                raise InvalidRequestError(
                    "the audit device name must be 1 to 64 letters, digits, '.', '_' or '-'"
                )
            call.details = {"device": device}
            body = parse_model(AuditHashRequest, data)
            call.details["format"] = body.format
            if body.format == "base64":
                value = decode_b64_field(body.input, "input", allow_empty=False)
            else:
                value = body.input.encode()
            if not value:
                raise InvalidRequestError(
                    "input must not be empty: no record hashes an empty value"
                )
            if len(value) > AUDIT_HASH_INPUT_LIMIT:
                raise InvalidRequestError(
                    f"input is longer than {AUDIT_HASH_INPUT_LIMIT} bytes, the most this "
                    "endpoint hashes"
                )
            digest = runtime.barrier.audit_hash(value)
            return 200, {**envelope(call, {"hash": digest}), "hash": digest}

        return await handler.run(request, "sys.audit-hash", work, root_only=False)

    # Generate-root takes no token, as in Vault: a quorum of shares is the authority. OpenBao
    # 2.6+ moved it to sys/generate-root-token/* (which its CLI calls, answers in the usual
    # envelope); both paths reach the same attempt, held by the node's custodian.
    def root_answer(call: Call, request: Request, status: RootGenerationStatus) -> tuple[int, Any]:
        call.details = root_generation_details(status)
        body = root_generation_body(status)
        if "/generate-root-token/" in request.scope["path"]:
            return 200, envelope(call, body)
        return 200, body

    async def run_root(request: Request, operation: str, work: Any, *, body: bool) -> Response:
        return await handler.run(
            request, operation, work, key_operation=False, authenticated=False, body=body
        )

    @router.get("/generate-root/attempt")
    @router.get("/generate-root-token/attempt")
    async def root_generation_status(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            return root_answer(call, request, seal.root_generation_status())

        return await run_root(request, "sys.generate-root.status", work, body=False)

    @router.api_route("/generate-root/attempt", methods=["PUT", "POST"])
    @router.api_route("/generate-root-token/attempt", methods=["PUT", "POST"])
    async def root_generation_start(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(GenerateRootStartRequest, data)
            if body.pgp_key:
                raise InvalidRequestError(
                    "pgp_key is not supported: the new root token is returned XORed with a "
                    "one-time pad; give an otp, or none to have one generated"
                )
            status = seal.start_root_generation(body.otp or None)
            answer = root_answer(call, request, status)
            call.details["otp_generated"] = bool(status.otp)
            return answer

        return await run_root(request, "sys.generate-root.start", work, body=True)

    @router.delete("/generate-root/attempt")
    @router.delete("/generate-root-token/attempt")
    async def root_generation_cancel(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            seal.cancel_root_generation()
            call.details = {"cancelled": True}
            return 204, None

        return await run_root(request, "sys.generate-root.cancel", work, body=False)

    @router.api_route("/generate-root/update", methods=["PUT", "POST"])
    @router.api_route("/generate-root-token/update", methods=["PUT", "POST"])
    async def root_generation_update(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(GenerateRootUpdateRequest, data)
            if len(body.key) > 1024:
                raise InvalidRequestError("share is too long to be a SLIP-39 mnemonic")
            if len(body.nonce) > 64:
                raise InvalidRequestError("nonce is too long to be a root generation nonce")
            return root_answer(call, request, seal.submit_root_share(body.key, body.nonce))

        return await run_root(request, "sys.generate-root.update", work, body=True)

    # Rekey (docs/adr/0010). Starting and cancelling need a token (a security officer, an
    # official or root: Vault lets anyone cancel anyone's rekey); the share steps take none, as
    # in Vault: the share and the attempt's nonce are the authority.
    @router.get("/rekey/init")
    async def rekey_status(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            status = seal.rekey_status()
            call.details = rekey_details(status)
            return 200, rekey_body(status)

        return await run_root(request, "sys.rekey.status", work, body=False)

    @router.api_route("/rekey/init", methods=["PUT", "POST"])
    async def rekey_start(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            require_custody_starter(call.caller)
            plan = rekey_plan(runtime, parse_model(RekeyInitRequest, data))
            call.details = {
                "group_threshold": plan.group_threshold,
                "groups": [list(g) for g in plan.groups],
                "holders": [p for p, _ in plan.holders],
            }
            status = seal.start_rekey(plan)
            call.details["nonce"] = status.nonce
            return 200, rekey_body(status)

        return await handler.run(
            request, "sys.rekey.start", work, key_operation=False, root_only=False
        )

    @router.delete("/rekey/init")
    async def rekey_cancel(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_custody_starter(call.caller)
            seal.cancel_rekey()
            call.details = {"cancelled": True}
            return 204, None

        return await handler.run(
            request, "sys.rekey.cancel", work, key_operation=False, root_only=False, body=False
        )

    @router.api_route("/rekey/update", methods=["PUT", "POST"])
    async def rekey_update(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(RekeyUpdateRequest, data)
            if not body.nonce:
                raise InvalidRequestError(
                    "missing required field 'nonce': every share names the rekey it is for "
                    "(GET sys/rekey/init)"
                )
            status = seal.submit_rekey_share(body.key, body.nonce)
            call.details = rekey_details(status)
            if status.complete:
                call.details["issued"] = {
                    "members": list(status.members),
                    "holders": list(status.holders),
                    "encrypted": bool(status.holders),
                }
                return 200, rekey_issued_body(status)
            return 200, rekey_body(status)

        return await run_root(request, "sys.rekey.update", work, body=True)

    @router.get("/rekey/verify")
    async def rekey_verify_status(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            status = seal.rekey_status()
            call.details = rekey_details(status)
            return 200, rekey_verify_body(status)

        return await run_root(request, "sys.rekey.verify-status", work, body=False)

    @router.api_route("/rekey/verify", methods=["PUT", "POST"])
    async def rekey_verify(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(RekeyUpdateRequest, data)
            if not body.nonce:
                raise InvalidRequestError(
                    "missing required field 'nonce': the verification nonce (GET sys/rekey/verify)"
                )
            status = seal.submit_rekey_verification(body.key, body.nonce)
            call.details = rekey_details(status)
            if status.complete:
                return 200, {"nonce": status.verification_nonce, "complete": True}
            return 200, rekey_verify_body(status)

        return await run_root(request, "sys.rekey.verify", work, body=True)

    @router.delete("/rekey/verify")
    async def rekey_verify_reset(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_custody_starter(call.caller)
            status = seal.reset_rekey_verification()
            call.details = {"verification_reset": True}
            return 200, rekey_verify_body(status)

        return await handler.run(
            request,
            "sys.rekey.verify-reset",
            work,
            key_operation=False,
            root_only=False,
            body=False,
        )

    return router


def _int_param(value: str | None, default: int) -> int:
    if value is None or not value.isdigit() or not 100 <= int(value) <= 599:
        return default
    return int(value)
