"""Sampling parameters and sampling from (vocab-parallel) logits.

Reproducibility contract: every ``(prompt_key, sample_index)`` pair owns a
seeded ``torch.Generator`` that draws exactly one uniform per generated token,
and a token is chosen by inverting the CDF of that row's filtered distribution.
The token stream of a sample therefore depends only on its own logits and its
own stream, not on which other prompts share the batch or on the batch size.

TP: every tensor-parallel rank all-gathers the last-position logits and runs the
same deterministic ops with the same uniforms, so all ranks pick the same token
without a broadcast.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is sampled. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_ids: tuple = ()
    seed: int = 0
    num_samples: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"SamplingParams: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got "
                             f"{self.temperature}, {self.top_p}, {self.top_k})")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError(f"SamplingParams: need max_new_tokens >= 1 and num_samples >= 1 (got "
                             f"{self.max_new_tokens}, {self.num_samples})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, gen_cfg, stop_ids: Sequence[int] = ()) -> "SamplingParams":
        """From ``cfg.generation``; ``stop_ids`` usually ``(tokenizer.eos_id,)``."""
        return cls(temperature=gen_cfg.temperature, top_p=gen_cfg.top_p, top_k=gen_cfg.top_k,
                   max_new_tokens=gen_cfg.max_new_tokens, stop_ids=tuple(stop_ids), seed=gen_cfg.seed,
                   num_samples=gen_cfg.num_samples)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop_ids"] = list(self.stop_ids)
        return d


def sample_seed(seed: int, prompt_key: str, sample_index: int) -> int:
    """Stable 63-bit seed of the stream of one (prompt, sample); independent of Python's hash salt."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_key}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, prompt_key: str, sample_index: int) -> torch.Generator:
    """CPU generator for one (prompt, sample) stream (CPU so GPU and CPU runs draw the same numbers)."""
    return torch.Generator().manual_seed(sample_seed(seed, prompt_key, sample_index))


def sampling_vocab_size(model_vocab_size: int, tokenizer) -> int:
    """How many ids generation may sample: the model's vocabulary, cut to the tokenizer's.

    A model may have more rows than its tokenizer has pieces (HF configs often pad the
    vocabulary); ids past the tokenizer have no text, so a sample holding one could not be
    stored or compared with the human response. Dropping them renormalises over real pieces.
    ``tokenizer`` None (token-id-only stages, which store no text): the model's vocabulary.
    """
    if tokenizer is None:
        return int(model_vocab_size)
    return min(int(model_vocab_size), int(tokenizer.vocab_size))


def gather_vocab_parallel(local_logits: torch.Tensor, vocab_size: int, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Full-vocabulary fp32 logits from this rank's vocab shard.

    local_logits: [n, padded_vocab / tp] (any float dtype). Returns [n, vocab_size] fp32:
    columns >= ``vocab_size`` are TP padding and are dropped, so they can never be sampled.
    """
    local = local_logits.float().contiguous()
    world = dist.get_world_size(tp_group) if (tp_group is not None and dist.is_initialized()) else 1
    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=tp_group)
        local = torch.cat(parts, dim=-1)
    return local[:, :vocab_size]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of HF's logits warpers).

    logits: [n, V] fp32. Returns [n, V] fp32 with removed tokens at -inf. top-p keeps
    the smallest prefix of the sorted distribution whose mass reaches ``top_p``
    (always at least the most likely token).
    """
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [n, V] mass of strictly more likely tokens
        remove_sorted = mass_before >= top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


# Candidates ranked per row before falling back to a full sort: topk + a 1024-element sort cost
# ~1/4 of a stable sort of 8192 fp64 probabilities; a trained model's draw almost always lands in them.
SAMPLE_PREFIX = 1024


def _inverse_cdf_sorted(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """probs [n, V] fp64, target [n]: the token where the cdf in stable descending order first exceeds target."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cdf = torch.cumsum(sorted_probs, dim=-1)  # [n, V]
    idx = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).clamp_(max=cdf.shape[-1] - 1)
    # Never land on a zero-probability (filtered) token through rounding at the top of the CDF.
    nonzero = (sorted_probs > 0).sum(-1, keepdim=True) - 1
    return order.gather(-1, torch.minimum(idx, nonzero)).squeeze(-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row.

    logits: [n, V] fp32 full-vocab logits (after :func:`gather_vocab_parallel`).
    uniforms: [n] fp64 in [0, 1), one per row from that row's stream (ignored when greedy).
    Returns [n] int64. Sampling inverts the CDF of the filtered distribution in fp64,
    sorted by descending probability (ties by id) so ties and rounding do not depend on
    other rows; the target is ``u x`` the total mass summed in id order.

    Speed: only the ``SAMPLE_PREFIX`` most likely ids are sorted. Every position whose
    probability is strictly above the smallest of them is a position of the full stable
    order, with the same sequential cumsum, so a draw landing there is exactly the full
    sort's; other rows take the full sort.
    """
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered.double(), dim=-1)  # [n, V] fp64
    # cumsum is a sequential scan per row: unlike sum(), its result cannot depend on the batch or threads.
    target = uniforms.to(probs.device, torch.float64) * torch.cumsum(probs, dim=-1)[:, -1]  # [n]
    if probs.shape[-1] <= SAMPLE_PREFIX:
        return _inverse_cdf_sorted(probs, target)
    ids = torch.topk(probs, SAMPLE_PREFIX, dim=-1, sorted=False).indices.sort(dim=-1).values  # [n, k] ascending
    top, perm = torch.sort(probs.gather(-1, ids), dim=-1, descending=True, stable=True)  # ties stay by id
    ids = ids.gather(-1, perm)
    idx = torch.searchsorted(torch.cumsum(top, dim=-1), target.unsqueeze(-1), right=True).clamp_(max=SAMPLE_PREFIX - 1)
    tokens = ids.gather(-1, idx).squeeze(-1)
    # Past the prefix, or in a tie with its smallest probability (ids topk left out may come first).
    miss = top.gather(-1, idx).squeeze(-1) <= top[:, -1]
    if bool(miss.any()):
        rows = miss.nonzero().squeeze(-1)
        tokens[rows] = _inverse_cdf_sorted(probs[rows], target[rows])
    return tokens
