"""``ekms backup seal`` and ``ekms restore`` end to end, against a real server (SoftHSM, SQLite).

The world of ``test_access`` (officials, an operator, a security officer, a restore tool at the
embassy site ``embassy-1``) plus a backup writer and the manifest key. Each test seals a small
tree, then restores it with an approved request's credential, or tampers with the archive, or
asks with a credential the service would refuse, and checks the exit status, the message, and
that no plaintext was written where it must not be.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from api.backup.archive import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    STATE_DIR,
    Entry,
    Manifest,
    Reason,
    RefusedError,
    Signature,
    object_file,
    parse_manifest,
    parse_signature,
)
from api.backup.restore import HASH_THREAD_MIN_BYTES, RestoreOptions, _Hasher, restore
from api.backup.service import MachineSession, Service
from api.cli import main
from tests.integration.test_access import Party, World, file_restore, world  # noqa: F401
from tests.support.sites import SiteProcess, SiteSpec, bootstrap, data, provision, start_all

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LARGE = 3 * (1 << 20) + 12_345  # crosses Tink's 1 MiB segments


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the backup tools are clients; the stores are covered by test_access."""
    return f"sqlite:///{tmp_path / 'ekms.db'}"


@dataclass
class Backup:
    world: World
    writer: Party
    writer_key: Path
    tool_key: Path
    tmp: Path

    @property
    def url(self) -> str:
        return self.world.server.url

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    def seal(
        self, capsys: pytest.CaptureFixture[str], src: Path, out: Path, dataset: str = "laws"
    ) -> tuple[int, str, str]:
        return self.cli(
            capsys,
            "backup",
            "seal",
            str(src),
            "--dataset",
            dataset,
            "--site",
            "embassy-1",
            "--out",
            str(out),
            "--principal",
            self.writer.id,
            "--key",
            str(self.writer_key),
            "--quiet",
            "-address",
            self.url,
        )

    def restore(
        self, capsys: pytest.CaptureFixture[str], archive: Path, request: str, *extra: str
    ) -> tuple[int, str, str]:
        return self.cli(
            capsys,
            "restore",
            str(archive),
            "--request",
            request,
            "--principal",
            self.world.tool.id,
            "--key",
            str(self.tool_key),
            "--quiet",
            "-address",
            self.url,
            *extra,
        )

    def approved(self, datasets: list[str], **extra: Any) -> dict[str, Any]:
        request = file_restore(self.world, datasets, **extra)
        self.world.approve(self.world.officials[0], request)
        decided = self.world.approve(self.world.officials[1], request).json()["data"]
        assert decided["state"] == "approved"
        return decided

    def uses(self, request_id: str) -> int:
        view = self.world.call("GET", f"ekms/proposals/{request_id}", self.world.root).json()
        return int(view["data"]["uses"])

    def session(self, holder: Party) -> Iterator[MachineSession]:
        with Service(self.url) as service:
            yield MachineSession(service, holder, "embassy-kms/embassy-1")


@pytest.fixture
def backup(world: World, tmp_path: Path) -> Backup:  # noqa: F811 - the fixture imported above
    root = world.root
    created = world.call("POST", "transit/keys/backup-manifest", root, body={"type": "ecdsa-p256"})
    assert created.status_code == 200, created.text
    writer = Party.ec("backup-writer")
    officer = world.login(world.officer)
    registered = world.call(
        "POST",
        "ekms/principals/backup-writer",
        officer,
        body={"roles": ["backup-writer"], "jwk": writer.jwk},
    )
    assert registered.status_code == 200, registered.text
    keys = tmp_path / "keys"
    keys.mkdir()
    writer_key = keys / "writer.jwk"
    writer_key.write_text(json.dumps(writer.private_jwk()))
    tool_key = keys / "tool.pem"
    tool_key.write_bytes(world.tool.private_pem())
    return Backup(world, writer, writer_key, tool_key, tmp_path)


def make_tree(root: Path, seed: int = 0) -> Path:
    """Binary, empty, large, nested and non-ASCII names: what a registry export holds."""
    rng = __import__("random").Random(seed)
    (root / "gazette" / "2026").mkdir(parents=True)
    (root / "register").mkdir()
    (root / "gazette" / "2026" / "act-1.pdf").write_bytes(rng.randbytes(70_000))
    (root / "gazette" / "2026" / "act-2.pdf").write_bytes(rng.randbytes(1))
    (root / "gazette" / "empty.txt").write_bytes(b"")
    (root / "register" / "land.db").write_bytes(rng.randbytes(LARGE))
    (root / "register" / "tähtis määrus.txt").write_text("seadus\n" * 100)
    (root / "README").write_text("state gazette export\n")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and STATE_DIR not in p.parts
    }


def written(root: Path) -> list[str]:
    """Every file under ``root`` (the state directory's too): what a failed restore left."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def sealed(backup: Backup, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    src = make_tree(backup.tmp / "src")
    archive = backup.tmp / "laws.ekms"
    code, out, err = backup.seal(capsys, src, archive)
    assert code == 0, err
    assert "Sealed 6 objects" in out
    return src, archive


# --- round trip -----------------------------------------------------------------------------


def test_round_trip(backup: Backup, sealed: tuple[Path, Path], capsys: Any) -> None:
    src, archive = sealed
    manifest = parse_manifest((archive / MANIFEST_FILE).read_bytes())
    assert [e.path for e in manifest.entries] == sorted(tree(src), key=str.encode)
    assert manifest.dataset == "laws"
    assert manifest.site == "embassy-1"
    assert manifest.writer == "backup-writer"
    assert sorted(p.name for p in (archive / "objects").iterdir()) == [f"{n:08d}" for n in range(6)]
    # Nothing in the archive is plaintext.
    assert b"state gazette export" not in b"".join(
        p.read_bytes() for p in archive.rglob("*") if p.is_file()
    )

    request = backup.approved(["laws"], max_uses=6)
    target = backup.tmp / "restored"
    code, out, err = backup.restore(capsys, archive, request["id"], "--to", str(target))
    assert code == 0, err
    assert "Restored 6 objects" in out
    assert tree(target) == tree(src)
    assert not (target / STATE_DIR).exists()
    assert backup.uses(request["id"]) == 6
    assert (target / "register" / "land.db").stat().st_mode & 0o777 == 0o600

    records = backup.world.server.runtime.store.audit_records(10_000)
    datakeys = [r for r in records if r["operation"] == "transit.datakey"]
    assert len(datakeys) == 6
    assert {(r["principal"], r["decision"]) for r in datakeys} == {("backup-writer", "allow")}
    unwraps = [r for r in records if r["operation"] == "transit.decrypt"]
    assert unwraps, "the unwraps are audited"
    assert all(r["details"]["grant"] == request["id"] for r in unwraps)
    signed = [r for r in records if r["operation"] == "transit.sign"]
    assert [(r["principal"], r["key"]) for r in signed] == [("backup-writer", "backup-manifest")]

    # --verify-only checks the same archive and writes nothing; a second restore request
    # covers it (the first has spent its six uses).
    again = backup.approved(["laws"])
    code, out, err = backup.restore(capsys, archive, again["id"], "--verify-only")
    assert code == 0, err
    assert "Verified 6 objects" in out


def test_seal_refuses_what_it_cannot_restore_safely(
    backup: Backup, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_tree(backup.tmp / "src")
    (src / "link").symlink_to("/etc/passwd")
    code, _, err = backup.seal(capsys, src, backup.tmp / "a.ekms")
    assert code == 2
    assert "symbolic link" in err
    assert not (backup.tmp / "a.ekms").exists()
    assert not (backup.tmp / "a.ekms.partial").exists()

    (src / "link").unlink()
    wrong_site = backup.cli(
        capsys,
        "backup",
        "seal",
        str(src),
        "--dataset",
        "laws",
        "--site",
        "home",
        "--audience",
        "embassy-kms/embassy-1",
        "--out",
        str(backup.tmp / "b.ekms"),
        "--principal",
        "backup-writer",
        "--key",
        str(backup.writer_key),
        "-address",
        backup.url,
    )
    assert wrong_site[0] == 2
    assert "is site 'embassy-1'" in wrong_site[2]


# --- the backup-writer role --------------------------------------------------------------------


def test_backup_writer_makes_keys_and_signs_but_never_decrypts(
    backup: Backup, sealed: tuple[Path, Path]
) -> None:
    w = backup.world
    _, archive = sealed
    manifest = parse_manifest((archive / MANIFEST_FILE).read_bytes())
    entry = manifest.entries[0]
    with contextlib.contextmanager(backup.session)(backup.writer) as session:
        token = session.token()

    def writer(method: str, path: str, body: Any = None) -> int:
        url = f"{backup.url}/v1/{path}"
        return w.call(
            method, path, token, body=body, DPoP=backup.writer.proof(method, url, token)
        ).status_code

    context = manifest.context_b64(entry)
    unwrap = {"ciphertext": entry.wrapped_key, "context": context}
    assert writer("POST", "transit/datakey/wrapped/laws", {"context": context}) == 200
    assert writer("POST", "transit/decrypt/laws", unwrap) == 403
    assert writer("POST", "transit/decrypt/laws", {"batch_input": [unwrap]}) == 403
    assert writer("POST", "transit/rewrap/laws", unwrap) == 403
    assert writer("POST", "transit/encrypt/laws", {"plaintext": "aGk=", "context": context}) == 403
    assert writer("GET", "transit/keys/laws") == 403
    assert writer("GET", "transit/keys/backup-manifest") == 200
    assert writer("POST", "transit/datakey/plaintext/backup-manifest", {}) == 403
    other = w.call("POST", "transit/keys/release-signer", w.root, body={"type": "ed25519"})
    assert other.status_code == 200
    assert writer("POST", "transit/sign/release-signer", {"input": "aGk="}) == 403
    assert writer("POST", "transit/sign/backup-manifest", {"input": "aGk="}) == 200
    request = backup.approved(["laws"])
    assert writer("POST", f"ekms/proposals/{request['id']}/credential") == 403
    # Without its proof of possession, the writer's token is worth nothing.
    assert w.call("POST", "transit/datakey/wrapped/laws", token, body={}).status_code == 401

    # A writer is a machine identity: it takes no other role.
    officer = w.login(w.officer)
    mixed = w.call(
        "POST",
        "ekms/principals/backup-writer-2",
        officer,
        body={"roles": ["backup-writer", "restore-operator"], "jwk": Party.ec("x").jwk},
    )
    assert mixed.status_code == 400
    assert "machine identity" in mixed.json()["errors"][0]

    records = w.server.runtime.store.audit_records(10_000)
    denied = [
        r for r in records if r.get("principal") == "backup-writer" and r["decision"] == "deny"
    ]
    assert {r["operation"] for r in denied} >= {"transit.decrypt", "transit.rewrap", "transit.sign"}


# --- tampering ------------------------------------------------------------------------------


def _copy(archive: Path, name: str) -> Path:
    copy = archive.with_name(name)
    shutil.copytree(archive, copy)
    return copy


def _resign(backup: Backup, archive: Path, manifest: Manifest) -> None:
    """What only a writer (or root) can do: sign an altered manifest with the manifest key."""
    canonical = manifest.canonical()
    digest = manifest.digest()
    answer = backup.world.call(
        "POST",
        "transit/sign/backup-manifest",
        backup.world.root,
        body={"input": base64.b64encode(digest).decode(), "prehashed": True},
    ).json()["data"]
    (archive / MANIFEST_FILE).write_bytes(canonical)
    signature = Signature(
        "backup-manifest", answer["key_version"], digest.hex(), answer["signature"]
    )
    (archive / SIGNATURE_FILE).write_bytes(signature.canonical())


def test_each_tamper_case_is_detected_and_named(
    backup: Backup, sealed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, archive = sealed
    other_archive = backup.tmp / "other.ekms"
    make_tree(backup.tmp / "other-src", seed=0)  # the same shape and sizes as src
    assert backup.seal(capsys, backup.tmp / "other-src", other_archive)[0] == 0
    manifest = parse_manifest((archive / MANIFEST_FILE).read_bytes())
    by_path = {e.path: e for e in manifest.entries}
    large = by_path["register/land.db"]
    act1, act2 = by_path["gazette/2026/act-1.pdf"], by_path["gazette/2026/act-2.pdf"]
    request = backup.approved(["laws"])

    def edit_byte(copy: Path) -> None:
        path = copy / large.file
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    def truncate(copy: Path) -> None:
        path = copy / large.file
        path.write_bytes(path.read_bytes()[: -(1 << 20)])

    def truncate_at_segment(copy: Path) -> None:
        """Keep the first segment only, and re-sign a manifest whose size and hash match what
        it decrypts to: only the AEAD's last-segment flag and associated data can tell."""
        path = copy / large.file
        cut = path.read_bytes()[: 1 << 20]
        path.write_bytes(cut)
        first = (src / large.path).read_bytes()[: (1 << 20) - 40 - 16]
        shorter = Entry(
            **{
                **large.__dict__,
                "ciphertext_size": len(cut),
                "size": len(first),
                "sha256": hashlib.sha256(first).hexdigest(),
            }
        )
        entries = tuple(shorter if e is large else e for e in manifest.entries)
        _resign(backup, copy, Manifest(**{**manifest.__dict__, "entries": entries}))

    def swap(copy: Path) -> None:
        one, two = copy / act1.file, copy / act2.file
        a, b = one.read_bytes(), two.read_bytes()
        one.write_bytes(b)
        two.write_bytes(a)

    def swap_same_size(copy: Path) -> None:
        """Two objects swapped with their manifest sizes: the associated data still differs."""
        entries = list(manifest.entries)
        i, j = act1.index, act2.index
        entries[i], entries[j] = (
            Entry(**{**entries[j].__dict__, "index": i}),
            Entry(**{**entries[i].__dict__, "index": j}),
        )
        one, two = copy / act1.file, copy / act2.file
        a, b = one.read_bytes(), two.read_bytes()
        one.write_bytes(b)
        two.write_bytes(a)
        entries[i] = Entry(**{**entries[i].__dict__, "path": act1.path})
        entries[j] = Entry(**{**entries[j].__dict__, "path": act2.path})
        _resign(backup, copy, Manifest(**{**manifest.__dict__, "entries": tuple(entries)}))

    def replace_manifest(copy: Path) -> None:
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            shutil.copyfile(other_archive / name, copy / name)

    def replay_object(copy: Path) -> None:
        shutil.copyfile(other_archive / large.file, copy / large.file)

    def edit_manifest(copy: Path) -> None:
        raw = (copy / MANIFEST_FILE).read_bytes()
        (copy / MANIFEST_FILE).write_bytes(raw.replace(large.sha256.encode(), b"0" * 64))

    def remove_object(copy: Path) -> None:
        (copy / act2.file).unlink()

    def add_object(copy: Path) -> None:
        entries = (*manifest.entries, Entry(**{**act1.__dict__, "index": 6, "path": "new.pdf"}))
        shutil.copyfile(copy / act1.file, copy / object_file(6))
        _resign(backup, copy, Manifest(**{**manifest.__dict__, "entries": entries}))

    def reorder(copy: Path) -> None:
        raw = json.loads((copy / MANIFEST_FILE).read_bytes())
        raw["objects"][0], raw["objects"][1] = raw["objects"][1], raw["objects"][0]
        (copy / MANIFEST_FILE).write_bytes(json.dumps(raw, separators=(",", ":")).encode())

    cases = {
        "edit a byte": (edit_byte, large.path),
        "truncate": (truncate, large.path),
        "truncate at a segment, re-signed": (truncate_at_segment, large.path),
        "swap two objects": (swap, act1.path),
        "swap two objects, re-signed": (swap_same_size, act1.path),
        "replace the manifest": (replace_manifest, None),
        "replay an object from another archive": (replay_object, large.path),
        "edit the manifest": (edit_manifest, None),
        "remove an object": (remove_object, act2.path),
        "add an object, re-signed": (add_object, "new.pdf"),
        "reorder the manifest": (reorder, None),
    }
    for n, (name, (tamper, named)) in enumerate(cases.items()):
        copy = _copy(archive, f"tampered-{n}.ekms")
        tamper(copy)
        target = backup.tmp / f"out-{n}"
        code, _, err = backup.restore(capsys, copy, request["id"], "--to", str(target))
        assert code == 1, (name, err)
        assert "INTEGRITY FAILURE" in err, (name, err)
        if named is not None:
            assert f"object {named}" in err, (name, err)
        bad = None if named is None else src / named
        for path, content in tree(target).items():
            # Whatever was written is genuine: the bad object never got its final name.
            assert (src / path).read_bytes() == content, (name, path)
            assert bad is None or src / path != bad
        verify = backup.restore(capsys, copy, request["id"], "--verify-only")
        assert verify[0] == 1, (name, verify[2])


# --- refusals -------------------------------------------------------------------------------


class ShiftedClock:
    """The service's clock, an hour on."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


def test_refused_credentials_write_nothing(
    backup: Backup,
    sealed: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, archive = sealed
    w = backup.world

    def refused(request_id: str, reason: str) -> None:
        target = backup.tmp / f"out-{reason}"
        code, _, err = backup.restore(capsys, archive, request_id, "--to", str(target))
        assert code == 2, err
        assert f"refused: {reason}:" in err, err
        assert written(target) == [], (reason, written(target))
        verify = backup.restore(capsys, archive, request_id, "--verify-only")
        assert verify[0] == 2
        assert f"refused: {reason}:" in verify[2]

    # A dataset the credential does not cover.
    registry = backup.approved(["registry"])
    refused(registry["id"], "out-of-scope")
    assert backup.uses(registry["id"]) == 0

    # Another site's request.
    elsewhere = backup.approved(["laws"], site="embassy-2")
    refused(elsewhere["id"], "wrong-site")

    # Fewer uses left than objects: refused before any unwrap, so nothing is spent.
    short = backup.approved(["laws"], max_uses=5)
    refused(short["id"], "uses-exhausted")
    assert backup.uses(short["id"]) == 0

    # Not yet approved, and revoked.
    pending = file_restore(w, ["laws"])
    refused(pending["id"], "not-approved")
    revoked = backup.approved(["laws"])
    officer = w.login(w.officer)
    assert w.call("POST", f"ekms/proposals/{revoked['id']}/revoke", officer).status_code == 200
    refused(revoked["id"], "revoked")

    # Confidential data at an embassy without an emergency: the service's policy refuses the
    # unwrap itself; the tool says so, and nothing is written.
    secret_src = make_tree(backup.tmp / "registry-src", seed=3)
    registry_archive = backup.tmp / "registry.ekms"
    assert backup.seal(capsys, secret_src, registry_archive, dataset="registry")[0] == 0
    target = backup.tmp / "out-policy"
    code, _, err = backup.restore(capsys, registry_archive, registry["id"], "--to", str(target))
    assert code == 2
    assert "refused: denied:" in err
    assert "request_id" in err
    assert written(target) == []

    # After the request's window: the service's clock and the tool's move an hour on.
    expiring = backup.approved(["laws"], ttl=600)
    w.server.runtime.access._clock = ShiftedClock(3600)
    target = backup.tmp / "out-expired"
    with Service(backup.url) as service:
        late = MachineSession(
            service, w.tool, "embassy-kms/embassy-1", clock=ShiftedClock(3600).now
        )
        with pytest.raises(RefusedError) as refusal:
            restore(archive, RestoreOptions(expiring["id"], target), late)
    assert refusal.value.reason is Reason.EXPIRED
    assert refusal.value.status == 403
    assert written(target) == []


# --- interruption and resume ----------------------------------------------------------------


def test_interrupted_restore_resumes_without_respending(
    backup: Backup, sealed: tuple[Path, Path]
) -> None:
    src, archive = sealed
    request = backup.approved(["laws"], max_uses=9)
    target = backup.tmp / "resumed"
    options = RestoreOptions(request["id"], target, batch_size=2, workers=1)
    finished: list[str] = []

    def interrupt_after_three(entry: Entry) -> None:
        finished.append(entry.path)
        if len(finished) == 3:
            raise KeyboardInterrupt

    tool = contextlib.contextmanager(backup.session)
    with pytest.raises(KeyboardInterrupt), tool(backup.world.tool) as session:
        restore(archive, options, session, on_object=interrupt_after_three)
    # The object a worker had started when the interrupt came may be finished too.
    done = len(tree(target))
    assert 3 <= done < 6
    journal = (target / STATE_DIR / "journal").read_text().split()
    assert journal == [str(n) for n in range(done)]
    assert backup.uses(request["id"]) == 6  # every key was unwrapped before any file
    # A half-written object from the interrupted run never has a final name; it is swept.
    (target / STATE_DIR / "tmp" / "00000005").write_bytes(b"half")

    with tool(backup.world.tool) as session:
        report = restore(archive, options, session)
    assert (report.skipped, report.unwrapped) == (done, 6 - done)
    assert tree(target) == tree(src)
    assert backup.uses(request["id"]) == 6 + 6 - done
    assert not (target / STATE_DIR).exists()

    # A third run finds everything in place, re-verified, and spends nothing.
    with tool(backup.world.tool) as session:
        again = restore(archive, options, session)
    assert (again.skipped, again.unwrapped) == (6, 0)
    assert backup.uses(request["id"]) == 6 + 6 - done


def test_existing_file_that_differs_is_not_overwritten(
    backup: Backup, sealed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, archive = sealed
    request = backup.approved(["laws"])
    target = backup.tmp / "occupied"
    (target / "gazette").mkdir(parents=True)
    (target / "gazette" / "empty.txt").write_text("someone else's")
    code, _, err = backup.restore(capsys, archive, request["id"], "--to", str(target))
    assert code == 2
    assert "refusing to overwrite" in err
    assert (target / "gazette" / "empty.txt").read_text() == "someone else's"


# --- one large object: hashed in a second thread ----------------------------------------------


def test_a_lone_large_object_borrows_the_idle_worker_and_keeps_every_check(
    backup: Backup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing else to restore, the idle worker hashes the object while Tink decrypts its
    next segment (ADR 0009): the AEAD, size and SHA-256 checks and the atomic write hold."""
    src = backup.tmp / "dump"
    src.mkdir()
    content = os.urandom(HASH_THREAD_MIN_BYTES + 12_345)
    (src / "registry.dump").write_bytes(content)
    archive = backup.tmp / "dump.ekms"
    assert backup.seal(capsys, src, archive)[0] == 0
    manifest = parse_manifest((archive / MANIFEST_FILE).read_bytes())
    (big,) = manifest.entries
    lent: list[str] = []
    in_thread = _Hasher.in_thread

    def spy(hasher: _Hasher) -> None:
        lent.append("lent")
        in_thread(hasher)

    monkeypatch.setattr(_Hasher, "in_thread", spy)
    request = backup.approved(["laws"])

    target = backup.tmp / "dump-out"
    code, _, err = backup.restore(
        capsys, archive, request["id"], "--to", str(target), "--workers", "2"
    )
    assert code == 0, err
    assert tree(target) == {"registry.dump": content}
    assert lent == ["lent"]
    code, _, err = backup.restore(capsys, archive, request["id"], "--verify-only", "--workers", "1")
    assert code == 0, err
    assert lent == ["lent"]  # --workers 1 is one thread

    def flip_a_byte_late(copy: Path) -> None:
        path = copy / big.file
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))

    def sign_another_hash(copy: Path) -> None:
        """The ciphertext is genuine and authenticates: only the content hash can tell."""
        other = Entry(**{**big.__dict__, "sha256": hashlib.sha256(b"other").hexdigest()})
        _resign(backup, copy, Manifest(**{**manifest.__dict__, "entries": (other,)}))

    cases = (
        (flip_a_byte_late, "ciphertext does not authenticate"),
        (sign_another_hash, "content hash does not match the manifest"),
    )
    for n, (tamper, message) in enumerate(cases):
        copy = _copy(archive, f"dump-{n}.ekms")
        tamper(copy)
        for extra in (("--to", str(backup.tmp / f"dump-bad-{n}")), ("--verify-only",)):
            code, _, err = backup.restore(capsys, copy, request["id"], *extra, "--workers", "2")
            assert code == 1, err
            assert f"object registry.dump: {message}" in err
        assert written(backup.tmp / f"dump-bad-{n}") == []
    assert len(lent) == 1 + 2 * len(cases)
    assert not [t for t in threading.enumerate() if t.name == "ekms-restore-hash"]

    code, _, err = backup.restore(capsys, archive, request["id"], "--verify-only", "--workers", "0")
    assert code == 2
    assert "--workers must be between 1 and" in err


# --- paths never escape --to -----------------------------------------------------------------


def test_paths_never_escape_the_target(
    backup: Backup, sealed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, archive = sealed
    manifest = parse_manifest((archive / MANIFEST_FILE).read_bytes())
    request = backup.approved(["laws"])
    outside = backup.tmp / "outside"
    outside.mkdir()

    # A signed manifest naming ../ or an absolute path is refused before anything happens.
    for n, evil in enumerate(("../outside/pwned", "/tmp/pwned", "a/../../pwned")):
        copy = _copy(archive, f"evil-{n}.ekms")
        entries = (Entry(**{**manifest.entries[0].__dict__, "path": evil}), *manifest.entries[1:])
        _resign(backup, copy, Manifest(**{**manifest.__dict__, "entries": entries}))
        target = backup.tmp / f"evil-out-{n}"
        code, _, err = backup.restore(capsys, copy, request["id"], "--to", str(target))
        assert code == 1, err
        assert "path" in err
        assert written(target) == []
    assert written(outside) == []

    # A symlink planted in the target directory is never followed.
    target = backup.tmp / "planted"
    target.mkdir()
    (target / "register").symlink_to(outside, target_is_directory=True)
    code, _, err = backup.restore(capsys, archive, request["id"], "--to", str(target))
    assert code == 2
    assert "symbolic link" in err
    assert written(outside) == []


def test_sealed_entries_resist_path_tricks_at_parse() -> None:
    """The same rules, with no server: see tests/unit/test_backup_format.py for the table."""
    from api.backup.archive import IntegrityError, validate_path

    for evil in ("..", "../x", "/abs", "a//b", "a/./b", f"{STATE_DIR}/journal", "a\\b", "a\x1bb"):
        with pytest.raises(IntegrityError):
            validate_path(evil)


def test_manifest_signature_is_checked_against_the_service_key(
    backup: Backup, sealed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest signed by another manifest-named key is refused unless pinned on purpose."""
    _, archive = sealed
    request = backup.approved(["laws"])
    signature = parse_signature((archive / SIGNATURE_FILE).read_bytes())
    code, _, err = backup.restore(
        capsys,
        archive,
        request["id"],
        "--verify-only",
        "--signing-key",
        "backup-manifest-other",
    )
    assert code == 1
    assert f"signed by key {signature.key!r}" in err
    code, _, err = backup.restore(
        capsys, archive, request["id"], "--verify-only", "--archive-id", "0" * 32
    )
    assert code == 1
    assert "not the expected" in err


# --- another site, after a failover (issue 6) ---------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_restore_at_another_site_after_failover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sealed at home; home is lost; restored at the embassy once the officials fail over.

    Two real server processes (``tests.support.sites``): a site's SoftHSM token cannot share
    a process with another's. The embassy is provisioned from home's domain backup before the
    loss. The manifest was signed at home, by a key that never leaves home's HSM: its public
    versions reached the embassy with the backup (verify-only), so the tool verifies the
    manifest with the service's key there as it would at home.
    """
    monkeypatch.delenv("EKMS_AUDIENCE", raising=False)
    officials = [Party.ec(f"official-{n}") for n in range(3)]
    officer, operator = Party.ec("officer"), Party.ec("operator")
    tool, writer = Party.ed("restore-tool"), Party.ec("backup-writer")
    home = SiteProcess(SiteSpec("home", "home", tmp_path / "home"))
    embassy = SiteProcess(SiteSpec("embassy", "embassy", tmp_path / "embassy"))
    try:
        start_all([home, embassy])
        shares, root = bootstrap(
            home,
            officials=officials,
            officer=officer,
            others={
                "restore-operator": [operator],
                "restore-tool": [tool],
                "backup-writer": [writer],
            },
        )
        token = home.login(officer)
        data(home.call("POST", "transit/keys/laws", token, {"classification": "internal"}))
        data(home.call("POST", "transit/keys/backup-manifest", token, {"type": "ecdsa-p256"}))
        writer_key, tool_key = tmp_path / "writer.jwk", tmp_path / "tool.pem"
        writer_key.write_text(json.dumps(writer.private_jwk()))
        tool_key.write_bytes(tool.private_pem())

        src = make_tree(tmp_path / "src")
        archive = tmp_path / "laws.ekms"
        code, _, err = run_cli(
            capsys,
            *("backup", "seal", src, "--dataset", "laws", "--site", "home", "--out", archive),
            *("--principal", writer.id, "--key", writer_key, "--quiet", "-address", home.url),
        )
        assert code == 0, err
        home.register_site(root, embassy)
        home_key = data(home.call("GET", "transit/keys/backup-manifest", token))["keys"]["1"]
        provision(home, token, embassy, shares[1:])
        home.destroy()
        there = data(embassy.call("GET", "transit/keys/backup-manifest", embassy.login(officer)))
        assert there["keys"]["1"]["public_key"] == home_key["public_key"]

        payload = {
            "datasets": ["laws"],
            "reason": "disaster-recovery",
            "justification": "home site lost",
            "tool": tool.id,
            "ttl": 600,
        }
        request = data(embassy.propose(operator, "restore", payload))
        assert request["payload"]["site"] == "embassy"
        for official in officials[:2]:
            data(embassy.approve(official, request))

        def restore_at_embassy(target: Path) -> tuple[int, str, str]:
            return run_cli(
                capsys,
                *("restore", archive, "--request", request["id"], "--to", target),
                *("--principal", tool.id, "--key", tool_key, "--audience", embassy.audience),
                *("--quiet", "-address", embassy.url),
            )

        # A standby embassy serves no key operation: refused, with nothing written.
        early = tmp_path / "too-early"
        code, _, err = restore_at_embassy(early)
        assert code == 2, err
        assert "refused: wrong-site: this site is standby" in err
        assert written(early) == []

        embassy.decided(
            "site-failover", {"previous": "home", "justification": "home site lost"}, officials
        )
        target = tmp_path / "restored"
        code, out, err = restore_at_embassy(target)
        assert code == 0, err
        assert "Restored 6 objects" in out
        assert "sealed at site home" in out
        assert tree(target) == tree(src)
        unwraps = embassy.records(embassy.login(officer), "transit.decrypt")
        assert unwraps
        assert {(r["principal"], r["details"]["grant"]) for r in unwraps} == {
            (tool.id, request["id"])
        }
    finally:
        for site in (home, embassy):
            site.stop()
