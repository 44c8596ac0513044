"""SoftHSM2 tokens for development, tests and rehearsals, and token ownership at init.

A token is created with random *transport* PINs (as an HSM administrator hands over a new token
with a transport PIN). Init then replaces both PINs with ones derived from the root secret and
deletes the transport file, so afterwards only a quorum of shares opens the token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pkcs11.exceptions import PKCS11Error

from hsm.pkcs11_backend import _LIB_LOCK, _LIBS, load_library
from kms.errors import BackendError

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TRANSPORT_FILE = "hsm-transport-pins.json"


def find_module() -> str:
    for candidate in (
        os.environ.get("EKMS_PKCS11_MODULE", ""),
        DEFAULT_MODULE,
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BackendError("SoftHSM2 is not installed (apt-get install softhsm2)")


def write_config(directory: Path) -> Path:
    """A SoftHSM config whose tokens live under ``directory``; returns the config path.

    SoftHSM reads ``SOFTHSM2_CONF`` when the library is first loaded, so callers set the
    environment variable before any PKCS#11 call in the process.
    """
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    conf.chmod(0o600)
    return conf


@dataclass(frozen=True)
class TransportPins:
    so_pin: str
    user_pin: str

    def __repr__(self) -> str:
        return "TransportPins(<redacted>)"


def create_token(label: str, transport_file: Path, module: str | None = None) -> None:
    """Create a SoftHSM token with random transport PINs, unless it exists already."""
    module = module or find_module()
    if _token_exists(label, module):
        return
    util = shutil.which("softhsm2-util")
    if util is None:
        raise BackendError("softhsm2-util not found (apt-get install softhsm2)")
    pins = TransportPins(so_pin=secrets.token_hex(16), user_pin=secrets.token_hex(16))
    # Transport PINs are throwaway: init replaces them before any key exists.
    result = subprocess.run(  # noqa: S603
        [
            util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            pins.so_pin,
            "--pin",
            pins.user_pin,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise BackendError(
            f"softhsm2-util could not create token {label!r}: {result.stderr.strip()}"
        )
    fd = os.open(transport_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"so_pin": pins.so_pin, "user_pin": pins.user_pin}, out)
    _rescan(module)


def _token_exists(label: str, module: str) -> bool:
    lib = load_library(module)
    with _LIB_LOCK:
        return any(t.label == label for t in lib.get_tokens())


def _rescan(module: str) -> None:
    """SoftHSM fixes its slot list when loaded; a token made since is seen only after
    re-initialising. Only safe while this process holds no session (start-up, tests)."""
    with _LIB_LOCK:
        lib = _LIBS.get(module)
        if lib is not None:
            lib.reinitialize()


class TransportPinProvisioner:
    """Replaces a token's transport PINs with the derived ones at init.

    With ``manage_so_pin`` false (a production HSM whose security officer PIN belongs to the HSM
    administrator) only the user PIN is taken over.
    """

    def __init__(
        self, *, module: str, token_label: str, transport_file: Path, manage_so_pin: bool = True
    ) -> None:
        self._module = module
        self._label = token_label
        self._transport_file = transport_file
        self._manage_so_pin = manage_so_pin

    def take_ownership(self, user_pin: str, so_pin: str) -> None:
        try:
            data = json.loads(self._transport_file.read_text())
            pins = TransportPins(so_pin=str(data.get("so_pin", "")), user_pin=str(data["user_pin"]))
        except (OSError, ValueError, KeyError):
            raise BackendError(
                f"cannot read the HSM transport PIN file {self._transport_file}: the token was "
                "not prepared for init, or init already took it over"
            ) from None
        lib = load_library(self._module)
        with _LIB_LOCK:
            try:
                token = lib.get_token(token_label=self._label)
                if self._manage_so_pin:
                    with token.open(rw=True, so_pin=pins.so_pin) as session:
                        session.set_pin(pins.so_pin, so_pin)
                with token.open(rw=True, user_pin=pins.user_pin) as session:
                    session.set_pin(pins.user_pin, user_pin)
            except PKCS11Error as exc:
                raise BackendError(
                    f"could not take ownership of HSM token {self._label!r}: {type(exc).__name__}"
                ) from exc
        self._transport_file.unlink()
