"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Hashes (RFC 9162 §2.1.1), with SHA-256 and domain-separated leaves and nodes::

    MTH({})       = SHA-256("")                        (EMPTY_ROOT)
    leaf hash     = SHA-256(0x00 || data)
    node hash     = SHA-256(0x01 || left || right)
    MTH(D[n])     = node hash(MTH(D[0:k]), MTH(D[k:n]))  k = largest power of 2 < n

Everything here works on *leaf hashes*: callers hash their entries with :func:`leaf_hash`
once, keep the 32-byte results, and pass sequences of them around.

- :class:`CompactTree` is the append-only frontier of a log ("compact range"): the roots of
  the perfect subtrees that make up the first ``size`` leaves, one per set bit of ``size``.
  Appending is O(log n) and so is the root; an export that starts mid-log carries the
  frontier of its start and a verifier continues from it with :meth:`CompactTree.from_frontier`.
- :func:`inclusion_proof` and :func:`consistency_proof` are RFC 9162 PATH and PROOF. Each
  hashes O(n) leaves at worst; the optional ``cache`` (a dict) keeps the roots of large
  perfect subtrees, which never change in an append-only log, so later proofs cost
  O(log n) lookups plus a few hundred hashes.
- :func:`verify_inclusion` and :func:`verify_consistency` are the iterative algorithms of
  RFC 9162 §2.1.3.2 and §2.1.4.2. They take untrusted input, return ``False`` for anything
  malformed (wrong types, hashes that are not 32 bytes, impossible sizes) and never raise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Final, TypeAlias

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "CompactTree",
    "SubtreeCache",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
#: Tree sizes are unsigned 64-bit integers on the wire (RFC 9162, C2SP tlog-checkpoint).
MAX_TREE_SIZE: Final = 2**64 - 1
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
# Perfect subtrees of 2**8 leaves and up go in the proof cache: about n/128 entries for a
# log of n leaves, and a cold subtree below that size costs at most 255 hashes to rebuild.
_CACHE_MIN_LEVEL: Final = 8

#: Roots of aligned perfect subtrees keyed by (first leaf index, height), for one log only.
SubtreeCache: TypeAlias = MutableMapping[tuple[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """The RFC 6962 hash of one log entry: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TREE_SIZE


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2): where MTH splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def _push(stack: list[bytes], count: int, node: bytes) -> None:
    # ``count`` leaves are already folded into ``stack``; each trailing one bit of ``count``
    # is a perfect subtree of the same height as the new node, so the two merge.
    while count & 1:
        node = node_hash(stack.pop(), node)
        count >>= 1
    stack.append(node)


def _fold(stack: Sequence[bytes]) -> bytes:
    # The perfect subtrees of a frontier, left to right, hang off the right spine of MTH.
    root = stack[-1]
    for node in reversed(stack[:-1]):
        root = node_hash(node, root)
    return root


def _root_of(hashes: Iterable[bytes]) -> bytes:
    stack: list[bytes] = []
    for count, h in enumerate(hashes):
        _push(stack, count, h)
    return _fold(stack) if stack else EMPTY_ROOT


class CompactTree:
    """The frontier of an append-only RFC 6962 log: enough to append and to compute the root.

    ``frontier()`` holds one perfect-subtree root per set bit of ``size``, largest (leftmost)
    first, so it has ``popcount(size)`` hashes, at most 64.
    """

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @classmethod
    def from_frontier(cls, size: int, frontier: Sequence[bytes]) -> CompactTree:
        """Continue a log from the frontier of its first ``size`` leaves.

        Raises:
            ValueError: if ``size`` is out of range, the frontier does not have one hash per
                set bit of ``size``, or a hash is not 32 bytes.
        """
        if not _is_size(size):
            raise ValueError("size must be an integer in [0, 2**64 - 1]")
        if len(frontier) != size.bit_count():
            raise ValueError("a frontier has one hash per set bit of the tree size")
        if not all(_is_hash(h) for h in frontier):
            raise ValueError("frontier hashes must be 32 bytes")
        tree = cls()
        tree._size = size
        tree._stack = list(frontier)
        return tree

    @property
    def size(self) -> int:
        """The number of leaves appended so far (including those before the frontier)."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Append one leaf by its :func:`leaf_hash`.

        Raises:
            ValueError: if ``leaf_hash`` is not 32 bytes or the tree is full.
        """
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if self._size >= MAX_TREE_SIZE:
            raise ValueError("the tree is full")
        _push(self._stack, self._size, leaf_hash)
        self._size += 1

    def root(self) -> bytes:
        """MTH of the leaves appended so far (:data:`EMPTY_ROOT` when there are none)."""
        return _fold(self._stack) if self._stack else EMPTY_ROOT

    def frontier(self) -> list[bytes]:
        """The perfect-subtree roots, leftmost first (a copy)."""
        return list(self._stack)

    def copy(self) -> CompactTree:
        """An independent tree with the same size and frontier."""
        return CompactTree.from_frontier(self._size, self._stack)

    def __repr__(self) -> str:
        return f"CompactTree(size={self._size}, root={self.root().hex()})"


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of a whole sequence of leaf hashes, in O(n) hashes and O(log n) memory."""
    return _root_of(leaf_hashes)


def _perfect_root(leaves: Sequence[bytes], start: int, level: int, cache: SubtreeCache | None) -> bytes:
    """MTH of the aligned perfect subtree ``leaves[start : start + 2**level]``."""
    if cache is None or level < _CACHE_MIN_LEVEL:
        return _root_of(leaves[i] for i in range(start, start + (1 << level)))
    key = (start, level)
    cached = cache.get(key)
    if cached is None:
        half = 1 << (level - 1)
        cached = node_hash(_perfect_root(leaves, start, level - 1, cache),
                           _perfect_root(leaves, start + half, level - 1, cache))
        cache[key] = cached
    return cached


def _range_root(leaves: Sequence[bytes], start: int, end: int, cache: SubtreeCache | None) -> bytes:
    """MTH(leaves[start:end]) for a range that MTH's own recursion produces.

    Such a range splits into aligned perfect subtrees of decreasing size, which is what
    lets their roots be cached by (start, level).
    """
    parts: list[bytes] = []
    while end - start > 0:
        width = end - start
        step = width if width & (width - 1) == 0 else _split(width)
        parts.append(_perfect_root(leaves, start, step.bit_length() - 1, cache))
        start += step
    return _fold(parts)


def inclusion_proof(
    leaf_hashes: Sequence[bytes], index: int, size: int, *, cache: SubtreeCache | None = None
) -> list[bytes]:
    """RFC 9162 PATH(index, D[size]): the audit path of one leaf, bottom-up.

    Args:
        leaf_hashes: the log's leaf hashes; only the first ``size`` are read.
        index: position of the leaf, ``0 <= index < size``.
        size: tree size the proof is for.
        cache: optional dict of perfect-subtree roots keyed by ``(start, level)``, shared
            between calls over the *same* append-only log (never between different logs).

    Raises:
        ValueError: if ``index``/``size`` are out of range for ``leaf_hashes``.
    """
    if not (_is_size(index) and _is_size(size)) or not index < size <= len(leaf_hashes):
        raise ValueError("need 0 <= index < size <= len(leaf_hashes)")
    siblings: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            siblings.append(_range_root(leaf_hashes, mid, end, cache))
            end = mid
        else:
            siblings.append(_range_root(leaf_hashes, start, mid, cache))
            start = mid
    siblings.reverse()
    return siblings


def consistency_proof(
    leaf_hashes: Sequence[bytes], old_size: int, new_size: int, *, cache: SubtreeCache | None = None
) -> list[bytes]:
    """RFC 9162 PROOF(old_size, D[new_size]): shows D[old_size] is a prefix of D[new_size].

    The proof is empty when ``old_size`` is 0 or equals ``new_size``.

    Args:
        leaf_hashes: the log's leaf hashes; only the first ``new_size`` are read.
        old_size: size of the earlier tree.
        new_size: size of the later tree.
        cache: as for :func:`inclusion_proof`.

    Raises:
        ValueError: unless ``0 <= old_size <= new_size <= len(leaf_hashes)``.
    """
    if not (_is_size(old_size) and _is_size(new_size)) or not old_size <= new_size <= len(leaf_hashes):
        raise ValueError("need 0 <= old_size <= new_size <= len(leaf_hashes)")
    if old_size in (0, new_size):
        return []
    # SUBPROOF(m, D[start:end], whole), walked from the top; ``whole`` stays true while the
    # old tree is a left part of the current range, so its root is known to the verifier.
    nodes: list[bytes] = []
    start, end, whole = 0, new_size, True
    while True:
        if old_size == end:
            if not whole:
                nodes.append(_range_root(leaf_hashes, start, end, cache))
            break
        mid = start + _split(end - start)
        if old_size <= mid:
            nodes.append(_range_root(leaf_hashes, mid, end, cache))
            end = mid
        else:
            nodes.append(_range_root(leaf_hashes, start, mid, cache))
            start, whole = mid, False
    nodes.reverse()
    return nodes


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether ``proof`` shows ``leaf_hash`` at ``index`` in the tree of ``size`` with ``root``.

    RFC 9162 §2.1.3.2. Returns ``False`` for any malformed input; never raises.
    """
    if not (_is_hash(leaf_hash) and _is_hash(root) and _is_size(index) and _is_size(size)):
        return False
    if index >= size or not isinstance(proof, (list, tuple)):
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0 or not _is_hash(p):
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # A right-edge node with no right sibling: climb until it is a right child.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows tree (old_size, old_root) is a prefix of tree (new_size, new_root).

    RFC 9162 §2.1.4.2, plus the cases it leaves out: equal sizes need equal roots and an
    empty proof; an old size of 0 needs an empty proof and ``old_root == EMPTY_ROOT`` (as
    does any tree of size 0). Returns ``False`` for any malformed input; never raises.
    """
    if not (_is_size(old_size) and _is_size(new_size) and _is_hash(old_root) and _is_hash(new_root)):
        return False
    if not isinstance(proof, (list, tuple)) or not all(_is_hash(p) for p in proof):
        return False
    if old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root and (old_size > 0 or old_root == EMPTY_ROOT)
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    # An old tree that is a perfect subtree is itself a node of the new tree: the proof
    # omits it, and the verifier starts from its root.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
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
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
