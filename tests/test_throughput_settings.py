"""GPU throughput settings as config fields: what TransformerConfig / DDP config each produces, and that
the ones that run on a CPU change nothing but speed.

* parallel.cp > 1 is refused (load_config and the CLI);
* train.fused_kernels: Megatron's fusions on with CUDA + Transformer Engine, off (and ``on`` refused) on CPU;
* perform_initialization=False whenever a checkpoint is loaded next: same weights bitwise, same
  tensor-parallel attributes as an initialised model;
* train.pad_to_longest: reference log-probs and a training step equal to the pad-to-seq_length path;
* parallel.overlap_grad_reduce / overlap_param_gather: a DP=2 run on gloo equals the run without overlap.

Virtual pipeline stages have their own file (test_virtual_pipeline.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

from spin_mcore.config import ConfigError, PrecisionConfig, load_config

SEQ = 64  # rows here are 5-15 tokens: padding to the longest row (16) is 4x shorter than to SEQ
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]", "generation.shard_size=8",
        "train.micro_batch_size=1", "train.global_batch_size=4"]
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "persist_layer_norm", "gradient_accumulation_fusion")


def _cfg(overrides):
    return load_config(overrides=BASE + list(overrides))


# ----------------------------------------------------------------------------- context parallelism


def test_context_parallelism_is_refused_in_config_and_cli(capsys):
    with pytest.raises(ConfigError, match=r"parallel.cp=2: context parallelism is not supported yet"):
        load_config(overrides=["parallel.cp=2"])
    from spin_mcore.cli import main

    assert main(["run", "model.preset=tiny", "parallel.cp=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.cp=2" in err[0] and "not supported yet" in err[0], err


@pytest.mark.parametrize("overrides, match", [
    (["parallel.vp=2"], r"parallel.vp=2 needs parallel.pp > 1"),
    (["parallel.pp=2", "parallel.vp=2", "model.num_layers=6"], r"model.num_layers=6 is not divisible by parallel.pp \* parallel.vp"),
    (["parallel.pp=2", "parallel.vp=2", "model.num_layers=4", "train.global_batch_size=6", "train.micro_batch_size=2"],
     r"train.global_batch_size / train.micro_batch_size .* multiple of parallel.pp=2"),
    (["parallel.vp=0"], r"parallel.vp=0: must be >= 1"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     r"parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (["parallel.ddp_bucket_size=0"], r"parallel.ddp_bucket_size=0"),
    (["train.fused_kernels=yes"], r"train.fused_kernels='yes'"),
])
def test_throughput_settings_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


# ----------------------------------------------------------------------------- TransformerConfig / DDP config


def _tconfig(**kwargs):
    from spin_mcore.models.gpt import build_transformer_config

    cfg = load_config(overrides=["model.preset=tiny"])
    gpu = kwargs.pop("gpu", False)
    return build_transformer_config(cfg.model, 1, kwargs.pop("pp", 1), PrecisionConfig(), gpu, **kwargs)


def test_fused_kernels_on_gpu_with_transformer_engine(monkeypatch):
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    from spin_mcore.models import gpt

    # No GPU here: pretend CUDA + TE for the config (Megatron checks that TE's fused RoPE imports).
    monkeypatch.setattr(gpt, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    # apex's fused weight-gradient extension present (tests/test_gpu_build_path.py covers its absence)
    monkeypatch.setattr(gpt, "apex_fused_wgrad_available", lambda: True)
    for setting in ("auto", "on"):
        c = _tconfig(gpu=True, fused_kernels=setting, for_ddp=True)
        assert all(getattr(c, f) is True for f in FUSIONS), {f: getattr(c, f) for f in FUSIONS}
    # a model not wrapped in DDP has no main_grad to accumulate into: every other fusion stays on
    c = _tconfig(gpu=True, fused_kernels="auto")
    assert [f for f in FUSIONS if not getattr(c, f)] == ["gradient_accumulation_fusion"]
    c = _tconfig(gpu=True, fused_kernels="off")
    assert not any(getattr(c, f) for f in FUSIONS)


def test_fused_kernels_off_on_cpu_and_without_te(monkeypatch):
    from spin_mcore.models import gpt

    c = _tconfig(gpu=False, fused_kernels="auto")
    assert not any(getattr(c, f) for f in FUSIONS)
    with pytest.raises(ConfigError, match=r"train.fused_kernels=on needs CUDA and Transformer Engine; this process has no a CUDA device"):
        _tconfig(gpu=False, fused_kernels="on")
    monkeypatch.setattr(gpt, "have_transformer_engine", lambda: False)
    assert not any(getattr(_tconfig(gpu=True, fused_kernels="auto"), f) for f in FUSIONS)
    with pytest.raises(ConfigError, match=r"train.fused_kernels=on .* no Transformer Engine"):
        _tconfig(gpu=True, fused_kernels="on")


def test_perform_initialization_and_virtual_stages_reach_transformer_config():
    assert _tconfig().perform_initialization is True
    assert _tconfig(perform_initialization=False).perform_initialization is False
    c = _tconfig(pp=2, vp_size=2)
    assert c.virtual_pipeline_model_parallel_size == 2 and c.microbatch_group_size_per_vp_stage == 2
    # un-batched, overlapped p2p (Megatron's interleaved default; batched p2p mismatches at PP=2)
    assert c.overlap_p2p_comm is True and c.batch_p2p_comm is False
    c = _tconfig(pp=2)
    assert c.virtual_pipeline_model_parallel_size is None and c.batch_p2p_comm is True


def test_ddp_and_optimizer_config_carry_the_overlaps():
    from spin_mcore.config import ParallelConfig, TrainConfig
    from spin_mcore.training.optimizer import build_ddp_config, build_optimizer_config

    d = build_ddp_config(ParallelConfig())
    assert (d.overlap_grad_reduce, d.overlap_param_gather, d.use_distributed_optimizer, d.bucket_size) == (False, False, True, None)
    assert d.grad_reduce_in_fp32 is True
    d = build_ddp_config(ParallelConfig(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=5000))
    assert (d.overlap_grad_reduce, d.overlap_param_gather, d.align_param_gather, d.bucket_size) == (True, True, False, 5000)
    o = build_optimizer_config(TrainConfig(), 1e-3, True, torch.float32, overlap_param_gather=True)
    assert o.overlap_param_gather is True and o.use_distributed_optimizer is True


def test_pad_to_longest_row_lengths():
    from spin_mcore.training.batches import Example, collate, pad_multiple, pad_to_length, padded_length

    assert pad_multiple(load_config(overrides=["train.pad_to_longest=false"])) is None
    assert pad_multiple(load_config(overrides=[])) == 16
    # sequence parallelism splits the sequence over TP: the multiple is also one of tp
    assert pad_multiple(load_config(overrides=["parallel.tp=3", "model.num_attention_heads=6", "model.num_query_groups=3",
                                               "model.hidden_size=96", "parallel.sequence_parallel=true"])) == 48
    assert [padded_length(n, 40, 16) for n in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]  # capped at seq_length
    assert padded_length(5, 40, None) == 40
    ex = [Example([5, 6, 7], [8, 9], [10], 1.0, 2.0), Example([3] * 20, [4] * 3, [11, 12], -1.0, -2.0)]
    b = collate(ex, seq_len=64, objective="spin", multiple=16)
    assert b["tokens"].shape == (4, 32) and b["position_ids"][0].tolist() == list(range(32))  # longest row: 22
    fixed = collate(ex, seq_len=64, objective="spin")
    assert fixed["tokens"].shape == (4, 64) and torch.equal(fixed["tokens"][:, :32], b["tokens"])
    assert torch.equal(fixed["loss_mask"][:, 32:], torch.zeros(4, 32)) and b["num_tokens"] == fixed["num_tokens"]
    wide = pad_to_length(b, 64)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(wide[key], fixed[key]), key


# ----------------------------------------------------------------------------- single-process runs


def _tp_attributes(model) -> dict:
    names = ("tensor_model_parallel", "partition_dim", "partition_stride")
    return {n: tuple(getattr(p, a, None) for a in names) for n, p in model.named_parameters()}


def _single_worker(tmp: str) -> dict:
    """perform_initialization on load; reference pass and one training step with and without pad_to_longest."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train
    from spin_mcore.utils.shards import read_stage

    tmp = Path(tmp)
    res: dict = {}
    cfg = _cfg([])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    write_pair_stage(tmp / "gen", random_pair_records(12))
    init = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(init, pstate, tmp / "init", cfg.model)

    loaded = setup_model(_cfg(["train.seed=7"]), pstate, str(tmp / "init"), wrap_ddp=False)
    res["perform_init"] = (init.config.perform_initialization, loaded.config.perform_initialization)
    res["loaded_vs_saved"] = max(float((a - b).abs().max()) for a, b in zip(init.parameters(), loaded.parameters()))
    res["same_tp_attributes"] = _tp_attributes(init) == _tp_attributes(loaded)
    res["n_tp_attributes"] = sum(v[0] is True for v in _tp_attributes(loaded).values())

    for pad in ("true", "false"):
        c = _cfg([f"train.pad_to_longest={pad}"])
        res[f"ref_summary_{pad}"] = compute_reference_logprobs(c, init, pstate, [tmp / "gen"], tmp / f"ref_{pad}")
        res[f"refs_{pad}"] = [[r["ref_logp_real"], r["ref_logp_generated"]] for r in read_stage(tmp / f"ref_{pad}")]
    for pad in ("true", "false"):
        c = _cfg([f"train.pad_to_longest={pad}", "train.max_steps=2"])
        res[f"train_{pad}"] = train(c, pstate, [tmp / "ref_false"], str(tmp / "init"), tmp / f"run_{pad}")
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("throughput")
    return tmp, run_local(_single_worker, 1, str(tmp))[0]


def test_loaded_model_skips_init_and_equals_checkpoint_bitwise(single):
    _, res = single
    assert res["perform_init"] == (True, False)
    assert res["loaded_vs_saved"] == 0.0  # another seed, no init: every parameter came from the checkpoint
    # the attributes Megatron's init sets (grad-norm deduplication over TP reads them)
    assert res["same_tp_attributes"] and res["n_tp_attributes"] == 2 + 4 * 2  # embedding, output, 4 per layer


def test_pad_to_longest_matches_pad_to_seq_length(single):
    tmp, res = single
    padded, fixed = res["ref_summary_true"], res["ref_summary_false"]
    assert fixed["padded_length_max"] == fixed["padded_length_mean"] == SEQ
    assert padded["padded_length_max"] == 16 and padded["padded_length_mean"] <= 16  # rows of 5-15 tokens
    diff = float((torch.tensor(res["refs_true"], dtype=torch.float64) - torch.tensor(res["refs_false"], dtype=torch.float64)).abs().max())
    print(f"pad_to_longest vs pad to {SEQ}: max |log-prob difference| {diff:.3g}")
    assert diff < 1e-5, diff  # fp32 log-prob sums of -10 to -50 (1 ulp at 32 is 3.8e-6)
    a, b = res["train_true"], res["train_false"]
    assert a["positions_this_rank"] * 4 == b["positions_this_rank"]  # 2 steps x 4 pairs x 2 rows x 16 vs x 64
    la = [json.loads(x)["loss"] for x in (tmp / "run_true" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp / "run_false" / "metrics.jsonl").read_text().splitlines()]
    wa, wb = checkpoint_weights(tmp / "run_true" / "model"), checkpoint_weights(tmp / "run_false" / "model")
    loss_diff = max(abs(x - y) for x, y in zip(la, lb))
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"pad_to_longest vs pad to {SEQ}: 2 steps, max |loss difference| {loss_diff:.3g}, weights {weight_diff:.3g}")
    assert loss_diff < 1e-6 and weight_diff < 1e-6, (la, lb, weight_diff)


# ----------------------------------------------------------------------------- overlap on DP=2 (gloo)


def _overlap_worker(tmp: str) -> dict:
    """DP=2: the same 3 steps without overlap and with both overlaps (distributed optimizer, small buckets,
    a checkpoint after every step), and without and with overlapped all-reduce (plain optimizer)."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    cfg = _cfg([])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    if pstate.rank == 0:
        write_pair_stage(tmp / "gen", random_pair_records(12))
    torch.distributed.barrier()
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref")
    runs = {
        "off": [],
        "both": ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                 "parallel.ddp_bucket_size=10000", "train.save_interval=1"],
        "off_plain": ["parallel.distributed_optimizer=false"],
        "grad_plain": ["parallel.overlap_grad_reduce=true", "parallel.distributed_optimizer=false",
                       "parallel.ddp_bucket_size=10000"],
    }
    out = {}
    for name, extra in runs.items():
        c = _cfg(["train.max_steps=3"] + extra)
        ddp = setup_model(c, pstate, str(tmp / "init"))
        out[name] = {"grad_sync_func": ddp.config.grad_sync_func is not None,
                     "forward_hook": bool(getattr(ddp, "use_forward_hook", False)),
                     "buckets": len(ddp.bucket_groups)}
        del ddp
        train(c, pstate, [tmp / "ref"], str(tmp / "init"), tmp / f"run_{name}")
    return out


def test_overlapped_grad_reduce_and_param_gather_match_no_overlap(tmp_path):
    from spin_mcore.launcher import run_local

    wiring = run_local(_overlap_worker, 2, str(tmp_path))[0]
    assert wiring["off"] == {"grad_sync_func": False, "forward_hook": False, "buckets": 1}
    assert wiring["both"]["grad_sync_func"] and wiring["both"]["forward_hook"] and wiring["both"]["buckets"] > 1
    assert wiring["grad_plain"]["grad_sync_func"] and not wiring["grad_plain"]["forward_hook"]
    off = checkpoint_weights(tmp_path / "run_off" / "model")
    init = checkpoint_weights(tmp_path / "init")
    assert max(float((off[k] - init[k]).abs().max()) for k in off) > 1e-4
    diffs = {}
    for name, base in (("both", "off"), ("grad_plain", "off_plain")):
        a = checkpoint_weights(tmp_path / f"run_{base}" / "model")
        b = checkpoint_weights(tmp_path / f"run_{name}" / "model")
        diffs[name] = max(float((a[k] - b[k]).abs().max()) for k in a)
    print("overlap vs no overlap, max |weight difference| after 3 steps:", diffs)
    # All-reduce per bucket: the same element-wise sums, bitwise. With the distributed optimizer, small
    # buckets shard the grads per bucket, so the grad norm's partial sums add up in another order
    # (with one bucket, ddp_bucket_size=1e9, "both" is bitwise too).
    assert diffs["grad_plain"] == 0.0 and diffs["both"] < 1e-7, diffs
