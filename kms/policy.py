"""Authorization as decision objects: ``Allow`` or ``Deny(reason)``, never an exception deep inside.

The caller of a route gets an opaque 403 with a request id; the audit log keeps the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from kms.errors import InvalidRequestError
from kms.keys import Classification

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kms.credentials import AccessClaims
    from kms.keys import KeyPolicy


@dataclass(frozen=True)
class Allow:
    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Deny:
    reason: str

    def __bool__(self) -> bool:
        return False


Decision = Allow | Deny
E = TypeVar("E", bound=StrEnum)
ALLOW = Allow()


class SiteKind(StrEnum):
    HOME = "home"
    EMBASSY = "embassy"
    PUBLIC_CLOUD = "public-cloud"


class Operation(StrEnum):
    """Key uses a non-root caller may be allowed. Restore credentials carry only ``decrypt``."""

    DECRYPT = "decrypt"
    DATAKEY = "datakey"
    SIGN = "sign"


# Backup manifests are signed only with keys whose name starts so (``backup-manifest``,
# ``backup-manifest-2026``): a naming rule rather than configuration, so the restore tool, which
# has no access to the service's configuration, can refuse a manifest signed by any other key.
MANIFEST_KEY_PREFIX = "backup-manifest"


def is_manifest_key(name: str) -> bool:
    return name.startswith(MANIFEST_KEY_PREFIX)


@dataclass(frozen=True)
class RestoreMatrix:
    """Which classification may be restored at which kind of site, normally and in an emergency."""

    always: Mapping[Classification, frozenset[SiteKind]]
    emergency: Mapping[Classification, frozenset[SiteKind]]

    def decide(
        self, classification: Classification, site: SiteKind, *, emergency: bool
    ) -> Decision:
        if site in self.always.get(classification, frozenset()):
            return ALLOW
        if site in self.emergency.get(classification, frozenset()):
            if emergency:
                return ALLOW
            return Deny(f"{classification.value} data at {_a(site)} site needs an emergency")
        return Deny(f"{classification.value} data may not be restored at {_a(site)} site")

    @classmethod
    def from_config(cls, table: Mapping[str, object]) -> RestoreMatrix:
        """``{classification: {"always": [kinds], "emergency": [kinds]}}``; unknown names fail."""
        always = dict(DEFAULT_MATRIX.always)
        emergency = dict(DEFAULT_MATRIX.emergency)
        for name, entry in table.items():
            classification = parse_choice(Classification, name, "classification")
            if not isinstance(entry, dict) or not set(entry) <= {"always", "emergency"}:
                raise InvalidRequestError(
                    f"restore_policy.{name} must be a table with 'always' and/or 'emergency'"
                )
            if "always" in entry:
                always[classification] = _kinds(entry["always"], f"restore_policy.{name}.always")
            if "emergency" in entry:
                emergency[classification] = _kinds(
                    entry["emergency"], f"restore_policy.{name}.emergency"
                )
        if (
            SiteKind.PUBLIC_CLOUD
            in always[Classification.SECRET] | emergency[Classification.SECRET]
        ):
            raise InvalidRequestError("secret data may never be restored in a public cloud")
        return cls(always=always, emergency=emergency)

    def to_json(self) -> dict[str, dict[str, list[str]]]:
        return {
            c.value: {
                "always": sorted(k.value for k in self.always.get(c, frozenset())),
                "emergency": sorted(k.value for k in self.emergency.get(c, frozenset())),
            }
            for c in Classification
        }


def _a(site: SiteKind) -> str:
    """'an embassy', 'a home': the refusal is read by people."""
    return ("an " if site.value[0] in "aeiou" else "a ") + site.value


def parse_choice(kind: type[E], value: object, what: str) -> E:
    """A configuration or query value as one of ``kind``'s members, or a message naming them."""
    try:
        return kind(str(value))
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidRequestError(f"unknown {what} {value!r}; expected one of: {allowed}") from None


def _kinds(values: object, where: str) -> frozenset[SiteKind]:
    if not isinstance(values, list):
        raise InvalidRequestError(f"{where} must be a list of site kinds")
    return frozenset(parse_choice(SiteKind, v, "site kind") for v in values)


_H, _E, _P = SiteKind.HOME, SiteKind.EMBASSY, SiteKind.PUBLIC_CLOUD
# The secure default of the access-control issue: public anywhere; internal at home and
# embassies; confidential and secret at home, at an embassy only in an emergency, and secret
# never in a public cloud.
DEFAULT_MATRIX = RestoreMatrix(
    always={
        Classification.PUBLIC: frozenset({_H, _E, _P}),
        Classification.INTERNAL: frozenset({_H, _E}),
        Classification.CONFIDENTIAL: frozenset({_H}),
        Classification.SECRET: frozenset({_H}),
    },
    emergency={
        Classification.PUBLIC: frozenset(),
        Classification.INTERNAL: frozenset(),
        Classification.CONFIDENTIAL: frozenset({_E}),
        Classification.SECRET: frozenset({_E}),
    },
)


@dataclass(frozen=True)
class Site:
    name: str
    kind: SiteKind


def check_scoped_use(
    claims: AccessClaims,
    *,
    operation: Operation,
    dataset: str,
    classification: Classification,
    site: Site,
    matrix: RestoreMatrix,
    emergency: bool,
) -> Decision:
    """May this scoped credential do ``operation`` on ``dataset`` here, now?

    Expiry, revocation and the use count are checked when the credential is presented and when
    its use is committed; this is the question of scope.
    """
    scope = claims.scope
    if scope is None:
        return Deny("token carries no key scope")
    if operation.value not in scope.operations:
        return Deny(f"scope does not include {operation.value}")
    if dataset not in scope.datasets:
        return Deny(f"dataset {dataset!r} is outside the credential's scope")
    if scope.site != site.name:
        return Deny(f"credential is for site {scope.site!r}, this is {site.name!r}")
    return matrix.decide(classification, site.kind, emergency=emergency)


def check_writer_use(operation: Operation, policy: KeyPolicy) -> Decision:
    """What a backup writer may do: new data keys under a dataset key, and sign manifests.

    Never decrypt, rewrap or anything else that reads an existing ciphertext: the writer makes
    backups and can never read them back. A data key answer carries the new key's plaintext,
    which the writer needs to encrypt; it reveals nothing already stored.
    """
    if operation is Operation.DATAKEY:
        if not policy.key_type.is_symmetric:
            return Deny(f"{policy.name!r} is not a dataset key")
        return ALLOW
    if operation is Operation.SIGN:
        if not is_manifest_key(policy.name):
            return Deny(f"a backup writer signs only with {MANIFEST_KEY_PREFIX}* keys")
        return ALLOW
    return Deny(f"a backup writer may not {operation.value}")
