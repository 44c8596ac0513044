"""Generate-root: a quorum of shares mints a new root token while the node is unsealed.

The root token is break-glass only: it can be revoked at any time, and the officials recreate
one with their shares, as Vault's ``sys/generate-root`` does. The new token leaves the service
only XORed with a one-time pad (OTP) that the caller holds, so whoever relays the answer (a
load balancer, a log) learns nothing from it.

Pure logic: the custodian (``kms.seal.Custodian``) owns one ``RootGeneration`` at a time and
serialises calls to it.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kms.custody import ShareCollector, UnsealProgress
from kms.derivation import wipe
from kms.errors import InvalidRequestError
from kms.tokens import TOKEN_LENGTH, check_otp, encode_with_otp, generate_otp

if TYPE_CHECKING:
    from kms.custody import ShareSetDescriptor
    from kms.ports import Clock, RandomSource


@dataclass(frozen=True, repr=False)
class RootGenerationStatus:
    """Vault's ``GenerateRootStatusResponse``, plus what the audit record may name.

    ``otp`` is set only in the answer that started the attempt with a generated OTP, and
    ``encoded_token`` only in the answer that completed it.
    """

    started: bool
    required: int
    nonce: str = ""
    progress: int = 0
    complete: bool = False
    encoded_token: str = ""
    otp: str = ""
    otp_length: int = TOKEN_LENGTH
    member: str | None = None  # "group.member" of the share just accepted
    token_id: str | None = None  # accessor of the token just minted

    def __repr__(self) -> str:
        return (
            f"RootGenerationStatus(started={self.started}, progress={self.progress}/"
            f"{self.required}, complete={self.complete}, <redacted>)"
        )


class RootGeneration:
    """One attempt: its nonce, the caller's OTP, and the shares given so far.

    The attempt lasts ``timeout`` seconds from its start; after that it is gone, with its
    shares, as unseal progress is.
    """

    def __init__(
        self,
        *,
        descriptor: ShareSetDescriptor,
        clock: Clock,
        random: RandomSource,
        timeout: float,
        otp: str | None,
    ) -> None:
        self.generated_otp = not otp
        self._otp = generate_otp(random) if not otp else check_otp(otp)
        self.nonce = str(uuid.UUID(bytes=random.bytes(16), version=4))
        self._clock = clock
        self._started = clock.now()
        self._timeout = timeout
        self._collector = ShareCollector(descriptor, clock, timeout, activity="root generation")
        self.required = descriptor.shares_needed

    def __repr__(self) -> str:
        return f"RootGeneration(nonce={self.nonce!r}, <redacted>)"

    @property
    def expired(self) -> bool:
        return self._clock.now() - self._started > self._timeout

    @property
    def progress(self) -> int:
        return self._collector.progress

    def otp_text(self) -> str:
        """The OTP, for the one answer that hands a generated OTP to its caller."""
        return self._otp.decode()

    def status(self, *, member: str | None = None) -> RootGenerationStatus:
        return RootGenerationStatus(
            started=True,
            required=self.required,
            nonce=self.nonce,
            progress=self.progress,
            member=member,
        )

    def submit(self, mnemonic: str, nonce: str) -> UnsealProgress:
        """Add a share; on the last one the result carries the secret (the caller wipes it)."""
        if not hmac.compare_digest(nonce.encode(), self.nonce.encode()):
            raise InvalidRequestError(
                "nonce does not match the root generation in progress: read it with "
                "GET sys/generate-root/attempt"
            )
        return self._collector.submit(mnemonic)

    def encode(self, token: str) -> str:
        return encode_with_otp(token, self._otp)

    def wipe(self) -> None:
        self._collector.reset()
        wipe(self._otp)
