"""The object graph of one worker process: store, HSM backend, barrier, services, audit.

``create_runtime`` is the one place where adapters meet the core. Nothing here is a module-level
singleton, so tests build as many runtimes as they need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from api.audit_log import AuditLog
from api.audit_writer import AuditWriter
from api.domain_service import finish_import, prepare_import
from api.settings import ConfigError, Settings, prepare_softhsm_environment, softhsm_conf_path
from hsm.pins import TokenPins
from hsm.pkcs11_backend import Pkcs11Backend
from hsm.softhsm import TransportPinProvisioner, create_token, find_module, write_config
from hsm.transit_backend import TransitBackend, TransitConfig, TransitLogin
from kms.access import AccessConfig, AccessService
from kms.policy import Site, SiteKind
from kms.ports import SystemClock, SystemRandom
from kms.review_service import ReviewService
from kms.seal import (
    Barrier,
    Custodian,
    InitResult,
    NoToken,
    SealStatus,
    TokenProvisioner,
    initialise,
)
from kms.service import KeyService
from kms.sites import SiteBackend, SiteRegistry
from storage.sql_store import SqlStore

if TYPE_CHECKING:
    from kms.derivation import RootKeys
    from kms.ports import KeyBackend
    from kms.rekey import PinChanger, RekeyPlan, RekeyStatus
    from kms.root_generation import RootGenerationStatus

log = logging.getLogger("ekms.runtime")


class SealControl(Protocol):
    """What the HTTP layer needs from the node's custodian (local, or the supervisor's)."""

    def status(self) -> SealStatus: ...
    def submit(self, mnemonic: str) -> SealStatus: ...
    def reset(self) -> SealStatus: ...
    def seal(self) -> SealStatus: ...
    def root_generation_status(self) -> RootGenerationStatus: ...
    def start_root_generation(self, otp: str | None) -> RootGenerationStatus: ...
    def submit_root_share(self, mnemonic: str, nonce: str) -> RootGenerationStatus: ...
    def cancel_root_generation(self) -> RootGenerationStatus: ...
    def rekey_status(self) -> RekeyStatus: ...
    def start_rekey(self, plan: RekeyPlan) -> RekeyStatus: ...
    def submit_rekey_share(self, mnemonic: str, nonce: str) -> RekeyStatus: ...
    def submit_rekey_verification(self, mnemonic: str, nonce: str) -> RekeyStatus: ...
    def reset_rekey_verification(self) -> RekeyStatus: ...
    def cancel_rekey(self) -> RekeyStatus: ...


@dataclass
class Runtime:
    settings: Settings
    store: SqlStore
    backend: KeyBackend
    barrier: Barrier
    keys: KeyService
    access: AccessService
    review: ReviewService
    audit: AuditWriter
    audit_log: AuditLog
    sites: SiteRegistry
    provisioner: TokenProvisioner
    clock: SystemClock = field(default_factory=SystemClock)
    random: SystemRandom = field(default_factory=SystemRandom)
    seal_control: SealControl | None = None
    pins: PinChanger | None = None
    transit_login: TransitLogin | None = None  # a transit site's sealed credential

    def initialise(self, threshold: int, shares: int, root_token: str | None = None) -> InitResult:
        return initialise(
            threshold=threshold,
            shares=shares,
            store=self.store,
            provisioner=self.provisioner,
            clock=self.clock,
            random=self.random,
            allow_single_share=self.settings.dev,
            root_token=root_token,
        )

    def open_barrier(self, keys: RootKeys) -> None:
        """Open this process, finish what a crash interrupted, and register this site.

        A site with no row in its own registry registers itself ``active`` (``kms.sites``);
        one loaded from a domain backup has its ``standby`` row already.
        """
        # A loaded domain backup is imported before the process serves (docs/adr/0012 §5).
        pending = prepare_import(self, keys)
        self.barrier.open(keys)
        finish_import(self, pending)
        report = self.keys.reconcile()
        if report.discarded or report.deleted:
            log.warning(
                "finished interrupted key changes: %d half-made versions undone, %d deletions "
                "completed",
                len(report.discarded),
                len(report.deleted),
            )
        if report.unknown_objects:
            log.warning(
                "the HSM holds %d key objects that the registry does not name: was the database "
                "restored from an older backup? They are kept; see docs/operations.md",
                report.unknown_objects,
            )
        audit_key = self.audit_log.public_key()
        self.sites.ensure_own(None if audit_key is None else audit_key.to_json())

    def replace_keys(self, keys: RootKeys) -> None:
        """A rekey committed: keep this process's HSM login, take the new set's keys."""
        self.barrier.replace(keys)

    def seal_process(self) -> None:
        """Close this process's barrier and forget every token verified while it was open."""
        self.barrier.close()
        self.access.forget_verified()

    def close(self) -> None:
        self.audit.close()
        self.seal_process()
        self.store.dispose()


def prepare_hsm(settings: Settings) -> str:
    """Make sure the token exists (SoftHSM: create it with transport PINs); returns the module.

    Runs before worker processes load the PKCS#11 library, which fixes its slot list at load.
    A transit site has no token: nothing to prepare, no module.
    """
    if settings.backend == "transit":
        return ""
    if settings.softhsm:
        write_config(softhsm_conf_path(settings).parent)
        prepare_softhsm_environment(settings)
        module = settings.pkcs11_module or find_module()
        store = SqlStore.open(settings.database_url)
        try:
            if not store.is_initialised():
                create_token(settings.token_label, Path(settings.transport_pin_file), module)
        finally:
            store.dispose()
        return module
    if not settings.pkcs11_module:
        raise ConfigError("pkcs11_module is required when softhsm = false")
    return settings.pkcs11_module


def transit_config(settings: Settings) -> TransitConfig:
    """Where a transit site's keys are; checked when the settings were loaded."""
    return TransitConfig(
        url=settings.transit_address,
        mount=settings.transit_mount,
        key_prefix=settings.transit_key_prefix,
        verify=settings.transit_ca_file or True,
        wrapping_key_sha256=settings.transit_wrapping_key_sha256 or None,
    )


def create_runtime(
    settings: Settings, *, module: str | None = None, run_migrations: bool = True
) -> Runtime:
    store = SqlStore.open(settings.database_url, run_migrations=run_migrations)
    clock, random = SystemClock(), SystemRandom()
    backend: KeyBackend
    provisioner: TokenProvisioner
    pins: PinChanger
    transit_login = None
    if settings.backend == "transit":
        backend = TransitBackend(transit_config(settings), random=random)
        transit_login = TransitLogin(
            store=store,
            random=random,
            credential_file=Path(settings.transit_credential_file),
            keep_file=settings.transit_credential_file_keep,
        )
        barrier = Barrier(backend, transit_login)
        provisioner = pins = NoToken()
    else:
        prepare_softhsm_environment(settings)
        module = module or settings.pkcs11_module or find_module()
        backend = Pkcs11Backend(module=module, token_label=settings.token_label)
        barrier = Barrier(backend)
        provisioner = TransportPinProvisioner(
            module=module,
            token_label=settings.token_label,
            transport_file=Path(settings.transport_pin_file),
            manage_so_pin=settings.manage_so_pin,
        )
        pins = TokenPins(
            module=module, token_label=settings.token_label, manage_so_pin=settings.manage_so_pin
        )
    keys = KeyService(backend=backend, store=store, barrier=barrier, clock=clock, random=random)
    sites = SiteRegistry(
        store=store,
        clock=clock,
        here=Site(settings.site_name, SiteKind(settings.site_kind)),
        backend=SiteBackend(settings.backend),
        keys=keys,
        url=settings.public_url,
    )
    access = AccessService(
        keys=keys,
        store=store,
        clock=clock,
        sites=sites,
        config=AccessConfig(
            issuer=settings.audience,
            audience=settings.audience,
            site=Site(settings.site_name, SiteKind(settings.site_kind)),
            matrix=settings.restore_matrix,
            token_ttl=settings.token_ttl,
            tool_token_ttl=settings.tool_token_ttl,
            approvals_required=settings.approvals_required,
            proposal_ttl=settings.proposal_ttl,
            max_emergency=settings.max_emergency_hours * 3600.0,
        ),
    )
    audit = AuditWriter(store, settings.journal_dir, settings.node_name)
    store.before_audit_read(audit.drain)
    return Runtime(
        settings=settings,
        store=store,
        backend=backend,
        barrier=barrier,
        keys=keys,
        access=access,
        review=ReviewService(store=store, clock=clock),
        audit=audit,
        audit_log=AuditLog(keys=keys, store=store, barrier=barrier, clock=clock),
        sites=sites,
        provisioner=provisioner,
        clock=clock,
        random=random,
        pins=pins,
        transit_login=transit_login,
    )


def local_seal_control(runtime: Runtime) -> Custodian:
    """Single-process node: the custodian opens and closes this process's barrier directly."""
    return Custodian(
        store=runtime.store,
        clock=runtime.clock,
        opener=runtime.open_barrier,
        closer=runtime.seal_process,
        tokens=runtime.store,
        random=runtime.random,
        timeout=runtime.settings.unseal_timeout,
        rekeys=runtime.store,
        pins=runtime.pins,
        rekeyed=runtime.replace_keys,
        allow_single_share=runtime.settings.dev,
    )
