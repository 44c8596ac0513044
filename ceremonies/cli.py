"""``ekms ceremony``: run, check, list, render and submit ceremony scripts and transcripts.

``api/cli.py`` calls ``add_ceremony_commands`` while it builds its parser; the modules behind each
command are imported only when that command runs, so ``ekms`` starts as fast as before.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from ceremonies.script import Script, ScriptReport
    from ceremonies.service import Service

SCRIPTS = Path(__file__).resolve().parent / "scripts"
DEFAULT_DIRECTORY = "ceremony-transcripts"
EXIT_UNAVAILABLE = 3  # a valid script that needs actions this version does not have


def _fail(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 2


def resolve_script(name: str) -> Path:
    """A path, or the name of a shipped script (``unseal-after-restart``)."""
    path = Path(name)
    if path.exists() or os.sep in name or name.endswith((".yaml", ".yml")):
        return path
    return SCRIPTS / f"{name}.yaml"


def _report(path: Path) -> ScriptReport:
    from ceremonies.actions import known_actions
    from ceremonies.script import ScriptReport, load_script

    try:
        raw = path.read_bytes()
    except OSError as exc:
        return ScriptReport(None, (f"cannot read {path}: {exc.strerror or exc}",))
    return load_script(raw, known_actions())


def cmd_check(args: argparse.Namespace) -> int:
    path = resolve_script(args.file)
    report = _report(path)
    for error in report.errors:
        print(f"{path}: {error}")
    if report.unknown_actions:
        print(
            f"{path}: needs actions not available in this version of the service: "
            + ", ".join(report.unknown_actions)
        )
    if report.errors:
        return 1
    if report.unknown_actions:
        return EXIT_UNAVAILABLE
    assert report.script is not None
    print(f"{path}: OK ({report.script.name}, {len(report.script.steps)} steps)")
    return 0


def cmd_list(_args: argparse.Namespace) -> int:
    for path in sorted(SCRIPTS.glob("*.yaml")):
        report = _report(path)
        script = report.script
        if script is None:
            print(f"{path.stem:<24} INVALID: {'; '.join(report.errors)}")
            continue
        state = "" if report.runnable else "  (needs: " + ", ".join(report.unknown_actions) + ")"
        print(f"{script.name:<24} {script.title}{state}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from api.cli import _client
    from ceremonies.rehearsal import Rehearsal
    from ceremonies.runner import Runner
    from ceremonies.script import require_runnable
    from ceremonies.service import Service, ServiceError
    from ceremonies.terminal import EndOfInputError, Terminal
    from kms.errors import EkmsError

    path = resolve_script(args.file)
    term = Terminal()
    mode = "resume" if args.resume else "restart" if args.restart else "ask"
    try:
        script = require_runnable(_report(path), str(path))
        peer = _peer(args, script)
        if args.rehearse:
            with Rehearsal(script, term) as rehearsal:
                rehearsal.prepare()
                directory = Path(args.transcript_dir or DEFAULT_DIRECTORY) / "rehearsals"
                runner = Runner(script, Service(rehearsal.address), term, directory, rehearsal=True)
                return runner.run("restart" if mode == "ask" else mode)
        directory = Path(args.transcript_dir or DEFAULT_DIRECTORY)
        runner = Runner(script, Service(_client(args).address), term, directory, peer=peer)
        return runner.run(mode)
    except (EndOfInputError, KeyboardInterrupt):
        print(
            "\nInterrupted. The journal keeps every step recorded so far: run the same command "
            "again to resume or start over.",
            file=sys.stderr,
        )
        return 130
    except ServiceError as exc:
        return _fail(f"the service: {exc}")
    except (EkmsError, RuntimeError) as exc:
        return _fail(str(exc))


def _peer(args: argparse.Namespace, script: Script) -> Service | None:
    """The other site's service (``--peer``), for a ceremony that spans two sites."""
    from ceremonies.service import Service
    from kms.errors import InvalidRequestError

    if args.peer_ca and not args.peer:
        raise InvalidRequestError("--peer-ca needs --peer, the other site's address")
    if args.rehearse and (
        script.uses_peer or args.peer or script.rehearsal.get("by_runner", True) is False
    ):
        raise InvalidRequestError(
            f"{script.name} needs two sites (a home and a site provisioned from it) and is not "
            "rehearsed by the runner yet: rehearse it against two throwaway servers "
            "(docs/sites.md, 'Rehearsing the site ceremonies')"
        )
    return Service(args.peer, ca_file=args.peer_ca) if args.peer else None


def _load_document(path: str) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise SystemExit(_fail(f"cannot read {path}: {exc.strerror or exc}")) from None
    except ValueError:
        raise SystemExit(_fail(f"{path} is not a transcript (not JSON)")) from None
    if not isinstance(document, dict) or not isinstance(document.get("transcript"), dict):
        raise SystemExit(_fail(f"{path} is not a transcript file"))
    return document


def cmd_render(args: argparse.Namespace) -> int:
    from ceremonies.render import render_markdown
    from ceremonies.transcript import check_file

    document = _load_document(args.transcript)
    text = render_markdown(document, check_file(document, None))
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
        print(f"Wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a transcript the runner could not (the service was sealed, say)."""
    from api.cli import _client
    from api.principal_keys import KeyHolder
    from ceremonies.journal import write_atomically
    from ceremonies.service import Service, ServiceError

    document = _load_document(args.transcript)
    if document.get("service_signature"):
        print("The service has signed this transcript already.")
        return 0
    client = _client(args)
    service = Service(client.address)
    token = client.token
    try:
        if args.principal:
            if not args.key:
                return _fail("--principal needs --key, the principal's key file")
            holder = KeyHolder.load(args.principal, args.key)
            audience = str(service.info()["audience"])
            answer = service.call("POST", "auth/jwt/login", {"jwt": holder.assertion(audience)})
            token = answer["auth"]["client_token"]
        body = {"transcript": document["transcript"], "signatures": document.get("signatures", [])}
        data = service.call("POST", "ekms/ceremonies/transcripts", body, token=token)["data"]
    except (OSError, ValueError) as exc:
        return _fail(f"cannot use the key file: {exc}")
    except ServiceError as exc:
        return _fail(str(exc))
    document["service_signature"] = {
        "jws": data["jws"],
        "kid": data["kid"],
        "request_id": data["request_id"],
    }
    write_atomically(Path(args.transcript), json.dumps(document, indent=2, sort_keys=True).encode())
    print(f"Submitted: audit record request id {data['request_id']}")
    return 0


def add_ceremony_commands(
    sub: Any, client_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    ceremony = sub.add_parser(
        "ceremony", help="run key ceremonies from scripts, with signed transcripts"
    ).add_subparsers(dest="action", required=True)
    run = ceremony.add_parser(
        "run",
        help="walk the participants through a ceremony script",
        description="Run a ceremony script (a file, or the name of a shipped one: ekms "
        "ceremony list). Every step is journaled; run it again to resume.",
    )
    run.add_argument("file", metavar="FILE")
    run.add_argument(
        "--rehearse", action="store_true", help="against a throwaway service and token"
    )
    run.add_argument(
        "--transcript-dir",
        metavar="DIR",
        help=f"where journals and transcripts go (default: ./{DEFAULT_DIRECTORY})",
    )
    run.add_argument(
        "--peer",
        metavar="URL",
        help="the other site's service, for ceremonies that span two sites (steps at: peer)",
    )
    run.add_argument("--peer-ca", metavar="FILE", help="CA bundle for the peer's TLS certificate")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="resume the unfinished ceremony")
    mode.add_argument(
        "--restart", action="store_true", help="set the unfinished ceremony aside and start over"
    )
    client_options(run)
    run.set_defaults(func=cmd_run)
    check = ceremony.add_parser(
        "check",
        help="validate a ceremony script without running it",
        epilog="Exit status: 0 valid, 1 invalid, 3 valid but needs actions this version lacks.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check)
    listing = ceremony.add_parser("list", help="the ceremony scripts shipped with ekms")
    listing.set_defaults(func=cmd_list)
    render = ceremony.add_parser("render", help="a transcript as a Markdown document")
    render.add_argument("transcript", metavar="TRANSCRIPT")
    render.add_argument("-o", "--output", metavar="FILE.md", help="write to FILE (default: stdout)")
    render.set_defaults(func=cmd_render)
    submit = ceremony.add_parser(
        "submit", help="submit a transcript the runner could not (signed by the service)"
    )
    submit.add_argument("transcript", metavar="TRANSCRIPT")
    submit.add_argument("--principal", help="log in as this signer (else EKMS_TOKEN)")
    submit.add_argument("--key", metavar="FILE", help="the signer's key file")
    client_options(submit)
    submit.set_defaults(func=cmd_submit)
