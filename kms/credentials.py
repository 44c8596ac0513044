"""Access tokens: what a JWT issued by the service says, and the rules it must meet.

Tokens are ES256 JWTs (RFC 9068 ``at+jwt``) signed with the service's signing key in the HSM.
Anyone holding the JWKS can verify them offline; the service additionally checks revocation,
the principal's standing and, for restore tools, a DPoP proof of the key named in ``cnf.jkt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kms.errors import AuthenticationError
from kms.identity import Role

if TYPE_CHECKING:
    from collections.abc import Mapping

TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
CLOCK_LEEWAY = 5.0  # our own tokens, our own clocks: nodes are expected to run NTP


@dataclass(frozen=True)
class Scope:
    """A restore credential's reach: one approved request, its datasets, one site, decrypt only."""

    request_id: str
    operations: frozenset[str]
    datasets: frozenset[str]
    site: str
    max_uses: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.request_id,
            "ops": sorted(self.operations),
            "datasets": sorted(self.datasets),
            "site": self.site,
            "max_uses": self.max_uses,
        }

    @classmethod
    def from_json(cls, data: object) -> Scope:
        if not isinstance(data, dict):
            raise AuthenticationError("scope claim malformed")
        try:
            ops, datasets = data["ops"], data["datasets"]
            request_id, site, max_uses = data["request"], data["site"], data.get("max_uses")
        except KeyError:
            raise AuthenticationError("scope claim malformed") from None
        if not (
            isinstance(request_id, str)
            and isinstance(site, str)
            and isinstance(ops, list)
            and isinstance(datasets, list)
            and all(isinstance(x, str) for x in ops + datasets)
            and (max_uses is None or (isinstance(max_uses, int) and max_uses > 0))
        ):
            raise AuthenticationError("scope claim malformed")
        return cls(request_id, frozenset(ops), frozenset(datasets), site, max_uses)


@dataclass(frozen=True)
class AccessClaims:
    issuer: str
    subject: str
    audience: str
    issued_at: float
    not_before: float
    expires_at: float
    jti: str
    roles: frozenset[Role]
    scope: Scope | None = None
    jkt: str | None = None  # RFC 9449 confirmation: the holder's key thumbprint

    def to_json(self) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.audience,
            "iat": int(self.issued_at),
            "nbf": int(self.not_before),
            "exp": int(self.expires_at),
            "jti": self.jti,
            "roles": sorted(r.value for r in self.roles),
        }
        if self.scope is not None:
            claims["scope"] = self.scope.to_json()
        if self.jkt is not None:
            claims["cnf"] = {"jkt": self.jkt}
        return claims

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    @classmethod
    def from_verified(cls, claims: Mapping[str, Any]) -> AccessClaims:
        """Shape check of claims whose signature has been verified."""
        try:
            iss, sub, aud, jti = claims["iss"], claims["sub"], claims["aud"], claims["jti"]
            iat, nbf, exp, roles = claims["iat"], claims["nbf"], claims["exp"], claims["roles"]
        except KeyError as exc:
            raise AuthenticationError(f"token lacks claim {exc.args[0]}") from None
        if not all(isinstance(v, str) for v in (iss, sub, aud, jti)):
            raise AuthenticationError("token claims malformed")
        if not all(_is_time(v) for v in (iat, nbf, exp)):
            raise AuthenticationError("token times malformed")
        if not isinstance(roles, list):
            raise AuthenticationError("token roles malformed")
        try:
            parsed_roles = frozenset(Role(r) for r in roles)
        except ValueError:
            raise AuthenticationError("token names an unknown role") from None
        scope = Scope.from_json(claims["scope"]) if "scope" in claims else None
        jkt = None
        if "cnf" in claims:
            cnf = claims["cnf"]
            if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str):
                raise AuthenticationError("cnf claim malformed")
            jkt = cnf["jkt"]
        return cls(iss, sub, aud, float(iat), float(nbf), float(exp), jti, parsed_roles, scope, jkt)

    def check_time(self, *, issuer: str, audience: str, now: float) -> None:
        if self.issuer != issuer:
            raise AuthenticationError("token from another issuer")
        if self.audience != audience:
            raise AuthenticationError("token for another audience")
        if now >= self.expires_at + CLOCK_LEEWAY:
            raise AuthenticationError("token expired")
        if now + CLOCK_LEEWAY < self.not_before:
            raise AuthenticationError("token not yet valid")


def _is_time(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value < 2**40
    )
