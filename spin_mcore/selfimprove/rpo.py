"""Iterative Reasoning Preference Optimization (Pang et al. 2024, arXiv:2404.19733).

    run_rpo(cfg, pstate)       every iteration (spin_mcore.selfimprove.common.run_verified_loop)
    rpo_iteration(...)         one iteration, in the order below

Iteration t:
    sample        K = selfimprove.num_samples samples per training prompt from theta_t, verified
    build_pairs   per prompt: chosen = the first correct sample (the reference answer y when none
                  is correct), rejected = the first incorrect one; prompts with no incorrect sample
                  give no pair
    reference     theta_t's log p(chosen|x), log p(rejected|x) by the SPIN reference pass (chosen
                  in ``real_ids``, rejected in ``generated_ids``): theta_t is the reference
    train         the SPIN/DPO logistic loss plus ``spin.sft_weight`` x NLL of the chosen, from theta_t

At step 0 the policy equals theta_t, so the loss is ln 2 + sft_weight * (summed NLL of the chosen
responses / their token count), over the global batch (spin_mcore/training/step.py).

Where this departs from the paper: the paper pairs several (chosen, rejected) per prompt and
generates chain-of-thought with a few-shot prompt; here one pair per prompt. Falling back to the
reference answer when no sample is correct follows the issue's spec, not the paper (which drops
such prompts). ``spin.loss`` must be logistic and ``spin.sft_weight`` > 0 (the RPO objective).
"""

from __future__ import annotations

import copy

from spin_mcore.config import ConfigError
from spin_mcore.selfimprove.common import collapse_watch, run_verified_loop, sample_and_verify, train_or_keep


def build_pairs(verified: list[dict]) -> list[dict]:
    """One (chosen, rejected) record per prompt with an incorrect sample: ``real_ids`` = chosen,
    ``generated_ids`` = rejected, ``chosen_source`` = ``sample`` or ``reference``."""
    by_prompt: dict = {}
    for r in sorted(verified, key=lambda r: (str(r["prompt_id"]), r.get("sample_index", 0))):
        by_prompt.setdefault(str(r["prompt_id"]), []).append(r)
    pairs = []
    for pid, rs in by_prompt.items():
        wrong = [r for r in rs if not r["correct"]]
        if not wrong:
            continue
        right = [r for r in rs if r["correct"]]
        chosen, source = (right[0]["generated_ids"], "sample") if right else (rs[0]["real_ids"], "reference")
        pairs.append({"prompt_id": pid, "sample_index": 0, "prompt_ids": rs[0]["prompt_ids"], "real_ids": chosen,
                      "generated_ids": wrong[0]["generated_ids"], "chosen_source": source})
    return pairs


def rpo_config(cfg):
    """``cfg`` checked for the RPO objective (logistic loss, NLL term on), with train.objective=spin."""
    if cfg.spin.loss != "logistic":
        raise ConfigError(f"spin.loss={cfg.spin.loss!r}: Iterative RPO uses the logistic (DPO) loss")
    if not cfg.spin.sft_weight > 0:
        raise ConfigError(f"spin.sft_weight={cfg.spin.sft_weight}: Iterative RPO needs the NLL term on the chosen "
                          "response (the paper uses 1.0)")
    out = copy.deepcopy(cfg)
    out.train.objective = "spin"
    return out


def rpo_iteration(cfg, pstate, run, t: int, theta: str, theta0: str, data, log) -> tuple[str, dict]:
    """Sample, pair, score under theta_t, train from theta_t; returns (theta_{t+1}, row)."""
    import gc

    from spin_mcore.loop import load_policy
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.utils.shards import ShardedStage, fingerprint, read_stage

    si, cfg = cfg.selfimprove, rpo_config(cfg)
    model = load_policy(cfg, pstate, theta) if cfg.generation.backend == "megatron" else None  # see star.py
    verified = sample_and_verify(cfg, pstate, run, t, theta, data.train, data, "train", si.num_samples, model=model)
    stats = collapse_watch(verified, si.num_samples, si.min_distinct_2, log)
    pairs = build_pairs(verified)
    pair_dir, ref_dir = run.iteration(t) / "pairs", run.iteration(t) / "pairs_reference"
    row = {**stats, "pairs": len(pairs), "pairs_from_reference": sum(p["chosen_source"] == "reference" for p in pairs)}
    log(f"iter {t}: {len(pairs)} pairs ({row['pairs_from_reference']} with the reference answer as chosen)")
    if len(pairs) * cfg.train.epochs < cfg.train.global_batch_size:
        del model
        log(f"iter {t}: {len(pairs)} pairs make no global batch of {cfg.train.global_batch_size}: "
            f"theta_{t + 1} = theta_{t}")
        return theta, {**row, "train_steps": None}
    if pstate.rank == 0:
        stage = ShardedStage(pair_dir, "rpo_pairs", fingerprint([p["prompt_id"] for p in pairs]))
        if not stage.complete:
            stage.write_shard(0, pairs)
            stage.finalize({"pairs": len(pairs)})
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    model = model if model is not None else load_policy(cfg, pstate, theta)
    compute_reference_logprobs(cfg, model, pstate, [pair_dir], ref_dir, model_id=str(theta))
    del model
    gc.collect()
    theta_next, steps = train_or_keep(cfg, pstate, list(read_stage(ref_dir)), theta, theta, run.train(t), t, log)
    return theta_next, {**row, "train_steps": steps}


def run_rpo(cfg, pstate, force: bool = False, data=None) -> list[dict]:
    """All Iterative RPO iterations of ``cfg`` in ``cfg.run.dir``; collective. Rows: theta_0, then one per iteration."""
    rpo_config(cfg)  # refuse a non-RPO objective before any work
    return run_verified_loop(cfg, pstate, "Iterative RPO", rpo_iteration, force, data)
