"""``/v1/auth/token/revoke-self`` and ``revoke-accessor``: the root token is break-glass only.

A root token from init or generate-root is revoked as in Vault; the revocation bumps the
registry generation, so every worker and node refuses the token on its next request.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, parse_model
from kms.errors import InvalidRequestError

_ACCESSOR = re.compile(r"[0-9a-f]{24}")  # kms.tokens.issue_token's token_id


class RevokeAccessorRequest(Body):
    accessor: str


def build_router(handler: Handler) -> APIRouter:
    router = APIRouter(prefix="/v1/auth/token", tags=["auth"])
    runtime = handler.runtime

    @router.api_route("/revoke-self", methods=["POST", "PUT"])
    async def revoke_self(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            identity = call.identity
            if identity is None or identity.claims is not None or call.principal is None:
                raise InvalidRequestError(
                    "revoke-self revokes tokens from sys/init or generate-root; an access "
                    "token expires by itself, or a security officer revokes it"
                )
            call.details = {"accessor": call.principal}
            if not runtime.store.revoke_token(call.principal, runtime.clock.now()):
                raise InvalidRequestError("the token was revoked already")
            return 204, None

        return await handler.run(
            request, "auth.token.revoke-self", work, key_operation=False, root_only=False
        )

    @router.api_route("/revoke-accessor", methods=["POST", "PUT"])
    async def revoke_accessor(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(RevokeAccessorRequest, data)
            accessor = body.accessor.strip()
            if not _ACCESSOR.fullmatch(accessor):  # nor is a mistyped token value echoed
                raise InvalidRequestError(
                    "accessor must be a token id: 24 hexadecimal characters, as audit "
                    "records name tokens"
                )
            call.details = {"accessor": accessor}
            if not runtime.store.revoke_token(accessor, runtime.clock.now()):
                raise InvalidRequestError(f"no live token has accessor {accessor!r}")
            return 204, None

        return await handler.run(
            request, "auth.token.revoke-accessor", work, key_operation=False, root_only=True
        )

    return router
