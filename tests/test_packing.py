"""Pair packing and the sample index: C++ == Python, both == an independent naive reference."""

from __future__ import annotations

import numpy as np
import pytest

from spin_mcore.data import packing
from spin_mcore.data.packing import build_sample_index, cpp_available, pack_pairs, row_cu_seqlens


def requires_cpp(fn):
    """The extension is built by `pip install -e .`; its absence is a failed install, not a reason to skip."""

    def wrapper(*a, **k):
        assert cpp_available(), "spin_mcore._packing is not built: run `pip install -e .`"
        return fn(*a, **k)

    import functools

    return functools.wraps(fn)(wrapper)

BACKENDS = ["python"] + (["cpp"] if cpp_available() else [])
MASK = (1 << 64) - 1


# ----------------------------------------------------------------------------- references


def naive_ffd(lengths: np.ndarray, seq_len: int) -> tuple[list[int], list[int]]:
    """First-fit-decreasing by linear scan over open rows (O(N * rows)); returns (offsets, order)."""
    totals = [int(c + r) for c, r in lengths]
    order = sorted(range(len(totals)), key=lambda i: (-totals[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for p in order:
        for b, room in enumerate(free):
            if room >= totals[p]:
                rows[b].append(p)
                free[b] -= totals[p]
                break
        else:
            rows.append([p])
            free.append(seq_len - totals[p])
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    return offsets, [p for row in rows for p in row]


def ref_splitmix(state: int) -> tuple[int, int]:
    """Vigna's splitmix64.c next(): returns (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def ref_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Fisher-Yates with Python ints: key = mix(mix(seed + G) + epoch + G), j = (r * (i+1)) >> 64."""
    _, k0 = ref_splitmix(seed & MASK)
    _, key = ref_splitmix((k0 + epoch) & MASK)
    perm, state = list(range(n)), key
    for i in range(n - 1, 0, -1):
        state, r = ref_splitmix(state)
        j = (r * (i + 1)) >> 64
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def random_lengths(rng, n: int, seq_len: int) -> np.ndarray:
    return rng.integers(1, seq_len // 2 + 1, size=(n, 2), dtype=np.int64)


# ----------------------------------------------------------------------------- packing


def test_splitmix_matches_published_vector():
    # splitmix64 with state 0: the first outputs published with xoshiro's seeding code.
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    state, got = 0, []
    for _ in range(3):
        state, out = ref_splitmix(state)
        got.append(out)
    assert got == want
    g = 0x9E3779B97F4A7C15
    assert [packing._mix64_int(k * g & MASK) for k in (1, 2, 3)] == want
    states = np.array([g, 2 * g & MASK, 3 * g & MASK], dtype=np.uint64)
    assert packing._mix64_np(states).tolist() == want


def test_pack_small_known_case():
    # totals: 5, 9, 3, 7, 5, 2 with seq_len 10. FFD order 1(9), 3(7), 0(5), 4(5), 2(3), 5(2):
    # row0=[1], row1=[3, 2] (7+3), row2=[0, 4] (5+5), pair 5 (2) fits nowhere before row3.
    lengths = np.array([[2, 3], [4, 5], [1, 2], [3, 4], [4, 1], [1, 1]])
    for backend in BACKENDS:
        bins = pack_pairs(lengths, 10, backend=backend)
        assert bins.offsets.tolist() == [0, 1, 3, 5, 6]
        assert bins.pair_order.tolist() == [1, 3, 2, 0, 4, 5]
        assert bins.offsets.dtype == np.int64 and bins.pair_order.dtype == np.int64
        assert row_cu_seqlens(lengths, bins, 1).tolist() == [0, 3, 7, 8, 10]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_matches_naive_ffd_and_invariants(backend):
    rng = np.random.default_rng(0)
    for trial in range(60):
        seq_len = int(rng.integers(2, 200))
        n = int(rng.integers(0, 150))
        lengths = random_lengths(rng, n, seq_len)
        if trial % 5 == 0 and n:  # many ties
            lengths[:] = lengths[0]
        bins = pack_pairs(lengths, seq_len, backend=backend)
        want_offsets, want_order = naive_ffd(lengths, seq_len)
        assert bins.offsets.tolist() == want_offsets, trial
        assert bins.pair_order.tolist() == want_order, trial
        # invariants: each pair exactly once, capacity respected, chosen/rejected adjacent
        assert sorted(bins.pair_order.tolist()) == list(range(n))
        for b in range(bins.n_bins):
            cu = row_cu_seqlens(lengths, bins, b)
            assert cu[-1] <= seq_len
            for m, p in enumerate(bins.bin(b)):
                assert cu[2 * m + 1] - cu[2 * m] == lengths[p, 0]
                assert cu[2 * m + 2] - cu[2 * m + 1] == lengths[p, 1]


@requires_cpp
def test_pack_cpp_equals_python_large_and_edges():
    rng = np.random.default_rng(1)
    cases = [
        (random_lengths(rng, 5000, 512), 512),
        (np.zeros((0, 2), np.int64), 16),
        (np.array([[1, 1]]), 2),
        (np.full((37, 2), 8), 16),  # every pair fills a row exactly
        (np.ones((100, 2), np.int64), 7),  # odd capacity: 3 pairs per row, 1 token idle
        (rng.integers(1, 3000, size=(2000, 2)), 8192),
        (np.array([[2**25, 5], [3, 2**25], [7, 7], [1, 1], [5, 2**25]]), 2**27),  # C++ comparison-sort path
    ]
    for lengths, seq_len in cases:
        py, cc = pack_pairs(lengths, seq_len, "python"), pack_pairs(lengths, seq_len, "cpp")
        assert np.array_equal(py.offsets, cc.offsets) and np.array_equal(py.pair_order, cc.pair_order)
    assert pack_pairs(np.full((37, 2), 8), 16).n_bins == 37
    assert pack_pairs(np.ones((100, 2), np.int64), 7).n_bins == 34
    assert pack_pairs(np.zeros((0, 2), np.int64), 16).offsets.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_errors(backend):
    with pytest.raises(ValueError, match=r"pair 2 needs 11 tokens \(chosen=5, rejected=6\) but seq_len=10"):
        pack_pairs(np.array([[1, 1], [5, 5], [5, 6], [9, 9]]), 10, backend=backend)
    with pytest.raises(ValueError, match="pair 1 has a length < 1"):
        pack_pairs(np.array([[1, 1], [0, 3]]), 10, backend=backend)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        pack_pairs(np.array([1, 2, 3]), 10, backend=backend)
    with pytest.raises(ValueError, match="seq_len=0"):
        pack_pairs(np.array([[1, 1]]), 0, backend=backend)
    with pytest.raises(ValueError, match="backend="):
        pack_pairs(np.array([[1, 1]]), 4, backend="rust")


@requires_cpp
def test_cpp_module_validates_on_its_own():
    # The extension is callable directly (no Python-side checks) and must still refuse bad input.
    from spin_mcore import _packing

    with pytest.raises(ValueError, match="pair 1 needs 12 tokens"):
        _packing.pack_pairs(np.array([[1, 1], [6, 6]], dtype=np.int64), 10)


# ----------------------------------------------------------------------------- sample index


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_index_matches_reference(backend):
    for n, epochs, seed in [(0, 3, 0), (1, 2, 5), (2, 4, 7), (10, 2, 0), (257, 3, -1), (1000, 1, 2**70 + 3)]:
        idx = build_sample_index(n, epochs, seed, backend=backend)
        assert idx.dtype == np.int64 and idx.shape == (n * epochs,)
        want = [v for e in range(epochs) for v in ref_permutation(n, seed, e)]
        assert idx.tolist() == want, (n, epochs, seed)


@requires_cpp
def test_sample_index_cpp_equals_python_and_properties():
    for n, epochs, seed in [(5000, 2, 1234), (3, 5, 9), (0, 0, 1)]:
        a = build_sample_index(n, epochs, seed, "python")
        b = build_sample_index(n, epochs, seed, "cpp")
        assert np.array_equal(a, b)
    idx = build_sample_index(5000, 2, 1234).reshape(2, 5000)
    assert all(sorted(row.tolist()) == list(range(5000)) for row in idx)
    assert not np.array_equal(idx[0], idx[1])  # epochs reshuffle
    assert not np.array_equal(idx[0], build_sample_index(5000, 1, 1235))  # seeds differ
    # Uniformity: all 6 permutations of 3 items, 6000 seeds; expected 1000 each, sd ~ 29.
    counts: dict = {}
    for seed in range(6000):
        key = tuple(build_sample_index(3, 1, seed).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6 and all(850 < c < 1150 for c in counts.values()), counts


def test_sample_index_errors():
    with pytest.raises(ValueError, match="n_items=-1"):
        build_sample_index(-1, 1, 0)
    with pytest.raises(ValueError, match="2\\^32"):
        build_sample_index(2**32 + 1, 1, 0, backend="python")


def test_auto_falls_back_without_extension(monkeypatch):
    lengths = np.array([[2, 3], [4, 5], [1, 2]])
    want = pack_pairs(lengths, 10, backend="python")
    monkeypatch.setattr(packing, "_cpp", None)
    got = pack_pairs(lengths, 10)  # auto
    assert got.pair_order.tolist() == want.pair_order.tolist() == [1, 0, 2]
    assert build_sample_index(4, 1, 0).tolist() == ref_permutation(4, 0, 0)
    with pytest.raises(ImportError, match="not built"):
        pack_pairs(lengths, 10, backend="cpp")
