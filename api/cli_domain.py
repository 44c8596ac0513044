"""``ekms domain export|load|import``: the security-domain backup (docs/adr/0012 §4, §5).

``export`` writes the document to a file readable only by its owner, beside the target first
and renamed once complete, so a reader never sees half a backup. Nothing in it opens without a
quorum of the share set, but it names every key and principal of the domain: keep it as the
ceremony says. ``load`` sends it to a new node (no token: the node has none yet), ``import``
to an initialised, unsealed site to refresh it.

``api/cli.py`` calls ``add_domain_commands`` while it builds its parser. Like the rest of the
client, the commands need only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import CliError, _client, _print

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    Options = Callable[[argparse.ArgumentParser], None]

MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600: beside it first, fsynced, then renamed."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_document(name: str) -> dict[str, Any]:
    path = Path(name)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise CliError(f"{name} is larger than {MAX_DOCUMENT_BYTES} bytes: not a domain backup")
    try:
        document = json.loads(raw)
    except ValueError:
        raise CliError(f"{name} is not JSON: not a domain backup") from None
    if not isinstance(document, dict):
        raise CliError(f"{name} is not a JSON object: not a domain backup")
    return document


def _summary_text(s: dict[str, Any]) -> list[str]:
    return [
        f"Backup ID       {s.get('backup_id')}",
        f"Digest          {s.get('digest')}",
        f"Source          {s.get('source', {}).get('name')} ({s.get('source', {}).get('kind')})",
        f"Target          {s.get('target', {}).get('name')} ({s.get('target', {}).get('kind')})",
        f"Keys            {s.get('keys')} ({s.get('versions')} versions)",
        f"Principals      {s.get('principals')}",
    ]


def cmd_domain_export(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", "ekms/domain/export", {"target_site": args.target_site})
    data = result["data"]
    out = Path(args.out)
    write_private(out, json.dumps(data["backup"], indent=2, sort_keys=True).encode() + b"\n")
    for reason in data.get("skipped") or []:
        print(f"warning: left out: {reason}", file=sys.stderr)  # noqa: T201 - a warning
    _print(
        args,
        data["summary"] | {"file": str(out), "skipped": data.get("skipped") or []},
        "\n".join([*_summary_text(data["summary"]), f"Written to      {out}"]),
    )
    return 0


def cmd_domain_load(args: argparse.Namespace) -> int:
    document = read_document(args.file)
    client = _client(args)
    client.token = None  # a new node has no token; send none rather than another site's
    data = client.call("POST", "ekms/domain/load", document)["data"]
    text = [
        *_summary_text(data),
        "",
        "The node is initialised and sealed. A quorum of the domain's officials now unseals",
        "it (ekms operator unseal); the keys are imported at that first unseal.",
    ]
    _print(args, data, "\n".join(text))
    return 0


def cmd_domain_import(args: argparse.Namespace) -> int:
    document = read_document(args.file)
    data = _client(args).call("POST", "ekms/domain/import", document)["data"]
    imported = data.get("imported") or []
    text = [
        *_summary_text(data),
        f"Imported        {len(imported)} version(s): {', '.join(imported) or 'none'}",
        f"Already here    {data.get('versions_present')} version(s)",
        (
            f"Added           {data.get('principals_added')} principal(s), "
            f"{data.get('sites_added')} site(s)"
        ),
    ]
    _print(args, data, "\n".join(text))
    return 0


def add_domain_commands(sub: Any, client_options: Options) -> None:
    """``ekms domain export|load|import``."""
    domain = sub.add_parser(
        "domain",
        help="security-domain backup: export for a site, load on a new node, refresh a site",
    ).add_subparsers(dest="action", required=True)
    export = domain.add_parser(
        "export",
        help="write the domain backup for a registered site (security officer or root)",
    )
    export.add_argument("--target-site", required=True, metavar="NAME", help="the site it is for")
    export.add_argument("--out", required=True, metavar="FILE", help="written with mode 0600")
    export.set_defaults(func=cmd_domain_export)
    load = domain.add_parser(
        "load", help="provision a new node from a backup exported for it (no token needed)"
    )
    load.add_argument("file", metavar="FILE")
    load.set_defaults(func=cmd_domain_load)
    refresh = domain.add_parser(
        "import",
        help="add the keys a newer backup has to an unsealed site (security officer or root)",
    )
    refresh.add_argument("file", metavar="FILE")
    refresh.set_defaults(func=cmd_domain_import)
    for p in (export, load, refresh):
        client_options(p)
