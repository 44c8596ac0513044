"""Backup seal and restore throughput (issue 7): 1 GiB in large files, 20,000 small files.

    python bench/backup.py [--quick] [--repeat N] [--dir DIR] [--json FILE]

Starts its own dev server (2 workers, SQLite, SoftHSM) on a loopback port, registers a backup
writer, a restore tool and the officials who approve its request (bench/scoped.py), then runs
the real client code (api.backup.seal / api.backup.restore) in this process:

- large files: 8 x 128 MiB (quick: 4 x 32 MiB) sealed once, then restored ``--repeat`` times
  (default 5); MB/s of plaintext, end to end (signature, credential, unwrap,
  decrypt, SHA-256, write, fsync, rename).
- the comparison, same data, same run, same core count: raw AES-256-GCM with
  ``cryptography`` file to file (read the ciphertext, decrypt 1 MiB chunks, write and fsync
  the plaintext, one random key), on as many threads as the restore has workers; it releases
  the GIL, so N threads are N cores. Measured twice: with the whole process pinned to one core
  (restore ``--workers 1``), and on all cores (``--workers N``, the CPU count). Each
  repetition runs restore, raw and the floor below back to back, in alternating order; the
  table shows medians. The issue's target, restore >= 0.8x raw, is judged on all cores.
- the floor: the restore's work without decryption (read, SHA-256, write, fsync of the
  plaintext, same threads): no restore that checks a SHA-256 of the content can beat it, so
  raw / floor bounds the ratio any decryptor could reach.
- CPU seconds per GB (this process, every thread) for restore and raw: the ratio of those is
  what the throughput ratio tends to once every core is busy, and it is not moved by other
  load on the machine, unlike the wall clock.
- small files: 20,000 files of 1-8 KiB (quick: 2,000) in 100 directories; files/s and MB/s,
  with the unwrap phase (batches of 100 data keys per request) timed on its own.

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
import resource
import shutil
import statistics
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

from api.backup.restore import RestoreOptions, RestoreReport, restore  # noqa: E402
from api.backup.seal import SealOptions, seal  # noqa: E402
from api.backup.service import MachineSession, Service  # noqa: E402
from api.principal_keys import KeyHolder  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

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
    repeat: int

    @classmethod
    def make(cls, *, quick: bool, repeat: int | None = None) -> Plan:
        workers = len(os.sched_getaffinity(0))
        if quick:
            return cls(4, 32 * MiB, 2_000, workers, repeat or 5)
        return cls(8, 128 * MiB, 20_000, workers, repeat or 5)

    @property
    def space(self) -> int:
        """Plaintext, archive, restored copy, raw ciphertext and its output, the floor's."""
        return 6 * self.large_files * self.large_bytes + self.small_files * 40_000


@dataclass
class Results:
    plan: Plan
    where: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)  # every run, for --json
    verdict: str = ""

    def add(self, key: str, value: float, label: str, unit: str, note: str = "") -> None:
        self.figures[key] = value
        if unit == "x":
            text = f"{value:.2f}x"
        elif unit == "s/GB":
            text = f"{value:.2f} s/GB"
        else:
            text = f"{value:,.0f} {unit}"
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


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User and system time of this process, every thread (the server is another process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu: float  # seconds of CPU, this process


def timed(fn: Callable[[], object]) -> Sample:
    cpu = cpu_seconds()
    started = time.perf_counter()
    fn()
    return Sample(time.perf_counter() - started, cpu_seconds() - cpu)


@contextlib.contextmanager
def cores(count: int, turn: int = 0) -> Iterator[int]:
    """Pin this process (and the threads it starts) to ``count`` of its CPUs, then unpin.

    Fewer than all rotate with ``turn``, so a neighbour busy on one CPU slows one repetition,
    not all of them.
    """
    allowed = sorted(os.sched_getaffinity(0))
    count = min(count, len(allowed))
    start = turn * count % len(allowed)
    os.sched_setaffinity(0, (allowed * 2)[start : start + count])
    try:
        yield count
    finally:
        os.sched_setaffinity(0, allowed)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# --- raw AES-256-GCM, the comparison, and the floor -------------------------------------------


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


def _each_file(files: Sequence[Path], out: Path, workers: int, one: Callable[..., None]) -> None:
    out.mkdir(parents=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda path: one(path, out / path.name), files))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def raw_file_to_file(files: Sequence[Path], out: Path, key: bytes, workers: int) -> None:
    """Read, decrypt, write, fsync: the restore's I/O with nothing but AES-GCM in between."""
    aead = AESGCM(key)

    def one(path: Path, target: Path) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with path.open("rb", buffering=0) as src:
                index = 0
                while sealed := src.read(CHUNK + 16):
                    _write_all(fd, aead.decrypt(index.to_bytes(12, "big"), sealed, None))
                    index += 1
            os.fsync(fd)
        finally:
            os.close(fd)

    _each_file(files, out, workers, one)


def floor_file_to_file(files: Sequence[Path], out: Path, workers: int) -> None:
    """Read, SHA-256, write, fsync the plaintext: a restore whose decryption costs nothing."""

    def one(path: Path, target: Path) -> None:
        digest = hashlib.sha256()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with path.open("rb", buffering=0) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    _each_file(files, out, workers, one)


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
    figures = results.figures
    ratio = figures["restore_over_raw_file"]
    one = figures.get("restore_over_raw_file_1core", ratio)  # a one-CPU machine has no other
    results.verdict = (
        f"{'PASS' if ratio >= RESTORE_RATIO_MIN else 'FAIL'}: large-file restore is "
        f"{ratio:.2f}x raw AES-256-GCM file to file on {plan.workers} core(s) "
        f"({one:.2f}x on one; target {RESTORE_RATIO_MIN}x). "
        f"Without any decryption, reading, hashing and writing alone reach "
        f"{figures['floor_over_raw_file']:.2f}x: the SHA-256 check of the content caps the ratio"
    )
    return results


@dataclass(frozen=True)
class Parties:
    writing: MachineSession
    restoring: MachineSession
    request_id: str
    site: str


@dataclass
class Runs:
    """One core count's repetitions: restore, raw and floor, back to back."""

    restore: list[Sample] = field(default_factory=list)
    decrypt_s: list[float] = field(default_factory=list)
    raw: list[Sample] = field(default_factory=list)
    floor: list[Sample] = field(default_factory=list)


def _large(results: Results, work: Path, parties: Parties) -> None:
    plan = results.plan
    total = plan.large_files * plan.large_bytes
    label = f"{plan.large_files} x {plan.large_bytes // MiB} MiB"
    source = work / "large"
    make_large(source, plan)
    archive = work / "large.ekms"
    options = SealOptions(dataset=DATASET, site=parties.site, workers=plan.workers)
    report = seal(source, archive, options, parties.writing)
    results.add("seal_large_mb_s", total / report.seconds / 1e6, f"seal, {label}", "MB/s")
    plain = sorted(source.iterdir())
    key = os.urandom(32)
    raw = raw_encrypt(plain, work / "raw", key)
    target = work / "large-restored"

    def restore_once(workers: int, runs: Runs, check: bool) -> None:
        options = RestoreOptions(parties.request_id, fresh(target), workers=workers)
        reports: list[RestoreReport] = []
        runs.restore.append(
            timed(lambda: reports.append(restore(archive, options, parties.restoring)))
        )
        runs.decrypt_s.append(reports[0].decrypt_seconds)
        if check:
            _check_restored(source, target)
        shutil.rmtree(target)

    def raw_once(workers: int, runs: Runs, _check: bool) -> None:
        out = fresh(work / "raw-out")
        runs.raw.append(timed(lambda: raw_file_to_file(raw, out, key, workers)))
        shutil.rmtree(out)

    def floor_once(workers: int, runs: Runs, _check: bool) -> None:
        out = fresh(work / "floor")
        runs.floor.append(timed(lambda: floor_file_to_file(plain, out, workers)))
        shutil.rmtree(out)

    by_cores = _repetitions(plan, [restore_once, raw_once, floor_once])
    for count, runs in sorted(by_cores.items()):
        _report_cores(results, total, label, count, runs, last=count == plan.workers)

    _lone(results, work, parties, plain[0])

    memory_s = raw_in_memory(raw, key, plan.workers)
    raw_memory = total / memory_s / 1e6
    results.add(
        "raw_memory_mb_s",
        raw_memory,
        "raw AES-256-GCM, in memory",
        "MB/s",
        f"`cryptography`, 1 MiB chunks, {plan.workers} threads, no I/O; for reference",
    )
    restore_mb_s = results.figures["restore_large_mb_s"]
    results.add(
        "restore_over_raw_memory", restore_mb_s / raw_memory, "restore / raw in memory", "x"
    )
    for name in ("large", "raw"):
        shutil.rmtree(work / name)
    shutil.rmtree(archive)


def _repetitions(plan: Plan, steps: list[Callable[[int, Runs, bool], None]]) -> dict[int, Runs]:
    """Each step ``repeat`` times, on one core and then on all, in alternating order: a burst
    of load from elsewhere then hits restore and raw alike, not one of them."""
    by_cores: dict[int, Runs] = {}
    for count in sorted({1, plan.workers}):
        runs = by_cores[count] = Runs()
        for rep in range(plan.repeat):
            with cores(count, rep) as pinned:
                for step in steps if rep % 2 == 0 else steps[::-1]:
                    step(pinned, runs, rep == 0)
    return by_cores


def _report_cores(
    results: Results, total: int, label: str, count: int, runs: Runs, *, last: bool
) -> None:
    """Medians of one core count; the all-cores figures keep the names bench/run.py reads."""
    suffix = "" if last else f"_{count}core"
    where = f"{count} core{'s' if count > 1 else ''}"
    gb = total / 1e9

    def mb_s(samples: Sequence[Sample]) -> float:
        return total / statistics.median(s.seconds for s in samples) / 1e6

    def cpu_gb(samples: Sequence[Sample]) -> float:
        return statistics.median(s.cpu for s in samples) / gb

    restore_mb_s, raw_mb_s, floor_mb_s = mb_s(runs.restore), mb_s(runs.raw), mb_s(runs.floor)
    for name, samples in (("restore", runs.restore), ("raw", runs.raw), ("floor", runs.floor)):
        results.samples[f"{name}_seconds_{count}core"] = [round(s.seconds, 4) for s in samples]
        results.samples[f"{name}_cpu_seconds_{count}core"] = [round(s.cpu, 4) for s in samples]
    results.samples[f"restore_decrypt_seconds_{count}core"] = [round(s, 4) for s in runs.decrypt_s]
    spread = [round(total / s.seconds / 1e6) for s in runs.restore]
    results.add(
        f"restore_large_mb_s{suffix}",
        restore_mb_s,
        f"restore, {label}, {where}",
        "MB/s",
        f"--workers {count}; median of {len(runs.restore)} ({', '.join(map(str, spread))}); "
        f"decrypt + SHA-256 + write + fsync {statistics.median(runs.decrypt_s):.2f} s",
    )
    results.add(
        f"raw_file_mb_s{suffix}",
        raw_mb_s,
        f"raw AES-256-GCM file to file, {where}",
        "MB/s",
        f"`cryptography`, 1 MiB chunks, {count} thread{'s' if count > 1 else ''}: "
        "read, decrypt, write, fsync",
    )
    results.add(
        f"floor_mb_s{suffix}",
        floor_mb_s,
        f"floor: read + SHA-256 + write, {where}",
        "MB/s",
        "the restore's work without decryption",
    )
    results.add(
        f"restore_over_raw_file{suffix}",
        restore_mb_s / raw_mb_s,
        f"restore / raw file to file, {where}",
        "x",
        f"target >= {RESTORE_RATIO_MIN}x" if last else "",
    )
    results.add(
        f"floor_over_raw_file{suffix}",
        floor_mb_s / raw_mb_s,
        f"floor / raw file to file, {where}",
        "x",
        "the best ratio any restore that checks SHA-256 could reach",
    )
    restore_cpu, raw_cpu = cpu_gb(runs.restore), cpu_gb(runs.raw)
    results.add(
        f"restore_cpu_s_gb{suffix}",
        restore_cpu,
        f"CPU per GB: restore / raw, {where}",
        "s/GB",
        f"raw {raw_cpu:.2f} s/GB; raw / restore = {raw_cpu / restore_cpu:.2f}x",
    )
    results.figures[f"raw_cpu_s_gb{suffix}"] = raw_cpu


def _lone(results: Results, work: Path, parties: Parties, file: Path) -> None:
    """One large object alone: with one worker, then with all, which lends the idle ones to
    hash it in a second thread while Tink decrypts (raw AES-GCM has nothing to compare: one
    file is one thread for it too)."""
    plan = results.plan
    source = work / "lone"
    source.mkdir()
    os.link(file, source / file.name)
    archive = work / "lone.ekms"
    seal(source, archive, SealOptions(dataset=DATASET, site=parties.site), parties.writing)
    target = work / "lone-restored"
    samples: dict[int, list[float]] = {1: [], plan.workers: []}
    for rep in range(plan.repeat):
        for workers in sorted(samples) if rep % 2 == 0 else sorted(samples, reverse=True):
            options = RestoreOptions(parties.request_id, fresh(target), workers=workers)
            samples[workers].append(
                timed(lambda o=options: restore(archive, o, parties.restoring)).seconds
            )
            shutil.rmtree(target)
    size = file.stat().st_size
    for workers, seconds in sorted(samples.items()):
        results.samples[f"restore_lone_seconds_{workers}w"] = [round(s, 4) for s in seconds]
        results.add(
            f"restore_lone_mb_s_{workers}w",
            size / statistics.median(seconds) / 1e6,
            f"restore, 1 x {size // MiB} MiB, --workers {workers}",
            "MB/s",
            "hashed in a second thread: the spare worker is lent"
            if workers > 1
            else "decrypt, hash and write in one thread",
        )
    shutil.rmtree(source)
    shutil.rmtree(archive)


def _check_restored(source: Path, target: Path) -> None:
    for path in sorted(source.iterdir()):
        if _sha256(path) != _sha256(target / path.name):
            raise RuntimeError(f"restored {path.name} differs from the source")


def _small(results: Results, work: Path, parties: Parties) -> None:
    plan = results.plan
    make_small(work / "small", plan)
    total = sum(p.stat().st_size for p in (work / "small").rglob("*") if p.is_file())
    archive = work / "small.ekms"
    options = SealOptions(dataset=DATASET, site=parties.site, workers=4)
    report = seal(work / "small", archive, options, parties.writing)
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
        RestoreOptions(parties.request_id, target, batch_size=100, workers=plan.workers),
        parties.restoring,
    )
    results.add(
        "restore_small_files_s",
        count / restored.seconds,
        f"restore, {count:,} files of 1-8 KiB",
        "files/s",
        f"{total / restored.seconds / 1e6:.1f} MB/s; unwrap {restored.unwrap_seconds:.2f} s "
        f"({count / max(restored.unwrap_seconds, 1e-9):,.0f} keys/s, 100 per request); "
        f"decrypt + write {restored.decrypt_seconds:.2f} s; --workers {plan.workers}",
    )
    results.figures["restore_small_mb_s"] = total / restored.seconds / 1e6
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
            "chunks, decrypted file to file in the same run on the same cores (the process "
            "pinned to one core, then all of them; threads, which it runs in parallel). "
            f"Medians of {plan.repeat} alternating runs."
        ),
        f"- {results.verdict}",
        "",
        "| measurement | figure | note |",
        "| --- | ---: | --- |",
        *(f"| {label} | {value} | {note} |" for label, value, note in results.rows),
        "",
    ]
    return "\n".join(lines)


def run(*, quick: bool, chosen: Path | None = None, repeat: int | None = None) -> Results:
    """Start a dev server, measure, stop it. Used by bench/run.py as well."""
    from run import ekms_argv, free_port_pair, running, wait_healthy

    plan = Plan.make(quick=quick, repeat=repeat)
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
    parser.add_argument("--repeat", type=int, help="runs per core count (default 5)")
    parser.add_argument("--dir", type=Path, help="where to put the files (default: /dev/shm)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results = run(quick=args.quick, chosen=args.dir, repeat=args.repeat)
    print(markdown(results))
    if args.json:
        payload: dict[str, Any] = {"plan": asdict(results.plan), **asdict(results)}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
