"""``ekms backup seal``: a directory into a signed archive, one data key per object.

The archive is built beside its final name (``ARCHIVE.partial``) and renamed only when the
manifest is signed and everything is on disk, so an interrupted seal never leaves something
that looks like an archive. Each data key is wiped as soon as its object is encrypted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from api.backup.aead import CountingWriter, StreamCipher
from api.backup.archive import (
    DATA_KEY_BYTES,
    DEFAULT_SIGNING_KEY,
    MANIFEST_FILE,
    MAX_OBJECTS,
    OBJECTS_DIR,
    SIGNATURE_FILE,
    BackupError,
    Entry,
    IntegrityError,
    Manifest,
    Signature,
    UsageError,
    associated_data,
    check_tree,
    context_bytes,
    key_commitment,
    manifest_digest,
    new_archive_id,
    object_file,
    require_manifest_key,
    sign_request,
    validate_dataset,
    validate_path,
    validate_site,
    verify_signature,
)
from api.backup.work import check_workers, ordered_map
from kms.derivation import wipe

if TYPE_CHECKING:
    from api.backup.progress import Progress
    from api.backup.service import MachineSession

READ_CHUNK = 4 << 20


@dataclass(frozen=True)
class SealOptions:
    dataset: str
    site: str
    signing_key: str = DEFAULT_SIGNING_KEY
    workers: int = 4  # concurrent data-key requests and encryptions


@dataclass(frozen=True)
class Source:
    path: str  # relative, as the manifest names it
    file: Path
    size: int


@dataclass(frozen=True)
class SealReport:
    archive: Path
    archive_id: str
    dataset: str
    site: str
    objects: int
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "archive_id": self.archive_id,
            "dataset": self.dataset,
            "site": self.site,
            "objects": self.objects,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


def collect(src: Path) -> list[Source]:
    """Every regular file under ``src``, sorted by path; symlinks and special files refused.

    A symlink could make the archive hold what lies outside the source, and a restore could
    not recreate it safely: the archive holds regular files only, and says so up front.
    """
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    found: list[Source] = []
    for top, dirs, files in os.walk(src, followlinks=False, onerror=_unreadable):
        for name in sorted(dirs + files):
            full = Path(top) / name
            info = full.lstat()
            rel = full.relative_to(src).as_posix()
            if stat.S_ISLNK(info.st_mode):
                raise UsageError(f"{full} is a symbolic link: archives hold regular files only")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"{full} is not a regular file")
            try:
                validate_path(rel)
            except IntegrityError as exc:
                raise UsageError(f"{full}: cannot be archived: {exc}") from None
            found.append(Source(rel, full, info.st_size))
    found.sort(key=lambda s: s.path.encode("utf-8"))
    if len(found) > MAX_OBJECTS:
        raise UsageError(f"{src} holds more than {MAX_OBJECTS} files; split it")
    check_tree(s.path for s in found)
    return found


def _unreadable(error: OSError) -> None:
    """os.walk skips what it cannot list unless told otherwise: a backup must not."""
    raise error


def seal(
    src: Path,
    out: Path,
    options: SealOptions,
    session: MachineSession,
    progress_factory: Any = None,
) -> SealReport:
    """Seal ``src`` into ``out``; on any failure nothing is left under either name."""
    started = time.monotonic()
    dataset = validate_dataset(options.dataset)
    site = validate_site(options.site)
    require_manifest_key(options.signing_key)
    check_workers(options.workers)
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() or partial.is_symlink():
        raise UsageError(f"{partial} is left from an interrupted seal: remove it first")
    sources = collect(src)
    service_site = session.site()
    if service_site != site:
        raise UsageError(f"the service at {session.service.base} is site {service_site!r}")
    key = session.manifest_key(options.signing_key)
    archive_id = new_archive_id(os.urandom(16))
    progress: Progress | None = (
        None
        if progress_factory is None
        else progress_factory("sealing", sum(s.size for s in sources), len(sources))
    )
    (partial / OBJECTS_DIR).mkdir(parents=True)
    try:
        sealer = _Sealer(
            session, partial, archive_id=archive_id, dataset=dataset, site=site, progress=progress
        )
        entries = tuple(ordered_map(sealer.seal_one, list(enumerate(sources)), options.workers))
        manifest = Manifest(
            archive_id=archive_id,
            dataset=dataset,
            site=site,
            writer=session.holder.principal,
            created_at=int(time.time()),
            entries=entries,
        )
        canonical = manifest.canonical()
        signature = _sign(session, options.signing_key, key, canonical)
        _write_file(partial / MANIFEST_FILE, canonical)
        _write_file(partial / SIGNATURE_FILE, signature.canonical())
        _fsync_dir(partial / OBJECTS_DIR)
        _fsync_dir(partial)
        partial.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    return SealReport(
        out,
        archive_id,
        dataset,
        site,
        len(entries),
        manifest.total_bytes,
        time.monotonic() - started,
    )


class _Sealer:
    def __init__(
        self,
        session: MachineSession,
        partial: Path,
        *,
        archive_id: str,
        dataset: str,
        site: str,
        progress: Progress | None,
    ) -> None:
        self.session = session
        self.partial = partial
        self.archive_id = archive_id
        self.dataset = dataset
        self.site = site
        self.progress = progress

    def seal_one(self, item: tuple[int, Source]) -> Entry:
        index, source = item
        context = context_bytes(self.archive_id, self.dataset, self.site, source.path)
        answer = self.session.call(
            "POST",
            f"transit/datakey/plaintext/{self.dataset}",
            {"context": base64.b64encode(context).decode(), "bits": DATA_KEY_BYTES * 8},
        )["data"]
        data_key = bytearray(base64.b64decode(answer.pop("plaintext")))
        try:
            aad = associated_data(
                self.archive_id,
                dataset=self.dataset,
                site=self.site,
                index=index,
                path=source.path,
                size=source.size,
            )
            commitment = key_commitment(data_key, aad)
            digest, written = self._encrypt(StreamCipher(data_key), source, index, aad)
        finally:
            wipe(data_key)
        if self.progress is not None:
            self.progress.advance(0, 1)
        return Entry(
            index=index,
            path=source.path,
            size=source.size,
            sha256=digest,
            ciphertext_size=written,
            wrapped_key=str(answer["ciphertext"]),
            key_commitment=commitment,
        )

    def _encrypt(
        self, cipher: StreamCipher, source: Source, index: int, aad: bytes
    ) -> tuple[str, int]:
        digest = hashlib.sha256()
        read = 0
        target = self.partial / object_file(index)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            sink = CountingWriter(fd)
            with (
                source.file.open("rb") as plain,
                cipher.encrypting(cast("BinaryIO", sink), aad) as enc,
            ):
                while chunk := plain.read(READ_CHUNK):
                    read += len(chunk)
                    if read > source.size:
                        break
                    digest.update(chunk)
                    enc.write(chunk)
                    if self.progress is not None:
                        self.progress.advance(len(chunk))
            if read != source.size:
                raise BackupError(f"{source.file} changed while it was sealed: seal again")
            os.fsync(fd)
        finally:
            os.close(fd)
        return digest.hexdigest(), sink.count


def _sign(session: MachineSession, name: str, key: dict[str, Any], canonical: bytes) -> Signature:
    """Sign the manifest digest with the manifest key, then check it as a restore would."""
    key_type = str(key.get("type"))
    digest = manifest_digest(canonical)
    answer = session.call("POST", f"transit/sign/{name}", sign_request(digest, key_type))["data"]
    version = int(answer["key_version"])
    signature = Signature(name, version, digest.hex(), str(answer["signature"]))
    public = key["keys"][str(version)]["public_key"].encode()
    verify_signature(signature, canonical, public, key_type)
    return signature


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
