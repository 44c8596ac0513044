"""The FastAPI application: ``create_app(runtime, seal_control)`` and nothing global."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from api import (
    routes_access,
    routes_audit,
    routes_backend,
    routes_custody,
    routes_domain,
    routes_review,
    routes_sites,
    routes_sys,
    routes_tokens,
    routes_web,
)
from api.direct_dispatch import DirectDispatch
from api.errors import error_response, unhandled
from api.http import Handler
from api.routes_ceremonies import build_router as ceremonies_router
from api.routes_transit import TransitRoutes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request
    from starlette.responses import Response

    from api.runtime import Runtime, SealControl


def create_app(runtime: Runtime, seal_control: SealControl) -> FastAPI:
    runtime.seal_control = seal_control
    handler = Handler(runtime)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """Take in journals crashed workers left; sign heads on a schedule and when stopping."""
        runtime.audit.recover()
        interval = runtime.settings.audit_head_interval
        signer = (
            asyncio.create_task(runtime.audit_log.sign_periodically(interval)) if interval else None
        )
        try:
            yield
        finally:
            if signer is not None:
                signer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await signer
            runtime.audit.close()
            runtime.audit_log.sign_quietly("at shutdown", create_key=False)

    app = FastAPI(
        lifespan=lifespan,
        title="Embassy KMS",
        version=routes_sys.VERSION,
        description="HSM-backed key management with split-custody unsealing; Vault-shaped API.",
        # Off: request spans would export paths and key names to whatever collector the
        # environment configures, and the per-request check costs measurable time.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(routes_sys.build_router(handler, seal_control))
    app.include_router(routes_access.build_router(handler))
    app.include_router(routes_tokens.build_router(handler))
    app.include_router(routes_audit.build_router(handler))
    app.include_router(routes_review.build_router(handler))
    app.include_router(routes_web.build_router(handler))
    app.include_router(ceremonies_router(handler))
    app.include_router(routes_custody.build_router(handler))
    app.include_router(routes_backend.build_router(handler))
    app.include_router(routes_sites.build_router(handler))
    app.include_router(routes_domain.build_router(handler))
    transit = TransitRoutes(handler).router()
    app.include_router(transit)
    app.add_middleware(DirectDispatch, prefix=transit.prefix, routes=transit.routes)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        messages = {404: "unsupported path", 405: "unsupported operation"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {len(exc.errors())} problem(s)")

    app.add_exception_handler(Exception, unhandled)
    return app
