"""Send transit writes straight to their endpoint, past FastAPI's router (ADR 0006).

Profiling on the reference machine showed FastAPI's routing, dependency solving and
middleware layers taking more than half of a worker's time on a ``datakey`` request, more than
the HSM operation, the audit commit and the JSON work together. The transit endpoints need
none of those layers: they take the raw ``Request`` and do their own parsing, authentication
and auditing in ``Handler.run``. This middleware matches the same ``APIRoute`` objects that
FastAPI serves, in the same order, and calls the same endpoint functions, so behaviour and the
OpenAPI document stay one definition. Anything it does not match goes on to FastAPI unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi.routing import APIRoute
from starlette.requests import Request

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.routing import BaseRoute
    from starlette.types import ASGIApp, Receive, Scope, Send

_METHODS = frozenset({"POST", "PUT"})


class DirectDispatch:
    def __init__(self, app: ASGIApp, *, prefix: str, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.prefix = prefix
        self.routes = [
            r
            for r in routes
            if isinstance(r, APIRoute)
            and r.path.startswith(prefix)
            and _METHODS & (r.methods or set())
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in _METHODS
            and scope["path"].startswith(self.prefix)
        ):
            path = scope["path"]
            method = scope["method"]
            for route in self.routes:
                match = route.path_regex.match(path)
                if match is None:
                    continue
                if method not in (route.methods or ()):
                    break  # let FastAPI answer 405 in its usual shape
                params: dict[str, Any] = {
                    name: route.param_convertors[name].convert(value)
                    for name, value in match.groupdict().items()
                }
                scope["path_params"] = params
                response = await route.endpoint(Request(scope, receive), **params)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
