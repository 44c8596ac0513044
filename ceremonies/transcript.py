"""The ceremony transcript: built from the journal, hashed canonically, signed by all.

A transcript is a JSON object (``body``) that says who took part (principal, ceremony role, key
thumbprint and public key), every step (what, who, when in UTC, outcome, the service's request
ids, deviations with their reasons) and how the ceremony ended. Its digest is

    SHA-256("embassy-kms/ceremony-transcript/v1\\n" || canonical JSON of body)

(``kms.canonical``, RFC 8785), so the same body gives the same digest everywhere. Each
participant signs the digest with their own key (an ES256 or EdDSA compact JWS, typ
``ekms-ceremony+jwt``); the service checks those signatures against its principal registry,
signs the digest with its HSM audit key (typ ``ekms-ceremony-service+jwt``) and appends an
audit record that carries the digest. The file the participants keep is

    {"transcript": body, "digest": hex, "signatures": [...], "service_signature": {...}}

Nothing secret is ever in a body: no share, token, OTP or private key, only share member ids
and the service's answers.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kms import jose
from kms.canonical import canonical_json
from kms.errors import AuthenticationError, InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ceremonies.state import Progress

TRANSCRIPT_VERSION = 1
DIGEST_PREFIX = b"embassy-kms/ceremony-transcript/v1\n"
SIGNATURE_TYPE = "ekms-ceremony+jwt"
SERVICE_SIGNATURE_TYPE = "ekms-ceremony-service+jwt"
MAX_PARTICIPANTS = 24
MAX_STEPS = 64
# The audit record carries the whole transcript, so an auditor's export holds it; this bounds
# what people's typed notes can add to one record.
MAX_TRANSCRIPT_BYTES = 256 * 1024
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def digest(body: Mapping[str, Any]) -> str:
    return _digest_of(canonical_json(dict(body)))


def _digest_of(canonical: bytes) -> str:
    return hashlib.sha256(DIGEST_PREFIX + canonical).hexdigest()


def build(progress: Progress) -> dict[str, Any]:
    """The transcript body of a journal that has ended (or been refused before step 1)."""
    start = progress.start
    if start is None or progress.end is None:
        raise InvalidRequestError("a transcript is made only once the ceremony has ended")
    participants = [
        {k: v for k, v in p.items() if k != "key_file"} for p in start.get("participants", [])
    ]
    checked = list(progress.identities) + [
        e
        for events in progress.events.values()
        for e in events
        if e.get("what") == "identity-checked" and e.get("service") != "peer"
    ]
    roles_by_principal = {p["principal"]: p.get("service_roles") for p in checked}
    for participant in participants:
        found = roles_by_principal.get(participant["principal"])
        if found is not None:
            participant["service_roles"] = found
    body: dict[str, Any] = {
        "version": TRANSCRIPT_VERSION,
        "ceremony": start["ceremony"],
        "script": start["script"],
        "rehearsal": bool(start.get("rehearsal")),
        "service": start.get("service", {}),
        "participants": participants,
        "identity_check": progress.identities,
        "started_at": start["at"],
        "resumptions": [{"at": r["at"], "next_step": r["next_step"]} for r in progress.resumptions],
        "abandoned_attempts": start.get("abandoned", []),
        "steps": [_step(record, progress.step_events(record["step"])) for record in progress.steps],
        "ended_at": progress.end["at"],
        "outcome": progress.end["outcome"],
    }
    if progress.end.get("reason"):
        body["abort_reason"] = progress.end["reason"]
    if start.get("peer"):  # a ceremony that spans two sites: the other one
        body["peer"] = start["peer"]
        body["peer_identity_check"] = progress.peer_identities
    return body


def _step(record: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    kept = [{k: v for k, v in e.items() if k not in ("type", "step")} for e in events]
    # Each service audits under its own request ids: the peer's are listed apart, to be looked
    # up in the peer's log.
    request_ids = [
        str(e["request_id"]) for e in kept if e.get("request_id") and e.get("service") != "peer"
    ]
    step = {k: v for k, v in record.items() if k not in ("type", "step", "at")}
    step.update(
        number=record["step"],
        ended_at=record["at"],
        events=kept,
        request_ids=list(dict.fromkeys(request_ids)),
    )
    peer_ids = [
        str(e["request_id"]) for e in kept if e.get("request_id") and e.get("service") == "peer"
    ]
    if peer_ids:
        step["peer_request_ids"] = list(dict.fromkeys(peer_ids))
    return step


# --- signatures ------------------------------------------------------------------------------


def signature_claims(
    body: Mapping[str, Any], principal: str, audience: str, now: float
) -> dict[str, Any]:
    """What a participant signs: the digest, bound to this ceremony and this deployment."""
    return {
        "iss": principal,
        "aud": audience,
        "ceremony": body["ceremony"],
        "digest": digest(body),
        "iat": int(now),
        "jti": str(uuid.uuid4()),
    }


def check_signature(
    token: str,
    key: jose.PublicJwk,
    *,
    principal: str,
    body_digest: str,
    ceremony: str,
    audience: str,
) -> None:
    """A participant's signature over this transcript; ``AuthenticationError`` says why not."""
    jws = jose.verify_jws(token, key, typ=SIGNATURE_TYPE)
    claims = jws.claims
    if claims.get("iss") != principal:
        raise AuthenticationError("signature issued by another principal")
    if claims.get("aud") != audience:
        raise AuthenticationError("signature for another deployment")
    if claims.get("ceremony") != ceremony or claims.get("digest") != body_digest:
        raise AuthenticationError("signature over another transcript")


def check_service_signature(token: str, key: jose.PublicJwk, body_digest: str) -> dict[str, Any]:
    """The service's signature over this transcript, under its audit key (obtained out of band)."""
    jws = jose.verify_jws(token, key, typ=SERVICE_SIGNATURE_TYPE)
    if jws.claims.get("digest") != body_digest:
        raise AuthenticationError("the service signed another transcript")
    return dict(jws.claims)


@dataclass(frozen=True)
class Summary:
    """What the service reads from a submitted transcript, each field checked."""

    ceremony: str
    script: str
    script_sha256: str
    outcome: str
    rehearsal: bool
    participants: tuple[Mapping[str, Any], ...]
    steps: tuple[dict[str, Any], ...]
    digest: str

    @classmethod
    def of(cls, body: object) -> Summary:  # noqa: C901 - one check per field
        if not isinstance(body, dict):
            raise InvalidRequestError("transcript must be a JSON object")
        if body.get("version") != TRANSCRIPT_VERSION:
            raise InvalidRequestError(f"transcript version must be {TRANSCRIPT_VERSION}")
        ceremony = body.get("ceremony")
        try:
            uuid.UUID(str(ceremony))
        except ValueError:
            raise InvalidRequestError("transcript ceremony must be a UUID") from None
        script = body.get("script")
        if not isinstance(script, dict):
            raise InvalidRequestError("transcript script must name the script and its sha256")
        name, sha = script.get("name"), script.get("sha256")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise InvalidRequestError("transcript script.name must be 1-64 characters")
        if not isinstance(sha, str) or not _DIGEST_RE.fullmatch(sha):
            raise InvalidRequestError("transcript script.sha256 must be 64 hex digits")
        outcome = body.get("outcome")
        if outcome not in ("completed", "aborted"):
            raise InvalidRequestError("transcript outcome must be completed or aborted")
        if not isinstance(body.get("rehearsal"), bool):
            raise InvalidRequestError("transcript rehearsal must be true or false")
        encoded = canonical_json(body)
        if len(encoded) > MAX_TRANSCRIPT_BYTES:
            raise InvalidRequestError(
                f"transcript is {len(encoded)} bytes as canonical JSON; at most "
                f"{MAX_TRANSCRIPT_BYTES} are recorded"
            )
        participants = _participants(body.get("participants"))
        steps = body.get("steps")
        if not isinstance(steps, list) or len(steps) > MAX_STEPS:
            raise InvalidRequestError(f"transcript steps must be a list of at most {MAX_STEPS}")
        summaries = [_step_summary(n, step) for n, step in enumerate(steps, 1)]
        return cls(
            ceremony=str(ceremony),
            script=name,
            script_sha256=sha,
            outcome=str(outcome),
            rehearsal=bool(body["rehearsal"]),
            participants=participants,
            steps=tuple(summaries),
            digest=_digest_of(encoded),
        )


def _step_summary(n: int, step: object) -> dict[str, Any]:
    """One line of the audit record per step (the whole transcript rides along)."""
    if not isinstance(step, dict) or step.get("number") != n:
        raise InvalidRequestError(f"transcript step {n} is not step number {n}")
    summary: dict[str, Any] = {
        "number": n,
        "kind": str(step.get("kind", ""))[:16],
        "name": str(step.get("action") or "check")[:64],
        "outcome": str(step.get("outcome", ""))[:16],
        "deviations": len(step.get("deviations") or []),
    }
    if step.get("site") is not None:  # a two-site ceremony: where the step happened
        summary["site"] = str(step["site"])[:64]
    return summary


def _participants(value: object) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_PARTICIPANTS:
        raise InvalidRequestError(
            f"transcript participants must be a list of 1 to {MAX_PARTICIPANTS}"
        )
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, dict):
            raise InvalidRequestError("each participant must be a JSON object")
        principal = item.get("principal")
        if not isinstance(principal, str) or not principal or len(principal) > 64:
            raise InvalidRequestError("each participant needs a principal id")
        if principal in seen:
            raise InvalidRequestError(f"participant {principal!r} is listed twice")
        seen.add(principal)
        if not isinstance(item.get("role"), str) or not isinstance(item.get("thumbprint"), str):
            raise InvalidRequestError(f"participant {principal!r} needs a role and a thumbprint")
    return tuple(value)


# --- checking a transcript file offline ------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    digest_ok: bool
    signed_by: tuple[str, ...]
    problems: tuple[str, ...]
    service: dict[str, Any] | None


def check_file(document: Mapping[str, Any], service_key: jose.PublicJwk | None) -> FileCheck:
    """Recompute the digest; check each signature against the public key the body lists.

    The service checked those keys against its registry when it signed; ``service_key`` (the
    audit key, obtained out of band) checks the service's signature.
    """
    body = document.get("transcript")
    if not isinstance(body, dict):
        return FileCheck(
            digest_ok=False, signed_by=(), problems=("the file holds no transcript",), service=None
        )
    problems: list[str] = []
    actual = digest(body)
    if document.get("digest") != actual:
        problems.append("the digest in the file is not the transcript's digest")
    keys = {p["principal"]: p.get("jwk") for p in body.get("participants", [])}
    audience = str(body.get("service", {}).get("audience", ""))
    signed: list[str] = []
    for item in document.get("signatures", []):
        principal = item.get("principal")
        try:
            check_signature(
                str(item.get("jws")),
                jose.parse_public_jwk(keys.get(principal)),
                principal=str(principal),
                body_digest=actual,
                ceremony=str(body.get("ceremony")),
                audience=audience,
            )
            signed.append(str(principal))
        except (AuthenticationError, InvalidRequestError) as exc:
            reason = exc.reason if isinstance(exc, AuthenticationError) else str(exc)
            problems.append(f"signature of {principal}: {reason}")
    service = document.get("service_signature")
    claims = None
    if isinstance(service, dict) and service_key is not None:
        try:
            claims = check_service_signature(str(service.get("jws")), service_key, actual)
        except AuthenticationError as exc:
            problems.append(f"service signature: {exc.reason}")
    return FileCheck(document.get("digest") == actual, tuple(signed), tuple(problems), claims)
