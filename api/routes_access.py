"""Identities, login, tokens, proposals and restore grants (docs/access-control.md).

Login and token lookup follow Vault's shapes (``auth/jwt/login``, ``auth/token/lookup-self``)
so hvac works unchanged; the rest lives under ``/v1/ekms/``, where Vault has no equivalent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, envelope, parse_model
from kms.errors import InvalidRequestError, PermissionDeniedError
from kms.identity import Role

if TYPE_CHECKING:
    from kms.access import AccessService, Identity, Issued, StoredProposalView
    from kms.approvals import Tally


class LoginRequest(Body):
    jwt: str
    role: str = ""  # accepted for hvac's jwt_login; the principal's registered roles apply


class PrincipalRequest(Body):
    roles: list[str]
    jwk: dict[str, Any]
    display_name: str = ""


class RolesRequest(Body):
    roles: list[str]


class LookupRequest(Body):
    token: str


class ProposalRequest(Body):
    kind: str
    payload: dict[str, Any]


class DecisionRequest(Body):
    signature: str


_REVIEWERS = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR})


def _reviewer(identity: Identity) -> None:
    if not (identity.root or identity.roles & _REVIEWERS):
        raise PermissionDeniedError("reviews are for security officers and auditors")


def auth_json(issued: Issued) -> dict[str, Any]:
    claims = issued.claims
    roles = sorted(r.value for r in claims.roles)
    return {
        "client_token": issued.token,
        "accessor": claims.jti,
        "policies": roles,
        "token_policies": roles,
        "metadata": {"principal": claims.subject},
        "lease_duration": int(claims.lifetime),
        "renewable": False,
        "entity_id": claims.subject,
        "token_type": "service",
        "orphan": True,
        "num_uses": 0 if claims.scope is None else claims.scope.max_uses or 0,
    }


def lookup_json(identity: Identity, now: float) -> dict[str, Any]:
    claims = identity.claims
    if claims is None:  # the opaque root token
        return {
            "accessor": identity.principal,
            "policies": ["root"] if identity.root else [],
            "display_name": "root" if identity.root else "token",
            "ttl": 0,
            "expire_time": None,
            "type": "service",
        }
    return {
        "accessor": claims.jti,
        "entity_id": claims.subject,
        "display_name": claims.subject,
        "policies": sorted(r.value for r in claims.roles),
        "issue_time": int(claims.issued_at),
        "expire_time": int(claims.expires_at),
        "ttl": max(0, int(claims.expires_at - now)),
        "scope": None if claims.scope is None else claims.scope.to_json(),
        "cnf": None if claims.jkt is None else {"jkt": claims.jkt},
        "type": "service",
    }


def proposal_json(stored: StoredProposalView, result: Tally) -> dict[str, Any]:
    return {
        **stored.proposal.to_json(),
        "state": result.state.value if stored.state.value == "pending" else stored.state.value,
        "decided_at": stored.decided_at,
        "approvals": result.approvals,
        "required": result.required,
        "approved_by": list(result.approvers),
        "denied_by": list(result.deniers),
        "uses": stored.uses,
        "max_uses": stored.max_uses,
        "signatures": [
            {"official": a.official, "verdict": a.verdict.value, "signed_at": a.signed_at}
            for a in stored.approvals
        ],
    }


def build_router(handler: Handler) -> APIRouter:  # noqa: C901, PLR0915 - one closure per path
    router = APIRouter(tags=["access"])
    run = handler.run
    runtime = handler.runtime

    def access() -> AccessService:
        return runtime.access

    @router.api_route("/v1/auth/jwt/login", methods=["POST", "PUT"])
    async def login(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(LoginRequest, data)
            issued = access().login(body.jwt)
            call.principal = issued.claims.subject
            call.details["jti"] = issued.claims.jti
            call.admit(issued.admission)
            return 200, {**envelope(call, None), "auth": auth_json(issued)}

        return await run(request, "auth.login", work, authenticated=False)

    @router.get("/v1/auth/token/lookup-self")
    async def lookup_self(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            return 200, envelope(call, lookup_json(call.caller, runtime.clock.now()))

        return await run(request, "auth.lookup-self", work, root_only=False, body=False)

    @router.api_route("/v1/auth/token/lookup", methods=["POST", "PUT"])
    async def lookup(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            _reviewer(call.caller)
            body = parse_model(LookupRequest, data)
            identity, _ = access().authenticate(
                body.token, dpop=None, method="GET", url="", introspect=True
            )
            return 200, envelope(call, lookup_json(identity, runtime.clock.now()))

        return await run(request, "auth.lookup", work, root_only=False)

    @router.api_route("/v1/ekms/tokens/{jti}/revoke", methods=["POST", "PUT"])
    async def revoke_token(request: Request, jti: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["jti"] = jti
            if not access().revoke_token(call.caller, jti):
                raise InvalidRequestError(f"no live token with accessor {jti!r}")
            return 204, None

        return await run(request, "auth.revoke", work, root_only=False, body=False)

    @router.get("/v1/identity/oidc/.well-known/keys")
    async def jwks(request: Request) -> Response:
        def work(_call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            return 200, access().jwks()

        return await run(request, "identity.jwks", work, authenticated=False, body=False)

    # --- principals -----------------------------------------------------------------------

    @router.api_route("/v1/ekms/principals", methods=["GET", "LIST"])
    async def list_principals(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            _reviewer(call.caller)
            found = runtime.store.list_principals()
            return 200, envelope(
                call,
                {"keys": [p.id for p in found], "key_info": {p.id: p.to_json() for p in found}},
            )

        return await run(request, "identity.list", work, root_only=False, body=False)

    @router.get("/v1/ekms/principals/{principal_id}")
    async def read_principal(request: Request, principal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            if call.caller.principal != principal_id:
                _reviewer(call.caller)
            found = access().get_principal(principal_id)
            return 200, envelope(call, found.to_json())

        return await run(request, "identity.read", work, root_only=False, body=False)

    @router.api_route("/v1/ekms/principals/{principal_id}", methods=["POST", "PUT"])
    async def create_principal(request: Request, principal_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(PrincipalRequest, data)
            call.details["target"] = principal_id
            created = access().register(
                call.caller,
                principal_id,
                roles=body.roles,
                jwk=body.jwk,
                display_name=body.display_name,
            )
            call.details["roles"] = sorted(r.value for r in created.roles)
            return 200, envelope(call, created.to_json())

        return await run(request, "identity.create", work, root_only=False)

    @router.api_route("/v1/ekms/principals/{principal_id}/roles", methods=["POST", "PUT"])
    async def set_roles(request: Request, principal_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(RolesRequest, data)
            call.details["target"] = principal_id
            updated = access().set_roles(call.caller, principal_id, body.roles)
            call.details["roles"] = sorted(r.value for r in updated.roles)
            return 200, envelope(call, updated.to_json())

        return await run(request, "identity.roles", work, root_only=False)

    @router.api_route("/v1/ekms/principals/{principal_id}/disable", methods=["POST", "PUT"])
    async def disable(request: Request, principal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["target"] = principal_id
            return 200, envelope(call, access().disable(call.caller, principal_id).to_json())

        return await run(request, "identity.disable", work, root_only=False, body=False)

    @router.api_route("/v1/ekms/principals/{principal_id}/enable", methods=["POST", "PUT"])
    async def enable(request: Request, principal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["target"] = principal_id
            return 200, envelope(call, access().enable(call.caller, principal_id).to_json())

        return await run(request, "identity.enable", work, root_only=False, body=False)

    @router.api_route("/v1/ekms/principals/{principal_id}/revoke-tokens", methods=["POST", "PUT"])
    async def revoke_tokens(request: Request, principal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["target"] = principal_id
            updated = access().revoke_tokens_of(call.caller, principal_id)
            return 200, envelope(call, updated.to_json())

        return await run(request, "identity.revoke-tokens", work, root_only=False, body=False)

    # --- proposals and restore grants ------------------------------------------------------

    @router.api_route("/v1/ekms/proposals", methods=["POST", "PUT"])
    async def propose(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(ProposalRequest, data)
            proposal = access().propose(call.caller, body.kind, body.payload)
            call.details["proposal"] = proposal.id
            call.details["kind"] = proposal.kind.value
            stored, result = access().proposal(call.caller, proposal.id)
            return 200, envelope(call, proposal_json(stored, result))

        return await run(request, "proposal.create", work, root_only=False)

    @router.api_route("/v1/ekms/proposals", methods=["GET", "LIST"])
    async def list_proposals(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            query = request.query_params
            unknown = sorted(set(query) - {"list", "kind", "state", "limit"})
            if unknown:
                raise InvalidRequestError(f"unknown query parameter {unknown[0]!r}")
            listed = access().list_proposals(
                call.caller,
                kind=query.get("kind"),
                state=query.get("state"),
                limit=query.get("limit", "100"),
            )
            if not listed:
                return 404, {"errors": []}  # Vault's answer to an empty LIST
            return 200, envelope(
                call,
                {
                    "keys": [stored.proposal.id for stored, _ in listed],
                    "key_info": {
                        stored.proposal.id: proposal_json(stored, result)
                        for stored, result in listed
                    },
                },
            )

        return await run(request, "proposal.list", work, root_only=False, body=False)

    @router.get("/v1/ekms/proposals/{proposal_id}")
    async def read_proposal(request: Request, proposal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            stored, result = access().proposal(call.caller, proposal_id)
            return 200, envelope(call, proposal_json(stored, result))

        return await run(request, "proposal.read", work, root_only=False, body=False)

    @router.api_route("/v1/ekms/proposals/{proposal_id}/decide", methods=["POST", "PUT"])
    async def decide(request: Request, proposal_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(DecisionRequest, data)
            call.details["proposal"] = proposal_id
            result = access().decide(call.caller, proposal_id, body.signature)
            call.details["state"] = result.state.value
            stored, result = access().proposal(call.caller, proposal_id)
            return 200, envelope(call, proposal_json(stored, result))

        return await run(request, "proposal.decide", work, root_only=False)

    @router.api_route("/v1/ekms/proposals/{proposal_id}/credential", methods=["POST", "PUT"])
    async def credential(request: Request, proposal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["proposal"] = proposal_id
            issued = access().credential(call.caller, proposal_id)
            call.details["jti"] = issued.claims.jti
            call.admit(issued.admission)
            return 200, {**envelope(call, None), "auth": auth_json(issued)}

        return await run(request, "proposal.credential", work, root_only=False, body=False)

    @router.api_route("/v1/ekms/proposals/{proposal_id}/revoke", methods=["POST", "PUT"])
    async def revoke_grant(request: Request, proposal_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["proposal"] = proposal_id
            revoked = access().revoke_grant(call.caller, proposal_id)
            return 200, envelope(call, {"revoked_tokens": revoked})

        return await run(request, "proposal.revoke", work, root_only=False, body=False)

    @router.get("/v1/ekms/status")
    async def status(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            return 200, envelope(call, access().status())

        return await run(request, "ekms.status", work, root_only=False, body=False)

    return router
