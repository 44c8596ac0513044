"""``/v1/ekms/ceremonies``: what a ceremony runner needs to start, and where its transcript lands.

``GET service`` answers before anyone can log in (the service may be sealed or uninitialised
when a ceremony starts): the audience that login assertions and signatures must name, the seal
state, the quorum sizes, and the audit key that signs transcripts.

``POST transcripts`` takes a finished (or aborted) ceremony's transcript with its participants'
signatures. Each signature must verify under the key the principal registry holds for that
participant, and that key must be the one the transcript names. The service then signs the
transcript's digest with its HSM audit key and appends a ``ceremony.transcript`` audit record
holding the digest, the ceremony, its outcome, the participants, a one-line summary of each step
and the whole transcript (at most 256 KiB as canonical JSON; it never holds a share or a token).
The record, like any other, gets inclusion proofs under the signed tree heads, so an auditor's
export carries every ceremony's transcript and its digest can be recomputed offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from api.audit_log import AUDIT_SIGNING_KEY, HEAD_ALG
from api.http import Body, Call, Handler, envelope, parse_model
from ceremonies import transcript as transcripts
from kms import jose
from kms.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)

if TYPE_CHECKING:
    from api.runtime import Runtime


class Signature(Body):
    principal: str = Field(max_length=64)
    jws: str = Field(max_length=jose.MAX_TOKEN_LENGTH)


class TranscriptRequest(Body):
    transcript: dict[str, Any]
    signatures: list[Signature] = Field(max_length=transcripts.MAX_PARTICIPANTS)


def _check_signatures(
    runtime: Runtime, summary: transcripts.Summary, signatures: list[Signature]
) -> list[str]:
    """The signers, each checked against the registry; refuses the transcript otherwise."""
    listed = {str(p["principal"]): p for p in summary.participants}
    audience = runtime.access.config.audience
    signers: list[str] = []
    for signature in signatures:
        participant = listed.get(signature.principal)
        if participant is None:
            raise InvalidRequestError(f"{signature.principal!r} is not a participant")
        if signature.principal in signers:
            raise InvalidRequestError(f"{signature.principal!r} signed twice")
        try:
            registered = runtime.access.get_principal(signature.principal)
        except NotFoundError:
            raise InvalidRequestError(
                f"participant {signature.principal!r} is not a registered principal"
            ) from None
        if not registered.active:
            raise InvalidRequestError(f"participant {signature.principal!r} is disabled")
        if registered.thumbprint != participant["thumbprint"]:
            raise InvalidRequestError(
                f"participant {signature.principal!r}: the transcript names another key than "
                "the one registered"
            )
        try:
            transcripts.check_signature(
                signature.jws,
                jose.parse_public_jwk(dict(registered.jwk)),
                principal=signature.principal,
                body_digest=summary.digest,
                ceremony=summary.ceremony,
                audience=audience,
            )
        except AuthenticationError as exc:
            raise InvalidRequestError(
                f"the signature of {signature.principal!r} does not verify ({exc.reason})"
            ) from None
        signers.append(signature.principal)
    if summary.outcome == "completed" and set(signers) != set(listed):
        missing = ", ".join(sorted(set(listed) - set(signers)))
        raise InvalidRequestError(
            f"a completed ceremony needs every participant's signature: {missing}"
        )
    if not signers:
        raise InvalidRequestError("a transcript needs at least one participant's signature")
    return signers


def _sign(runtime: Runtime, claims: dict[str, Any]) -> tuple[str, jose.PublicJwk]:
    """The service's signature with the audit key, the key auditors already hold."""
    if runtime.audit_log.public_key() is None:
        runtime.audit_log.sign_head()  # creates the audit key, as the first head does
    key = runtime.audit_log.public_key()
    assert key is not None
    policy = runtime.keys.policy(AUDIT_SIGNING_KEY)

    def sign(signing_input: bytes) -> bytes:
        return runtime.keys.sign_jws(policy, signing_input)[0]

    header = {"alg": HEAD_ALG, "kid": key.thumbprint, "typ": transcripts.SERVICE_SIGNATURE_TYPE}
    return jose.encode_jws(header, claims, sign), key


def build_router(handler: Handler) -> APIRouter:
    router = APIRouter(prefix="/v1/ekms/ceremonies", tags=["ceremonies"])
    runtime = handler.runtime

    @router.get("/service")
    async def service(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            assert runtime.seal_control is not None
            status = runtime.seal_control.status()
            config = runtime.access.config
            key = runtime.audit_log.public_key()
            return 200, envelope(
                call,
                {
                    "audience": config.audience,
                    "site": config.site.name,
                    "site_kind": config.site.kind.value,
                    "initialized": status.initialized,
                    "sealed": status.sealed,
                    "threshold": status.threshold,
                    "shares": status.shares,
                    "approvals_required": config.approvals_required,
                    "transcript_key": None if key is None else key.to_json(),
                    "kid": None if key is None else key.thumbprint,
                },
            )

        return await handler.run(
            request, "ceremony.service", work, key_operation=False, authenticated=False, body=False
        )

    @router.post("/transcripts")
    async def submit(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(TranscriptRequest, data)
            summary = transcripts.Summary.of(body.transcript)
            signers = _check_signatures(runtime, summary, body.signatures)
            caller = call.caller
            if not (caller.root or caller.principal in signers):
                raise PermissionDeniedError("transcripts are submitted by one of their signers")
            participants = [
                {k: p.get(k) for k in ("principal", "role", "thumbprint")}
                for p in summary.participants
            ]
            call.details = {
                "ceremony": summary.ceremony,
                "script": summary.script,
                "script_sha256": summary.script_sha256,
                "digest": summary.digest,
                "outcome": summary.outcome,
                "rehearsal": summary.rehearsal,
                "participants": participants,
                "signers": signers,
                "steps": list(summary.steps),
                "transcript": body.transcript,
            }
            claims = {
                "iss": runtime.access.config.audience,
                "ceremony": summary.ceremony,
                "script": summary.script,
                "script_sha256": summary.script_sha256,
                "digest": summary.digest,
                "outcome": summary.outcome,
                "rehearsal": summary.rehearsal,
                "signers": signers,
                "iat": int(runtime.clock.now()),
                "request_id": call.request_id,
            }
            jws, key = _sign(runtime, claims)
            return 200, envelope(
                call,
                {
                    "jws": jws,
                    "kid": key.thumbprint,
                    "public_key": key.to_json(),
                    "digest": summary.digest,
                    "request_id": call.request_id,
                },
            )

        return await handler.run(request, "ceremony.transcript", work, root_only=False)

    return router
