"""Model checkpoint metadata and completeness checks (in-process; the multi-rank save/load/reshard
round trips are in tests/test_hf_convert.py's 4-rank run)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from spin_mcore.config import ModelConfig
from spin_mcore.models.checkpoint import (
    FORMAT,
    CheckpointError,
    model_config_from_meta,
    read_checkpoint_meta,
    save_model_checkpoint,
)


def _fake_checkpoint(path, **meta):
    (path / "model").mkdir(parents=True)
    (path / "spin_mcore.json").write_text(json.dumps(meta))
    return path


def test_interrupted_save_is_not_a_checkpoint(tmp_path):
    # What a killed save leaves behind: weights in DIR.tmp-xxxx, no metadata, no DIR.
    (tmp_path / "ckpt.tmp-0badc0de" / "model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_meta(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a complete spin_mcore checkpoint"):
        read_checkpoint_meta(tmp_path / "ckpt.tmp-0badc0de")


def test_meta_round_trips_model_config(tmp_path):
    cfg = ModelConfig(num_layers=3, vocab_size=300, rope_theta=500000.0, family="mistral")
    ck = _fake_checkpoint(tmp_path / "ck", format=FORMAT, model=dataclasses.asdict(cfg), iteration=2)
    meta = read_checkpoint_meta(ck)
    assert model_config_from_meta(meta) == cfg and meta["iteration"] == 2


def test_wrong_format_and_unknown_fields(tmp_path):
    ck = _fake_checkpoint(tmp_path / "a", format="something/v0", model={})
    with pytest.raises(CheckpointError, match="format='something/v0'"):
        read_checkpoint_meta(ck)
    ck = _fake_checkpoint(tmp_path / "b", format=FORMAT, model={**dataclasses.asdict(ModelConfig()), "moe_experts": 8})
    with pytest.raises(CheckpointError, match="moe_experts"):
        model_config_from_meta(read_checkpoint_meta(ck))


def test_reserved_extra_keys_rejected_before_any_collective(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['model'\] are reserved"):
        save_model_checkpoint(None, None, tmp_path / "ck", ModelConfig(), extra={"model": 1, "iteration": 3})


def _save_then_load(saved_overrides, load_overrides, path):
    """Save a tiny model built with ``saved_overrides``, load it into one built with ``load_overrides``."""
    import torch

    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    base = ["model.preset=tiny", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64"]
    saved = load_config(overrides=base + saved_overrides)
    pstate = init_distributed(saved.parallel, seed=0)
    save_model_checkpoint(build_gpt_model(saved.model, pstate, saved.precision), pstate, path, saved.model)
    target = load_config(overrides=base + load_overrides)
    model = build_gpt_model(target.model, pstate, target.precision)
    try:
        load_model_checkpoint(model, pstate, path)
    except CheckpointError as exc:
        return str(exc)
    first = next(model.parameters())
    return float(first.detach().abs().sum()) if torch.isfinite(first).all() else None


LLAMA31 = ["model.rope_theta=500000", "model.rope_scaling=llama3", "model.rope_original_max_position_embeddings=16"]


@pytest.mark.parametrize("saved, loaded, error", [
    (LLAMA31, ["model.rope_theta=500000"], r"RoPE frequencies: the checkpoint was saved with rope_theta=500000.0, "
                                           r"rope_scaling=llama3 \(factor 8.0, low 1.0, high 4.0, original 16\)"),
    ([], LLAMA31, r"RoPE frequencies: the checkpoint was saved with rope_theta=10000.0, rope_scaling=None;"),
    ([], ["model.rope_theta=500000"], r"rope_theta=10000.0"),
    (["model.norm_eps=1e-6"], [], r"norm_eps: checkpoint 1e-06 vs model 1e-05"),
    (LLAMA31, LLAMA31, None),
])
def test_load_refuses_other_rope_or_norm_settings(tmp_path, saved, loaded, error):
    """A checkpoint's math-changing fields with no shape (RoPE, RMSNorm eps) must match the model it loads into."""
    from spin_mcore.launcher import run_local

    (out,) = run_local(_save_then_load, 1, saved, loaded, tmp_path / "ck")
    if error is None:
        assert isinstance(out, float) and out > 0
    else:
        assert isinstance(out, str) and "architecture mismatch" in out
        import re

        assert re.search(error, out), out


# ----------------------------------------------------------------------------- FP8 params and main params (issue 20, 4b/4c)
#
# No FP8 tensor exists on the CPU. The stand-in below is a bf16 Parameter that reports a CUDA type (the
# check Megatron's distributed optimizer makes) and carries TE's get/clear pair for the high-precision
# init value; Megatron's is_float8tensor is monkeypatched to recognise it. The real FP8 run is the
# GPU test in tests/test_gpu_build_path.py.


class _StandInFp8Param(torch.nn.Parameter):
    """A bf16 Parameter that Megatron's distributed optimizer takes for an FP8 param on a GPU."""

    def type(self, *args, **kwargs):
        return "torch.cuda.BFloat16Tensor" if not (args or kwargs) else super().type(*args, **kwargs)


def _te_like_init_value(param, value):
    """What TE's reset_parameters attaches: a stored init value and a get/clear pair reading it."""
    from types import MethodType

    param._high_precision_init_val = value
    param.get_high_precision_init_val = MethodType(lambda self: getattr(self, "_high_precision_init_val", None), param)
    param.clear_high_precision_init_val = MethodType(lambda self: self.__dict__.pop("_high_precision_init_val", None),
                                                     param)


def _megatron_main_param(param, monkeypatch, fp8_recipe="tensorwise", start=0, end=None):
    """The fp32 main-param shard [start, end) Megatron-Core 0.16.1's distributed optimizer builds for ``param``."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    monkeypatch.setattr(dopt, "is_float8tensor", lambda t: isinstance(t, _StandInFp8Param))
    rng = dopt.Range(start, param.numel() if end is None else end)
    gbuf_ranges = [{torch.bfloat16: [{"param_map": {param: {"param": rng}}}]}]
    groups = [{"params": [param], "orig_group": {"params": []}}]
    config = SimpleNamespace(fp8_recipe=fp8_recipe, use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
    out = dopt.DistributedOptimizer._build_model_and_main_param_groups(gbuf_ranges, {param: (0, torch.bfloat16, 0)},
                                                                       groups, config)
    shard_model, main = out[2][0][0], out[4][0][0]
    return shard_model, main


def _loaded_fp8_module():
    """(module with one stand-in FP8 weight whose TE init value is garbage, the 'loaded' weights)."""
    loaded = (torch.arange(12, dtype=torch.float32).view(3, 4) / 7).to(torch.bfloat16)
    param = _StandInFp8Param(loaded.clone())  # the model param: what load_state_dict copied in
    _te_like_init_value(param, torch.full((3, 4), float("nan"), dtype=torch.bfloat16))  # torch.empty at build
    module = torch.nn.Module()
    module.weight = param
    return module, loaded


@pytest.mark.parametrize("fp8_recipe", ["tensorwise", "delayed"])
def test_main_params_come_from_the_loaded_weights(monkeypatch, fp8_recipe):
    """After a load, Megatron's main-param source (the high-precision init value) is the loaded tensor."""
    from spin_mcore.models.fp8 import adopt_loaded_high_precision

    module, loaded = _loaded_fp8_module()
    assert adopt_loaded_high_precision(module, {"weight": loaded}) == 1
    shard_model, main = _megatron_main_param(module.weight, monkeypatch, fp8_recipe, start=2, end=9)
    assert main.dtype == torch.float32
    assert torch.equal(main, loaded.float().view(-1)[2:9])
    # Megatron cleared the value after use: no stale copy is kept, and later hasattr checks see none.
    assert not hasattr(module.weight, "get_high_precision_init_val")
    # fp8_recipe decides whether Megatron views the FP8 param flat (delayed only; 4d).
    assert (shard_model is not None) == (fp8_recipe == "delayed")


def test_without_the_fix_main_params_are_the_uninitialised_init_value(monkeypatch):
    module, _ = _loaded_fp8_module()
    _, main = _megatron_main_param(module.weight, monkeypatch)
    assert torch.isnan(main).all()  # what the first step would write over the loaded weights


def test_hf_load_drops_the_init_value_so_megatron_dequantises(monkeypatch):
    from spin_mcore.models.fp8 import drop_high_precision_init_vals

    module, loaded = _loaded_fp8_module()
    assert drop_high_precision_init_vals(module) == 1
    _, main = _megatron_main_param(module.weight, monkeypatch)
    assert torch.equal(main, loaded.float().view(-1))  # Megatron's fallback: model_param.float()


def test_weights_source_and_precision():
    from spin_mcore.models.checkpoint import MAIN_PARAMS, MODEL_PARAMS, weights_precision, weights_source

    opt = object()
    assert weights_source(True, opt) == MAIN_PARAMS == "optimizer_main_params"
    assert weights_source(True, None) == MODEL_PARAMS == "model_params"  # no optimizer: FP8 values as they are
    assert weights_source(False, opt) == MODEL_PARAMS
    assert weights_precision(MAIN_PARAMS, True, torch.bfloat16) == "bfloat16"
    assert weights_precision(MODEL_PARAMS, True, torch.bfloat16) == "fp8"
    assert weights_precision(MODEL_PARAMS, False, torch.float32) == "float32"


def test_main_param_weights_rebuilds_each_param_from_its_shard():
    """One DP rank: the slice it owns from its fp32 shard, zeros elsewhere (the other ranks' slices,
    summed in by the all-reduce), cast to bf16. A param with no shard on this rank is all zeros."""
    from megatron.core.optimizer.distrib_optimizer import Range

    from spin_mcore.training.optimizer import main_param_weights

    a = torch.nn.Parameter(torch.zeros(2, 4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    main_a = torch.tensor([1.0 + 2 ** -12, 2.5, -3.0], dtype=torch.float32)  # elements 3..5 of a
    ranges = {id(a): {"param": Range(3, 6)}}
    opt = SimpleNamespace(model_float16_groups=[[a]], shard_fp32_from_float16_groups=[[main_a]],
                          data_parallel_group=None, _get_model_param_range_map=lambda p: ranges[id(p)])
    out = main_param_weights(opt, [a, b])
    expect = torch.zeros(8)
    expect[3:6] = main_a
    assert out[id(a)].dtype == torch.bfloat16 and out[id(a)].shape == (2, 4)
    assert torch.equal(out[id(a)], expect.to(torch.bfloat16).view(2, 4))
    assert torch.equal(out[id(b)], torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="parallel.distributed_optimizer=true"):
        main_param_weights(SimpleNamespace(), [a])


FC2 = "decoder.layers.0.mlp.linear_fc2.weight"


def _save_from_main_params(path) -> dict:
    """A bf16 model + distributed optimizer (DP=1) whose fc2 weight is taken for an FP8 param; its main
    param moved off the model value. Saves with and without the optimizer and reads both back."""
    import json

    from megatron.core.distributed import DistributedDataParallel

    from spin_mcore.config import load_config
    from spin_mcore.models import fp8
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.optimizer import build_ddp_config, build_optimizer

    cfg = load_config(overrides=["model.preset=tiny", "model.num_layers=1", "model.hidden_size=32",
                                 "model.ffn_hidden_size=64", "precision.recipe=bf16"])
    pstate = init_distributed(cfg.parallel, seed=0)
    gpt = build_gpt_model(cfg.model, pstate, cfg.precision)
    ddp = DistributedDataParallel(gpt.config, build_ddp_config(cfg.parallel), gpt)
    opt = build_optimizer(cfg.train, [ddp], 1e-3, True, torch.bfloat16, precision=cfg.precision)
    weight = dict(gpt.named_parameters())[FC2]
    fp8.is_fp8_param = lambda p: p is weight  # the stand-in: this one param is "FP8"
    # The main param holds what an FP8 param cannot: an update far below its spacing.
    mains = [s for g in opt.shard_fp32_from_float16_groups for s in g]
    owners = [p for g in opt.model_float16_groups for p in g]
    main = mains[[id(p) for p in owners].index(id(weight))]
    with torch.no_grad():
        main.add_(0.25)
    expected = torch.zeros(weight.numel())
    rng = opt._get_model_param_range_map(weight)["param"]
    expected[rng.start:rng.end] = main
    from spin_mcore.models.checkpoint import save_model_checkpoint

    out = {}
    for name, optimizer in (("main", opt), ("model", None)):
        save_model_checkpoint(ddp, pstate, path / name, cfg.model, optimizer=optimizer)
        fresh = build_gpt_model(cfg.model, pstate, cfg.precision, perform_initialization=False)
        target = dict(fresh.named_parameters())[FC2]
        _te_like_init_value(target, torch.full_like(target, float("nan")))  # TE's copy of torch.empty
        load_model_checkpoint(fresh, pstate, path / name)
        saved = target.detach()
        meta = json.loads((path / name / "spin_mcore.json").read_text())
        out[name] = {"equals_main": torch.equal(saved, expected.to(torch.bfloat16).view_as(saved)),
                     "equals_model": torch.equal(saved, weight.detach()),
                     "init_value_is_loaded": torch.equal(target.get_high_precision_init_val(), saved),
                     "source": meta["weights_source"], "precision": meta["weights_precision"]}
    return out


def test_saved_iterate_takes_fp8_params_from_the_optimizers_main_params(tmp_path):
    """The real save/load path (Megatron's sharded state dict, distributed optimizer, dist_checkpointing)
    with one param standing in for FP8: saved from the main params with the optimizer, from the model
    without; and the load points the param's high-precision init value at the loaded values."""
    from spin_mcore.launcher import run_local

    (out,) = run_local(_save_from_main_params, 1, tmp_path)
    assert out["main"] == {"equals_main": True, "equals_model": False, "init_value_is_loaded": True,
                           "source": "optimizer_main_params", "precision": "bfloat16"}
    assert out["model"] == {"equals_main": False, "equals_model": True, "init_value_is_loaded": True,
                            "source": "model_params", "precision": "fp8"}


def _tiny_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}


def _save_at_dp2(path) -> dict:
    """Rank worker (2 ranks, TP1 PP1: DP 2): a seeded tiny model saved with the fully-parallel strategy;
    rank 0 returns its weights and each rank the files it wrote."""
    import torch.distributed as dist

    from spin_mcore.config import load_config
    from spin_mcore.models import checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from tests.helpers import tiny_model_overrides

    cfg = load_config(overrides=tiny_model_overrides())
    pstate = init_distributed(cfg.parallel, seed=0)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    strategy = checkpoint.save_strategy()
    checkpoint.save_model_checkpoint(model, pstate, path, cfg.model)
    written = sorted(f.name for f in (path / "model").glob(f"__{dist.get_rank()}_*.distcp") if f.stat().st_size > 0)
    return {"weights": _tiny_weights(model) if pstate.rank == 0 else None, "written": written,
            "strategy": type(strategy).__name__, "dp": pstate.dp}


def _load_at_dp1(path) -> dict:
    """Rank worker (1 rank): a differently seeded tiny model loaded from ``path``."""
    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from tests.helpers import tiny_model_overrides

    cfg = load_config(overrides=tiny_model_overrides())
    pstate = init_distributed(cfg.parallel, seed=5)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    before = _tiny_weights(model)
    load_model_checkpoint(model, pstate, path)
    return {"before": before, "after": _tiny_weights(model)}


def test_dp2_fully_parallel_save_loads_back_bitwise_at_dp1(tmp_path):
    """The model-only save at DP 2 goes through Megatron's FullyParallelSaveStrategyWrapper: both replicas
    write a share of the weights (a default save has replica 0 write them all), and a DP-1 load of it gives
    the saved tensors bit for bit."""
    from spin_mcore.launcher import run_local

    saved = run_local(_save_at_dp2, 2, tmp_path / "ck")
    assert [s["dp"] for s in saved] == [2, 2]
    assert {s["strategy"] for s in saved} == {"FullyParallelSaveStrategyWrapper"}
    assert all(s["written"] for s in saved), saved  # rank 1 wrote weights too
    (loaded,) = run_local(_load_at_dp1, 1, tmp_path / "ck")
    weights = saved[0]["weights"]
    assert sorted(loaded["after"]) == sorted(weights)
    assert any(not torch.equal(loaded["before"][k], weights[k]) for k in weights)  # the load changed something
    for k, v in weights.items():
        assert loaded["after"][k].dtype == v.dtype and torch.equal(loaded["after"][k], v), k


def _save_after_prestart(path) -> dict:
    """Rank worker (1 rank): the save-queue head start, then a save and a load into a differently seeded model."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from spin_mcore.config import load_config
    from spin_mcore.models import checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from tests.helpers import tiny_model_overrides

    cfg = load_config(overrides=tiny_model_overrides())
    pstate = init_distributed(cfg.parallel, seed=0)
    checkpoint.prestart_save_queue()
    started = checkpoint._queue_starter is not None
    checkpoint.await_save_queue()
    queue = fa._results_queue
    empty_after_warm_up = queue is not None and queue.empty()
    checkpoint.prestart_save_queue()  # a second call starts nothing
    # SLURM's stop signals reach every process of the step, the Manager included: it must stay up for the
    # trainer's save after them
    import os
    import signal
    import time

    manager_pid = checkpoint._queue_manager._process.pid
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        os.kill(manager_pid, sig)
    time.sleep(0.5)
    alive_after_signals = checkpoint._queue_manager._process.is_alive()
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    checkpoint.save_model_checkpoint(model, pstate, path, cfg.model)
    other = build_gpt_model(cfg.model, init_distributed(cfg.parallel, seed=7), cfg.precision)
    checkpoint.load_model_checkpoint(other, pstate, path)
    a, b = _tiny_weights(model), _tiny_weights(other)
    return {"started": started, "empty": empty_after_warm_up, "same_queue": fa._results_queue is queue,
            "alive_after_signals": alive_after_signals,
            "max_diff": max(float((a[k] - b[k]).abs().max()) for k in a), "keys": sorted(a) == sorted(b)}


def test_save_queue_head_start_leaves_an_empty_queue_and_saves_load_bitwise(tmp_path):
    """prestart_save_queue starts Megatron's write-results queue (and the torch import of its Manager) in a
    thread; the item it passes through is taken back out, so the first save's results are read correctly."""
    from spin_mcore.launcher import run_local

    (out,) = run_local(_save_after_prestart, 1, tmp_path / "ck")
    assert out["started"] and out["empty"] and out["same_queue"] and out["keys"]
    assert out["alive_after_signals"]  # SIGUSR1 and SIGTERM ignored; the save after them worked
    assert out["max_diff"] == 0.0


ORPHAN_CHILD = """
import os, signal, sys
from spin_mcore.models import checkpoint
checkpoint.prestart_save_queue()
checkpoint.await_save_queue()
print(checkpoint._queue_manager._process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_save_queue_manager_ends_when_its_process_is_killed():
    """A SIGKILLed trainer leaves no Manager behind (it ignores SIGTERM, so nothing else would end it)."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.run([sys.executable, "-c", ORPHAN_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    def gone() -> bool:  # exited: no such process, or a zombie nobody has reaped yet
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    while time.monotonic() < deadline:
        if gone():
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        raise AssertionError(f"the Manager process {pid} outlived its killed parent by 10 s")
