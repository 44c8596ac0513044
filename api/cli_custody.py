"""``ekms operator rekey``, ``ekms operator share check`` and ``ekms drill``: the custody lifecycle.

Shares are read from a hidden prompt, a file, or one line of standard input, never from the
command line (where shell history and ``ps`` would keep them). A share check never sends the
share: the client signs the service's challenge with a key derived from it
(``kms.share_check``), so the share stays on the holder's machine. ``rekey decrypt`` opens a
new share that the service encrypted to its holder's key (``kms.jwe``) with the private JWK
file that ``ekms login`` uses.

``api/cli.py`` calls ``add_operator_commands`` and ``add_drill_commands`` while it builds its
parser. Like the rest of the client, the commands need only the standard library until they
handle a share or a key.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from api.cli import Client, _client, _print, _read_share, fail

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    Options = Callable[[argparse.ArgumentParser], None]

_SHARE_PROMPT = "Current share (will be hidden): "
_NEW_SHARE_PROMPT = "New share (will be hidden): "


def _when(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _share(args: argparse.Namespace, prompt: str) -> str:
    share = _read_share(args, prompt)
    if not share:
        fail("no share given: use --file FILE, --file - (one line on stdin), or run in a terminal")
    return share


# --- rekey ----------------------------------------------------------------------------------


def _groups(text: str) -> list[list[int]]:
    """``2/3,2/3``: each group's member threshold and count."""
    groups = []
    for part in text.split(","):
        threshold, slash, count = part.strip().partition("/")
        if not (slash and threshold.isdigit() and count.isdigit()):
            fail(f"--groups {text!r}: give each group as THRESHOLD/COUNT, separated by commas")
        groups.append([int(threshold), int(count)])
    return groups


def _rekey_text(s: dict[str, Any]) -> str:
    lines = [
        f"Nonce                  {s.get('nonce') or 'n/a'}",
        f"Started                {str(s.get('started')).lower()}",
    ]
    if s.get("started"):
        groups = s.get("groups") or []
        shape = ", ".join(f"{t}/{n}" for t, n in groups)
        lines += [
            f"Phase                  {s.get('phase')}",
            f"Rekey Progress         {s.get('progress')}/{s.get('required')}",
            f"New Shares             {s.get('n')}",
            f"New Threshold          {s.get('t')}",
            f"Groups                 {shape} ({s.get('group_threshold')} needed)",
            f"Holders                {', '.join(s.get('holders') or []) or 'none recorded'}",
            f"Verification Nonce     {s.get('verification_nonce') or 'n/a'}",
        ]
    return "\n".join(lines)


def _issued_text(s: dict[str, Any]) -> str:
    holders = s.get("holders") or []
    lines = []
    for index, (member, key) in enumerate(zip(s["members"], s["keys"], strict=True)):
        owner = f" for {holders[index]}" if holders else ""
        lines.append(f"New Share {member}{owner}: {key}")
    lines.append("")
    if s.get("encrypted"):
        lines.append(
            "Each share is encrypted to its holder's key. Each holder decrypts theirs with\n"
            "    ekms operator rekey decrypt --key THEIR-KEY-FILE 'JWE'"
        )
    else:
        lines.append("Hand each share to one holder; nobody else may see it.")
    lines += [
        "",
        "The new shares are NOT in force yet: the current shares still unseal. Once a quorum",
        "of holders has verified their new share, the new set replaces the current one:",
        f"    ekms operator rekey verify -nonce {s.get('verification_nonce')}",
    ]
    return "\n".join(lines)


def cmd_rekey_init(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"require_verification": True}
    if args.groups:
        if args.key_shares is not None or args.key_threshold is not None:
            fail("give -key-shares/-key-threshold or --groups, not both")
        body["groups"] = _groups(args.groups)
        body["group_threshold"] = args.group_threshold or 1
    else:
        if args.group_threshold is not None:
            fail("--group-threshold goes with --groups")
        body["secret_shares"] = args.key_shares if args.key_shares is not None else 5
        body["secret_threshold"] = args.key_threshold if args.key_threshold is not None else 3
    if args.holder:
        body["holders"] = args.holder
    result = _client(args).call("PUT", "sys/rekey/init", body)
    text = _rekey_text(result) + (
        "\n\nEach official now submits a current share with\n"
        f"    ekms operator rekey -nonce {result.get('nonce')}"
    )
    _print(args, result, text)
    return 0


def _nonce(client: Client, given: str | None, path: str, what: str) -> str:
    """The nonce given, or (in a terminal) the one the service shows, echoed for a check."""
    if given:
        return given
    if not sys.stdin.isatty():
        fail(f"give the {what} nonce with -nonce (shown by ekms operator rekey status)")
    found = client.call("GET", path)
    nonce = str(found.get("nonce") or "")
    if not nonce:
        fail(f"there is no {what} in progress")
    note = f"{what.capitalize()} nonce: {nonce} (check it against the one announced)"
    print(note, file=sys.stderr)  # noqa: T201 - a note on stderr
    return nonce


def cmd_rekey_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    nonce = _nonce(client, args.rekey_nonce, "sys/rekey/init", "rekey")
    share = _share(args, _SHARE_PROMPT)
    result = client.call("PUT", "sys/rekey/update", {"key": share, "nonce": nonce})
    _print(args, result, _issued_text(result) if result.get("keys") else _rekey_text(result))
    return 0


def cmd_rekey_verify(args: argparse.Namespace) -> int:
    client = _client(args)
    nonce = _nonce(client, args.verify_nonce, "sys/rekey/verify", "verification")
    share = _share(args, _NEW_SHARE_PROMPT)
    result = client.call("PUT", "sys/rekey/verify", {"key": share, "nonce": nonce})
    if result.get("complete"):
        text = (
            "Success! The new share set is verified and in force: the old shares no longer "
            "unseal.\nDestroy them, and check each new share: ekms operator share check"
        )
    else:
        text = f"Verification Progress  {result.get('progress')}/{result.get('t')}"
    _print(args, result, text)
    return 0


def cmd_rekey_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.verification:
        result = client.call("DELETE", "sys/rekey/verify")
        _print(args, result, f"Verification restarted; new nonce {result.get('nonce')}")
        return 0
    client.call("DELETE", "sys/rekey/init")
    print("Success! Rekey canceled (if one was started); the current shares stay in force.")  # noqa: T201
    return 0


def cmd_rekey_status(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.call("GET", "sys/rekey/init")
    text = _rekey_text(result)
    if result.get("verification_nonce"):
        verify = client.call("GET", "sys/rekey/verify")
        text += f"\nVerification Progress  {verify.get('progress')}/{verify.get('t')}"
    _print(args, result, text)
    return 0


def cmd_rekey_decrypt(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - only here

    from api.principal_keys import KeyHolder  # noqa: PLC0415
    from kms import jwe  # noqa: PLC0415

    token = sys.stdin.readline().strip() if args.jwe == "-" else args.jwe.strip()
    try:
        holder = KeyHolder.load("holder", args.key)
    except OSError as exc:
        fail(f"cannot read key file {args.key}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(f"--key {args.key}: {exc}")
    if not isinstance(holder.key, ec.EllipticCurvePrivateKey):
        fail("--key must be an EC P-256 private key: shares are encrypted only to P-256 keys")
    share = jwe.decrypt(holder.key, token).decode()
    _print(args, {"share": share}, share)
    return 0


# --- share check ----------------------------------------------------------------------------


def _prove(client: Client, share: str) -> dict[str, Any]:
    """The check request body: the challenge signed with the share's key; never the share."""
    from kms import share_check  # noqa: PLC0415 - cryptography only when a share is checked
    from kms.custody import parse_share  # noqa: PLC0415

    parse_share(share)  # a mistyped word is reported before anything is sent
    challenge = client.call("GET", "ekms/shares/challenge")["data"]["challenge"]
    return share_check.check_request(share, challenge)


def cmd_share_check(args: argparse.Namespace) -> int:
    client = _client(args)
    share = _share(args, "Share to check (will be hidden): ")
    result = client.call("POST", "ekms/shares/check", _prove(client, share))["data"]
    text = (
        f"Share OK: member {result['member']} of the share set in force "
        f"(identifier {result['share_set']['identifier']}, generation "
        f"{result['share_set']['generation']})"
    )
    _print(args, result, text)
    return 0


# --- drills ---------------------------------------------------------------------------------


def cmd_drill_start(args: argparse.Namespace) -> int:
    if args.hours <= 0:
        fail("--hours must be more than 0")
    body = {"duration": args.hours * 3600.0, "stale_after_days": args.stale_after_days}
    result = _client(args).call("POST", "ekms/drills", body)["data"]
    text = (
        f"Drill {result['id']} started; open until {_when(result['deadline'])}.\n"
        f"Each official checks in: ekms drill check-in {result['id']}"
    )
    _print(args, result, text)
    return 0


def cmd_drill_check_in(args: argparse.Namespace) -> int:
    client = _client(args)
    if not client.token:
        fail("a check-in names its official: log in first (export EKMS_TOKEN=$(ekms login ...))")
    share = _share(args, "Your share (will be hidden): ")
    body = _prove(client, share)
    result = client.call("POST", f"ekms/drills/{args.drill}/check-in", body)["data"]
    _print(args, result, f"Checked in: member {result['member']} confirmed for drill {args.drill}")
    return 0


def _report_text(r: dict[str, Any]) -> str:
    quorum = r["quorum"]
    state = "open" if r["open"] else "closed"
    started = f"started {_when(r['started_at'])} by {r['started_by']}"
    lines = [
        f"Drill {r['id']} ({state}), {started}, deadline {_when(r['deadline'])}",
        f"Site {r['site']} (node {r['node']}): {r['site_note']}",
    ]
    if not r["in_force"]:
        lines.append("The drill's share set is no longer in force (a rekey replaced it).")
    lines.append(f"{'member':<8}{'state':<11}{'holder':<22}{'last confirmed':<22}by")
    lines.extend(
        f"{m['member']:<8}{m['state']:<11}{m['holder'] or '-':<22}"
        f"{_when(m['last_confirmed_at']):<22}{m['confirmed_by'] or '-'}"
        for m in r["members"]
    )
    counts = ", ".join(f"{n} {state}" for state, n in r["counts"].items())
    lines += [
        counts,
        f"Quorum reachable with confirmed shares: {'yes' if quorum['with_confirmed'] else 'NO'}",
        "Quorum reachable with confirmed or recent shares: "
        + ("yes" if quorum["with_confirmed_or_recent"] else "NO"),
    ]
    return "\n".join(lines)


def cmd_drill_report(args: argparse.Namespace) -> int:
    result = _client(args).call("GET", f"ekms/drills/{args.drill}")["data"]
    _print(args, result, _report_text(result))
    return 0


def cmd_drill_list(args: argparse.Namespace) -> int:
    result = _client(args).call("GET", "ekms/drills")["data"]
    rows = [
        f"{d['id']}  {'open  ' if d['open'] else 'closed'}  {_when(d['started_at'])}  "
        f"{d['started_by']}"
        for d in result["drills"]
    ]
    _print(args, result, "\n".join(rows) or "No drills.")
    return 0


# --- parsers --------------------------------------------------------------------------------


def _share_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("-file", "--file", help="read the share from a file ('-': one line of stdin)")
    p.set_defaults(key=None)


def add_operator_commands(operator: Any, client_options: Options) -> None:
    """``ekms operator rekey ...`` and ``ekms operator share check``."""
    rekey = operator.add_parser(
        "rekey",
        help="replace the share set: a quorum of current shares, then verified new ones",
        description="Without a subcommand: submit a current share to the rekey in progress.",
    )
    rekey.add_argument("-nonce", "--nonce", dest="rekey_nonce", help="the rekey's nonce")
    _share_source(rekey)
    client_options(rekey)
    rekey.set_defaults(func=cmd_rekey_submit)
    actions = rekey.add_subparsers(dest="rekey_action", required=False)

    init = actions.add_parser("init", help="start a rekey (needs a security officer's token)")
    init.add_argument("-key-shares", "--key-shares", type=int, help="new shares (default 5)")
    init.add_argument("-key-threshold", "--key-threshold", type=int, help="default 3")
    init.add_argument("--groups", metavar="T/N,T/N", help="SLIP-39 groups, e.g. 2/3,2/3")
    init.add_argument("--group-threshold", type=int, help="groups needed (with --groups)")
    init.add_argument(
        "--holder",
        action="append",
        metavar="ID",
        help="an official to encrypt a new share to, once per share, in member order",
    )
    init.set_defaults(func=cmd_rekey_init)

    verify = actions.add_parser("verify", help="submit a new share to verify the new set")
    verify.add_argument("-nonce", "--nonce", dest="verify_nonce", help="the verification nonce")
    _share_source(verify)
    verify.set_defaults(func=cmd_rekey_verify)

    cancel = actions.add_parser("cancel", help="cancel the rekey; the current shares stay")
    cancel.add_argument("--verification", action="store_true", help="restart only the verification")
    cancel.set_defaults(func=cmd_rekey_cancel)

    status = actions.add_parser("status", help="show the rekey in progress")
    status.set_defaults(func=cmd_rekey_status)

    decrypt = actions.add_parser(
        "decrypt", help="open a new share encrypted to you (offline: no service needed)"
    )
    decrypt.add_argument("--key", required=True, metavar="FILE", help="your private JWK file")
    decrypt.add_argument("jwe", metavar="JWE", help="the encrypted share ('-': stdin)")
    decrypt.set_defaults(func=cmd_rekey_decrypt)
    for p in (init, verify, cancel, status, decrypt):
        client_options(p)

    share = operator.add_parser("share", help="prove a share belongs to the set in force")
    share_actions = share.add_subparsers(dest="share_action", required=True)
    check = share_actions.add_parser(
        "check",
        help="check your share without revealing it (it never leaves this machine)",
    )
    _share_source(check)
    client_options(check)
    check.set_defaults(func=cmd_share_check)


def add_drill_commands(sub: Any, client_options: Options) -> None:
    """``ekms drill start|check-in|report|list``."""
    drill = sub.add_parser(
        "drill", help="share-health drills: officials check in, the report shows the quorum"
    ).add_subparsers(dest="action", required=True)
    start = drill.add_parser("start", help="start a drill (security officer or official)")
    start.add_argument("--hours", type=float, default=168.0, help="open for (default 168)")
    start.add_argument(
        "--stale-after-days", type=int, default=90, help="a check older than this is stale"
    )
    start.set_defaults(func=cmd_drill_start)
    check_in = drill.add_parser("check-in", help="check in with your share (an official)")
    check_in.add_argument("drill", metavar="DRILL_ID")
    _share_source(check_in)
    check_in.set_defaults(func=cmd_drill_check_in)
    report = drill.add_parser("report", help="the drill's report")
    report.add_argument("drill", metavar="DRILL_ID")
    report.set_defaults(func=cmd_drill_report)
    listing = drill.add_parser("list", help="drills, newest first")
    listing.set_defaults(func=cmd_drill_list)
    for p in (start, check_in, report, listing):
        client_options(p)
