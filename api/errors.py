"""The one table from the exception tree to HTTP status, in Vault's ``{"errors": [...]}`` shape."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from starlette.responses import Response

from kms.errors import (
    AuditError,
    AuthenticationError,
    BackendError,
    ConflictError,
    EkmsError,
    InvalidRequestError,
    NotFoundError,
    NotInitializedError,
    PermissionDeniedError,
    SealedError,
    SiteUnavailableError,
    StorageError,
)

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("ekms.api")

STATUS_BY_ERROR: tuple[tuple[type[EkmsError], int], ...] = (
    (SealedError, 503),
    (SiteUnavailableError, 503),
    (NotInitializedError, 400),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (InvalidRequestError, 400),
    (AuditError, 503),
    (BackendError, 502),
    (StorageError, 503),
)


class PayloadTooLargeError(InvalidRequestError):
    pass


class MethodNotAllowedError(InvalidRequestError):
    pass


# Paths of this service's own API, where a request that clashes with the current state (a
# decided proposal, a closed campaign) answers 409, so a client can tell "read it again" from
# "fix your request". Vault-shaped paths (sys/, transit/, auth/) answer 400 there, as Vault does
# ("Vault is already initialized"), so that hvac and the bao CLI see what they expect.
EKMS_PREFIX = "/v1/ekms/"


def status_for(error: EkmsError, path: str = "") -> int:
    if isinstance(error, ConflictError) and path.startswith(EKMS_PREFIX):
        return 409
    if isinstance(error, PayloadTooLargeError):
        return 413
    if isinstance(error, MethodNotAllowedError):
        return 405
    for kind, status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return status
    return 500


def error_response(status: int, *messages: str) -> Response:
    return Response(
        orjson.dumps({"errors": list(messages)}), status_code=status, media_type="application/json"
    )


def response_for(error: EkmsError) -> Response:
    return error_response(status_for(error), str(error))


async def unhandled(request: Request, exc: Exception) -> Response:
    """Last resort: log the type (never the message, which may hold data) and answer 500."""
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(500, "internal error")
