"""The SPIN training loop: batching, reference pass, train_step, guards, parity, resume after kill.

Independent references: a plain-torch forward + fp64 log_softmax for log-probs, a
hand-written SPIN/SFT loss + torch.optim.RMSprop step for one optimizer step, a
single-process (TP=1) run for TP=2 x PP=2, and an uninterrupted run for resume.
Multi-process work is batched into few spawns (each costs ~5 s here).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

from spin_mcore.training.batches import Example, collate, make_plan
from spin_mcore.training.metrics import MetricsLogger
from spin_mcore.training.train_checkpoint import latest_checkpoint

SEQ = 24
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]", "generation.shard_size=8"]


# ----------------------------------------------------------------------------- unit tests (no processes)


def test_collate_stacks_real_then_generated_with_shifted_labels():
    ex = [Example([5, 6, 7], [8, 9], [10], 1.0, 2.0), Example([3], [4, 4, 4], [11, 12], -1.0, -2.0)]
    b = collate(ex, seq_len=6, objective="spin", pad_id=0)
    # rows: real0, real1, gen0, gen1; full = prompt + response, tokens = full[:-1], labels = full[1:]
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 0, 0], [3, 4, 4, 0, 0, 0], [5, 6, 7, 0, 0, 0], [3, 11, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8, 9, 0, 0], [4, 4, 4, 0, 0, 0], [6, 7, 10, 0, 0, 0], [11, 12, 0, 0, 0, 0]]
    # loss only where the label is a response token
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert b["token_counts"].tolist() == [2, 3, 1, 2]
    assert b["num_tokens"] == 4 + 3 + 3 + 2
    assert b["ref_real"].tolist() == [1.0, -1.0] and b["ref_gen"].tolist() == [2.0, -2.0]
    assert b["valid"].tolist() == [True, True]
    # too long: right-truncated to S + 1 tokens and counted; an empty response is an invalid pair
    t = collate([Example([1, 2, 3, 4, 5], [6, 7, 8, 9], [], 0.0, 0.0)], seq_len=6, objective="spin")
    assert t["tokens"][0].tolist() == [1, 2, 3, 4, 5, 6] and t["labels"][0].tolist() == [2, 3, 4, 5, 6, 7]
    assert t["truncated"] == 1 and t["valid"].tolist() == [False]
    sft = collate(ex, seq_len=6, objective="sft")
    assert sft["tokens"].shape == (2, 6) and "ref_real" not in sft and sft["valid"].tolist() == [True, True]


def test_plan_splits_each_step_over_dp_and_microbatches():
    plan, total = make_plan(n_items=10, epochs=2, seed=3, global_batch=4, micro_batch=1, dp=2)
    assert total == 5 and plan.num_microbatches == 2  # 20 samples // 4, last partial batch dropped
    assert sorted(plan.order[:10].tolist()) == list(range(10)) and sorted(plan.order[10:].tolist()) == list(range(10))
    for step in range(total):
        parts = [torch.cat(plan.rank_microbatches(step, r)).tolist() for r in range(2)]
        assert parts[0] + parts[1] == plan.step_indices(step).tolist()
    plan2, total2 = make_plan(n_items=10, epochs=2, seed=3, global_batch=4, micro_batch=1, dp=2, max_steps=7)
    assert total2 == 7 and plan2.order[:20].tolist() == plan.order.tolist()  # more epochs, same prefix
    with pytest.raises(ValueError, match="not divisible"):
        make_plan(10, 1, 0, global_batch=4, micro_batch=3, dp=1)


def test_metrics_logger_appends_and_truncates_on_resume(tmp_path):
    with MetricsLogger(tmp_path, True, total_steps=4, progress=False) as log:
        for s in (1, 2, 3):
            log.log(s, {"loss": 0.5 * s, "lr": None})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[1]["loss"] == 1.0 and lines[0]["lr"] is None
    assert any((tmp_path / "tensorboard").iterdir())
    with MetricsLogger(tmp_path, True, total_steps=4, start_step=2, progress=False) as log:  # resumed after step 2
        log.log(3, {"loss": 9.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[2]["loss"] == 9.0


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for name in ("step_00000002", "step_00000004", "step_00000006.tmp", "step_00000008"):
        (tmp_path / name).mkdir()
    for name in ("step_00000002", "step_00000004"):
        (tmp_path / name / "done.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert latest_checkpoint(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- helpers for the workers


def _cfg(overrides):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _fp64_logps(model, rows: list[tuple[list, list]], vocab: int) -> list[float]:
    """Independent log p(response | prompt): one unpadded row at a time, fp64 log_softmax over the true vocab."""
    out = []
    for prompt, resp in rows:
        full = torch.tensor(prompt + resp)
        n = len(full) - 1
        logits = model(full[None, :-1], torch.arange(n)[None], attention_mask=None)[0, :, :vocab].double()
        lp = torch.log_softmax(logits, -1).gather(-1, full[1:, None])[:, 0]
        out.append(float(lp[len(prompt) - 1:].sum()))
    return out



# ----------------------------------------------------------------------------- single-process worker


def _single_worker(tmp: str) -> dict:
    """TP=1: reference pass, step-0 golden values, exact one-step update, accumulation invariance, SFT, guard."""
    warnings.filterwarnings("ignore")
    import torch.nn.functional as F

    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.batches import collate as collate_fn
    from spin_mcore.training.batches import load_examples
    from spin_mcore.training.reference import compute_reference_logprobs, loss_spec
    from spin_mcore.training.step import score_microbatches
    from spin_mcore.training.trainer import TooManySkippedSteps, setup_model, train
    from spin_mcore.utils.shards import read_stage

    tmp = Path(tmp)
    res: dict = {}
    cfg = _cfg(["train.micro_batch_size=2", "train.global_batch_size=4"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    records = random_pair_records(12)
    write_pair_stage(tmp / "gen", records)
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref")
    scored = list(read_stage(tmp / "ref"))
    res["ref_ids"] = [r["prompt_id"] for r in scored]
    stored = torch.tensor([[r["ref_logp_real"], r["ref_logp_generated"]] for r in scored], dtype=torch.float64)
    with torch.no_grad():
        real = _fp64_logps(model, [(r["prompt_ids"], r["real_ids"]) for r in records], cfg.model.vocab_size)
        gen = _fp64_logps(model, [(r["prompt_ids"], r["generated_ids"]) for r in records], cfg.model.vocab_size)
    res["ref_vs_fp64"] = float((stored - torch.tensor([real, gen], dtype=torch.float64).T).abs().max())

    # Step 0: the policy (same weights) in a different grouping reproduces the stored refs.
    examples = load_examples([tmp / "ref"], "spin", need_refs=True)
    order = [7, 2, 11, 0, 5, 9, 1, 3]
    micro = [collate_fn([examples[i] for i in order[k:k + 2]], SEQ, "spin") for k in range(0, 8, 2)]
    seq = torch.cat([torch.stack([s[:2], s[2:]], 1) for s in score_microbatches(model, micro, loss_spec(cfg, pstate), SEQ, 2)])
    res["step0_vs_ref"] = float((seq.double() - stored[order]).abs().max())

    # One optimizer step, global batch 4 as 4 micro-batches of 1 pair, vs. an independent implementation.
    out_a = tmp / "run_mb1"
    cfg_a = _cfg(["train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=1"])
    summary = train(cfg_a, pstate, [tmp / "ref"], str(tmp / "init"), out_a)
    first = json.loads((out_a / "metrics.jsonl").read_text().splitlines()[0])
    res["step0_loss"], res["step0_margin"], res["step0_lr"] = first["loss"], first["margin"], first["lr"]
    res["summary_a"] = summary

    from spin_mcore.training.batches import make_plan as plan_fn

    plan, _ = plan_fn(len(examples), cfg_a.train.epochs, cfg_a.train.seed, 4, 1, 1, 1)
    idx = plan.step_indices(0).tolist()
    ref_model = setup_model(cfg, pstate, str(tmp / "init"), wrap_ddp=False)
    exs = [examples[i] for i in idx]
    pr = torch.stack([_logp_rows(ref_model, e.prompt_ids, e.real_ids, cfg.model.vocab_size) for e in exs])
    pg = torch.stack([_logp_rows(ref_model, e.prompt_ids, e.generated_ids, cfg.model.vocab_size) for e in exs])
    rr = torch.tensor([e.ref_real for e in exs])
    rg = torch.tensor([e.ref_gen for e in exs])
    beta = 0.5
    loss = F.softplus(-beta * ((pr - rr) - (pg - rg))).mean()
    loss.backward()
    params = [p for p in ref_model.parameters()]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt = torch.optim.RMSprop(params, lr=first["lr"], alpha=cfg.train.rmsprop_alpha, eps=cfg.train.eps)
    opt.step()
    res["manual_loss"] = float(loss)
    save_model_checkpoint(ref_model, pstate, tmp / "manual", cfg.model)

    # Same step as one micro-batch of 4 pairs (8 rows): the global normalisation makes it identical.
    train(_cfg(["train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=1"]), pstate,
          [tmp / "ref"], str(tmp / "init"), tmp / "run_mb4")

    # SFT objective: loss = mean NLL per response token of the global batch.
    cfg_s = _cfg(["train.objective=sft", "train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=1"])
    train(cfg_s, pstate, [tmp / "gen"], str(tmp / "init"), tmp / "run_sft")
    res["sft_loss"] = json.loads((tmp / "run_sft" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    plan_s, _ = plan_fn(len(records), cfg_s.train.epochs, cfg_s.train.seed, 4, 1, 1, 1)
    rows = [(records[i]["prompt_ids"], records[i]["real_ids"]) for i in plan_s.step_indices(0).tolist()]
    init_model = setup_model(cfg, pstate, str(tmp / "init"), wrap_ddp=False)
    with torch.no_grad():
        lps = _fp64_logps(init_model, rows, cfg.model.vocab_size)
    res["sft_expected"] = -sum(lps) / sum(len(r) for _, r in rows)

    # Guard: a NaN reference poisons every step; the first skip is tolerated, the second stops the run.
    bad = [dict(r) for r in scored[:4]]
    bad[2]["ref_logp_real"] = float("nan")
    try:
        train(_cfg(["train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=3",
                    "train.max_skipped_steps=1"]), pstate, bad, str(tmp / "init"), tmp / "run_nan")
        res["guard"] = "no error"
    except TooManySkippedSteps as exc:
        res["guard"] = str(exc)
    res["guard_metrics"] = [json.loads(x) for x in (tmp / "run_nan" / "metrics.jsonl").read_text().splitlines()]
    return res


def _logp_rows(model, prompt, resp, vocab):
    """Differentiable fp32 log p(resp | prompt) for one unpadded row."""
    full = torch.tensor(prompt + resp)
    n = len(full) - 1
    logits = model(full[None, :-1], torch.arange(n)[None], attention_mask=None)[0, :, :vocab].float()
    lp = torch.log_softmax(logits, -1).gather(-1, full[1:, None])[:, 0]
    return lp[len(prompt) - 1:].sum()


def _parallel_worker(tmp: str) -> dict:
    """TP=2 x PP=2 (4 ranks): reference pass and one train step from the TP=1 init checkpoint."""
    warnings.filterwarnings("ignore")
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train
    from spin_mcore.utils.shards import read_stage

    tmp = Path(tmp)
    cfg = _cfg(["train.micro_batch_size=2", "train.global_batch_size=4", "parallel.tp=2", "parallel.pp=2"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = setup_model(cfg, pstate, str(tmp / "init"), wrap_ddp=False)
    compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref_tp2pp2")
    del model
    cfg1 = _cfg(["train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=1",
                 "parallel.tp=2", "parallel.pp=2"])
    train(cfg1, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run_tp2pp2")
    return {"refs": [[r["ref_logp_real"], r["ref_logp_generated"]] for r in read_stage(tmp / "ref_tp2pp2")]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("trainer")
    return tmp, run_local(_single_worker, 1, str(tmp))[0]


def test_reference_pass_matches_fp64_and_step0_policy(single):
    _, res = single
    assert res["ref_ids"] == list(range(12))
    assert res["ref_vs_fp64"] < 1e-4, res["ref_vs_fp64"]  # fp32 padded batched vs fp64 unpadded per row
    assert res["step0_vs_ref"] < 1e-5, res["step0_vs_ref"]  # same code path, different micro-batch grouping


def test_step0_loss_is_ln2_and_margins_zero(single):
    _, res = single
    assert abs(res["step0_loss"] - math.log(2)) < 1e-6
    assert abs(res["step0_margin"]) < 1e-6
    assert abs(res["manual_loss"] - math.log(2)) < 1e-6


def test_one_step_matches_independent_rmsprop_and_accumulation(single):
    tmp, res = single
    ours, manual, mb4, init = (checkpoint_weights(tmp / d / "model") if d.startswith("run") else checkpoint_weights(tmp / d)
                               for d in ("run_mb1", "manual", "run_mb4", "init"))
    assert ours.keys() == manual.keys()
    moved = max(float((ours[k] - init[k]).abs().max()) for k in ours)
    assert moved > 1e-4  # the step did something (lr 1e-3, RMSprop)
    diff = max(float((ours[k] - manual[k]).abs().max()) for k in ours)
    assert diff < 1e-6, diff
    acc = max(float((ours[k] - mb4[k]).abs().max()) for k in ours)
    assert acc < 1e-6, acc


def test_sft_objective_loss(single):
    _, res = single
    assert abs(res["sft_loss"] - res["sft_expected"]) < 1e-5, (res["sft_loss"], res["sft_expected"])


def test_non_finite_steps_are_skipped_then_stop(single):
    _, res = single
    assert "2 steps skipped" in res["guard"] and "train.max_skipped_steps=1" in res["guard"]
    logged = res["guard_metrics"]
    assert logged[0]["step"] == 1 and logged[0]["skipped_steps"] == 1 and not math.isfinite(logged[0]["loss"])


def test_tp2_pp2_matches_tp1(single):
    from spin_mcore.launcher import run_local

    tmp, _ = single
    par = run_local(_parallel_worker, 4, str(tmp))[0]
    ref1 = checkpoint_weights(tmp / "run_mb1" / "model")
    ref4 = checkpoint_weights(tmp / "run_tp2pp2" / "model")
    assert ref1.keys() == ref4.keys()
    diff = max(float((ref1[k] - ref4[k]).abs().max()) for k in ref1)
    assert diff < 1e-5, diff
    from spin_mcore.utils.shards import read_stage

    tp1 = torch.tensor([[r["ref_logp_real"], r["ref_logp_generated"]] for r in read_stage(tmp / "ref")])
    assert float((torch.tensor(par["refs"]) - tp1).abs().max()) < 1e-4


# ----------------------------------------------------------------------------- resume after SIGKILL


def _cli(out: Path, data: Path, init: Path, steps: int) -> list[str]:
    # data.loader=dali: the resume restores each rank's DALI reader checkpoint (the torch loader's
    # resume, from the step alone, is in tests/test_dali_loader.py).
    return [sys.executable, "-m", "spin_mcore.cli", "train", *BASE, "run.nproc=2", "train.micro_batch_size=1",
            "train.global_batch_size=4", f"train.max_steps={steps}", "train.save_interval=4", "data.loader=dali",
            "--data", str(data), "--out", str(out), "--init", str(init)]


def test_killed_run_resumes_to_identicalcheckpoint_weights(single):
    tmp, _ = single
    steps = 12
    env = dict(os.environ, SPIN_MCORE_NO_PROGRESS="1")
    full = subprocess.run(_cli(tmp / "full", tmp / "ref", tmp / "init", steps), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp / "killed"
    proc = subprocess.Popen(_cli(killed, tmp / "ref", tmp / "init", steps), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed / "train_state") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned ranks
    proc.wait()
    at_kill = latest_checkpoint(killed / "train_state")
    assert at_kill is not None and not (killed / "model").exists(), "the run finished before it could be killed"
    # 12 pairs, 4 per step: a save after step 4 or 8 is mid-epoch, with the DALI reader state in it
    assert json.loads((at_kill / "done.json").read_text())["data_reader"] is True

    resumed = subprocess.run(_cli(killed, tmp / "ref", tmp / "init", steps), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] is not None
    assert "data loader: dali (data.loader=dali)" in resumed.stderr  # the progress bar's console line
    a, b = checkpoint_weights(tmp / "full" / "model"), checkpoint_weights(killed / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0  # bitwise on CPU fp32
    la = [json.loads(x) for x in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, steps + 1))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]



def _hf_flag_worker(tmp: str) -> float:
    """With run.init_from_hf, a spin_mcore checkpoint (a later iterate) still loads as one."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model

    cfg = _cfg([])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    saved = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(saved, pstate, Path(tmp) / "theta_1", cfg.model)
    cfg_hf = _cfg(["run.init_from_hf=true", "train.seed=7"])  # another seed: a fresh init differs
    loaded = setup_model(cfg_hf, pstate, str(Path(tmp) / "theta_1"), wrap_ddp=False)
    return max(float((a - b).abs().max()) for a, b in zip(saved.parameters(), loaded.parameters()))


def test_init_from_hf_run_still_loads_its_own_iterates(tmp_path):
    from spin_mcore.launcher import run_local

    assert run_local(_hf_flag_worker, 1, str(tmp_path))[0] == 0.0
