"""Seeded held-out split and prompt subsampling (the paper trains on 50k of UltraChat's 200k prompts).

One seeded permutation of the records (splitmix64 + Fisher-Yates, the same generator as the
sample index, so it is identical on every platform and numpy version) decides everything:
  * the first ``round(N * heldout_fraction)`` records of the permutation are held out;
  * the next ``num_prompts`` (or all the rest) are the training prompts.
So the held-out set does not depend on ``num_prompts``, and a larger ``num_prompts`` only adds
prompts to a smaller one's set. Both outputs keep the records' original file order.
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

from spin_mcore.data.packing import build_sample_index

T = TypeVar("T")


def split_records(
    records: Sequence[T], heldout_fraction: float, num_prompts: Optional[int] = None, *, seed: int,
    source: Optional[str] = None,
) -> tuple[list[T], list[T]]:
    """Return ``(train, heldout)``, disjoint, each in original order.

    Raises ValueError (naming ``source``, the data file, when given) when ``heldout_fraction``
    is outside [0, 1), when a positive ``heldout_fraction`` rounds to no held-out record, when
    the split would leave no training record, or when ``num_prompts`` asks for more training
    prompts than remain.
    """
    n = len(records)
    prefix = f"{source}: " if source else ""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"{prefix}data.heldout_fraction={heldout_fraction}: must be in [0, 1)")
    n_heldout = int(round(n * heldout_fraction))
    n_rest = n - n_heldout
    if heldout_fraction > 0 and n_heldout == 0:
        raise ValueError(
            f"{prefix}{n} records leave no held-out prompt at data.heldout_fraction={heldout_fraction} "
            f"(round({n} x {heldout_fraction}) = 0); give at least {min_records(heldout_fraction)} records "
            f"or raise data.heldout_fraction"
        )
    if n and n_rest == 0:
        raise ValueError(f"{prefix}data.heldout_fraction={heldout_fraction} leaves no training record out of {n}")
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError(f"{prefix}data.num_prompts={num_prompts}: must be >= 1 (or None for all)")
        if num_prompts > n_rest:
            raise ValueError(
                f"{prefix}data.num_prompts={num_prompts} but only {n_rest} records remain after holding out "
                f"{n_heldout} of {n} (data.heldout_fraction={heldout_fraction})"
            )
    n_train = n_rest if num_prompts is None else num_prompts
    perm = build_sample_index(n, 1, seed)
    heldout_idx = sorted(perm[:n_heldout].tolist())
    train_idx = sorted(perm[n_heldout : n_heldout + n_train].tolist())
    return [records[i] for i in train_idx], [records[i] for i in heldout_idx]


def min_records(heldout_fraction: float) -> int:
    """The fewest records that leave at least one held-out and one training record at ``heldout_fraction`` (> 0)."""
    n = max(2, int(0.5 / heldout_fraction))
    # round() rounds halves to even, so step up from just below 0.5 / fraction.
    while int(round(n * heldout_fraction)) < 1 or n - int(round(n * heldout_fraction)) < 1:
        n += 1
    return n
