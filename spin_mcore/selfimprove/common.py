"""What the verifier-based loops (ReST^EM, Iterative RPO, STaR) share.

    prepare_verified(cfg, pstate)                  data of spin_mcore.loop.prepare + references + raw texts
    sample_and_verify(cfg, pstate, run, t, ...)    K samples per prompt from theta_t, each with a Verdict
    collapse_watch(verified, k, threshold)         distinct-n, unique answers, solved share, pass@1, pass@K
    evaluate_policy(cfg, pstate, data, theta, ..)  greedy / sampled exact match (by the verifier), held-out NLL
    run_verified_loop(cfg, pstate, method, step)   run directory, theta_0 row, per-iteration resume, results

Sampling, training and evaluation append to the run's timeline (``RUN/timeline.jsonl``, :mod:`spin_mcore.timeline`).

The run directory is the SPIN loop's (:mod:`spin_mcore.run_dir`): ``iter_t/<name>_generation``
(sharded, resumable), ``iter_t/<name>_verified.jsonl`` (one line per sample, written atomically
once the stage is complete), ``iter_t/train_data.jsonl`` (the records trained on), ``iter_t/train``, ``iter_t/eval.json`` (written last: the iteration
is done), ``RUN/base_eval.json`` (theta_0's row) and ``RUN/results.{jsonl,md,png}``.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from spin_mcore.config import Config, ConfigError
from spin_mcore.run_dir import RunDir, claim_run_dir, save_eval, write_results
from spin_mcore.selfimprove.verifiers import Verifier, build_verifier, run_verifier
from spin_mcore.timeline import Timeline
from spin_mcore.utils.io import atomic_write_json, atomic_write_text, read_json


@dataclass
class VerifiedData:
    """Tokenised train/held-out prompts (``TokenizedPrompt``), the tokenizer, the verifier, and
    ``references`` / ``texts`` ({id: reference}, {id: raw prompt text}) for every record."""

    train: list
    heldout: list
    tokenizer: object
    verifier: Verifier
    references: dict
    texts: dict


def load_references(path, field: str) -> tuple[dict, dict]:
    """({id: record[field]}, {id: record["prompt"]}) from a JSON-lines data file; ValueError names file and line."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"data.path={path}: verified loops read references (verify.answer_field) from JSON lines only")
    refs, texts = {}, {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            rid = rec.get("id", rec.get("prompt_id"))
            if rid is None:
                raise ValueError(f"{path}:{n}: verified loops need an 'id' on every record")
            if field in rec:
                refs[str(rid)] = rec[field]
            texts[str(rid)] = rec.get("prompt")
    return refs, texts


def prepare_verified(cfg: Config, pstate) -> VerifiedData:
    """Tokenised data (as the SPIN loop), the verifier, and a reference for every prompt (else ValueError)."""
    from spin_mcore.data.prepare import prepare_sft_data
    from spin_mcore.data.tokenizer import load_tokenizer

    verifier = build_verifier(cfg.verify)
    if cfg.data.tokenizer is None:
        raise ValueError("data.tokenizer is not set")
    tok = load_tokenizer(cfg.data.tokenizer)
    data = prepare_sft_data(cfg.data, tok, verbose=pstate.is_logging_rank)
    refs, texts = load_references(cfg.data.path, cfg.verify.answer_field)
    heldout = data.heldout[: cfg.run.eval_prompts]
    missing = [p.id for p in [*data.train, *heldout] if str(p.id) not in refs]
    if missing:
        raise ValueError(f"verify.answer_field={cfg.verify.answer_field!r}: {len(missing)} records of {cfg.data.path} "
                         f"lack it (first: {missing[:3]})")
    return VerifiedData(data.train, heldout, tok, verifier, refs, texts)


def _log(pstate, method: str, msg: str) -> None:
    if pstate.is_logging_rank:
        print(f"[{method}] {msg}", flush=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def with_samples(cfg: Config, k: int, seed_offset: int = 0) -> Config:
    """A copy of ``cfg`` generating ``k`` samples per prompt (and a shifted sampling seed, if asked)."""
    out = copy.deepcopy(cfg)
    out.generation.num_samples = k
    out.generation.seed = cfg.generation.seed + seed_offset
    return out


def verify_records(verifier: Verifier, records: list[dict], references: dict) -> list[dict]:
    """Each generation record with ``correct``, ``status``, ``answer`` (and ``detail``) of its Verdict."""
    out = []
    for r in records:
        v = run_verifier(verifier, r["generated"], references[str(r["prompt_id"])])
        out.append({**r, "correct": v.correct, "status": v.status, "answer": v.answer, "detail": v.detail})
    return out


def sample_and_verify(cfg: Config, pstate, run: RunDir, t: int, theta: str, prompts: list, data: VerifiedData,
                      name: str, k: int, seed_offset: int = 0, model=None) -> list[dict]:
    """K samples per prompt from ``theta`` into ``iter_t/<name>_generation`` (resumable), verified
    into ``iter_t/<name>_verified.jsonl`` (reused when present). Collective; every rank gets the records.

    ``model``: theta_t already loaded (in-process engine). With ``generation.backend=vllm|trtllm`` callers
    pass None, so no Megatron copy stays resident while the engine runs (its export is made from a fresh load).
    Recorded in the run's timeline as ``generation`` (set ``name``; resumed when the verified file exists).
    """
    out_file = run.iteration(t) / f"{name}_verified.jsonl"
    with Timeline(run.root, pstate).stage(t, "generation", set=name) as stage:
        stage.resumed = out_file.exists()
        if not stage.resumed:
            _sample_and_verify(cfg, pstate, run, t, theta, prompts, data, name, k, seed_offset, model, out_file)
    return [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]


def _sample_and_verify(cfg: Config, pstate, run: RunDir, t: int, theta: str, prompts: list, data: VerifiedData,
                       name: str, k: int, seed_offset: int, model, out_file: Path) -> None:
    """The work of :func:`sample_and_verify` when ``out_file`` is not there yet."""
    from spin_mcore.generation.stage import generate_opponent
    from spin_mcore.loop import load_policy
    from spin_mcore.utils.shards import read_stage

    gen_dir = run.iteration(t) / f"{name}_generation"
    gen_cfg = with_samples(cfg, k, seed_offset)
    if cfg.generation.backend != "megatron":  # one engine start for this prompt set (vLLM, TensorRT-LLM)
        from spin_mcore.generation.external import generate_with_engine

        generate_with_engine(gen_cfg, pstate, lambda: model if model is not None else
                             load_policy(cfg, pstate, theta), [(name, prompts, gen_dir)], data.tokenizer, t,
                             str(theta), gen_dir)
    else:
        own = model is None
        model = load_policy(cfg, pstate, theta) if own else model
        generate_opponent(gen_cfg, model, pstate, prompts, data.tokenizer, gen_dir, t, checkpoint_id=str(theta))
        if own:
            del model
            gc.collect()
    if pstate.rank == 0:
        verified = verify_records(data.verifier, list(read_stage(gen_dir)), data.references)
        atomic_write_text(out_file, "".join(json.dumps(r) + "\n" for r in verified))
    _barrier()


def distinct_n(seqs: list[list], n: int) -> float:
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def collapse_watch(verified: list[dict], k: int, min_distinct_2: float, log=None) -> dict:
    """Diversity and coverage of K samples per prompt (records of :func:`sample_and_verify`).

    distinct_n: unique token n-grams / all n-grams over every sample (a corpus measure: it falls as
    the sample count grows, so compare rows with the same prompts and K); unique_answers: mean distinct
    extracted answers per prompt (no-answer samples not counted); solved_share = pass@K: prompts with
    at least one correct sample; pass@1: share of correct samples (the unbiased pass@1 from K samples);
    no_answer / verifier_errors: shares of samples. Warns (and ``log``s) below ``min_distinct_2``.
    """
    by_prompt: dict = {}
    for r in verified:
        by_prompt.setdefault(str(r["prompt_id"]), []).append(r)
    n = max(len(verified), 1)
    stats = {
        "distinct_1": distinct_n([r["generated_ids"] for r in verified], 1),
        "distinct_2": distinct_n([r["generated_ids"] for r in verified], 2),
        "unique_answers": sum(len({r["answer"] for r in rs if r["answer"] is not None}) for rs in by_prompt.values())
        / max(len(by_prompt), 1),
        "pass_at_1": sum(bool(r["correct"]) for r in verified) / n,
        f"pass_at_{k}": sum(any(r["correct"] for r in rs) for rs in by_prompt.values()) / max(len(by_prompt), 1),
        "no_answer": sum(r["status"] == "no_answer" for r in verified) / n,
        "verifier_errors": sum(r["status"] in ("error", "timeout") for r in verified) / n,
    }
    stats["solved_share"] = stats[f"pass_at_{k}"]
    if stats["distinct_2"] < min_distinct_2:
        msg = (f"collapse watch: distinct-2 of the samples is {stats['distinct_2']:.3f} < "
               f"selfimprove.min_distinct_2={min_distinct_2} (outputs are losing diversity)")
        warnings.warn(msg, stacklevel=2)
        if log is not None:
            log(msg)
    return stats


def sft_records(kept: list[dict]) -> list[dict]:
    """Training records (``train.objective=sft``): the kept sample's tokens as the response y."""
    return [{"prompt_id": r["prompt_id"], "prompt_ids": r["prompt_ids"], "real_ids": r["generated_ids"]} for r in kept]


def sft_config(cfg: Config) -> Config:
    out = copy.deepcopy(cfg)
    out.train.objective = "sft"
    return out


def train_or_keep(cfg: Config, pstate, records: list[dict], init: str, theta: str, out_dir: Path, t: int,
                  log) -> tuple[str, Optional[int]]:
    """Train ``records`` from ``init`` into ``out_dir`` (theta_{t+1}, steps), or keep theta_t (steps None)
    when they make no full global batch in ``train.epochs`` epochs (too few verified samples)."""
    from spin_mcore.training.trainer import train

    if len(records) * cfg.train.epochs < cfg.train.global_batch_size:
        log(f"iter {t}: {len(records)} training records make no global batch of {cfg.train.global_batch_size}: "
            f"theta_{t + 1} = theta_{t}")
        return theta, None
    if pstate.rank == 0:  # what was trained on, for inspection (and the tests)
        atomic_write_text(Path(out_dir).parent / "train_data.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    # out_dir is RUN/iter_t/train (RunDir.train): the timeline is RUN's.
    with Timeline(Path(out_dir).parent.parent, pstate).stage(t, "training") as stage:
        stage.resumed = (Path(out_dir) / "model" / "spin_mcore.json").exists()
        summary = train(cfg, pstate, records, init, out_dir, iteration=t)
    return str(summary.get("model", Path(out_dir) / "model")), summary.get("steps")


def evaluate_policy(cfg: Config, pstate, data: VerifiedData, theta: str, work_dir: Path) -> dict:
    """Greedy and one sampled exact match (by the verifier; no-answer counts as wrong) and held-out NLL
    of the human responses, for ``theta`` on the held-out prompts. Collective."""
    from spin_mcore.data.human_pairs import write_human_pairs
    from spin_mcore.eval.builtin import decode_responses, heldout_nll
    from spin_mcore.generation.sampling import sampling_vocab_size
    from spin_mcore.loop import load_policy, score_pairs

    g = cfg.generation
    model = load_policy(cfg, pstate, theta)
    human = write_human_pairs(work_dir / "heldout_human", data.heldout, pstate)
    out = {"heldout_nll": heldout_nll(score_pairs(cfg, pstate, model, theta, [human], work_dir / "heldout_scores"))}
    vocab = sampling_vocab_size(cfg.model.vocab_size, data.tokenizer)
    refs = [data.references[str(p.id)] for p in data.heldout]
    greedy = decode_responses(model, pstate, data.heldout, data.tokenizer, g.max_new_tokens, vocab, g.batch_size)
    sampled = decode_responses(model, pstate, data.heldout, data.tokenizer, g.max_new_tokens, vocab, g.batch_size,
                               temperature=max(g.temperature, 1e-3), seed=g.seed + 7919)  # as spin_mcore.loop
    for key, texts in (("exact_match", greedy), ("sampled_exact_match", sampled)):
        verdicts = [run_verifier(data.verifier, x, r) for x, r in zip(texts, refs)]
        out[key] = sum(v.correct for v in verdicts) / max(len(verdicts), 1)
        if key == "exact_match":
            out["heldout_no_answer"] = sum(v.status == "no_answer" for v in verdicts) / max(len(verdicts), 1)
    out["example"] = greedy[0] if greedy else ""
    del model
    gc.collect()
    return out


# step(cfg, pstate, run, t, theta_t, theta_0, data) -> (theta_{t+1}, row without evaluation)
IterationFn = Callable[..., tuple]


def run_verified_loop(cfg: Config, pstate, method: str, step: IterationFn, force: bool = False,
                      data: Optional[VerifiedData] = None) -> list[dict]:
    """theta_0's row, then ``run.iterations`` iterations of ``step``, each evaluated; collective.

    An iteration whose ``eval.json`` exists is skipped (its theta_{t+1} reused); the results
    table and plot are rewritten after every iteration. Returns the rows (theta_0 first).
    """
    if cfg.run.init_checkpoint is None or cfg.run.init_from_hf:
        raise ConfigError(f"run.init_checkpoint: the {method} loop starts from an mcore checkpoint of theta_0 "
                          "(convert an HF model with spin-mcore convert; run.init_from_hf is not supported here)")
    run = RunDir(cfg.run.dir)
    if pstate.is_logging_rank:
        claim_run_dir(run, cfg.to_dict(), force)
    _barrier()
    data = data or prepare_verified(cfg, pstate)
    theta0 = theta = str(cfg.run.init_checkpoint)
    base = read_json(run.root / "base_eval.json")
    if base is None:
        base = {"iteration": 0, "model": "theta_0", **evaluate_policy(cfg, pstate, data, theta0, run.root / "base_eval")}
        if pstate.is_logging_rank:
            atomic_write_json(run.root / "base_eval.json", base)
        _barrier()
    rows = [base]
    log = lambda msg: _log(pstate, method, msg)  # noqa: E731
    for t in range(cfg.run.iterations):
        done = read_json(run.eval_file(t))
        if done is not None:
            log(f"iter {t}: complete, skipping ({run.eval_file(t)})")
            row, theta = done["row"], done["theta_next"]
        else:
            theta_next, row = step(cfg, pstate, run, t, theta, theta0, data, log)
            with Timeline(run.root, pstate).stage(t, "evaluation"):
                metrics = evaluate_policy(cfg, pstate, data, theta_next, run.iteration(t) / "eval_work")
            row = {"iteration": t + 1, "model": f"{method} iter {t + 1}", **row, **metrics}
            theta = theta_next
            if pstate.is_logging_rank:
                save_eval(run, t, {"row": row, "theta_next": theta})
            _barrier()
        rows.append(row)
        log(f"iter {t}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k != "example"))
        if pstate.is_logging_rank:
            write_results(run, rows, title=method)
    return rows
