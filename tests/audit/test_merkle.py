"""RFC 6962 / RFC 9162 Merkle trees: published vectors, exhaustive small trees, negatives.

Vectors: the eight reference leaves, the root for every size 0..8 and the known inclusion and
consistency proofs come from transparency-dev/merkle ``proof/verify_test.go`` (the same data
as certificate-transparency-go's merkletree tests). Its inclusion vectors number leaves from
1; here they are converted to 0-based indices.

The generators are also checked against a naive transcription of the RFC's recursive MTH,
PATH and SUBPROOF definitions (``_mth``, ``_path``, ``_subproof`` below) for every size up to
40, and the verifiers against every tampering of every proof for those sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from keygrants.audit.merkle import (
    EMPTY_ROOT,
    MAX_TREE_SIZE,
    CompactTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

# --- published vectors (transparency-dev/merkle proof/verify_test.go) -----------------------

REFERENCE_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
REFERENCE_ROOTS = [  # index = tree size
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
REFERENCE_INCLUSION = [  # (0-based index, size, proof)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 1, []),
]
REFERENCE_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]

REF_HASHES = [leaf_hash(d) for d in REFERENCE_LEAVES]
ROOTS = [bytes.fromhex(r) for r in REFERENCE_ROOTS]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _h(proof: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(p) for p in proof]


# --- naive RFC transcription, the oracle for the exhaustive tests ----------------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _mth(d: Sequence[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + _mth(d[:k]) + _mth(d[k:])).digest()


def _path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*_path(m, d[:k]), _mth(d[k:])]
    return [*_path(m - k, d[k:]), _mth(d[:k])]


def _subproof(m: int, d: Sequence[bytes], whole: bool) -> list[bytes]:
    if m == len(d):
        return [] if whole else [_mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*_subproof(m, d[:k], whole), _mth(d[k:])]
    return [*_subproof(m - k, d[k:], False), _mth(d[:k])]


N = 40
LEAVES = [leaf_hash(b"leaf %d" % i) for i in range(N)]
TREE_ROOTS = [_mth(LEAVES[:n]) for n in range(N + 1)]


def _flip(data: bytes, bit: int = 0) -> bytes:
    return bytes([data[0] ^ (1 << bit)]) + data[1:]


# --- hashing ----------------------------------------------------------------------------------


def test_hash_prefixes_and_empty_root() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOTS[0]
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest() == ROOTS[1]
    assert node_hash(REF_HASHES[0], REF_HASHES[1]) == ROOTS[2]
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()


@pytest.mark.parametrize("size", range(len(REFERENCE_ROOTS)))
def test_reference_roots(size: int) -> None:
    assert root_from_leaves(REF_HASHES[:size]) == ROOTS[size]
    tree = CompactTree()
    for h in REF_HASHES[:size]:
        tree.append(h)
    assert tree.size == size
    assert tree.root() == ROOTS[size]


def test_reference_frontier() -> None:
    tree = CompactTree()
    for h in REF_HASHES[:7]:
        tree.append(h)
    # 7 = 4 + 2 + 1: the root of leaves 0..3, of leaves 4..5, then leaf 6.
    assert tree.frontier() == [ROOTS[4], node_hash(REF_HASHES[4], REF_HASHES[5]), REF_HASHES[6]]


@pytest.mark.parametrize(("index", "size", "proof"), REFERENCE_INCLUSION)
def test_reference_inclusion(index: int, size: int, proof: list[str]) -> None:
    assert inclusion_proof(REF_HASHES, index, size) == _h(proof)
    assert verify_inclusion(REF_HASHES[index], index, size, _h(proof), ROOTS[size])


@pytest.mark.parametrize(("old", "new", "proof"), REFERENCE_CONSISTENCY)
def test_reference_consistency(old: int, new: int, proof: list[str]) -> None:
    assert consistency_proof(REF_HASHES, old, new) == _h(proof)
    assert verify_consistency(old, new, ROOTS[old], ROOTS[new], _h(proof))


# --- CompactTree ------------------------------------------------------------------------------


def test_compact_tree_matches_mth_at_every_size() -> None:
    tree = CompactTree()
    assert tree.size == 0
    assert tree.root() == EMPTY_ROOT
    assert tree.frontier() == []
    for n, h in enumerate(LEAVES, start=1):
        tree.append(h)
        assert tree.size == n
        assert tree.root() == TREE_ROOTS[n] == root_from_leaves(LEAVES[:n])
        assert len(tree.frontier()) == n.bit_count()


@pytest.mark.parametrize("start", range(N + 1))
def test_from_frontier_continues(start: int) -> None:
    head = CompactTree()
    for h in LEAVES[:start]:
        head.append(h)
    tail = CompactTree.from_frontier(start, head.frontier())
    assert tail.size == start
    assert tail.root() == TREE_ROOTS[start]
    for n in range(start + 1, N + 1):
        tail.append(LEAVES[n - 1])
        assert tail.root() == TREE_ROOTS[n]


def test_from_frontier_rejects_bad_input() -> None:
    tree = CompactTree()
    for h in LEAVES[:7]:
        tree.append(h)
    frontier = tree.frontier()
    with pytest.raises(ValueError):
        CompactTree.from_frontier(6, frontier)  # 6 has two set bits, not three
    with pytest.raises(ValueError):
        CompactTree.from_frontier(7, frontier[:2])
    with pytest.raises(ValueError):
        CompactTree.from_frontier(7, [*frontier[:2], frontier[2][:31]])
    with pytest.raises(ValueError):
        CompactTree.from_frontier(-1, [])
    with pytest.raises(ValueError):
        CompactTree.from_frontier(MAX_TREE_SIZE + 1, [SOME_HASH] * 1)
    assert CompactTree.from_frontier(0, []).root() == EMPTY_ROOT


def test_append_rejects_non_hashes_and_full_tree() -> None:
    tree = CompactTree()
    for bad in (b"", b"x" * 31, b"x" * 33, "x" * 32):
        with pytest.raises(ValueError):
            tree.append(bad)  # type: ignore[arg-type]
    assert tree.size == 0
    full = CompactTree.from_frontier(MAX_TREE_SIZE, [SOME_HASH] * 64)
    with pytest.raises(ValueError):
        full.append(SOME_HASH)


def test_copy_and_frontier_are_independent() -> None:
    tree = CompactTree()
    for h in LEAVES[:5]:
        tree.append(h)
    twin = tree.copy()
    frontier = tree.frontier()
    frontier.clear()
    tree.append(LEAVES[5])
    assert twin.size == 5
    assert twin.root() == TREE_ROOTS[5]
    assert tree.root() == TREE_ROOTS[6]


# --- inclusion: every proof of every tree up to N leaves --------------------------------------


def _inclusion_tamperings(
    index: int, size: int, proof: list[bytes], root: bytes, leaf: bytes
) -> list[tuple[str, tuple[bytes, int, int, list[bytes], bytes]]]:
    cases: list[tuple[str, tuple[bytes, int, int, list[bytes], bytes]]] = [
        ("other leaf", (SOME_HASH, index, size, proof, root)),
        ("flipped leaf", (_flip(leaf), index, size, proof, root)),
        ("flipped root", (leaf, index, size, proof, _flip(root, 7))),
        ("empty root", (leaf, index, size, proof, EMPTY_ROOT)),
        ("trailing root", (leaf, index, size, [*proof, root], root)),
        ("trailing hash", (leaf, index, size, [*proof, SOME_HASH], root)),
        ("preceding root", (leaf, index, size, [root, *proof], root)),
        ("index = size", (leaf, size, size, proof, root)),
        ("size 0", (leaf, index, 0, proof, root)),
    ]
    for other in range(size):
        if other != index:
            cases.append((f"index {other}", (leaf, other, size, proof, root)))
    for i in range(len(proof)):
        for bit in (0, 3, 7):
            bad = list(proof)
            bad[i] = _flip(bad[i], bit)
            cases.append((f"proof[{i}] bit {bit}", (leaf, index, size, bad, root)))
        cases.append((f"proof[{i}] removed", (leaf, index, size, proof[:i] + proof[i + 1:], root)))
        inserted = [*proof[:i], SOME_HASH, *proof[i:]]
        short = [*proof[:i], proof[i][:31], *proof[i + 1:]]
        cases.append((f"hash before proof[{i}]", (leaf, index, size, inserted, root)))
        cases.append((f"proof[{i}] truncated", (leaf, index, size, short, root)))
    if len(proof) > 1:
        cases.append(("reversed proof", (leaf, index, size, proof[::-1], root)))
    return cases


@pytest.mark.parametrize("size", range(1, N + 1))
def test_every_inclusion_proof(size: int) -> None:
    root = TREE_ROOTS[size]
    for index in range(size):
        leaf = LEAVES[index]
        proof = inclusion_proof(LEAVES, index, size)
        assert proof == _path(index, LEAVES[:size])
        assert verify_inclusion(leaf, index, size, proof, root)
        assert verify_inclusion(leaf, index, size, tuple(proof), root)
        for desc, args in _inclusion_tamperings(index, size, proof, root, leaf):
            assert not verify_inclusion(*args), f"size {size} index {index}: {desc} verified"
        # A proof moved to another checkpoint (another size with that size's root) fails.
        for other_size in range(index + 1, N + 1):
            if other_size != size:
                assert not verify_inclusion(leaf, index, other_size, proof, TREE_ROOTS[other_size])
                # With the root kept, RFC 9162 binds the size only through the proof's
                # shape: any size whose path has another length fails. (Sizes with an
                # identical path shape are bound by the signed checkpoint, not the proof.)
                if len(_path(index, LEAVES[:other_size])) != len(proof):
                    assert not verify_inclusion(leaf, index, other_size, proof, root)
        for other_size in (2 * size, 4 * size + 1):
            assert not verify_inclusion(leaf, index, other_size, proof, root)


def test_verify_inclusion_rejects_malformed_input_without_raising() -> None:
    leaf, root = REF_HASHES[0], ROOTS[8]
    proof = inclusion_proof(REF_HASHES, 0, 8)
    bad_calls: list[tuple[object, object, object, object, object]] = [
        (leaf, -1, 8, proof, root),
        (leaf, 0, -8, proof, root),
        (leaf, True, 8, proof, root),
        (leaf, 0, 8.0, proof, root),
        (leaf, "0", 8, proof, root),
        (leaf, 0, MAX_TREE_SIZE + 1, proof, root),
        (leaf, 0, 8, None, root),
        (leaf, 0, 8, b"".join(proof), root),
        (leaf, 0, 8, [p.hex() for p in proof], root),
        (leaf, 0, 8, [bytearray(p) for p in proof], root),
        (leaf, 0, 8, proof, root.hex()),
        (leaf, 0, 8, proof, root[:31]),
        (leaf, 0, 8, proof, None),
        (leaf[:31], 0, 8, proof, root),
        (None, 0, 8, proof, root),
        (b"", 0, 1, [], b""),
    ]
    for args in bad_calls:
        assert verify_inclusion(*args) is False  # type: ignore[arg-type]
    # The one-leaf tree: the leaf is the root and the proof is empty.
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [SOME_HASH], leaf)
    assert not verify_inclusion(leaf, 0, 0, [], EMPTY_ROOT)
    assert not verify_inclusion(leaf, 1, 1, [], leaf)


def test_verify_inclusion_at_the_top_of_the_size_range() -> None:
    # A right-edge leaf of the largest tree: 64 proof steps, arithmetic on 64-bit sizes.
    size = MAX_TREE_SIZE
    proof = [SOME_HASH] * 64
    assert not verify_inclusion(SOME_HASH, size - 1, size, proof, SOME_HASH)
    assert not verify_inclusion(SOME_HASH, size - 1, size, [SOME_HASH] * 200, SOME_HASH)


# --- consistency: every pair 1 <= m <= n <= N -------------------------------------------------


def _consistency_tamperings(
    old: int, new: int, proof: list[bytes]
) -> list[tuple[str, tuple[int, int, bytes, bytes, list[bytes]]]]:
    r1, r2 = TREE_ROOTS[old], TREE_ROOTS[new]
    cases: list[tuple[str, tuple[int, int, bytes, bytes, list[bytes]]]] = [
        ("flipped old root", (old, new, _flip(r1), r2, proof)),
        ("flipped new root", (old, new, r1, _flip(r2, 5), proof)),
        ("empty proof", (old, new, r1, r2, [])),
        ("trailing old root", (old, new, r1, r2, [*proof, r1])),
        ("trailing new root", (old, new, r1, r2, [*proof, r2])),
        ("trailing hash", (old, new, r1, r2, [*proof, SOME_HASH])),
        ("preceding old root", (old, new, r1, r2, [r1, *proof])),
        ("preceding new root", (old, new, r1, r2, [r2, *proof])),
        ("preceding proof[0]", (old, new, r1, r2, [proof[0], *proof])),
        ("sizes swapped", (new, old, r2, r1, proof)),
        ("roots swapped", (old, new, r2, r1, proof)),
        ("old size 0", (0, new, r1, r2, proof)),
        ("equal sizes", (new, new, r1, r2, proof)),
    ]
    for i in range(len(proof)):
        for bit in (0, 4, 7):
            bad = list(proof)
            bad[i] = _flip(bad[i], bit)
            cases.append((f"proof[{i}] bit {bit}", (old, new, r1, r2, bad)))
        cases.append((f"proof[{i}] removed", (old, new, r1, r2, proof[:i] + proof[i + 1:])))
        short = [*proof[:i], proof[i][:31], *proof[i + 1:]]
        cases.append((f"proof[{i}] truncated", (old, new, r1, r2, short)))
    if len(proof) > 1:
        cases.append(("reversed proof", (old, new, r1, r2, proof[::-1])))
    return cases


@pytest.mark.parametrize("new", range(1, N + 1))
def test_every_consistency_proof(new: int) -> None:
    for old in range(1, new + 1):
        proof = consistency_proof(LEAVES, old, new)
        assert proof == _subproof(old, LEAVES[:new], True)
        assert verify_consistency(old, new, TREE_ROOTS[old], TREE_ROOTS[new], proof)
        if old == new:
            assert proof == []
            assert not verify_consistency(old, new, TREE_ROOTS[old], SOME_HASH, [])
            assert not verify_consistency(old, new, TREE_ROOTS[old], TREE_ROOTS[new], [SOME_HASH])
            continue
        for desc, args in _consistency_tamperings(old, new, proof):
            assert not verify_consistency(*args), f"{old} -> {new}: {desc} verified"
        # The proof does not carry over to any other pair of checkpoints of this log.
        for old2 in range(1, N + 1):
            for new2 in range(old2 + 1, N + 1):
                if (old2, new2) != (old, new):
                    assert not verify_consistency(old2, new2, TREE_ROOTS[old2], TREE_ROOTS[new2], proof)
        # A diverging log: same size, one leaf changed after the old tree ends.
        forked = [*LEAVES[: new - 1], SOME_HASH]
        assert not verify_consistency(old, new, TREE_ROOTS[old], root_from_leaves(forked), proof)


def test_consistency_from_the_empty_tree() -> None:
    for new in range(N + 1):
        assert consistency_proof(LEAVES, 0, new) == []
        assert verify_consistency(0, new, EMPTY_ROOT, TREE_ROOTS[new], [])
        assert not verify_consistency(0, new, EMPTY_ROOT, TREE_ROOTS[new], [SOME_HASH])
        # A tree of size 0 has exactly one root.
        assert not verify_consistency(0, new, SOME_HASH, TREE_ROOTS[new], [])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 0, SOME_HASH, SOME_HASH, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, SOME_HASH, [])


def test_verify_consistency_rejects_malformed_input_without_raising() -> None:
    r1, r2 = TREE_ROOTS[3], TREE_ROOTS[7]
    proof = consistency_proof(LEAVES, 3, 7)
    assert verify_consistency(3, 7, r1, r2, proof)
    bad_calls: list[tuple[object, object, object, object, object]] = [
        (-3, 7, r1, r2, proof),
        (3, -7, r1, r2, proof),
        (7, 3, r2, r1, proof),
        (True, 7, r1, r2, proof),
        (3, 7.0, r1, r2, proof),
        (3, MAX_TREE_SIZE + 1, r1, r2, proof),
        (3, 7, r1[:31], r2, proof),
        (3, 7, r1, r2 + b"\x00", proof),
        (3, 7, r1.hex(), r2, proof),
        (3, 7, None, r2, proof),
        (3, 7, r1, r2, None),
        (3, 7, r1, r2, b"".join(proof)),
        (3, 7, r1, r2, [p.hex() for p in proof]),
        (3, 7, r1, r2, [*proof[:-1], None]),
        (3, 7, r1, r2, [SOME_HASH] * 300),
    ]
    for args in bad_calls:
        assert verify_consistency(*args) is False  # type: ignore[arg-type]


# --- generator misuse -------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size"), [(0, 0), (3, 3), (4, 3), (-1, 3), (0, 41), (0, -1), (True, 3)])
def test_inclusion_proof_misuse(index: int, size: int) -> None:
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, index, size)


@pytest.mark.parametrize(("old", "new"), [(4, 3), (-1, 3), (0, 41), (41, 41), (1, -1)])
def test_consistency_proof_misuse(old: int, new: int) -> None:
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, old, new)


# --- the subtree cache ------------------------------------------------------------------------


def test_cache_gives_the_same_proofs_as_a_growing_log_appends() -> None:
    # Big enough for cached subtrees (2**8 leaves and up) at several heights.
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(1300)]
    cache: dict[tuple[int, int], bytes] = {}
    tree = CompactTree()
    checked = 0
    for n, h in enumerate(leaves, start=1):
        tree.append(h)
        if n not in (1, 255, 256, 257, 511, 512, 700, 1024, 1025, 1300):
            continue
        root = tree.root()
        assert root_from_leaves(leaves[:n]) == root
        for index in sorted({0, n // 3, n // 2, n - 1}):
            proof = inclusion_proof(leaves, index, n, cache=cache)
            assert proof == inclusion_proof(leaves, index, n)
            assert verify_inclusion(leaves[index], index, n, proof, root)
            checked += 1
        for old in sorted({1, 255, 256, 300, n // 2, n - 1} & set(range(1, n))):
            proof = consistency_proof(leaves, old, n, cache=cache)
            assert proof == consistency_proof(leaves, old, n)
            assert verify_consistency(old, n, root_from_leaves(leaves[:old]), root, proof)
            checked += 1
    assert checked > 50
    assert cache, "proofs over a log of 1300 leaves should have filled the cache"
    assert all(level >= 8 and start % (1 << level) == 0 for start, level in cache)
