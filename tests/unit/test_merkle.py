from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.errors import InvalidRequestError
from kms.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

# --- known answers ----------------------------------------------------------------------------
# RFC 6962 reference vectors from transparency-dev/merkle (formerly google/certificate-transparency
# and google/trillian): rfc6962/rfc6962_test.go for the hasher, proof/verify_test.go for the
# eight-leaf reference tree, its roots, and its inclusion and consistency proofs.
# https://github.com/transparency-dev/merkle


def h(text: str) -> bytes:
    return bytes.fromhex(text)


LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
LEAF_HASHES = [leaf_hash(leaf) for leaf in LEAVES]

ROOTS = [  # ROOTS[n - 1] is the root of the first n leaves
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]

# (leaf index, tree size, proof); the Go source numbers leaves from 1.
INCLUSION_PROOFS = [
    (0, 1, []),
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]

# (old size, new size, proof)
CONSISTENCY_PROOFS = [
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]

SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_hasher_vectors() -> None:
    empty = h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert root_from_leaves([]) == empty
    assert CompactRange().root() == empty
    assert leaf_hash(b"") == h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert leaf_hash(b"L123456") == h(
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert node_hash(b"N123", b"N456") == h(
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


def test_node_is_not_a_leaf() -> None:
    left, right = leaf_hash(b"Hello"), leaf_hash(b"World")
    assert node_hash(left, right) != leaf_hash(left + right)
    assert node_hash(left, right) != node_hash(right, left)


@pytest.mark.parametrize("size", range(1, 9))
def test_reference_roots(size: int) -> None:
    expected = ROOTS[size - 1]
    assert root_from_leaves(LEAF_HASHES[:size]) == expected
    assert MerkleTree(LEAF_HASHES).root(size) == expected
    compact = CompactRange()
    for leaf in LEAF_HASHES[:size]:
        compact.append(leaf)
    assert compact.root() == expected


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_PROOFS)
def test_reference_inclusion_proofs(index: int, size: int, proof: list[bytes]) -> None:
    assert inclusion_proof(index, LEAF_HASHES[:size]) == proof
    assert MerkleTree(LEAF_HASHES).inclusion_proof(index, size) == proof
    assert verify_inclusion(LEAF_HASHES[index], index, size, proof, ROOTS[size - 1])
    for probe in corrupt_inclusion(LEAF_HASHES[index], index, size, proof, ROOTS[size - 1]):
        assert not verify_inclusion(*probe), probe


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_PROOFS)
def test_reference_consistency_proofs(old: int, new: int, proof: list[bytes]) -> None:
    assert consistency_proof(old, LEAF_HASHES[:new]) == proof
    assert MerkleTree(LEAF_HASHES).consistency_proof(old, new) == proof
    assert verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)
    if proof:
        for probe in corrupt_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof):
            assert not verify_consistency(*probe), probe


def corrupt_inclusion(
    leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes
) -> list[tuple[bytes, int, int, list[bytes], bytes]]:
    """The probes of transparency-dev/merkle's corruptInclusionProof, and a few more."""
    probes = [
        (leaf, index - 1, size, proof, root),
        (leaf, index + 1, size, proof, root),
        (leaf, index ^ 2, size, proof, root),
        (leaf, index, size * 2, proof, root),
        (leaf, index, size // 2, proof, root),
        (leaf, index, 0, proof, root),
        (leaf, size, size, proof, root),
        (leaf_hash(b"WrongLeaf"), index, size, proof, root),
        (b"WrongLeaf", index, size, proof, root),
        (leaf, index, size, proof, EMPTY_ROOT),
        (leaf, index, size, proof, SOME_HASH),
        (leaf, index, size, [*proof, b""], root),
        (leaf, index, size, [*proof, root], root),
        (leaf, index, size, [b"", *proof], root),
        (leaf, index, size, [root, *proof], root),
    ]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = bytes([proof[i][0] ^ 8]) + proof[i][1:]
        probes.append((leaf, index, size, flipped, root))
    if proof:
        probes.append((leaf, index, size, proof[:-1], root))
    if len(proof) > 1:
        probes.append((leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root))
    return probes


def corrupt_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> list[tuple[int, int, bytes, bytes, list[bytes]]]:
    """The probes of transparency-dev/merkle's corruptConsistencyProof."""
    probes = [
        (old - 1, new, old_root, new_root, proof),
        (old + 1, new, old_root, new_root, proof),
        (old ^ 2, new, old_root, new_root, proof),
        (old, new * 2, old_root, new_root, proof),
        (old, new // 2, old_root, new_root, proof),
        (old, new, b"WrongRoot", new_root, proof),
        (old, new, old_root, b"WrongRoot", proof),
        (old, new, SOME_HASH, new_root, proof),
        (old, new, old_root, SOME_HASH, proof),
        (old, new, new_root, old_root, proof),
        (old, new, old_root, new_root, []),
        (old, new, old_root, new_root, [*proof, b""]),
        (old, new, old_root, new_root, [*proof, old_root]),
        (old, new, old_root, new_root, [*proof, new_root]),
        (old, new, old_root, new_root, [b"", *proof]),
        (old, new, old_root, new_root, [old_root, *proof]),
        (old, new, old_root, new_root, [new_root, *proof]),
        (old, new, old_root, new_root, [proof[0], *proof]),
        (old, new, old_root, new_root, proof[:-1]),
    ]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = bytes([proof[i][0] ^ 16]) + proof[i][1:]
        probes.append((old, new, old_root, new_root, flipped))
    return probes


# --- edge cases and hostile input -------------------------------------------------------------


def test_single_leaf_tree() -> None:
    leaf = leaf_hash(b"data")
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [leaf], leaf)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (8, 8), (-1, 8)])
def test_inclusion_out_of_range(index: int, size: int) -> None:
    for leaf, root in [(SOME_HASH, EMPTY_ROOT), (EMPTY_ROOT, EMPTY_ROOT), (SOME_HASH, SOME_HASH)]:
        assert not verify_inclusion(leaf, index, size, [], root)


def test_consistency_trivial_cases() -> None:
    root1, root2 = leaf_hash(b"1"), leaf_hash(b"2")
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, root2, [])
    assert verify_consistency(3, 3, root1, root1, [])
    assert not verify_consistency(0, 5, root1, root2, [])  # an empty tree has the empty root
    assert not verify_consistency(3, 3, root1, root2, [])
    assert not verify_consistency(3, 3, root1, root1, [EMPTY_ROOT])
    assert not verify_consistency(0, 1, EMPTY_ROOT, root2, [EMPTY_ROOT])
    assert not verify_consistency(1, 0, root1, root2, [])
    assert not verify_consistency(2, 1, root1, root2, [root1])
    assert not verify_consistency(1, 2, root1, root2, [])


@pytest.mark.parametrize(
    "args",
    [
        (True, 1, [], EMPTY_ROOT),  # bool is not an index
        (0, 2**64, [], EMPTY_ROOT),
        (0, 1.0, [], EMPTY_ROOT),
        (0, "1", [], EMPTY_ROOT),
        (0, 2, ["ab" * 32], EMPTY_ROOT),
        (0, 2, None, EMPTY_ROOT),
        (0, 2, [EMPTY_ROOT] * 1000, EMPTY_ROOT),
        (0, 2, [EMPTY_ROOT], EMPTY_ROOT.hex()),
        (0, 2, [EMPTY_ROOT], bytearray(EMPTY_ROOT)),
    ],
)
def test_verify_inclusion_never_raises(args: tuple[object, ...]) -> None:
    assert verify_inclusion(EMPTY_ROOT, *args) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        (True, 2, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
        (1, 2**64, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
        (-1, 2, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
        (1, 2, "root", EMPTY_ROOT, [EMPTY_ROOT]),
        (1, 2, EMPTY_ROOT, EMPTY_ROOT, "proof"),
        (1, 2, EMPTY_ROOT, EMPTY_ROOT, [None]),
        (1, 2**63, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT] * 66),
    ],
)
def test_verify_consistency_never_raises(args: tuple[object, ...]) -> None:
    assert verify_consistency(*args) is False  # type: ignore[arg-type]


def test_proof_generation_refuses_bad_arguments() -> None:
    tree = MerkleTree(LEAF_HASHES)
    with pytest.raises(InvalidRequestError):
        tree.inclusion_proof(8)
    with pytest.raises(InvalidRequestError):
        tree.inclusion_proof(0, 9)
    with pytest.raises(InvalidRequestError):
        tree.inclusion_proof(0, 0)
    with pytest.raises(InvalidRequestError):
        tree.consistency_proof(5, 4)
    with pytest.raises(InvalidRequestError):
        tree.consistency_proof(-1)
    with pytest.raises(InvalidRequestError):
        MerkleTree([b"short"])
    assert tree.consistency_proof(0) == []
    assert tree.consistency_proof(8) == []
    assert MerkleTree([]).root() == EMPTY_ROOT


# --- compact ranges ---------------------------------------------------------------------------


def test_compact_range_round_trip_and_rejects() -> None:
    compact = CompactRange()
    assert compact.to_json() == {"size": 0, "hashes": []}
    for n, leaf in enumerate(LEAF_HASHES[:7], 1):
        compact.append(leaf)
        restored = CompactRange.from_json(compact.to_json())
        assert restored == compact
        assert restored.root() == ROOTS[n - 1]
        assert len(compact.hashes) == n.bit_count()
    copy = compact.copy()
    copy.append(LEAF_HASHES[7])
    assert copy.root() == ROOTS[7]
    assert compact.root() == ROOTS[6]
    assert copy != compact
    for bad in [
        None,
        [],
        {"size": 1, "hashes": []},
        {"size": 2, "hashes": [LEAF_HASHES[0].hex()] * 2},
        {"size": True, "hashes": [LEAF_HASHES[0].hex()]},
        {"size": 1, "hashes": [LEAF_HASHES[0].hex().upper()]},
        {"size": 1, "hashes": [LEAF_HASHES[0].hex()[:-2]]},
        {"size": 1, "hashes": LEAF_HASHES[0].hex()},
        {"size": 1, "hashes": [LEAF_HASHES[0].hex()], "extra": 1},
        {"size": -1, "hashes": []},
    ]:
        with pytest.raises(InvalidRequestError):
            CompactRange.from_json(bad)
    with pytest.raises(InvalidRequestError):
        compact.append(b"short")


# --- properties, against the recursive definitions of RFC 9162 ------------------------------


def mth(leaves: list[bytes]) -> bytes:
    """MTH of RFC 9162 section 2.1.1, written as the RFC does (over leaf hashes)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], *, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], complete=complete), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], complete=False), mth(leaves[:k])]


EXTRA_LEAF = leaf_hash(b"longer than any drawn leaf")
distinct_leaves = st.lists(st.binary(max_size=8), min_size=1, max_size=40, unique=True).map(
    lambda data: [leaf_hash(d) for d in data]
)


def flip(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(distinct_leaves)
def test_every_size_agrees_with_the_rfc_definitions(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    compact = CompactRange()
    for size in range(1, len(leaves) + 1):
        compact.append(leaves[size - 1])
        assert compact.root() == mth(leaves[:size]) == tree.root(size)
        assert root_from_leaves(leaves[:size]) == compact.root()
        assert CompactRange.from_json(compact.to_json()).root() == compact.root()
    for index in range(len(leaves)):
        assert tree.inclusion_proof(index) == path(index, leaves)
    for old in range(1, len(leaves) + 1):
        assert tree.consistency_proof(old) == subproof(old, leaves, complete=True)


@settings(max_examples=60, deadline=None)
@given(distinct_leaves, st.data())
def test_inclusion_proofs_verify_and_tampering_fails(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    size = len(leaves)
    root = tree.root()
    for index in range(size):
        assert verify_inclusion(leaves[index], index, size, tree.inclusion_proof(index), root)
    index = data.draw(st.integers(0, size - 1))
    proof = tree.inclusion_proof(index)
    bit = data.draw(st.integers(0, 255))
    assert not verify_inclusion(flip(leaves[index], bit), index, size, proof, root)
    assert not verify_inclusion(leaves[index], index, size, proof, flip(root, bit))
    for i in range(len(proof)):
        tampered = [*proof]
        tampered[i] = flip(proof[i], bit)
        assert not verify_inclusion(leaves[index], index, size, tampered, root)
    for other in range(size + 2):
        if other != index:
            assert not verify_inclusion(leaves[index], other, size, proof, root)
    # The size comes with its root in a signed head: a proof must fail against any other head
    # of this log, or of the log grown by one. (With the root left unchanged, a size whose
    # tree has the same shape along the leaf's path passes; RFC 9162 never pairs them so.)
    longer = MerkleTree([*leaves, EXTRA_LEAF])
    for other_size in range(index + 1, size + 2):
        if other_size != size:
            other_root = longer.root(other_size)
            assert not verify_inclusion(leaves[index], index, other_size, proof, other_root)


@settings(max_examples=60, deadline=None)
@given(distinct_leaves, st.data())
def test_consistency_proofs_verify_and_tampering_fails(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    size = len(leaves)
    root = tree.root()
    for old in range(size + 1):
        assert verify_consistency(old, size, tree.root(old), root, tree.consistency_proof(old))
    old = data.draw(st.integers(1, size))
    proof = tree.consistency_proof(old)
    bit = data.draw(st.integers(0, 255))
    old_root = tree.root(old)
    assert not verify_consistency(old, size, flip(old_root, bit), root, proof)
    assert not verify_consistency(old, size, old_root, flip(root, bit), proof)
    for i in range(len(proof)):
        tampered = [*proof]
        tampered[i] = flip(proof[i], bit)
        assert not verify_consistency(old, size, old_root, root, tampered)
    for other in range(1, size + 1):  # another old head of this log, with its own root
        if other != old:
            assert not verify_consistency(other, size, tree.root(other), root, proof)
            assert not verify_consistency(other, size, old_root, root, proof)
    longer = MerkleTree([*leaves, EXTRA_LEAF])
    for other_size in range(old, size + 2):  # any other new head, with its own root
        if other_size != size:
            other_root = longer.root(other_size)
            assert not verify_consistency(old, other_size, old_root, other_root, proof)
