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

from kms.errors import InvalidRequestError

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
        host, _ = self.host_port
        if not self.tls_enabled and not self.tls_disable and not _is_loopback(host):
            raise ConfigError(
                f"listen address {self.listen} is not loopback: configure tls_cert_file and "
                "tls_key_file, or set tls_disable = true explicitly"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

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
        known = {f.name for f in fields(cls)}
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
