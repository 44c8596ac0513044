"""Access reviews as a service: the report and campaigns, read from and stored in the store port.

``kms.review`` holds the rules and is pure; this module fetches what they need through the
``ReviewStore`` port, applies them at the clock's time, and stores the outcome. HTTP and the
CLI stay thin: they parse, call one method here, and render.

Who may do what. Reading the report and campaigns is for security officers, auditors and the
root token. Acting on a campaign (open, certify, revoke, close) is for security officers, as
principals: a decision names the officer who made it, and "nobody reviews themselves" needs an
identity to compare. The root token is not a principal, so it is refused with a message that
says so rather than the usual opaque denial: it tells the holder nothing they do not know.

Officials. Closing a campaign disables the principals nobody certified and those an officer
revoked, except officials. Removing an official (or their role) needs a quorum of officials
(``remove-official``): officials approve restores and emergencies, and if one security officer
could disable them, one officer could shrink the set whose quorum guards everything else, or
keep any restore from ever being approved. A campaign therefore reviews officials like everyone
else, but closing it leaves any principal holding the official role active and reports them as
``left_to_quorum``: the officer's decision is evidence for a ``remove-official`` proposal, not a
way around it. This is the rule ``AccessService.disable`` already applies.

Never locked out. Closing refuses (``LastOfficerError``, 409) when it would disable every active
security officer, since nobody could then run a review or manage a principal again (the root
token is break-glass, not a way of working). The store checks the same inside the closing
transaction, so two campaigns closed at once cannot each disable the other's last officer.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from kms.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from kms.identity import QUORUM_ROLES, Role
from kms.policy import parse_choice
from kms.review import (
    MAX_DORMANT_DAYS,
    AccessReport,
    Campaign,
    CampaignState,
    Closing,
    TimeWindow,
    build_report,
    certify,
    close,
    open_campaign,
    revoke,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from kms.access import Identity
    from kms.identity import Principal
    from kms.ports import Clock, ReviewStore

_READERS = frozenset({Role.SECURITY_OFFICER, Role.AUDITOR})
MAX_LISTED_CAMPAIGNS = 1000
_MAX_FILTER = 200
_DURATION_UNITS = {"d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")
_SECONDS = re.compile(r"\d{1,12}(?:\.\d{1,6})?")
ROOT_IS_NOT_A_PRINCIPAL = (
    "the root token is not a principal: review campaigns are run by security officers, each "
    "logged in as themselves (ekms login), so that every decision names who made it"
)


class RootNotPrincipalError(PermissionDeniedError):
    """The root token asked to act on a campaign; a 403 whose message says what to do instead."""

    def __init__(self) -> None:
        super().__init__("the root token is not a principal")
        self.args = (ROOT_IS_NOT_A_PRINCIPAL,)

    def __str__(self) -> str:
        return ROOT_IS_NOT_A_PRINCIPAL


class LastOfficerError(ConflictError):
    """Closing would disable every active security officer; nothing was changed."""

    def __init__(self, officers: Sequence[str] = ()) -> None:
        named = f" ({', '.join(officers)})" if officers else ""
        super().__init__(
            f"closing this campaign would suspend or revoke every active security officer"
            f"{named}, and nobody could run a review or manage principals again. Have another "
            "security officer certify them first; if there is no other, register a second "
            "security officer, have them log in and certify, then close the campaign"
        )


# --- parsing what callers send ------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds, from a whole number or a Go-style duration such as ``72h`` or ``1h30m``.

    Days (``7d``) are accepted as well, as Vault accepts them; the campaign's own bounds are
    checked by ``kms.review.open_campaign``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and 0 < len(value) <= 32:
        text = value.strip()
        if text.isdigit():
            return float(text)
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise InvalidRequestError(
        'duration must be a whole number of seconds or a duration such as "72h" or "1h30m"'
    )


def parse_moment(value: str, name: str) -> float:
    """Seconds since the epoch, from epoch seconds or an RFC 3339 date-time with its zone."""
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        moment = datetime.fromisoformat(text) if len(text) <= 40 else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidRequestError(
            f"{name} must be seconds since the epoch or an RFC 3339 date-time with a time zone, "
            f"such as 2026-01-31T00:00:00Z; got {value[:40]!r}"
        )
    seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise InvalidRequestError(f"{name} is out of range")
    return seconds


@dataclass(frozen=True)
class ReportQuery:
    """The report's filters, parsed and checked."""

    window: TimeWindow | None = None
    principal: str | None = None
    dataset: str | None = None
    site: str | None = None
    dormant_days: int = 90

    @classmethod
    def from_params(cls, params: Mapping[str, str], now: float) -> ReportQuery:
        """From query parameters: ``since``/``until`` (either may be left out), the three
        filters and ``dormant_days``. A window with only ``since`` runs to ``now``."""
        since, until = params.get("since"), params.get("until")
        window = None
        if since is not None or until is not None:
            start = 0.0 if since is None else parse_moment(since, "since")
            end = now if until is None else parse_moment(until, "until")
            if start > end:
                raise InvalidRequestError("since must not be later than until")
            window = TimeWindow(start, end)
        for name in ("principal", "dataset", "site"):
            value = params.get(name)
            if value is not None and not (0 < len(value) <= _MAX_FILTER):
                raise InvalidRequestError(f"{name} must be 1-{_MAX_FILTER} characters")
        days = params.get("dormant_days", "90")
        if not (_is_number(days, 4) and 1 <= int(days) <= MAX_DORMANT_DAYS):
            raise InvalidRequestError(
                f"dormant_days must be a whole number of days from 1 to {MAX_DORMANT_DAYS}"
            )
        return cls(
            window,
            principal=params.get("principal"),
            dataset=params.get("dataset"),
            site=params.get("site"),
            dormant_days=int(days),
        )

    def details(self) -> dict[str, object]:
        """What the audit record keeps of the query: the filters that were set."""
        found: dict[str, object] = {"dormant_days": self.dormant_days}
        if self.window is not None:
            found["since"] = int(self.window.start)
            found["until"] = int(self.window.end)
        for name in ("principal", "dataset", "site"):
            value = getattr(self, name)
            if value is not None:
                found[name] = value
        return found


# --- what closing does --------------------------------------------------------------------


@dataclass(frozen=True)
class ClosePlan:
    """What closing a campaign changes, worked out before anything is stored.

    ``suspended`` and ``revoked`` are disabled; ``left_to_quorum`` hold the official role and
    stay active (see the module's docstring). Principals already disabled are in none of them.
    """

    closing: Closing
    suspended: tuple[str, ...]
    revoked: tuple[str, ...]
    left_to_quorum: tuple[str, ...]

    @property
    def campaign(self) -> Campaign:
        return self.closing.campaign

    @property
    def disable(self) -> tuple[str, ...]:
        return tuple(sorted({*self.suspended, *self.revoked}))


def plan_closing(closing: Closing, principals: Iterable[Principal]) -> ClosePlan:
    """Split what ``close`` names into what to disable and what to leave to the quorum.

    Raises ``LastOfficerError`` if no active security officer would remain.
    """
    known = {p.id: p for p in principals}

    def split(ids: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        disable: list[str] = []
        quorum: list[str] = []
        for principal_id in ids:
            found = known.get(principal_id)
            if found is None or not found.active:
                continue
            (quorum if found.roles & QUORUM_ROLES else disable).append(principal_id)
        return tuple(disable), tuple(quorum)

    suspended, quorum_pending = split(closing.suspend)
    revoked, quorum_revoked = split(closing.revoke)
    gone = {*suspended, *revoked}
    officers = sorted(p.id for p in known.values() if p.has(Role.SECURITY_OFFICER))
    if officers and all(o in gone for o in officers):
        raise LastOfficerError(officers)
    return ClosePlan(closing, suspended, revoked, tuple(sorted({*quorum_pending, *quorum_revoked})))


# --- the service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignView:
    """A campaign with its version and the principals it reviews as they are now."""

    campaign: Campaign
    version: int
    principals: Mapping[str, Principal | None]


def _new_id() -> str:
    return str(uuid.uuid4())


class ReviewService:
    def __init__(
        self, *, store: ReviewStore, clock: Clock, new_id: Callable[[], str] = _new_id
    ) -> None:
        self._store = store
        self._clock = clock
        self._new_id = new_id

    # --- the report ------------------------------------------------------------------------

    def report(self, actor: Identity, query: ReportQuery) -> AccessReport:
        """Everything an officer reviews, as of now. Audit records are streamed from the store."""
        _require_reader(actor)
        return build_report(
            principals=self._store.list_principals(),
            issued_tokens=self._store.each_issued_token(),
            proposals=self._store.all_proposals(),
            audit_records=self._store.each_audit_record(),
            key_names=self._store.list_names(),
            now=self._clock.now(),
            dormant_after_days=query.dormant_days,
            window=query.window,
            principal=query.principal,
            dataset=query.dataset,
            site=query.site,
        )

    # --- reading campaigns ----------------------------------------------------------------

    def campaigns(
        self, actor: Identity, *, state: object = None, limit: object = 100
    ) -> list[tuple[Campaign, int]]:
        """Newest first, optionally only ``open`` or ``closed`` ones."""
        _require_reader(actor)
        parsed = None if state is None else parse_choice(CampaignState, state, "state")
        text = str(limit)
        if not (_is_number(text, 4) and 1 <= int(text) <= MAX_LISTED_CAMPAIGNS):
            raise InvalidRequestError(f"limit must be between 1 and {MAX_LISTED_CAMPAIGNS}")
        return self._store.list_campaigns(
            state=None if parsed is None else parsed.value, limit=int(text)
        )

    def campaign(self, actor: Identity, campaign_id: str) -> CampaignView:
        _require_reader(actor)
        return self._view(*self._load(campaign_id))

    def _load(self, campaign_id: str) -> tuple[Campaign, int]:
        found = self._store.campaign(campaign_id) if len(campaign_id) <= 64 else None
        if found is None:
            raise NotFoundError(f"no review campaign {campaign_id[:64]!r}")
        return found

    def _view(self, campaign: Campaign, version: int) -> CampaignView:
        known = {p.id: p for p in self._store.list_principals()}
        return CampaignView(campaign, version, {p: known.get(p) for p in sorted(campaign.items)})

    # --- acting on campaigns ---------------------------------------------------------------

    def _officer(self, actor: Identity) -> Principal:
        """The acting principal with the roles its token still carries (``kms.access``)."""
        if actor.root:
            raise RootNotPrincipalError
        found = self._store.principal(actor.principal)
        if found is None:
            raise PermissionDeniedError(f"unknown principal {actor.principal!r}")
        return replace(found, roles=found.roles & actor.roles)

    def open(
        self, actor: Identity, *, duration: object, scope: Sequence[str] | None = None
    ) -> CampaignView:
        officer = self._officer(actor)
        campaign = open_campaign(
            officer,
            self._store.list_principals(),
            self._clock.now(),
            parse_duration(duration),
            self._new_id(),
            scope=scope,
        )
        self._store.insert_campaign(campaign)
        return self._view(campaign, 1)

    def certify(
        self, actor: Identity, campaign_id: str, principal_id: str, note: str = ""
    ) -> CampaignView:
        officer = self._officer(actor)
        return self._decide(
            campaign_id, lambda c: certify(c, officer, principal_id, self._clock.now(), note)
        )

    def revoke(
        self, actor: Identity, campaign_id: str, principal_id: str, note: str
    ) -> CampaignView:
        officer = self._officer(actor)
        return self._decide(
            campaign_id, lambda c: revoke(c, officer, principal_id, self._clock.now(), note)
        )

    def _decide(self, campaign_id: str, change: Callable[[Campaign], Campaign]) -> CampaignView:
        """Apply ``change`` to the stored campaign; if another decision was stored in between,
        read it again and apply once more (which may now find the item decided: 409)."""
        for _ in range(2):
            campaign, version = self._load(campaign_id)
            updated = change(campaign)
            if self._store.update_campaign(updated, version=version):
                return self._view(updated, version + 1)
        raise _busy()

    def close(self, actor: Identity, campaign_id: str) -> ClosePlan:
        """Close the campaign and, in the same transaction, disable whom it names."""
        officer = self._officer(actor)
        for _ in range(2):
            campaign, version = self._load(campaign_id)
            now = self._clock.now()
            plan = plan_closing(close(campaign, officer, now), self._store.list_principals())
            if self._store.close_campaign(
                plan.campaign, version=version, disable=plan.disable, at=now
            ):
                return plan
        raise _busy()


def _is_number(text: str, digits: int) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= digits


def _require_reader(actor: Identity) -> None:
    if not (actor.root or actor.roles & _READERS):
        raise PermissionDeniedError("access reviews are for security officers and auditors")


def _busy() -> ConflictError:
    return ConflictError(
        "the campaign kept changing while this change was being stored: read it again and retry"
    )
