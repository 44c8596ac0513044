"""Proposals that need a quorum of officials, and the signed approvals that decide them.

A proposal is a restore request, a change to the set of officials, an emergency, or a change
of which site serves (failover, failback, retire). Officials sign the proposal's canonical
digest with their own key, so an approval cannot be moved to another proposal, and the whole
decision can be checked offline from the stored signatures.

Rules (``tally``): the requester cannot approve their own proposal; each official counts once;
any official's deny denies the proposal at once (a veto: restoring state secrets abroad should
need agreement, not a majority); a proposal not decided before it expires is expired.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from kms.errors import AuthenticationError, InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class ProposalKind(StrEnum):
    RESTORE = "restore"
    ADD_OFFICIAL = "add-official"  # register a new principal holding the official role
    GRANT_OFFICIAL = "grant-official"  # give an existing principal the official role
    REMOVE_OFFICIAL = "remove-official"  # disable an official (and revoke their tokens)
    DECLARE_EMERGENCY = "declare-emergency"
    END_EMERGENCY = "end-emergency"
    SITE_FAILOVER = "site-failover"  # this site takes over from another (kms.sites)
    SITE_FAILBACK = "site-failback"  # this (rebuilt) site resumes; the embassy is retired
    SITE_RETIRE = "site-retire"  # this site stops for good; every token here is revoked
    SITE_DECOMMISSION = "site-decommission"  # this active site records another as retired


class ReasonCode(StrEnum):
    """Why a restore is needed; a fixed list in the spirit of Key Access Justifications."""

    DISASTER_RECOVERY = "disaster-recovery"
    SCHEDULED_RESTORE_TEST = "scheduled-restore-test"
    LEGAL_ORDER = "legal-order"
    INTEGRITY_CHECK = "integrity-check"


class ProposalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    REVOKED = "revoked"  # an approved restore grant withdrawn by a security officer


class Verdict(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


DIGEST_PREFIX = b"embassy-kms/proposal/v1\n"
_ID_RE = re.compile(r"[a-z0-9-]{8,64}")


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes every signer and verifier hashes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Proposal:
    id: str
    kind: ProposalKind
    requester: str
    payload: Mapping[str, Any]
    created_at: float
    expires_at: float
    audience: str  # the service the approvals are for; binds them to this deployment

    def digest(self) -> str:
        body = {
            "audience": self.audience,
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            "id": self.id,
            "kind": self.kind.value,
            "payload": self.payload,
            "requester": self.requester,
        }
        return hashlib.sha256(DIGEST_PREFIX + canonical_json(body)).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "requester": self.requester,
            "payload": dict(self.payload),
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            "audience": self.audience,
            "digest": self.digest(),
        }


def validate_proposal_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise InvalidRequestError("proposal id must be 8-64 characters of a-z, 0-9 and '-'")
    return value


@dataclass(frozen=True)
class Approval:
    proposal_id: str
    official: str
    verdict: Verdict
    signed_at: float
    signature: str  # the official's compact JWS, kept as evidence


def check_approval_claims(
    claims: Mapping[str, Any], proposal: Proposal, *, official: str, now: float
) -> Verdict:
    """The claims of an approval JWS whose signature verified under ``official``'s key."""
    if claims.get("iss") != official:
        raise AuthenticationError("approval signed for another official")
    if claims.get("aud") != proposal.audience:
        raise AuthenticationError("approval for another service")
    if claims.get("proposal") != proposal.id or claims.get("digest") != proposal.digest():
        raise AuthenticationError("approval does not match this proposal's digest")
    iat = claims.get("iat")
    if not isinstance(iat, (int, float)) or isinstance(iat, bool) or abs(now - iat) > 300:
        raise AuthenticationError("approval signed too long ago or in the future")
    try:
        return Verdict(str(claims.get("decision")))
    except ValueError:
        raise AuthenticationError("approval decision must be 'approve' or 'deny'") from None


@dataclass(frozen=True)
class Tally:
    state: ProposalState
    approvals: int
    required: int
    approvers: tuple[str, ...]
    deniers: tuple[str, ...]


def tally(
    proposal: Proposal,
    approvals: Iterable[Approval],
    *,
    required: int,
    officials: frozenset[str],
    now: float,
) -> Tally:
    """Decide a proposal from its approvals. Only current officials count, each once."""
    approvers: list[str] = []
    deniers: list[str] = []
    for approval in approvals:
        if approval.official not in officials or approval.official == proposal.requester:
            continue
        bucket = approvers if approval.verdict is Verdict.APPROVE else deniers
        if approval.official not in approvers and approval.official not in deniers:
            bucket.append(approval.official)
    if deniers:
        state = ProposalState.DENIED
    elif len(approvers) >= required:
        state = ProposalState.APPROVED
    elif now >= proposal.expires_at:
        state = ProposalState.EXPIRED
    else:
        state = ProposalState.PENDING
    return Tally(state, len(approvers), required, tuple(approvers), tuple(deniers))
