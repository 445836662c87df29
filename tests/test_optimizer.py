"""RMSProp/AdamW through Megatron's optimizer wrappers against plain torch optimizers.

Two spawned worlds (DP=2 then DP=1), each running several checks: updates and grad
clipping against ``torch.optim.RMSprop`` + ``clip_grad_norm_`` on an identical plain
copy of the model, and a ``dist_checkpointing`` round trip of ``square_avg`` and ``step``
(same DP size, and DP=2 -> DP=1) whose next step must equal the uninterrupted run.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from spin_mcore.config import Config
from spin_mcore.launcher import run_local

LR, ALPHA, EPS, CLIP = 1e-3, 0.9, 1e-6, 0.05  # CLIP well below the grad norm: clipping is active
ROWS, SEQ = 4, 12  # global batch: 4 sequences, split over DP


def _cfg(optimizer="rmsprop"):
    cfg = Config()
    cfg.model.seq_length = 32
    cfg.train.optimizer = optimizer
    cfg.train.rmsprop_alpha = ALPHA
    cfg.train.eps = EPS
    cfg.train.clip_grad = CLIP
    return cfg


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 500, (ROWS, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).expand(ROWS, SEQ)
    return ids[:, :-1].contiguous(), pos.contiguous(), ids[:, 1:].contiguous()


def _setup(cfg, use_dist_opt, seed=1234, params_dtype=torch.float32):
    """(ddp model, megatron optimizer, plain fp32 copy of the initial model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.optimizer import build_optimizer

    if params_dtype == torch.bfloat16:
        cfg.precision.recipe = "bf16"
    pstate = init_distributed(cfg.parallel, seed)
    gpt = build_gpt_model(cfg.model, pstate, cfg.precision)
    init_distributed(cfg.parallel, seed)  # re-seed: the plain copy gets the same initial weights
    plain = build_gpt_model(cfg.model, pstate, cfg.precision).float()
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=use_dist_opt, grad_reduce_in_fp32=True)
    ddp = DistributedDataParallel(config=gpt.config, ddp_config=ddp_cfg, module=gpt)
    opt = build_optimizer(cfg.train, [ddp], LR, use_dist_opt, params_dtype)
    return pstate, ddp, opt, plain


def _local_rows(pstate):
    ids, pos, labels = _batch()
    per = ROWS // pstate.dp
    sl = slice(pstate.dp_rank * per, (pstate.dp_rank + 1) * per)
    return ids[sl], pos[sl], labels[sl]


def _megatron_step(pstate, ddp, opt):
    ids, pos, labels = _local_rows(pstate)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(ids, pos, attention_mask=None, labels=labels).float().mean().backward()
    ddp.finish_grad_sync()  # DP all-reduce / reduce-scatter with 1/dp scaling: the global mean
    ok, gnorm, _ = opt.step()
    assert ok
    return float(gnorm)


def _plain_step(model, opt):
    ids, pos, labels = _batch()
    opt.zero_grad()
    model(ids, pos, attention_mask=None, labels=labels).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return float(norm)


def _absmax(t):
    return t.abs().max().item() if t.numel() else 0.0


def _max_weight_diff(ddp, plain):
    ref = dict(plain.named_parameters())
    return max((p.detach().float() - ref[n].detach()).abs().max().item() for n, p in ddp.module.named_parameters())


def _state_of(opt, model_param, key):
    """Return (this rank's slice of ``key`` state as flat fp32, slice into the full param)."""
    from spin_mcore.training.optimizer import SpinDistributedOptimizer

    if isinstance(opt, SpinDistributedOptimizer):
        if model_param not in opt.model_param_group_index_map:  # no shard of it on this rank
            return torch.zeros(0), slice(0, 0)
        rng = opt._get_model_param_range_map(model_param)["param"]
        return opt._get_main_param_and_optimizer_states(model_param)[key].view(-1), slice(rng.start, rng.end)
    main = model_param
    if hasattr(opt, "float16_groups"):
        for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for m, f in zip(mg, fg):
                if m is model_param:
                    main = f
    if key == "param":
        return main.detach().view(-1), slice(None)
    return opt.optimizer.state[main][key].view(-1), slice(None)


def _max_state_diff(opt, ddp, ref_opt, plain, key="square_avg"):
    ref_params = dict(plain.named_parameters())
    worst = 0.0
    for name, p in ddp.module.named_parameters():
        mine, sl = _state_of(opt, p, key)
        ref = ref_opt.state[ref_params[name]][key].view(-1)[sl]
        worst = max(worst, (mine - ref).abs().max().item() if mine.numel() else 0.0)
    return worst


def _steps_of(opt):
    return sorted({float(s["step"]) for s in opt.optimizer.state.values()})


def _save(ddp, opt, path):
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, path)


def _load(ddp, opt, path):
    from megatron.core import dist_checkpointing

    model_sd = ddp.module.sharded_state_dict()
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(state, path)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def _dp2_worker(ckpt_root):
    """DP=2: distributed and plain optimizer vs torch; save after 2 steps; resume at DP=2."""
    out = {}
    for use_dist in (True, False):
        cfg = _cfg()
        pstate, ddp, opt, plain = _setup(cfg, use_dist)
        ref_opt = torch.optim.RMSprop(plain.parameters(), lr=LR, alpha=ALPHA, eps=EPS)
        rec = {"gnorm": [], "ref_gnorm": [], "wdiff": [], "sqdiff": []}
        for step in range(3):
            rec["gnorm"].append(_megatron_step(pstate, ddp, opt))
            rec["ref_gnorm"].append(_plain_step(plain, ref_opt))
            rec["wdiff"].append(_max_weight_diff(ddp, plain))
            rec["sqdiff"].append(_max_state_diff(opt, ddp, ref_opt, plain))
            if step == 1:
                path = os.path.join(ckpt_root, f"dist{int(use_dist)}")
                _save(ddp, opt, path)
                saved_sq = {n: _state_of(opt, p, "square_avg")[0].clone() for n, p in ddp.module.named_parameters()}
        final = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        rec["steps"] = _steps_of(opt)

        # Resume into a differently initialised model and a fresh optimizer at the same DP size.
        pstate, ddp2, opt2, _ = _setup(cfg, use_dist, seed=99)
        _load(ddp2, opt2, path)
        rec["loaded_steps"] = _steps_of(opt2)
        rec["loaded_sqdiff"] = max(_absmax(_state_of(opt2, p, "square_avg")[0] - saved_sq[n])
                                   for n, p in ddp2.module.named_parameters())
        _megatron_step(pstate, ddp2, opt2)
        rec["resume_wdiff"] = max((p.detach() - final[n]).abs().max().item() for n, p in ddp2.module.named_parameters())
        rec["resumed_steps"] = _steps_of(opt2)
        out[use_dist] = rec
        out[f"final{int(use_dist)}"] = {n: t.numpy() for n, t in final.items()}  # numpy: pickled by value
    return out


def _dp1_worker(ckpt_root, final_dp2):
    """DP=1: FP32 wrapper, AdamW, bf16 main params, and loading the DP=2 checkpoint."""
    out = {}
    # Distributed optimizer at DP=1 vs torch, then a DP=2 -> DP=1 resume.
    cfg = _cfg()
    pstate, ddp, opt, plain = _setup(cfg, True)
    ref_opt = torch.optim.RMSprop(plain.parameters(), lr=LR, alpha=ALPHA, eps=EPS)
    diffs = []
    for _ in range(2):
        _megatron_step(pstate, ddp, opt)
        _plain_step(plain, ref_opt)
        diffs.append((_max_weight_diff(ddp, plain), _max_state_diff(opt, ddp, ref_opt, plain)))
    out["dist_dp1"] = diffs
    pstate, ddp2, opt2, _ = _setup(cfg, True, seed=99)
    _load(ddp2, opt2, os.path.join(ckpt_root, "dist1"))
    out["reshard_sqdiff"] = _max_state_diff(opt2, ddp2, ref_opt, plain)  # vs the DP=1 run after 2 steps
    out["reshard_steps"] = _steps_of(opt2)
    _megatron_step(pstate, ddp2, opt2)
    out["reshard_resume_wdiff"] = max((p.detach() - torch.from_numpy(final_dp2[n])).abs().max().item()
                                      for n, p in ddp2.module.named_parameters())

    # AdamW through the FP32 wrapper.
    cfg = _cfg("adam")
    pstate, ddp, opt, plain = _setup(cfg, False)
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    adam = []
    for _ in range(2):
        _megatron_step(pstate, ddp, opt)
        _plain_step(plain, ref_opt)
        adam.append((_max_weight_diff(ddp, plain), _max_state_diff(opt, ddp, ref_opt, plain, "exp_avg_sq")))
    out["adam"] = adam

    # bf16 params: fp32 main params updated by RMSprop on the (fp32-reduced) grads of the bf16 model.
    cfg = _cfg()
    pstate, ddp, opt, plain = _setup(cfg, False, params_dtype=torch.bfloat16)
    main0 = {n: _state_of(opt, p, "param")[0].clone() for n, p in ddp.module.named_parameters()}
    ids, pos, labels = _local_rows(pstate)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(ids, pos, attention_mask=None, labels=labels).float().mean().backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().float().clone() for n, p in ddp.module.named_parameters()}
    ok, gnorm, _ = opt.step()
    ref = [torch.nn.Parameter(main0[n].clone().view_as(p)) for n, p in ddp.module.named_parameters()]
    for r, n in zip(ref, grads):
        r.grad = grads[n].view_as(r).clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, CLIP)
    torch.optim.RMSprop(ref, lr=LR, alpha=ALPHA, eps=EPS).step()
    out["bf16"] = {
        "main_dtype": str(_state_of(opt, next(ddp.module.parameters()), "param")[0].dtype),
        "model_dtype": str(next(ddp.module.parameters()).dtype),
        "gnorm": (float(gnorm), float(ref_norm)),
        "main_diff": max((_state_of(opt, p, "param")[0] - r.detach().view(-1)).abs().max().item()
                         for r, p in zip(ref, ddp.module.parameters())),
        "model_vs_main": max((p.detach().float().view(-1) - _state_of(opt, p, "param")[0]).abs().max().item()
                             for p in ddp.module.parameters()),
    }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("optckpt"))
    dp2 = run_local(_dp2_worker, 2, root)
    dp1 = run_local(_dp1_worker, 1, root, dp2[0]["final1"])
    return dp2, dp1[0]


@pytest.mark.parametrize("use_dist", [True, False], ids=["distributed", "fp32-wrapper"])
def test_rmsprop_dp2_matches_torch(runs, use_dist):
    dp2, _ = runs
    for rank in (0, 1):
        rec = dp2[rank][use_dist]
        assert max(rec["wdiff"]) < 1e-6, rec["wdiff"]
        assert max(rec["sqdiff"]) < 1e-9, rec["sqdiff"]
        # grad clipping is active (norm above CLIP) and Megatron's norm equals torch's
        assert min(rec["ref_gnorm"]) > 5 * CLIP
        assert rec["gnorm"] == pytest.approx(rec["ref_gnorm"], rel=1e-5)
        assert rec["steps"] == [3.0]


@pytest.mark.parametrize("use_dist", [True, False], ids=["distributed", "fp32-wrapper"])
def test_square_avg_checkpoint_round_trip(runs, use_dist):
    dp2, _ = runs
    for rank in (0, 1):
        rec = dp2[rank][use_dist]
        assert rec["loaded_steps"] == [2.0]
        assert rec["loaded_sqdiff"] == 0.0
        assert rec["resume_wdiff"] == 0.0  # next step identical to the uninterrupted run
        assert rec["resumed_steps"] == [3.0]  # each param counts its own step after a load


def test_dp1_distributed_and_reshard_from_dp2(runs):
    _, dp1 = runs
    for wdiff, sqdiff in dp1["dist_dp1"]:
        assert wdiff < 1e-6 and sqdiff < 1e-9
    assert dp1["reshard_steps"] == [2.0]
    assert dp1["reshard_sqdiff"] < 1e-9
    assert dp1["reshard_resume_wdiff"] < 1e-6


def test_adamw_matches_torch(runs):
    _, dp1 = runs
    for wdiff, sqdiff in dp1["adam"]:
        assert wdiff < 1e-6 and sqdiff < 1e-9


def test_bf16_params_keep_fp32_main_params(runs):
    _, dp1 = runs
    b = dp1["bf16"]
    assert b["model_dtype"] == "torch.bfloat16" and b["main_dtype"] == "torch.float32"
    assert b["gnorm"][0] == pytest.approx(b["gnorm"][1], rel=1e-5)
    assert b["main_diff"] < 1e-7
    assert b["model_vs_main"] < 1e-2  # the bf16 model copy is the rounded fp32 main param


def test_rejects_mismatched_ddp_flag():
    from spin_mcore.training.optimizer import build_optimizer

    chunk = SimpleNamespace(ddp_config=SimpleNamespace(use_distributed_optimizer=False))
    with pytest.raises(ValueError, match="must agree"):
        build_optimizer(_cfg().train, [chunk], LR, True, torch.float32)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(_cfg("sgd").train, [chunk], LR, False, torch.float32)
    with pytest.raises(ValueError, match="fp16"):
        build_optimizer(_cfg().train, [chunk], LR, False, torch.float16)


@pytest.mark.parametrize("total,frac", [(100, 0.1), (37, 0.1), (10, 0.0)])
def test_lr_schedule_matches_hf_linear_warmup(total, frac):
    import math

    from transformers import get_linear_schedule_with_warmup

    from spin_mcore.training.schedule import build_lr_schedule

    peak = 5e-7
    params = [torch.nn.Parameter(torch.zeros(2))]
    hf_opt = torch.optim.SGD(params, lr=peak)
    hf = get_linear_schedule_with_warmup(hf_opt, math.ceil(frac * total), total)
    opt = torch.optim.RMSprop(params, lr=123.0)
    opt.param_groups[0]["lr_mult"] = 1.0
    sched = build_lr_schedule(opt, peak, total, frac)
    ours, theirs = [], []
    for _ in range(total + 2):
        ours.append(opt.param_groups[0]["lr"])
        theirs.append(hf_opt.param_groups[0]["lr"])
        hf_opt.step()
        hf.step()
        sched.step()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-20)


def test_lr_schedule_values_and_checkpoint():
    from spin_mcore.training.schedule import build_lr_schedule

    opt = SimpleNamespace(param_groups=[{"lr_mult": 1.0}, {"lr_mult": 0.5}])
    sched = build_lr_schedule(opt, 1e-6, 100, 0.1)  # warmup 10 steps, decay over 90
    assert sched.get_lr(0) == 0.0
    assert sched.get_lr(5) == pytest.approx(0.5e-6)
    assert sched.get_lr(10) == pytest.approx(1e-6)  # warmup end: peak
    assert sched.get_lr(55) == pytest.approx(0.5e-6)  # middle of the decay
    assert sched.get_lr(100) == 0.0 and sched.get_lr(150) == 0.0  # end
    sched.step(55)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-6) and opt.param_groups[1]["lr"] == pytest.approx(0.25e-6)
    state = sched.state_dict()
    fresh = build_lr_schedule(opt, 1e-6, 100, 0.1)
    assert opt.param_groups[0]["lr"] == 0.0
    fresh.load_state_dict(state)
    assert fresh.num_steps == 55 and opt.param_groups[0]["lr"] == pytest.approx(0.5e-6)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_schedule(opt, 1e-6, 200, 0.1).load_state_dict(state)


# ----------------------------------------------------------------------------- FP8 recipe (issue 20, 4d)

@pytest.mark.parametrize("scaling,expected", [("current", "tensorwise"), ("delayed", "delayed"),
                                              ("blockwise", "blockwise"), ("mxfp8", "mxfp8")])
def test_optimizer_config_carries_the_models_fp8_recipe(scaling, expected):
    """Megatron's distributed optimizer views FP8 params flat only for fp8_recipe='delayed'; unset, a
    delayed-scaling model's params were handled as non-delayed."""
    import warnings

    from spin_mcore.config import PrecisionConfig, TrainConfig
    from spin_mcore.models.fp8 import fp8_transformer_kwargs
    from spin_mcore.training.optimizer import build_optimizer_config

    precision = PrecisionConfig(recipe="fp8", fp8_scaling=scaling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron's mxfp8 memory advice
        cfg = build_optimizer_config(TrainConfig(), 1e-3, True, torch.bfloat16, precision=precision)
    assert cfg.fp8_recipe == expected
    assert fp8_transformer_kwargs(precision)["fp8_recipe"] == expected  # the TransformerConfig's value


@pytest.mark.parametrize("recipe", ["auto", "fp32", "bf16", None])
def test_optimizer_config_without_fp8_has_no_recipe(recipe):
    from spin_mcore.config import PrecisionConfig, TrainConfig
    from spin_mcore.training.optimizer import build_optimizer_config

    precision = None if recipe is None else PrecisionConfig(recipe=recipe, fp8_scaling="delayed")
    assert build_optimizer_config(TrainConfig(), 1e-3, True, torch.bfloat16, precision=precision).fp8_recipe is None


def test_fp8_model_needs_the_precision_config():
    from spin_mcore.config import PrecisionConfig
    from spin_mcore.training.optimizer import build_optimizer

    chunk = SimpleNamespace(ddp_config=SimpleNamespace(use_distributed_optimizer=True, overlap_param_gather=False),
                            config=SimpleNamespace(fp8="hybrid", fp8_recipe="delayed"))
    with pytest.raises(ValueError, match=r"fp8_recipe='delayed' but the optimizer got fp8_recipe=None; pass precision"):
        build_optimizer(_cfg().train, [chunk], LR, True, torch.bfloat16)
    with pytest.raises(ValueError, match=r"got fp8_recipe='tensorwise'"):
        build_optimizer(_cfg().train, [chunk], LR, True, torch.bfloat16, precision=PrecisionConfig(recipe="fp8"))
