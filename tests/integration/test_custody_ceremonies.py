"""The custody ceremonies (rekey-custodians, share-drill) run by ``ekms ceremony run`` in a
pseudo-terminal against a real server, as the ceremony tests run the others."""

from __future__ import annotations

import json
import re
import signal
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import pytest

from tests.support.ceremony import (
    SHOWN_SHARE,
    Site,
    Terminal,
    check_landed,
    key_file,
    site,
    transcript_of,
)

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["site"]  # the ceremony tests' fixture, reused


def test_rekey_custodians_ceremony(site: Site, tmp_path: Path) -> None:
    world, old = site.world, site.shares
    keys = tmp_path / "keys"
    keys.mkdir()
    people = [world.officer, site.auditor, *world.officials]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "rekey-custodians")
    run.present([(p.id, key_file(keys, p)) for p in people])
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    announced = run.expect(r"Each official checks it before typing a share\.")
    nonce = re.findall(r"Rekey nonce: ([0-9a-f-]{36})", announced)[-1]
    run.answer(r"official-0: type your share for rekey [0-9a-f]{8}[^:]*: ", old[0])
    run.answer(r"official-1: type your share for rekey [0-9a-f]{8}[^:]*: ", old[2])
    new = {}
    for official in ("official-0", "official-1", "official-2"):
        shown = run.answer(
            rf"{official}: have you written it down and checked every word\? \[y/n\]: ", "y"
        )
        new[official] = SHOWN_SHARE.findall(shown)[-1]
    assert len(set(new.values())) == 3
    run.answer(
        r"official-0: type your share for verifying the new shares[^:]*: ", new["official-0"]
    )
    run.answer(
        r"official-1: type your share for verifying the new shares[^:]*: ", new["official-1"]
    )
    for official in ("official-0", "official-1", "official-2"):
        run.answer(rf"{official}: type your share for a share check[^:]*: ", new[official])
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen

    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "completed"
    assert [s["outcome"] for s in body["steps"]] == ["done"] * 6
    started = [e for e in body["steps"][1]["events"] if e["what"] == "rekey-started"]
    assert started[0]["nonce"] == nonce
    handed = [e for e in body["steps"][2]["events"] if e["what"] == "new-share-member"]
    assert [(e["principal"], e["member"]) for e in handed] == [
        ("official-0", "0.0"),
        ("official-1", "0.1"),
        ("official-2", "0.2"),
    ]
    assert "in force" in body["steps"][3]["summary"]
    checked = [e for e in body["steps"][4]["events"] if e["what"] == "share-checked"]
    assert len(checked) == 3
    officer = world.login(world.officer)
    check_landed(world, officer, transcript_of(directory))
    for written in directory.iterdir():
        text = written.read_text()
        for share in [*old, *new.values()]:
            assert " ".join(share.split()[:4]) not in text, written

    vault = hvac.Client(url=world.server.url, token=world.root)
    vault.sys.seal()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.submit_unseal_key(old[1])
    vault.sys.submit_unseal_keys([new["official-2"], new["official-0"]])
    assert not vault.sys.is_sealed()
    members = world.call("GET", "ekms/shares", officer).json()["data"]["members"]
    assert [m["holder"] for m in members] == ["official-0", "official-1", "official-2"]


def test_share_drill_ceremony(site: Site, tmp_path: Path) -> None:
    world, shares = site.world, site.shares
    keys = tmp_path / "keys"
    keys.mkdir()
    people = [world.officer, site.auditor, *world.officials]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "share-drill")
    run.present([(p.id, key_file(keys, p)) for p in people])
    run.answer(r"official-0: type your share for drill [0-9a-f]{8}[^:]*: ", shares[0])
    words = shares[1].split()
    wrong = " ".join([*words[:-1], "academic" if words[-1] != "academic" else "acid"])
    rejected = run.answer(r"official-1: type your share for drill [0-9a-f]{8}[^:]*: ", wrong)
    assert "Share confirmed (official-0, member 0.0)" in rejected
    refused = run.answer(r"official-1: type your share for drill [0-9a-f]{8}[^:]*: ", shares[1])
    assert "Share refused" in refused
    assert wrong not in refused  # no echo, and the message never quotes the share
    confirmed = run.answer(r"official-2: type your share for drill [0-9a-f]{8}[^:]*: ", "")
    assert "Share confirmed (official-1, member 0.1)" in confirmed
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    run.sign_all(len(people))
    assert run.end() == 0, run.seen
    assert "member 0.2: missing (no holder recorded)" in run.seen

    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "completed"
    summary = body["steps"][2]["summary"]
    assert "2 confirmed" in summary
    assert "a quorum is reachable" in summary
    report_event = next(e for e in body["steps"][2]["events"] if e["what"] == "drill-report")
    assert report_event["counts"] == {"confirmed": 2, "recent": 0, "stale": 0, "missing": 1}
    events = [e["what"] for e in body["steps"][1]["events"]]
    assert events == ["checked-in", "share-rejected", "checked-in", "share-passed"]
    text = json.dumps(transcript_of(directory))
    assert not any(" ".join(s.split()[:4]) in text for s in shares)
    check_landed(world, world.login(world.officer), transcript_of(directory))


def test_a_rekey_ceremony_killed_midway_leaves_the_old_set(site: Site, tmp_path: Path) -> None:
    """The runner dies while the new shares are being handed out: they exist nowhere else, so
    the resumed run cancels the rekey; the old shares still unseal, the new ones never did."""
    world, old = site.world, site.shares
    keys = tmp_path / "keys"
    keys.mkdir()
    people = [world.officer, site.auditor, *world.officials]
    directory = tmp_path / "transcripts"
    run = Terminal(world.server.url, directory, "rekey-custodians")
    run.present([(p.id, key_file(keys, p)) for p in people])
    run.answer(r"auditor: confirmed\? \[y/n\]: ", "y")
    run.answer(r"official-0: type your share for rekey [0-9a-f]{8}[^:]*: ", old[0])
    run.answer(r"official-1: type your share for rekey [0-9a-f]{8}[^:]*: ", old[2])
    shown = run.answer(
        r"official-0: have you written it down and checked every word\? \[y/n\]: ", "y"
    )
    first_new = SHOWN_SHARE.findall(shown)[-1]
    run.expect(r"official-1: have you written it down")
    run.child.kill(signal.SIGKILL)
    run.child.close(force=True)

    vault = hvac.Client(url=world.server.url, token=world.root)
    before = world.server.runtime.store.get_share_set()
    assert vault.sys.read_rekey_progress()["phase"] == "verifying"

    again = Terminal(world.server.url, directory, "rekey-custodians")
    again.answer(r"Resume or start over\?.*: ", "r")
    again.answer(
        r"officer: the service's rekey nonce is [0-9a-f-]+\. Is it the one[^:]*\? \[y/n\]: ", "y"
    )
    failed = again.answer(
        r"officer: what now\? \(r = retry the step, a = stop the ceremony\): ", "a"
    )
    assert "lost when it stopped" in failed
    again.sign_all(len(people))
    assert again.end() == 1, again.seen
    body = transcript_of(directory)["transcript"]
    assert body["outcome"] == "aborted"
    assert vault.sys.read_rekey_progress()["started"] is False
    assert world.server.runtime.store.get_share_set() == before
    assert world.server.runtime.store.pending_rekey() is None
    vault.sys.seal()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="another share set"):
        vault.sys.submit_unseal_key(first_new)
    vault.sys.submit_unseal_keys(old[1:])
    assert not vault.sys.is_sealed()
