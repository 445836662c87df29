"""Packed-sequence training (train.pack_sequences) against the padded path.

Independent reference: the padded path (itself checked against fp64 unpadded rows and a
hand-written RMSprop step in tests/test_trainer.py). One spawned process does everything.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

from spin_mcore.training.batches import Example
from spin_mcore.training.packed import build_packed_seq_params, collate_packed, pack_microbatches

SEQ = 24
MB, GB = 1, 8
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]",
        "generation.shard_size=8", f"train.micro_batch_size={MB}", f"train.global_batch_size={GB}"]


# ----------------------------------------------------------------------------- unit tests (no processes)


def test_collate_packed_layout_positions_and_segments():
    ex = [Example([5, 6, 7], [8, 9], [10], 1.0, 2.0), Example([3], [4, 4, 4], [11, 12], -1.0, -2.0)]
    b = collate_packed(ex, seq_len=6, row_len=16)
    # segments real0 (4 pos), gen0 (3), real1 (3), gen1 (2), pad tail (4)
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 5, 6, 7, 3, 4, 4, 3, 11, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8, 9, 6, 7, 10, 4, 4, 4, 11, 12, 0, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # padded order: real0=0, real1=1, gen0=2, gen1=3; pad tail = 4
    assert b["segment_ids"].tolist() == [0] * 4 + [2] * 3 + [1] * 3 + [3] * 2 + [4] * 4
    assert b["cu_seqlens"].tolist() == [0, 4, 7, 10, 12, 16] and b["cu_seqlens"].dtype == torch.int32
    assert b["token_counts"].tolist() == [2, 3, 1, 2] and b["num_tokens"] == 12
    assert b["valid"].tolist() == [True, True] and b["ref_gen"].tolist() == [2.0, -2.0]
    with pytest.raises(ValueError, match="need 12 positions, row has 10"):
        collate_packed(ex, seq_len=6, row_len=10)


def test_packed_seq_params_sbhd_and_thd_construction():
    cu = torch.tensor([0, 4, 7, 10, 12, 16], dtype=torch.int32)
    sbhd = build_packed_seq_params(cu, 16, "sbhd")
    assert sbhd.qkv_format == "sbhd" and sbhd.max_seqlen_q == sbhd.max_seqlen_kv == 16  # RoPE table covers the row
    thd = build_packed_seq_params(cu, 16, "thd")
    assert thd.qkv_format == "thd" and thd.max_seqlen_q == thd.max_seqlen_kv == 4
    assert thd.cu_seqlens_q.dtype == torch.int32 and thd.cu_seqlens_kv.tolist() == cu.tolist()
    with pytest.raises(ValueError, match="ends at 16, row has 20"):
        build_packed_seq_params(cu, 20, "thd")


# ----------------------------------------------------------------------------- worker


def make_records(n: int, seed: int = 0, vocab: int = 500) -> list[dict]:
    """Random pairs (tests.helpers) plus one over-long pair that the padded path truncates."""
    recs = random_pair_records(n, seed, vocab)
    long = torch.randint(1, vocab, (25,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    recs[3]["real_ids"] = long  # 3-6 + 25 > SEQ + 1: truncated identically in both paths
    return recs


def _worker(tmp: str) -> dict:
    warnings.filterwarnings("ignore")
    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.batches import collate, load_examples
    from spin_mcore.training.packed import packed_row_length
    from spin_mcore.training.reference import compute_reference_logprobs, loss_spec
    from spin_mcore.training.step import score_microbatches
    from spin_mcore.training.trainer import setup_model, train
    from spin_mcore.utils.io import read_json

    tmp = Path(tmp)
    res: dict = {}
    cfg = load_config(overrides=BASE)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    write_pair_stage(tmp / "gen", make_records(16))
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref")
    examples = load_examples([tmp / "ref"], "spin", need_refs=True)
    spec = loss_spec(cfg, pstate)

    # (a) per-sequence policy log-probs of all 16 pairs, padded vs packed
    n = len(examples)
    padded = [collate(examples[k:k + MB], SEQ, "spin") for k in range(0, n, MB)]
    pad_seq = score_microbatches(model, padded, spec, SEQ, MB)
    pad = torch.stack([torch.cat([s[:MB] for s in pad_seq]), torch.cat([s[MB:] for s in pad_seq])], 1)  # [n, 2]
    packed, groups = pack_microbatches(examples, SEQ, MB)
    pk_seq = score_microbatches(model, packed, spec, packed_row_length(SEQ, MB), MB, rows=1)
    pk = torch.full((n, 2), float("nan"))
    for g, s in zip(groups, pk_seq):
        k = len(g)
        pk[g, 0], pk[g, 1] = s[:k], s[k:]
    res["logp_diff"] = float((pk - pad).abs().max())
    res["logp_rel_diff"] = float(((pk - pad).abs() / pad.abs().clamp(min=1)).max())
    res["logp_max_abs"] = float(pad.abs().max())
    res["pairs_per_row"] = [len(g) for g in groups]
    res["positions_padded"] = sum(b["tokens"].numel() for b in padded)
    res["positions_packed"] = sum(b["tokens"].numel() for b in packed)
    res["real_tokens"] = (sum(b["num_tokens"] for b in padded), sum(b["num_tokens"] for b in packed))

    # (c) the reference pass packed (train.pack_sequences=true) against the padded one above
    from spin_mcore.utils.shards import read_stage

    cp = load_config(overrides=BASE + ["train.pack_sequences=true"])
    res["ref_packed_summary"] = compute_reference_logprobs(cp, model, pstate, [tmp / "gen"], tmp / "ref_packed")
    res["ref_padded_summary"] = (read_json(tmp / "ref" / "manifest.json") or {}).get("summary")
    pad_refs = [(r["prompt_id"], r["ref_logp_real"], r["ref_logp_generated"]) for r in read_stage(tmp / "ref")]
    pk_refs = [(r["prompt_id"], r["ref_logp_real"], r["ref_logp_generated"]) for r in read_stage(tmp / "ref_packed")]
    res["ref_ids_equal"] = [x[0] for x in pad_refs] == [x[0] for x in pk_refs]
    res["ref_diff"] = max(abs(a[i] - b[i]) for a, b in zip(pad_refs, pk_refs) for i in (1, 2))
    res["ref_fingerprints"] = [(read_json(tmp / d / "manifest.json") or {}).get("fingerprint") for d in ("ref", "ref_packed")]

    # (b) one train step, same plan (data order, global batch), padded vs packed
    sums = {}
    # "pad" pads every row to SEQ (train.pad_to_longest=false): the layout packing is measured against.
    for name, extra in (("pad", ["train.pad_to_longest=false"]), ("packed", ["train.pack_sequences=true"])):
        c = load_config(overrides=BASE + ["train.max_steps=1"] + extra)
        sums[name] = train(c, pstate, [tmp / "ref"], str(tmp / "init"), tmp / f"run_{name}")
    res["summaries"] = sums
    return res


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("packed")
    return tmp, run_local(_worker, 1, str(tmp))[0]


def test_packed_logprobs_match_padded(result):
    _, res = result
    # sums of up to 24 token log-probs (|sum| up to ~150): 1e-5 absolute is below one fp32 ulp there,
    # so the bound is relative (fp32 eps = 1.2e-7) plus an absolute one of a few ulps
    print(f"logp max abs diff {res['logp_diff']:.3g}, max rel diff {res['logp_rel_diff']:.3g}, "
          f"max |logp| {res['logp_max_abs']:.1f}")
    assert res["logp_rel_diff"] < 1e-6, res["logp_rel_diff"]
    assert res["logp_diff"] < 5e-5, res["logp_diff"]
    assert max(res["pairs_per_row"]) > 1  # rows really hold several pairs
    assert res["real_tokens"][0] == res["real_tokens"][1]
    # 16 pairs = 16 padded micro-batches of 2 x 24; packed rows of 48 hold ~2.6 pairs each
    factor = res["positions_padded"] / res["positions_packed"]
    print(f"positions padded {res['positions_padded']} packed {res['positions_packed']} factor {factor:.2f} "
          f"pairs/row {res['pairs_per_row']}")
    assert res["positions_padded"] == 16 * 2 * SEQ
    assert factor >= 2.0, factor


def test_packed_train_step_matches_padded(result):
    tmp, res = result
    pad, pk = res["summaries"]["pad"], res["summaries"]["packed"]
    assert pk["packed"] and not pad["packed"]
    assert abs(pad["final"]["loss"] - pk["final"]["loss"]) < 1e-6
    assert pad["tokens"] == pk["tokens"]  # same pairs, same real-token count
    assert pk["positions_this_rank"] * 2 <= pad["positions_this_rank"], (pk["positions_this_rank"], pad["positions_this_rank"])
    a, b, init = (checkpoint_weights(tmp / d) for d in ("run_pad/model", "run_packed/model", "init"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-4, moved
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"weights moved {moved:.3g}, packed vs padded max diff {diff:.3g}")
    assert diff < 1e-5, diff
    np.testing.assert_allclose(pad["final"]["margin"], pk["final"]["margin"], atol=1e-5)


def test_packed_reference_pass_matches_padded(result):
    """train.pack_sequences=true packs the reference pass too: the same scores to fp32 rounding, fewer positions."""
    _, res = result
    print(f"reference packed vs padded max abs diff {res['ref_diff']:.3g}")
    assert res["ref_ids_equal"]
    assert res["ref_diff"] < 5e-5, res["ref_diff"]
    fp_pad, fp_packed = res["ref_fingerprints"]
    assert fp_pad and fp_packed and fp_pad != fp_packed  # a padded stage is never resumed as a packed one
    # 16 micro-batches of 2 rows, each padded to its longest (train.pad_to_longest), vs a few rows of at most
    # 2 * MB * SEQ positions: 528 vs 336 on these records
    pad_pos, packed_pos = res["ref_padded_summary"]["positions"], res["ref_packed_summary"]["positions"]
    print(f"positions: padded {pad_pos}, packed {packed_pos}")
    assert pad_pos <= 16 * 2 * SEQ
    assert res["ref_packed_summary"]["packed"] and not res["ref_padded_summary"]["packed"]
    assert res["ref_packed_summary"]["padded_length_max"] <= 2 * MB * SEQ
    assert packed_pos <= 0.7 * pad_pos, (packed_pos, pad_pos)
