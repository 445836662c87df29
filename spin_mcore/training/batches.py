"""Turn pair (or SFT) records into fixed-shape micro-batches, and decide which records each step sees.

A SPIN micro-batch of ``mb`` pairs is ONE tensor batch of ``2 * mb`` rows: rows
``[0, mb)`` are the real responses y, rows ``[mb, 2 mb)`` the generated y', in the
same pair order. One forward pass then scores both, and the policy and reference
log-probs come out of exactly the same shapes. An SFT micro-batch is ``mb`` rows of
(prompt, y).

Every row of a micro-batch is padded on the right to the same length ``S``. With
``train.pad_to_longest`` (the default) ``S`` is the micro-batch's longest row rounded
up to :func:`pad_multiple` and capped at ``model.seq_length``; otherwise ``S`` is
``model.seq_length``. Causal attention never looks right, so the padding changes
no logit of a real position (only, possibly, the rounding of the kernels that
see a different shape). Under pipeline parallelism the schedule's send/recv
buffers need one shape per step, so ``spin_mcore.training.step`` pads the step's
micro-batches to their common longest (:func:`pad_to_length`).

Row layout for a sequence ``full = prompt + response`` (truncated to ``model.seq_length`` + 1 tokens)::

    tokens    = full[:-1]   padded with pad_id            [S]
    labels    = full[1:]    padded with pad_id            [S]   (already shifted)
    loss_mask = 1 where labels[i] is a response token     [S]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

REF_REAL = "ref_logp_real"
REF_GEN = "ref_logp_generated"


@dataclass
class Example:
    """One training item. ``generated_ids`` is None for SFT; the refs are None before the reference pass."""

    prompt_ids: list
    real_ids: list
    generated_ids: Optional[list] = None
    ref_real: Optional[float] = None
    ref_gen: Optional[float] = None


def example_from_record(record: dict, where: str, need_generated: bool, need_refs: bool) -> Example:
    """Read one stage record (generation/reference output, or an SFT record) into an :class:`Example`.

    Accepts ``real_ids`` or ``response_ids`` for y. Raises ValueError naming ``where`` and the field.
    """
    def get(*names):
        for name in names:
            if name in record and record[name] is not None:
                return record[name]
        raise ValueError(f"{where}: record {record.get('prompt_id', '?')!r} lacks field {' / '.join(names)}")

    prompt = list(get("prompt_ids"))
    real = list(get("real_ids", "response_ids"))
    gen = list(get("generated_ids")) if need_generated else None
    ref_real = float(get(REF_REAL)) if need_refs else None
    ref_gen = float(get(REF_GEN)) if need_refs else None
    return Example(prompt, real, gen, ref_real, ref_gen)


def load_examples(sources: Sequence, objective: str, need_refs: bool) -> list[Example]:
    """Examples from stage directories (read in order) and/or in-memory records.

    ``sources``: a list of paths (ShardedStage directories) or dicts (records), mixed freely.
    """
    from spin_mcore.utils.shards import read_stage

    need_generated = objective == "spin"
    out: list[Example] = []
    for source in sources:
        if isinstance(source, dict):
            out.append(example_from_record(source, "records", need_generated, need_refs))
            continue
        for i, rec in enumerate(read_stage(Path(source))):
            out.append(example_from_record(rec, f"{source} record {i}", need_generated, need_refs))
    if not out:
        raise ValueError(f"no training records in {[str(s) for s in sources if not isinstance(s, dict)] or 'records'}")
    return out


def encode_row(prompt: list, response: list, seq_len: int, pad_id: int = 0):
    """One padded row: (tokens [S] int64, labels [S] int64, loss_mask [S] fp32, truncated: bool)."""
    full = list(prompt) + list(response)
    truncated = len(full) > seq_len + 1
    full = full[: seq_len + 1]
    n = len(full) - 1  # positions with a next token
    tokens = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), pad_id, dtype=torch.long)
    mask = torch.zeros(seq_len, dtype=torch.float32)
    if n > 0:
        tokens[:n] = torch.tensor(full[:-1], dtype=torch.long)
        labels[:n] = torch.tensor(full[1:], dtype=torch.long)
        # labels[i] = full[i + 1] is a response token when i + 1 >= len(prompt)
        start = max(len(prompt) - 1, 0)
        mask[start:n] = 1.0
    return tokens, labels, mask, truncated


# Rows are padded to a multiple of this: tensor-core GEMMs want multiples of 8 (bf16) and
# Transformer Engine's fp8 GEMMs multiples of 16; one number keeps CPU and GPU shapes alike.
PAD_MULTIPLE = 16


def pad_multiple(cfg) -> Optional[int]:
    """The row-length multiple for ``cfg`` (None: pad every row to ``model.seq_length``).

    ``PAD_MULTIPLE``, and under sequence parallelism also a multiple of ``parallel.tp``
    (Megatron splits the sequence dimension across the TP ranks).
    """
    if not cfg.train.pad_to_longest:
        return None
    multiple = PAD_MULTIPLE
    if cfg.parallel.sequence_parallel:
        multiple = math.lcm(multiple, cfg.parallel.tp)
    return multiple


def padded_length(longest: int, seq_len: int, multiple: Optional[int]) -> int:
    """``longest`` rounded up to ``multiple`` and capped at ``seq_len``; ``seq_len`` when ``multiple`` is None."""
    if multiple is None:
        return seq_len
    return min(seq_len, max(1, -(-longest // multiple)) * multiple)


def pad_to_length(batch: dict, length: int, pad_id: int = 0) -> dict:
    """``batch`` (from :func:`collate`) with its [R, S] tensors right-padded to [R, length] (``length >= S``)."""
    rows, s = batch["tokens"].shape
    if length == s:
        return batch
    if length < s:
        raise ValueError(f"pad_to_length: batch rows are {s} long, cannot pad to {length}")
    extra = length - s
    out = dict(batch)
    out["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, extra), value=pad_id)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=pad_id)
    out["loss_mask"] = torch.nn.functional.pad(batch["loss_mask"], (0, extra), value=0.0)
    out["position_ids"] = torch.arange(length, dtype=torch.long).expand(rows, length).contiguous()
    return out


def collate(examples: Sequence[Example], seq_len: int, objective: str, pad_id: int = 0,
            multiple: Optional[int] = None) -> dict:
    """Stack ``mb`` examples into one micro-batch dict (see module docstring).

    ``multiple`` (from :func:`pad_multiple`): pad to the longest row rounded up to it (at most
    ``seq_len``); None pads to ``seq_len``. Rows longer than ``seq_len + 1`` tokens are truncated.

    Returns, with R = 2 * mb rows for spin (real rows first) and mb rows for sft, and S the padded length:
        tokens [R, S] int64, labels [R, S] int64, loss_mask [R, S] fp32, position_ids [R, S] int64,
        token_counts [R] int64 (scored tokens), num_tokens: int (non-pad positions), ref_real / ref_gen [mb] fp32 (spin, NaN when absent),
        valid [mb] bool (every response has at least one scored token), truncated: int.
    """
    rows = [(ex.prompt_ids, ex.real_ids) for ex in examples]
    if objective == "spin":
        rows += [(ex.prompt_ids, ex.generated_ids) for ex in examples]
    enc = [encode_row(p, r, seq_len, pad_id) for p, r in rows]
    lengths = [min(len(p) + len(r), seq_len + 1) - 1 for p, r in rows]  # non-pad positions per row
    width = padded_length(max(lengths), seq_len, multiple)
    # Everything past the longest row is padding: cutting it there drops only pad positions.
    tokens = torch.stack([e[0] for e in enc])[:, :width]
    labels = torch.stack([e[1] for e in enc])[:, :width]
    mask = torch.stack([e[2] for e in enc])[:, :width]
    counts = mask.sum(dim=1).to(torch.long)  # [R]
    mb = len(examples)
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": mask,
        "position_ids": torch.arange(width, dtype=torch.long).expand(len(rows), width).contiguous(),
        "token_counts": counts,
        # non-pad positions of all rows: the throughput numerator (prompt + response tokens)
        "num_tokens": sum(lengths),
        "truncated": sum(int(e[3]) for e in enc),
    }
    if objective == "spin":
        batch["valid"] = (counts[:mb] > 0) & (counts[mb:] > 0)
        nan = float("nan")
        batch["ref_real"] = torch.tensor([nan if ex.ref_real is None else ex.ref_real for ex in examples], dtype=torch.float32)
        batch["ref_gen"] = torch.tensor([nan if ex.ref_gen is None else ex.ref_gen for ex in examples], dtype=torch.float32)
    else:
        batch["valid"] = counts > 0
    return batch


def sample_order(n_items: int, epochs: int, seed: int) -> torch.Tensor:
    """int64 [n_items * epochs]: one seeded permutation of the items per epoch (epoch e depends only on seed, e)."""
    from spin_mcore.data.packing import build_sample_index

    return torch.as_tensor(build_sample_index(n_items, epochs, seed), dtype=torch.long)


@dataclass
class StepPlan:
    """How the sample order is cut into steps: ``global_batch`` items per step, split over DP, then micro-batches."""

    order: torch.Tensor  # int64 [n_items * epochs]
    global_batch: int
    micro_batch: int
    dp: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def steps_available(self) -> int:
        return len(self.order) // self.global_batch  # the last partial batch is dropped

    def step_indices(self, step: int) -> torch.Tensor:
        """int64 [global_batch]: the items of ``step`` (all DP ranks)."""
        return self.order[step * self.global_batch:(step + 1) * self.global_batch]

    def rank_microbatches(self, step: int, dp_rank: int) -> list[torch.Tensor]:
        """This DP rank's micro-batches of ``step``: num_microbatches tensors of ``micro_batch`` item indices."""
        per_rank = self.global_batch // self.dp
        mine = self.step_indices(step)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return list(mine.split(self.micro_batch))


def make_plan(n_items: int, epochs: int, seed: int, global_batch: int, micro_batch: int, dp: int,
              max_steps: Optional[int] = None) -> tuple[StepPlan, int]:
    """(plan, total_steps). Raises ValueError when the batch sizes cannot be split over DP."""
    if global_batch % (dp * micro_batch):
        raise ValueError(f"train.global_batch_size={global_batch} is not divisible by "
                         f"train.micro_batch_size * DP = {micro_batch} * {dp}")
    epochs_needed = epochs
    if max_steps is not None:
        # enough epochs for max_steps full batches
        epochs_needed = max(1, -(-(max_steps * global_batch) // n_items))
    plan = StepPlan(sample_order(n_items, epochs_needed, seed), global_batch, micro_batch, dp)
    total = plan.steps_available if max_steps is None else min(max_steps, plan.steps_available)
    if total < 1:
        raise ValueError(f"{n_items} records x {epochs_needed} epochs give no full global batch of {global_batch}; "
                         "lower train.global_batch_size or add data")
    return plan, total


def global_counts(batches: Iterable[dict], objective: str) -> torch.Tensor:
    """fp64 [2]: (valid pairs or items, scored tokens of the real responses) summed over these micro-batches."""
    pairs = 0.0
    tokens = 0.0
    for b in batches:
        valid = b["valid"]
        pairs += float(valid.sum())
        real_counts = b["token_counts"][: len(valid)]
        tokens += float(real_counts[valid].sum())
    return torch.tensor([pairs, tokens], dtype=torch.float64)


@dataclass
class TrainingData:
    """The trainer's records as the chosen loader reads them (``data.loader``; see ``spin_mcore.training.loader``).

    ``n_items`` is known without reading a record under DALI (the stage manifests count them);
    ``examples`` (torch) holds every parsed record, ``files`` (dali) one token-store file per item.
    """

    loader: str  # "dali" | "torch"
    reason: str  # why this loader (the run prints it)
    n_items: int
    objective: str
    examples: Optional[list] = None
    files: Optional[list] = None


def open_training_data(setting: str, sources: Sequence, objective: str, rank: int = 0) -> TrainingData:
    """Resolve ``data.loader`` = ``setting`` for ``sources`` (stage directories and/or in-memory records).

    Collective when a stage has no token store yet (rank 0 converts it, then a barrier). Under
    ``auto`` a source without token ids falls back to torch; under ``dali`` it is a ValueError.
    """
    import torch.distributed as dist

    from spin_mcore.data.dali_loader import resolve_loader
    from spin_mcore.data.token_store import stage_files

    loader, reason = resolve_loader(setting, sources)
    if loader == "dali":
        barrier = dist.barrier if dist.is_initialized() else None
        files = stage_files([Path(s) for s in sources], rank, barrier)
        if files is not None:
            if not files:
                raise ValueError(f"no training records in {[str(s) for s in sources]}")
            return TrainingData("dali", reason, len(files), objective, files=files)
        if setting == "dali":
            raise ValueError(f"data.loader=dali: the records of {[str(s) for s in sources]} carry no token ids "
                             "for the token store")
        loader, reason = "torch", "data.loader=auto: records without token ids"
    examples = load_examples(list(sources), objective, need_refs=objective == "spin")
    return TrainingData("torch", reason, len(examples), objective, examples=examples)


def step_microbatches(examples: Sequence[Example], micro_batch: int) -> list[list[Example]]:
    """``examples`` (one rank's step, micro-batch order) cut into lists of ``micro_batch``."""
    return [list(examples[k:k + micro_batch]) for k in range(0, len(examples), micro_batch)]
