"""Packed SPIN micro-batches (``train.pack_sequences``): several pairs per row, no per-sequence padding.

A packed micro-batch is ONE row of ``row_len`` positions (``row_len = 2 * micro_batch_size *
seq_length``, the same token budget as a padded micro-batch). Which pairs share a row is
decided by :func:`spin_mcore.data.packing.pack_pairs` (first-fit-decreasing) over ALL of this
DP rank's pairs of the current optimizer step, so a step of short pairs runs fewer, fuller
rows. Every pair's sequences are encoded exactly as the padded path encodes them
(:func:`spin_mcore.training.batches.collate`, truncation included) and then laid out::

    real_0 | gen_0 | real_1 | gen_1 | ... | pad tail

Segment ``j`` holds only the positions with a next token (``len(prompt + response) - 1``,
at least 1). The pad tail is one more segment whose tokens are never scored.

Why the numbers match the padded path:
  * attention: Megatron ``PackedSeqParams.cu_seqlens_q/kv`` make attention block-diagonal
    causal (SDPAttention builds the mask on CPU; TE runs its ``thd`` kernels on GPU);
  * RoPE: Megatron 0.16.1's ``GPTModel`` ignores ``position_ids`` for RoPE. With
    ``qkv_format='sbhd'`` (CPU / SDPA) it rotates by the absolute position in the row
    (``max_seqlen`` must then be ``row_len``); since attention never crosses a segment and
    RoPE scores depend only on ``q_pos - k_pos``, this equals per-segment positions up to
    rounding. With ``'thd'`` (TE) ``apply_rotary_pos_emb`` is given ``cu_seqlens`` and
    restarts positions per segment. ``position_ids`` restart at 0 per segment anyway, for
    position-embedding types that do read them;
  * loss: per-token log-probs are summed per segment (``index_add`` over ``segment_ids``)
    into the same ``[real..., generated...]`` order as a padded micro-batch, and the batch
    carries the same ``valid`` / ``token_counts`` / refs, so ``spin_loss`` and the global
    normaliser are shared unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from spin_mcore.training.batches import Example, collate


def packed_qkv_format(pstate) -> str:
    """'thd' when the model runs Transformer Engine attention (CUDA + TE), else 'sbhd' (SDPAttention)."""
    from spin_mcore.models.gpt import have_transformer_engine

    return "thd" if pstate.device.type == "cuda" and have_transformer_engine() else "sbhd"


def packed_row_length(seq_len: int, micro_batch: int) -> int:
    """Positions of one packed row: the token budget of a padded SPIN micro-batch (2 * mb * S)."""
    return 2 * micro_batch * seq_len


def segment_lengths(examples: Sequence[Example], seq_len: int) -> np.ndarray:
    """int64 [N, 2]: positions (tokens with a next token, after truncation to S + 1) of real / generated, >= 1."""
    def n(prompt, resp):
        return max(min(len(prompt) + len(resp), seq_len + 1) - 1, 1)

    return np.asarray([[n(e.prompt_ids, e.real_ids), n(e.prompt_ids, e.generated_ids)] for e in examples],
                      dtype=np.int64).reshape(-1, 2)


def build_packed_seq_params(cu_seqlens: torch.Tensor, row_len: int, qkv_format: str, device=None):
    """Megatron ``PackedSeqParams`` for one packed row.

    cu_seqlens: int [n_segments + 1], 0 .. row_len (the pad tail is the last segment).
    ``sbhd``: max_seqlen = row_len, because Megatron sizes the RoPE table from max_seqlen and
    applies it to the whole [S, 1, h, d] row. ``thd``: max_seqlen = the longest segment.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if qkv_format not in ("sbhd", "thd"):
        raise ValueError(f"build_packed_seq_params: qkv_format={qkv_format!r}, expected 'sbhd' or 'thd'")
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    if int(cu[-1]) != row_len:
        raise ValueError(f"build_packed_seq_params: cu_seqlens ends at {int(cu[-1])}, row has {row_len} positions")
    max_len = row_len if qkv_format == "sbhd" else int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def collate_packed(examples: Sequence[Example], seq_len: int, row_len: int, pad_id: int = 0) -> dict:
    """One packed row of k pairs (see module docstring).

    Returns the keys of :func:`collate` (``valid``, ``ref_real``, ``ref_gen`` [k]; ``token_counts``
    [2k] in padded order real_0..real_{k-1}, gen_0..gen_{k-1}; ``num_tokens``; ``truncated``) with
    tokens / labels / position_ids [1, row_len] int64, loss_mask [1, row_len] fp32, plus
    segment_ids [row_len] int64 (padded-order sequence index, 2k on the pad tail) and
    cu_seqlens [n_segments + 1] int32. Raises ValueError when the pairs do not fit in row_len.
    """
    k = len(examples)
    padded = collate(examples, seq_len, "spin", pad_id)
    lengths = segment_lengths(examples, seq_len)
    used = int(lengths.sum())
    if used > row_len:
        raise ValueError(f"collate_packed: {k} pairs need {used} positions, row has {row_len}")
    tokens = torch.full((row_len,), pad_id, dtype=torch.long)
    labels = torch.full((row_len,), pad_id, dtype=torch.long)
    mask = torch.zeros(row_len, dtype=torch.float32)
    positions = torch.zeros(row_len, dtype=torch.long)
    segments = torch.full((row_len,), 2 * k, dtype=torch.long)
    cu = [0]
    for m in range(k):
        for side, row in ((0, m), (1, k + m)):  # real then generated, adjacent
            n, lo = int(lengths[m, side]), cu[-1]
            tokens[lo:lo + n] = padded["tokens"][row, :n]
            labels[lo:lo + n] = padded["labels"][row, :n]
            mask[lo:lo + n] = padded["loss_mask"][row, :n]
            positions[lo:lo + n] = torch.arange(n)
            segments[lo:lo + n] = row
            cu.append(lo + n)
    if cu[-1] < row_len:  # the pad tail: its own segment, so no real token attends to it
        positions[cu[-1]:] = torch.arange(row_len - cu[-1])
        cu.append(row_len)
    batch = {k_: v for k_, v in padded.items() if k_ not in ("tokens", "labels", "loss_mask", "position_ids")}
    batch.update(tokens=tokens[None], labels=labels[None], loss_mask=mask[None], position_ids=positions[None],
                 segment_ids=segments, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    return batch


def pack_microbatches(examples: Sequence[Example], seq_len: int, micro_batch: int,
                      pad_id: int = 0, multiple: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """Pack all of ``examples`` (this rank's pairs of one step) into rows of ``packed_row_length``.

    ``multiple`` (``train.pad_to_longest``: :func:`~spin_mcore.training.batches.pad_multiple`): every row of
    the step is cut to the step's fullest row, rounded up to ``multiple`` (one shape for the step, as PP's
    send/recv buffers need). Without it a row of short pairs still ran all 2 * mb * S positions through every
    GEMM: slower than the padded path at mixed lengths (benchmarks/spin_step.py --lengths mixed).
    Returns (micro-batches, pair indices into ``examples`` per micro-batch), rows in
    ``pack_pairs`` order. Deterministic; every pair appears exactly once.
    """
    from spin_mcore.data.packing import pack_pairs

    row_len = packed_row_length(seq_len, micro_batch)
    lengths = segment_lengths(examples, seq_len)
    bins = pack_pairs(lengths, row_len)
    groups = [bins.bin(b).tolist() for b in range(bins.n_bins)]
    if multiple:
        used = max(int(lengths[g].sum()) for g in groups)
        row_len = min(row_len, -(-used // multiple) * multiple)
    return [collate_packed([examples[i] for i in g], seq_len, row_len, pad_id) for g in groups], groups


def packed_sequence_logps(logits: torch.Tensor, batch: dict, tp_group, vocab_size: int):
    """(seq_logps [2k] fp32, token_counts [2k] int64) of a packed row, in padded order.

    logits: [1, row_len, V/tp]. Token log-probs from ``sequence_logprobs(return_token_logprobs=True)``
    are summed per segment with ``index_add`` (the pad tail, segment 2k, is dropped).
    """
    from spin_mcore.logprobs import sequence_logprobs

    out = sequence_logprobs(logits, batch["labels"], batch["loss_mask"], tp_group=tp_group,
                            vocab_size=vocab_size, return_token_logprobs=True)
    counts = batch["token_counts"]
    seg = batch["segment_ids"].to(logits.device)
    keep = seg < counts.numel()
    seq = torch.zeros(counts.numel(), dtype=torch.float32, device=logits.device)
    seq = seq.index_add(0, seg[keep], out.token_logps[0][keep].float())
    return seq, counts
