"""``/v1/sys``: health, init, seal status, unseal, seal, generate-root — in Vault's shapes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, envelope, json_response, parse_model
from kms.errors import InvalidRequestError, NotInitializedError

if TYPE_CHECKING:
    from api.runtime import SealControl
    from kms.root_generation import RootGenerationStatus
    from kms.seal import SealStatus

VERSION = "0.1.0"


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


class GenerateRootStartRequest(Body):
    otp: str | None = None
    pgp_key: str | None = None


class GenerateRootUpdateRequest(Body):
    key: str
    nonce: str


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
            call.details = {"threshold": body.secret_threshold, "shares": body.secret_shares}
            return 200, {
                "keys": result.mnemonics,
                "keys_base64": result.mnemonics,
                "root_token": result.root_token.token,
            }

        return await handler.run(
            request, "sys.init", work, key_operation=False, authenticated=False
        )

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
                status = seal.submit(body.key)
                call.details = {
                    "member": status.member,
                    "progress": status.progress,
                    "unsealed": not status.sealed,
                }
            if not status.initialized:
                raise NotInitializedError
            return 200, seal_status_body(status, storage)

        return await handler.run(
            request, "sys.unseal", work, key_operation=False, authenticated=False
        )

    @router.api_route("/seal", methods=["PUT", "POST"])
    async def seal_now(request: Request) -> Response:
        def work(_call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            # The last head the keys can sign before they go; sealing goes on if it fails.
            runtime.audit_log.sign_quietly("before sealing")
            seal.seal()
            return 204, None

        return await handler.run(request, "sys.seal", work, key_operation=False, root_only=True)

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

    return router


def _int_param(value: str | None, default: int) -> int:
    if value is None or not value.isdigit() or not 100 <= int(value) <= 599:
        return default
    return int(value)
