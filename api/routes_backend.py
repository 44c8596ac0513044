"""``POST /v1/ekms/site/backend-credential``: replace a transit site's backend credential.

A transit site reaches its Vault/OpenBao cluster with a token or an AppRole pair that the root
secret does not derive, so it is stored sealed under the barrier key
(``hsm.transit_backend.TransitLogin``, docs/adr/0012 §8). This endpoint replaces it: the new
credential must log in (a fresh login of its own, checked with ``lookup-self``) before it is
sealed and stored, so a mistyped secret-id cannot lock the site out at its next unseal.

Each worker process keeps the login it made at unseal and uses the new credential from its next
login (the next unseal, or a restart): to drop the old token everywhere at once, seal and
unseal. Security officers or root only; audited without the credential.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.http import Call, Handler, envelope
from api.runtime import transit_config
from hsm.transit_backend import CredentialRefusedError, TransitBackend, TransitCredential
from kms.derivation import wipe
from kms.errors import BackendError, ConflictError, InvalidRequestError, PermissionDeniedError
from kms.identity import Role

if TYPE_CHECKING:
    from api.runtime import Runtime

_SHAPE = (
    'the body must be the new credential: {"role_id": "...", "secret_id": "..."} or '
    '{"token": "..."} (non-empty strings, nothing else)'
)


def parse_credential(data: dict[str, Any]) -> TransitCredential:
    """The credential in a request body; ``InvalidRequestError`` never repeats its values."""
    try:
        if set(data) == {"token"}:
            return TransitCredential.from_token(data["token"])
        if set(data) == {"role_id", "secret_id"}:
            return TransitCredential.from_approle(data["role_id"], data["secret_id"])
    except BackendError:
        pass
    raise InvalidRequestError(_SHAPE)


def check_login(runtime: Runtime, secret: bytearray) -> None:
    """Log in with ``secret`` on a connection of its own, then log out (an AppRole token is
    revoked); the barrier's login is not touched."""
    probe = TransitBackend(transit_config(runtime.settings), random=runtime.random)
    try:
        probe.open(secret)
    except CredentialRefusedError:
        raise InvalidRequestError(
            "the transit backend refused the new credential (it does not log in): nothing was "
            "changed, the current credential stays"
        ) from None
    finally:
        probe.close()


def build_router(handler: Handler) -> APIRouter:
    router = APIRouter(prefix="/v1/ekms/site", tags=["sites"])
    runtime = handler.runtime

    @router.post("/backend-credential")
    async def backend_credential(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            caller = call.caller
            if not (caller.root or caller.has(Role.SECURITY_OFFICER)):
                raise PermissionDeniedError(
                    "the backend credential is replaced by a security officer or root"
                )
            call.details = {"backend": runtime.settings.backend}
            login = runtime.transit_login
            if login is None:
                raise ConflictError(
                    "this site keeps its keys in a PKCS#11 token (backend = pkcs11): its login "
                    "is the PIN derived from the root secret, and there is no backend "
                    "credential to replace"
                )
            credential = parse_credential(data)
            call.details["credential"] = "token" if credential.token is not None else "approle"
            secret = credential.encode()
            try:
                check_login(runtime, secret)
                replaced = login.replace(runtime.barrier.require_open(), secret)
            finally:
                wipe(secret)
            call.details["replaced"] = replaced
            return 200, envelope(
                call,
                {
                    "backend": "transit",
                    "credential": call.details["credential"],
                    "replaced": replaced,
                    "in_use": "from each worker's next login: seal and unseal to switch now",
                },
            )

        return await handler.run(request, "site.backend-credential", work, root_only=False)

    return router
