"""Changing the HSM token's PINs at a rekey commit, in a process of its own.

Why a separate process: PKCS#11 login state is per process. A process that is logged in as the
user (every worker, and a single-process node) cannot log in as the security officer to change
the SO PIN, and closing a session there would log out the barrier's session too. A freshly
spawned process has no session and no cached token state, so it can change both PINs and probe
whether a PIN opens the token. It takes about 0.2 s, once per rekey.

SoftHSM keeps each process's view of a token's PINs from the moment it loaded the token: a
process that was running when another changed the PIN keeps accepting the old one and refusing
the new one until it re-initialises the library. ``hsm.pkcs11_backend.Pkcs11Backend.open``
does that when a login is refused and the process holds no other session.

``change`` is idempotent: each PIN is set from old to new, or left alone if it is already new,
so that a commit interrupted between the user and the SO PIN can be finished later. Each step
costs at most one wrong login attempt (the old PIN, once it has been replaced).
"""

from __future__ import annotations

import multiprocessing
from typing import TYPE_CHECKING, Any

from kms.errors import BackendError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

_SPAWN = multiprocessing.get_context("spawn")
_TIMEOUT = 60.0


class TokenPins:
    """``kms.rekey.PinChanger`` for a PKCS#11 token.

    With ``manage_so_pin`` false the security officer PIN belongs to the HSM administrator
    (as at init, ``hsm.softhsm.TransportPinProvisioner``) and is left alone.
    """

    def __init__(self, *, module: str, token_label: str, manage_so_pin: bool = True) -> None:
        self._module = module
        self._label = token_label
        self._manage_so_pin = manage_so_pin

    def __repr__(self) -> str:
        return f"TokenPins(token={self._label!r})"

    def change(self, old_user: str, new_user: str, old_so: str, new_so: str) -> None:
        so = (old_so, new_so) if self._manage_so_pin else None
        _run(self._module, self._label, ("change", (old_user, new_user), so))

    def opens(self, pin: str, *, security_officer: bool = False) -> bool:
        """Does ``pin`` log in to the token (as the user, or the SO)? Asked of a fresh process."""
        return bool(_run(self._module, self._label, ("probe", pin, security_officer)))


def _run(module: str, label: str, request: tuple[Any, ...]) -> Any:
    parent, child = _SPAWN.Pipe()
    process = _SPAWN.Process(target=_child, args=(module, label, child), name="ekms-hsm-pins")
    process.start()
    child.close()
    try:
        parent.send(request)
        if not parent.poll(_TIMEOUT):
            raise BackendError("the HSM PIN change did not answer in time")
        reply = parent.recv()
    except (EOFError, OSError):
        raise BackendError("the HSM PIN change process died") from None
    finally:
        parent.close()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    if reply[0] != "ok":
        raise BackendError(str(reply[1]))
    return reply[1]


def _child(module: str, label: str, connection: Connection) -> None:
    try:
        request = connection.recv()
        connection.send(("ok", _serve(module, label, request)))
    except BackendError as exc:
        connection.send(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported by type: a message might hold a PIN
        connection.send(("error", f"HSM PIN change failed: {type(exc).__name__}"))
    finally:
        connection.close()


def _serve(module: str, label: str, request: tuple[Any, ...]) -> Any:
    import pkcs11  # noqa: PLC0415 - only the spawned process loads the library
    from pkcs11.exceptions import PinIncorrect  # noqa: PLC0415

    try:
        token = pkcs11.lib(module).get_token(token_label=label)
    except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned) as exc:
        raise BackendError(f"PKCS#11 token {label!r} not found exactly once") from exc

    def opens(pin: str, *, so: bool) -> bool:
        try:
            session = token.open(rw=True, so_pin=pin) if so else token.open(user_pin=pin)
        except PinIncorrect:
            return False
        session.close()
        return True

    if request[0] == "probe":
        return opens(request[1], so=bool(request[2]))
    (old_user, new_user), so_pins = request[1], request[2]
    try:
        with token.open(rw=True) as session:  # a public R/W session sets the user PIN
            session.set_pin(old_user, new_user)
    except PinIncorrect:
        if not opens(new_user, so=False):
            raise BackendError(
                "neither the current nor the new user PIN opens the HSM token"
            ) from None
    if so_pins is not None:
        old_so, new_so = so_pins
        try:
            with token.open(rw=True, so_pin=old_so) as session:
                session.set_pin(old_so, new_so)
        except PinIncorrect:
            if not opens(new_so, so=True):
                raise BackendError(
                    "neither the current nor the new security officer PIN opens the HSM token"
                ) from None
    return True
