"""One exception tree for Embassy KMS, split by who is at fault.

The HTTP layer maps each branch to one status (see ``api/errors.py``); the CLI prints
``str(error)``. Messages are written for the person who has to act on them and never contain
secret material: no share words, key bytes, plaintext or tokens.
"""

from __future__ import annotations


class EkmsError(Exception):
    """Root of every error the service raises on purpose."""


# --- the caller's fault -------------------------------------------------------------------


class InvalidRequestError(EkmsError):
    """The request is malformed or asks for something the rules forbid (HTTP 400)."""


class NotFoundError(EkmsError):
    """The named object does not exist (HTTP 404)."""


class ConflictError(InvalidRequestError):
    """The request contradicts the current state, e.g. init twice (HTTP 400, as Vault)."""


class InvalidShareError(InvalidRequestError):
    """An unseal share is malformed, foreign, a duplicate, or the set proved inconsistent."""


class InvalidCiphertextError(InvalidRequestError):
    """A ciphertext is malformed, forged, or bound to another key, version or context.

    One opaque message for every cause, as Fernet's ``InvalidToken``: telling a caller *why*
    authentication failed would help an attacker more than an honest client.
    """

    def __init__(self) -> None:
        super().__init__("invalid ciphertext: unable to decrypt")


# --- state --------------------------------------------------------------------------------


class SealedError(EkmsError):
    """The service is sealed: no key operation is possible until a quorum unseals it."""

    def __init__(self) -> None:
        super().__init__("Vault is sealed")


class SiteUnavailableError(EkmsError):
    """This site's status (standby, failed-over, retired) forbids key operations (HTTP 503).

    Not a seal and not the caller's fault: which site serves is decided by a quorum of
    officials (proposals ``site-failover``, ``site-failback``, ``site-retire``; ADR 0012).
    """


class NotInitializedError(EkmsError):
    """The service has not been initialised yet."""

    def __init__(self) -> None:
        super().__init__("Vault is not initialized")


# --- authorization ------------------------------------------------------------------------


class PermissionDeniedError(EkmsError):
    """The caller may not do this. The caller sees only ``permission denied``.

    ``reason`` is kept for the audit log, never sent back.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("permission denied")
        self.reason = reason


class AuthenticationError(PermissionDeniedError):
    """The presented credential is not valid: bad signature, expired, replayed, revoked.

    HTTP 401 rather than 403, so that a client knows to log in again; still one opaque
    message, with the reason kept for the audit log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.args = ("authentication failed",)

    def __str__(self) -> str:
        return "authentication failed"


# --- our side or a dependency -------------------------------------------------------------


class BackendError(EkmsError):
    """The key backend (HSM, OpenBao) failed for a reason that is not the caller's fault."""


class StorageError(EkmsError):
    """The metadata store failed."""


class AuditError(EkmsError):
    """The audit record could not be written, so the operation is refused (fail closed)."""

    def __init__(self) -> None:
        super().__init__("audit log unavailable: request refused")
