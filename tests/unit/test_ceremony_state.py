"""The journal's hash chain and the ceremony state machine."""

from __future__ import annotations

from typing import Any

import pytest

from ceremonies.state import (
    GENESIS,
    JournalError,
    Progress,
    decode_entries,
    encode_entry,
    utc_text,
)

START = {"type": "start", "ceremony": "c-1", "at": "t0", "participants": []}


def step(number: int, outcome: str = "done") -> dict[str, Any]:
    return {"type": "step", "step": number, "at": "t", "outcome": outcome, "title": f"s{number}"}


def journal(*entries: dict[str, Any]) -> bytes:
    head, out = GENESIS, b""
    for entry in entries:
        line, head = encode_entry(head, entry)
        out += line
    return out


def test_round_trip() -> None:
    entries = [START, {"type": "event", "step": 1, "what": "x"}, step(1)]
    decoded, head, whole = decode_entries(journal(*entries))
    assert decoded == entries
    assert whole == len(journal(*entries))
    assert head != GENESIS


def test_an_edited_line_is_named() -> None:
    data = journal(START, step(1), step(2))
    edited = data.replace(b'"outcome":"done","step":1', b'"outcome":"failed","step":1')
    assert edited != data
    with pytest.raises(JournalError, match="journal line 2 does not match its hash chain"):
        decode_entries(edited)


def test_a_removed_line_breaks_the_chain() -> None:
    lines = journal(START, step(1), step(2)).splitlines(keepends=True)
    with pytest.raises(JournalError, match="line 2"):
        decode_entries(lines[0] + lines[2])


def test_a_torn_last_line_is_dropped() -> None:
    data = journal(START, step(1))
    torn = data + journal(START, step(1), step(2))[len(data) : len(data) + 20]
    entries, _, whole = decode_entries(torn)
    assert len(entries) == 2
    assert whole == len(data)


def test_garbage_is_refused() -> None:
    with pytest.raises(JournalError, match="not JSON"):
        decode_entries(b"nonsense\n")
    with pytest.raises(JournalError, match="not a journal entry"):
        decode_entries(b"[1]\n")


def test_replay_tracks_steps_events_and_end() -> None:
    progress = Progress.replay(
        2,
        [
            START,
            {"type": "event", "step": 1, "what": "a"},
            step(1),
            {"type": "resume", "at": "t1", "next_step": 2},
            step(2, "deviation"),
            {"type": "end", "at": "t2", "outcome": "completed"},
        ],
    )
    assert progress.ceremony == "c-1"
    assert progress.next_step == 3
    assert progress.ended
    assert progress.step_events(1)[0]["what"] == "a"
    assert progress.resumptions[0]["next_step"] == 2


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([step(1)], "must begin with the ceremony's start"),
        ([START, START], "starts only once"),
        ([START, step(2)], "step 2 out of order: the current step is 1"),
        ([START, step(1), step(1)], "step 1 out of order"),
        ([START, {"type": "event", "step": 2, "what": "x"}], "event for step 2 out of order"),
        ([START, step(1, "failed"), step(2)], "no step runs after a failed one"),
        ([START, step(1), {"type": "end", "outcome": "completed"}], "step 2 of 2 not run"),
        ([START, {"type": "end", "outcome": "aborted"}, step(1)], "after the ceremony ended"),
        ([START, {"type": "teleport"}], "unknown entry type"),
        ([START, step(1, "fine")], "done, deviation or failed"),
        ([START, step(1), step(2), step(3)], "beyond the script.s 2 steps"),
    ],
)
def test_out_of_order(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(JournalError, match=message):
        Progress.replay(2, entries)


def test_utc_text() -> None:
    assert utc_text(1_750_000_000.5) == "2025-06-15T15:06:40.500Z"
