"""STaR, Self-Taught Reasoner (Zelikman et al. 2022, arXiv:2203.14465).

    run_star(cfg, pstate)      every iteration (spin_mcore.selfimprove.common.run_verified_loop)
    star_iteration(...)        one iteration, in the order below

Iteration t:
    sample          K = selfimprove.num_samples rationale + answer samples per training prompt from theta_t
    keep_correct    the verified ones (distinct, at most selfimprove.max_per_prompt per prompt)
    rationalize     prompts with no correct sample are asked again with the reference answer as a
                    hint (``selfimprove.hint_template`` appended to the prompt text), one sample each;
                    a rationale that reaches the answer is kept, paired with the ORIGINAL prompt ids:
                    the hint is used for generation only, never trained on
    fine_tune       SFT on correct + rationalized from theta_0 (selfimprove.restart_from_base, as the
                    paper) or from theta_t

Where this departs from the paper: the paper samples greedily with a few-shot prompt and runs
rationalization with the hint inside the few-shot exemplars; here the response itself carries the
rationale (the task's human format) and the hint is a suffix of the prompt text.
"""

from __future__ import annotations

from spin_mcore.selfimprove.common import (collapse_watch, run_verified_loop, sample_and_verify, sft_config,
                                           sft_records, train_or_keep)
from spin_mcore.selfimprove.restem import filter_kept


def hinted_prompts(cfg, data, prompt_ids: list) -> list:
    """``TokenizedPrompt`` copies of ``prompt_ids``' prompts with the hint appended to the raw text
    (tokenised with the run's template and limits), in the order given."""
    from spin_mcore.data.records import SFTRecord
    from spin_mcore.data.tokenize import tokenize_records

    by_id = {str(p.id): p for p in data.train}
    records = [SFTRecord(str(pid), data.texts[str(pid)] + cfg.selfimprove.hint_template.format(
        answer=data.references[str(pid)]), "-") for pid in prompt_ids]
    hinted, _ = tokenize_records(records, data.tokenizer, cfg.data.template, cfg.data.max_prompt_length,
                                 cfg.data.max_response_length)
    for h in hinted:
        h.response_ids = list(by_id[h.id].response_ids)
    return hinted


def unhint(rationalized: list[dict], data) -> list[dict]:
    """Rationalized samples re-attached to their original (hint-free) prompt ids and text."""
    by_id = {str(p.id): p for p in data.train}
    return [{**r, "prompt_ids": list(by_id[str(r["prompt_id"])].prompt_ids), "prompt": data.texts[str(r["prompt_id"])],
             "rationalized": True} for r in rationalized]


def star_iteration(cfg, pstate, run, t: int, theta: str, theta0: str, data, log) -> tuple[str, dict]:
    """Sample, keep, rationalize, fine-tune; returns (theta_{t+1}, row)."""
    from spin_mcore.loop import load_policy

    si = cfg.selfimprove
    # The in-process engine reuses one loaded theta_t for both passes; an external engine loads its own.
    model = load_policy(cfg, pstate, theta) if cfg.generation.backend == "megatron" else None
    verified = sample_and_verify(cfg, pstate, run, t, theta, data.train, data, "train", si.num_samples, model=model)
    stats = collapse_watch(verified, si.num_samples, si.min_distinct_2, log)
    correct = filter_kept(verified, 1.0, si.max_per_prompt)
    solved = {str(r["prompt_id"]) for r in correct}
    failed = sorted({str(r["prompt_id"]) for r in verified} - solved)
    rationalized: list[dict] = []
    if failed:
        hinted = hinted_prompts(cfg, data, failed)
        # Another sampling stream than the first pass's (seed offset), one sample per failed prompt.
        tried = sample_and_verify(cfg, pstate, run, t, theta, hinted, data, "rationalize", 1, seed_offset=104729,
                                  model=model)
        rationalized = unhint(filter_kept(tried, 1.0, 1), data)
    del model
    kept = correct + rationalized
    log(f"iter {t}: {len(correct)} correct, {len(rationalized)} of {len(failed)} failures rationalized")
    init = theta0 if si.restart_from_base else theta
    theta_next, steps = train_or_keep(sft_config(cfg), pstate, sft_records(kept), init, theta, run.train(t), t, log)
    return theta_next, {**stats, "kept": len(correct), "rationalized": len(rationalized),
                        "rationalize_tried": len(failed), "train_steps": steps}


def run_star(cfg, pstate, force: bool = False, data=None) -> list[dict]:
    """All STaR iterations of ``cfg`` in ``cfg.run.dir``; collective. Rows: theta_0, then one per iteration."""
    return run_verified_loop(cfg, pstate, "STaR", star_iteration, force, data)
