"""``ekms restore``: an archive back into files, only with an approved, scoped credential.

Order matters, and is the point of this module:

1. The manifest is parsed strictly and its signature verified with the manifest key's public
   half, before the tool asks for a credential.
2. The credential's scope (dataset, site) and what the request has left (window, uses) are
   checked before any data key is unwrapped, so a restore the service would refuse spends
   nothing.
3. Every data key still needed is unwrapped, in batches, before any plaintext is written: a
   refusal part-way (a revoked grant, an emergency that ended) stops the restore with nothing
   written. Each key is checked against its commitment in the signed manifest at once.
4. Objects are decrypted to temporary files in the state directory, hashed, fsynced, and only
   then renamed to their final names: no half-written file ever carries a final name. A rerun
   re-verifies what is there and unwraps only what is missing.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.backup.aead import SEGMENT_BYTES, StreamCipher, tink_error
from api.backup.archive import (
    DATA_KEY_BYTES,
    DEFAULT_SIGNING_KEY,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    STATE_DIR,
    Entry,
    IntegrityError,
    Manifest,
    Reason,
    RefusedError,
    UsageError,
    check_signing_key,
    chunks,
    commitment_matches,
    parse_manifest,
    parse_signature,
    verify_signature,
)
from api.backup.service import ServiceError, token_claims
from api.backup.work import check_workers, ordered_map
from kms.derivation import wipe

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from api.backup.progress import Progress
    from api.backup.service import MachineSession

READ_CHUNK = 4 << 20
HASH_THREAD_MIN_BYTES = 8 * SEGMENT_BYTES  # smaller objects are done before a thread pays off
_HASH_QUEUE_DEPTH = 4
MAX_BATCH = 1000
CREDENTIAL_MARGIN_S = 30.0
_JOURNAL = "journal"
_STATE = "state.json"
_TMP = "tmp"


@dataclass(frozen=True)
class RestoreOptions:
    request_id: str
    target: Path | None  # None with verify_only
    verify_only: bool = False
    batch_size: int = 100
    workers: int = 2
    signing_key: str = DEFAULT_SIGNING_KEY
    public_key: bytes | None = None  # a pinned PEM; else the service's, fetched once
    expect_archive: str | None = None


@dataclass
class RestoreReport:
    archive_id: str
    dataset: str
    site: str
    objects: int
    bytes: int
    skipped: int = 0  # restored by an earlier, interrupted run, re-verified now
    unwrapped: int = 0
    unwrap_seconds: float = 0.0
    decrypt_seconds: float = 0.0
    seconds: float = 0.0
    verify_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "archive_id": self.archive_id,
            "dataset": self.dataset,
            "site": self.site,
            "objects": self.objects,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "unwrapped": self.unwrapped,
            "unwrap_seconds": round(self.unwrap_seconds, 3),
            "decrypt_seconds": round(self.decrypt_seconds, 3),
            "seconds": round(self.seconds, 3),
            "verify_only": self.verify_only,
        }


@dataclass(frozen=True)
class Loaded:
    manifest: Manifest
    canonical: bytes
    signature_raw: bytes


def load_archive(archive: Path) -> Loaded:
    """Read and strictly parse the manifest and its signature (not yet verified)."""
    if not archive.is_dir():
        raise UsageError(f"{archive} is not an archive directory")
    try:
        canonical = (archive / MANIFEST_FILE).read_bytes()
        signature_raw = (archive / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise IntegrityError(f"{Path(exc.filename).name} is missing from the archive") from None
    except OSError as exc:
        raise UsageError(f"cannot read {archive}: {exc.strerror or exc}") from None
    return Loaded(parse_manifest(canonical), canonical, signature_raw)


def restore(
    archive: Path,
    options: RestoreOptions,
    session: MachineSession,
    progress_factory: Callable[[str, int, int], Progress] | None = None,
    on_object: Callable[[Entry], None] | None = None,
) -> RestoreReport:
    """Restore (or, with ``verify_only``, check) ``archive``; see the module docstring."""
    started = time.monotonic()
    if not 1 <= options.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size must be between 1 and {MAX_BATCH}")
    check_workers(options.workers)
    if (options.target is None) != options.verify_only:
        raise UsageError("give --to DIR to restore, or --verify-only to check without writing")
    loaded = load_archive(archive)
    manifest = loaded.manifest
    if options.expect_archive is not None and manifest.archive_id != options.expect_archive:
        raise IntegrityError(
            f"archive id is {manifest.archive_id}, not the expected {options.expect_archive}"
        )
    signature = parse_signature(loaded.signature_raw)
    check_signing_key(signature, options.signing_key)
    public_key, key_type = _manifest_public_key(session, options, signature.key_version)
    verify_signature(signature, loaded.canonical, public_key, key_type)

    grant = _Grant(session, options.request_id, manifest)
    grant.check_scope()
    report = RestoreReport(
        manifest.archive_id,
        manifest.dataset,
        manifest.site,
        len(manifest.entries),
        manifest.total_bytes,
        verify_only=options.verify_only,
    )
    with contextlib.ExitStack() as stack:
        if options.target is None:
            state: _State | None = None
            todo = list(manifest.entries)
        else:
            state = stack.enter_context(_State.open(options.target, manifest, loaded.canonical))
            todo = state.pending(manifest.entries)
            report.skipped = len(manifest.entries) - len(todo)
        _check_object_files(archive, todo)
        grant.check_uses(len(todo))
        keys: dict[int, bytearray] = {}
        stack.callback(_wipe_all, keys)
        unwrap_started = time.monotonic()
        for batch in chunks(todo, options.batch_size):
            keys.update(grant.unwrap(batch))
        report.unwrapped = len(keys)
        report.unwrap_seconds = time.monotonic() - unwrap_started

        decrypt_started = time.monotonic()
        progress = (
            None
            if progress_factory is None
            else progress_factory(
                "verifying" if options.verify_only else "restoring",
                sum(e.size for e in todo),
                len(todo),
            )
        )
        if progress is not None:
            stack.callback(progress.close)
        capacity = _Capacity(options.workers, len(todo))
        worker = _Worker(archive, manifest, keys, state, progress, on_object, capacity)
        ordered_map(worker.run, todo, options.workers)
        if state is not None:
            state.finish()
        report.decrypt_seconds = time.monotonic() - decrypt_started
    report.seconds = time.monotonic() - started
    return report


def _wipe_all(keys: dict[int, bytearray]) -> None:
    for key in keys.values():
        wipe(key)
    keys.clear()


def _manifest_public_key(
    session: MachineSession, options: RestoreOptions, version: int
) -> tuple[bytes, str]:
    """The pinned public key, or the service's for that version of the manifest key."""
    if options.public_key is not None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

        try:
            public = serialization.load_pem_public_key(options.public_key)
        except ValueError:
            raise UsageError("--public-key is not a PEM public key") from None
        kind = "ecdsa-p256" if isinstance(public, ec.EllipticCurvePublicKey) else "ed25519"
        return options.public_key, kind
    try:
        key = session.manifest_key(options.signing_key)
    except ServiceError as exc:
        if exc.status == 404:
            raise UsageError(f"the service has no manifest key {options.signing_key!r}") from None
        raise
    found = key.get("keys", {}).get(str(version))
    if not isinstance(found, dict) or not found.get("public_key"):
        raise IntegrityError(
            f"manifest key {options.signing_key!r} has no version {version} at this service"
        )
    return str(found["public_key"]).encode(), str(key.get("type"))


def _check_object_files(archive: Path, entries: Sequence[Entry]) -> None:
    """Every object still needed is there with its signed size: checked before any unwrap."""
    for entry in entries:
        try:
            info = (archive / entry.file).lstat()
        except FileNotFoundError:
            raise IntegrityError(f"{entry.file} is missing", path=entry.path) from None
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{entry.file} is not a regular file", path=entry.path)
        if info.st_size != entry.ciphertext_size:
            raise IntegrityError(
                f"{entry.file} has {info.st_size} bytes, the manifest says "
                f"{entry.ciphertext_size}: truncated or altered",
                path=entry.path,
            )


# --- the grant: credential, scope, uses, unwrap --------------------------------------------


class _Grant:
    """The restore request as the tool sees it, and its credential."""

    def __init__(self, session: MachineSession, request_id: str, manifest: Manifest) -> None:
        self.session = session
        self.request_id = request_id
        self.manifest = manifest
        self._credential: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.claims: dict[str, Any] = {}

    def credential(self) -> str:
        with self._lock:
            now = self.session.clock()
            if self._credential is None or self._expires_at - now < CREDENTIAL_MARGIN_S:
                try:
                    answer = self.session.call(
                        "POST", f"ekms/proposals/{self.request_id}/credential"
                    )
                except ServiceError as exc:
                    raise self.diagnose(exc) from None
                auth = answer["auth"]
                self._credential = str(auth["client_token"])
                self._expires_at = now + float(auth["lease_duration"])
                self.claims = token_claims(self._credential)
            return self._credential

    def check_scope(self) -> None:
        """The archive's dataset against the credential, the credential's site against the
        service's."""
        self.credential()
        scope = self.claims.get("scope") or {}
        datasets = scope.get("datasets") or []
        if self.manifest.dataset not in datasets:
            raise RefusedError(
                Reason.OUT_OF_SCOPE,
                f"request {self.request_id} covers {', '.join(datasets) or 'nothing'}; the "
                f"archive is of dataset {self.manifest.dataset!r}",
            )
        # The archive may have been sealed at another site (``manifest.site``): after a
        # failover its dataset keys are served here. Which site serves is the service's
        # decision (only an active site issues a credential, and honours it only there).
        site = scope.get("site")
        here = self.session.site()
        if here != site:
            raise RefusedError(
                Reason.WRONG_SITE,
                f"request {self.request_id} is for site {site!r}; this service is {here!r}",
            )

    def check_uses(self, needed: int) -> None:
        """Refuse up front when the request has fewer uses left than keys to unwrap."""
        if needed == 0:
            return
        view = self._proposal()
        max_uses = view.get("max_uses")
        if isinstance(max_uses, int):
            left = max_uses - int(view.get("uses") or 0)
            if left < needed:
                raise RefusedError(
                    Reason.USES_EXHAUSTED,
                    f"request {self.request_id} has {max(left, 0)} of {max_uses} unwraps left; "
                    f"this restore needs {needed}",
                )

    def unwrap(self, batch: Sequence[Entry]) -> dict[int, bytearray]:
        """One batch request with a fresh DPoP proof; each key checked against its commitment."""
        manifest = self.manifest
        body = {
            "batch_input": [
                {
                    "ciphertext": e.wrapped_key,
                    "context": manifest.context_b64(e),
                    "reference": str(e.index),
                }
                for e in batch
            ]
        }
        try:
            answer = self.session.call_with(
                self.credential(), "POST", f"transit/decrypt/{manifest.dataset}", body
            )
        except ServiceError as exc:
            raise self.diagnose(exc, needed=len(batch)) from None
        results = answer["data"]["batch_results"]
        if len(results) != len(batch):
            raise RefusedError(Reason.SERVICE_ERROR, "the unwrap answer has the wrong length")
        keys: dict[int, bytearray] = {}
        problem: tuple[Entry, str] | None = None
        for entry, result in zip(batch, results, strict=True):
            if "error" in result or result.get("reference") != str(entry.index):
                problem = (
                    entry,
                    "its data key does not unwrap: the wrapped key or context was altered",
                )
                break
            key = keys[entry.index] = bytearray(base64.b64decode(result.pop("plaintext")))
            if len(key) != DATA_KEY_BYTES or not commitment_matches(
                key, manifest.aad(entry), entry.key_commitment
            ):
                problem = (entry, "its data key does not match the manifest's key commitment")
                break
        if problem is not None:
            _wipe_all(keys)
            raise IntegrityError(problem[1], path=problem[0].path)
        return keys

    def _proposal(self) -> dict[str, Any]:
        try:
            return dict(self.session.call("GET", f"ekms/proposals/{self.request_id}")["data"])
        except ServiceError as exc:
            if exc.status == 404:
                raise RefusedError(
                    Reason.UNKNOWN_REQUEST,
                    f"no restore request {self.request_id}",
                    status=404,
                    request_id=exc.request_id,
                ) from None
            raise

    def diagnose(self, refusal: ServiceError, needed: int = 0) -> RefusedError:
        """Why the service said no, from what it publishes to the tool (the request's state)."""
        if refusal.status not in (401, 403, 404):
            return refusal
        status, request_id = refusal.status, refusal.request_id
        try:
            view = self._proposal()
        except RefusedError as exc:
            return exc
        payload = view.get("payload") or {}
        state = view.get("state")
        reason, message = Reason.DENIED, f"the service refused request {self.request_id}"
        if state == "revoked":
            reason, message = Reason.REVOKED, f"request {self.request_id} was revoked"
        elif state != "approved":
            reason, message = Reason.NOT_APPROVED, f"request {self.request_id} is {state}"
        elif (view.get("decided_at") or 0) + int(payload.get("ttl") or 0) <= self.session.clock():
            reason, message = Reason.EXPIRED, f"request {self.request_id}'s window has closed"
        elif isinstance(view.get("max_uses"), int) and int(view.get("uses") or 0) + max(
            needed, 1
        ) > int(view["max_uses"]):
            reason = Reason.USES_EXHAUSTED
            message = f"request {self.request_id} has used {view.get('uses')} of {view['max_uses']}"
        elif self.manifest.dataset not in (payload.get("datasets") or []):
            reason, message = Reason.OUT_OF_SCOPE, f"request {self.request_id} does not cover it"
        elif refusal.status == 401:
            reason, message = Reason.UNAUTHENTICATED, "the credential or its proof was refused"
        else:
            message += (
                " (the site's restore policy may need an emergency for this dataset's "
                "classification here)"
            )
        return RefusedError(reason, message, status=status, request_id=request_id)


# --- the restore directory -----------------------------------------------------------------


class _State:
    """``DIR/.ekms-restore``: a lock, which archive is being restored, a journal, temp files."""

    def __init__(self, root: Path, state: Path, lock_fd: int) -> None:
        self.root = root
        self.dir = state
        self._lock_fd = lock_fd
        self._journal = (state / _JOURNAL).open("a", encoding="utf-8")
        self._journal_lock = threading.Lock()
        self._dirs: set[Path] = {root}
        self.completed = 0  # objects this run gave their final names
        self._checked: set[Path] = set()  # directories this run made or found real

    @classmethod
    @contextlib.contextmanager
    def open(cls, target: Path, manifest: Manifest, canonical: bytes) -> Iterator[_State]:
        """Lock and claim ``target``. If the restore fails before it completed any object, what
        this run created (the state directory, an empty ``target``) is removed again, so a
        refused restore leaves nothing behind."""
        created_root = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        state = root / STATE_DIR
        if state.is_symlink():
            raise UsageError(f"{state} is a symbolic link")
        created_state = not state.exists()
        state.mkdir(exist_ok=True)
        lock_fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self: _State | None = None
        try:
            _claim(root, state, lock_fd, manifest, canonical)
            tmp = state / _TMP
            tmp.mkdir(exist_ok=True)
            for leftover in tmp.iterdir():  # half-written by an interrupted run: never final
                leftover.unlink()
            self = cls(root, state, lock_fd)
            try:
                yield self
            finally:
                self._journal.close()
        except BaseException:
            if created_state and (self is None or not self.completed):
                shutil.rmtree(state, ignore_errors=True)
                if created_root:
                    with contextlib.suppress(OSError):
                        root.rmdir()
            raise
        finally:
            os.close(lock_fd)

    def journal(self) -> set[int]:
        done: set[int] = set()
        with contextlib.suppress(FileNotFoundError):
            for line in (self.dir / _JOURNAL).read_text(encoding="utf-8").splitlines():
                if line.strip().isdigit():
                    done.add(int(line))
        return done

    def pending(self, entries: Sequence[Entry]) -> list[Entry]:
        """What is left: a file already at its final name counts as done once re-verified."""
        journal = self.journal()
        todo = []
        for entry in entries:
            final = self.final_path(entry.path, create=False)
            try:
                info = final.lstat()
            except FileNotFoundError:
                todo.append(entry)
                continue
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"{final} exists and is not a regular file; refusing")
            if info.st_size == entry.size and _file_sha256(final) == entry.sha256:
                continue  # restored earlier (journal) or already in place: verified either way
            if entry.index in journal:
                todo.append(entry)  # altered since an earlier run restored it: restore again
                continue
            raise UsageError(f"{final} exists and differs from the archive; refusing to overwrite")
        return todo

    def final_path(self, path: str, *, create: bool) -> Path:
        """``root/path``, refusing any existing component that is a symlink or not a directory."""
        current = self.root
        parts = path.split("/")
        for part in parts[:-1]:
            current = current / part
            if current in self._checked:
                continue
            try:
                info = current.lstat()
            except FileNotFoundError:
                if not create:
                    return self.root.joinpath(*parts)
                with contextlib.suppress(FileExistsError):
                    current.mkdir(mode=0o700)
                info = current.lstat()
                self._dirs.add(current.parent)
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
                raise UsageError(f"{current} is a symbolic link or not a directory; refusing")
            if create:
                self._checked.add(current)
        final = current / parts[-1]
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(final.lstat().st_mode):
                raise UsageError(f"{final} is a symbolic link; refusing")
        return final

    def temp_path(self, entry: Entry) -> Path:
        return self.dir / _TMP / f"{entry.index:08d}"

    def done(self, entry: Entry, final: Path) -> None:
        with self._journal_lock:
            self._dirs.add(final.parent)
            self.completed += 1
            self._journal.write(f"{entry.index}\n")
            self._journal.flush()

    def finish(self) -> None:
        """Make the renames durable, then remove the state directory."""
        for directory in sorted(self._dirs):
            _fsync_dir(directory)
        self._journal.close()
        for name in (_JOURNAL, _STATE):
            (self.dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.dir / _TMP).rmdir()
            (self.dir / "lock").unlink()
            self.dir.rmdir()
        _fsync_dir(self.root)


def _claim(root: Path, state: Path, lock_fd: int, manifest: Manifest, canonical: bytes) -> None:
    """Lock the directory, and refuse to mix two archives' restores in it."""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another restore is writing to {root}") from None
    marker = {
        "archive_id": manifest.archive_id,
        "manifest_sha256": hashlib.sha256(canonical).hexdigest(),
    }
    existing = state / _STATE
    if not existing.exists():
        existing.write_text(json.dumps(marker), encoding="utf-8")
        return
    found = json.loads(existing.read_text(encoding="utf-8"))
    if found != marker:
        raise UsageError(
            f"{root} holds an unfinished restore of another archive "
            f"({found.get('archive_id')}); finish it, or remove {state}"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- one object ----------------------------------------------------------------------------


class _Capacity:
    """Worker threads left with nothing to do, which a large object may borrow for hashing.

    Tink holds the GIL while it decrypts; SHA-256 and the write release it. While every worker
    has an object, their decryption, hashing and writing already overlap across the cores, and
    a second thread per object only adds hand-offs (10% slower, measured). Once no object is
    left to start, a worker that finishes leaves a core idle: a large object still running
    borrows it and hashes in a second thread while Tink decrypts its next segment, so a lone
    large object, or the last ones of a restore, use two cores instead of one.
    """

    def __init__(self, workers: int, objects: int) -> None:
        self._lock = threading.Lock()
        self.idle = workers - objects  # threads that will never get an object of their own

    def borrow(self) -> bool:
        if self.idle <= 0:  # the usual answer, without the lock
            return False
        with self._lock:
            if self.idle <= 0:
                return False
            self.idle -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.idle += 1


class _Hasher:
    """SHA-256 of one object's plaintext: inline, or in a thread of its own once it has one.

    Chunks are hashed in order either way: those before the switch inline, the rest through a
    bounded queue (at most ``_HASH_QUEUE_DEPTH`` segments in flight, so memory stays small).
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def update(self, chunk: bytes) -> None:
        if self._queue is None:
            self._digest.update(chunk)
        else:
            self._queue.put(chunk)

    def in_thread(self) -> None:
        self._queue = queue.Queue(_HASH_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._drain, name="ekms-restore-hash", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not None:
            if self._failed is None:  # keep draining after a failure, so put() never blocks
                try:
                    self._digest.update(chunk)
                except BaseException as exc:  # noqa: BLE001 - reported by hexdigest()
                    self._failed = exc

    def stop(self) -> None:
        """End the thread, if any; always called, or a failed object would leave it behind."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.stop()
        if self._failed is not None:
            raise self._failed
        return self._digest.hexdigest()


@dataclass
class _Worker:
    archive: Path
    manifest: Manifest
    keys: dict[int, bytearray]
    state: _State | None
    progress: Progress | None
    on_object: Callable[[Entry], None] | None
    capacity: _Capacity

    def run(self, entry: Entry) -> None:
        try:
            self._restore(entry)
        finally:
            self.capacity.give_back()  # this worker's thread is free for the others now
        if self.progress is not None:
            self.progress.advance(0, 1)
        if self.on_object is not None:
            self.on_object(entry)

    def _restore(self, entry: Entry) -> None:
        key = self.keys[entry.index]
        try:
            cipher = StreamCipher(key)
        finally:
            wipe(key)
        temp: Path | None = None
        fd = -1
        try:
            if self.state is not None:
                temp = self.state.temp_path(entry)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            digest = self._decrypt(cipher, entry, fd)
            if digest != entry.sha256:
                raise IntegrityError("content hash does not match the manifest", path=entry.path)
            if self.state is not None and temp is not None:
                os.fsync(fd)
                os.close(fd)
                fd = -1
                final = self.state.final_path(entry.path, create=True)
                temp.replace(final)
                temp = None
                self.state.done(entry, final)
        finally:
            if fd >= 0:
                os.close(fd)
            if temp is not None:
                temp.unlink(missing_ok=True)

    def _decrypt(self, cipher: StreamCipher, entry: Entry, fd: int) -> str:
        """Decrypt, hash and (with ``fd``) write one object, a Tink segment at a time."""
        hasher = _Hasher()
        may_borrow = entry.size >= HASH_THREAD_MIN_BYTES
        borrowed = False
        size = 0
        failure = tink_error()
        progress = self.progress
        try:
            with (
                (self.archive / entry.file).open("rb", buffering=0) as source,
                contextlib.closing(cipher.plaintext(source, self.manifest.aad(entry))) as plain,
            ):
                for chunk in plain:
                    size += len(chunk)
                    if size > entry.size:
                        break
                    if may_borrow and not borrowed and self.capacity.borrow():
                        borrowed = True
                        hasher.in_thread()
                    hasher.update(chunk)
                    if fd >= 0:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    if progress is not None:
                        progress.advance(len(chunk))
            digest = hasher.hexdigest()
        except failure:
            raise IntegrityError(
                "ciphertext does not authenticate: altered, truncated, moved from another "
                "place or another archive",
                path=entry.path,
            ) from None
        finally:
            hasher.stop()
            if borrowed:
                self.capacity.give_back()
        if size != entry.size:
            raise IntegrityError(
                f"decrypts to {'more than ' if size > entry.size else ''}{size} bytes, "
                f"the manifest says {entry.size}",
                path=entry.path,
            )
        return digest
