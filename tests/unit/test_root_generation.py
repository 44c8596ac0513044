"""Generate-root in the custodian, with in-memory fakes: the quorum, the OTP, expiry, errors."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.custody import ShareSetDescriptor, split_secret
from kms.errors import (
    ConflictError,
    InvalidRequestError,
    InvalidShareError,
    NotInitializedError,
    SealedError,
)
from kms.seal import Custodian
from kms.tokens import (
    ROOT_POLICY,
    TOKEN_LENGTH,
    decode_with_otp,
    encode_with_otp,
    generate_otp,
    hash_token,
    issue_token,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kms.derivation import RootKeys

SECRET = bytes(range(32))


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


class UrandomSource:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class FakeStore:
    """CustodyStore and TokenStore in memory."""

    def __init__(self, descriptor: ShareSetDescriptor | None) -> None:
        self.descriptor = descriptor
        self.tokens: dict[str, tuple[bytes, list[str], float | None]] = {}

    def get_share_set(self) -> ShareSetDescriptor | None:
        return self.descriptor

    def insert_token(
        self, token_id: str, token_hash: bytes, policies: Sequence[str], created_at: float
    ) -> None:
        assert token_id not in self.tokens
        self.tokens[token_id] = (token_hash, list(policies), None)
        assert created_at > 0

    def find_token(self, token_hash: bytes) -> tuple[str, Sequence[str]] | None:
        for token_id, (digest, policies, revoked) in self.tokens.items():
            if digest == token_hash and revoked is None:
                return token_id, policies
        return None

    def revoke_token(self, token_id: str, at: float) -> bool:
        found = self.tokens.get(token_id)
        if found is None or found[2] is not None:
            return False
        self.tokens[token_id] = (found[0], found[1], at)
        return True


@pytest.fixture(scope="module")
def share_set() -> tuple[list[str], ShareSetDescriptor]:
    return split_secret(SECRET, 3, 5, now=0.0)


def make_custodian(
    descriptor: ShareSetDescriptor | None, clock: FakeClock | None = None
) -> tuple[Custodian, FakeStore]:
    store = FakeStore(descriptor)
    opened: list[RootKeys] = []
    custodian = Custodian(
        store=store,  # type: ignore[arg-type]
        clock=clock or FakeClock(),
        opener=opened.append,
        closer=lambda: None,
        tokens=store,
        random=UrandomSource(),
        timeout=600,
    )
    return custodian, store


def unsealed(
    share_set: tuple[list[str], ShareSetDescriptor], clock: FakeClock | None = None
) -> tuple[Custodian, FakeStore]:
    mnemonics, descriptor = share_set
    custodian, store = make_custodian(descriptor, clock)
    for share in mnemonics[:3]:
        custodian.submit(share)
    assert not custodian.status().sealed
    return custodian, store


def test_quorum_mints_a_root_token_encoded_with_the_otp(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonics, _ = share_set
    custodian, store = unsealed(share_set)
    idle = custodian.root_generation_status()
    assert (idle.started, idle.required, idle.otp_length) == (False, 3, TOKEN_LENGTH)
    started = custodian.start_root_generation(None)
    assert started.started
    assert len(started.otp) == TOKEN_LENGTH
    assert started.otp.isalnum()
    assert started.otp not in repr(started)
    assert custodian.root_generation_status().otp == ""  # shown once
    steps = [custodian.submit_root_share(m, started.nonce) for m in mnemonics[2:]]
    assert [s.progress for s in steps[:2]] == [1, 2]
    done = steps[-1]
    assert done.complete
    assert done.encoded_token not in repr(done)
    token = decode_with_otp(done.encoded_token, started.otp)
    assert token.startswith("ekms.")
    assert len(token) == TOKEN_LENGTH
    assert store.find_token(hash_token(token)) == (done.token_id, [ROOT_POLICY])
    assert custodian.root_generation_status().started is False


def test_callers_otp_is_used_and_checked(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonics, _ = share_set
    custodian, _ = unsealed(share_set)
    for bad in ("short", "x" * (TOKEN_LENGTH + 1), "é" * TOKEN_LENGTH, " " * TOKEN_LENGTH):
        with pytest.raises(InvalidRequestError, match=f"otp must be {TOKEN_LENGTH} characters"):
            custodian.start_root_generation(bad)
    otp = generate_otp(UrandomSource()).decode()
    started = custodian.start_root_generation(otp)
    assert started.otp == ""  # the caller has it already
    for share in mnemonics[:3]:
        done = custodian.submit_root_share(share, started.nonce)
    assert decode_with_otp(done.encoded_token, otp).startswith("ekms.")


def test_errors_keep_progress(share_set: tuple[list[str], ShareSetDescriptor]) -> None:
    mnemonics, _ = share_set
    custodian, _ = unsealed(share_set)
    foreign, _ = split_secret(bytes(32), 3, 5, now=0.0)
    with pytest.raises(InvalidRequestError, match="no root generation in progress"):
        custodian.submit_root_share(mnemonics[0], "nonce")
    nonce = custodian.start_root_generation(None).nonce
    with pytest.raises(ConflictError, match="already in progress"):
        custodian.start_root_generation(None)
    custodian.submit_root_share(mnemonics[0], nonce)
    with pytest.raises(InvalidRequestError, match="nonce does not match"):
        custodian.submit_root_share(mnemonics[1], "another-nonce")
    with pytest.raises(InvalidShareError, match="already submitted"):
        custodian.submit_root_share(mnemonics[0], nonce)
    with pytest.raises(InvalidShareError, match="another share set"):
        custodian.submit_root_share(foreign[1], nonce)
    with pytest.raises(InvalidShareError, match="words"):
        custodian.submit_root_share("not a share", nonce)
    assert custodian.root_generation_status().progress == 1
    assert custodian.status().progress == 0  # unseal progress is a different collection


def test_wrong_secret_resets_root_generation(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonics, descriptor = share_set
    impostor = ShareSetDescriptor(**{**descriptor.__dict__, "verifier": bytes(32)})
    custodian, store = make_custodian(impostor)
    custodian._unsealed = True  # as if unsealed by the right quorum
    nonce = custodian.start_root_generation(None).nonce
    custodian.submit_root_share(mnemonics[0], nonce)
    custodian.submit_root_share(mnemonics[1], nonce)
    with pytest.raises(InvalidShareError, match="root generation progress was reset"):
        custodian.submit_root_share(mnemonics[2], nonce)
    assert custodian.root_generation_status().progress == 0
    assert store.tokens == {}


def test_attempt_expires_cancel_and_seal_drop_it(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonics, _ = share_set
    clock = FakeClock()
    custodian, _ = unsealed(share_set, clock)
    nonce = custodian.start_root_generation(None).nonce
    custodian.submit_root_share(mnemonics[0], nonce)
    clock.t += 601
    assert custodian.root_generation_status().started is False
    with pytest.raises(InvalidRequestError, match="no root generation in progress"):
        custodian.submit_root_share(mnemonics[1], nonce)
    custodian.start_root_generation(None)  # an expired attempt does not block a new one
    assert custodian.cancel_root_generation().started is False
    assert custodian.cancel_root_generation().started is False  # idempotent, as Vault
    custodian.start_root_generation(None)
    custodian.seal()
    with pytest.raises(SealedError):
        custodian.root_generation_status()
    for share in mnemonics[:3]:
        custodian.submit(share)
    assert custodian.root_generation_status().started is False


def test_sealed_and_uninitialised_refuse(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    _, descriptor = share_set
    sealed, _ = make_custodian(descriptor)
    for call in (
        sealed.root_generation_status,
        lambda: sealed.start_root_generation(None),
        lambda: sealed.submit_root_share("x", "y"),
        sealed.cancel_root_generation,
    ):
        with pytest.raises(SealedError):
            call()
    blank, _ = make_custodian(None)
    with pytest.raises(NotInitializedError):
        blank.start_root_generation(None)


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_encode_decode_round_trip(seed: bytes) -> None:
    class Seeded:
        def __init__(self) -> None:
            self.counter = 0

        def bytes(self, n: int) -> bytes:
            out = b""
            while len(out) < n:
                self.counter += 1
                out += hashlib.sha256(seed + self.counter.to_bytes(4, "big")).digest()
            return out[:n]

    token = issue_token(UrandomSource()).token
    otp = generate_otp(Seeded())
    assert len(otp) == TOKEN_LENGTH
    encoded = encode_with_otp(token, otp)
    assert "=" not in encoded
    assert decode_with_otp(encoded, otp.decode()) == token


def test_decode_refuses_a_wrong_otp() -> None:
    token = issue_token(UrandomSource()).token
    otp = generate_otp(UrandomSource())
    encoded = encode_with_otp(token, otp)
    with pytest.raises(InvalidRequestError, match="use the otp of the attempt"):
        decode_with_otp(encoded, otp.decode()[:-1])
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        decode_with_otp("!!" + encoded, otp.decode())
