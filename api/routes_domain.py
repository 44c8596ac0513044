"""``/v1/ekms/domain``: the security-domain backup over HTTP (docs/adr/0012 §4, §5).

- ``POST export {"target_site": NAME}`` (root or a security officer, unsealed): the signed,
  MACed document for a registered site, with the KEKs its kind may ever hold.
- ``POST load`` (the document; no token, like ``sys/init``): on a new node only. The node
  takes the backup's share set and keeps the backup; it is then initialised and sealed, and
  imports it at its first unseal (``api.domain_service``).
- ``POST import`` (the document; root or a security officer, unsealed): refresh a site with
  a newer backup of its own domain; only what it lacks is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from api.domain_service import export_backup, import_details, load_backup, refresh_backup
from api.http import Body, Call, Handler, envelope, parse_model
from kms.errors import PermissionDeniedError
from kms.identity import Role

if TYPE_CHECKING:
    from kms.access import Identity


class ExportRequest(Body):
    target_site: str = Field(max_length=64)


def _require_officer(identity: Identity, what: str) -> None:
    if not (identity.root or identity.has(Role.SECURITY_OFFICER)):
        raise PermissionDeniedError(f"{what} is for a security officer or root")


def build_router(handler: Handler) -> APIRouter:
    router = APIRouter(prefix="/v1/ekms/domain", tags=["domain"])
    runtime = handler.runtime

    @router.post("/export")
    async def export(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _require_officer(call.caller, "exporting the domain backup")
            body = parse_model(ExportRequest, data)
            call.details = {"target": body.target_site}
            backup, skipped = export_backup(runtime, body.target_site)
            summary = backup.summary()
            call.details = {
                "target": body.target_site,
                "target_kind": backup.target.kind.value,
                "backup_id": backup.backup_id,
                "digest": backup.digest,
                "keys": summary["keys"],
                "versions": summary["versions"],
                "skipped": skipped,
            }
            answer = {"backup": backup.document, "summary": summary, "skipped": skipped}
            return 200, envelope(call, answer, skipped or None)

        return await handler.run(request, "domain.export", work, root_only=False)

    @router.post("/load")
    async def load(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            backup = load_backup(runtime, data)
            summary = backup.summary()
            call.details = summary
            return 200, envelope(call, {"initialized": True, "sealed": True, **summary})

        return await handler.run(
            request, "domain.load", work, key_operation=False, authenticated=False
        )

    @router.post("/import")
    async def refresh(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _require_officer(call.caller, "importing a domain backup")
            call.details = {"backup_id": str(data.get("backup_id"))[:64]}  # until parsed
            backup, report = refresh_backup(runtime, data)
            call.details = import_details(backup, report, at="refresh")
            return 200, envelope(call, {**backup.summary(), **report.to_json()})

        return await handler.run(request, "domain.import", work, root_only=False)

    return router
