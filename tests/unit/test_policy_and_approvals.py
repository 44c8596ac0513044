"""Pure access-control logic: the restore matrix, scope checks and the approval tally."""

from __future__ import annotations

import pytest

from kms.approvals import Approval, Proposal, ProposalKind, ProposalState, Verdict, tally
from kms.credentials import AccessClaims, Scope
from kms.errors import InvalidRequestError
from kms.identity import Role
from kms.keys import Classification
from kms.policy import DEFAULT_MATRIX, Operation, RestoreMatrix, Site, SiteKind, check_scoped_use

C, K = Classification, SiteKind
MATRIX_CASES = [
    # classification, site kind, emergency, allowed
    (C.PUBLIC, K.PUBLIC_CLOUD, False, True),
    (C.PUBLIC, K.EMBASSY, False, True),
    (C.INTERNAL, K.EMBASSY, False, True),
    (C.INTERNAL, K.PUBLIC_CLOUD, True, False),
    (C.CONFIDENTIAL, K.HOME, False, True),
    (C.CONFIDENTIAL, K.EMBASSY, False, False),
    (C.CONFIDENTIAL, K.EMBASSY, True, True),
    (C.CONFIDENTIAL, K.PUBLIC_CLOUD, True, False),
    (C.SECRET, K.HOME, False, True),
    (C.SECRET, K.EMBASSY, False, False),
    (C.SECRET, K.EMBASSY, True, True),
    (C.SECRET, K.PUBLIC_CLOUD, True, False),
]


@pytest.mark.parametrize(("classification", "site", "emergency", "allowed"), MATRIX_CASES)
def test_default_matrix(
    classification: Classification, site: SiteKind, emergency: bool, allowed: bool
) -> None:
    assert bool(DEFAULT_MATRIX.decide(classification, site, emergency=emergency)) is allowed


def test_matrix_configuration_is_checked() -> None:
    relaxed = RestoreMatrix.from_config({"internal": {"always": ["home", "public-cloud"]}})
    assert relaxed.decide(C.INTERNAL, K.PUBLIC_CLOUD, emergency=False)
    with pytest.raises(InvalidRequestError, match="never be restored in a public cloud"):
        RestoreMatrix.from_config({"secret": {"emergency": ["embassy", "public-cloud"]}})
    with pytest.raises(InvalidRequestError, match="unknown site kind"):
        RestoreMatrix.from_config({"public": {"always": ["moon"]}})
    with pytest.raises(InvalidRequestError, match="unknown classification"):
        RestoreMatrix.from_config({"top-secret": {"always": []}})


def _claims(scope: Scope | None) -> AccessClaims:
    return AccessClaims("iss", "tool", "aud", 0, 0, 900, "j", frozenset({Role.RESTORE_TOOL}), scope)


SCOPE = Scope("req-1", frozenset({"decrypt"}), frozenset({"laws"}), "embassy-1", 3)
SCOPE_CASES = [
    (SCOPE, "laws", "embassy-1", C.INTERNAL, True, ""),
    (SCOPE, "registry", "embassy-1", C.INTERNAL, False, "outside the credential's scope"),
    (SCOPE, "laws", "home", C.INTERNAL, False, "is for site"),
    (SCOPE, "laws", "embassy-1", C.SECRET, False, "needs an emergency"),
    (None, "laws", "embassy-1", C.INTERNAL, False, "no key scope"),
]


@pytest.mark.parametrize(
    ("scope", "dataset", "site", "classification", "allowed", "why"), SCOPE_CASES
)
def test_scope_checks(  # noqa: PLR0917 - one parameter per table column
    scope: Scope | None,
    dataset: str,
    site: str,
    classification: Classification,
    allowed: bool,
    why: str,
) -> None:
    decision = check_scoped_use(
        _claims(scope),
        operation=Operation.DECRYPT,
        dataset=dataset,
        classification=classification,
        site=Site(site, K.EMBASSY),
        matrix=DEFAULT_MATRIX,
        emergency=False,
    )
    assert bool(decision) is allowed
    assert why in getattr(decision, "reason", "")


PROPOSAL = Proposal("p-12345678", ProposalKind.RESTORE, "op", {"datasets": ["laws"]}, 0, 100, "a")
OFFICIALS = frozenset({"o1", "o2", "o3", "op"})


def _vote(who: str, verdict: Verdict = Verdict.APPROVE) -> Approval:
    return Approval(PROPOSAL.id, who, verdict, 1, "sig")


@pytest.mark.parametrize(
    ("votes", "now", "state"),
    [
        ([], 10, ProposalState.PENDING),
        ([_vote("o1")], 10, ProposalState.PENDING),
        ([_vote("o1"), _vote("o1")], 10, ProposalState.PENDING),  # one official counts once
        ([_vote("o1"), _vote("op")], 10, ProposalState.PENDING),  # the requester never counts
        ([_vote("o1"), _vote("ex-official")], 10, ProposalState.PENDING),
        ([_vote("o1"), _vote("o2")], 10, ProposalState.APPROVED),
        ([_vote("o1"), _vote("o2"), _vote("o3", Verdict.DENY)], 10, ProposalState.DENIED),
        ([_vote("o1")], 100, ProposalState.EXPIRED),
        ([_vote("o1"), _vote("o2")], 100, ProposalState.APPROVED),
    ],
)
def test_tally(votes: list[Approval], now: float, state: ProposalState) -> None:
    assert tally(PROPOSAL, votes, required=2, officials=OFFICIALS, now=now).state is state


def test_digest_binds_every_field() -> None:
    digests = {
        PROPOSAL.digest(),
        Proposal(PROPOSAL.id, PROPOSAL.kind, "op2", PROPOSAL.payload, 0, 100, "a").digest(),
        Proposal(PROPOSAL.id, PROPOSAL.kind, "op", {"datasets": ["x"]}, 0, 100, "a").digest(),
        Proposal(PROPOSAL.id, PROPOSAL.kind, "op", PROPOSAL.payload, 0, 101, "a").digest(),
        Proposal(PROPOSAL.id, PROPOSAL.kind, "op", PROPOSAL.payload, 0, 100, "b").digest(),
    }
    assert len(digests) == 5
