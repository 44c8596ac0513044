"""``/v1/ekms/audit``: the service's own audit log for security officers and auditors.

``export`` streams every record and signed tree head as JSON lines (``kms.audit_export``) for
``ekms audit verify``; ``tree-head`` signs a head now; ``proof`` and ``consistency`` give RFC
9162 proofs against signed heads; ``heads`` lists them with the key that signs them;
``records`` searches and pages through the records (``ekms audit tail``); ``usage`` counts key
operations per hour or day for charts. Each request is audited like any other: its record joins
the log after its answer is computed, so an export never contains the record of its own request.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api.audit_log import Bucket, Decision, RecordQuery, head_json
from api.http import Call, Handler, envelope
from kms.canonical import MAX_SAFE_INTEGER
from kms.errors import InvalidRequestError, PermissionDeniedError
from kms.identity import Role
from kms.policy import parse_choice
from kms.review_service import parse_moment

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kms.access import Identity

NDJSON = "application/x-ndjson"
_AUDIT_ROLES = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR})
_CHUNK_LINES = 512
MAX_PAGE = 1000
MAX_BUCKETS = 2000
_DEFAULT_SPAN = {Bucket.HOUR: 7 * 86_400, Bucket.DAY: 90 * 86_400}
_MAX_TEXT = 256
_RECORD_PARAMS = frozenset(
    {
        "after",
        "before",
        "limit",
        "principal",
        "operation",
        "decision",
        "key",
        "request_id",
        "since",
        "until",
    }
)
_USAGE_PARAMS = frozenset({"bucket", "since", "until", "key"})


def require_auditor(identity: Identity) -> None:
    """Security officers, auditors and the root token; anyone else gets a 403."""
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


def _query(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each at most once and each known: a typo is a 400, not ignored."""
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise InvalidRequestError(f"unknown query parameter {name[:40]!r}; known: {known}")
        if name in params:
            raise InvalidRequestError(f"query parameter {name!r} is given more than once")
        params[name] = value
    return params


def _text(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise InvalidRequestError(f"{name} must be 1 to {_MAX_TEXT} printable characters")
    return value


def _moment(params: dict[str, str], name: str) -> float | None:
    value = params.get(name)
    return None if value is None else parse_moment(value, name)


def parse_record_query(params: dict[str, str]) -> RecordQuery:
    # after=-1 reads forward from the first record (index 0).
    after = -1 if params.get("after") == "-1" else parse_size(params.get("after"), "after")
    before = parse_size(params.get("before"), "before")
    if after is not None and before is not None:
        raise InvalidRequestError(
            "give after (ascending) or before (newest first), not both: they page opposite ways"
        )
    limit = parse_size(params.get("limit"), "limit")
    if limit is not None and not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be from 1 to {MAX_PAGE}, got {limit}")
    operation = _text(params, "operation")
    if operation is not None and "*" in operation[:-1]:
        raise InvalidRequestError(
            "operation may hold '*' only at its end, as a prefix match (transit.*)"
        )
    decision = params.get("decision")
    since, until = _moment(params, "since"), _moment(params, "until")
    if since is not None and until is not None and since >= until:
        raise InvalidRequestError("since must be earlier than until")
    return RecordQuery(
        after=after,
        before=before,
        limit=100 if limit is None else limit,
        principal=_text(params, "principal"),
        operation=operation,
        decision=None if decision is None else parse_choice(Decision, decision, "decision"),
        key=_text(params, "key"),
        request_id=_text(params, "request_id"),
        since=since,
        until=until,
    )


def parse_usage_window(params: dict[str, str], now: float) -> tuple[Bucket, int, int]:
    """The bucket and the window, widened to whole buckets (UTC) and checked."""
    bucket = parse_choice(Bucket, params.get("bucket", "hour"), "bucket")
    width = bucket.seconds
    until = _moment(params, "until")
    since = _moment(params, "since")
    if since is not None and until is not None and since >= until:
        raise InvalidRequestError("since must be earlier than until")
    end = math.ceil((now if until is None else until) / width) * width
    start = end - _DEFAULT_SPAN[bucket] if since is None else math.floor(since / width) * width
    if start >= end:
        raise InvalidRequestError("since must be earlier than until")
    if (end - start) // width > MAX_BUCKETS:
        raise InvalidRequestError(
            f"the window spans {(end - start) // width} {bucket.value}s; at most {MAX_BUCKETS} "
            "buckets: narrow since/until or use bucket=day"
        )
    return bucket, int(start), int(end)


def _chunks(lines: list[bytes]) -> Iterator[bytes]:
    for start in range(0, len(lines), _CHUNK_LINES):
        yield b"".join(line + b"\n" for line in lines[start : start + _CHUNK_LINES])


def build_router(handler: Handler) -> APIRouter:  # noqa: C901, PLR0915 - one closure per path
    router = APIRouter(prefix="/v1/ekms/audit", tags=["audit"])
    runtime = handler.runtime

    async def run(request: Request, operation: str, work: Any, **options: Any) -> Response:
        return await handler.run(request, operation, work, root_only=False, **options)

    @router.get("/export")
    async def export(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
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
            require_auditor(call.caller)
            head, jws = runtime.audit_log.sign_head()
            call.details = {"size": head.size, "root_hash": head.root_hash.hex()}
            return 200, envelope(call, head_json(head, jws))

        return await run(request, "audit.tree-head", work)

    @router.get("/heads")
    async def heads(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
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
            require_auditor(call.caller)
            leaf = parse_size(index, "index") or 0
            size = parse_size(request.query_params.get("size"), "size")
            call.details = {"index": leaf} if size is None else {"index": leaf, "size": size}
            return 200, envelope(call, runtime.audit_log.inclusion(leaf, size))

        return await run(request, "audit.proof", work, key_operation=False, body=False)

    @router.get("/consistency")
    async def consistency(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
            first = parse_size(request.query_params.get("first"), "first")
            second = parse_size(request.query_params.get("second"), "second")
            if first is None:
                raise InvalidRequestError("first is required: the size of the older signed head")
            call.details = (
                {"first": first} if second is None else {"first": first, "second": second}
            )
            return 200, envelope(call, runtime.audit_log.consistency(first, second))

        return await run(request, "audit.consistency", work, key_operation=False, body=False)

    @router.get("/records")
    async def records(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
            params = _query(request, _RECORD_PARAMS)
            query = parse_record_query(params)
            call.details = {name: params[name] for name in sorted(params)}
            return 200, envelope(call, runtime.audit_log.search(query))

        return await run(request, "audit.records", work, key_operation=False, body=False)

    @router.get("/usage")
    async def usage(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            require_auditor(call.caller)
            params = _query(request, _USAGE_PARAMS)
            bucket, since, until = parse_usage_window(params, runtime.clock.now())
            key = _text(params, "key")
            call.details = {"bucket": bucket.value, "since": since, "until": until}
            if key is not None:
                call.details["key"] = key
            data = runtime.audit_log.usage(bucket=bucket, since=since, until=until, key=key)
            return 200, envelope(call, data)

        return await run(request, "audit.usage", work, key_operation=False, body=False)

    return router
