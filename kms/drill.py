"""Share-health drills: each holder checks in; the report says whether a quorum is reachable.

A drill is started for the share set in force, with a deadline and a staleness horizon. Each
holder checks in with a share check (``kms.share_check``) while logged in as an official, so
the record names the official and the member. The report classifies every member of the set:

- ``confirmed``: checked in during this drill;
- ``recent``: not in this drill, but a successful check within ``stale_after_days`` before it;
- ``stale``: the last successful check is older than that;
- ``missing``: never checked.

and says whether a quorum is reachable with the confirmed shares alone, and with the recent
ones too, respecting SLIP-39 groups (``group_threshold`` groups, each with its member
threshold). Sites are not modelled yet: the report names this node's site, the only one.

Pure: the caller reads the drill, the members and the checks from the store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from kms.custody import ShareSetDescriptor
    from kms.keyring import SetName
    from kms.rekey import ShareMember

DAY = 86400.0
MIN_DURATION = 60.0
MAX_DURATION = 90 * DAY
MAX_STALE_DAYS = 3650
STATES = ("confirmed", "recent", "stale", "missing")
SITE_NOTE = (
    "sites are not modelled yet: this is the one site this node serves; a report per site "
    "comes with the sites issue"
)


@dataclass(frozen=True)
class Drill:
    id: str
    set_name: SetName
    started_at: float
    deadline: float
    stale_after_days: int
    started_by: str
    site: str
    node: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "set": {"identifier": self.set_name[0], "generation": self.set_name[1]},
            "started_at": self.started_at,
            "deadline": self.deadline,
            "stale_after_days": self.stale_after_days,
            "started_by": self.started_by,
            "site": self.site,
            "node": self.node,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Drill:
        return cls(
            id=str(data["id"]),
            set_name=(int(data["set"]["identifier"]), int(data["set"]["generation"])),
            started_at=float(data["started_at"]),
            deadline=float(data["deadline"]),
            stale_after_days=int(data["stale_after_days"]),
            started_by=str(data["started_by"]),
            site=str(data["site"]),
            node=str(data["node"]),
        )

    def is_open(self, now: float) -> bool:
        return now <= self.deadline


@dataclass(frozen=True)
class Check:
    """One successful share check of a member of a set."""

    member: str
    at: float
    official: str | None = None
    drill: str | None = None


def start(
    *,
    set_name: SetName,
    started_by: str,
    now: float,
    duration: float,
    stale_after_days: int,
    site: str,
    node: str,
) -> Drill:
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise InvalidRequestError(
            f"a drill lasts between {int(MIN_DURATION)} seconds and {int(MAX_DURATION // DAY)} "
            f"days; got {duration:g} seconds"
        )
    if not 1 <= stale_after_days <= MAX_STALE_DAYS:
        raise InvalidRequestError(
            f"stale_after_days must be between 1 and {MAX_STALE_DAYS}; got {stale_after_days}"
        )
    return Drill(
        id=str(uuid.uuid4()),
        set_name=set_name,
        started_at=now,
        deadline=now + duration,
        stale_after_days=stale_after_days,
        started_by=started_by,
        site=site,
        node=node,
    )


def quorum_reachable(descriptor: ShareSetDescriptor, members: Iterable[str]) -> bool:
    """Could these members unseal together? ``group_threshold`` groups, each at its threshold."""
    present: dict[int, int] = {}
    for member in set(members):
        group = int(member.split(".", 1)[0])
        present[group] = present.get(group, 0) + 1
    groups_met = sum(
        1
        for index, (threshold, _) in enumerate(descriptor.groups)
        if present.get(index, 0) >= threshold
    )
    return groups_met >= descriptor.group_threshold


def report(
    drill: Drill,
    descriptor: ShareSetDescriptor | None,
    members: Sequence[ShareMember],
    checks: Sequence[Check],
    *,
    now: float,
) -> dict[str, Any]:
    """The drill's report (``GET /v1/ekms/drills/{id}``).

    ``descriptor`` is the set in force, or None when a rekey has replaced the drill's set since
    it started: then every member is listed but no quorum is reachable, since none of those
    shares unseals any more.
    """
    in_force = descriptor is not None and (descriptor.identifier, descriptor.generation) == (
        drill.set_name
    )
    names = descriptor.members if descriptor is not None and in_force else []
    names += sorted({m.member for m in members} - set(names))
    horizon = drill.started_at - drill.stale_after_days * DAY
    holders = {m.member: m.holder for m in members}
    committed = {m.member for m in members if m.commitment is not None}
    rows = []
    by_state: dict[str, list[str]] = {state: [] for state in STATES}
    for member in names:
        mine = [c for c in checks if c.member == member]
        in_drill = [c for c in mine if c.drill == drill.id]
        last = max(mine, key=lambda c: c.at, default=None)
        if in_drill:
            state = "confirmed"
        elif last is None:
            state = "missing"
        elif last.at >= horizon:
            state = "recent"
        else:
            state = "stale"
        by_state[state].append(member)
        latest = max(in_drill, key=lambda c: c.at) if in_drill else last
        rows.append(
            {
                "member": member,
                "group": int(member.split(".", 1)[0]),
                "holder": holders.get(member),
                "checkable": member in committed,
                "state": state,
                "last_confirmed_at": None if last is None else last.at,
                "confirmed_by": None if latest is None else latest.official,
            }
        )
    confirmed = by_state["confirmed"]
    healthy = confirmed + by_state["recent"]
    shape = descriptor.groups if descriptor is not None and in_force else ()
    groups = [
        {
            "group": index,
            "member_threshold": threshold,
            "member_count": count,
            "confirmed": sum(1 for m in confirmed if m.startswith(f"{index}.")),
            "confirmed_or_recent": sum(1 for m in healthy if m.startswith(f"{index}.")),
        }
        for index, (threshold, count) in enumerate(shape)
    ]
    quorum = {"with_confirmed": False, "with_confirmed_or_recent": False}
    if descriptor is not None and in_force:
        quorum = {
            "with_confirmed": quorum_reachable(descriptor, confirmed),
            "with_confirmed_or_recent": quorum_reachable(descriptor, healthy),
        }
    return {
        **drill.to_json(),
        "open": drill.is_open(now),
        "in_force": in_force,
        "share_set": descriptor.public_json() if descriptor is not None and in_force else None,
        "members": rows,
        "counts": {state: len(found) for state, found in by_state.items()},
        "groups": groups,
        "quorum": quorum,
        "sites": [{"site": drill.site, "node": drill.node, "quorum_reachable": quorum}],
        "site_note": SITE_NOTE,
    }
