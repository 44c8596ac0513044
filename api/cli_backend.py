"""``ekms site backend-credential``: replace a transit site's sealed backend credential.

The credential (a Vault/OpenBao token or AppRole pair, as JSON) is read from a file or standard
input, never from the command line, where shell history and ``ps`` would keep it. The service
logs in with it before it seals and stores it (``api/routes_backend.py``).

``api/cli.py`` calls ``add_backend_commands`` after the other ``ekms site`` commands are added:
it extends that command, or makes it if there is none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import _client, _print, fail

if TYPE_CHECKING:
    from collections.abc import Callable

    Options = Callable[[argparse.ArgumentParser], None]

_LIMIT = 64 * 1024


def _read_credential(source: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read(_LIMIT + 1) if source == "-" else Path(source).read_text()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"{source} is not UTF-8 text")
    if len(text) > _LIMIT:
        fail(f"{source} is larger than 64 KiB: it should hold one small JSON object")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        fail(
            f"{source} must hold one JSON object: "
            '{"role_id": "...", "secret_id": "..."} or {"token": "..."}'
        )
    return body


def cmd_site_backend_credential(args: argparse.Namespace) -> int:
    body = _read_credential(args.file)
    result = _client(args).call("POST", "ekms/site/backend-credential", body)
    data = result["data"]
    done = "replaced" if data.get("replaced") else "stored"
    _print(
        args,
        result,
        f"Backend credential {done} ({data.get('credential')}): it logged in, and is sealed "
        "under the barrier key.\nEach worker uses it from its next login; seal and unseal to "
        "switch now. Delete the file you gave.",
    )
    return 0


def _site_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> Any:
    """The subcommands of ``ekms site``, made here if no other module made the command."""
    site = sub.choices.get("site")
    if site is None:
        site = sub.add_parser("site", help="this site and the site registry")
        return site.add_subparsers(dest="action", required=True)
    for action in site._actions:  # noqa: SLF001 - argparse keeps a parser's subcommands here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action
    return site.add_subparsers(dest="action", required=True)


def add_backend_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client_options: Options
) -> None:
    credential = _site_commands(sub).add_parser(
        "backend-credential",
        help="replace a transit site's Vault/OpenBao credential (security officers, root)",
        description="Send the credential the service uses to reach its transit mount: a JSON "
        'file, {"role_id": "...", "secret_id": "..."} or {"token": "..."}. The service logs '
        "in with it, then seals it under the barrier key in place of the current one. Needs "
        "the node unsealed and a security officer's or root token (EKMS_TOKEN/VAULT_TOKEN).",
    )
    credential.add_argument(
        "-file",
        "--file",
        required=True,
        metavar="FILE",
        help="the credential as JSON ('-': read standard input)",
    )
    client_options(credential)
    credential.set_defaults(func=cmd_site_backend_credential)
