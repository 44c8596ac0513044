"""Share check: a holder proves that their share belongs to the set in force, revealing nothing.

When a share set is made (init and rekey) the service computes, for each member share,

    seed_i = HMAC-SHA256(key = the share's value bytes,
                         msg = "embassy-kms/v1/share-check" || identifier || group || member)

and stores only the Ed25519 public key whose private seed is ``seed_i`` (the member's
*commitment*). A check is a challenge-response done on the holder's machine: the service hands
out a one-time challenge, the holder's client derives ``seed_i`` from the share and signs the
challenge (with the set identifier and member id) with it, and the service verifies the
signature under the stored public key. The share never leaves the holder's machine.

Why a public key rather than storing ``seed_i`` itself (an HMAC commitment checked with a MAC):
with a stored MAC key, anyone who can read the database can answer every challenge without the
share and make a drill report lie. With a public key they cannot. Neither can be turned back
into the share: the seed is a PRF output keyed by 256 secret bits, and the public key hides
the seed behind a discrete logarithm.

Pure: no I/O; the caller stores commitments and one-time challenges.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from kms.custody import parse_share
from kms.errors import InvalidRequestError
from kms.jose import b64url_decode, b64url_encode

if TYPE_CHECKING:
    from collections.abc import Iterable

    from shamir_mnemonic import Share

CHALLENGE_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SEED_LABEL = b"embassy-kms/v1/share-check\x00"
_PROOF_LABEL = b"embassy-kms/v1/share-check-proof\x00"
_MAX_INDEX = 15  # SLIP-39 group and member indexes are 4 bits


def member_id(share: Share) -> str:
    return f"{share.group_index}.{share.index}"


def parse_member(member: object) -> tuple[int, int]:
    """ "group.member" as unseal progress and drill reports name it, both from 0."""
    if isinstance(member, str):
        group, dot, index = member.partition(".")
        if dot and group.isdigit() and index.isdigit() and len(group) <= 2 and len(index) <= 2:
            g, m = int(group), int(index)
            if g <= _MAX_INDEX and m <= _MAX_INDEX:
                return g, m
    raise InvalidRequestError('member must be "group.member", two numbers from 0 to 15')


def _seed(share: Share) -> bytes:
    message = (
        _SEED_LABEL + share.identifier.to_bytes(2, "big") + bytes([share.group_index, share.index])
    )
    return hmac.new(share.value, message, hashlib.sha256).digest()


def _signing_key(share: Share) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(share))


def commitment(share: Share) -> bytes:
    """The member's stored commitment: an Ed25519 public key, 32 bytes."""
    return _signing_key(share).public_key().public_bytes_raw()


def commitments(mnemonics: Iterable[str]) -> dict[str, bytes]:
    """Commitments of a whole set, by member id (computed once, when the set is made)."""
    found: dict[str, bytes] = {}
    for mnemonic in mnemonics:
        share = parse_share(mnemonic)
        found[member_id(share)] = commitment(share)
    return found


def proof_message(identifier: int, member: str, challenge: bytes) -> bytes:
    group, index = parse_member(member)
    return _PROOF_LABEL + identifier.to_bytes(2, "big") + bytes([group, index]) + challenge


@dataclass(frozen=True)
class ShareProof:
    """What the holder's client sends: which set and member, and the signed challenge."""

    identifier: int
    member: str
    proof: bytes


def prove(mnemonic: str, challenge: bytes) -> ShareProof:
    """Client side: sign the challenge with the key derived from the share."""
    share = parse_share(mnemonic)
    member = member_id(share)
    signature = _signing_key(share).sign(proof_message(share.identifier, member, challenge))
    return ShareProof(share.identifier, member, signature)


def check_request(mnemonic: str, challenge: str) -> dict[str, Any]:
    """The body of ``POST ekms/shares/check`` for a challenge as the service issued it.

    Built here once for every client (the CLI, the ceremony runner), so that none of them can
    put anything but the member, the set and the signature on the wire: never the share.
    """
    proof = prove(mnemonic, b64url_decode(challenge))
    return {
        "member": proof.member,
        "set_identifier": proof.identifier,
        "challenge": challenge,
        "proof": b64url_encode(proof.proof),
    }


def verify(public_key: bytes, identifier: int, member: str, challenge: bytes, proof: bytes) -> bool:
    """Service side: does ``proof`` sign ``challenge`` for this member of this set?"""
    if len(public_key) != PUBLIC_KEY_BYTES or len(proof) != SIGNATURE_BYTES:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            proof, proof_message(identifier, member, challenge)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
