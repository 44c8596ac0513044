"""``ekms audit verify``, ``tail`` and ``hash`` as auditors and officers run them.

``verify`` runs offline: each test builds a genuine export with ``kms.audit_export.build_export``
(signed with a key made here), changes what an attacker would change, and checks the exit
status and what is printed. Its client address points at a closed port, so a command that tried
the network would fail. ``tail`` and ``hash`` talk to a real server (SoftHSM, SQLite).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hvac
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kms.audit_export import TreeHead, build_export, sign_tree_head
from kms.canonical import canonical_json
from kms.merkle import MerkleTree, leaf_hash

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tests.conftest import ServerThread

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
KID = "audit-1"
T0 = 1_750_000_000_000  # 2025-06-15T15:06:40Z
HEAD_SIZES = (10, 25, 40, 50)


def _ekms() -> str:
    beside = Path(sys.executable).with_name("ekms")
    found = str(beside) if beside.exists() else shutil.which("ekms")
    if found is None:
        pytest.fail("the ekms console script is not installed (pip install -e .)")
    return found


EKMS = _ekms()


# --- building exports -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }


def es256(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def make_records(count: int, tag: str = "") -> list[dict[str, Any]]:
    return [
        {
            "time_us": (T0 + i) * 1000,
            "request_id": f"req-{tag}{i:04d}",
            "operation": "transit/decrypt" if i % 3 else "sys/unseal",
            "decision": "deny" if i % 7 == 0 else "allow",
            "status": 403 if i % 7 == 0 else 200,
            "principal": f"tool-{i % 4}",
        }
        for i in range(count)
    ]


def make_export(
    records: Sequence[dict[str, Any]] | None = None,
    sizes: Sequence[int] = HEAD_SIZES,
    key: ec.EllipticCurvePrivateKey = KEY,
) -> list[bytes]:
    records = make_records(50) if records is None else records
    tree = MerkleTree(leaf_hash(canonical_json(r)) for r in records)
    heads = []
    for n, size in enumerate(sizes):
        head = TreeHead(size, tree.root(size), T0 + 60_000 * n)
        token = sign_tree_head(head, lambda data: es256(key, data), alg="ES256", kid=KID)
        heads.append((head, token))
    return build_export(records, heads, jwk(key), kid=KID)


GENUINE = make_export()


def line_of(lines: list[bytes], *, record: int | None = None, head: int | None = None) -> int:
    """The list position of a record (by index) or of a head (1-based)."""
    heads = 0
    for at, line in enumerate(lines):
        obj = json.loads(line)
        if record is not None and obj["type"] == "record" and obj["index"] == record:
            return at
        if obj["type"] == "head":
            heads += 1
            if heads == head:
                return at
    raise AssertionError("not found")


def write(path: Path, lines: Sequence[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --- running the command ------------------------------------------------------------------------


def ekms(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EKMS_ADDR": "http://127.0.0.1:1", "VAULT_ADDR": "http://127.0.0.1:1"}
    result = subprocess.run(
        [EKMS, "audit", "verify", *map(str, args)],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert "Traceback" not in stdout + stderr, stdout + stderr
    return subprocess.CompletedProcess(result.args, result.returncode, stdout, stderr)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "export": write(tmp_path / "export.jsonl", GENUINE),
        "key": write_json(tmp_path / "key.jwk", jwk(KEY)),
        "other_key": write_json(tmp_path / "other.jwk", jwk(OTHER_KEY)),
    }


# --- verifying ----------------------------------------------------------------------------------


def test_genuine_export(files: dict[str, Path]) -> None:
    result = ekms(files["export"], "--trusted-key", files["key"])
    assert result.returncode == 0, result
    root = json.loads(GENUINE[line_of(GENUINE, head=4)])["root_hash"]
    assert result.stdout == (
        f"OK: 50 records, 4 signed heads; last head size 50 root {root} "
        "at 2025-06-15T15:09:40.000Z\n"
    )
    assert result.stderr == ""


def test_without_a_trusted_key_it_warns(files: dict[str, Path]) -> None:
    result = ekms(files["export"])
    assert result.returncode == 0, result
    assert result.stdout.startswith("OK: 50 records, 4 signed heads;")
    assert "warning: no trusted key given" in result.stdout


def test_edited_record_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    lines = list(GENUINE)
    at = line_of(lines, record=17)
    obj = json.loads(lines[at])
    obj["record"]["decision"] = "allow" if obj["record"]["decision"] == "deny" else "deny"
    lines[at] = canonical_json(obj)
    result = ekms(write(tmp_path / "t.jsonl", lines), "--trusted-key", files["key"])
    assert result.returncode == 1, result
    assert result.stdout.splitlines() == [
        (
            "FAILED: record 17: content does not match its inclusion proof against signed head 2 "
            "(edited, reordered or replaced)"
        ),
        f"  at line {at + 1}, record 17",
    ]


def test_wrong_trusted_key(files: dict[str, Path]) -> None:
    result = ekms(files["export"], "--trusted-key", files["other_key"])
    assert result.returncode == 1, result
    assert result.stdout.startswith("FAILED: the export's public key (thumbprint ")
    assert "is not the trusted key" in result.stdout


def test_log_re_signed_with_another_key(files: dict[str, Path], tmp_path: Path) -> None:
    records = make_records(50)
    records[17]["decision"] = "allow"
    forged = write(tmp_path / "forged.jsonl", make_export(records, key=OTHER_KEY))
    assert ekms(forged).returncode == 0  # self-consistent: only the pinned key tells
    result = ekms(forged, "--trusted-key", files["key"])
    assert result.returncode == 1, result
    assert "is not the trusted key" in result.stdout


def test_previous_head_that_the_log_extends(files: dict[str, Path], tmp_path: Path) -> None:
    earlier = make_export(make_records(33), sizes=(10, 33))
    kept = tmp_path / "last-head.json"
    kept.write_bytes(earlier[line_of(earlier, head=2)] + b"\n")
    result = ekms(files["export"], "--trusted-key", files["key"], "--previous-head", kept)
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[1] == (
        "The log extends the previous head (size 33, signed 2025-06-15T15:07:40.000Z)."
    )


def test_forked_previous_head(files: dict[str, Path], tmp_path: Path) -> None:
    forked = make_export([*make_records(20), *make_records(50, "fork-")[20:]])
    kept = tmp_path / "last-head.json"
    kept.write_bytes(forked[line_of(forked, head=2)])
    result = ekms(files["export"], "--trusted-key", files["key"], "--previous-head", kept)
    assert result.returncode == 1, result
    assert result.stdout.startswith(
        "FAILED: the previous signed head (size 25) is not consistent with this export"
    )


def test_export_cut_at_a_head_is_caught_by_the_kept_head(
    files: dict[str, Path], tmp_path: Path
) -> None:
    short = write(tmp_path / "short.jsonl", GENUINE[: line_of(GENUINE, head=3) + 1])
    kept = tmp_path / "last-head.json"
    kept.write_bytes(GENUINE[line_of(GENUINE, head=4)])
    assert ekms(short, "--trusted-key", files["key"]).returncode == 0
    result = ekms(short, "--trusted-key", files["key"], "--previous-head", kept)
    assert result.returncode == 1, result
    assert result.stdout.startswith("FAILED: log truncated or rolled back")


def test_stdin(files: dict[str, Path]) -> None:
    result = ekms("-", "--trusted-key", files["key"], stdin=files["export"].read_bytes())
    assert result.returncode == 0, result
    assert result.stdout.startswith("OK: 50 records, 4 signed heads;")


def test_json_output(files: dict[str, Path], tmp_path: Path) -> None:
    result = ekms(files["export"], "--trusted-key", files["key"], "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == {
        "ok": True,
        "records": 50,
        "heads": 4,
        "first_error": None,
        "warnings": [],
        "last_head": json.loads(GENUINE[line_of(GENUINE, head=4)]),
    }
    lines = list(GENUINE)
    del lines[line_of(lines, record=30)]
    result = ekms(write(tmp_path / "t.jsonl", lines), "--json")
    assert result.returncode == 1, result
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["last_head"] is None
    assert report["first_error"]["record"] == 30
    assert report["first_error"]["message"].startswith("record 30 missing")


# --- usage errors -------------------------------------------------------------------------------


def test_missing_export(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = ekms(missing)
    assert result.returncode == 2, result
    assert result.stderr == f"Error: cannot read export {missing}: No such file or directory\n"
    assert result.stdout == ""


USAGE_ERRORS: list[tuple[str, str, bytes, str]] = [
    ("key not json", "--trusted-key", b"{not json", "--trusted-key {path}: not valid JSON ("),
    ("key not object", "--trusted-key", b"[1]", "--trusted-key {path}: must hold one JWK"),
    ("key set", "--trusted-key", b'{"keys":[]}', "--trusted-key {path}: a JWK Set"),
    (
        "private key",
        "--trusted-key",
        json.dumps({**jwk(KEY), "d": b64(b"x" * 32)}).encode(),
        "--trusted-key {path}: not a usable public key: jwk must not contain private member 'd'",
    ),
    ("head not json", "--previous-head", b"", "--previous-head {path}: not valid JSON ("),
    (
        "two head lines",
        "--previous-head",
        GENUINE[11] + b"\n" + GENUINE[11],
        "--previous-head {path}: not valid JSON (Extra data",
    ),
    ("record line", "--previous-head", GENUINE[1], "--previous-head {path}: not a head line"),
]


@pytest.mark.parametrize(
    ("option", "content", "message"),
    [case[1:] for case in USAGE_ERRORS],
    ids=[case[0] for case in USAGE_ERRORS],
)
def test_bad_option_file(
    files: dict[str, Path], tmp_path: Path, option: str, content: bytes, message: str
) -> None:
    path = tmp_path / "option-file"
    path.write_bytes(content)
    result = ekms(files["export"], option, path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: " + message.format(path=path)), result.stderr
    assert "\n" not in result.stderr.rstrip("\n")
    assert result.stdout == ""


def test_unreadable_option_file(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.jwk"
    result = ekms(files["export"], "--trusted-key", missing)
    assert result.returncode == 2, result
    assert (
        result.stderr
        == f"Error: cannot read --trusted-key file {missing}: No such file or directory\n"
    )


# --- tail and hash, against a live server -------------------------------------------------------

TAIL_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  #(\d+)  (\S+)  (\S+)  (\S+)  (\w+)/(\d+)(  .+)?"
)


@pytest.fixture
def live(server: ServerThread) -> tuple[ServerThread, dict[str, str]]:
    """An unsealed server with a key and some use of it; the env a root-token client needs."""
    vault = hvac.Client(url=server.url)
    result = vault.sys.initialize(secret_shares=3, secret_threshold=2)
    for share in result["keys"][:2]:
        vault.sys.submit_unseal_key(share)
    vault.token = result["root_token"]
    vault.write("transit/keys/laws")
    for context in (b"ctx-a", b"ctx-b"):
        vault.write(
            "transit/encrypt/laws",
            plaintext=base64.b64encode(b"x").decode(),
            context=base64.b64encode(context).decode(),
        )
    vault.adapter.close()
    env = {**os.environ, "EKMS_ADDR": server.url, "EKMS_TOKEN": result["root_token"]}
    env.pop("VAULT_TOKEN", None)
    return server, env


def client(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [EKMS, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_tail_prints_the_newest_records(live: tuple[ServerThread, dict[str, str]]) -> None:
    server, env = live
    stored = server.runtime.store.audit_records(limit=100_000)
    result = client(env, "audit", "tail", "-n", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    matches = [TAIL_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    indexes = [int(m.group(1)) for m in matches if m]
    assert indexes == [len(stored) - 3, len(stored) - 2, len(stored) - 1]

    denied = requests.get(
        f"{server.url}/v1/ekms/audit/records", headers={"X-Vault-Token": "ekms.wrong"}, timeout=30
    )
    assert denied.status_code == 403
    deny = client(env, "audit", "tail", "-n", "1", "--decision", "deny")
    assert deny.stdout.rstrip().endswith("audit.records  -  deny/403  unknown or revoked token")

    encrypts = client(
        env,
        "audit",
        "tail",
        "-n",
        "5",
        "--operation",
        "transit.*",
        "--key",
        "laws",
        "-format",
        "json",
    )
    items = [json.loads(line) for line in encrypts.stdout.splitlines()]
    assert [i["record"]["operation"] for i in items] == [
        "transit.key.create",
        "transit.encrypt",
        "transit.encrypt",
    ]
    assert [i["index"] for i in items] == sorted(i["index"] for i in items)

    bad = client(env, "audit", "tail", "--operation", "tr*nsit")
    assert bad.returncode == 2
    assert bad.stderr.startswith("Error: 400: operation may hold '*' only at its end")


def test_tail_follows_until_interrupted(live: tuple[ServerThread, dict[str, str]]) -> None:
    server, env = live
    command = [EKMS, "audit", "tail", "-f", "-n", "0", "--interval", "0.1"]
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        out, err = process.stdout, process.stderr
        assert out is not None
        assert err is not None
        reader = threading.Thread(
            target=lambda: [lines.put(line) for line in iter(out.readline, "")], daemon=True
        )
        reader.start()
        try:
            seen = None
            deadline = time.monotonic() + 20
            while seen is None and time.monotonic() < deadline:
                requests.post(
                    f"{server.url}/v1/transit/keys/laws/rotate",
                    headers={"X-Vault-Token": env["EKMS_TOKEN"]},
                    timeout=30,
                ).raise_for_status()
                with contextlib.suppress(queue.Empty):
                    seen = lines.get(timeout=0.5)
        finally:
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=20)
            reader.join(timeout=5)
        stderr = err.read()
    assert seen is not None, "tail -f printed nothing"
    match = TAIL_LINE.fullmatch(seen.rstrip("\n"))
    assert match is not None, seen
    # The first line is the rotation: the records of tail's own polls are not printed.
    assert match.group(3, 4, 5) == ("transit.key.rotate", "laws", "allow")
    assert code == 130
    assert "Traceback" not in stderr
    assert stderr == ""


def test_hash_matches_the_record(live: tuple[ServerThread, dict[str, str]]) -> None:
    server, env = live
    records = server.runtime.store.audit_records(limit=100_000)
    contexts = [r["details"]["contexts"][0] for r in records if r["operation"] == "transit.encrypt"]
    piped = client(env, "audit", "hash", "-", stdin="ctx-a\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == contexts[0]
    argument = client(env, "audit", "hash", "ctx-b")
    assert argument.stdout.strip() == contexts[1]
    encoded = client(env, "audit", "hash", "--base64", base64.b64encode(b"ctx-b").decode())
    assert encoded.stdout.strip() == contexts[1]
    as_json = client(env, "audit", "hash", "ctx-a", "-format", "json")
    assert json.loads(as_json.stdout)["data"]["hash"] == contexts[0]

    nothing = client(env, "audit", "hash")
    assert nothing.returncode == 2
    assert nothing.stderr.startswith("Error: no INPUT: give it, '-' to read it from standard input")
    empty = client(env, "audit", "hash", "-", stdin="\n")
    assert empty.returncode == 2
    assert empty.stderr == "Error: the value to hash is empty\n"
    client(env, "operator", "seal")
    sealed = client(env, "audit", "hash", "ctx-a")
    assert sealed.returncode == 2
    assert sealed.stderr == "Error: 503: Vault is sealed\n"
    assert "ctx-a" not in repr(server.runtime.store.audit_records(limit=100_000))
