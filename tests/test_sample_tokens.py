"""sample_tokens' prefix fast path against a plain-Python inverse CDF over the full stable order.

The reference ranks every id by (-probability, id), accumulates in that order with Python
floats (fp64, sequential) and picks the first id whose cumulative mass exceeds
``u x total`` (total accumulated in id order), never a zero-probability id. Vocabularies
above SAMPLE_PREFIX exercise both the prefix path (peaked rows) and the full-sort fallback
(flat rows, draws near 1, ties at the prefix's edge, top-k zeros).
"""

from __future__ import annotations

import itertools

import torch

from spin_mcore.generation.sampling import SAMPLE_PREFIX, SamplingParams, filter_logits, sample_tokens


def _reference(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> list[int]:
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p).double(), -1)
    out = []
    for row, ui in zip(probs.tolist(), u.tolist()):
        target = ui * list(itertools.accumulate(row))[-1]
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        last_nonzero = max(j for j, i in enumerate(order) if row[i] > 0)
        cdf = list(itertools.accumulate(row[i] for i in order))
        j = next((j for j, c in enumerate(cdf) if c > target), len(cdf) - 1)
        out.append(order[min(j, last_nonzero)])
    return out


def _rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 3.0, 8.0, 20.0, 2.0, 2.0, 5.0])
    logits = torch.randn(len(scales), vocab, generator=g) * scales[:, None]
    u = torch.rand(len(scales), generator=g, dtype=torch.float64)
    u[5], u[6] = 0.999999, 0.0  # the top and the bottom of the CDF
    if vocab > SAMPLE_PREFIX + 20:  # row 7: a tie group straddling the prefix's edge
        order = logits[7].argsort(descending=True)
        logits[7, order[SAMPLE_PREFIX - 20:SAMPLE_PREFIX + 20]] = float(logits[7, order[SAMPLE_PREFIX - 20]])
    return logits, u


def test_prefix_path_equals_the_full_stable_inverse_cdf(monkeypatch):
    from spin_mcore.generation import sampling

    fallback_rows = []
    full = sampling._inverse_cdf_sorted
    monkeypatch.setattr(sampling, "_inverse_cdf_sorted", lambda p, t: fallback_rows.append(len(p)) or full(p, t))
    vocab = 3 * SAMPLE_PREFIX + 17
    logits, u = _rows(vocab)
    probs = torch.softmax(logits[7].double(), -1)
    ranked = probs.sort(descending=True).values
    u[7] = float(ranked[:SAMPLE_PREFIX - 5].sum() / probs.sum())  # inside the tie group
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=50),
                   SamplingParams(temperature=1.3, top_p=0.9)):
        got = sample_tokens(logits, params, u)
        assert got.tolist() == _reference(logits, params, u), params
        # One row at a time: the same tokens (no dependence on the rest of the batch).
        assert [int(sample_tokens(logits[i:i + 1], params, u[i:i + 1])) for i in range(len(u))] == got.tolist()
    # Both paths ran: some rows fell back to the full sort, most did not.
    assert 0 < sum(fallback_rows) < 3 * 2 * len(u) / 2, fallback_rows


def test_small_vocab_takes_the_full_sort_and_matches():
    logits, u = _rows(300)
    params = SamplingParams(temperature=1.0)
    assert sample_tokens(logits, params, u).tolist() == _reference(logits, params, u)
