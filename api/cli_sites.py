"""``ekms site``: this site's status, the site registry, and other sites' signed tree heads.

``status`` shows where this service stands (name, kind, status, emergency); ``list`` and
``show`` read the registry; ``register`` adds another site as standby; ``record-head`` records
another site's signed tree head in this site's audit log after checking its signature with
that site's registered audit key (ADR 0012 §7). Statuses change only by quorum proposals
(``site-failover``, ``site-failback``, ``site-retire``), which the ceremonies file.

``api/cli.py`` calls ``add_site_commands`` while it builds its parser. Like the rest of the
client, the commands need only the standard library.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import _client, _print, fail

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    Options = Callable[[argparse.ArgumentParser], None]

_MAX_FILE = 1 << 20


def _when(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _site_text(s: dict[str, Any]) -> str:
    lines = [
        f"Name            {s.get('name')}",
        f"Kind            {s.get('kind')}",
        f"Backend         {s.get('backend') or '-'}",
        f"Status          {s.get('status') or 'not registered'}",
        f"URL             {s.get('url') or '-'}",
        f"Audit Key Id    {s.get('audit_kid') or 'none recorded'}",
        f"Registered      {_when(s.get('registered_at'))}",
        f"Updated         {_when(s.get('updated_at'))}",
    ]
    if s.get("note"):
        lines.append(f"Note            {s['note']}")
    return "\n".join(lines)


def cmd_site_status(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", "ekms/site")["data"]
    emergency = data.get("emergency")
    lines = [
        _site_text(data),
        f"Serving         {'yes' if data.get('serving') else 'no: ' + str(data.get('refusal'))}",
        "Emergency       "
        + ("none" if not emergency else f"declared, ends {_when(emergency.get('ends_at'))}"),
    ]
    _print(args, data, "\n".join(lines))
    return 0


def cmd_site_list(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", "ekms/sites?list=true")["data"]
    info = data["key_info"]
    rows = [("NAME", "KIND", "BACKEND", "STATUS", "URL")]
    rows += [
        (n, info[n]["kind"], info[n]["backend"], info[n]["status"], info[n]["url"] or "-")
        for n in data["keys"]
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    text = "\n".join(
        "  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    )
    _print(args, data, text)
    return 0


def cmd_site_show(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", f"ekms/sites/{_name(args.name)}")["data"]
    _print(args, data, _site_text(data))
    return 0


def cmd_site_register(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": args.kind, "backend": args.backend, "url": args.url or ""}
    if args.note:
        body["note"] = args.note
    if args.audit_key:
        body["audit_public_key"] = _audit_key(args.audit_key)
    data = _client(args).call("POST", f"ekms/sites/{_name(args.name)}", body)["data"]
    _print(args, data, f"Registered site {data['name']} ({data['kind']}) as {data['status']}.")
    return 0


def cmd_site_set_audit_key(args: argparse.Namespace) -> int:
    body = {"audit_public_key": _audit_key(args.file)}
    data = _client(args).call("POST", f"ekms/sites/{_name(args.name)}/audit-key", body)["data"]
    _print(args, data, f"Pinned site {data['name']}'s audit key {data['audit_kid']}.")
    return 0


def cmd_site_record_head(args: argparse.Namespace) -> int:
    body = {"tree_head": _tree_head(args.file)}
    client = _client(args)
    data = client.call("POST", f"ekms/sites/{_name(args.name)}/tree-heads", body)["data"]
    text = (
        f"Recorded {data['site']}'s tree head of size {data['size']} "
        f"(root {data['root_hash'][:16]}...) in this site's audit log, "
        f"request {client.last_request_id or '-'}."
    )
    _print(args, data, text)
    return 0


def _name(name: str) -> str:
    """Refuse a name that could leave its path segment before anything is sent."""
    if not name or not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
        fail(f"{name!r} is not a site name (a-z, 0-9 and '-')")
    return name


def _read(path: str, what: str) -> str:
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(_MAX_FILE + 1)
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror}")
    if len(raw) > _MAX_FILE:
        fail(f"{what} {path} is larger than {_MAX_FILE} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        fail(f"{what} {path} is not UTF-8 text")


def _audit_key(path: str) -> dict[str, Any]:
    """A JWK file, or a JSON object holding one as ``public_key`` (``audit/heads``, an export)."""
    try:
        value = json.loads(_read(path, "audit key file"))
    except ValueError:
        fail(f"audit key file {path} is not JSON")
    if isinstance(value, dict) and isinstance(value.get("data"), dict):
        value = value["data"]  # a saved API answer
    if isinstance(value, dict) and isinstance(value.get("public_key"), dict):
        value = value["public_key"]
    if not isinstance(value, dict) or "kty" not in value:
        fail(f"audit key file {path} holds no JWK (an object with 'kty')")
    return value


def _tree_head(path: str) -> dict[str, Any] | str:
    """A head line or a saved answer (JSON), an audit export (its newest head), or a bare JWS."""
    text = _read(path, "tree head file").strip()
    heads = [h for h in map(_head_object, [text, *text.splitlines()]) if h is not None]
    jws = text.count(".") == 2 and not any(c.isspace() for c in text)
    if not heads and not jws:
        fail(f"tree head file {path} holds no head line, export or JWS")
    return heads[-1] if heads else text


def _head_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("data"), dict):
        value = value["data"]  # a saved answer of POST /v1/ekms/audit/tree-head
    if isinstance(value, dict) and value.get("type") == "head":
        return value
    return None


def add_site_commands(sub: Any, client_options: Options) -> None:
    """``ekms site status|list|show|register|record-head``."""
    site = sub.add_parser(
        "site", help="this site's status, the site registry, other sites' tree heads"
    ).add_subparsers(dest="action", required=True)
    status = site.add_parser("status", help="this site: name, kind, status, emergency")
    status.set_defaults(func=cmd_site_status)
    listing = site.add_parser("list", help="every site this site knows")
    listing.set_defaults(func=cmd_site_list)
    show = site.add_parser("show", help="one site of the registry")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(func=cmd_site_show)
    register = site.add_parser(
        "register", help="register another site as standby (security officer)"
    )
    register.add_argument("name", metavar="NAME")
    register.add_argument("--kind", required=True, choices=("home", "embassy", "public-cloud"))
    register.add_argument("--backend", required=True, choices=("pkcs11", "transit"))
    register.add_argument("--url", help="where the site's service is reached")
    register.add_argument(
        "--audit-key",
        metavar="FILE",
        help="the site's audit public key: a JWK, or the saved answer of its audit/heads",
    )
    register.add_argument("--note", help="a short note kept with the row")
    register.set_defaults(func=cmd_site_register)
    audit_key = site.add_parser(
        "set-audit-key",
        help="pin another site's audit public key, once (security officer)",
        description="For a site registered before it had signed a tree head. FILE: a JWK, or "
        "the saved answer of the site's audit/heads. A pinned key is never replaced.",
    )
    audit_key.add_argument("name", metavar="NAME")
    audit_key.add_argument("file", metavar="FILE")
    audit_key.set_defaults(func=cmd_site_set_audit_key)
    record_head = site.add_parser(
        "record-head",
        help="record another site's signed tree head in this log (security officer)",
        description="FILE holds the head: a head line, that site's audit export (its newest "
        "head is taken), or the head's bare JWS. Its signature is checked with the audit key "
        "registered for NAME.",
    )
    record_head.add_argument("name", metavar="NAME")
    record_head.add_argument("file", metavar="FILE")
    record_head.set_defaults(func=cmd_site_record_head)
    for p in (status, listing, show, register, audit_key, record_head):
        client_options(p)
