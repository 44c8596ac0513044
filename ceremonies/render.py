"""A transcript as a readable Markdown document, with lines for signing it on paper too.

The document repeats the digest that every signature covers, so that a participant signing the
paper copy signs the same thing their key signed. Text from the transcript is escaped so that a
deviation reason cannot forge a heading, a table row or a signature line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ceremonies.transcript import FileCheck

_SPECIAL = re.compile(r"([\\`*_\[\]|<>~])")  # values never start a line: these suffice


def escape(value: object) -> str:
    """One line of inert Markdown: specials escaped, newlines and controls as spaces."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return _SPECIAL.sub(r"\\\1", text)


def code(value: object) -> str:
    """A code span: backticks cannot occur in it, and nothing inside needs escaping."""
    return "`" + "".join(c for c in str(value) if c.isprintable() and c != "`") + "`"


def render_markdown(document: Mapping[str, Any], check: FileCheck | None = None) -> str:
    body: Mapping[str, Any] = document.get("transcript", {})
    script = body.get("script", {})
    lines: list[str] = []
    add = lines.append
    title = script.get("title") or script.get("name", "ceremony")
    add(f"# Ceremony transcript: {escape(title)}")
    add("")
    if body.get("rehearsal"):
        add("> **REHEARSAL.** This ceremony ran against a throwaway service and token. It changed")
        add("> nothing real and holds no real share or key.")
        add("")
    service = body.get("service", {})
    rows = [
        ("Ceremony id", body.get("ceremony")),
        ("Script", f"{script.get('name')} (SHA-256 {script.get('sha256')})"),
        ("Service", f"{service.get('address', '')} ({service.get('audience', '')})"),
        ("Started", body.get("started_at")),
        ("Ended", body.get("ended_at")),
        ("Outcome", body.get("outcome")),
    ]
    peer = body.get("peer")
    if isinstance(peer, dict):
        where = f"site {peer.get('site')} ({peer.get('site_kind')}) at {peer.get('address')}"
        rows.append(("Peer", f"{where} ({peer.get('audience')})"))
    if body.get("abort_reason"):
        rows.append(("Reason", body["abort_reason"]))
    rows.extend(
        ("Resumed", f"{r.get('at')} at step {r.get('next_step')}")
        for r in body.get("resumptions", [])
    )
    rows.extend(
        (
            "Abandoned attempt",
            (
                f"{a.get('ceremony')}: {a.get('steps_completed')} steps done, "
                f"journal {a.get('journal')} (last hash {a.get('last_hash')})"
            ),
        )
        for a in body.get("abandoned_attempts", [])
    )
    add("| | |")
    add("| --- | --- |")
    lines.extend(f"| {label} | {escape(value)} |" for label, value in rows)
    add("")
    _participants(lines, body)
    _steps(lines, body)
    _signatures(lines, document, check)
    return "\n".join(lines) + "\n"


def _participants(lines: list[str], body: Mapping[str, Any]) -> None:
    lines.extend(
        [
            "## Participants",
            "",
            "| principal | ceremony role | service roles | key thumbprint |",
            "| --- | --- | --- | --- |",
        ]
    )
    for p in body.get("participants", []):
        roles = ", ".join(p.get("service_roles") or []) or "(not confirmed)"
        lines.append(
            f"| {escape(p.get('principal'))} | {escape(p.get('role'))} | {escape(roles)} "
            f"| {code(p.get('thumbprint'))} |"
        )
    lines.append("")


def _steps(lines: list[str], body: Mapping[str, Any]) -> None:
    lines.append("## Steps")
    lines.append("")
    steps = body.get("steps", [])
    if not steps:
        lines.append("No step was run.")
        lines.append("")
    for step in steps:
        what = f"action {code(step.get('action'))}" if step.get("action") else "check"
        lines.append(f"### {step.get('number')}. {escape(step.get('title'))}")
        lines.append("")
        lines.append(f"- What: {what}")
        if step.get("site") is not None:
            lines.append(f"- Where: site {escape(step['site'])} ({escape(step.get('service'))})")
        if step.get("check"):
            lines.append(f"- Prompt: {escape(step['check'])}")
        lines.append(f"- By: {escape(', '.join(step.get('by', [])))}")
        lines.append(f"- When: {escape(step.get('started_at'))} to {escape(step.get('ended_at'))}")
        lines.append(f"- Outcome: **{escape(step.get('outcome'))}**: {escape(step.get('summary'))}")
        if step.get("request_ids"):
            ids = ", ".join(code(r) for r in step["request_ids"])
            lines.append(f"- Service request ids: {ids}")
        if step.get("peer_request_ids"):
            ids = ", ".join(code(r) for r in step["peer_request_ids"])
            lines.append(f"- Peer's request ids: {ids}")
        lines.extend(
            f"- **Deviation** recorded by {escape(d.get('recorded_by'))} at "
            f"{escape(d.get('at'))}: {escape(d.get('reason'))}"
            for d in step.get("deviations", [])
        )
        events = step.get("events", [])
        if events:
            lines.append("- Record:")
            for event in events:
                detail = ", ".join(
                    f"{escape(k)}: {escape(v)}"
                    for k, v in event.items()
                    if k not in ("at", "what", "principal", "request_id")
                )
                who = f" {escape(event['principal'])}" if event.get("principal") else ""
                lines.append(
                    f"  - {escape(event.get('at'))}{who}: {escape(event.get('what'))}"
                    + (f" ({detail})" if detail else "")
                )
        lines.append("")


def _signatures(lines: list[str], document: Mapping[str, Any], check: FileCheck | None) -> None:
    body = document.get("transcript", {})
    lines.extend(["## Signatures", "", f"Transcript digest (SHA-256): `{document.get('digest')}`"])
    lines.append("")
    if check is not None:
        lines.append(
            "Digest recomputed: " + ("matches." if check.digest_ok else "**DOES NOT MATCH**.")
        )
        lines.extend(f"- Problem: {escape(problem)}" for problem in check.problems)
        lines.append("")
    signed = {s.get("principal") for s in document.get("signatures", [])}
    lines.append("| principal | signed with key |")
    lines.append("| --- | --- |")
    for p in body.get("participants", []):
        mark = "yes" if p.get("principal") in signed else "no"
        lines.append(f"| {escape(p.get('principal'))} | {mark} |")
    lines.append("")
    service = document.get("service_signature")
    if isinstance(service, dict):
        lines.append(
            f"Signed by the service (audit key {code(service.get('kid'))}), audit record "
            f"request id {code(service.get('request_id'))}:"
        )
        lines.append("")
        lines.append("```")
        lines.append(str(service.get("jws", "")).replace("`", ""))
        lines.append("```")
    else:
        lines.append("Not yet signed by the service (submit it: `ekms ceremony submit`).")
    lines.append("")
    lines.append("## Signed on paper")
    lines.append("")
    lines.append("Each participant checks the digest above against the screen, then signs.")
    lines.append("")
    for p in body.get("participants", []):
        lines.append(f"{escape(p.get('role'))}, {escape(p.get('principal'))}:")
        lines.append("")
        lines.append(
            "Name: ______________________  Signature: ______________________  Date: ____________"
        )
        lines.append("")
