"""Sequence packing of (chosen, rejected) pairs and the seeded sample index.

Both routines exist twice: in C++ (``csrc/packing.cpp``, the extension
``spin_mcore._packing``) and here in Python. The two give identical output
(``tests/test_packing.py`` asserts it on random inputs); ``backend="auto"`` uses
the C++ module when it imports and this fallback otherwise.

Packing (first-fit-decreasing):
  * a pair's size is ``chosen + rejected`` tokens; its two sequences always share a
    row, adjacent, chosen first, so the trainer can stack them without a gather;
  * pairs are placed largest first (ties: lower pair index first) into the leftmost
    row with room, found with a max segment tree over remaining capacities;
  * rows are numbered in the order they were opened; within a row pairs keep their
    placement order.

Sample index: one Fisher-Yates permutation of ``range(n_items)`` per epoch, driven
by splitmix64 from a key derived from ``(seed, epoch)``. The bounded draw is
``(r * (i + 1)) >> 64`` (multiply-high, bias <= n / 2^64): it needs no rejection
loop, so the draws here are computed vectorised in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # the C++ extension is optional: a source checkout without a build still works
    from spin_mcore import _packing as _cpp
except ImportError:  # pragma: no cover - depends on the build
    _cpp = None

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class PackedBins:
    """Rows of packed pairs: row ``b`` holds pairs ``pair_order[offsets[b]:offsets[b + 1]]``.

    offsets: int64 [n_bins + 1], starts at 0, non-decreasing, ends at N.
    pair_order: int64 [N], a permutation of the pair indices.
    """

    offsets: np.ndarray
    pair_order: np.ndarray

    @property
    def n_bins(self) -> int:
        return len(self.offsets) - 1

    def bin(self, b: int) -> np.ndarray:
        """Pair indices (int64) in row ``b``, in packing order."""
        return self.pair_order[self.offsets[b] : self.offsets[b + 1]]


def cpp_available() -> bool:
    """True when the compiled ``spin_mcore._packing`` extension imported."""
    return _cpp is not None


def _use_cpp(backend: str) -> bool:
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"backend={backend!r}: must be auto, cpp or python")
    if backend == "cpp" and _cpp is None:
        raise ImportError("backend='cpp' but spin_mcore._packing is not built; run `pip install -e . --no-build-isolation`")
    return backend == "cpp" or (backend == "auto" and _cpp is not None)


def _check_lengths(lengths, seq_len: int) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"pack_pairs: lengths must have shape [N, 2], got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pack_pairs: lengths must be integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if seq_len < 1:
        raise ValueError(f"pack_pairs: seq_len={seq_len} must be >= 1")
    bad = np.flatnonzero((arr < 1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"pack_pairs: pair {i} has a length < 1 (chosen={arr[i, 0]}, rejected={arr[i, 1]})")
    total = arr.sum(axis=1)
    over = np.flatnonzero(total > seq_len)
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"pack_pairs: pair {i} needs {total[i]} tokens (chosen={arr[i, 0]}, rejected={arr[i, 1]}) but seq_len={seq_len}"
        )
    return arr


def pack_pairs(lengths, seq_len: int, backend: str = "auto") -> PackedBins:
    """Pack pairs into rows of ``seq_len`` tokens by first-fit-decreasing.

    lengths: int array [N, 2], token counts (prompt + response) of each pair's chosen
    and rejected sequence. Raises ValueError naming the first pair index whose total
    exceeds ``seq_len`` or that has a length < 1. Deterministic; C++ and Python agree.
    """
    arr = _check_lengths(lengths, int(seq_len))
    if _use_cpp(backend):
        offsets, order = _cpp.pack_pairs(arr, int(seq_len))
        return PackedBins(np.asarray(offsets, dtype=np.int64), np.asarray(order, dtype=np.int64))
    return _pack_pairs_python(arr, int(seq_len))


def _pack_pairs_python(arr: np.ndarray, seq_len: int) -> PackedBins:
    n = len(arr)
    total = (arr[:, 0] + arr[:, 1]).tolist()
    # Stable argsort of -total == descending total, ascending index among ties.
    placed = np.argsort(-np.asarray(total, dtype=np.int64), kind="stable").tolist()
    leaves = 1
    while leaves < max(n, 1):
        leaves *= 2
    tree = [seq_len] * (2 * leaves)  # node = max remaining capacity below it
    bin_of = [0] * n
    n_bins = 0
    for p in placed:
        need = total[p]
        node = 1
        while node < leaves:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - leaves
        bin_of[p] = b
        if b + 1 > n_bins:
            n_bins = b + 1
        tree[node] -= need
        node //= 2
        while node >= 1:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
    # Counting sort by row; a stable sort of the placement order by row does exactly that.
    placed_arr = np.asarray(placed, dtype=np.int64)
    rows = np.asarray(bin_of, dtype=np.int64)[placed_arr] if n else np.zeros(0, np.int64)
    order = placed_arr[np.argsort(rows, kind="stable")]
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_bins), out=offsets[1:])
    return PackedBins(offsets, order.astype(np.int64))


def build_sample_index(n_items: int, epochs: int, seed: int, backend: str = "auto") -> np.ndarray:
    """Concatenated per-epoch seeded permutations of ``range(n_items)``: int64 [n_items * epochs].

    ``seed`` is any Python int (taken mod 2^64). Epoch ``e``'s permutation depends only
    on ``(seed, e)``, so resuming at epoch e needs no replay. C++ and Python agree exactly.
    """
    n_items, epochs = int(n_items), int(epochs)
    if n_items < 0 or epochs < 0:
        raise ValueError(f"build_sample_index: n_items={n_items} and epochs={epochs} must be >= 0")
    if n_items > 1 << 32:
        raise ValueError("build_sample_index: n_items must be <= 2^32")
    seed64 = int(seed) & _MASK
    if _use_cpp(backend):
        return np.asarray(_cpp.build_sample_index(n_items, epochs, seed64), dtype=np.int64)
    out = np.empty(n_items * epochs, dtype=np.int64)
    for e in range(epochs):
        out[e * n_items : (e + 1) * n_items] = _permutation(n_items, _epoch_key(seed64, e))
    return out


def _mix64_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _epoch_key(seed64: int, epoch: int) -> int:
    # Same as epoch_key in csrc/packing.cpp: nearby seeds/epochs give unrelated streams.
    return _mix64_int((_mix64_int((seed64 + _GOLDEN) & _MASK) + epoch + _GOLDEN) & _MASK)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 arithmetic in numpy wraps mod 2^64, exactly like C++.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mulhi(r: np.ndarray, s: np.ndarray) -> np.ndarray:
    """floor(r * s / 2^64) for uint64 r and s <= 2^32, without 128-bit ints."""
    lo32 = np.uint64(0xFFFFFFFF)
    rh, rl = r >> np.uint64(32), r & lo32
    # rh * s + (rl * s >> 32) < 2^32 * s <= 2^64: no overflow for s <= 2^32.
    return (rh * s + ((rl * s) >> np.uint64(32))) >> np.uint64(32)


def _permutation(n: int, key: int) -> np.ndarray:
    perm = list(range(n))
    if n < 2:
        return np.asarray(perm, dtype=np.int64)
    k = np.arange(1, n, dtype=np.uint64)  # draw number; draw k serves position i = n - k
    with np.errstate(over="ignore"):
        states = np.uint64(key) + k * np.uint64(_GOLDEN)
        draws = _mulhi(_mix64_np(states), np.uint64(n + 1) - k)
    for i, j in zip(range(n - 1, 0, -1), draws.tolist()):
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


def row_cu_seqlens(lengths, bins: PackedBins, b: int) -> np.ndarray:
    """Sequence boundaries inside row ``b``: int64 [2k + 1] for its k pairs, starting at 0.

    Sequences are laid out chosen_0, rejected_0, chosen_1, rejected_1, ... so sequence
    ``2m`` / ``2m + 1`` are the chosen / rejected of pair ``bins.bin(b)[m]``. This is the
    ``cu_seqlens`` of Megatron's PackedSeqParams for that row (before padding to seq_len).
    """
    seqs = np.asarray(lengths, dtype=np.int64)[bins.bin(b)].reshape(-1)  # [2k]
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(seqs)])
