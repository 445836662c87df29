"""Virtual pipeline stages (parallel.vp): Megatron's interleaved 1F1B schedule on gloo.

Independent reference: the same run in one process (PP=1). A 4-layer tiny model at
PP=2 x VP=2 puts layers {0}, {2} on rank 0 and {1}, {3} on rank 1; the reference
pass, three optimizer steps (4 micro-batches each) and the final weights must agree
with the single-process run; a run resumed from its step-2 checkpoint must end where
the uninterrupted one did; the checkpoint must reshard PP2 x VP2 -> PP1 (and the PP1
init checkpoint -> PP2 x VP2); and a VP config must still load one-stage models for
inference (load_policy). The loop's resident theta_t is built in the VP layout: its HF export
must equal the PP=1 export bitwise, and training from it (no second load) must end with the
same weights as training that loads theta_t itself.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

SEQ = 24
STEPS = 3
BASE = ["model.preset=tiny", "model.num_layers=4", f"model.seq_length={SEQ}", "train.lr=[0.001]",
        "train.warmup_fraction=0.0", "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01",
        "spin.beta=[0.5]", "generation.shard_size=8", "train.micro_batch_size=1", "train.global_batch_size=4",
        f"train.max_steps={STEPS}"]
VP = ["parallel.pp=2", "parallel.vp=2"]


def _cfg(overrides):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _refs(stage: Path) -> torch.Tensor:
    from spin_mcore.utils.shards import read_stage

    return torch.tensor([[r["ref_logp_real"], r["ref_logp_generated"]] for r in read_stage(stage)], dtype=torch.float64)


def _single_worker(tmp: str) -> dict:
    """PP=1: the init checkpoint, the reference pass and the reference training run."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    cfg = _cfg([])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    write_pair_stage(tmp / "gen", random_pair_records(12))
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref")
    export_hf(model, pstate, tmp / "export_pp1", cfg.model)
    return train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_pp1")


def _vp_worker(tmp: str) -> dict:
    """PP=2 x VP=2 on 2 ranks: reference pass and the same training run, both from the PP=1 init checkpoint."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.chunks import ModelChunks
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    cfg = _cfg(VP)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = setup_model(cfg, pstate, str(tmp / "init"), wrap_ddp=False)
    assert isinstance(model, ModelChunks)
    layers = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in model.chunks]
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref_vp")
    del model
    summary = train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_vp")

    # The loop's resident theta_t: one load serves the export, a reference pass and the trainer.
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.training.resident import ResidentPolicy

    resident = ResidentPolicy(cfg, pstate, str(tmp / "init"))
    export_hf(resident.get(), pstate, tmp / "export_vp", cfg.model)
    compute_reference_logprobs(cfg, resident.get(), pstate, [tmp / "gen"], tmp / "ref_vp_resident")
    train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_vp_resident", load_model=resident.take)
    resident_loads = resident.loads

    # Resume: the same run with a checkpoint per step, cut back to its step-2 checkpoint.
    cfg_r = _cfg(VP + ["train.save_interval=1"])
    train(cfg_r, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_vp_resumed")
    if pstate.rank == 0:
        # No train_state is saved at the last step (the model save follows): without the model the
        # run resumes from the newest step checkpoint, step STEPS - 1.
        shutil.rmtree(tmp / "run_vp_resumed" / "model")
    torch.distributed.barrier()
    resumed = train(cfg_r, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_vp_resumed")

    # Inference ignores vp: one stage per rank, scored with the plain 1F1B schedule.
    from spin_mcore.loop import load_policy

    policy = load_policy(cfg, pstate, str(tmp / "run_vp" / "model"))
    compute_reference_logprobs(cfg, policy, pstate, [tmp / "gen"], tmp / "ref_vp_policy")
    return {"layers": layers, "summary": summary, "resumed_from": resumed["resumed_from"], "resident_loads": resident_loads,
            "policy": type(policy).__name__, "policy_layers": [x.layer_number for x in policy.decoder.layers]}


def _reshard_worker(tmp: str) -> float:
    """PP=1 loads the PP2 x VP2 model checkpoint: max |difference| to the PP=1 run's final weights.
    Also scores the pairs with the PP=1 final model (the reference for load_policy under a VP config)."""
    warnings.filterwarnings("ignore")
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model

    tmp = Path(tmp)
    cfg = _cfg([])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    vp = setup_model(cfg, pstate, str(tmp / "run_vp" / "model"), wrap_ddp=False)
    pp1 = setup_model(cfg, pstate, str(tmp / "run_pp1" / "model"), wrap_ddp=False)
    compute_reference_logprobs(cfg, pp1, pstate, [tmp / "gen"], tmp / "ref_pp1_final")
    return max(float((a - b).abs().max()) for a, b in zip(vp.parameters(), pp1.parameters()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("vp")
    single = run_local(_single_worker, 1, str(tmp))[0]
    vp = run_local(_vp_worker, 2, str(tmp))
    return tmp, single, vp


def test_chunks_hold_interleaved_layers(runs):
    _, _, vp = runs
    # global layer numbers (1-based): chunk i of rank r holds layer i * pp + r + 1
    assert vp[0]["layers"] == [[1], [3]] and vp[1]["layers"] == [[2], [4]]


def test_vp_reference_pass_matches_pp1(runs):
    tmp, _, _ = runs
    diff = float((_refs(tmp / "ref_vp") - _refs(tmp / "ref")).abs().max())
    assert diff < 1e-5, diff


def test_vp_training_matches_pp1(runs):
    tmp, single, vp = runs
    assert single["steps"] == vp[0]["summary"]["steps"] == STEPS
    la, lb = _losses(tmp / "run_pp1"), _losses(tmp / "run_vp")
    assert len(la) == STEPS and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5, (la, lb)
    a, b = checkpoint_weights(tmp / "run_pp1" / "model"), checkpoint_weights(tmp / "run_vp" / "model")
    init = checkpoint_weights(tmp / "init")
    assert a.keys() == b.keys() == init.keys()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # training moved the weights
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff


def test_vp_resume_ends_where_the_uninterrupted_run_did(runs):
    tmp, _, vp = runs
    assert vp[0]["resumed_from"].endswith("train_state/step_00000002")
    a, b = checkpoint_weights(tmp / "run_vp" / "model"), checkpoint_weights(tmp / "run_vp_resumed" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0  # bitwise on CPU fp32
    assert _losses(tmp / "run_vp") == _losses(tmp / "run_vp_resumed")


def test_vp_checkpoint_loads_at_pp1_and_inference_ignores_vp(runs):
    from spin_mcore.launcher import run_local

    tmp, _, vp = runs
    meta = json.loads((tmp / "run_vp" / "model" / "spin_mcore.json").read_text())
    assert meta["saved_parallel"] == {"tp": 1, "pp": 2, "vp": 2}
    assert run_local(_reshard_worker, 1, str(tmp))[0] < 1e-5
    # load_policy under the VP config: one GPTModel per rank, layers {1, 2} and {3, 4}
    assert [v["policy"] for v in vp] == ["SpinGPTModel", "SpinGPTModel"]  # Megatron GPTModel + sequence-major logits
    assert [v["policy_layers"] for v in vp] == [[1, 2], [3, 4]]
    diff = float((_refs(tmp / "ref_vp_policy") - _refs(tmp / "ref_pp1_final")).abs().max())
    assert diff < 1e-5, diff


def test_resident_model_exports_scores_and_trains_like_separate_loads(runs):
    from safetensors.torch import load_file

    def export(name: str) -> dict:
        return {k: v for f in sorted((tmp / name).glob("*.safetensors")) for k, v in load_file(f).items()}

    tmp, _, vp = runs
    assert [v["resident_loads"] for v in vp] == [1, 1]
    a, b = export("export_pp1"), export("export_vp")  # one file vs one per pipeline stage
    assert a.keys() == b.keys() and sum(".layers." in k for k in a) == 4 * 9  # 9 HF tensors per layer
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_refs(tmp / "ref_vp_resident"), _refs(tmp / "ref_vp"))
    x, y = checkpoint_weights(tmp / "run_vp" / "model"), checkpoint_weights(tmp / "run_vp_resident" / "model")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # bitwise on CPU fp32
    assert _losses(tmp / "run_vp") == _losses(tmp / "run_vp_resident")
