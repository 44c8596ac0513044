"""``/v1/ekms/site`` and ``/v1/ekms/sites``: this site and the site registry (ADR 0012).

Reading the registry is for security officers, auditors, officials and root; registering
another site and recording its signed tree heads is for security officers and root. Statuses
change only by quorum proposals (``site-failover``, ``site-failback``, ``site-retire`` at
``/v1/ekms/proposals``), never by a write here. Every path works whatever this site's status:
a standby or retired site can still be inspected and its log reconciled with the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.audit_log import head_json
from api.http import Body, Call, Handler, envelope, parse_model
from kms.errors import InvalidRequestError, PermissionDeniedError
from kms.identity import Role
from kms.sites import may_serve, validate_site_name

if TYPE_CHECKING:
    from kms.access import Identity
    from kms.sites import SiteRegistry


class RegisterSiteRequest(Body):
    kind: str
    backend: str
    url: str = ""
    audit_public_key: dict[str, Any] | None = None
    note: str = ""


class AuditKeyRequest(Body):
    audit_public_key: dict[str, Any]


class TreeHeadRequest(Body):
    tree_head: dict[str, Any] | str  # a head line ({"type": "head", ...}) or its bare JWS


_READERS = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR, Role.OFFICIAL})


def _reader(identity: Identity) -> None:
    if not (identity.root or identity.roles & _READERS):
        raise PermissionDeniedError("the site registry is for officers, auditors and officials")


def _officer(identity: Identity) -> None:
    if not (identity.root or identity.has(Role.SECURITY_OFFICER)):
        raise PermissionDeniedError("sites are registered by security officers")


def build_router(handler: Handler) -> APIRouter:  # noqa: C901 - one closure per path
    router = APIRouter(prefix="/v1/ekms", tags=["sites"])
    runtime = handler.runtime

    def registry() -> SiteRegistry:
        """The registry, this site's row carrying its audit key once the key exists."""
        key = runtime.audit_log.public_key()
        runtime.sites.refresh_audit_key(None if key is None else key.to_json())
        return runtime.sites

    async def run(request: Request, operation: str, work: Any, **options: Any) -> Response:
        return await handler.run(request, operation, work, root_only=False, **options)

    @router.get("/site")
    async def this_site(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            # Any authenticated caller may ask where it is and whether this site serves.
            own = registry().own()
            settings = runtime.settings
            record: dict[str, Any] = (
                {"name": settings.site_name, "kind": settings.site_kind, "status": None}
                if own is None
                else own.to_json()
            )
            decision = may_serve(None if own is None else own.status)
            return 200, envelope(
                call,
                {
                    **record,
                    "serving": bool(decision),
                    "refusal": getattr(decision, "reason", None),
                    "emergency": runtime.store.emergency(runtime.clock.now()),
                },
            )

        return await run(request, "site.status", work, key_operation=False, body=False)

    @router.api_route("/sites", methods=["GET", "LIST"])
    async def list_sites(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _reader(call.caller)
            unknown = sorted(set(request.query_params) - {"list"})
            if unknown:
                raise InvalidRequestError(f"unknown query parameter {unknown[0]!r}")
            found = registry().sites()
            if not found:
                return 404, {"errors": []}  # Vault's answer to an empty LIST
            return 200, envelope(
                call,
                {"keys": [s.name for s in found], "key_info": {s.name: s.to_json() for s in found}},
            )

        return await run(request, "site.list", work, key_operation=False, body=False)

    @router.get("/sites/{name}")
    async def read_site(request: Request, name: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _reader(call.caller)
            call.details["site"] = validate_site_name(name)
            return 200, envelope(call, registry().get(name).to_json())

        return await run(request, "site.read", work, key_operation=False, body=False)

    @router.api_route("/sites/{name}", methods=["POST", "PUT"])
    async def register_site(request: Request, name: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _officer(call.caller)
            call.details["site"] = validate_site_name(name)
            body = parse_model(RegisterSiteRequest, data)
            record = registry().register(
                name,
                kind=body.kind,
                backend=body.backend,
                url=body.url,
                audit_public_key=body.audit_public_key,
                note=body.note,
            )
            call.details.update(
                {"kind": record.kind.value, "backend": record.backend.value}
                | ({"audit_kid": record.audit_kid} if record.audit_kid else {})
            )
            return 200, envelope(call, record.to_json())

        return await run(request, "site.register", work)

    @router.api_route("/sites/{name}/audit-key", methods=["POST", "PUT"])
    async def set_audit_key(request: Request, name: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _officer(call.caller)
            call.details["site"] = validate_site_name(name)
            body = parse_model(AuditKeyRequest, data)
            record = registry().set_audit_key(name, body.audit_public_key)
            call.details["audit_kid"] = record.audit_kid
            return 200, envelope(call, record.to_json())

        return await run(request, "site.audit_key", work)

    @router.api_route("/sites/{name}/tree-heads", methods=["POST", "PUT"])
    async def record_tree_head(request: Request, name: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _officer(call.caller)
            call.details["site"] = validate_site_name(name)
            body = parse_model(TreeHeadRequest, data)
            head, jws = registry().check_tree_head(name, body.tree_head)
            # This request's audit record is the reconciliation: it carries the other site's
            # head and signature, so an auditor of this log can check both offline.
            call.details.update({**head.claims(), "jws": jws})
            return 200, envelope(call, {"site": name, **head_json(head, jws)})

        return await run(request, "site.tree_head", work)

    return router
