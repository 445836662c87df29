"""The reference pass: log p_theta_t(y|x) and log p_theta_t(y'|x) under the opponent, stored with the pairs.

SPIN's reference model is the opponent theta_t that generated y'. Scoring every
pair once, right after generation, means training keeps one model resident. The
pass uses exactly the training code path (``spin_mcore.training.step``: same
collate and padding rule, same micro-batch size, same Megatron schedule and
log-prob function), so at step 0 the policy reproduces these numbers to rounding.
With ``train.pack_sequences`` the pass packs too (:mod:`spin_mcore.training.packed`): the trainer's
packed rows are then scored by the same attention and log-prob code, and the pass skips the
padding a micro-batch of mixed lengths carries.

Output: a ShardedStage directory (resumable by shard) whose records are the input
records plus ``ref_logp_real`` and ``ref_logp_generated`` (fp32 sums over response tokens).
On SIGUSR1/SIGTERM (:mod:`spin_mcore.platform.preemption`) every rank stops after the
current shard, written and in the manifest, and raises ``Preempted``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from spin_mcore.platform import preemption
from spin_mcore.training.batches import REF_GEN, REF_REAL, collate, example_from_record, pad_multiple
from spin_mcore.training.step import LossSpec, score_microbatches
from spin_mcore.utils.io import read_json
from spin_mcore.utils.shards import ShardedStage, fingerprint, read_stage


def loss_spec(cfg, pstate, iteration: int = 0) -> LossSpec:
    """The :class:`LossSpec` of ``cfg`` for SPIN iteration ``iteration``."""
    from spin_mcore.config import per_iteration

    return LossSpec(objective=cfg.train.objective, beta=float(per_iteration(cfg.spin.beta, iteration)),
                    loss_type=cfg.spin.loss, sft_weight=cfg.spin.sft_weight,
                    length_normalize=cfg.spin.length_normalize, vocab_size=cfg.model.vocab_size,
                    tp_group=pstate.tp_group if pstate.tp > 1 else None,
                    fused_linear=cfg.train.fused_linear_logprobs,
                    fused_linear_chunk_tokens=cfg.train.fused_linear_chunk_tokens)


def _fingerprint(cfg, in_dirs: Sequence, model_id: str) -> str:
    inputs = [(str(Path(d).resolve()), (read_json(Path(d) / "manifest.json") or {}).get("fingerprint")) for d in in_dirs]
    packed = {"packed": True} if cfg.train.pack_sequences else {}  # absent when off: older stages still resume
    return fingerprint({"inputs": inputs, "model": cfg.model.__dict__, "model_id": model_id,
                        "micro_batch": cfg.train.micro_batch_size, "precision": cfg.precision.recipe, **packed})


def _score_records(cfg, model, pstate, records: list[dict], spec: LossSpec,
                   lengths: list[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    """{index in records: (ref_real, ref_gen)}, gathered onto every rank. Collective.

    Appends (rows, padded row length) of every micro-batch this rank ran to ``lengths``.
    """
    from spin_mcore.models.chunks import model_chunks

    mb, seq_len = cfg.train.micro_batch_size, cfg.model.seq_length
    mine = list(range(pstate.dp_rank, len(records), pstate.dp))
    if cfg.train.pack_sequences:
        seq = _score_packed(cfg, model, pstate, [records[i] for i in mine], spec, lengths)
        return _gather({mine[j]: v for j, v in seq.items()})
    # Every DP rank runs the same number of micro-batches; the padding repeats an item and is discarded.
    n_mb = max(1, math.ceil(math.ceil(len(records) / pstate.dp) / mb))
    if len(model_chunks(model)) > 1:  # the interleaved schedule runs micro-batches in groups of pp
        n_mb = math.ceil(n_mb / pstate.pp) * pstate.pp
    padded = (mine + [mine[-1] if mine else 0] * (n_mb * mb))[: n_mb * mb]
    examples = [example_from_record(records[i], f"record {i}", need_generated=True, need_refs=False) for i in padded]
    micro = [collate(examples[k * mb:(k + 1) * mb], seq_len, "spin", multiple=pad_multiple(cfg)) for k in range(n_mb)]
    lengths += [tuple(b["tokens"].shape) for b in micro]
    seq = score_microbatches(model, micro, spec, seq_len, mb)  # last stage: n_mb tensors [2 mb]
    found: dict[int, tuple[float, float]] = {}
    if pstate.is_last_stage and pstate.tp_rank == 0:
        for k, s in enumerate(seq):
            for j in range(mb):
                pos = k * mb + j
                if pos < len(mine):
                    found[mine[pos]] = (float(s[j]), float(s[mb + j]))
    return _gather(found)


def _gather(found: dict) -> dict:
    """The union of every rank's ``found``. Collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, found)
        found = {k: v for part in parts for k, v in part.items()}
    return found


def _score_packed(cfg, model, pstate, records: list[dict], spec: LossSpec,
                  lengths: list[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    """{index in records: (ref_real, ref_gen)} on the last stage's TP rank 0 ({} elsewhere), packed rows.

    This rank's records are packed as the trainer packs a step (:func:`pack_microbatches`, every row cut
    to the fullest one). Under the interleaved schedule the row count is topped up to a multiple of
    ``parallel.pp`` with copies of the last row, whose scores are discarded. Appends (1, row length) of
    each row to ``lengths``.
    """
    import dataclasses

    from spin_mcore.models.chunks import model_chunks
    from spin_mcore.training.packed import pack_microbatches, packed_qkv_format, packed_row_length

    mb, seq_len = cfg.train.micro_batch_size, cfg.model.seq_length
    if not records:  # fewer records than DP ranks: the forward-only schedule has no collective across DP
        return {}
    examples = [example_from_record(r, f"record {i}", need_generated=True, need_refs=False)
                for i, r in enumerate(records)]
    micro, groups = pack_microbatches(examples, seq_len, mb, multiple=pad_multiple(cfg))
    n_real = len(micro)
    if len(model_chunks(model)) > 1 and len(micro) % pstate.pp:
        micro += [micro[-1]] * (pstate.pp - len(micro) % pstate.pp)
    lengths += [tuple(b["tokens"].shape) for b in micro]
    spec = dataclasses.replace(spec, qkv_format=packed_qkv_format(pstate))
    seq = score_microbatches(model, micro, spec, packed_row_length(seq_len, mb), mb, rows=1)
    found: dict[int, tuple[float, float]] = {}
    if not (pstate.is_last_stage and pstate.tp_rank == 0):  # the other ranks' copies would only repeat these
        return found
    for s, group in zip(seq[:n_real], groups):
        k = len(group)
        for j, index in enumerate(group):
            found[index] = (float(s[j]), float(s[k + j]))
    return found


def compute_reference_logprobs(cfg, model, pstate, in_dirs: Sequence, out_dir, force: bool = False,
                               model_id: str = "") -> dict:
    """Score every pair of ``in_dirs`` (generation stage outputs) with ``model`` (theta_t); collective.

    Writes ``out_dir`` as a resumable ShardedStage (``cfg.generation.shard_size`` pairs per shard);
    shards already present are skipped. ``model_id`` (e.g. the checkpoint path) goes into the
    stage fingerprint so scores of a different model are never mixed in. Returns the summary dict.
    Raises ``Preempted`` after a complete shard when a stop signal arrived (see module docstring).
    """
    start = time.perf_counter()
    spec = loss_spec(cfg, pstate)
    if spec.objective != "spin":
        spec = LossSpec(**{**spec.__dict__, "objective": "spin"})
    records = [r for d in in_dirs for r in read_stage(d)]
    if not records:
        raise ValueError(f"reference pass: no records in {list(map(str, in_dirs))}")
    stage_fp = _fingerprint(cfg, in_dirs, model_id)
    if pstate.rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    stage = ShardedStage(out_dir, "reference", stage_fp, force=force)
    if stage.complete:
        return stage.manifest.get("summary", {})
    if dist.is_initialized():
        dist.barrier()  # every rank has read the manifest before rank 0 may rewrite it

    shard = cfg.generation.shard_size
    model.eval()
    scored = 0
    lengths: list[tuple[int, int]] = []  # (rows, padded row length) of each micro-batch this rank ran
    n_shards = (len(records) + shard - 1) // shard
    todo = [i for i in range(n_shards) if not stage.has_shard(i)]
    for index in todo:
        lo = index * shard
        chunk = records[lo:lo + shard]
        found = _score_records(cfg, model, pstate, chunk, spec, lengths)
        if pstate.rank == 0:
            out = []
            for i, rec in enumerate(chunk):
                real, gen = found[i]
                out.append({**rec, REF_REAL: real, REF_GEN: gen})
            stage.write_shard(index, out)
        scored += len(chunk)
        # Collective: every rank stops after the same shard (rank 0 wrote it and the manifest first).
        if index != todo[-1] and preemption.stop_requested():
            raise preemption.preempted(f"reference shard {index + 1}/{n_shards}")
    summary = {"pairs": len(records), "scored_now": scored, "seconds": round(time.perf_counter() - start, 3),
               "micro_batch_size": cfg.train.micro_batch_size, "seq_length": cfg.model.seq_length,
               # rows are padded per micro-batch (train.pad_to_longest); rank 0's lengths
               "padded_length_mean": round(sum(n for _, n in lengths) / len(lengths), 2) if lengths else None,
               "padded_length_max": max((n for _, n in lengths), default=None),
               "packed": bool(cfg.train.pack_sequences),
               "positions": sum(r * n for r, n in lengths)}  # rank 0's, padding included
    if pstate.rank == 0:
        stage.finalize(summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
