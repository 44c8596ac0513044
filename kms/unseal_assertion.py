"""Which official presented an unseal share: a signed statement, checked before the share counts.

``PUT /v1/sys/unseal`` takes no token, as in Vault, so that hvac and ``bao operator unseal``
work unchanged. An official may add ``official_assertion``, a compact JWS signed with the key
registered for it (ES256 or EdDSA):

- header ``typ`` = ``ekms-unseal+jwt`` (``kms.jose.UNSEAL_ASSERTION_TYPE``): a login refuses
  this type, and this check refuses every other, so neither passes for the other;
- ``iss`` = ``sub`` = the official's id, ``aud`` = the service's audience, an ``exp`` at most
  two minutes ahead, and a ``jti`` that is spent before the share is counted;
- ``unseal`` = ``{"nonce": N, "member": "G.M"}``: the nonce of the unseal attempt the share
  joins (``""`` to start a new one) and the share's member id, read from its public header.

The nonce keeps the statement from being replayed onto another attempt, or another node; the
member keeps it from being attached to someone else's share; the ``jti`` keeps it from counting
twice within an attempt. Nothing derived from the share's value is bound: a hash of a share in
a token that travels and may be logged would be a test for guesses at the share, and the member
id already says which share it is.

Pure: the registry of principals and the clock are handed in. Spending the ``jti`` is the
caller's job, in a transaction of its own before the share is submitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kms import jose
from kms.access import once_id
from kms.custody import parse_share
from kms.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from kms.identity import Role

if TYPE_CHECKING:
    from kms.identity import Principal

MAX_LIFETIME = 120.0  # seconds an unseal assertion may live: it is made for one request
LEEWAY = 30.0  # clock difference tolerated between an official's laptop and the service
KEEP_SPENT = 60.0  # a spent jti is kept this long after its exp
_MAX_ID = 128
_NOT_COUNTED = "the share was not counted"


class OfficialRegistry(Protocol):
    def principal(self, principal_id: str) -> Principal | None: ...


@dataclass(frozen=True)
class UnsealPresenter:
    """A verified statement: ``official`` presents this share; spend ``once`` before counting it."""

    official: str
    once: tuple[bytes, float]  # (one-time id hash, keep until), as ``kms.audit.Admission.once``


def share_member(mnemonic: str) -> str:
    """The "group.member" id of a share, from its public header (as unseal progress names it).

    The client binds its assertion to this; the service checks it against the share it got.
    """
    share = parse_share(mnemonic)
    return f"{share.group_index}.{share.index}"


def claimed_official(assertion: object) -> str | None:
    """The ``iss`` an assertion claims, unverified: for the audit record of a refused share."""
    if not isinstance(assertion, str):
        return None
    try:
        issuer = jose.parse_jws(assertion).claims.get("iss")
    except AuthenticationError:
        return None
    if isinstance(issuer, str) and 0 < len(issuer) <= _MAX_ID and issuer.isprintable():
        return issuer
    return None


def verify_unseal_assertion(
    assertion: object,
    *,
    registry: OfficialRegistry,
    audience: str,
    now: float,
    member: str,
    nonce: str,
) -> UnsealPresenter:
    """Check the statement against the registry and the share about to be submitted.

    Who signed is decided first, and a caller who fails that learns only "permission denied"
    (the audit record keeps why), so the endpoint does not tell strangers which principals
    exist. Once the signature is an official's, problems are named precisely (400): the
    official, not an attacker, is reading them.
    """
    if not isinstance(assertion, str) or not assertion:
        raise InvalidRequestError(f"official_assertion must be a compact JWS; {_NOT_COUNTED}")
    try:
        jws = jose.parse_jws(assertion)
    except AuthenticationError as exc:
        raise InvalidRequestError(
            f"official_assertion is not a usable compact JWS ({exc.reason}); {_NOT_COUNTED}"
        ) from None
    issuer = jws.claims.get("iss")
    if not isinstance(issuer, str) or not 0 < len(issuer) <= _MAX_ID:
        raise InvalidRequestError(
            f"official_assertion must name the official in iss; {_NOT_COUNTED}"
        )
    principal = registry.principal(issuer)
    if principal is None or not principal.has(Role.OFFICIAL):
        raise PermissionDeniedError(f"unseal assertion: {issuer!r} is not an active official")
    try:
        jose.verify_jws(
            jws, jose.parse_public_jwk(dict(principal.jwk)), typ=jose.UNSEAL_ASSERTION_TYPE
        )
    except AuthenticationError as exc:
        raise PermissionDeniedError(f"unseal assertion of {issuer!r}: {exc.reason}") from None
    try:
        claims = jose.assertion_claims(
            jws.claims,
            principal_id=principal.id,
            audience=audience,
            now=now,
            max_lifetime=MAX_LIFETIME,
            leeway=LEEWAY,
        )
    except AuthenticationError as exc:
        raise InvalidRequestError(
            f"official_assertion refused: {exc.reason}; {_NOT_COUNTED}"
        ) from None
    _check_binding(jws.claims.get("unseal"), member=member, nonce=nonce)
    return UnsealPresenter(
        principal.id,
        (once_id("unseal", principal.id, claims.jti), claims.expires_at + KEEP_SPENT),
    )


def _check_binding(binding: object, *, member: str, nonce: str) -> None:
    if (
        not isinstance(binding, Mapping)
        or set(binding) != {"nonce", "member"}
        or not all(isinstance(v, str) for v in binding.values())
    ):
        raise InvalidRequestError(
            'official_assertion must carry "unseal": {"nonce": ..., "member": ...}, the '
            f"attempt's nonce and the share's member id; {_NOT_COUNTED}"
        )
    if binding["member"] != member:
        raise InvalidRequestError(
            f"official_assertion was signed for share member {binding['member'][:16]!r}, but "
            f"this share is member {member!r}; {_NOT_COUNTED}"
        )
    if binding["nonce"] == nonce:
        return
    if not binding["nonce"]:
        raise InvalidRequestError(
            f"official_assertion was signed to start an unseal attempt, but attempt {nonce} is "
            f"in progress: sign again with its nonce; {_NOT_COUNTED}"
        )
    if not nonce:
        raise InvalidRequestError(
            "official_assertion was signed for an unseal attempt that has ended (completed, "
            f'reset or expired): sign again with nonce ""; {_NOT_COUNTED}'
        )
    raise InvalidRequestError(
        "official_assertion was signed for another unseal attempt: sign again with the nonce "
        f"of attempt {nonce}; {_NOT_COUNTED}"
    )
