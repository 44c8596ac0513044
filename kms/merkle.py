"""RFC 9162 (RFC 6962) Merkle tree hashing with SHA-256, for a tamper-evident audit log.

A log that commits to its records with a Merkle tree head can prove two things to someone who
does not trust it: that a record is in the log (an inclusion proof) and that today's log extends
yesterday's without rewriting it (a consistency proof). Leaves and interior nodes are hashed
under different one-byte prefixes, so a node can never be passed off as a leaf.

The verifiers follow RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step. Their inputs come from
whoever holds the log, so they answer ``False`` for anything wrong, including sizes out of range,
proofs of the wrong length and values of the wrong type, and never raise.

``CompactRange`` is what the service keeps between batches: one hash per perfect subtree, so
appending and computing the root cost O(log n). ``MerkleTree`` keeps every perfect subtree of
an exported log, so that proofs for all of its records cost O(n log n) together, not O(n²).
There is no I/O here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import TYPE_CHECKING, Any

from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_TREE_SIZE = 2**64 - 1  # RFC 9162 tree sizes are uint64

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_MAX_PROOF_LENGTH = 65  # a consistency proof: one hash per level, plus the old tree's subtree


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root_from_leaves(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH of RFC 9162 section 2.1.1 in one pass, without the definition's recursion and slices."""
    compact = CompactRange()
    for leaf in leaf_hashes:
        compact.append(leaf)
    return compact.root()


def _fold(subtree_roots: Sequence[bytes]) -> bytes:
    """The root over perfect subtrees listed left to right, largest first (RFC 9162 MTH)."""
    if not subtree_roots:
        return EMPTY_ROOT
    root = subtree_roots[-1]
    for left in reversed(subtree_roots[:-1]):
        root = node_hash(left, root)
    return root


class CompactRange:
    """The roots of the perfect subtrees that make up a log of ``size`` leaves.

    One root per set bit of ``size``, largest (leftmost) first. This is all a writer needs to
    keep to extend the log and sign its next tree head, without reading old records back.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, *, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        """Start empty, or resume from a stored range; a range that cannot be right is refused.

        A wrong count would silently give every later tree head a wrong root.
        """
        self._hashes = list(hashes)
        if not _is_size(size) or len(self._hashes) != size.bit_count():
            raise InvalidRequestError("compact range must hold one hash per set bit of its size")
        if not _are_hashes(*self._hashes):
            raise InvalidRequestError(f"compact range hashes must be {HASH_SIZE} bytes")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        if not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE:
            raise InvalidRequestError(f"a leaf hash must be {HASH_SIZE} bytes")
        if self._size >= MAX_TREE_SIZE:
            raise InvalidRequestError("the log is full")
        self._hashes.append(leaf)
        carry = self._size
        while carry & 1:  # two subtrees of equal height merge into one, as in binary addition
            right = self._hashes.pop()
            self._hashes[-1] = node_hash(self._hashes[-1], right)
            carry >>= 1
        self._size += 1

    def root(self) -> bytes:
        return _fold(self._hashes)

    def copy(self) -> CompactRange:
        return CompactRange(size=self._size, hashes=self._hashes)

    def to_json(self) -> dict[str, Any]:
        return {"size": self._size, "hashes": [h.hex() for h in self._hashes]}

    @classmethod
    def from_json(cls, obj: object) -> CompactRange:
        if not isinstance(obj, dict) or set(obj) != {"size", "hashes"}:
            raise InvalidRequestError("compact range must be an object with size and hashes")
        size, hashes = obj["size"], obj["hashes"]
        if not _is_size(size):
            raise InvalidRequestError("compact range size must be an integer in [0, 2**64)")
        if not isinstance(hashes, list):
            raise InvalidRequestError("compact range hashes must be a list")
        if not all(isinstance(h, str) and _HEX_HASH.fullmatch(h) for h in hashes):
            raise InvalidRequestError("compact range hashes must be 64 lowercase hex digits")
        return cls(size=size, hashes=[bytes.fromhex(h) for h in hashes])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other.size and self.hashes == other.hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


class MerkleTree:
    """Every perfect subtree of a log, so any root or proof over a prefix costs O(log² n).

    ``levels[h][i]`` is the root of leaves ``[i·2^h, (i+1)·2^h)``; a level holds only the
    subtrees that are complete. Memory is about two hashes per leaf.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Iterable[bytes]) -> None:
        leaves = list(leaf_hashes)
        if not all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in leaves):
            raise InvalidRequestError(f"leaf hashes must be {HASH_SIZE} bytes")
        levels = [leaves]
        while len(levels[-1]) > 1:
            below = levels[-1]
            levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        self._levels = levels

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def root(self, size: int | None = None) -> bytes:
        return self._range_hash(0, self._size_arg(size, "size"))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 section 2.1.3.1."""
        end = self._size_arg(size, "size")
        if not isinstance(index, int) or not 0 <= index < end:
            raise InvalidRequestError(f"leaf index {index} is not in a tree of size {end}")
        proof: list[bytes] = []
        start = 0
        while end - start > 1:
            split = start + _largest_power_of_two_below(end - start)
            if index < split:
                proof.append(self._range_hash(split, end))
                end = split
            else:
                proof.append(self._range_hash(start, split))
                start = split
        proof.reverse()  # the recursion appends the top sibling last
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[0:new_size]) of RFC 9162 section 2.1.4.1.

        Empty when ``old_size`` is 0 or equals ``new_size``: there is nothing to prove.
        """
        end = self._size_arg(new_size, "new size")
        if not isinstance(old_size, int) or not 0 <= old_size <= end:
            raise InvalidRequestError(f"old size {old_size} is not in [0, {end}]")
        if old_size in {0, end}:
            return []
        proof: list[bytes] = []
        start, complete = 0, True  # ``complete``: the b flag of SUBPROOF
        while old_size != end:
            split = start + _largest_power_of_two_below(end - start)
            if old_size <= split:
                proof.append(self._range_hash(split, end))
                end = split
            else:
                proof.append(self._range_hash(start, split))
                start, complete = split, False
        if not complete:
            proof.append(self._range_hash(start, end))
        proof.reverse()
        return proof

    def _size_arg(self, size: int | None, name: str) -> int:
        if size is None:
            return self.size
        if not isinstance(size, int) or not 0 <= size <= self.size:
            raise InvalidRequestError(f"{name} {size} is not in [0, {self.size}]")
        return size

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for ranges whose start is aligned to a power of two >= their length.

        Such a range is a run of perfect subtrees, largest first, all of them stored.
        """
        roots: list[bytes] = []
        while start < end:
            height = (end - start).bit_length() - 1
            roots.append(self._levels[height][start >> height])
            start += 1 << height
        return _fold(roots)


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The audit path for one leaf of the whole tree; see ``MerkleTree`` for many leaves."""
    return MerkleTree(leaf_hashes).inclusion_proof(index)


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Proof that the tree of the first ``old_size`` leaves is a prefix of the whole tree."""
    return MerkleTree(leaf_hashes).consistency_proof(old_size)


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2, with type and range checks in front of it."""
    if not (_is_size(index) and _is_size(size) and _are_hashes(leaf_hash, root)):
        return False
    if not _is_proof(proof) or index >= size:
        return False
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2, plus the two cases it leaves out because nothing is proved.

    Equal sizes need equal roots and an empty proof; an empty old tree needs the empty root
    and an empty proof (stricter than some libraries, which ignore the old root there).
    """
    if not (_is_size(old_size) and _is_size(new_size) and _are_hashes(old_root, new_root)):
        return False
    if not _is_proof(proof) or old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old_size == 0:
        return not proof and hmac.compare_digest(old_root, EMPTY_ROOT)
    return _verify_consistency_path(old_size, new_size, old_root, new_root, list(proof))


def _verify_consistency_path(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: list[bytes]
) -> bool:
    """Steps 1 to 7 of RFC 9162 section 2.1.4.2, for 0 < first < second, in its own names."""
    if not path:
        return False
    if first & (first - 1) == 0:
        path.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(fr, first_hash) and hmac.compare_digest(sr, second_hash)


def _largest_power_of_two_below(n: int) -> int:
    """k of RFC 9162: the largest power of two smaller than ``n`` (``n`` > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_size(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TREE_SIZE


def _are_hashes(*values: object) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)


def _is_proof(proof: object) -> bool:
    """A list or tuple of hashes, no longer than any proof in a tree of up to 2**64 leaves.

    The bound only keeps an attacker from making us hash a long list; lengths the algorithm
    cannot use are refused by the algorithm itself.
    """
    return (
        isinstance(proof, (list, tuple)) and len(proof) <= _MAX_PROOF_LENGTH and _are_hashes(*proof)
    )
