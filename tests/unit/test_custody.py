from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.custody import (
    ShareCollector,
    ShareSetDescriptor,
    parse_share,
    recover_secret,
    split_secret,
    validate_quorum,
)
from kms.errors import InvalidRequestError, InvalidShareError


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def share_set() -> tuple[list[str], ShareSetDescriptor]:
    return split_secret(SECRET, 3, 5, now=0.0)


@pytest.mark.parametrize(
    ("threshold", "shares", "ok"),
    [
        (3, 5, True),
        (2, 2, True),
        (16, 16, True),
        (1, 1, True),
        (1, 3, False),
        (4, 3, False),
        (2, 17, False),
        (0, 0, False),
    ],
)
def test_quorum_bounds(threshold: int, shares: int, ok: bool) -> None:
    if ok:
        validate_quorum(threshold, shares)
    else:
        with pytest.raises(InvalidRequestError):
            validate_quorum(threshold, shares)


def test_every_three_share_subset_unseals(share_set: tuple[list[str], ShareSetDescriptor]) -> None:
    mnemonics, descriptor = share_set
    for subset in itertools.combinations(mnemonics, 3):
        collector = ShareCollector(descriptor, FakeClock(), 600)
        progress = [collector.submit(m) for m in subset]
        assert [p.progress for p in progress[:2]] == [1, 2]
        assert progress[-1].secret == bytearray(SECRET)
        assert collector.progress == 0  # done: nothing lingers


def test_two_shares_do_not_unseal(share_set: tuple[list[str], ShareSetDescriptor]) -> None:
    mnemonics, descriptor = share_set
    collector = ShareCollector(descriptor, FakeClock(), 600)
    assert collector.submit(mnemonics[0]).secret is None
    assert collector.submit(mnemonics[4]).secret is None
    assert collector.progress == 2


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda m: " ".join(m.split()[:-1]), "words"),
        (lambda m: m.replace(m.split()[5], "zzzz", 1), "word 6"),
        (
            lambda m: " ".join([*m.split()[:10], m.split()[11], m.split()[10], *m.split()[12:]]),
            "checksum",
        ),
        (lambda _m: "", "0 words"),
    ],
)
def test_malformed_share_keeps_progress(
    share_set: tuple[list[str], ShareSetDescriptor], mangle: object, message: str
) -> None:
    mnemonics, descriptor = share_set
    collector = ShareCollector(descriptor, FakeClock(), 600)
    collector.submit(mnemonics[0])
    bad = mangle(mnemonics[1])  # type: ignore[operator]
    with pytest.raises(InvalidShareError, match=message) as info:
        collector.submit(bad)
    # No run of three share words appears: single words ("order", "check") may, by chance.
    words = mnemonics[1].split()
    for i in range(len(words) - 2):
        assert " ".join(words[i : i + 3]) not in str(info.value)
    assert collector.progress == 1


def test_foreign_and_duplicate_shares_keep_progress(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonics, descriptor = share_set
    foreign, _ = split_secret(bytes(32), 3, 5, now=0.0)
    collector = ShareCollector(descriptor, FakeClock(), 600)
    collector.submit(mnemonics[0])
    with pytest.raises(InvalidShareError, match="another share set"):
        collector.submit(foreign[1])
    with pytest.raises(InvalidShareError, match="already submitted"):
        collector.submit(mnemonics[0])
    assert collector.progress == 1
    assert collector.submit(mnemonics[1]).progress == 2


def test_wrong_secret_resets(share_set: tuple[list[str], ShareSetDescriptor]) -> None:
    mnemonics, descriptor = share_set
    impostor = ShareSetDescriptor(**{**descriptor.__dict__, "verifier": bytes(32)})
    collector = ShareCollector(impostor, FakeClock(), 600)
    collector.submit(mnemonics[0])
    collector.submit(mnemonics[1])
    with pytest.raises(InvalidShareError, match="progress was reset"):
        collector.submit(mnemonics[2])
    assert collector.progress == 0


def test_progress_expires(share_set: tuple[list[str], ShareSetDescriptor]) -> None:
    mnemonics, descriptor = share_set
    clock = FakeClock()
    collector = ShareCollector(descriptor, clock, 60)
    collector.submit(mnemonics[0])
    first_nonce = collector.nonce
    clock.t += 61
    assert collector.progress == 0
    status = collector.submit(mnemonics[1])
    assert status.progress == 1
    assert status.nonce != first_nonce


def test_descriptor_round_trips_and_holds_no_secret(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    _, descriptor = share_set
    data = descriptor.to_json()
    assert ShareSetDescriptor.from_json(data) == descriptor
    assert SECRET.hex() not in str(data)
    assert descriptor.shares_needed == 3
    assert descriptor.share_count == 5


@settings(max_examples=12, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    quorum=st.integers(min_value=2, max_value=6).flatmap(
        lambda n: st.tuples(st.integers(min_value=2, max_value=n), st.just(n))
    ),
    data=st.data(),
)
def test_split_combine_round_trip(
    secret: bytes, quorum: tuple[int, int], data: st.DataObject
) -> None:
    threshold, shares = quorum
    mnemonics, _ = split_secret(secret, threshold, shares, now=0.0)
    chosen = data.draw(st.permutations(mnemonics)).__getitem__(slice(threshold))
    assert recover_secret(chosen) == bytearray(secret)
    if threshold > 1:
        with pytest.raises(InvalidShareError):
            recover_secret(chosen[:-1])


def test_parse_share_normalises_case_and_spacing(
    share_set: tuple[list[str], ShareSetDescriptor],
) -> None:
    mnemonic = share_set[0][0]
    assert parse_share("  " + mnemonic.upper().replace(" ", "   ") + "\n") == parse_share(mnemonic)
