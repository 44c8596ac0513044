"""Who may do what: login, access tokens, principals, proposals, restore grants, emergencies.

The service's signing key is an ecdsa-p256 key in the HSM under a system name that no API
caller can address (``kms.keys.SYSTEM_KEY_PREFIX``). Rotating it adds a version; every active
version stays in the JWKS, so tokens signed before a rotation verify until they expire.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from kms import jose
from kms.approvals import (
    Approval,
    Proposal,
    ProposalKind,
    ProposalState,
    ReasonCode,
    Tally,
    check_approval_claims,
    tally,
)
from kms.audit import Admission, IssuedTokenRow
from kms.credentials import TOKEN_TYPE, AccessClaims, Scope
from kms.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from kms.identity import (
    MACHINE_ROLES,
    QUORUM_ROLES,
    Principal,
    Role,
    parse_roles,
    validate_principal_id,
)
from kms.keys import SYSTEM_KEY_PREFIX, Classification, KeyPolicy, KeyType
from kms.policy import (
    Operation,
    RestoreMatrix,
    Site,
    check_scoped_use,
    check_writer_use,
    is_manifest_key,
    parse_choice,
)
from kms.sites import SITE_PAYLOAD_FIELDS, SITE_PROPOSALS

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from kms.ports import Clock
    from kms.service import KeyService
    from kms.sites import SiteRegistry

SIGNING_KEY = SYSTEM_KEY_PREFIX + "token-signing"
# How long after its ``iat`` a DPoP proof's one-time id is kept. A constant, not configuration:
# the store keys one-time ids by this time, so every node must compute the same key for the
# same proof, or a replay sent to another node would pass.
DPOP_RETENTION = 180.0
_VERIFIED_CACHE_LIMIT = 4096
_MAX_JUSTIFICATION = 2000
_MAX_LISTED = 1000
_KEY_ADMINS = frozenset({Role.SECURITY_OFFICER})
_KEY_READERS = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR, Role.OFFICIAL})


class StoredProposalView(Protocol):
    @property
    def proposal(self) -> Proposal: ...
    @property
    def state(self) -> ProposalState: ...
    @property
    def decided_at(self) -> float | None: ...
    @property
    def uses(self) -> int: ...
    @property
    def max_uses(self) -> int | None: ...
    @property
    def approvals(self) -> tuple[Approval, ...]: ...


class IdentityStore(Protocol):
    """What access control needs from the metadata store (``storage.sql_store.SqlStore``)."""

    def principal(self, principal_id: str) -> Principal | None: ...
    def list_principals(self) -> list[Principal]: ...
    def insert_principal(self, principal: Principal) -> None: ...
    def update_principal(self, principal: Principal) -> None: ...
    def revoked_jtis(self) -> frozenset[str]: ...
    def revoke_jtis(
        self,
        at: float,
        *,
        jti: str | None = None,
        proposal_id: str | None = None,
        principal: str | None = None,
    ) -> int: ...
    def insert_proposal(self, proposal: Proposal, *, max_uses: int | None) -> None: ...
    def proposal(self, proposal_id: str) -> StoredProposalView | None: ...
    def list_proposals(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        party: str | None = None,
        limit: int = 200,
    ) -> Sequence[StoredProposalView]: ...
    def add_approval(self, approval: Approval) -> None: ...
    def set_proposal_state(
        self, proposal_id: str, state: ProposalState, at: float, *, expect: ProposalState
    ) -> bool: ...
    def emergency(self, now: float) -> dict[str, Any] | None: ...
    def declare_emergency(self, proposal_id: str, at: float, ends_at: float) -> None: ...
    def end_emergency(self, at: float, ended_by: str) -> int: ...


@dataclass(frozen=True)
class AccessConfig:
    issuer: str
    audience: str
    site: Site
    matrix: RestoreMatrix
    token_ttl: float = 3600.0
    tool_token_ttl: float = 900.0  # restore tools: at most 15 minutes by default
    approvals_required: int = 2
    proposal_ttl: float = 86_400.0
    max_restore_window: float = 86_400.0
    max_emergency: float = 72 * 3600.0
    dpop_max_age: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.dpop_max_age <= DPOP_RETENTION - 2 * jose.DPOP_LEEWAY:
            raise InvalidRequestError(
                f"dpop_max_age must be between 0 and {DPOP_RETENTION - 2 * jose.DPOP_LEEWAY} s"
            )


@dataclass(frozen=True)
class Identity:
    """Who is calling: the break-glass root token, or a principal's access token."""

    principal: str
    roles: frozenset[Role]
    root: bool = False
    claims: AccessClaims | None = None

    def has(self, role: Role) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Issued:
    token: str
    claims: AccessClaims
    admission: Admission


@dataclass
class _KeyRing:
    policy: KeyPolicy | None = None
    keys: dict[str, jose.PublicJwk] = field(default_factory=dict)


def once_id(kind: str, *parts: str) -> bytes:
    """The stored form of a one-time id: a hash, so the table reveals nothing."""
    return hashlib.sha256("\x00".join((kind, *parts)).encode()).digest()


class AccessService:
    def __init__(
        self,
        *,
        keys: KeyService,
        store: IdentityStore,
        clock: Clock,
        config: AccessConfig,
        sites: SiteRegistry | None = None,
    ) -> None:
        self._keys = keys
        self._store = store
        self._clock = clock
        self.config = config
        self._sites = sites  # site proposals and the status gate on restore credentials
        self._ring = _KeyRing()
        self._verified: dict[bytes, AccessClaims] = {}

    # --- signing key and JWKS ----------------------------------------------------------

    def _signing_policy(self) -> KeyPolicy:
        try:
            return self._keys.policy(SIGNING_KEY)
        except NotFoundError:
            pass
        try:
            return self._keys.create_key(SIGNING_KEY, KeyType.ECDSA_P256, Classification.SECRET)
        except ConflictError:  # another worker or node created it first
            return self._keys.policy(SIGNING_KEY)

    def _key_ring(self) -> _KeyRing:
        policy = self._signing_policy()
        ring = self._ring
        if ring.policy is not policy:
            keys: dict[str, jose.PublicJwk] = {}
            for version in policy.versions.values():
                if version.public_key is None or version.state.value != "active":
                    continue
                jwk = jose.ec_jwk_from_der(version.public_key)
                keys[jwk.thumbprint] = jwk
            ring = self._ring = _KeyRing(policy, keys)
        return ring

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {**jwk.to_json(), "kid": kid, "alg": "ES256", "use": "sig"}
                for kid, jwk in sorted(self._key_ring().keys.items())
            ]
        }

    def _mint(
        self,
        principal: Principal,
        *,
        roles: frozenset[Role],
        ttl: float,
        scope: Scope | None = None,
        bind: bool = False,
    ) -> Issued:
        ring = self._key_ring()
        assert ring.policy is not None
        latest = ring.policy.versions[ring.policy.latest_version]
        assert latest.public_key is not None
        kid = jose.ec_jwk_from_der(latest.public_key).thumbprint
        now = float(int(self._clock.now()))
        claims = AccessClaims(
            issuer=self.config.issuer,
            subject=principal.id,
            audience=self.config.audience,
            issued_at=now,
            not_before=now,
            expires_at=now + int(ttl),
            jti=str(uuid.uuid4()),
            roles=roles,
            scope=scope,
            jkt=principal.thumbprint if bind else None,
        )
        header = {"alg": "ES256", "typ": TOKEN_TYPE, "kid": kid}
        policy = ring.policy

        def sign(signing_input: bytes) -> bytes:
            return self._keys.sign_jws(policy, signing_input)[0]

        token = jose.encode_jws(header, claims.to_json(), sign)
        row = IssuedTokenRow(
            jti=claims.jti,
            principal=principal.id,
            roles=tuple(sorted(r.value for r in roles)),
            scope=None if scope is None else scope.to_json(),
            proposal_id=None if scope is None else scope.request_id,
            jkt=claims.jkt,
            issued_at=claims.issued_at,
            expires_at=claims.expires_at,
        )
        return Issued(token, claims, Admission(issued=row))

    # --- login ---------------------------------------------------------------------------

    def login(self, assertion: str) -> Issued:
        """RFC 7523 ``private_key_jwt``: the assertion's ``jti`` is consumed with the audit."""
        issuer = jose.unverified_issuer(assertion)
        principal = self._store.principal(issuer)
        if principal is None or not principal.active:
            raise AuthenticationError("unknown or disabled principal")
        key = jose.parse_public_jwk(dict(principal.jwk))
        now = self._clock.now()
        claims = jose.verify_client_assertion(
            assertion,
            key,
            principal_id=principal.id,
            audience=self.config.audience,
            now=now,
        )
        machine = bool(principal.roles & MACHINE_ROLES)
        ttl = self.config.tool_token_ttl if machine else self.config.token_ttl
        issued = self._mint(principal, roles=principal.roles, ttl=ttl, bind=machine)
        keep_until = claims.expires_at + 60
        return Issued(
            issued.token,
            issued.claims,
            Admission(
                once=((once_id("assertion", principal.id, claims.jti), keep_until),),
                issued=issued.admission.issued,
            ),
        )

    # --- presenting a token --------------------------------------------------------------

    def authenticate(
        self, token: str, *, dpop: str | None, method: str, url: str, introspect: bool = False
    ) -> tuple[Identity, Admission | None]:
        """Verify a presented token. ``introspect``: an officer looking at a token, no proof."""
        now = self._clock.now()
        claims = self._verified_claims(token, now)
        if claims.jti in self._store.revoked_jtis():
            raise AuthenticationError("token revoked")
        principal = self._store.principal(claims.subject)
        if principal is None or not principal.active:
            raise AuthenticationError("principal unknown or disabled")
        if claims.issued_at < principal.tokens_valid_after:
            raise AuthenticationError("every token of this principal was revoked")
        admission = None
        if claims.jkt is not None and not introspect:
            if not dpop:
                raise AuthenticationError("DPoP proof required for this token")
            proof = jose.verify_dpop_proof(
                dpop,
                method=method,
                url=url,
                access_token=token,
                expected_thumbprint=claims.jkt,
                now=now,
                max_age=self.config.dpop_max_age,
            )
            keep_until = proof.issued_at + DPOP_RETENTION
            admission = Admission(once=((once_id("dpop", claims.jkt, proof.jti), keep_until),))
        roles = claims.roles & principal.roles  # a role removed since issue no longer counts
        return Identity(principal.id, roles, claims=claims), admission

    def _verified_claims(self, token: str, now: float) -> AccessClaims:
        digest = hashlib.sha256(token.encode()).digest()
        claims = self._verified.get(digest)
        if claims is None:
            jws = jose.parse_jws(token)
            kid = jws.header.get("kid")
            key = self._key_ring().keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthenticationError("token signed by an unknown key")
            jose.verify_jws(jws, key, typ=TOKEN_TYPE)
            claims = AccessClaims.from_verified(jws.claims)
            if len(self._verified) >= _VERIFIED_CACHE_LIMIT:
                self._verified.clear()
            self._verified[digest] = claims
        claims.check_time(issuer=self.config.issuer, audience=self.config.audience, now=now)
        return claims

    def forget_verified(self) -> None:
        """On seal: nothing verified before may be trusted after."""
        self._verified.clear()
        self._ring = _KeyRing()

    # --- key operations by scoped credentials -----------------------------------------

    def authorise_key_use(
        self, identity: Identity, *, operation: Operation, policy: KeyPolicy, items: int = 1
    ) -> Admission | None:
        """Root may do anything; a restore credential may decrypt within its grant; a backup
        writer may make new data keys and sign manifests (``check_writer_use``), nothing else.

        ``items`` is how many data keys the request unwraps: a grant's ``max_uses`` counts
        unwraps, not requests, so a batch cannot stretch it. A grant without ``max_uses`` is
        not counted at commit (its uses are in the audit log, each record naming the grant):
        that saves a row write per request, and its revocation is checked when the request
        starts, as for any token (ADR 0007).
        """
        if identity.root:
            return None
        if identity.has(Role.BACKUP_WRITER):
            verdict = check_writer_use(operation, policy)
            if not verdict:
                raise PermissionDeniedError(getattr(verdict, "reason", "denied"))
            return None
        claims = identity.claims
        if claims is None or claims.scope is None or not identity.has(Role.RESTORE_TOOL):
            raise PermissionDeniedError("token carries no key scope")
        now = self._clock.now()
        decision = check_scoped_use(
            claims,
            operation=operation,
            dataset=policy.name,
            classification=policy.classification,
            site=self.config.site,
            matrix=self.config.matrix,
            emergency=self._store.emergency(now) is not None,
        )
        if not decision:
            raise PermissionDeniedError(getattr(decision, "reason", "denied"))
        if claims.scope.max_uses is None:
            return None
        return Admission(use_of=claims.scope.request_id, uses=items)

    def authorise_key_read(self, identity: Identity, name: str) -> None:
        """Reviewers read every key; backup writers and restore tools read manifest keys only.

        A manifest key's description carries its public keys, which the restore tool needs to
        verify a manifest offline; the name is checked before any lookup, so a machine learns
        nothing about other keys, not even whether they exist.
        """
        if identity.roles & MACHINE_ROLES and not identity.root:
            if not is_manifest_key(name):
                raise PermissionDeniedError("machines read only manifest signing keys")
            return
        self.authorise_key_admin(identity, change=False)

    def authorise_key_admin(self, identity: Identity, *, change: bool) -> None:
        """Key lifecycle without the root token: officers manage keys, reviewers read them.

        Creating, rotating and configuring keys loses no data and is audited, so a security
        officer does it. Deleting a key (or allowing it) destroys every backup under it, so it
        stays break-glass: a root token, which only a quorum of shares can generate.
        """
        if identity.root:
            return
        allowed = _KEY_ADMINS if change else _KEY_READERS
        if not identity.roles & allowed:
            action = "change" if change else "read"
            raise PermissionDeniedError(f"may not {action} key metadata")

    # --- principals ----------------------------------------------------------------------

    def register(
        self,
        actor: Identity,
        principal_id: str,
        *,
        roles: Sequence[object],
        jwk: object,
        display_name: str = "",
    ) -> Principal:
        principal_id = validate_principal_id(principal_id)
        wanted = parse_roles(roles)
        key = jose.parse_public_jwk(jwk)
        if wanted & QUORUM_ROLES and not self._may_bootstrap_official(actor):
            raise PermissionDeniedError(
                "officials are added by a quorum of officials (proposal add-official)"
            )
        if not (wanted & QUORUM_ROLES) and not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("principals are managed by security officers")
        principal = Principal(
            id=principal_id,
            roles=wanted,
            jwk=dict(key.members),
            thumbprint=key.thumbprint,
            created_at=self._clock.now(),
            created_by=actor.principal,
            display_name=_display_name(display_name),
        )
        self._store.insert_principal(principal)
        return principal

    def _may_bootstrap_official(self, actor: Identity) -> bool:
        """The root token may register the first M + 1 officials, no more.

        M + 1, because the proposer of a change never counts towards its quorum: with only M
        officials no official's proposal could ever be approved. After that, officials are
        added only by a quorum of officials.
        """
        return actor.root and len(self._officials()) <= self.config.approvals_required

    def _officials(self) -> frozenset[str]:
        return frozenset(p.id for p in self._store.list_principals() if p.has(Role.OFFICIAL))

    def set_roles(self, actor: Identity, principal_id: str, roles: Sequence[object]) -> Principal:
        current = self._require_principal(principal_id)
        wanted = parse_roles(roles)
        if (wanted ^ current.roles) & QUORUM_ROLES:
            raise PermissionDeniedError(
                "granting or removing the official role needs a quorum (proposal)"
            )
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("principals are managed by security officers")
        updated = replace(current, roles=wanted)
        self._store.update_principal(updated)
        return updated

    def disable(self, actor: Identity, principal_id: str) -> Principal:
        current = self._require_principal(principal_id)
        if current.roles & QUORUM_ROLES:
            raise PermissionDeniedError("removing an official needs a quorum (proposal)")
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("principals are managed by security officers")
        now = self._clock.now()
        updated = replace(current, disabled_at=now, tokens_valid_after=now)
        self._store.update_principal(updated)
        return updated

    def enable(self, actor: Identity, principal_id: str) -> Principal:
        """Let a disabled principal (by an officer, or by a review campaign) log in again.

        Tokens issued before the disabling stay dead (``tokens_valid_after`` is kept): enabling
        gives back the right to log in, not the sessions that were cut. Officials are never
        disabled this way, so there is nothing to enable for them here.
        """
        current = self._require_principal(principal_id)
        if current.roles & QUORUM_ROLES:
            raise PermissionDeniedError("adding an official needs a quorum (proposal)")
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("principals are managed by security officers")
        if current.active:
            raise ConflictError(f"{principal_id!r} is already enabled")
        updated = replace(current, disabled_at=None)
        self._store.update_principal(updated)
        return updated

    def revoke_tokens_of(self, actor: Identity, principal_id: str) -> Principal:
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("token revocation is for security officers")
        current = self._require_principal(principal_id)
        now = self._clock.now()
        updated = replace(current, tokens_valid_after=now + 1)
        self._store.update_principal(updated)
        self._store.revoke_jtis(now, principal=principal_id)
        return updated

    def revoke_token(self, actor: Identity, jti: str) -> bool:
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("token revocation is for security officers")
        return self._store.revoke_jtis(self._clock.now(), jti=jti) > 0

    def get_principal(self, principal_id: str) -> Principal:
        return self._require_principal(principal_id)

    def _require_principal(self, principal_id: str) -> Principal:
        found = self._store.principal(validate_principal_id(principal_id))
        if found is None:
            raise NotFoundError(f"no principal {principal_id!r}")
        return found

    # --- proposals -------------------------------------------------------------------------

    def propose(self, actor: Identity, kind: object, payload: Mapping[str, Any]) -> Proposal:
        try:
            parsed = ProposalKind(str(kind))
        except ValueError:
            allowed = ", ".join(k.value for k in ProposalKind)
            raise InvalidRequestError(f"unknown kind {kind!r}; kinds are: {allowed}") from None
        now = self._clock.now()
        max_uses: int | None = None
        if parsed is ProposalKind.RESTORE:
            if not actor.has(Role.RESTORE_OPERATOR):
                raise PermissionDeniedError("restore requests are filed by restore operators")
            clean, max_uses = self._restore_payload(payload)
        else:
            if not actor.has(Role.OFFICIAL):
                raise PermissionDeniedError(f"{parsed.value} is proposed by an official")
            clean = self._official_payload(parsed, payload)
        proposal = Proposal(
            id=str(uuid.uuid4()),
            kind=parsed,
            requester=actor.principal,
            payload=clean,
            created_at=float(int(now)),
            expires_at=float(int(now + self.config.proposal_ttl)),
            audience=self.config.audience,
        )
        self._store.insert_proposal(proposal, max_uses=max_uses)
        return proposal

    def _restore_payload(  # noqa: C901 - one check per field, in the order of the form
        self, payload: Mapping[str, Any]
    ) -> tuple[dict[str, Any], int | None]:
        allowed = {"datasets", "site", "reason", "justification", "tool", "ttl", "max_uses"}
        _only(payload, allowed)
        datasets = payload.get("datasets")
        if (
            not isinstance(datasets, list)
            or not datasets
            or not all(isinstance(d, str) and d for d in datasets)
        ):
            raise InvalidRequestError("datasets must be a non-empty list of key names")
        for name in datasets:
            policy = self._keys.policy(name)  # NotFoundError names the missing dataset
            if name.startswith(SYSTEM_KEY_PREFIX) or not policy.key_type.is_symmetric:
                raise InvalidRequestError(f"{name!r} is not a dataset key")
        site = payload.get("site", self.config.site.name)
        if not isinstance(site, str) or not site:
            raise InvalidRequestError("site must be a site name")
        try:
            reason = ReasonCode(str(payload.get("reason")))
        except ValueError:
            codes = ", ".join(c.value for c in ReasonCode)
            raise InvalidRequestError(f"reason must be one of: {codes}") from None
        justification = payload.get("justification")
        if not isinstance(justification, str) or not justification.strip():
            raise InvalidRequestError("justification is required")
        if len(justification) > _MAX_JUSTIFICATION:
            raise InvalidRequestError(f"justification is limited to {_MAX_JUSTIFICATION} chars")
        tool_id = payload.get("tool")
        tool = self._store.principal(tool_id) if isinstance(tool_id, str) else None
        if tool is None or not tool.has(Role.RESTORE_TOOL):
            raise InvalidRequestError("tool must name an active restore-tool principal")
        ttl = payload.get("ttl", 3600)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise InvalidRequestError("ttl must be a whole number of seconds")
        if not 60 <= ttl <= self.config.max_restore_window:
            raise InvalidRequestError(
                f"ttl must be between 60 and {int(self.config.max_restore_window)} seconds"
            )
        max_uses = payload.get("max_uses")
        if max_uses is not None and (
            not isinstance(max_uses, int) or isinstance(max_uses, bool) or not max_uses >= 1
        ):
            raise InvalidRequestError("max_uses must be a positive whole number")
        clean = {
            "datasets": sorted(set(datasets)),
            "site": site,
            "reason": reason.value,
            "justification": justification,
            "tool": tool.id,
            "ttl": ttl,
            "max_uses": max_uses,
        }
        return clean, max_uses

    def _official_payload(self, kind: ProposalKind, payload: Mapping[str, Any]) -> dict[str, Any]:
        if kind in SITE_PROPOSALS:
            _only(payload, set(SITE_PAYLOAD_FIELDS[kind]))
            return self._site_registry().proposal_payload(kind, payload)
        if kind is ProposalKind.ADD_OFFICIAL:
            _only(payload, {"principal", "jwk", "display_name"})
            principal_id = validate_principal_id(str(payload.get("principal", "")))
            key = jose.parse_public_jwk(payload.get("jwk"))
            return {
                "principal": principal_id,
                "jwk": dict(key.members),
                "display_name": _display_name(str(payload.get("display_name", ""))),
            }
        if kind in (ProposalKind.GRANT_OFFICIAL, ProposalKind.REMOVE_OFFICIAL):
            _only(payload, {"principal"})
            return {"principal": self._require_principal(str(payload.get("principal", ""))).id}
        if kind is ProposalKind.DECLARE_EMERGENCY:
            _only(payload, {"duration", "justification"})
            duration = payload.get("duration")
            limit = int(self.config.max_emergency)
            if not isinstance(duration, int) or isinstance(duration, bool):
                raise InvalidRequestError("duration must be a whole number of seconds")
            if not 60 <= duration <= limit:
                raise InvalidRequestError(f"duration must be between 60 and {limit} seconds")
            justification = payload.get("justification")
            if not isinstance(justification, str) or not justification.strip():
                raise InvalidRequestError("justification is required")
            return {"duration": duration, "justification": justification[:_MAX_JUSTIFICATION]}
        _only(payload, {"justification"})
        return {"justification": str(payload.get("justification", ""))[:_MAX_JUSTIFICATION]}

    def proposal(self, actor: Identity, proposal_id: str) -> tuple[StoredProposalView, Tally]:
        stored = self._store.proposal(proposal_id)
        if stored is None:
            raise NotFoundError(f"no proposal {proposal_id!r}")
        if not (
            actor.root
            or actor.roles & {Role.OFFICIAL, Role.SECURITY_OFFICER, Role.AUDITOR}
            or actor.principal in (stored.proposal.requester, stored.proposal.payload.get("tool"))
        ):
            raise PermissionDeniedError("not a party to this proposal")
        return stored, self._tally(stored)

    def list_proposals(
        self,
        actor: Identity,
        *,
        kind: object = None,
        state: object = None,
        limit: object = 100,
    ) -> list[tuple[StoredProposalView, Tally]]:
        """Newest first. Officials, officers and auditors see all; others only their own."""
        parsed_kind = None if kind is None else parse_choice(ProposalKind, kind, "kind")
        parsed_state = None if state is None else parse_choice(ProposalState, state, "state")
        try:
            count = int(str(limit))
        except ValueError:
            raise InvalidRequestError("limit must be a whole number") from None
        if not 1 <= count <= _MAX_LISTED:
            raise InvalidRequestError(f"limit must be between 1 and {_MAX_LISTED}")
        sees_all = actor.root or actor.roles & {
            Role.OFFICIAL,
            Role.SECURITY_OFFICER,
            Role.AUDITOR,
        }
        # An expired proposal is still stored as pending: filter on the state the tally gives.
        stored_state = (
            ProposalState.PENDING if parsed_state is ProposalState.EXPIRED else parsed_state
        )
        found = self._store.list_proposals(
            kind=None if parsed_kind is None else parsed_kind.value,
            state=None if stored_state is None else stored_state.value,
            party=None if sees_all else actor.principal,
            limit=count,
        )
        listed = []
        for stored in found:
            result = self._tally(stored)
            effective = result.state if stored.state is ProposalState.PENDING else stored.state
            if parsed_state is None or effective is parsed_state:
                listed.append((stored, result))
        return listed

    def _tally(self, stored: StoredProposalView) -> Tally:
        return tally(
            stored.proposal,
            stored.approvals,
            required=self.config.approvals_required,
            officials=self._officials(),
            now=self._clock.now(),
        )

    def decide(self, actor: Identity, proposal_id: str, signature: object) -> Tally:
        """An official's signed approval or denial; when it decides the proposal, act on it."""
        if not actor.has(Role.OFFICIAL):
            raise PermissionDeniedError("only officials approve proposals")
        stored, _ = self.proposal(actor, proposal_id)
        proposal = stored.proposal
        now = self._clock.now()
        if stored.state is not ProposalState.PENDING:
            raise ConflictError(f"proposal is {stored.state.value}, not pending")
        if now >= proposal.expires_at:
            raise ConflictError("proposal has expired")
        if actor.principal == proposal.requester:
            raise PermissionDeniedError("the requester cannot decide their own proposal")
        if not isinstance(signature, str) or not signature:
            raise InvalidRequestError("signature must be the official's compact JWS")
        official = self._require_principal(actor.principal)
        jws = jose.verify_jws(signature, jose.parse_public_jwk(dict(official.jwk)))
        verdict = check_approval_claims(jws.claims, proposal, official=official.id, now=now)
        self._store.add_approval(Approval(proposal.id, official.id, verdict, now, signature))
        stored = self.proposal(actor, proposal_id)[0]
        result = self._tally(stored)
        if result.state in (ProposalState.APPROVED, ProposalState.DENIED):
            won = self._store.set_proposal_state(
                proposal.id, result.state, now, expect=ProposalState.PENDING
            )
            if won and result.state is ProposalState.APPROVED:
                self._execute(proposal, now)
        return result

    def _execute(self, proposal: Proposal, now: float) -> None:
        payload = proposal.payload
        if proposal.kind is ProposalKind.ADD_OFFICIAL:
            key = jose.parse_public_jwk(dict(payload["jwk"]))
            self._store.insert_principal(
                Principal(
                    id=payload["principal"],
                    roles=frozenset({Role.OFFICIAL}),
                    jwk=dict(key.members),
                    thumbprint=key.thumbprint,
                    created_at=now,
                    created_by=f"proposal:{proposal.id}",
                    display_name=str(payload.get("display_name", "")),
                )
            )
        elif proposal.kind is ProposalKind.GRANT_OFFICIAL:
            current = self._require_principal(payload["principal"])
            if Role.RESTORE_TOOL in current.roles:
                raise InvalidRequestError("a restore tool cannot become an official")
            roles = current.roles | {Role.OFFICIAL}
            self._store.update_principal(replace(current, roles=roles))
        elif proposal.kind is ProposalKind.REMOVE_OFFICIAL:
            current = self._require_principal(payload["principal"])
            roles = current.roles - {Role.OFFICIAL}
            self._store.update_principal(
                replace(
                    current,
                    roles=roles or current.roles,
                    tokens_valid_after=now,
                    disabled_at=current.disabled_at if roles else now,
                )
            )
        elif proposal.kind is ProposalKind.DECLARE_EMERGENCY:
            self._store.declare_emergency(proposal.id, now, now + int(payload["duration"]))
        elif proposal.kind is ProposalKind.END_EMERGENCY:
            self._store.end_emergency(now, proposal.id)
        elif proposal.kind in SITE_PROPOSALS:
            self._site_registry().execute(proposal.kind, payload)

    def _site_registry(self) -> SiteRegistry:
        if self._sites is None:
            raise InvalidRequestError("site proposals need the site registry, not wired here")
        return self._sites

    def credential(self, actor: Identity, proposal_id: str) -> Issued:
        """The named restore tool's scoped, DPoP-bound credential for an approved request."""
        if self._sites is not None:
            self._sites.require_serving()  # only an active site issues restore credentials
        stored = self._store.proposal(proposal_id)
        if stored is None or stored.proposal.kind is not ProposalKind.RESTORE:
            raise NotFoundError(f"no restore request {proposal_id!r}")
        payload = stored.proposal.payload
        if not actor.has(Role.RESTORE_TOOL) or actor.principal != payload["tool"]:
            raise PermissionDeniedError("only the restore tool named in the request")
        if actor.claims is None or actor.claims.jkt is None:
            raise PermissionDeniedError("a DPoP-bound tool token is required")
        if stored.state is not ProposalState.APPROVED or stored.decided_at is None:
            raise PermissionDeniedError(f"request is {stored.state.value}")
        now = self._clock.now()
        window_end = stored.decided_at + int(payload["ttl"])
        if now >= window_end:
            raise PermissionDeniedError("the request's window has closed")
        if stored.max_uses is not None and stored.uses >= stored.max_uses:
            raise PermissionDeniedError("the request's uses are spent")
        principal = self._require_principal(actor.principal)
        scope = Scope(
            request_id=stored.proposal.id,
            operations=frozenset({Operation.DECRYPT.value}),
            datasets=frozenset(payload["datasets"]),
            site=payload["site"],
            max_uses=stored.max_uses,
        )
        ttl = min(self.config.tool_token_ttl, window_end - now)
        return self._mint(
            principal, roles=frozenset({Role.RESTORE_TOOL}), ttl=ttl, scope=scope, bind=True
        )

    def revoke_grant(self, actor: Identity, proposal_id: str) -> int:
        if not (actor.root or actor.has(Role.SECURITY_OFFICER)):
            raise PermissionDeniedError("grants are revoked by security officers")
        now = self._clock.now()
        if not self._store.set_proposal_state(
            proposal_id, ProposalState.REVOKED, now, expect=ProposalState.APPROVED
        ):
            raise ConflictError("only an approved request can be revoked")
        return self._store.revoke_jtis(now, proposal_id=proposal_id)

    def status(self) -> dict[str, Any]:
        emergency = self._store.emergency(self._clock.now())
        own = None if self._sites is None else self._sites.own()
        return {
            "site": self.config.site.name,
            "site_kind": self.config.site.kind.value,
            "site_status": None if own is None else own.status.value,
            "emergency": emergency,
            "restore_policy": self.config.matrix.to_json(),
            "approvals_required": self.config.approvals_required,
        }


def _only(payload: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown field {unknown[0]!r}")


def _display_name(value: str) -> str:
    if len(value) > 200 or any(ord(c) < 32 for c in value):
        raise InvalidRequestError("display_name must be at most 200 printable characters")
    return value
