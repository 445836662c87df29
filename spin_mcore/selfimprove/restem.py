"""ReST^EM (Singh et al. 2023, arXiv:2312.06585): expectation-maximisation with a binary verifier reward.

    run_restem(cfg, pstate)      every iteration (spin_mcore.selfimprove.common.run_verified_loop)
    restem_iteration(...)        one iteration, in the order below

Iteration t:
    e_step        K = selfimprove.num_samples samples per training prompt from theta_t, verified
    filter_kept   samples with reward (1 correct, 0 not) >= selfimprove.keep_threshold, distinct
                  responses only, at most selfimprove.max_per_prompt per prompt (first by sample index)
    m_step        SFT on the kept samples from theta_0 (selfimprove.restart_from_base, as the paper)
                  or from theta_t; the trainer writes theta_{t+1} to iter_t/train/model

Where this departs from the paper: the paper caps kept samples per problem too (10 for MATH) and
fine-tunes from the base model each iteration; both are the defaults here. When the kept samples make
no full global batch, theta_{t+1} = theta_t (no training; the row's train_steps is empty).
"""

from __future__ import annotations

from spin_mcore.selfimprove.common import (collapse_watch, run_verified_loop, sample_and_verify, sft_config,
                                           sft_records, train_or_keep)


def filter_kept(verified: list[dict], threshold: float, cap: int) -> list[dict]:
    """Samples whose reward ``float(correct)`` is >= ``threshold``, distinct per prompt, ``cap`` per prompt."""
    kept, seen, count = [], set(), {}
    for r in sorted(verified, key=lambda r: (str(r["prompt_id"]), r.get("sample_index", 0))):
        pid = str(r["prompt_id"])
        key = (pid, tuple(r["generated_ids"]))
        if float(bool(r["correct"])) < threshold or key in seen or count.get(pid, 0) >= cap:
            continue
        seen.add(key)
        count[pid] = count.get(pid, 0) + 1
        kept.append(r)
    return kept


def restem_iteration(cfg, pstate, run, t: int, theta: str, theta0: str, data, log) -> tuple[str, dict]:
    """E-step, filter, M-step of iteration t; returns (theta_{t+1}, row of counts and collapse stats)."""
    si = cfg.selfimprove
    verified = sample_and_verify(cfg, pstate, run, t, theta, data.train, data, "train", si.num_samples)
    stats = collapse_watch(verified, si.num_samples, si.min_distinct_2, log)
    kept = filter_kept(verified, si.keep_threshold, si.max_per_prompt)
    log(f"iter {t}: kept {len(kept)} of {len(verified)} samples "
        f"({sum(r['status'] == 'no_answer' for r in verified)} without an answer)")
    init = theta0 if si.restart_from_base else theta
    theta_next, steps = train_or_keep(sft_config(cfg), pstate, sft_records(kept), init, theta, run.train(t), t, log)
    return theta_next, {**stats, "kept": len(kept), "samples": len(verified), "train_steps": steps}


def run_restem(cfg, pstate, force: bool = False, data=None) -> list[dict]:
    """All ReST^EM iterations of ``cfg`` in ``cfg.run.dir``; collective. Rows: theta_0, then one per iteration."""
    return run_verified_loop(cfg, pstate, "ReST-EM", restem_iteration, force, data)
