"""Server configuration: a plain dataclass with safe defaults, loaded from a TOML file.

Unknown keys are refused so that a misspelt setting is noticed at start-up, not in an incident.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kms.errors import InvalidRequestError
from kms.policy import DEFAULT_MATRIX, RestoreMatrix, SiteKind
from kms.sites import validate_site_name

MiB = 1024 * 1024


class ConfigError(InvalidRequestError):
    pass


@dataclass
class Settings:
    data_dir: Path
    database_url: str = ""
    pkcs11_module: str = ""
    token_label: str = "ekms"  # noqa: S105 - a token label, not a secret
    softhsm: bool = True  # manage a SoftHSM token under data_dir (development, rehearsal, tests)
    softhsm_dir: str = ""  # where SoftHSM keeps its config and tokens; default data_dir/softhsm
    transport_pin_file: str = ""
    manage_so_pin: bool = True
    listen: str = "127.0.0.1:8200"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_disable: bool = False  # plain HTTP off loopback must be asked for explicitly
    workers: int = 2
    node_name: str = field(default_factory=socket.gethostname)
    max_request_bytes: int = 1 * MiB
    max_batch_items: int = 1000
    unseal_timeout: float = 600.0
    log_level: str = "warning"
    dev: bool = False
    # Sign an audit tree head this often (seconds) if the log grew; 0: only on demand and at seal.
    audit_head_interval: int = 300
    # Acknowledge a request once its record is in this worker's local journal, and take the
    # journal into the Merkle log every few ms (ADR 0013). "auto": on with SQLite, whose commit
    # is no more durable than the journal's write; off with PostgreSQL, whose commit is.
    audit_journal: str = "auto"  # auto | on | off
    audit_journal_dir: str = ""  # default data_dir/audit-journal; local to this node
    # --- access control (docs/access-control.md) ---
    site_name: str = "home"
    site_kind: str = "home"  # home | embassy | public-cloud
    audience: str = ""  # what tokens and assertions must name; default embassy-kms/<site_name>
    public_url: str = ""  # the URL clients use, for DPoP htu; default: taken from each request
    token_ttl: int = 3600
    tool_token_ttl: int = 900
    max_tool_token_ttl: int = 900
    approvals_required: int = 2
    proposal_ttl: int = 86_400
    max_emergency_hours: int = 72
    restore_policy: dict[str, Any] = field(default_factory=dict)
    restore_matrix: RestoreMatrix = field(init=False, repr=False, default=DEFAULT_MATRIX)
    # --- key backend (docs/adr/0012 §8): a PKCS#11 token, or a Vault/OpenBao transit mount ---
    backend: str = "pkcs11"  # pkcs11 | transit
    transit_address: str = ""  # https://HOST:PORT of the Vault/OpenBao cluster
    transit_tls_disable: bool = False  # plain HTTP to transit off loopback must be asked for
    transit_mount: str = "transit"
    transit_key_prefix: str = "ekms-"
    transit_ca_file: str = ""  # CA bundle for the transit address; default: the system's
    transit_wrapping_key_sha256: str = ""  # pin the mount's BYOK wrapping key (hex SHA-256)
    # Read once, at the first unseal: checked by logging in, sealed under the barrier key,
    # then deleted (unless kept). Default: data_dir/transit-credential.json.
    transit_credential_file: str = ""
    transit_credential_file_keep: bool = False

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'ekms.db'}"
        if not self.transport_pin_file:
            self.transport_pin_file = str(self.data_dir / "hsm-transport-pins.json")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be between 1 and 64")
        if not 1024 <= self.max_request_bytes <= 64 * MiB:
            raise ConfigError("max_request_bytes must be between 1 KiB and 64 MiB")
        if not 1 <= self.max_batch_items <= 100_000:
            raise ConfigError("max_batch_items must be between 1 and 100000")
        if not 10 <= self.unseal_timeout <= 86_400:
            raise ConfigError("unseal_timeout must be between 10 s and 24 h")
        self._check_audit()
        self._check_access_control()
        self._check_backend()
        host, _ = self.host_port
        if not self.tls_enabled and not self.tls_disable and not _is_loopback(host):
            raise ConfigError(
                f"listen address {self.listen} is not loopback: configure tls_cert_file and "
                "tls_key_file, or set tls_disable = true explicitly"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together")

    def _check_audit(self) -> None:
        if self.audit_head_interval != 0 and not 10 <= self.audit_head_interval <= 86_400:
            raise ConfigError("audit_head_interval must be 0 (off) or between 10 s and 24 h")
        if self.audit_journal not in ("auto", "on", "off"):
            raise ConfigError("audit_journal must be one of: auto, on, off")
        if not self.audit_journal_dir:
            self.audit_journal_dir = str(self.data_dir / "audit-journal")

    def _check_access_control(self) -> None:  # noqa: C901 - one bound per setting
        try:
            SiteKind(self.site_kind)
        except ValueError:
            raise ConfigError("site_kind must be one of: home, embassy, public-cloud") from None
        try:
            validate_site_name(self.site_name)  # it names this site's row in the site registry
        except InvalidRequestError as exc:
            raise ConfigError(f"site_name: {exc}") from None
        if not self.audience:
            self.audience = f"embassy-kms/{self.site_name}"
        if not 60 <= self.max_tool_token_ttl <= 86_400:
            raise ConfigError("max_tool_token_ttl must be between 60 s and 24 h")
        if not 60 <= self.tool_token_ttl <= self.max_tool_token_ttl:
            raise ConfigError(
                f"tool_token_ttl must be between 60 s and max_tool_token_ttl "
                f"({self.max_tool_token_ttl} s)"
            )
        if not 60 <= self.token_ttl <= 86_400:
            raise ConfigError("token_ttl must be between 60 s and 24 h")
        if not 1 <= self.approvals_required <= 16:
            raise ConfigError("approvals_required must be between 1 and 16")
        if self.approvals_required < 2 and not self.dev:
            raise ConfigError("approvals_required must be at least 2 outside development")
        if not 300 <= self.proposal_ttl <= 30 * 86_400:
            raise ConfigError("proposal_ttl must be between 5 minutes and 30 days")
        if not 1 <= self.max_emergency_hours <= 24 * 14:
            raise ConfigError("max_emergency_hours must be between 1 and 336")
        try:
            self.restore_matrix = RestoreMatrix.from_config(self.restore_policy)
        except InvalidRequestError as exc:
            raise ConfigError(str(exc)) from None

    def _check_backend(self) -> None:
        if self.backend not in ("pkcs11", "transit"):
            raise ConfigError("backend must be one of: pkcs11, transit")
        if not self.transit_credential_file:
            self.transit_credential_file = str(self.data_dir / "transit-credential.json")
        if self.backend == "pkcs11":
            if self.transit_address:
                raise ConfigError("transit_address is set, but backend is pkcs11: set backend")
            return
        self._check_transit_address()
        # hvac and requests are loaded only by transit sites.
        from hsm.transit_backend import TransitConfig  # noqa: PLC0415

        try:
            TransitConfig(
                url=self.transit_address,
                mount=self.transit_mount,
                key_prefix=self.transit_key_prefix,
                wrapping_key_sha256=self.transit_wrapping_key_sha256 or None,
            )
        except InvalidRequestError as exc:
            raise ConfigError(f"transit settings: {exc}") from None

    def _check_transit_address(self) -> None:
        """The service's token must not cross a network in clear: https, or loopback, or an
        explicit ``transit_tls_disable``, as with ``listen`` and ``tls_disable``."""
        if not self.transit_address:
            raise ConfigError("backend = transit needs transit_address (https://HOST:PORT)")
        url = urlsplit(self.transit_address)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ConfigError(
                f"transit_address must be https://HOST[:PORT], got {self.transit_address!r}"
            )
        if url.username or url.password or url.query or url.fragment:
            raise ConfigError("transit_address must not carry credentials, a query or a fragment")
        if url.scheme == "http":
            if self.transit_ca_file:
                raise ConfigError("transit_ca_file goes with an https transit_address")
            if not self.transit_tls_disable and not _is_loopback(url.hostname):
                raise ConfigError(
                    f"transit_address {self.transit_address} is plain HTTP off loopback: the "
                    "service's token would cross the network in clear. Use https, or set "
                    "transit_tls_disable = true explicitly"
                )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def journal_dir(self) -> Path | None:
        """Where this worker journals audit records, or None to commit each batch directly."""
        if self.audit_journal == "off" or (
            self.audit_journal == "auto" and not self.database_url.startswith("sqlite")
        ):
            return None
        return Path(self.audit_journal_dir)

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen must be HOST:PORT, got {self.listen!r}")
        return host.strip("[]") or "127.0.0.1", int(port)

    @classmethod
    def from_file(cls, path: Path) -> Settings:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "config") -> Settings:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        if "data_dir" not in raw:
            raise ConfigError(f"{source}: data_dir is required")
        if raw.get("dev"):
            raise ConfigError(f"{source}: dev mode is a command-line flag, not a setting")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def softhsm_conf_path(settings: Settings) -> Path:
    base = Path(settings.softhsm_dir) if settings.softhsm_dir else settings.data_dir / "softhsm"
    return base / "softhsm2.conf"


def prepare_softhsm_environment(settings: Settings) -> None:
    """Point SoftHSM at the data directory's token store before the library is first loaded."""
    if settings.softhsm:
        os.environ["SOFTHSM2_CONF"] = str(softhsm_conf_path(settings))
