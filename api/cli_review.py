"""``ekms review`` (the access report and review campaigns) and ``ekms login``.

Like the rest of the client, these commands use only the standard library, except ``login``,
which signs a client assertion and so imports ``api.principal_keys`` (cryptography, PyJWT)
when it runs. ``login`` prints just the access token, so that an officer can write

    export EKMS_TOKEN=$(ekms login --principal alice --key alice.jwk)

and run the other commands as themselves. The key file is a private JWK in a JSON file (an EC
P-256 key with ``d``, ``x`` and ``y``, or an OKP Ed25519 key with ``d``), or an unencrypted PEM
private key of either kind; see ``api.principal_keys.KeyHolder.load`` and
docs/access-control.md.
"""

from __future__ import annotations

import os
import stat
import sys
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import Client, CliError, _client, _print, fail

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

DEFAULT_AUDIENCE = "embassy-kms/home"  # the service's default: embassy-kms/<site_name>
_REPORT = "ekms/review/report"
_CAMPAIGNS = "ekms/review/campaigns"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _when(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: object) -> str:
    """Text others wrote (notes, names), with control characters shown as ``?``: a note must
    not move the cursor, recolour or retitle the officer's terminal."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, each cell on one line."""
    cells = [[_plain(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _write(target: str, write: Callable[[Any], Any], binary: bool = False) -> None:
    """Write to ``target`` beside it first, renamed once complete (as ``ekms audit export``)."""
    path = Path(target)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb" if binary else "w", encoding=None if binary else "utf-8") as out:
            write(out)
        partial.replace(path)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    finally:
        partial.unlink(missing_ok=True)
    print(f"Wrote {path}", file=sys.stderr)  # noqa: T201 - a note beside the output, not output


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print like the other commands, or write the same text to ``-o FILE``."""
    output = getattr(args, "output", None)
    if output in (None, "-"):
        _print(args, data, text)
        return
    import json  # noqa: PLC0415 - only when writing a file

    rendered = json.dumps(data, indent=2) if args.format == "json" else text
    _write(output, lambda out: out.write(rendered + "\n"))


# --- the report ---------------------------------------------------------------------------


def _report_path(args: argparse.Namespace, form: str) -> str:
    params = {
        "format": form,
        "section": args.section,
        "since": args.since,
        "until": args.until,
        "principal": args.principal,
        "dataset": args.dataset,
        "site": args.site,
        "dormant_days": args.dormant_days,
    }
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{_REPORT}?{query}"


def _report_summary(data: dict[str, Any]) -> str:
    filters = data.get("filters") or {}
    window = filters.get("window")
    shown = [
        f"{name} {filters[name]}" for name in ("principal", "dataset", "site") if filters.get(name)
    ]
    if window:
        shown.insert(0, f"from {_when(window['start'])} until {_when(window['end'])}")
    principals = data.get("principals", [])
    grants = data.get("grants", [])
    denials = data.get("denials", {})
    emergencies = data.get("emergencies", [])
    unused = data.get("unused_keys", [])
    rows = [
        (
            "Principals",
            (
                f"{len(principals)} ({sum(p['dormant'] for p in principals)} dormant, "
                f"{sum(p['disabled_at'] is not None for p in principals)} disabled)"
            ),
        ),
        (
            "Grants",
            (
                f"{len(grants)} ({sum(g['window_open'] for g in grants)} open, "
                f"{sum(g['dormant'] for g in grants)} dormant)"
            ),
        ),
        ("Usage rows", str(len(data.get("usage", [])))),
        ("Unused keys", f"{len(unused)}{': ' + ', '.join(unused) if unused else ''}"),
        ("Denials", str(denials.get("total", 0))),
        (
            "Emergencies",
            f"{len(emergencies)} ({sum(e['status'] == 'active' for e in emergencies)} active)",
        ),
        ("Officials", str(len(data.get("officials", [])))),
        ("Skipped records", str(data.get("skipped_records", 0))),
    ]
    lines = [
        f"Access report as of {_when(data.get('generated_at'))}",
        (
            f"Filters: {', '.join(shown) if shown else 'none'}; dormant after "
            f"{filters.get('dormant_after_days')} days"
        ),
        "",
        *(f"{label:<16}{value}" for label, value in rows),
        "",
        "One section in full: --section NAME (-format csv for a spreadsheet, -format json for all)",
    ]
    return "\n".join(lines)


def cmd_review_report(args: argparse.Namespace) -> int:
    import csv  # noqa: PLC0415 - only this command reads CSV
    import io  # noqa: PLC0415

    client = _client(args)
    if args.format == "csv":
        if not args.section:
            fail("-format csv needs --section NAME: a CSV holds one section")
        path = _report_path(args, "csv")
        if args.output in (None, "-"):
            client.download(path, sys.stdout.buffer)
            sys.stdout.flush()
        else:
            _write(args.output, lambda out: client.download(path, out), binary=True)
        return 0
    if args.format == "table" and args.section:
        buffer = io.BytesIO()
        client.download(_report_path(args, "csv"), buffer)
        rows = list(csv.reader(io.StringIO(buffer.getvalue().decode("utf-8"))))
        text = _table(rows[0], rows[1:]) if len(rows) > 1 else f"No {args.section} to show."
        _emit(args, None, text)
        return 0
    result = client.call("GET", _report_path(args, "json"))
    data = result.get("data") or {}
    _emit(args, result, "" if args.format == "json" else _report_summary(data))
    return 0


# --- campaigns ----------------------------------------------------------------------------


def _campaign_text(data: dict[str, Any]) -> str:
    campaign = data["campaign"]
    principals = data.get("principals", {})
    items = campaign["items"]
    counts = {
        state: sum(i["state"] == state for i in items.values())
        for state in ("certified", "revoked", "pending")
    }
    lines = [
        f"Campaign   {campaign['id']} ({campaign['state']})",
        f"Opened     {_when(campaign['opened_at'])} by {campaign['opened_by']}",
        f"Closes     {_when(campaign['closes_at'])}",
    ]
    if campaign.get("closed_at") is not None:
        lines.append(f"Closed     {_when(campaign['closed_at'])} by {campaign['closed_by']}")
    lines.append(
        f"Progress   {counts['certified']} certified, {counts['revoked']} revoked, "
        f"{counts['pending']} pending"
    )
    rows = []
    for pid in sorted(items):
        item, who = items[pid], principals.get(pid, {})
        rows.append(
            (
                pid,
                ",".join(who.get("roles", [])) or "-",
                "yes" if who.get("active") else "no",
                item["state"],
                item["decided_by"] or "-",
                item["note"][:60] or "-",
            )
        )
    lines += ["", _table(("PRINCIPAL", "ROLES", "ACTIVE", "STATE", "BY", "NOTE"), rows)]
    return "\n".join(lines)


def cmd_campaign_open(args: argparse.Namespace) -> int:
    duration: int | str = int(args.duration) if args.duration.isdigit() else args.duration
    body: dict[str, Any] = {"duration": duration}
    if args.scope:
        body["scope"] = list(args.scope)
    result = _client(args).call("POST", _CAMPAIGNS, body)
    _print(args, result, _campaign_text(result["data"]))
    return 0


def cmd_campaign_list(args: argparse.Namespace) -> int:
    path = _CAMPAIGNS if not args.state else f"{_CAMPAIGNS}?state={urllib.parse.quote(args.state)}"
    result = _client(args).call("GET", path)
    listed = result["data"]["campaigns"]
    rows = [
        (
            c["id"],
            c["state"],
            _when(c["opened_at"]),
            _when(c["closes_at"]),
            c["pending"],
            c["certified"],
            c["revoked"],
        )
        for c in listed
    ]
    header = ("ID", "STATE", "OPENED", "CLOSES", "PENDING", "CERTIFIED", "REVOKED")
    _print(args, result, _table(header, rows) if rows else "No review campaigns.")
    return 0


def _campaign_path(campaign_id: str, action: str = "") -> str:
    path = f"{_CAMPAIGNS}/{urllib.parse.quote(campaign_id, safe='')}"
    return f"{path}/{action}" if action else path


def cmd_campaign_show(args: argparse.Namespace) -> int:
    result = _client(args).call("GET", _campaign_path(args.id))
    _print(args, result, _campaign_text(result["data"]))
    return 0


def _decided(result: dict[str, Any], verb: str, principal: str) -> str:
    campaign = result["data"]["campaign"]
    pending = sum(i["state"] == "pending" for i in campaign["items"].values())
    return f"{verb} {principal} in campaign {campaign['id']}; {pending} still pending."


def cmd_campaign_certify(args: argparse.Namespace) -> int:
    body = {"principal": args.principal, "note": args.note or ""}
    result = _client(args).call("POST", _campaign_path(args.id, "certify"), body)
    _print(args, result, _decided(result, "Certified", args.principal))
    return 0


def cmd_campaign_revoke(args: argparse.Namespace) -> int:
    body = {"principal": args.principal, "note": args.note}
    result = _client(args).call("POST", _campaign_path(args.id, "revoke"), body)
    _print(args, result, _decided(result, "Revoked", args.principal))
    return 0


def cmd_campaign_close(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", _campaign_path(args.id, "close"))
    data = result["data"]
    lines = [f"Campaign {data['campaign']['id']} closed."]
    for label, key in (
        ("Suspended (not certified)", "suspended"),
        ("Revoked", "revoked"),
        ("Left to a quorum of officials (propose remove-official)", "left_to_quorum"),
    ):
        names = data.get(key) or []
        lines.append(f"{label}: {', '.join(names) if names else 'none'}")
    _print(args, result, "\n".join(lines))
    return 0


# --- login --------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> int:
    """Sign an RFC 7523 assertion with the principal's key and exchange it for a token."""
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - as below

    from api.principal_keys import KeyHolder  # noqa: PLC0415 - cryptography only for login

    path = Path(args.key)
    try:
        mode = path.stat().st_mode
        holder = KeyHolder.load(args.principal, path)
    except OSError as exc:
        fail(f"cannot read key file {args.key}: {exc.strerror or exc}")
    except TypeError:  # cryptography: the PEM is encrypted and no password was given
        fail(f"key file {args.key}: an encrypted PEM key; give an unencrypted PEM or a JWK file")
    except (ValueError, UnsupportedAlgorithm) as exc:
        fail(f"key file {args.key}: {exc}")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(  # noqa: T201 - a warning, on stderr
            f"warning: key file {args.key} can be read by other users: chmod 600 it",
            file=sys.stderr,
        )
    audience = args.audience or os.environ.get("EKMS_AUDIENCE") or DEFAULT_AUDIENCE
    body = {"jwt": holder.assertion(audience)}
    if args.role:
        body["role"] = args.role
    client = Client(_client(args).address, None)  # a login presents no token
    try:
        result = client.call("POST", "auth/jwt/login", body)
    except CliError as exc:
        if str(exc).startswith("401"):
            raise CliError(
                f"{exc}: check --principal, that --key holds the key registered for it, and "
                f"--audience (used: {audience}; the service's `audience` setting, "
                "embassy-kms/<site_name> unless configured; or set EKMS_AUDIENCE)"
            ) from None
        raise
    auth = result["auth"]
    _print(args, auth, auth["client_token"])
    return 0


# --- parser -------------------------------------------------------------------------------


def add_review_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    client_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``review`` and ``login`` to ``ekms``'s subcommands (``api.cli.build_parser``)."""
    review = sub.add_parser(
        "review", help="access report and review campaigns (security officers, auditors)"
    ).add_subparsers(dest="action", required=True)

    report = review.add_parser(
        "report",
        help="the access report: principals, grants, usage, unused keys, denials, ...",
        description="The access report. -format table (default) prints a summary, or one "
        "section with --section; json prints the service's answer; csv needs --section.",
    )
    report.add_argument(
        "-section",
        "--section",
        help="principals, grants, usage, unused-keys, denials, emergencies or officials",
    )
    report.add_argument("-address", "--address", help="server address (or EKMS_ADDR/VAULT_ADDR)")
    report.add_argument("-format", "--format", choices=("table", "json", "csv"), default="table")
    report.add_argument("-since", "--since", help="epoch seconds or RFC 3339 (activity from)")
    report.add_argument("-until", "--until", help="epoch seconds or RFC 3339 (activity before)")
    report.add_argument("-principal", "--principal", help="only this principal")
    report.add_argument("-dataset", "--dataset", help="only this dataset (key name)")
    report.add_argument("-site", "--site", help="only this site")
    report.add_argument(
        "-dormant-days", "--dormant-days", dest="dormant_days", help="dormant after N days (90)"
    )
    report.add_argument(
        "-o", "-output", "--output", metavar="FILE", help="write to FILE (default: stdout)"
    )
    report.set_defaults(func=cmd_review_report)

    campaign = review.add_parser(
        "campaign", help="open, list, show, certify, revoke, close review campaigns"
    ).add_subparsers(dest="campaign_action", required=True)
    opened = campaign.add_parser("open", help="open a campaign (security officers)")
    opened.add_argument(
        "-duration", "--duration", default="72h", help="how long it runs: seconds or 72h, 1h30m"
    )
    opened.add_argument(
        "-scope",
        "--scope",
        nargs="+",
        action="extend",
        metavar="ID",
        help="review only these principals (default: every active principal)",
    )
    opened.set_defaults(func=cmd_campaign_open)
    listing = campaign.add_parser("list", help="campaigns, newest first")
    listing.add_argument("-state", "--state", choices=("open", "closed"))
    listing.set_defaults(func=cmd_campaign_list)
    show = campaign.add_parser("show", help="one campaign and each principal's review")
    show.add_argument("id")
    show.set_defaults(func=cmd_campaign_show)
    certify = campaign.add_parser("certify", help="keep a principal's access")
    certify.add_argument("id")
    certify.add_argument("principal")
    certify.add_argument("-note", "--note", default="")
    certify.set_defaults(func=cmd_campaign_certify)
    revoke = campaign.add_parser("revoke", help="withdraw a principal's access at close")
    revoke.add_argument("id")
    revoke.add_argument("principal")
    revoke.add_argument("-note", "--note", required=True, help="why (required)")
    revoke.set_defaults(func=cmd_campaign_revoke)
    closing = campaign.add_parser(
        "close", help="close: suspend what nobody certified, disable what was revoked"
    )
    closing.add_argument("id")
    closing.set_defaults(func=cmd_campaign_close)
    for p in (opened, listing, show, certify, revoke, closing):
        client_options(p)

    login = sub.add_parser(
        "login",
        help="log in as a principal with its key; prints the access token",
        description="Sign an RFC 7523 client assertion with the principal's private key and "
        "print the access token: export EKMS_TOKEN=$(ekms login --principal ID --key FILE). "
        "FILE is a private JWK (JSON) or an unencrypted PEM key, EC P-256 or Ed25519.",
    )
    login.add_argument("-principal", "--principal", required=True, help="the principal's id")
    login.add_argument("-key", "--key", required=True, metavar="FILE", help="its private key")
    login.add_argument(
        "-role",
        "--role",
        default="",
        help="accepted as Vault's; roles come from the principal's registration",
    )
    login.add_argument(
        "-audience",
        "--audience",
        help=f"the service's audience (EKMS_AUDIENCE; {DEFAULT_AUDIENCE})",
    )
    client_options(login)
    login.set_defaults(func=cmd_login)
