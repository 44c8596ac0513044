"""Backup seal and restore throughput (issue 7): 1 GiB in large files, 20,000 small files.

    python bench/backup.py [--quick] [--dir DIR] [--json FILE]

Starts its own dev server (2 workers, SQLite, SoftHSM) on a loopback port, registers a backup
writer, a restore tool and the officials who approve its request (bench/scoped.py), then runs
the real client code (api.backup.seal / api.backup.restore) in this process:

- large files: 8 x 128 MiB (quick: 4 x 32 MiB) sealed, then restored; MB/s of plaintext.
- the comparison, same data, same run, same thread count as the restore: raw AES-256-GCM
  with ``cryptography`` (1 MiB chunks, one random key), (a) file to file, reading ciphertext,
  decrypting and writing and fsyncing the plaintext as the restore does, and (b) in memory.
  The issue's target, restore >= 0.8x raw, is judged against (a); (b) is shown too.
- small files: 20,000 files of 1-8 KiB (quick: 2,000) in 100 directories; files/s, with the
  unwrap phase (batches of 100 data keys per request) timed on its own.

Files go to /dev/shm when it has room (a tmpfs: the figures are CPU, not disk), else to the
temporary directory; the report says which. Run alone, it prints the table; bench/run.py runs it
after the transit scenarios and adds the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from api.backup.restore import RestoreOptions, restore  # noqa: E402
from api.backup.seal import SealOptions, seal  # noqa: E402
from api.backup.service import MachineSession, Service  # noqa: E402
from api.principal_keys import KeyHolder  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

MiB = 1 << 20
CHUNK = MiB
RESTORE_RATIO_MIN = 0.8
DATASET = "bench-backup"
ROOT_TOKEN = "root"  # noqa: S105 - the dev server's fixed, loopback-only root token


@dataclass(frozen=True)
class Plan:
    large_files: int
    large_bytes: int
    small_files: int
    workers: int

    @classmethod
    def make(cls, *, quick: bool) -> Plan:
        workers = len(os.sched_getaffinity(0))
        if quick:
            return cls(4, 32 * MiB, 2_000, workers)
        return cls(8, 128 * MiB, 20_000, workers)

    @property
    def space(self) -> int:
        """Plaintext, archive and restored copy of the large set, and the raw baseline's."""
        return 5 * self.large_files * self.large_bytes + self.small_files * 40_000


@dataclass
class Results:
    plan: Plan
    where: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    verdict: str = ""

    def add(self, key: str, value: float, label: str, unit: str, note: str = "") -> None:
        self.figures[key] = value
        text = f"{value:,.0f} {unit}" if unit != "x" else f"{value:.2f}x"
        self.rows.append((label, text, note))


def workspace(plan: Plan, chosen: Path | None) -> Path:
    if chosen is not None:
        return chosen
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > plan.space * 1.2:
        return shm
    return Path(tempfile.gettempdir())


def make_large(root: Path, plan: Plan) -> None:
    root.mkdir(parents=True)
    block = os.urandom(8 * MiB)
    for n in range(plan.large_files):
        with (root / f"register-{n:02d}.db").open("wb") as out:
            for offset in range(0, plan.large_bytes, len(block)):
                # Different bytes in every file and block, cheaply: a counter in each block.
                out.write(n.to_bytes(4, "big") + offset.to_bytes(8, "big") + block[12:])


def make_small(root: Path, plan: Plan) -> None:
    rng = random.Random(7)  # noqa: S311 - file contents for a benchmark, not secrets
    for n in range(plan.small_files):
        folder = root / f"gazette-{n % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"act-{n:06d}.xml").write_bytes(rng.randbytes(rng.randint(1024, 8192)))


# --- raw AES-256-GCM, the comparison --------------------------------------------------------------


def raw_encrypt(files: Sequence[Path], out: Path, key: bytes) -> list[Path]:
    out.mkdir(parents=True)
    aead = AESGCM(key)
    made = []
    for n, path in enumerate(files):
        target = out / f"{n:04d}"
        with path.open("rb") as src, target.open("wb") as dst:
            index = 0
            while chunk := src.read(CHUNK):
                dst.write(aead.encrypt(index.to_bytes(12, "big"), chunk, None))
                index += 1
        made.append(target)
    return made


def raw_file_to_file(files: Sequence[Path], out: Path, key: bytes, workers: int) -> float:
    """Read, decrypt, write, fsync: the restore's I/O with nothing but AES-GCM in between."""
    out.mkdir(parents=True)
    aead = AESGCM(key)

    def one(path: Path) -> None:
        fd = os.open(out / path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with path.open("rb") as src:
                index = 0
                while sealed := src.read(CHUNK + 16):
                    os.write(fd, aead.decrypt(index.to_bytes(12, "big"), sealed, None))
                    index += 1
            os.fsync(fd)
        finally:
            os.close(fd)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - started


def raw_in_memory(files: Sequence[Path], key: bytes, workers: int) -> float:
    aead = AESGCM(key)
    loaded = []
    for path in files:
        data = path.read_bytes()
        loaded.append([data[n : n + CHUNK + 16] for n in range(0, len(data), CHUNK + 16)])

    def one(chunks: list[bytes]) -> None:
        for index, sealed in enumerate(chunks):
            aead.decrypt(index.to_bytes(12, "big"), sealed, None)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, loaded))
    return time.perf_counter() - started


# --- the service ----------------------------------------------------------------------------------


def prepare(base_url: str) -> tuple[KeyHolder, KeyHolder, str, str]:
    """Keys, a backup writer, and an approved restore request naming the tool."""
    from run import call, call_ok
    from scoped import establish

    call_ok(f"{base_url}/v1/transit/keys/{DATASET}", ROOT_TOKEN, {"classification": "internal"})
    call_ok(f"{base_url}/v1/transit/keys/backup-manifest", ROOT_TOKEN, {"type": "ecdsa-p256"})
    writer = KeyHolder.generate("bench-backup-writer")
    call_ok(
        f"{base_url}/v1/ekms/principals/{writer.principal}",
        ROOT_TOKEN,
        {"roles": ["backup-writer"], "jwk": writer.jwk},
    )
    path = establish(call, base_url, ROOT_TOKEN, DATASET)
    site = path.audience.removeprefix("embassy-kms/")
    return writer, path.tool, path.request_id, site


def measure(plan: Plan, base: Path, base_url: str) -> Results:
    results = Results(plan, f"{base} ({'tmpfs' if base == Path('/dev/shm') else 'disk'})")
    writer, tool, request_id, site = prepare(base_url)
    audience = f"embassy-kms/{site}"
    work = Path(tempfile.mkdtemp(prefix="ekms-bench-backup-", dir=base))
    try:
        with Service(base_url) as service:
            parties = Parties(
                MachineSession(service, writer, audience),
                MachineSession(service, tool, audience),
                request_id,
                site,
            )
            _large(results, work, parties)
            _small(results, work, parties)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = results.figures["restore_over_raw_file"]
    results.verdict = (
        f"{'PASS' if ratio >= RESTORE_RATIO_MIN else 'FAIL'}: large-file restore is "
        f"{ratio:.2f}x raw AES-256-GCM file to file (target {RESTORE_RATIO_MIN}x)"
    )
    return results


@dataclass(frozen=True)
class Parties:
    writing: MachineSession
    restoring: MachineSession
    request_id: str
    site: str


def _large(results: Results, work: Path, parties: Parties) -> None:
    writing, restoring, request_id, site = (
        parties.writing,
        parties.restoring,
        parties.request_id,
        parties.site,
    )
    plan = results.plan
    total = plan.large_files * plan.large_bytes
    label = f"{plan.large_files} x {plan.large_bytes // MiB} MiB"
    make_large(work / "large", plan)
    archive = work / "large.ekms"
    options = SealOptions(dataset=DATASET, site=site, workers=plan.workers)
    report = seal(work / "large", archive, options, writing)
    results.add("seal_large_mb_s", total / report.seconds / 1e6, f"seal, {label}", "MB/s")

    target = work / "large-restored"
    restored = restore(archive, RestoreOptions(request_id, target, workers=plan.workers), restoring)
    mb_s = total / restored.seconds / 1e6
    results.add(
        "restore_large_mb_s",
        mb_s,
        f"restore, {label}",
        "MB/s",
        f"{plan.workers} threads; unwrap {restored.unwrap_seconds:.2f} s, decrypt + SHA-256 + "
        f"write + fsync {restored.decrypt_seconds:.2f} s; every file checked against the source",
    )
    for path in sorted((work / "large").iterdir()):
        if _sha256(path) != _sha256(target / path.name):
            raise RuntimeError(f"restored {path.name} differs from the source")
    shutil.rmtree(target)

    key = os.urandom(32)
    raw = raw_encrypt(sorted((work / "large").iterdir()), work / "raw", key)
    file_s = raw_file_to_file(raw, work / "raw-out", key, plan.workers)
    memory_s = raw_in_memory(raw, key, plan.workers)
    raw_file = total / file_s / 1e6
    raw_memory = total / memory_s / 1e6
    results.add(
        "raw_file_mb_s",
        raw_file,
        "raw AES-256-GCM, file to file",
        "MB/s",
        f"`cryptography`, 1 MiB chunks, {plan.workers} threads: read, decrypt, write, fsync",
    )
    results.add(
        "raw_memory_mb_s",
        raw_memory,
        "raw AES-256-GCM, in memory",
        "MB/s",
        f"`cryptography`, 1 MiB chunks, {plan.workers} threads, no I/O",
    )
    results.add(
        "restore_over_raw_file",
        mb_s / raw_file,
        "restore / raw file to file",
        "x",
        f"target >= {RESTORE_RATIO_MIN}x",
    )
    results.add("restore_over_raw_memory", mb_s / raw_memory, "restore / raw in memory", "x")
    for name in ("large", "raw", "raw-out"):
        shutil.rmtree(work / name)
    shutil.rmtree(archive)


def _small(results: Results, work: Path, parties: Parties) -> None:
    writing, restoring, request_id, site = (
        parties.writing,
        parties.restoring,
        parties.request_id,
        parties.site,
    )
    plan = results.plan
    make_small(work / "small", plan)
    archive = work / "small.ekms"
    options = SealOptions(dataset=DATASET, site=site, workers=4)
    report = seal(work / "small", archive, options, writing)
    count = plan.small_files
    results.add(
        "seal_small_files_s",
        count / report.seconds,
        f"seal, {count:,} files of 1-8 KiB",
        "files/s",
        "one datakey request per file, 4 in flight",
    )
    target = work / "small-restored"
    restored = restore(
        archive,
        RestoreOptions(request_id, target, batch_size=100, workers=plan.workers),
        restoring,
    )
    results.add(
        "restore_small_files_s",
        count / restored.seconds,
        f"restore, {count:,} files of 1-8 KiB",
        "files/s",
        f"unwrap {restored.unwrap_seconds:.2f} s "
        f"({count / max(restored.unwrap_seconds, 1e-9):,.0f} keys/s, 100 per request); "
        f"decrypt + write {restored.decrypt_seconds:.2f} s",
    )
    results.add(
        "unwrap_keys_s",
        count / max(restored.unwrap_seconds, 1e-9),
        "unwrap phase alone",
        "keys/s",
        "batch_input of 100, a fresh DPoP proof per request",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def markdown(results: Results) -> str:
    plan = results.plan
    lines = [
        "## Backup seal and restore (`bench/backup.py`)",
        "",
        (
            f"- Files in {results.where}; {plan.workers} CPUs; the real `ekms backup seal` and "
            "`ekms restore` code against a dev server with 2 workers (SoftHSM, SQLite)."
        ),
        (
            "- Restore = verify the manifest signature, take the credential, unwrap every data "
            "key in batches of 100 with a DPoP proof each, then Tink streaming-AEAD decrypt, "
            "SHA-256, write, fsync and rename each file."
        ),
        (
            "- Raw AES-256-GCM: the same plaintext, encrypted once with `cryptography` in 1 MiB "
            "chunks, decrypted in the same run with the same thread count."
        ),
        f"- {results.verdict}",
        "",
        "| measurement | figure | note |",
        "| --- | ---: | --- |",
        *(f"| {label} | {value} | {note} |" for label, value, note in results.rows),
        "",
    ]
    return "\n".join(lines)


def run(*, quick: bool, chosen: Path | None = None) -> Results:
    """Start a dev server, measure, stop it. Used by bench/run.py as well."""
    from run import ekms_argv, free_port_pair, running, wait_healthy

    plan = Plan.make(quick=quick)
    base = workspace(plan, chosen)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ekms-bb-")))
        port = free_port_pair()
        server = stack.enter_context(running("ekms-backup", ekms_argv(port, 2), workdir, REPO_ROOT))
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(server, base_url)
        return measure(plan, base, base_url)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB and 2,000 files")
    parser.add_argument("--dir", type=Path, help="where to put the files (default: /dev/shm)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, chosen=args.dir)
    print(markdown(results))
    if args.json:
        payload: dict[str, Any] = {"plan": asdict(results.plan), **asdict(results)}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
