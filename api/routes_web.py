"""``/ui/``: the security officers' page, a static single-page client of the JSON API.

The page holds no data and no secret, so it is served without a token; everything it shows
comes from the API with the officer's own token, exactly as for ``ekms`` or hvac. The files
are read once when the router is built and served from a fixed table, so no request names a
path on disk. Each answer still goes through ``Handler.run`` (unauthenticated, like the JWKS),
so page loads are audited like any other request and fail closed with the audit.

The Content-Security-Policy allows scripts, styles and connections to this origin only and no
inline code, which confines what an injected string could do even if the page's own escaping
failed. The token lives in the page (memory and ``sessionStorage``), never in a cookie, so a
cross-site request carries no credential and there is no CSRF surface to defend.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kms.errors import NotFoundError

if TYPE_CHECKING:
    from api.http import Call, Handler

WEB_DIR = Path(__file__).with_name("web")
PREFIX = "/ui"
_AUDIENCE_MARK = "__EKMS_AUDIENCE__"
_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def load_assets(audience: str) -> dict[str, bytes]:
    """The page's files; the login audience goes into ``index.html`` so assertions name it.

    The audience is public (every token carries it) and is HTML-escaped all the same.
    """
    assets = {name: (WEB_DIR / name).read_bytes() for name in _MEDIA_TYPES}
    page = assets["index.html"].decode()
    assets["index.html"] = page.replace(_AUDIENCE_MARK, html.escape(audience, quote=True)).encode()
    return assets


def build_router(handler: Handler) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    assets = load_assets(handler.settings.audience)

    async def serve(request: Request, name: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details = {"asset": name[:64]}
            if name == "":
                return 308, RedirectResponse(f"{PREFIX}/", status_code=308)
            body = assets.get(name)
            if body is None:
                raise NotFoundError(f"the page has no file {name[:64]!r}")
            return 200, Response(body, media_type=_MEDIA_TYPES[name])

        response = await handler.run(
            request, "ui.page", work, key_operation=False, authenticated=False, body=False
        )
        response.headers.update(SECURITY_HEADERS)
        return response

    @router.get(PREFIX)
    async def redirect(request: Request) -> Response:
        return await serve(request, "")

    @router.get(f"{PREFIX}/")
    async def index(request: Request) -> Response:
        return await serve(request, "index.html")

    @router.get(PREFIX + "/{name}")
    async def asset(request: Request, name: str) -> Response:
        return await serve(request, name)

    return router
