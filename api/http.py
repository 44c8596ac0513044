"""Request plumbing shared by the routers: body limits, validation, auth, audit, envelopes.

Every route goes through ``Handler.run``: seal check, token check, body parsing, the work, then
the audit record, which must be committed before the answer leaves (fail closed).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api.errors import PayloadTooLargeError, error_response, status_for
from kms.access import Identity
from kms.audit import Admission, AuditRecord
from kms.errors import (
    AuditError,
    AuthenticationError,
    EkmsError,
    InvalidRequestError,
    PermissionDeniedError,
    SealedError,
)
from kms.tokens import ROOT_POLICY, hash_token

if TYPE_CHECKING:
    from api.runtime import Runtime

M = TypeVar("M", bound=BaseModel)
_MAX_TOKEN_CHARS = 8192
JSON = "application/json"


class Body(BaseModel):
    """Request bodies: unknown fields are refused; Vault's string-typed numbers are accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validation_message(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field {where!r}")
        elif item["type"] == "missing":
            problems.append(f"missing required field {where!r}")
        else:
            problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def parse_model(model: type[M], data: object) -> M:
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc)) from None


@dataclass
class Call:
    """What one request did, gathered for its audit record."""

    request_id: str
    operation: str
    path: str
    principal: str | None = None
    key: str | None = None
    version: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    identity: Identity | None = None
    admission: Admission | None = None

    def admit(self, extra: Admission | None) -> None:
        """Add conditions to be checked, and effects written, with this request's audit record."""
        if extra is None:
            return
        if self.admission is None:
            self.admission = extra
            return
        self.admission = Admission(
            once=self.admission.once + extra.once,
            use_of=extra.use_of or self.admission.use_of,
            uses=extra.uses if extra.use_of else self.admission.uses,
            issued=extra.issued or self.admission.issued,
        )

    @property
    def caller(self) -> Identity:
        if self.identity is None:
            raise PermissionDeniedError("no token presented")
        return self.identity


def envelope(call: Call, data: Any, warnings: list[str] | None = None) -> dict[str, Any]:
    return {
        "request_id": call.request_id,
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": None,
    }


def json_response(status: int, payload: Any, request_id: str) -> Response:
    """The answer; ``payload`` may be a ready ``Response`` (an export's JSON lines, say)."""
    if isinstance(payload, Response):
        payload.headers["X-Request-Id"] = request_id
        return payload
    if status == 204:
        return Response(status_code=204, headers={"X-Request-Id": request_id})
    return Response(
        orjson.dumps(payload),
        status_code=status,
        media_type=JSON,
        headers={"X-Request-Id": request_id},
    )


Work = Callable[[Call, dict[str, Any]], tuple[int, Any]]


class Handler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise InvalidRequestError("client disconnected before sending the body") from None
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("request body must be a JSON object")
        return data

    def authenticate(self, request: Request, call: Call, *, root_only: bool = False) -> None:
        token = request.headers.get("x-vault-token")
        if token is None:
            auth = request.headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() in ("bearer", "dpop"):  # RFC 6750, RFC 9449
                token = value.strip()
        if not token:
            raise PermissionDeniedError("no token presented")
        if len(token) > _MAX_TOKEN_CHARS:
            raise PermissionDeniedError("token too long")
        if token.count(".") == 2 and token.startswith("eyJ"):
            identity, admission = self.runtime.access.authenticate(
                token,
                dpop=request.headers.get("dpop"),
                method=request.method,
                url=self.public_url(request),
            )
            call.admit(admission)
            if identity.claims is not None and identity.claims.scope is not None:
                call.details["grant"] = identity.claims.scope.request_id
        else:
            if len(token) > 512:
                raise PermissionDeniedError("token too long")
            found = self.runtime.store.find_token(hash_token(token))
            if found is None:
                raise PermissionDeniedError("unknown or revoked token")
            identity = Identity(found[0], frozenset(), root=ROOT_POLICY in found[1])
        call.identity = identity
        call.principal = identity.principal
        if root_only and not identity.root:
            raise PermissionDeniedError("operation needs the root token")

    def public_url(self, request: Request) -> str:
        """The URL as the client addressed it, for a DPoP proof's ``htu``."""
        base = self.settings.public_url
        if base:
            return base.rstrip("/") + str(request.scope["path"])
        scheme = request.scope.get("scheme", "http")
        host = request.headers.get("host", "")
        return f"{scheme}://{host}{request.scope['path']!s}"

    async def run(
        self,
        request: Request,
        operation: str,
        work: Work,
        *,
        key_operation: bool = True,
        authenticated: bool = True,
        root_only: bool = True,
        body: bool = True,
    ) -> Response:
        call = Call(request_id=str(uuid.uuid4()), operation=operation, path=request.scope["path"])
        decision, reason = "allow", None
        try:
            if key_operation and self.runtime.barrier.sealed:
                raise SealedError
            self.runtime.store.begin_request()
            if authenticated:
                self.authenticate(request, call, root_only=root_only)
            data = await self.read_json(request) if body else {}
            status, payload = work(call, data)
        except EkmsError as exc:
            status = status_for(exc, call.path)
            decision = "deny" if isinstance(exc, (PermissionDeniedError, SealedError)) else "error"
            reason = exc.reason if isinstance(exc, PermissionDeniedError) else str(exc)
            payload = {"errors": [str(exc)]}
            if isinstance(exc, PermissionDeniedError):
                payload["request_id"] = call.request_id
            if call.admission is not None:  # one-time ids stay spent; nothing else takes effect
                call.admission = Admission(once=call.admission.once)
        record = AuditRecord(
            time=self.runtime.clock.now(),
            request_id=call.request_id,
            node=self.settings.node_name,
            operation=operation,
            decision=decision,
            status=status,
            principal=call.principal,
            path=call.path,
            key=call.key,
            version=call.version,
            reason=reason,
            details=call.details,
        )
        try:
            refusal = await self.runtime.audit.write(record, call.admission)
        except AuditError as exc:
            return error_response(503, str(exc))
        if refusal is not None:
            refused = (
                AuthenticationError(refusal.reason)
                if refusal.status == 401
                else PermissionDeniedError(refusal.reason)
            )
            payload = {"errors": [str(refused)], "request_id": call.request_id}
            return json_response(refusal.status, payload, call.request_id)
        return json_response(status, payload, call.request_id)

    def context_hash(self, context: bytes) -> str | None:
        return self.runtime.barrier.context_hash(context) if context else None
