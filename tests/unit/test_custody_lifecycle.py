"""The pure parts of the custody lifecycle: JWE (RFC 7518 vectors), share checks, drill reports."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from kms import jwe, share_check
from kms.custody import parse_share, split_groups, split_secret
from kms.drill import DAY, Check, quorum_reachable, report, start
from kms.errors import InvalidRequestError
from kms.jose import b64url_decode, b64url_encode, parse_public_jwk
from kms.rekey import ShareMember

SECRET = bytes(range(32))


class Urandom:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


# --- JWE ------------------------------------------------------------------------------------

# RFC 7518 Appendix C: Alice's ephemeral key, Bob's key, and the agreed key for A128GCM.
ALICE = {
    "x": "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
    "y": "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps",
    "d": "0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo",
}
BOB = {
    "x": "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ",
    "y": "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck",
    "d": "VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw",
}
Z = bytes(
    [158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156,
     251, 49, 110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196]
)  # fmt: skip


def private(jwk: dict[str, str]) -> ec.EllipticCurvePrivateKey:
    d = int.from_bytes(b64url_decode(jwk["d"]), "big")
    return ec.derive_private_key(d, ec.SECP256R1())


def test_concat_kdf_matches_rfc7518_appendix_c() -> None:
    alice, bob = private(ALICE), private(BOB)
    assert alice.exchange(ec.ECDH(), bob.public_key()) == Z
    assert bob.exchange(ec.ECDH(), alice.public_key()) == Z
    derived = jwe.concat_kdf(Z, "A128GCM", 128, b"Alice", b"Bob")
    assert b64url_encode(derived) == "VqqN6vgjbSBcIijNcacQGg"


def test_jwe_round_trip_and_refusals() -> None:
    holder = ec.generate_private_key(ec.SECP256R1())
    numbers = holder.public_key().public_numbers()
    jwk = parse_public_jwk(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }
    )
    token = jwe.encrypt(jwk, b"share words", Urandom())
    header = jwe.header_of(token)
    assert (header["alg"], header["enc"], header["kid"]) == ("ECDH-ES", "A256GCM", jwk.thumbprint)
    assert token.split(".")[1] == ""
    assert jwe.decrypt(holder, token) == b"share words"
    with pytest.raises(InvalidRequestError, match="another holder"):
        jwe.decrypt(ec.generate_private_key(ec.SECP256R1()), token)
    parts = token.split(".")
    tampered = ".".join([*parts[:3], b64url_encode(b"x" * 11), parts[4]])
    with pytest.raises(InvalidRequestError, match="another holder, or altered"):
        jwe.decrypt(holder, tampered)
    with pytest.raises(InvalidRequestError, match="five base64url parts"):
        jwe.decrypt(holder, "a.b.c")
    other_alg = b64url_encode(b'{"alg":"RSA-OAEP","enc":"A256GCM"}')
    with pytest.raises(InvalidRequestError, match="only alg ECDH-ES"):
        jwe.decrypt(holder, ".".join([other_alg, *parts[1:]]))
    ed = parse_public_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(bytes(32))})
    with pytest.raises(InvalidRequestError, match="P-256"):
        jwe.encrypt(ed, b"x", Urandom())


# --- share checks ---------------------------------------------------------------------------


def test_a_proof_verifies_only_for_its_own_member_set_and_challenge() -> None:
    mnemonics, descriptor = split_secret(SECRET, 2, 3, now=0)
    stored = share_check.commitments(mnemonics)
    assert list(stored) == descriptor.members
    challenge = os.urandom(32)
    proof = share_check.prove(mnemonics[1], challenge)
    assert (proof.member, proof.identifier) == ("0.1", descriptor.identifier)
    assert share_check.verify(stored["0.1"], proof.identifier, "0.1", challenge, proof.proof)
    assert not share_check.verify(stored["0.0"], proof.identifier, "0.0", challenge, proof.proof)
    assert not share_check.verify(
        stored["0.1"], proof.identifier, "0.1", os.urandom(32), proof.proof
    )
    other_id = (proof.identifier + 1) % 32768
    assert not share_check.verify(stored["0.1"], other_id, "0.1", challenge, proof.proof)
    assert not share_check.verify(stored["0.1"], proof.identifier, "0.1", challenge, bytes(64))
    assert not share_check.verify(b"short", proof.identifier, "0.1", challenge, proof.proof)


def test_commitments_are_public_keys_not_the_share_or_its_seed() -> None:
    mnemonics, _ = split_groups(SECRET, 2, [(2, 3), (1, 1)], now=0)
    for mnemonic in mnemonics:
        share = parse_share(mnemonic)
        commitment = share_check.commitment(share)
        assert len(commitment) == 32
        assert commitment not in (share.value, share_check._seed(share))
    # A 1-of-1 group's share is the group secret itself; its commitment still hides it.
    assert len(set(share_check.commitments(mnemonics).values())) == 4


@pytest.mark.parametrize("member", ["0", "0.", ".1", "a.b", "16.0", "0.16", "001.1", 7, None])
def test_member_ids_are_checked(member: object) -> None:
    with pytest.raises(InvalidRequestError, match=r"group\.member"):
        share_check.parse_member(member)


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=1, max_size=64))
def test_prove_verify_round_trip(secret: bytes, challenge: bytes) -> None:
    mnemonics, _ = split_secret(secret, 2, 2, now=0)
    share = parse_share(mnemonics[0])
    proof = share_check.prove(mnemonics[0], challenge)
    key = share_check.commitment(share)
    assert share_check.verify(key, proof.identifier, proof.member, challenge, proof.proof)


# --- drills ---------------------------------------------------------------------------------


def test_drill_report_states_and_groups() -> None:
    _, descriptor = split_groups(SECRET, 2, [(2, 3), (2, 3)], now=0)
    name = (descriptor.identifier, descriptor.generation)
    now = 100 * DAY
    drill = start(
        set_name=name,
        started_by="officer",
        now=now,
        duration=DAY,
        stale_after_days=30,
        site="embassy-1",
        node="node-a",
    )
    members = [ShareMember(m, b"k" * 32, "o" + m) for m in descriptor.members]
    checks = [
        Check("0.0", now + 10, "o0.0", drill.id),
        Check("0.1", now + 20, "o0.1", drill.id),
        Check("1.0", now - 5 * DAY, "o1.0"),
        Check("1.1", now - 40 * DAY, "o1.1"),
        Check("1.1", now - 60 * DAY, "o1.1"),
    ]
    result = report(drill, descriptor, members, checks, now=now + 60)
    states = {m["member"]: m["state"] for m in result["members"]}
    assert states == {
        "0.0": "confirmed",
        "0.1": "confirmed",
        "0.2": "missing",
        "1.0": "recent",
        "1.1": "stale",
        "1.2": "missing",
    }
    assert result["counts"] == {"confirmed": 2, "recent": 1, "stale": 1, "missing": 2}
    # Group 0 is at its threshold, group 1 is not: two groups are needed.
    assert result["quorum"] == {"with_confirmed": False, "with_confirmed_or_recent": False}
    assert result["groups"][0]["confirmed"] == 2
    assert result["open"] is True
    assert result["sites"] == [
        {"site": "embassy-1", "node": "node-a", "quorum_reachable": result["quorum"]}
    ]
    checks.append(Check("1.2", now + 30, "o1.2", drill.id))
    after = report(drill, descriptor, members, checks, now=now + 2 * DAY)
    assert after["quorum"] == {"with_confirmed": False, "with_confirmed_or_recent": True}
    assert after["open"] is False
    replaced = report(drill, replace(descriptor, generation=1), members, checks, now=now)
    assert replaced["in_force"] is False
    assert replaced["quorum"]["with_confirmed_or_recent"] is False
    assert [m["member"] for m in replaced["members"]] == descriptor.members


def test_quorum_needs_group_threshold_groups_each_at_its_threshold() -> None:
    _, descriptor = split_groups(SECRET, 2, [(2, 3), (2, 3), (1, 1)], now=0)
    assert not quorum_reachable(descriptor, ["0.0", "0.1", "1.0"])
    assert quorum_reachable(descriptor, ["0.0", "0.1", "2.0"])
    assert quorum_reachable(descriptor, ["0.0", "0.1", "1.1", "1.2"])


@pytest.mark.parametrize(("duration", "stale"), [(10, 30), (91 * DAY, 30), (DAY, 0), (DAY, 4000)])
def test_drill_bounds(duration: float, stale: int) -> None:
    with pytest.raises(InvalidRequestError):
        start(
            set_name=(1, 0),
            started_by="x",
            now=0,
            duration=duration,
            stale_after_days=stale,
            site="s",
            node="n",
        )
