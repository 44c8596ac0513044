"""The site registry: the sites of the domain, which one serves, and how that changes.

Every site runs its own service with its own store, and keeps its own view of every site of
the domain (ADR 0012 §6). Only an ``active`` site serves key operations to callers; a
``standby`` site (loaded from a domain backup) waits for a failover, a ``failed-over`` site
was replaced by another, and a ``retired`` site never serves again. Statuses change only by
quorum proposals, executed at the site where the officials approved them:

| proposal | effect here |
|---|---|
| ``site-failover {previous, justification}`` | this site ``active``, ``previous`` ``failed-over`` |
| ``site-failback {embassy, justification}`` | this site ``active``, ``embassy`` ``retired`` |
| ``site-retire {justification, destroy_keys}`` | this site ``retired``, every token revoked |

Each change is a compare-and-set on the rows it reads, so two nodes (or two proposals) never
both act on one state. The hot path asks ``SiteRegistry.require_serving`` on every key
operation; the store answers from its per-process cache, checked against the registry
generation once per request (ADR 0006), so the check costs a dictionary lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from kms import jose
from kms.approvals import ProposalKind
from kms.audit_export import TreeHead, verify_tree_head
from kms.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    SiteUnavailableError,
    StorageError,
)
from kms.policy import ALLOW, Decision, Deny, Site, SiteKind, parse_choice

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from kms.ports import Clock

_NAME = re.compile(r"[a-z0-9-]{1,64}")
_MAX_URL = 2048
_MAX_NOTE = 500
_MAX_JUSTIFICATION = 2000


class SiteStatus(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    FAILED_OVER = "failed-over"
    RETIRED = "retired"


class SiteBackend(StrEnum):
    PKCS11 = "pkcs11"
    TRANSIT = "transit"


# Which status may follow which. A change to the same status is a no-op, allowed everywhere
# but from ``retired``, which is final: a retired site's authority never comes back.
_TRANSITIONS: Mapping[SiteStatus, frozenset[SiteStatus]] = {
    SiteStatus.ACTIVE: frozenset({SiteStatus.FAILED_OVER, SiteStatus.RETIRED}),
    SiteStatus.STANDBY: frozenset({SiteStatus.ACTIVE, SiteStatus.FAILED_OVER, SiteStatus.RETIRED}),
    SiteStatus.FAILED_OVER: frozenset({SiteStatus.ACTIVE, SiteStatus.RETIRED}),
    SiteStatus.RETIRED: frozenset(),
}
SITE_PROPOSALS = frozenset(
    {
        ProposalKind.SITE_FAILOVER,
        ProposalKind.SITE_FAILBACK,
        ProposalKind.SITE_RETIRE,
        ProposalKind.SITE_DECOMMISSION,
    }
)
# The fields each site proposal's payload may carry (``kms.access`` refuses any other).
SITE_PAYLOAD_FIELDS: Mapping[ProposalKind, frozenset[str]] = {
    ProposalKind.SITE_FAILOVER: frozenset({"previous", "justification"}),
    ProposalKind.SITE_FAILBACK: frozenset({"embassy", "justification"}),
    ProposalKind.SITE_RETIRE: frozenset({"justification", "destroy_keys"}),
    ProposalKind.SITE_DECOMMISSION: frozenset({"site", "justification"}),
}
_REFUSALS = {
    SiteStatus.STANDBY: "key operations start here after a failover (proposal site-failover)",
    SiteStatus.FAILED_OVER: "another site has taken over; a failback (proposal site-failback) "
    "resumes this one",
    SiteStatus.RETIRED: "a retired site never serves key operations again",
}


def validate_site_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidRequestError("a site name is 1-64 characters of a-z, 0-9 and '-'")
    return value


def parse_url(value: object) -> str:
    """Where the site is reached: empty, or an absolute http(s) URL without credentials."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > _MAX_URL or not value.isprintable():
        raise InvalidRequestError(f"url must be at most {_MAX_URL} printable characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise InvalidRequestError("url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
        raise InvalidRequestError("url must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError("url must not carry credentials")
    return value


def parse_note(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > _MAX_NOTE or not value.isprintable():
        raise InvalidRequestError(f"note must be at most {_MAX_NOTE} printable characters")
    return value


def parse_audit_key(value: object) -> dict[str, str]:
    """A site's audit public key: the EC P-256 JWK its tree heads verify with (ES256)."""
    key = jose.parse_public_jwk(value)
    if key.alg != "ES256":
        raise InvalidRequestError("a site's audit public key must be an EC P-256 JWK (ES256)")
    return dict(key.members)


def check_transition(name: str, current: SiteStatus, new: SiteStatus) -> None:
    if current is SiteStatus.RETIRED:
        raise ConflictError(f"site {name!r} is retired: its status never changes again")
    if new is not current and new not in _TRANSITIONS[current]:
        raise ConflictError(f"site {name!r} cannot go from {current.value} to {new.value}")


def may_serve(status: SiteStatus | None) -> Decision:
    """May a site in ``status`` serve key operations to callers now? Only when active."""
    if status is SiteStatus.ACTIVE:
        return ALLOW
    if status is None:
        return Deny("this site is not in its own site registry; unseal it again")
    return Deny(f"this site is {status.value}: {_REFUSALS[status]}")


@dataclass(frozen=True)
class SiteRecord:
    """One row of the registry, as this site knows the named site."""

    name: str
    kind: SiteKind
    backend: SiteBackend
    status: SiteStatus
    registered_at: float
    updated_at: float
    url: str = ""
    audit_public_key: Mapping[str, str] | None = field(default=None, hash=False)
    note: str = ""

    def __post_init__(self) -> None:
        validate_site_name(self.name)
        parse_url(self.url)
        parse_note(self.note)

    @property
    def audit_kid(self) -> str | None:
        """The RFC 7638 thumbprint of the audit key: the ``kid`` its tree heads carry."""
        if self.audit_public_key is None:
            return None
        return jose.jwk_thumbprint(self.audit_public_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "backend": self.backend.value,
            "status": self.status.value,
            "url": self.url,
            "audit_public_key": (
                None if self.audit_public_key is None else dict(self.audit_public_key)
            ),
            "audit_kid": self.audit_kid,
            "registered_at": self.registered_at,
            "updated_at": self.updated_at,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, obj: object) -> SiteRecord:
        """A row from a document (a domain backup); anything malformed is the input's fault."""
        if not isinstance(obj, dict):
            raise InvalidRequestError("a site must be a JSON object")
        registered, updated = _number(obj.get("registered_at")), _number(obj.get("updated_at"))
        if registered is None or updated is None:
            raise InvalidRequestError("a site's registered_at and updated_at must be numbers")
        key = obj.get("audit_public_key")
        return cls(
            name=validate_site_name(obj.get("name")),
            kind=parse_choice(SiteKind, obj.get("kind"), "site kind"),
            backend=parse_choice(SiteBackend, obj.get("backend"), "site backend"),
            status=parse_choice(SiteStatus, obj.get("status"), "site status"),
            registered_at=registered,
            updated_at=updated,
            url=parse_url(obj.get("url")),
            audit_public_key=None if key is None else parse_audit_key(key),
            note=parse_note(obj.get("note")),
        )


@dataclass(frozen=True)
class StatusChange:
    """Set ``name`` to ``status`` if, and only if, its row still says ``expect``."""

    name: str
    expect: SiteStatus
    status: SiteStatus


class SiteStore(Protocol):
    """What the registry needs from the metadata store (``storage.sql_store.SqlStore``)."""

    def sites(self) -> list[SiteRecord]: ...
    def site(self, name: str) -> SiteRecord | None: ...
    def insert_site(self, record: SiteRecord, *, only_if_absent: bool = False) -> bool: ...
    def set_site_audit_key(self, name: str, jwk: Mapping[str, str], at: float) -> bool: ...
    def change_site_statuses(
        self, changes: Sequence[StatusChange], at: float, *, revoke_tokens: bool = False
    ) -> bool: ...


class SiteKeys(Protocol):
    """What retiring with ``destroy_keys`` needs from ``kms.service.KeyService``."""

    def list_names(self) -> list[str]: ...
    def configure(self, name: str, *, deletion_allowed: bool | None = None) -> object: ...
    def delete(self, name: str) -> None: ...


class SiteRegistry:
    """This site's view of the domain's sites, and the status changes officials decide."""

    def __init__(
        self,
        *,
        store: SiteStore,
        clock: Clock,
        here: Site,
        backend: SiteBackend,
        keys: SiteKeys,
        url: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self.here = here
        self._backend = backend
        self._keys = keys
        self._url = parse_url(url)

    # --- this site ------------------------------------------------------------------------

    def own(self) -> SiteRecord | None:
        return self._store.site(self.here.name)

    def require_serving(self) -> None:
        """Raise unless this site is active: the check every key operation makes first."""
        own = self._store.site(self.here.name)
        decision = may_serve(None if own is None else own.status)
        if not decision:
            raise SiteUnavailableError(getattr(decision, "reason", "this site is not active"))

    def ensure_own(self, audit_key: Mapping[str, str] | None) -> SiteRecord:
        """Register this site when it first opens; record its audit key once it has one.

        A node initialised here (``sys/init``) is the home of its domain: it registers itself
        ``active``. A node loaded from a domain backup has its ``standby`` row already (the
        import writes it before the node opens), and keeps it. Several workers or nodes may
        get here at once: the first insert wins and the others read it.
        """
        own = self.own()
        if own is None:
            now = self._clock.now()
            self._store.insert_site(
                SiteRecord(
                    name=self.here.name,
                    kind=self.here.kind,
                    backend=self._backend,
                    status=SiteStatus.ACTIVE,
                    registered_at=now,
                    updated_at=now,
                    url=self._url,
                    audit_public_key=None if audit_key is None else dict(audit_key),
                    note="registered itself when it first opened",
                ),
                only_if_absent=True,
            )
            own = self.own()
            if own is None:
                raise StorageError("this site's registry row could not be written")
        return self.refresh_audit_key(audit_key) or own

    def refresh_audit_key(self, audit_key: Mapping[str, str] | None) -> SiteRecord | None:
        """Record this site's audit key in its own row if the row lacks it or holds an older one.

        The audit signing key is made when the first tree head is signed, after the site
        first opened, so the row learns it later; other sites verify our heads with it.
        """
        own = self.own()
        if own is None or audit_key is None:
            return own
        if own.audit_public_key is not None and dict(own.audit_public_key) == dict(audit_key):
            return own
        self._store.set_site_audit_key(own.name, dict(audit_key), self._clock.now())
        return self.own()

    def set_audit_key(self, name: str, audit_public_key: object) -> SiteRecord:
        """Pin another site's audit key, once: a site has none until it signs its first head.

        Replacing a pinned key would let whoever holds the new one have forged heads recorded
        here, so a key already pinned is a conflict; a wrong one means registering anew.
        """
        found = self.get(name)
        if found.name == self.here.name:
            raise ConflictError("this site's own audit key is recorded when it signs a head")
        if found.audit_public_key is not None:
            raise ConflictError(f"site {name!r} has an audit key already; it is never replaced")
        self._store.set_site_audit_key(
            found.name, parse_audit_key(audit_public_key), self._clock.now()
        )
        return self.get(name)

    # --- the registry -----------------------------------------------------------------------

    def sites(self) -> list[SiteRecord]:
        return sorted(self._store.sites(), key=lambda s: s.name)

    def get(self, name: str) -> SiteRecord:
        found = self._store.site(validate_site_name(name))
        if found is None:
            raise NotFoundError(f"no site {name!r} in this site's registry")
        return found

    def register(
        self,
        name: str,
        *,
        kind: object,
        backend: object,
        url: object = "",
        audit_public_key: object = None,
        note: object = "",
    ) -> SiteRecord:
        """Another site of the domain, as ``standby``: only a quorum proposal changes that."""
        name = validate_site_name(name)
        if name == self.here.name:
            raise ConflictError(f"{name!r} is this site; it registers itself when it opens")
        now = self._clock.now()
        record = SiteRecord(
            name=name,
            kind=parse_choice(SiteKind, kind, "site kind"),
            backend=parse_choice(SiteBackend, backend, "site backend"),
            status=SiteStatus.STANDBY,
            registered_at=now,
            updated_at=now,
            url=parse_url(url),
            audit_public_key=None
            if audit_public_key is None
            else parse_audit_key(audit_public_key),
            note=parse_note(note),
        )
        if not self._store.insert_site(record, only_if_absent=True):
            raise ConflictError(f"site {name!r} is already registered")
        return record

    # --- other sites' tree heads ------------------------------------------------------------

    def check_tree_head(self, name: str, value: object) -> tuple[TreeHead, str]:
        """Another site's signed tree head, verified with that site's registered audit key."""
        site = self.get(name)
        if site.name == self.here.name:
            raise InvalidRequestError(
                "this site's own heads are in its own log; record another site's heads here"
            )
        if site.audit_public_key is None:
            raise ConflictError(
                f"site {name!r} has no registered audit public key to verify its heads with"
            )
        key = jose.parse_public_jwk(dict(site.audit_public_key))
        return verify_tree_head(value, key, key_name=f"site {name!r}'s audit public key")

    # --- proposals --------------------------------------------------------------------------

    def proposal_payload(self, kind: ProposalKind, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Check a site proposal against the registry as it stands; its clean payload.

        The same checks run again when the proposal is executed: the registry may change
        while the officials decide.
        """
        justification = _justification(payload)
        if kind is ProposalKind.SITE_FAILOVER:
            previous = self._failover_checks(payload.get("previous"))
            return {"previous": previous.name, "justification": justification}
        if kind is ProposalKind.SITE_FAILBACK:
            embassy = self._failback_checks(payload.get("embassy"))
            return {"embassy": embassy.name, "justification": justification}
        if kind is ProposalKind.SITE_RETIRE:
            self._own_not_retired()
            destroy = payload.get("destroy_keys", False)
            if not isinstance(destroy, bool):
                raise InvalidRequestError("destroy_keys must be true or false")
            return {"justification": justification, "destroy_keys": destroy}
        if kind is ProposalKind.SITE_DECOMMISSION:
            other = self._decommission_checks(payload.get("site"))
            return {"site": other.name, "justification": justification}
        raise InvalidRequestError(f"{kind.value} is not a site proposal")

    def execute(self, kind: ProposalKind, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out an approved site proposal; what it did, for the record."""
        now = self._clock.now()
        if kind is ProposalKind.SITE_FAILOVER:
            own = self._failover_own()
            previous = self._failover_checks(payload.get("previous"))
            changes = [
                StatusChange(own.name, own.status, SiteStatus.ACTIVE),
                StatusChange(previous.name, previous.status, SiteStatus.FAILED_OVER),
            ]
            self._change(changes, now)
            return {"active": own.name, "failed_over": previous.name}
        if kind is ProposalKind.SITE_FAILBACK:
            own = self._own_not_retired()
            embassy = self._failback_checks(payload.get("embassy"))
            changes = [StatusChange(own.name, own.status, SiteStatus.ACTIVE)]
            if embassy.status is not SiteStatus.RETIRED:  # retired already: nothing to undo
                changes.append(StatusChange(embassy.name, embassy.status, SiteStatus.RETIRED))
            self._change(changes, now)
            return {"active": own.name, "retired": embassy.name}
        if kind is ProposalKind.SITE_RETIRE:
            own = self._own_not_retired()
            change = StatusChange(own.name, own.status, SiteStatus.RETIRED)
            self._change([change], now, revoke_tokens=True)
            destroyed = self._destroy_keys() if payload.get("destroy_keys") is True else []
            return {"retired": own.name, "destroyed_keys": destroyed}
        if kind is ProposalKind.SITE_DECOMMISSION:
            other = self._decommission_checks(payload.get("site"))
            self._change([StatusChange(other.name, other.status, SiteStatus.RETIRED)], now)
            return {"retired": other.name}
        raise InvalidRequestError(f"{kind.value} is not a site proposal")

    def _decommission_checks(self, name: object) -> SiteRecord:
        """Only the active site records another's end, and only of a site it knows, once."""
        own = self._own_not_retired()
        if own.status is not SiteStatus.ACTIVE:
            raise ConflictError(
                f"this site is {own.status.value}: only the active site decommissions another"
            )
        if not isinstance(name, str):
            raise InvalidRequestError("site must be the name of a registered site")
        other = self.get(name)
        if other.name == own.name:
            raise ConflictError("a site retires itself with site-retire, not site-decommission")
        if other.status is SiteStatus.RETIRED:
            raise ConflictError(f"site {other.name!r} is retired already")
        return other

    def _change(
        self, changes: Sequence[StatusChange], at: float, *, revoke_tokens: bool = False
    ) -> None:
        for change in changes:
            check_transition(change.name, change.expect, change.status)
        if not self._store.change_site_statuses(changes, at, revoke_tokens=revoke_tokens):
            raise ConflictError("the site registry changed meanwhile; read it and propose again")

    def _destroy_keys(self) -> list[str]:
        """Every key callers can address, destroyed in the backend (irreversible).

        The site's own system keys (token and audit signing) stay: its log must remain
        verifiable and exportable after retirement, and nothing they sign opens data.
        """
        destroyed = []
        for name in self._keys.list_names():
            self._keys.configure(name, deletion_allowed=True)
            self._keys.delete(name)
            destroyed.append(name)
        return destroyed

    def _own_not_retired(self) -> SiteRecord:
        own = self.own()
        if own is None:
            raise ConflictError("this site is not in its own site registry yet; unseal it first")
        if own.status is SiteStatus.RETIRED:
            raise ConflictError("this site is retired: its status never changes again")
        return own

    def _failover_own(self) -> SiteRecord:
        own = self._own_not_retired()
        if own.status is SiteStatus.ACTIVE:
            raise ConflictError("this site is already active: there is nothing to fail over")
        return own

    def _other(self, value: object, what: str) -> SiteRecord:
        if value is None:
            raise InvalidRequestError(f"{what} is required: the name of a registered site")
        name = validate_site_name(value)
        if name == self.here.name:
            raise InvalidRequestError(f"{what} must name another site than this one")
        return self.get(name)

    def _failover_checks(self, previous_name: object) -> SiteRecord:
        self._failover_own()
        previous = self._other(previous_name, "previous")
        if previous.status is SiteStatus.RETIRED:
            raise ConflictError(f"site {previous.name!r} is retired: nothing to take over from")
        return previous

    def _failback_checks(self, embassy_name: object) -> SiteRecord:
        self._own_not_retired()
        return self._other(embassy_name, "embassy")


def _justification(payload: Mapping[str, Any]) -> str:
    value = payload.get("justification")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError("justification is required")
    if len(value) > _MAX_JUSTIFICATION:
        raise InvalidRequestError(f"justification is limited to {_MAX_JUSTIFICATION} characters")
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
