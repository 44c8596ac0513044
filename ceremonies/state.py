"""The journal's hash chain and the ceremony's state machine, replayed from journal entries.

The runner appends one entry per thing that happened (start, events inside a step, each step's
record, resumptions, the end) and replays them on the next run. Replaying is also the check:
an entry out of order (a step recorded before the one it follows, an event for a step that is
not the current one, anything after the end) is refused, and so is a line whose hash does not
chain to the one before, so a journal edited by hand is noticed before it is trusted.

The chain has no key: whoever rewrites every later hash too can forge it. It catches slips and
naive edits; what binds the record is the transcript that every participant and the service
sign at the end, and the audit record that holds its digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from kms.canonical import canonical_json
from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

GENESIS = "0" * 64
MAX_LINE_BYTES = 1 << 20
ENTRY_TYPES = frozenset({"start", "identities", "event", "step", "resume", "end"})
STEP_OUTCOMES = frozenset({"done", "deviation", "failed"})
OUTCOMES = frozenset({"completed", "aborted"})


class JournalError(InvalidRequestError):
    """The journal is damaged, edited, or records things in an impossible order."""


def utc_text(seconds: float) -> str:
    """A moment as the transcript writes it: ISO 8601 UTC to the millisecond."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def chain_hash(previous: str, entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(previous) + canonical_json(dict(entry))).hexdigest()


def encode_entry(previous: str, entry: Mapping[str, Any]) -> tuple[bytes, str]:
    """One journal line (canonical JSON, newline-terminated) and the chain's new head."""
    digest = chain_hash(previous, entry)
    return canonical_json({"entry": dict(entry), "hash": digest}) + b"\n", digest


def decode_entries(data: bytes) -> tuple[list[dict[str, Any]], str, int]:
    """The entries of a journal, its last hash, and how many bytes of it are whole lines.

    A last line without its newline was being written when the runner stopped: it was never
    acknowledged, so nothing that followed it happened. It is left out, and the writer cuts it
    off before appending. Every whole line must chain to the one before.
    """
    entries: list[dict[str, Any]] = []
    head = GENESIS
    whole = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:whole].splitlines(), 1):
        if len(line) > MAX_LINE_BYTES:
            raise JournalError(f"journal line {number} is too long")
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise JournalError(f"journal line {number} is not JSON") from None
        entry = obj.get("entry") if isinstance(obj, dict) else None
        if not isinstance(entry, dict) or not isinstance(obj.get("hash"), str):
            raise JournalError(f"journal line {number} is not a journal entry")
        if chain_hash(head, entry) != obj["hash"]:
            raise JournalError(
                f"journal line {number} does not match its hash chain: the journal was edited"
            )
        head = obj["hash"]
        entries.append(entry)
    return entries, head, whole


@dataclass
class Progress:
    """A ceremony as its journal tells it; ``apply`` refuses anything out of order."""

    total_steps: int
    start: dict[str, Any] | None = None
    identities: list[dict[str, Any]] = field(default_factory=list)
    peer_identities: list[dict[str, Any]] = field(default_factory=list)  # checked at --peer
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    resumptions: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @classmethod
    def replay(cls, total_steps: int, entries: Iterable[Mapping[str, Any]]) -> Progress:
        progress = cls(total_steps)
        for n, entry in enumerate(entries, 1):
            try:
                progress.apply(entry)
            except JournalError as exc:
                raise JournalError(f"journal entry {n}: {exc}") from None
        return progress

    @property
    def ceremony(self) -> str:
        return str(self.start["ceremony"]) if self.start else ""

    @property
    def next_step(self) -> int:
        return len(self.steps) + 1

    @property
    def ended(self) -> bool:
        return self.end is not None

    def step_events(self, number: int) -> list[dict[str, Any]]:
        return self.events.get(number, [])

    def apply(self, entry: Mapping[str, Any]) -> None:  # noqa: C901, PLR0912 - one rule per type
        kind = entry.get("type")
        if kind not in ENTRY_TYPES:
            raise JournalError(f"unknown entry type {kind!r}")
        if self.start is None and kind != "start":
            raise JournalError("a journal must begin with the ceremony's start")
        if self.start is not None and kind == "start":
            raise JournalError("a ceremony starts only once")
        if self.end is not None:
            raise JournalError(f"{kind} recorded after the ceremony ended")
        if kind == "start":
            if not isinstance(entry.get("ceremony"), str) or not entry["ceremony"]:
                raise JournalError("the start names no ceremony id")
            self.start = dict(entry)
        elif kind == "identities" and entry.get("service") == "peer":
            self.peer_identities = list(entry.get("checked", []))
        elif kind == "identities":
            self.identities = list(entry.get("checked", []))
        elif kind == "event":
            self._expect_current(entry, "an event")
            self.events.setdefault(int(entry["step"]), []).append(dict(entry))
        elif kind == "step":
            self.complete(entry)
        elif kind == "resume":
            self.resumptions.append(dict(entry))
        else:
            if entry.get("outcome") not in OUTCOMES:
                raise JournalError("the end must say completed or aborted")
            if entry["outcome"] == "completed" and self.next_step <= self.total_steps:
                raise JournalError(
                    f"completed recorded with step {self.next_step} of {self.total_steps} not run"
                )
            self.end = dict(entry)

    def complete(self, entry: Mapping[str, Any]) -> None:
        """Record a step's outcome: only the current step, and only once."""
        self._expect_current(entry, "step record")
        if entry.get("outcome") not in STEP_OUTCOMES:
            raise JournalError("a step's outcome is done, deviation or failed")
        if self.steps and self.steps[-1].get("outcome") == "failed":
            raise JournalError("no step runs after a failed one")
        self.steps.append(dict(entry))

    def _expect_current(self, entry: Mapping[str, Any], what: str) -> None:
        number = entry.get("step")
        if not isinstance(number, int) or isinstance(number, bool):
            raise JournalError(f"{what} names no step")
        if number != self.next_step:
            raise JournalError(
                f"{what} for step {number} out of order: the current step is {self.next_step}"
            )
        if number > self.total_steps:
            raise JournalError(f"step {number} is beyond the script's {self.total_steps} steps")
