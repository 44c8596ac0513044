"""The security-domain backup at a site: export, load, import at first unseal, refresh.

``api.routes_domain`` serves these over HTTP (``/v1/ekms/domain``); ``Runtime.open_barrier``
calls ``prepare_import`` and ``finish_import``. No FastAPI here, so the supervisor process that
runs the custodian never loads it. See docs/adr/0012 §4, §5.

- ``POST export {"target_site": NAME}`` (root or a security officer, unsealed): the signed,
  MACed document for a registered site, with the KEKs its kind may ever hold.
- ``POST load`` (the document; no token, like ``sys/init``): on a new node only. The node
  takes the backup's share set and keeps the backup; it is then initialised and sealed.
- ``POST import`` (the document; root or a security officer, unsealed): refresh a site with
  a newer backup of its own domain; only what it lacks is added.

The import of a loaded backup runs at the first unseal, in ``Runtime.open_barrier`` of each
worker process, before the process serves: ``prepare_import`` (before the HSM login: the
MAC, then the token taken from its transport PINs) and ``finish_import`` (after it: the keys,
principals and sites, under a store-wide claim so one worker or node imports while the
others wait). A failure leaves the node sealed with the cause in the message, and the next
unseal resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from api.audit_log import AUDIT_SIGNING_KEY
from kms import domain_backup
from kms.audit import AuditRecord
from kms.errors import (
    BackendError,
    ConflictError,
    EkmsError,
    InvalidRequestError,
    StorageError,
)
from kms.keyring import set_name
from kms.policy import Site, SiteKind
from kms.sealed_values import SECURITY_DOMAIN_KEY
from kms.sites import SiteBackend, SiteRecord, SiteStatus, parse_url

if TYPE_CHECKING:
    from api.runtime import Runtime
    from kms.derivation import RootKeys
    from kms.domain_backup import DomainBackup, ImportReport

log = logging.getLogger("ekms.domain")

# A claim older than this belonged to a worker or node that died mid-import.
CLAIM_STALE_AFTER = 300.0
# How long an unseal waits for another worker or node that is importing the same backup.
CLAIM_WAIT = 120.0
_AUDITED_VERSIONS = 200  # version names listed in an audit record; the count is always there


def _here(runtime: Runtime) -> Site:
    return Site(runtime.settings.site_name, SiteKind(runtime.settings.site_kind))


# --- export -----------------------------------------------------------------------------


def export_backup(runtime: Runtime, target_name: str) -> tuple[DomainBackup, list[str]]:
    """The backup for ``target_name`` and why keys were left out; the barrier must be open."""
    root_keys = runtime.barrier.require_open()
    target = runtime.sites.get(target_name)
    if target.name == runtime.settings.site_name:
        raise InvalidRequestError("the target is this site: export for another site")
    if target.status is SiteStatus.RETIRED:
        raise ConflictError(f"site {target.name!r} is retired: it receives no keys")
    store = runtime.store
    descriptor = store.get_share_set()
    sealed_sdk = store.sealed_value(SECURITY_DOMAIN_KEY)
    if descriptor is None or sealed_sdk is None:
        raise StorageError("this site holds no share set or no security-domain key to export")
    policies = [p for p in map(store.get_policy, store.list_names()) if p is not None]
    chosen, skipped = domain_backup.select_keys(
        policies,
        target.kind,
        runtime.settings.restore_matrix,
        escrow_opens=lambda p, v: runtime.keys.escrow_opens(p.name, p.key_type, v),
    )
    # The latest head covers the log up to this export; its key signs the document.
    if runtime.audit_log.sign_if_grown() is None and runtime.audit_log.public_key() is None:
        runtime.audit_log.sign_head()
    audit_key = runtime.audit_log.public_key()
    if audit_key is None:
        raise StorageError("this site has no audit signing key to sign the backup with")
    # This site's row may predate its audit key (made by the head just signed): the target
    # verifies this site's later heads with the key the row carries (§7).
    runtime.sites.refresh_audit_key(audit_key.to_json())
    signer = runtime.keys.policy(AUDIT_SIGNING_KEY)
    backup = domain_backup.build(
        backup_id=str(uuid.uuid4()),
        created_at=runtime.clock.now(),
        source=_here(runtime),
        target=Site(target.name, target.kind),
        descriptor=descriptor,
        members=store.share_members(set_name(descriptor)),
        domain_key=sealed_sdk,
        keys=chosen,
        principals=store.list_principals(),
        sites=runtime.sites.sites(),
        audit_key=audit_key,
        tree_head=store.tree_head(),
        root_keys=root_keys,
        sign=lambda data: runtime.keys.sign_jws(signer, data)[0],
    )
    return backup, skipped


# --- load ---------------------------------------------------------------------------------


def load_backup(runtime: Runtime, document: dict[str, Any]) -> DomainBackup:
    """Check the document and make this new node the target: its share set, the pending
    import. Nothing secret is needed, and nothing is trusted until the MAC verifies."""
    if runtime.store.is_initialised():
        raise ConflictError(
            "this node is initialised already: a domain backup is loaded only on a new node "
            "(refresh an initialised site with POST /v1/ekms/domain/import)"
        )
    backup = domain_backup.parse(document)
    domain_backup.check_target(backup, _here(runtime), runtime.settings.restore_matrix)
    settings = runtime.settings
    if settings.backend == "pkcs11" and not Path(settings.transport_pin_file).exists():
        raise ConflictError(
            f"the HSM token is not on its transport PINs ({settings.transport_pin_file} is "
            "missing): a domain backup is loaded on a new node with a new token"
        )
    runtime.store.load_domain(
        backup.descriptor,
        backup.members,
        orjson.dumps(backup.document).decode(),
        runtime.clock.now(),
    )
    return backup


# --- import at the first unseal (Runtime.open_barrier) ------------------------------------


def prepare_import(runtime: Runtime, keys: RootKeys) -> DomainBackup | None:
    """Before this process logs in: the loaded backup, MAC-checked, and the token taken over.

    The MAC comes first, so a document altered after export changes nothing, not even the
    token's PINs.
    """
    text = runtime.store.pending_domain_import()
    if text is None:
        return None
    try:
        try:
            backup = domain_backup.parse(orjson.loads(text))
            domain_backup.verify_mac(backup, keys)
        except (InvalidRequestError, orjson.JSONDecodeError) as exc:
            raise BackendError(
                f"the quorum is right, but the loaded domain backup is refused: {exc}. Nothing "
                "was imported and the node stays sealed. Start this node over (a new data "
                "directory and token) and load a backup exported for it"
            ) from None
        _take_token(runtime, keys)
    except BaseException:
        keys.wipe()  # the barrier never took them
        raise
    return backup


def _take_token(runtime: Runtime, keys: RootKeys) -> None:
    """A new PKCS#11 token goes from its transport PINs to the derived ones, once.

    The transport file is the lock: the first worker holds it while it changes the PINs and
    deletes it; the others wait, then find it gone and log in with the derived PIN.
    """
    if runtime.settings.backend != "pkcs11":
        return
    transport = Path(runtime.settings.transport_pin_file)
    try:
        fd = os.open(transport, os.O_RDONLY)
    except FileNotFoundError:
        return  # taken over already, by another worker or an earlier unseal
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if transport.exists():
            runtime.provisioner.take_ownership(
                keys.pin_text(keys.hsm_user_pin), keys.pin_text(keys.hsm_so_pin)
            )
    finally:
        os.close(fd)


def finish_import(runtime: Runtime, backup: DomainBackup | None) -> None:
    """After this process logged in: import the loaded backup, or open the domain key.

    On failure the process is sealed again and the cause reported; versions imported so far
    stay, and the next unseal resumes.
    """
    if backup is None:
        try:
            runtime.keys.open_domain_key(create=True)
        except StorageError as exc:  # decryption still works; making keys and exports do not
            log.error("the security-domain key is unusable: %s", exc)
        return
    try:
        _import_claimed(runtime, backup)
    except EkmsError as exc:
        runtime.seal_process()
        raise BackendError(
            f"the quorum is right, but importing the domain backup {backup.backup_id} failed: "
            f"{exc}. The node stays sealed; what was imported stays, and the next unseal "
            "resumes"
        ) from exc
    except BaseException:
        runtime.seal_process()
        raise


def _claim(runtime: Runtime, holder: str, *, wait: float) -> bool:
    """The store-wide import claim; False if the loaded backup was imported meanwhile."""
    deadline = time.monotonic() + wait
    while not runtime.store.claim_domain_import(holder, runtime.clock.now(), CLAIM_STALE_AFTER):
        if runtime.store.pending_domain_import() is None:
            return False
        if time.monotonic() > deadline:
            raise ConflictError("another worker or node is importing a domain backup; retry")
        time.sleep(0.2)
    return True


def _holder(runtime: Runtime) -> str:
    return f"{runtime.settings.node_name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def _import_claimed(runtime: Runtime, backup: DomainBackup) -> None:
    holder = _holder(runtime)
    if not _claim(runtime, holder, wait=CLAIM_WAIT):
        runtime.keys.open_domain_key(create=False)
        return
    finished = False
    try:
        if runtime.store.pending_domain_import() is None:  # finished just before our claim
            runtime.keys.open_domain_key(create=False)
            return
        settings = runtime.settings
        now = runtime.clock.now()
        here = SiteRecord(
            name=settings.site_name,
            kind=SiteKind(settings.site_kind),
            backend=SiteBackend(settings.backend),
            status=SiteStatus.STANDBY,
            registered_at=now,
            updated_at=now,
            url=parse_url(settings.public_url),
            note=f"loaded from domain backup {backup.backup_id} of site {backup.source.name}",
        )
        report = domain_backup.import_backup(
            backup,
            root_keys=runtime.barrier.require_open(),
            keys=runtime.keys,
            store=runtime.store,
            here=here,
            initial=True,
        )
        runtime.audit.write_now(
            AuditRecord(
                time=runtime.clock.now(),
                request_id=str(uuid.uuid4()),
                node=settings.node_name,
                operation="domain.import",
                decision="allow",
                status=200,
                details=import_details(backup, report, at="first unseal"),
            )
        )
        finished = True
    finally:
        runtime.store.release_domain_import(holder, finished=finished)
    log.warning(
        "imported domain backup %s of site %s: %d key versions",
        backup.backup_id,
        backup.source.name,
        len(report.imported),
    )


def import_details(backup: DomainBackup, report: ImportReport, *, at: str) -> dict[str, Any]:
    result = report.to_json()
    listed = result.pop("imported")
    return {
        **backup.summary(),
        **result,
        "imported": listed[:_AUDITED_VERSIONS],
        "at": at,
        "source_tree_head": backup.head_json(),
    }


def refresh_backup(runtime: Runtime, document: dict[str, Any]) -> tuple[DomainBackup, ImportReport]:
    """A newer backup of this site's own domain and share set: add what this site lacks."""
    backup = domain_backup.parse(document)
    domain_backup.check_target(backup, _here(runtime), runtime.settings.restore_matrix)
    current = runtime.store.get_share_set()
    theirs = backup.descriptor
    if current is None or (current.identifier, current.generation, current.verifier) != (
        theirs.identifier,
        theirs.generation,
        theirs.verifier,
    ):
        raise ConflictError(
            f"the backup is of share set {theirs.identifier} (generation {theirs.generation}), "
            "not the one in force here: provision this site again from a new backup (load it "
            "on a new node)"
        )
    holder = _holder(runtime)
    if not runtime.store.claim_domain_import(holder, runtime.clock.now(), CLAIM_STALE_AFTER):
        raise ConflictError("another domain import is running on this site; retry")
    try:
        report = domain_backup.import_backup(
            backup,
            root_keys=runtime.barrier.require_open(),
            keys=runtime.keys,
            store=runtime.store,
            here=runtime.sites.get(runtime.settings.site_name),
            initial=False,
        )
    finally:
        runtime.store.release_domain_import(holder, finished=False)
    return backup, report
