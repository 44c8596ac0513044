"""Transcripts: built from a journal, digested canonically, signed, checked and rendered."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api.principal_keys import KeyHolder
from ceremonies import transcript
from ceremonies.render import escape, render_markdown
from ceremonies.state import Progress
from kms.errors import AuthenticationError, InvalidRequestError
from kms.jose import parse_public_jwk

AUDIENCE = "embassy-kms/home"
ADMIN = KeyHolder.generate("admin")
WITNESS = KeyHolder.generate("witness", "EdDSA")
CEREMONY = "0b7a7a8e-0000-4000-8000-000000000001"


def participant(holder: KeyHolder, role: str) -> dict[str, Any]:
    return {
        "principal": holder.principal,
        "role": role,
        "thumbprint": parse_public_jwk(holder.jwk).thumbprint,
        "jwk": holder.jwk,
        "key_file": f"/keys/{holder.principal}.jwk",
    }


def progress(outcome: str = "completed") -> Progress:
    entries: list[dict[str, Any]] = [
        {
            "type": "start",
            "ceremony": CEREMONY,
            "at": "2025-06-15T15:06:40.000Z",
            "script": {"name": "tiny", "title": "Tiny", "sha256": "ab" * 32},
            "rehearsal": False,
            "service": {"address": "http://127.0.0.1:8200", "audience": AUDIENCE},
            "participants": [participant(ADMIN, "administrator"), participant(WITNESS, "witness")],
            "abandoned": [],
        },
        {"type": "event", "step": 1, "at": "t", "what": "rotated", "request_id": "r-1", "key": "k"},
        {
            "type": "step",
            "step": 1,
            "at": "2025-06-15T15:07:00.000Z",
            "started_at": "2025-06-15T15:06:50.000Z",
            "title": "Rotate | *everything*",
            "kind": "action",
            "action": "keys.rotate",
            "by": ["admin"],
            "outcome": "deviation",
            "summary": "ok",
            "deviations": [{"reason": "## fake heading\n| x |", "recorded_by": "admin", "at": "t"}],
        },
        {"type": "end", "at": "2025-06-15T15:08:00.000Z", "outcome": outcome},
    ]
    return Progress.replay(1, entries)


def signed_document() -> dict[str, Any]:
    body = transcript.build(progress())
    signatures = [
        {
            "principal": holder.principal,
            "jws": holder.sign(
                transcript.signature_claims(body, holder.principal, AUDIENCE, 1_750_000_000),
                typ=transcript.SIGNATURE_TYPE,
            ),
        }
        for holder in (ADMIN, WITNESS)
    ]
    return {"transcript": body, "digest": transcript.digest(body), "signatures": signatures}


def test_build_keeps_no_key_file_and_lists_request_ids() -> None:
    body = transcript.build(progress())
    assert all("key_file" not in p for p in body["participants"])
    assert body["steps"][0]["request_ids"] == ["r-1"]
    assert body["steps"][0]["number"] == 1
    assert body["steps"][0]["events"] == [
        {"at": "t", "what": "rotated", "request_id": "r-1", "key": "k"}
    ]


def test_digest_is_canonical_and_sensitive() -> None:
    body = transcript.build(progress())
    reordered = dict(reversed(list(body.items())))
    assert transcript.digest(reordered) == transcript.digest(body)
    changed = copy.deepcopy(body)
    changed["steps"][0]["deviations"][0]["reason"] = "another"
    assert transcript.digest(changed) != transcript.digest(body)


def test_signatures_check_offline() -> None:
    document = signed_document()
    check = transcript.check_file(document, None)
    assert check.digest_ok
    assert check.problems == ()
    assert check.signed_by == ("admin", "witness")


def test_a_changed_transcript_fails_every_signature() -> None:
    document = signed_document()
    document["transcript"]["outcome"] = "aborted"
    check = transcript.check_file(document, None)
    assert not check.digest_ok
    assert len(check.problems) == 3
    assert "signature over another transcript" in check.problems[1]


def test_a_signature_is_bound_to_its_signer_and_audience() -> None:
    document = signed_document()
    body = document["transcript"]
    token = document["signatures"][0]["jws"]
    key = parse_public_jwk(ADMIN.jwk)
    kwargs = {"body_digest": document["digest"], "ceremony": CEREMONY}
    transcript.check_signature(token, key, principal="admin", audience=AUDIENCE, **kwargs)
    with pytest.raises(AuthenticationError):
        transcript.check_signature(token, key, principal="witness", audience=AUDIENCE, **kwargs)
    with pytest.raises(AuthenticationError):
        transcript.check_signature(token, key, principal="admin", audience="other", **kwargs)
    approval = ADMIN.sign({"iss": "admin", "digest": document["digest"]})  # no typ
    with pytest.raises(AuthenticationError):
        transcript.check_signature(approval, key, principal="admin", audience=AUDIENCE, **kwargs)
    assert transcript.Summary.of(body).digest == document["digest"]


def test_summary_refuses_bad_transcripts() -> None:
    body = transcript.build(progress())
    for change, message in [
        ({"version": 2}, "version"),
        ({"ceremony": "x"}, "UUID"),
        ({"outcome": "won"}, "outcome"),
        ({"participants": []}, "participants"),
        ({"steps": [{"number": 2}]}, "step 1"),
        ({"rehearsal": "no"}, "rehearsal"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            transcript.Summary.of({**body, **change})
    with pytest.raises(InvalidRequestError, match="float"):
        transcript.Summary.of({**body, "extra": 1.5})


def test_summary_steps_are_bounded() -> None:
    summary = transcript.Summary.of(transcript.build(progress()))
    assert summary.steps == (
        {
            "number": 1,
            "kind": "action",
            "name": "keys.rotate",
            "outcome": "deviation",
            "deviations": 1,
        },
    )


def test_build_needs_an_ended_ceremony() -> None:
    entries = [{"type": "start", "ceremony": CEREMONY, "at": "t"}]
    with pytest.raises(InvalidRequestError, match="once the ceremony has ended"):
        transcript.build(Progress.replay(1, entries))


def test_markdown_escapes_what_people_typed() -> None:
    document = signed_document()
    text = render_markdown(document, transcript.check_file(document, None))
    assert "# Ceremony transcript: Tiny" in text
    assert "\n## fake heading" not in text
    assert "Rotate \\| \\*everything\\*" in text
    assert "Deviation** recorded by admin" in text
    assert document["digest"] in text
    assert "Digest recomputed: matches." in text
    assert text.count("Signature: ______") == 2
    assert "Not yet signed by the service" in text
    assert escape("a\nb|c") == "a b\\|c"


def test_a_transcript_too_large_to_record_is_refused() -> None:
    body = transcript.build(progress())
    body["steps"][0]["deviations"][0]["reason"] = "x" * transcript.MAX_TRANSCRIPT_BYTES
    with pytest.raises(InvalidRequestError, match="at most 262144 are recorded"):
        transcript.Summary.of(body)


def two_site_progress() -> Progress:
    """A ceremony with a peer: its start names it, a step ran there, an event happened there."""
    start = {
        "type": "start",
        "ceremony": CEREMONY,
        "at": "2025-06-15T15:06:40.000Z",
        "script": {"name": "two", "title": "Two sites", "sha256": "cd" * 32},
        "rehearsal": False,
        "service": {"address": "http://home:8200", "audience": AUDIENCE, "site": "home"},
        "participants": [participant(ADMIN, "administrator"), participant(WITNESS, "witness")],
        "abandoned": [],
        "peer": {
            "address": "http://embassy:8200",
            "audience": "embassy-kms/embassy-1",
            "site": "embassy-1",
            "site_kind": "embassy",
        },
    }
    checked = [{"principal": "admin", "service_roles": ["security-officer"], "request_id": "p-0"}]
    entries: list[dict[str, Any]] = [
        start,
        {"type": "identities", "at": "t", "checked": checked, "service": "peer"},
        {"type": "identities", "at": "t", "checked": [{**checked[0], "request_id": "h-0"}]},
        {"type": "event", "step": 1, "at": "t", "what": "head-signed", "request_id": "p-1"}
        | {"service": "peer"},
        {"type": "event", "step": 1, "at": "t", "what": "head-recorded", "request_id": "h-1"}
        | {"service": "main"},
        {
            "type": "step",
            "step": 1,
            "at": "2025-06-15T15:07:00.000Z",
            "started_at": "2025-06-15T15:06:50.000Z",
            "title": "Record the head",
            "kind": "action",
            "action": "site.record-head",
            "by": ["admin"],
            "outcome": "done",
            "summary": "recorded",
            "deviations": [],
            "service": "main",
            "site": "home",
        },
        {"type": "end", "at": "2025-06-15T15:08:00.000Z", "outcome": "completed"},
    ]
    return Progress.replay(1, entries)


def test_a_two_site_transcript_says_where_each_step_and_request_was() -> None:
    progress = two_site_progress()
    assert [c["request_id"] for c in progress.identities] == ["h-0"]  # not overwritten
    assert [c["request_id"] for c in progress.peer_identities] == ["p-0"]
    body = transcript.build(progress)
    assert body["peer"]["site"] == "embassy-1"
    assert body["peer_identity_check"][0]["request_id"] == "p-0"
    step = body["steps"][0]
    assert (step["service"], step["site"]) == ("main", "home")
    assert step["request_ids"] == ["h-1"]
    assert step["peer_request_ids"] == ["p-1"]
    assert transcript.Summary.of(body).steps[0]["site"] == "home"
    text = render_markdown({"transcript": body, "digest": transcript.digest(body)})
    assert "| Peer | site embassy-1 (embassy) at http://embassy:8200" in text
    assert "- Where: site home (main)" in text
    assert "- Peer's request ids: `p-1`" in text
