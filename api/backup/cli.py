"""``ekms backup seal`` and ``ekms restore`` (docs/restore.md).

Exit status: 0 done; 1 integrity failure (the object is named); 2 usage error, or the service
refused, with a reason code (``api.backup.archive.Reason``). Ctrl-C exits 130 and leaves a
restore resumable. Only the standard library is imported until a command runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from api.backup.progress import Progress
    from api.backup.service import MachineSession
    from api.principal_keys import KeyHolder

_DEFAULT_WORKERS = min(8, os.cpu_count() or 2)


def _holder(args: argparse.Namespace) -> KeyHolder:
    from api.cli import fail
    from api.principal_keys import KeyHolder

    try:
        return KeyHolder.load(args.principal, Path(args.key))
    except OSError as exc:
        fail(f"cannot read key file {args.key}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(f"key file {args.key}: {exc}")


def _session(args: argparse.Namespace, site: str) -> MachineSession:
    from api.backup.service import MachineSession, Service, default_audience
    from api.cli import _client

    service = Service(_client(args).address)
    return MachineSession(service, _holder(args), args.audience or default_audience(site))


def _progress(args: argparse.Namespace) -> Callable[[str, int, int], Progress]:
    from api.backup.progress import Progress

    stream = None if args.quiet else sys.stderr
    return lambda label, total, count: Progress(label, total, count, stream)


def _report_failure(command: str, exc: Exception) -> int:
    from api.backup.archive import BackupError, IntegrityError, RefusedError

    if isinstance(exc, IntegrityError):
        print(f"ekms {command}: INTEGRITY FAILURE: {exc}", file=sys.stderr)
    elif isinstance(exc, RefusedError):
        print(f"ekms {command}: refused: {exc}", file=sys.stderr)
    else:
        print(f"Error: {exc}", file=sys.stderr)
    return exc.exit_status if isinstance(exc, BackupError) else 2


def _os_error(exc: OSError) -> Exception:
    """A file the tool could not read or write: the operator's to fix, without a traceback."""
    from api.backup.archive import UsageError

    where = f"{exc.filename}: " if exc.filename else ""
    return UsageError(f"{where}{exc.strerror or exc}")


def cmd_seal(args: argparse.Namespace) -> int:
    from api.backup.archive import BackupError
    from api.backup.seal import SealOptions, seal
    from api.cli import _print

    options = SealOptions(
        dataset=args.dataset, site=args.site, signing_key=args.signing_key, workers=args.workers
    )
    session = _session(args, args.site)
    try:
        report = seal(Path(args.src), Path(args.out), options, session, _progress(args))
    except BackupError as exc:
        return _report_failure("backup seal", exc)
    except OSError as exc:
        return _report_failure("backup seal", _os_error(exc))
    finally:
        session.service.close()
    _print(
        args,
        report.to_json(),
        f"Sealed {report.objects:,} objects ({report.bytes:,} bytes) of dataset "
        f"{report.dataset} into {report.archive}\narchive id {report.archive_id}, site "
        f"{report.site}, {report.seconds:.1f} s",
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from api.backup.archive import BackupError, UsageError
    from api.backup.restore import RestoreOptions, load_archive, restore
    from api.cli import _print

    if args.verify_only == (args.to is not None):
        return _report_failure("restore", UsageError("give --to DIR, or --verify-only"))
    public_key = None
    try:
        if args.public_key:
            try:
                public_key = Path(args.public_key).read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read {args.public_key}: {exc.strerror}") from None
        archive = Path(args.archive)
        site = load_archive(archive).manifest.site
        options = RestoreOptions(
            request_id=args.request,
            target=None if args.to is None else Path(args.to),
            verify_only=args.verify_only,
            batch_size=args.batch_size,
            workers=args.workers,
            signing_key=args.signing_key,
            public_key=public_key,
            expect_archive=args.archive_id,
        )
        session = _session(args, site)
        try:
            report = restore(archive, options, session, _progress(args))
        finally:
            session.service.close()
    except BackupError as exc:
        return _report_failure("restore", exc)
    except OSError as exc:
        return _report_failure("restore", _os_error(exc))
    verb = "Verified" if report.verify_only else "Restored"
    where = "" if args.to is None else f" to {args.to}"
    text = (
        f"{verb} {report.objects:,} objects ({report.bytes:,} bytes) of dataset "
        f"{report.dataset}{where}: every hash and the manifest signature check out\n"
        f"archive id {report.archive_id}, sealed at site {report.site}; "
        f"{report.unwrapped:,} data keys unwrapped, {report.skipped:,} objects already in place; "
        f"{report.seconds:.1f} s"
    )
    _print(args, report.to_json(), text)
    return 0


def add_backup_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    client_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``backup seal`` and ``restore`` to ``ekms`` (called by ``api.cli.build_parser``)."""

    def machine_options(p: argparse.ArgumentParser, role: str, workers: int) -> None:
        p.add_argument("-principal", "--principal", required=True, help=f"the {role}'s id")
        p.add_argument(
            "-key",
            "--key",
            required=True,
            metavar="FILE",
            help="its private key: a private JWK (JSON) or a PEM file",
        )
        p.add_argument(
            "-audience",
            "--audience",
            help="the service's audience (EKMS_AUDIENCE; default embassy-kms/<site>)",
        )
        p.add_argument(
            "-signing-key",
            "--signing-key",
            default="backup-manifest",
            help="the manifest signing key (a backup-manifest* key; default %(default)s)",
        )
        p.add_argument(
            "-workers",
            "--workers",
            type=int,
            default=workers,
            help="objects handled at once (default %(default)s)",
        )
        p.add_argument("-quiet", "--quiet", action="store_true", help="no progress bar")
        client_options(p)

    backup = sub.add_parser("backup", help="seal a directory into an archive").add_subparsers(
        dest="action", required=True
    )
    seal = backup.add_parser(
        "seal",
        help="encrypt a directory with one data key per object and a signed manifest",
        description="Seal SRC into the archive directory ARCHIVE as a backup writer: every "
        "object gets its own data key from the service, is encrypted with Tink's streaming "
        "AEAD, and is listed in a manifest signed by a manifest key in the HSM.",
        epilog="Exit status: 0 sealed, 2 error (nothing is left at ARCHIVE).",
    )
    seal.add_argument("src", metavar="SRC", help="the directory to seal (regular files only)")
    seal.add_argument("-dataset", "--dataset", required=True, metavar="KEY", help="dataset key")
    seal.add_argument("-site", "--site", required=True, help="the site that keeps the archive")
    seal.add_argument("-out", "--out", required=True, metavar="ARCHIVE", help="archive to make")
    machine_options(seal, "backup writer", max(4, _DEFAULT_WORKERS))  # data-key round trips
    seal.set_defaults(func=cmd_seal)

    restore = sub.add_parser(
        "restore",
        help="restore an archive with an approved restore request's credential",
        description="Restore ARCHIVE as the restore tool named in an approved restore request: "
        "verify the manifest signature and the request's scope, unwrap the data keys in "
        "batches, then decrypt and verify every object, writing each atomically. A rerun "
        "after an interruption resumes.",
        epilog="Exit status: 0 restored, 1 integrity failure (the object is named), 2 usage "
        "error or refused by the service (with a reason code), 130 interrupted (resumable).",
    )
    restore.add_argument("archive", metavar="ARCHIVE", help="the archive directory")
    restore.add_argument("-request", "--request", required=True, metavar="ID", help="request id")
    target = restore.add_mutually_exclusive_group(required=True)
    target.add_argument("-to", "--to", metavar="DIR", help="where to write the files")
    target.add_argument(
        "-verify-only", "--verify-only", action="store_true", help="check without writing"
    )
    restore.add_argument(
        "-batch-size", "--batch-size", type=int, default=100, help="data keys per unwrap request"
    )
    restore.add_argument(
        "-public-key",
        "--public-key",
        metavar="PEM",
        help="the manifest key's public key, pinned (default: fetched from the service)",
    )
    restore.add_argument(
        "-archive-id", "--archive-id", metavar="ID", help="refuse any other archive"
    )
    machine_options(restore, "restore tool", _DEFAULT_WORKERS)
    restore.set_defaults(func=cmd_restore)
