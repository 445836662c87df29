"""Trainer-engine agreement: does the external engine run the weights the trainer scores with?

The engine returns, per y', the sum of its raw log-probs of the sampled tokens; the reference
pass computes log p_theta_t(y'|x) with Megatron (``ref_logp_generated``). Both are the same
quantity under the same weights, so their per-token gap

    gap = |engine_logp - ref_logp_generated| / len(y')        (nats per token)

is rounding noise when the engine runs theta_t, and large when it runs stale or mis-converted
weights (an earlier iterate's export, a wrong transpose, a stale prefix cache). The iteration
fails when the median gap exceeds the threshold. Defaults (``generation.agreement_threshold``
None): 1e-3 for fp32 (CPU tests see ~1e-6), 0.05 for bf16/fp8, where engine and trainer use
different kernels and accumulate in different orders.
"""

from __future__ import annotations

from typing import Iterable, Optional

FP32_THRESHOLD, LOW_PRECISION_THRESHOLD = 1e-3, 0.05


class AgreementError(RuntimeError):
    """The engine's log-probs disagree with the trainer's: it ran other weights."""


def default_threshold(recipe: str, device: str = "cpu") -> float:
    """The threshold for ``precision.recipe`` (``auto`` is bf16 on CUDA, fp32 on CPU)."""
    if recipe == "fp32" or (recipe == "auto" and device != "cuda"):
        return FP32_THRESHOLD
    return LOW_PRECISION_THRESHOLD


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted non-empty list."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def agreement_stats(records: Iterable[dict], iteration: Optional[int] = None) -> dict:
    """Gap distribution over reference records that carry the engine's log-prob.

    records: reference-stage records (``engine_logp``, ``ref_logp_generated``, ``generated_ids``);
    those of other iterations (previous pairs, scored again) are skipped when ``iteration`` is given.
    Returns ``{"sequences", "median", "p90", "max", "worst"}`` (gaps in nats/token; ``worst``
    names the record with the largest gap).
    """
    gaps = []
    for r in records:
        if "engine_logp" not in r or (iteration is not None and r.get("iteration") != iteration):
            continue
        n = max(len(r["generated_ids"]), 1)
        gaps.append((abs(float(r["engine_logp"]) - float(r["ref_logp_generated"])) / n,
                     f"{r.get('prompt_id')}#{r.get('sample_index', 0)}"))
    if not gaps:
        raise ValueError("agreement check: no record carries engine_logp (did the engine run?)")
    vals = sorted(g for g, _ in gaps)
    worst = max(gaps)
    return {"sequences": len(vals), "median": _quantile(vals, 0.5), "p90": _quantile(vals, 0.9),
            "max": vals[-1], "worst": worst[1]}


def check_agreement(stats: dict, threshold: float, what: str = "") -> None:
    """Raise :class:`AgreementError` with the numbers when the median gap exceeds ``threshold``."""
    if not stats["median"] <= threshold:
        raise AgreementError(
            f"trainer-engine agreement failed{' for ' + what if what else ''}: median |engine - reference| "
            f"log-prob gap {stats['median']:.3g} nats/token > generation.agreement_threshold={threshold:g} "
            f"(p90 {stats['p90']:.3g}, max {stats['max']:.3g} at {stats['worst']}, {stats['sequences']} sequences); "
            "the engine ran other weights than theta_t (stale or mis-converted HF export?)")
