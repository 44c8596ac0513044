"""``ekms``: run the server, and speak to it as an operator (Vault-like commands and flags).

The client commands use only the standard library, so an official's laptop needs nothing else.
Errors are printed as one line on stderr with exit status 2; nothing here prints a traceback
for a user error. ``ekms audit export`` fetches the service's audit log (JSON lines) like any
other client command; ``ekms audit verify`` then works offline and exits 1 when an export fails
to verify.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import getpass
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from kms.errors import EkmsError

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator

    from kms.audit_export import VerifyReport

DEFAULT_ADDR = "http://127.0.0.1:8200"
DEV_BANNER = """
WARNING! dev mode is enabled! In this mode, Embassy KMS runs with a throwaway SoftHSM token
and database, is already initialised and unsealed, and prints every unseal share and the root
token below. DEVELOPMENT ONLY: never use it for real data; everything is lost when it stops.

The address to use:

    $ export VAULT_ADDR='{addr}'

Unseal shares ({threshold} of {shares} unseal; SLIP-39 mnemonics):
{share_lines}
Root Token: {token}

Data directory (deleted on exit): {data_dir}
"""


class CliError(Exception):
    pass


def fail(message: str) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- server -------------------------------------------------------------------------------


def cmd_server(args: argparse.Namespace) -> int:
    from api.settings import Settings
    from api.supervisor import Supervisor

    if args.dev == bool(args.config):
        fail("give either -dev or -config FILE")
    data_dir: Path | None = None
    if args.dev:
        data_dir = Path(tempfile.mkdtemp(prefix="ekms-dev-"))
        settings = Settings(
            data_dir=data_dir,
            dev=True,
            listen=args.dev_listen_address,
            workers=args.workers or 2,
            log_level=args.log_level,
        )
    else:
        settings = Settings.from_file(Path(args.config))
        if args.workers:
            settings.workers = args.workers
    supervisor = Supervisor(settings)
    try:
        custodian = supervisor.prepare()
        supervisor.bind()
        if args.dev:
            _dev_bootstrap(settings, custodian, args)
        return supervisor.serve()
    finally:
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


def _dev_bootstrap(settings: Any, custodian: Any, args: argparse.Namespace) -> None:
    from hsm.softhsm import TransportPinProvisioner, find_module
    from kms.ports import SystemClock, SystemRandom
    from kms.seal import initialise
    from storage.sql_store import SqlStore

    store = SqlStore.open(settings.database_url, run_migrations=False)
    try:
        result = initialise(
            threshold=args.dev_threshold,
            shares=args.dev_shares,
            store=store,
            provisioner=TransportPinProvisioner(
                module=settings.pkcs11_module or find_module(),
                token_label=settings.token_label,
                transport_file=Path(settings.transport_pin_file),
            ),
            clock=SystemClock(),
            random=SystemRandom(),
            allow_single_share=True,
            root_token=args.dev_root_token_id or None,
        )
    finally:
        store.dispose()
    for share in result.mnemonics[: result.threshold]:
        custodian.submit(share)
    host, port = settings.host_port
    print(
        DEV_BANNER.format(
            addr=f"http://{host}:{port}",
            threshold=result.threshold,
            shares=len(result.mnemonics),
            share_lines="".join(f"  {i}: {m}\n" for i, m in enumerate(result.mnemonics, 1)),
            token=result.root_token.token,
            data_dir=settings.data_dir,
        ),
        flush=True,
    )


# --- client -------------------------------------------------------------------------------


class Client:
    def __init__(self, address: str, token: str | None) -> None:
        self.address = address.rstrip("/")
        self.token = token
        self.last_request_id: str | None = None  # the last answer's X-Request-Id (audit record)
        self.context: ssl.SSLContext | None = None  # TLS trust of its own (ceremony --peer-ca)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the address is the operator's choice
            f"{self.address}/v1/{path}", data=data, method=method
        )
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("X-Vault-Token", self.token)
        self.last_request_id = None
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=60, context=self.context
            ) as response:
                self.last_request_id = response.headers.get("X-Request-Id")
                raw = response.read()
        except urllib.error.HTTPError as exc:
            self.last_request_id = exc.headers.get("X-Request-Id")
            raise _http_error(exc) from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach {self.address}: {exc.reason}") from None
        return json.loads(raw) if raw else None

    def download(self, path: str, out: IO[bytes]) -> dict[str, str]:
        """GET ``path`` and copy the body to ``out`` as it arrives; returns the headers."""
        request = urllib.request.Request(f"{self.address}/v1/{path}")  # noqa: S310
        if self.token:
            request.add_header("X-Vault-Token", self.token)
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=300, context=self.context
            ) as response:
                shutil.copyfileobj(response, out, 1 << 16)
                return dict(response.headers.items())
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach {self.address}: {exc.reason}") from None


def _http_error(exc: urllib.error.HTTPError) -> CliError:
    """The service's own error messages (Vault's ``errors`` list), with the status."""
    raw = exc.read()
    try:
        errors = json.loads(raw).get("errors") or [exc.reason]
    except (ValueError, AttributeError):
        errors = [str(exc.reason)]
    return CliError(f"{exc.code}: {'; '.join(map(str, errors))}")


def _client(args: argparse.Namespace) -> Client:
    address = args.address or os.environ.get("EKMS_ADDR") or os.environ.get("VAULT_ADDR")
    token = os.environ.get("EKMS_TOKEN") or os.environ.get("VAULT_TOKEN")
    return Client(address or DEFAULT_ADDR, token)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.format == "json" else text)


def _status_text(s: dict[str, Any]) -> str:
    lines = [
        f"Initialized     {str(s.get('initialized')).lower()}",
        f"Sealed          {str(s.get('sealed')).lower()}",
        f"Total Shares    {s.get('n')}",
        f"Threshold       {s.get('t')}",
    ]
    if s.get("sealed") and s.get("initialized"):
        lines.append(f"Unseal Progress {s.get('progress')}/{s.get('t')}")
        lines.append(f"Unseal Nonce    {s.get('nonce') or 'n/a'}")
    return "\n".join(lines)


def cmd_operator_init(args: argparse.Namespace) -> int:
    result = _client(args).call(
        "PUT",
        "sys/init",
        {"secret_shares": args.key_shares, "secret_threshold": args.key_threshold},
    )
    shares = "".join(f"Unseal Share {i}: {k}\n" for i, k in enumerate(result["keys"], 1))
    _print(
        args,
        result,
        f"{shares}\nInitial Root Token: {result['root_token']}\n\n"
        "Hand each share to one official; the service is sealed until "
        f"{args.key_threshold} of them unseal it.",
    )
    return 0


def cmd_operator_unseal(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.reset:
        result = client.call("PUT", "sys/unseal", {"reset": True})
        _print(args, result, _status_text(result))
        return 0
    if bool(args.official) != bool(args.official_key):
        fail("--official ID and --key FILE go together: the official signs for the share")
    share = _read_share(args, "Unseal share (will be hidden): ")
    if share is None:
        fail("no share given: pass it as an argument, with --file, or run in a terminal")
    if not args.official:
        result = client.call("PUT", "sys/unseal", {"key": share})
    else:
        signed = _unseal_signer(args, share)
        try:
            result = client.call("PUT", "sys/unseal", signed(client))
        except CliError as exc:
            if "sign again" not in str(exc):
                raise
            # Another official's share started or ended the attempt since the nonce was read.
            result = client.call("PUT", "sys/unseal", signed(client))
    _print(args, result, _status_text(result))
    return 0


def _unseal_signer(args: argparse.Namespace, share: str) -> Callable[[Client], dict[str, str]]:
    """The unseal body with "official ID presents this share to the current attempt", signed.

    See kms.unseal_assertion.

    The attempt's nonce is read just before each signature; the share's member id comes from
    its public header. Imported here: the rest of the CLI needs only the standard library.
    """
    from api.principal_keys import KeyHolder
    from kms.unseal_assertion import share_member

    audience = args.audience or os.environ.get("EKMS_AUDIENCE")
    if not audience:
        fail(
            "--official needs the service's audience: --audience AUD or EKMS_AUDIENCE "
            "(embassy-kms/<site name> unless configured otherwise)"
        )
    try:
        holder = KeyHolder.load(args.official, args.official_key)
    except OSError as exc:
        fail(f"cannot read key file {args.official_key}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(f"--key {args.official_key}: {exc}")
    member = share_member(share)

    def signed(client: Client) -> dict[str, str]:
        nonce = client.call("GET", "sys/seal-status").get("nonce") or ""
        assertion = holder.unseal_assertion(audience, nonce=nonce, member=member)
        return {"key": share, "official_assertion": assertion}

    return signed


def _read_share(args: argparse.Namespace, prompt: str) -> str | None:
    """The share from the argument, ``--file`` (``-``: one stdin line) or a hidden prompt."""
    if args.key:
        return str(args.key)
    if args.file == "-":
        return sys.stdin.readline().strip()
    if args.file:
        try:
            return Path(args.file).read_text().strip()
        except OSError as exc:
            fail(f"cannot read share file {args.file}: {exc.strerror}")
    if sys.stdin.isatty():
        return getpass.getpass(prompt).strip()
    return None


def _root_generation_text(s: dict[str, Any]) -> str:
    lines = [
        f"Nonce           {s.get('nonce') or 'n/a'}",
        f"Started         {str(s.get('started')).lower()}",
        f"Progress        {s.get('progress')}/{s.get('required')}",
        f"Complete        {str(s.get('complete')).lower()}",
    ]
    if s.get("encoded_token"):
        lines.append(f"Encoded Token   {s['encoded_token']}")
    if s.get("otp"):
        lines.append(f"OTP             {s['otp']}")
    lines.append(f"OTP Length      {s.get('otp_length')}")
    return "\n".join(lines)


def _decode_root_token(args: argparse.Namespace) -> int:
    from kms.tokens import decode_with_otp

    if not args.otp:
        fail("-decode needs the -otp of the attempt")
    encoded = sys.stdin.readline().strip() if args.decode == "-" else args.decode.strip()
    token = decode_with_otp(encoded, args.otp.strip())
    _print(args, {"token": token}, token)
    return 0


def _submit_root_share(args: argparse.Namespace, client: Client) -> int:
    nonce = args.nonce
    if not nonce and not args.key and not args.file and sys.stdin.isatty():
        nonce = client.call("GET", "sys/generate-root/attempt").get("nonce")
        if not nonce:
            fail("no root generation is in progress: start one with -init")
        print(f"Operation nonce: {nonce}", file=sys.stderr)
    if not nonce:
        fail("give the attempt's -nonce (shown by -init and -status) with the share")
    share = _read_share(args, "Unseal share (will be hidden): ")
    if share is None:
        fail("no share given: pass it as an argument, with --file, or run in a terminal")
    result = client.call("PUT", "sys/generate-root/update", {"key": share, "nonce": nonce})
    text = _root_generation_text(result)
    if result.get("complete"):
        text += "\n\nDecode it with: ekms operator generate-root -decode ENCODED -otp OTP"
    _print(args, result, text)
    return 0


def cmd_operator_generate_root(args: argparse.Namespace) -> int:
    if args.decode is not None:
        return _decode_root_token(args)
    client = _client(args)
    if args.cancel:
        client.call("DELETE", "sys/generate-root/attempt")
        print("Success! Root token generation canceled (if it was started)")
        return 0
    if args.status:
        result = client.call("GET", "sys/generate-root/attempt")
        _print(args, result, _root_generation_text(result))
        return 0
    if args.init:
        result = client.call("PUT", "sys/generate-root/attempt", {"otp": args.otp or ""})
        text = _root_generation_text(result)
        if result.get("otp"):
            text += (
                "\n\nKeep the OTP: it is shown once, and only it decodes the new root token "
                "(ekms operator generate-root -decode ENCODED -otp OTP)."
            )
        _print(args, result, text)
        return 0
    return _submit_root_share(args, client)


def cmd_operator_seal(args: argparse.Namespace) -> int:
    _client(args).call("PUT", "sys/seal")
    print("Success! Embassy KMS is sealed.")
    return 0


def cmd_operator_status(args: argparse.Namespace) -> int:
    result = _client(args).call("GET", "sys/seal-status")
    _print(args, result, _status_text(result))
    return 2 if result.get("sealed") else 0


def _key_text(data: dict[str, Any]) -> str:
    rows = [f"{k:<24}{v}" for k, v in data.items() if k != "keys"]
    rows.append(f"{'versions':<24}{', '.join(data.get('keys', {}))}")
    return "\n".join(rows)


def cmd_key_create(args: argparse.Namespace) -> int:
    body = {"type": args.type, "classification": args.classification, "residency": args.residency}
    result = _client(args).call("POST", f"transit/keys/{args.name}", body)
    _print(args, result, _key_text(result["data"]))
    return 0


def cmd_key_read(args: argparse.Namespace) -> int:
    result = _client(args).call("GET", f"transit/keys/{args.name}")
    _print(args, result, _key_text(result["data"]))
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", f"transit/keys/{args.name}/rotate")
    _print(args, result, f"Key {args.name} rotated to version {result['data']['latest_version']}")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    try:
        result = _client(args).call("GET", "transit/keys?list=true")
    except CliError as exc:
        if str(exc).startswith("404"):
            _print(args, {"keys": []}, "No keys.")
            return 0
        raise
    _print(args, result, "\n".join(result["data"]["keys"]))
    return 0


def cmd_datakey(args: argparse.Namespace) -> int:
    context = base64.b64encode(args.context.encode()).decode() if args.context else ""
    kind = "wrapped" if args.wrapped else "plaintext"
    result = _client(args).call(
        "POST", f"transit/datakey/{kind}/{args.name}", {"context": context, "bits": args.bits}
    )
    data = result["data"]
    text = f"ciphertext  {data['ciphertext']}"
    if "plaintext" in data:
        text += f"\nplaintext   {data['plaintext']}"
    _print(args, result, text)
    return 0


# --- audit (offline) ----------------------------------------------------------------------

AUDIT_INPUT_LIMIT = 1 << 16  # a JWK or a kept head line is a few hundred bytes
_HEAD_LINE_START = b'{"jws":'  # canonical JSON sorts keys: only a head line starts so


class _HeadTap:
    """Hands the export's lines on, each read with a bound, and keeps the last head line.

    The verifier's report counts heads but does not return them; the summary names the newest,
    which is the line an auditor keeps for next time. It is read only once the export verified,
    when every line was canonical JSON, so its first bytes say which lines are heads.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head: bytes | None = None

    def lines(self, stream: IO[bytes]) -> Iterator[bytes]:
        for line in iter(lambda: stream.readline(self.limit), b""):
            if line.startswith(_HEAD_LINE_START):
                self.head = line
            yield line

    def last(self) -> dict[str, Any] | None:
        if self.head is None:
            return None
        obj = json.loads(self.head)
        return obj if isinstance(obj, dict) and obj.get("type") == "head" else None


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Fetch the export; with ``-o``, written beside FILE first and renamed once complete."""
    client = _client(args)
    if args.output in (None, "-"):
        headers = client.download("ekms/audit/export", sys.stdout.buffer)
        sys.stdout.flush()
    else:
        target = Path(args.output)
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as out:
                headers = client.download("ekms/audit/export", out)
            partial.replace(target)
        except OSError as exc:
            fail(f"cannot write {args.output}: {exc.strerror or exc}")
        finally:
            partial.unlink(missing_ok=True)
        print(f"Wrote the audit export to {target}", file=sys.stderr)
    problem = {k.lower(): v for k, v in headers.items()}.get("x-ekms-audit-problem")
    if problem:
        print(
            f"warning: the service reports that its stored log contradicts its signed heads: "
            f"{problem}. Verify the export: ekms audit verify",
            file=sys.stderr,
        )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check an audit export with no service, HSM or network: exit 0 if sound, 1 if not."""
    from kms.audit_export import MAX_LINE_BYTES, verify_export

    trusted_key = None if args.trusted_key is None else _audit_trusted_key(args.trusted_key)
    previous_head = None if args.previous_head is None else _audit_previous_head(args.previous_head)
    tap = _HeadTap(MAX_LINE_BYTES + 2)  # room for "\r\n": a longer line is refused, not read
    name = "standard input" if args.export == "-" else args.export
    with _audit_export_stream(args.export) as stream:
        try:
            report = verify_export(
                tap.lines(stream), trusted_key=trusted_key, previous_head=previous_head
            )
        except OSError as exc:
            fail(f"cannot read export {name}: {exc.strerror or exc}")
    last_head = tap.last() if report.ok else None
    if args.json:
        data = dataclasses.asdict(report)
        data["last_head"] = last_head
        print(json.dumps(data, indent=2))
    else:
        print(_audit_report_text(report, last_head, previous_head))
    return 0 if report.ok else 1


def _audit_export_stream(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            fail("EXPORT is '-' but standard input is a terminal: pipe the export in, or name it")
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return Path(path).open("rb")
    except OSError as exc:
        fail(f"cannot read export {path}: {exc.strerror or exc}")


def _audit_json_file(path: str, option: str) -> Any:
    try:
        with Path(path).open("rb") as file:
            raw = file.read(AUDIT_INPUT_LIMIT + 1)
    except OSError as exc:
        fail(f"cannot read {option} file {path}: {exc.strerror or exc}")
    if len(raw) > AUDIT_INPUT_LIMIT:
        fail(f"{option} {path}: larger than {AUDIT_INPUT_LIMIT} bytes, so not one JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        fail(f"{option} {path}: not valid JSON ({exc})")


def _audit_trusted_key(path: str) -> dict[str, Any]:
    from kms.errors import InvalidRequestError
    from kms.jose import parse_public_jwk

    obj = _audit_json_file(path, "--trusted-key")
    if isinstance(obj, dict) and "keys" in obj and "kty" not in obj:
        fail(f"--trusted-key {path}: a JWK Set; put the log's one public key (a JWK) in a file")
    if not isinstance(obj, dict):
        fail(f"--trusted-key {path}: must hold one JWK, a JSON object")
    try:
        parse_public_jwk(obj)
    except InvalidRequestError as exc:
        fail(f"--trusted-key {path}: not a usable public key: {exc}")
    return obj


def _audit_previous_head(path: str) -> dict[str, Any]:
    obj = _audit_json_file(path, "--previous-head")
    if not isinstance(obj, dict) or obj.get("type") != "head":
        fail(
            f"--previous-head {path}: not a head line: it must hold one line with "
            '"type":"head", kept from an earlier export'
        )
    return obj


def _audit_report_text(
    report: VerifyReport, last_head: dict[str, Any] | None, previous_head: dict[str, Any] | None
) -> str:
    error = report.first_error
    if error is None:
        summary = f"OK: {_count(report.records, 'record')}, {_count(report.heads, 'signed head')}"
        if last_head is not None:
            summary += (
                f"; last head size {last_head['size']:,} root {last_head['root_hash']} "
                f"at {_utc(last_head['timestamp_ms'])}"
            )
        lines = [summary]
        if previous_head is not None:
            lines.append(
                f"The log extends the previous head (size {previous_head['size']:,}, "
                f"signed {_utc(previous_head['timestamp_ms'])})."
            )
    else:
        lines = [f"FAILED: {error.message}"]
        where = [
            f"{label} {value}"
            for label, value in (
                ("line", error.line),
                ("record", error.record),
                ("signed head", error.head),
            )
            if value is not None
        ]
        if where:
            lines.append(f"  at {', '.join(where)}")
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _utc(timestamp_ms: int) -> str:
    try:
        moment = datetime.fromtimestamp(0, tz=UTC) + timedelta(milliseconds=timestamp_ms)
    except OverflowError:
        return f"timestamp_ms {timestamp_ms}"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{timestamp_ms % 1000:03d}Z"


# --- audit (online): tail and hash ------------------------------------------------------

TAIL_PAGE = 1000  # the service's largest page
TAIL_BACK_PAGES = 50  # pages read back for -n with a rare filter: each scans at most 10,000
AUDIT_HASH_LIMIT = 65536  # bytes, as the service hashes at most


def cmd_audit_tail(args: argparse.Namespace) -> int:
    """The newest records, oldest first; with ``-f``, then every new one as it is written.

    Following polls ``after=`` the last index seen; when a page comes back with no ``next``,
    every record below the reported ``size`` was read (matching or not), so polling goes on
    from ``size - 1``. The records of its own polls are not printed, or following would echo
    itself forever. Ctrl-C ends it (exit status 130, from ``main``).
    """
    if args.lines < 0:
        fail("-n must be 0 or more")
    if args.interval <= 0:
        fail("--interval must be more than 0 seconds")
    client = _client(args)
    filters = {
        name: value
        for name, value in (
            ("principal", args.principal),
            ("operation", args.operation),
            ("decision", args.decision),
            ("key", args.key),
        )
        if value
    }
    own: collections.deque[str] = collections.deque(maxlen=64)  # our requests' ids
    try:
        newest, cursor = _tail_newest(client, filters, args.lines, own)
        for item in reversed(newest):
            _tail_print(args, item)
        while args.follow:
            page = _records(client, {**filters, "after": cursor, "limit": TAIL_PAGE}, own)
            for item in page["records"]:
                if item["record"].get("request_id") not in own:
                    _tail_print(args, item)
            if page["next"] is not None:
                cursor = page["next"]
                continue
            cursor = max(cursor, page["size"] - 1)
            time.sleep(args.interval)
    except BrokenPipeError:  # `ekms audit tail -f | head`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _records(client: Client, query: dict[str, Any], own: collections.deque[str]) -> dict[str, Any]:
    result = client.call("GET", f"ekms/audit/records?{urllib.parse.urlencode(query)}")
    request_id = getattr(client, "last_request_id", None)
    if request_id:
        own.append(request_id)
    return dict(result["data"])


def _tail_newest(
    client: Client, filters: dict[str, Any], count: int, own: collections.deque[str]
) -> tuple[list[dict[str, Any]], int]:
    """Up to ``count`` newest matching records (newest first), and where following starts."""
    page = _records(client, {**filters, "limit": max(1, min(count, TAIL_PAGE))}, own)
    cursor = page["size"] - 1
    found = page["records"][:count]
    pages = 1
    while len(found) < count and page["next"] is not None and pages < TAIL_BACK_PAGES:
        pages += 1
        limit = min(count - len(found), TAIL_PAGE)
        page = _records(client, {**filters, "before": page["next"], "limit": limit}, own)
        found.extend(page["records"])
    return found, cursor


def _tail_print(args: argparse.Namespace, item: dict[str, Any]) -> None:
    if args.format == "json":
        print(json.dumps(item, separators=(",", ":")), flush=True)
        return
    record = item["record"]
    time_us = record.get("time_us")
    when = _utc(time_us // 1000) if isinstance(time_us, int) else "-"
    outcome = f"{record.get('decision', '-')}/{record.get('status', '-')}"
    fields = [
        when,
        f"#{item['index']}",
        record.get("principal") or "-",
        record.get("operation") or "-",
        record.get("key") or "-",
        outcome,
    ]
    if record.get("reason"):
        fields.append(str(record["reason"]))
    print("  ".join(str(f) for f in fields), flush=True)


def cmd_audit_hash(args: argparse.Namespace) -> int:
    """The keyed hash records hold for a value (``sys/audit-hash``), to compare with a record.

    The value is a secret: read from stdin (``-``) or a prompt without echo, it never has to
    be on the command line.
    """
    value = _audit_hash_input(args)
    body = {"input": value, "format": "base64" if args.base64 else "text"}
    result = _client(args).call("POST", f"sys/audit-hash/{args.device}", body)
    _print(args, result, result["hash"])
    return 0


def _audit_hash_input(args: argparse.Namespace) -> str:
    if args.input == "-":
        value = sys.stdin.read(AUDIT_HASH_LIMIT * 2)  # room for base64; the service checks
        value = value.removesuffix("\n").removesuffix("\r")  # the line end is not the value's
    elif args.input is not None:
        value = args.input
    elif sys.stdin.isatty():
        value = getpass.getpass("Value to hash (will be hidden): ")
    else:
        fail("no INPUT: give it, '-' to read it from standard input, or run in a terminal")
    if not value:
        fail("the value to hash is empty")
    return value


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one statement per flag
    parser = argparse.ArgumentParser(prog="ekms", description="Embassy KMS")
    sub = parser.add_subparsers(dest="command", required=True)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-address", "--address", help="server address (or EKMS_ADDR/VAULT_ADDR)")
        p.add_argument("-format", "--format", choices=("table", "json"), default="table")

    server = sub.add_parser("server", help="run the service")
    server.add_argument("-dev", "--dev", action="store_true", help="throwaway dev server")
    server.add_argument("-config", "--config", help="TOML configuration file")
    server.add_argument("-dev-root-token-id", "--dev-root-token-id", default="")
    server.add_argument("-dev-listen-address", "--dev-listen-address", default="127.0.0.1:8200")
    server.add_argument("-dev-shares", "--dev-shares", type=int, default=5)
    server.add_argument("-dev-threshold", "--dev-threshold", type=int, default=3)
    server.add_argument("-workers", "--workers", type=int, default=0)
    server.add_argument(
        "-log-level",
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
    )
    server.set_defaults(func=cmd_server)

    operator = sub.add_parser(
        "operator", help="init, unseal, seal, status, generate-root, rekey, share check"
    ).add_subparsers(dest="action", required=True)
    init = operator.add_parser("init", help="initialise and print the shares")
    init.add_argument("-key-shares", "--key-shares", type=int, default=5)
    init.add_argument("-key-threshold", "--key-threshold", type=int, default=3)
    init.set_defaults(func=cmd_operator_init)
    unseal = operator.add_parser("unseal", help="submit one share (prompts without echo)")
    unseal.add_argument(
        "key", nargs="?", help="the share (visible in shell history: prefer the prompt)"
    )
    unseal.add_argument(
        "-file", "--file", help="read the share from a file ('-': one line from stdin)"
    )
    unseal.add_argument("-reset", "--reset", action="store_true", help="discard unseal progress")
    unseal.add_argument(
        "-official",
        "--official",
        metavar="ID",
        help="name yourself in the audit record: sign for the share as this official",
    )
    unseal.add_argument(
        "--key",
        dest="official_key",
        metavar="FILE",
        help="with --official: your private key, a private JWK as JSON (or a PEM)",
    )
    unseal.add_argument(
        "-audience",
        "--audience",
        help="with --official: the service's audience (or EKMS_AUDIENCE)",
    )
    unseal.set_defaults(func=cmd_operator_unseal)
    seal = operator.add_parser("seal", help="seal the node")
    seal.set_defaults(func=cmd_operator_seal)
    status = operator.add_parser("status", help="seal status (exit 2 if sealed)")
    status.set_defaults(func=cmd_operator_status)
    generate_root = operator.add_parser(
        "generate-root", help="mint a new root token with a quorum of shares"
    )
    mode = generate_root.add_mutually_exclusive_group()
    mode.add_argument("-init", "--init", action="store_true", help="start an attempt")
    mode.add_argument("-cancel", "--cancel", action="store_true", help="cancel the attempt")
    mode.add_argument("-status", "--status", action="store_true", help="show the attempt")
    mode.add_argument(
        "-decode", "--decode", metavar="ENCODED", help="decode a token with -otp ('-': stdin)"
    )
    generate_root.add_argument(
        "-otp", "--otp", help="with -init: your own OTP (else one is generated); with -decode"
    )
    generate_root.add_argument(
        "-nonce", "--nonce", help="the attempt's nonce (needed with a share argument or --file)"
    )
    generate_root.add_argument(
        "key", nargs="?", help="the share (visible in shell history: prefer the prompt)"
    )
    generate_root.add_argument(
        "-file", "--file", help="read the share from a file ('-': one line from stdin)"
    )
    generate_root.set_defaults(func=cmd_operator_generate_root)
    for p in (init, unseal, seal, status, generate_root):
        client_options(p)
    from api.cli_custody import add_drill_commands, add_operator_commands  # rekey, share check

    add_operator_commands(operator, client_options)
    add_drill_commands(sub, client_options)
    from api.cli_domain import add_domain_commands  # ekms domain export|load|import

    add_domain_commands(sub, client_options)

    key = sub.add_parser("key", help="transit keys").add_subparsers(dest="action", required=True)
    create = key.add_parser("create")
    create.add_argument("name")
    create.add_argument(
        "-type", "--type", default="aes256-gcm96", choices=("aes256-gcm96", "ecdsa-p256", "ed25519")
    )
    create.add_argument(
        "-classification",
        "--classification",
        default="secret",
        choices=("public", "internal", "confidential", "secret"),
    )
    create.add_argument("-residency", "--residency", default="hsm", choices=("hsm", "memory"))
    create.set_defaults(func=cmd_key_create)
    read = key.add_parser("read")
    read.add_argument("name")
    read.set_defaults(func=cmd_key_read)
    rotate = key.add_parser("rotate")
    rotate.add_argument("name")
    rotate.set_defaults(func=cmd_key_rotate)
    listing = key.add_parser("list")
    listing.set_defaults(func=cmd_key_list)
    for p in (create, read, rotate, listing):
        client_options(p)

    datakey = sub.add_parser("datakey", help="generate a data key under a transit key")
    datakey.add_argument("name")
    datakey.add_argument("-context", "--context", default="", help="encryption context (text)")
    datakey.add_argument("-bits", "--bits", type=int, default=256, choices=(128, 256, 512))
    datakey.add_argument(
        "-wrapped", "--wrapped", action="store_true", help="return only the wrapped key"
    )
    client_options(datakey)
    datakey.set_defaults(func=cmd_datakey)

    audit = sub.add_parser(
        "audit", help="fetch, verify, follow and search the audit log"
    ).add_subparsers(dest="action", required=True)
    export = audit.add_parser(
        "export",
        help="fetch the service's audit log as JSON lines (security officers, auditors)",
        description="Fetch every audit record and signed tree head, with inclusion proofs, as "
        "JSON lines for `ekms audit verify`. Uses EKMS_ADDR/VAULT_ADDR and EKMS_TOKEN/VAULT_TOKEN.",
    )
    export.add_argument(
        "-o", "-output", "--output", metavar="FILE", help="write to FILE (default: stdout)"
    )
    client_options(export)
    export.set_defaults(func=cmd_audit_export)
    verify = audit.add_parser(
        "verify",
        help="check an audit export (offline: no service, HSM or network)",
        description="Check an audit export: every record against the signed tree heads, the "
        "heads' signatures, and that the log extends the head kept from an earlier export.",
        epilog="Exit status: 0 verified, 1 verification failed, 2 usage error.",
    )
    verify.add_argument("export", metavar="EXPORT", help="the export, JSON lines ('-': stdin)")
    verify.add_argument(
        "-previous-head",
        "--previous-head",
        metavar="FILE",
        help="a head line kept from an earlier export: the log must extend it",
    )
    verify.add_argument(
        "-trusted-key",
        "--trusted-key",
        metavar="FILE",
        help="the log's public key as a JWK, obtained out of band (not from the export)",
    )
    verify.add_argument("-json", "--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_audit_verify)
    tail = audit.add_parser(
        "tail",
        help="print the newest audit records; -f follows new ones (security officers, auditors)",
        description="One line per record: time (UTC), index, principal, operation, key, "
        "decision/status, reason. With -format json, one JSON object per line.",
    )
    tail.add_argument("-n", "--lines", type=int, default=10, metavar="N", help="default 10")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between polls"
    )
    tail.add_argument("--principal", metavar="P", help="only this principal")
    tail.add_argument("--operation", metavar="OP", help="only this operation (transit.* : prefix)")
    tail.add_argument("--decision", choices=("allow", "deny", "error"), help="only this decision")
    tail.add_argument("--key", metavar="K", help="only records naming this key")
    client_options(tail)
    tail.set_defaults(func=cmd_audit_tail)
    audit_hash = audit.add_parser(
        "hash",
        help="the keyed hash records hold for a value you know (sys/audit-hash)",
        description="Print the hash the audit log holds in place of a sensitive value, such as "
        "an encryption context, so it can be compared with a record's field. Needs the service "
        "unsealed, and a security officer's, auditor's or root token.",
    )
    audit_hash.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="the value ('-': read standard input; omitted: prompt without echo)",
    )
    audit_hash.add_argument(
        "--base64", action="store_true", help="INPUT is base64: hash the bytes it decodes to"
    )
    audit_hash.add_argument(
        "--device", default="ekms", help="audit device name in the URL (any; default ekms)"
    )
    client_options(audit_hash)
    audit_hash.set_defaults(func=cmd_audit_hash)
    from api.cli_review import add_review_commands  # imports this module: import it here

    add_review_commands(sub, client_options)
    from api.cli_sites import add_site_commands  # ekms site status|list|show|register|record-head

    add_site_commands(sub, client_options)
    from api.backup.cli import add_backup_commands  # ekms backup seal, ekms restore

    add_backup_commands(sub, client_options)
    from ceremonies.cli import add_ceremony_commands  # ekms ceremony run|check|list|render|submit

    add_ceremony_commands(sub, client_options)
    from api.cli_backend import add_backend_commands  # last: it extends `ekms site`

    add_backend_commands(sub, client_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (CliError, EkmsError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    # `python -m api.cli`: the command modules import api.cli; let them find this module, so
    # that the CliError they raise is the one main catches.
    sys.modules.setdefault("api.cli", sys.modules[__name__])
    raise SystemExit(main())
