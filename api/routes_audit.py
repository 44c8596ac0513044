"""``/v1/ekms/audit``: the service's own audit log for security officers and auditors.

``export`` streams every record and signed tree head as JSON lines (``kms.audit_export``) for
``ekms audit verify``; ``tree-head`` signs a head now; ``proof`` and ``consistency`` give RFC
9162 proofs against signed heads; ``heads`` lists them with the key that signs them. Each
request is audited like any other: its record joins the log after its answer is computed, so
an export never contains the record of its own request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api.audit_log import head_json
from api.http import Call, Handler, envelope
from kms.canonical import MAX_SAFE_INTEGER
from kms.errors import InvalidRequestError, PermissionDeniedError
from kms.identity import Role

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kms.access import Identity

NDJSON = "application/x-ndjson"
_AUDIT_ROLES = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR})
_CHUNK_LINES = 512


def _auditor(identity: Identity) -> None:
    if not (identity.root or identity.roles & _AUDIT_ROLES):
        raise PermissionDeniedError("the audit log is for security officers and auditors")


def parse_size(value: str | None, name: str) -> int | None:
    """A tree size or index from the URL: decimal digits only, so ``-1`` or ``1e3`` is a 400."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 16) or (
        int(value) > MAX_SAFE_INTEGER
    ):
        raise InvalidRequestError(
            f"{name} must be an integer from 0 to {MAX_SAFE_INTEGER}, got {value[:40]!r}"
        )
    return int(value)


def _chunks(lines: list[bytes]) -> Iterator[bytes]:
    for start in range(0, len(lines), _CHUNK_LINES):
        yield b"".join(line + b"\n" for line in lines[start : start + _CHUNK_LINES])


def build_router(handler: Handler) -> APIRouter:  # noqa: C901 - one closure per path
    router = APIRouter(prefix="/v1/ekms/audit", tags=["audit"])
    runtime = handler.runtime

    async def run(request: Request, operation: str, work: Any, **options: Any) -> Response:
        return await handler.run(request, operation, work, root_only=False, **options)

    @router.get("/export")
    async def export(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _auditor(call.caller)
            result = runtime.audit_log.export()
            call.details = {"records": result.records, "heads": result.heads}
            headers = {"Content-Disposition": 'attachment; filename="ekms-audit.jsonl"'}
            if result.problem is not None:
                call.details["self_check"] = "failed"
                headers["X-Ekms-Audit-Problem"] = result.problem.encode("ascii", "replace").decode()
            return 200, StreamingResponse(_chunks(result.lines), media_type=NDJSON, headers=headers)

        return await run(request, "audit.export", work, key_operation=False, body=False)

    @router.api_route("/tree-head", methods=["POST", "PUT"])
    async def tree_head(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _auditor(call.caller)
            head, jws = runtime.audit_log.sign_head()
            call.details = {"size": head.size, "root_hash": head.root_hash.hex()}
            return 200, envelope(call, head_json(head, jws))

        return await run(request, "audit.tree-head", work)

    @router.get("/heads")
    async def heads(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _auditor(call.caller)
            key = runtime.audit_log.public_key()
            listed = [head_json(head, jws) for head, jws in runtime.audit_log.heads()]
            return 200, envelope(
                call,
                {
                    "heads": listed,
                    "public_key": None if key is None else key.to_json(),
                    "kid": None if key is None else key.thumbprint,
                },
            )

        return await run(request, "audit.heads", work, key_operation=False, body=False)

    @router.get("/proof/{index}")
    async def proof(request: Request, index: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _auditor(call.caller)
            leaf = parse_size(index, "index") or 0
            size = parse_size(request.query_params.get("size"), "size")
            call.details = {"index": leaf} if size is None else {"index": leaf, "size": size}
            return 200, envelope(call, runtime.audit_log.inclusion(leaf, size))

        return await run(request, "audit.proof", work, key_operation=False, body=False)

    @router.get("/consistency")
    async def consistency(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _auditor(call.caller)
            first = parse_size(request.query_params.get("first"), "first")
            second = parse_size(request.query_params.get("second"), "second")
            if first is None:
                raise InvalidRequestError("first is required: the size of the older signed head")
            call.details = (
                {"first": first} if second is None else {"first": first, "second": second}
            )
            return 200, envelope(call, runtime.audit_log.consistency(first, second))

        return await run(request, "audit.consistency", work, key_operation=False, body=False)

    return router
