"""One optimizer step (``train_step``) and one scoring pass (``score_microbatches``) on Megatron's schedules.

Both use the same ``forward_step`` and the same log-prob code, so the reference
log-probs stored after generation are bitwise what the policy computes at step 0.

Loss normalisation (exact over the whole global batch)
------------------------------------------------------
``spin_loss`` / ``sft_loss`` get ``normalizer`` = the number of valid pairs (or
scored tokens) of the WHOLE global batch, all-reduced over DP before the step, so
the micro-batch losses simply add up to the global mean. Megatron must then not
rescale: the model config sets ``calculate_per_token_loss=True`` (no division by
``num_microbatches`` in ``forward_step_calc_loss``, and DDP sums rather than
averages over DP) and the loss function returns the 3-tuple
``(loss, num_tokens=0, stats)``, so ``finalize_model_grads`` skips its
``1/num_tokens`` scaling. Gradient accumulation and DP are therefore exact sums of
per-pair gradients / N_global.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.platform.collectives import all_reduce_host

# Per-micro-batch statistics, summed over micro-batches and ranks (order matters: see STAT_NAMES).
STAT_NAMES = ("loss", "margin_sum", "correct", "valid", "real_logp_sum", "gen_logp_sum", "tokens", "truncated")


@dataclass
class LossSpec:
    """What the loss function needs besides the batch."""

    objective: str  # spin | sft
    beta: float
    loss_type: str
    sft_weight: float
    length_normalize: bool
    vocab_size: int  # true vocab; padded columns are excluded from the softmax
    tp_group: object = None
    qkv_format: str = "sbhd"  # packed rows only: 'thd' under Transformer Engine (see training/packed.py)
    fused_linear: bool = False  # train.fused_linear_logprobs: the model returns hidden states, the op projects
    fused_linear_chunk_tokens: int = 512  # train.fused_linear_chunk_tokens


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, tp_group, vocab_size: int,
                   inplace_grad: bool = False):
    """(seq_logps [R] fp32, token_counts [R] int64) from vocab-parallel logits [R, S, V/tp].

    ``logits`` may be the [R, S, V/tp] view of Megatron's sequence-major [S, R, V/tp] output
    (no copy is made). ``inplace_grad``: backward writes the logits' gradient into the logits
    buffer itself; only for logits nothing else reads afterwards (the output layer's backward
    needs its input and weight, not its output).
    """
    from spin_mcore.logprobs import sequence_logprobs

    out = sequence_logprobs(logits, labels, loss_mask, tp_group=tp_group, vocab_size=vocab_size,
                            inplace_grad=inplace_grad)
    return out.seq_logps, out.token_counts


def _loss_func(batch: dict, spec: LossSpec, normalizer: torch.Tensor, logits: torch.Tensor,
               output_weight: Optional[torch.Tensor] = None):
    """Megatron loss_func for one micro-batch: returns (loss, 0, stats) (see module docstring).

    ``logits``: the model's output; with ``output_weight`` ([V/tp, h], ``spec.fused_linear``) it is
    the final hidden states [S, R, h] and the fused linear op applies the output layer.
    """
    from spin_mcore.training.loss import sft_loss, spin_loss

    if output_weight is not None:
        from spin_mcore.logprobs.fused_linear import fused_linear_sequence_logprobs

        out = fused_linear_sequence_logprobs(logits, output_weight, batch["labels"], batch["loss_mask"],
                                             tp_group=spec.tp_group, vocab_size=spec.vocab_size,
                                             chunk_tokens=spec.fused_linear_chunk_tokens)
        seq, counts = out.seq_logps, out.token_counts  # [R]
    elif "segment_ids" in batch:  # packed row (train.pack_sequences): per-segment sums, same [R] order
        from spin_mcore.training.packed import packed_sequence_logps

        seq, counts = packed_sequence_logps(logits, batch, spec.tp_group, spec.vocab_size)
    else:
        # [S, R, V/tp] from the model (forward_step); the [R, S, V/tp] view costs no copy. The buffer is the
        # output layer's fresh output, read by nothing after us: backward may overwrite it with its gradient.
        seq, counts = sequence_logps(logits.transpose(0, 1), batch["labels"], batch["loss_mask"], spec.tp_group,
                                     spec.vocab_size, inplace_grad=logits.requires_grad)  # [R]
    valid = batch["valid"]
    mb = valid.shape[0]
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    stats[6] = float(batch["num_tokens"])
    stats[7] = float(batch["truncated"])
    if spec.objective == "spin":
        policy_real, policy_gen = seq[:mb], seq[mb:]
        ref_real, ref_gen = batch["ref_real"], batch["ref_gen"]
        if spec.length_normalize:
            n_real = counts[:mb].clamp(min=1).float()
            n_gen = counts[mb:].clamp(min=1).float()
            policy_real, policy_gen = policy_real / n_real, policy_gen / n_gen
            ref_real, ref_gen = ref_real / n_real, ref_gen / n_gen
        out = spin_loss(policy_real, policy_gen, ref_real, ref_gen, spec.beta, spec.loss_type,
                        valid=valid, normalizer=normalizer[0].clamp(min=1))
        loss = out.loss
        if spec.sft_weight:
            loss = loss + spec.sft_weight * sft_loss(torch.where(valid, seq[:mb], 0.0),  # sums, not means
                                                     torch.where(valid, counts[:mb], 0),
                                                     normalizer=normalizer[1].clamp(min=1))
        v = valid
        stats[1] = float(out.margins[v].sum())
        stats[2] = float((out.margins[v] > 0).sum())
        stats[3] = float(v.sum())
        stats[4] = float(seq[:mb].detach()[v].sum())
        stats[5] = float(seq[mb:].detach()[v].sum())
    else:
        loss = sft_loss(torch.where(valid, seq, 0.0), torch.where(valid, counts, 0), normalizer=normalizer[1].clamp(min=1))
        stats[3] = float(valid.sum())
        stats[4] = float(seq.detach()[valid].sum())
    stats[0] = float(loss.detach())
    return loss, torch.zeros([], dtype=torch.int), {"stats": stats, "seq_logps": seq.detach(), "counts": counts}


def forward_step(spec: LossSpec, normalizer: torch.Tensor, data_iterator, model):
    """Megatron forward_step_func: (logits on the last stage, loss_func): [S, R, V/tp] sequence-major,
    or [1, row_len, V/tp] for a packed row; with ``spec.fused_linear`` the final hidden states [S, R, h]
    instead (the loss function applies the output layer chunk by chunk, never holding all the logits).

    A packed batch (``cu_seqlens`` present, [1, row_len]) runs with Megatron ``PackedSeqParams``.
    """
    batch = next(data_iterator)
    # Collation happens on the CPU; move this micro-batch next to the weights (a no-op on the CPU platform).
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "cu_seqlens" in batch:
        if spec.fused_linear:
            raise ValueError("train.fused_linear_logprobs=true does not support packed rows (train.pack_sequences)")
        from spin_mcore.training.packed import build_packed_seq_params

        params = build_packed_seq_params(batch["cu_seqlens"], batch["tokens"].shape[1], spec.qkv_format,
                                         device=batch["tokens"].device)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, packed_seq_params=params)
    elif spec.fused_linear:
        from spin_mcore.models.checkpoint import unwrap_model

        # Final hidden states [S, R, h] on the last stage; the loss function owns the output layer.
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, final_hidden_states=True)
        gpt = unwrap_model(model)
        if gpt.post_process:
            return output, partial(_loss_func, batch, spec, normalizer, output_weight=gpt.output_weight())
    else:
        # Sequence-major logits [S, R, V/tp]: Megatron's [R, S, V/tp] transpose copy is skipped.
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, sequence_major_logits=True)
    return output, partial(_loss_func, batch, spec, normalizer)


def rows_per_microbatch(objective: str, micro_batch: int) -> int:
    return 2 * micro_batch if objective == "spin" else micro_batch


def run_schedule(model, microbatches: list[dict], spec: LossSpec, normalizer: torch.Tensor, seq_len: int,
                 micro_batch: int, forward_only: bool, rows: Optional[int] = None) -> list[dict]:
    """Run Megatron's forward(-backward) schedule; the per-micro-batch loss dicts on the last pipeline
    stage, [] elsewhere. ``rows`` overrides the rows per micro-batch (1 when packed).

    ``model`` is one stage (no pipelining, or 1F1B when PP > 1) or a ``ModelChunks`` of virtual
    stages (interleaved 1F1B; each chunk reads the micro-batches through its own iterator, in order).
    Rows may be shorter than ``seq_len`` (``train.pad_to_longest``); under PP the step's micro-batches
    are first padded to their common longest, the one shape the send/recv buffers are built for.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from spin_mcore.models.chunks import model_chunks
    from spin_mcore.training.batches import pad_to_length

    chunks = model_chunks(model)
    pp = chunks[0].config.pipeline_model_parallel_size
    vp = len(chunks) if len(chunks) > 1 else None
    length = max(b["tokens"].shape[1] for b in microbatches)
    if length > seq_len:
        raise ValueError(f"run_schedule: micro-batch rows are {length} long, more than seq_len={seq_len}")
    if pp > 1:
        microbatches = [pad_to_length(b, length) for b in microbatches]
    if vp is not None and len(microbatches) % pp:
        raise ValueError(f"parallel.vp={vp}: the interleaved schedule needs the micro-batches per step "
                         f"(train.global_batch_size / (train.micro_batch_size * DP) = {len(microbatches)}) "
                         f"to be a multiple of parallel.pp={pp}")
    fb = get_forward_backward_func(pp_size=pp, vp_size=vp)
    return fb(
        forward_step_func=partial(forward_step, spec, normalizer),
        data_iterator=[iter(microbatches) for _ in chunks] if vp else iter(microbatches),
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=length,
        micro_batch_size=rows if rows is not None else rows_per_microbatch(spec.objective, micro_batch),
        forward_only=forward_only,
    )


def reduce_stats(outputs: list[dict], pstate) -> torch.Tensor:
    """fp64 [len(STAT_NAMES)] summed over micro-batches, DP and the last stage; identical on every rank.

    Only last-stage ranks with tp_rank 0 contribute, so each number is counted once.
    """
    total = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    if pstate.is_last_stage and pstate.tp_rank == 0:
        for out in outputs:
            total += out["stats"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_host(total)
    return total


def train_step(model, optimizer, microbatches: list[dict], spec: LossSpec, seq_len: int, micro_batch: int,
               pstate, clip_grad: float, rows: Optional[int] = None) -> dict:
    """One optimizer step over this rank's micro-batches of the global batch.

    Packed micro-batches (``train.pack_sequences``) pass ``seq_len`` = the packed row length and ``rows=1``.

    Skips the update (returns ``skipped=True``) when the loss or the global grad norm is not finite.
    Returns {"stats": fp64 [len(STAT_NAMES)] global sums, "grad_norm": float, "skipped": bool}.
    """
    from spin_mcore.training.batches import global_counts

    normalizer = global_counts(microbatches, spec.objective)  # [pairs, tokens] on this DP rank
    if pstate.dp > 1:
        all_reduce_host(normalizer, group=pstate.dp_group)
    normalizer = normalizer.float()

    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(model, microbatches, spec, normalizer, seq_len, micro_batch, forward_only=False, rows=rows)
    stats = reduce_stats(outputs, pstate)

    # The optimizer's own step() would update before we could look at the norm: run its phases.
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    skipped = bool(found_inf) or not math.isfinite(grad_norm) or not math.isfinite(float(stats[0]))
    if not skipped:
        if clip_grad > 0:
            optimizer.clip_grad_norm(clip_grad)
        skipped = not optimizer.step_with_ready_grads()
    return {"stats": stats, "grad_norm": grad_norm, "skipped": skipped}


def score_microbatches(model, microbatches: list[dict], spec: LossSpec, seq_len: int, micro_batch: int,
                       rows: Optional[int] = None) -> list[torch.Tensor]:
    """Forward-only pass with the training code path: per micro-batch seq_logps [R] fp32 on the last stage."""
    n = torch.ones(2)
    with torch.no_grad():
        outputs = run_schedule(model, microbatches, spec, n, seq_len, micro_batch, forward_only=True, rows=rows)
    return [o["seq_logps"] for o in outputs]
