"""``/v1/sys``: health, init, seal status, unseal, seal — in Vault's shapes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, json_response, parse_model
from kms.errors import InvalidRequestError, NotInitializedError

if TYPE_CHECKING:
    from api.runtime import SealControl
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


def build_router(handler: Handler, seal: SealControl) -> APIRouter:  # noqa: C901 - one closure per path
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
            seal.seal()
            return 204, None

        return await handler.run(request, "sys.seal", work, key_operation=False, root_only=True)

    return router


def _int_param(value: str | None, default: int) -> int:
    if value is None or not value.isdigit() or not 100 <= int(value) <= 599:
        return default
    return int(value)
