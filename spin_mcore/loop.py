"""The SPIN loop: generate, score, train, evaluate, for t = 0 .. T-1 (Chen et al. 2024, Algorithm 1).

    run_spin(cfg, pstate)            every iteration, then the results table and plot
    run_iteration(cfg, pstate, ...)  one iteration, in the order below

Every stage writes its outputs atomically with a manifest, and a re-run skips what is
complete: generation and reference shards resume individually, the trainer resumes from
its last checkpoint, and ``iter_t/eval.json`` (written last) marks an iteration done. Each stage
appends its wall time, model loads and bytes to ``RUN/timeline.jsonl`` (:mod:`spin_mcore.timeline`;
``spin-mcore report RUN`` tabulates and plots it).

Where this departs from the paper:
* The opponent's log-probs are computed once per iteration right after generation and
  stored with the pairs (the opponent *is* the reference), so training holds one model.
* Held-out prompts get opponent responses too, so the main player's ability to tell
  y from y' can be measured; iterating stops early when held-out pair accuracy of
  theta_{t+1} against theta_t falls below ``run.stop_pair_accuracy`` (the paper always
  runs a fixed number of iterations).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from spin_mcore.config import Config, per_iteration
from spin_mcore.eval.builtin import checker_for, exact_match, decode_responses, heldout_nll, pair_metrics
from spin_mcore.generation.sampling import sampling_vocab_size
from spin_mcore.run_dir import RunDir, claim_run_dir, save_eval, write_results
from spin_mcore.timeline import Timeline
from spin_mcore.training.resident import ResidentPolicy
from spin_mcore.utils.io import read_json
from spin_mcore.utils.shards import read_stage


@dataclass
class Prepared:
    """Tokenised data of a run: training prompts, held-out prompts (capped for eval), and answers if checkable."""

    train: list
    heldout: list
    tokenizer: object
    answers: Optional[dict] = None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _log(pstate, msg: str) -> None:
    if pstate.is_logging_rank:
        print(f"[spin] {msg}", flush=True)


def prepare(cfg: Config, pstate, cache_dir: Optional[Path] = None) -> Prepared:
    """Load, split and tokenise ``cfg.data``. Collective with ``cache_dir`` (``RUN/data`` in a SPIN run): rank 0
    tokenises once per run into it and every rank reads the result
    (:func:`~spin_mcore.data.prepared_cache.prepared_once`); without it every rank tokenises (deterministic)."""
    from spin_mcore.data.prepare import prepare_sft_data
    from spin_mcore.data.prepared_cache import prepared_once
    from spin_mcore.data.tokenizer import load_tokenizer

    if cfg.data.tokenizer is None:
        raise ValueError("data.tokenizer is not set")
    tok = load_tokenizer(cfg.data.tokenizer)
    # Lines skipped under data.skip_bad_lines go to RUN/rejects.jsonl (one writer).
    rejects = Path(cfg.run.dir) / "rejects.jsonl" if pstate.is_logging_rank else None
    if cache_dir is not None:
        data = prepared_once(cfg.data, tok, cache_dir, pstate.rank, verbose=pstate.is_logging_rank,
                             rejects_path=rejects)
    else:
        data = prepare_sft_data(cfg.data, tok, verbose=pstate.is_logging_rank, rejects_path=rejects)
    answers = None
    checker = checker_for(cfg.run.checker)
    if checker is not None:
        answers = checker[1](cfg.data.path)
    return Prepared(data.train, data.heldout[: cfg.run.eval_prompts], tok, answers)


def load_policy(cfg: Config, pstate, checkpoint: Optional[str]):
    """Build this rank's model stage and load the mcore ``checkpoint`` for inference.

    One stage even with ``parallel.vp > 1``: virtual stages only pay off in training's
    interleaved schedule, and a checkpoint loads at any layout.
    """
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model

    # Skip the random init when a checkpoint overwrites every parameter next.
    model = build_gpt_model(cfg.model, pstate, cfg.precision, fused_kernels=cfg.train.fused_kernels,
                            perform_initialization=checkpoint is None)
    if checkpoint is not None:
        load_model_checkpoint(model, pstate, checkpoint)
    model.eval()
    return model


def import_initial_model(cfg: Config, pstate, run: RunDir) -> str:
    """theta_0 as an mcore checkpoint: ``run.init_checkpoint`` itself, or its conversion from HF (done once)."""
    if not cfg.run.init_from_hf:
        return cfg.run.init_checkpoint
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.fp8 import without_fp8_params
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import load_hf_weights

    target = run.theta(0)
    if not (target / "spin_mcore.json").exists():
        # FP8 params would round theta_0 to FP8 on its way to the checkpoint: convert in bf16 (the same
        # layers; training loads it into FP8 params and seeds its fp32 main params from these values).
        model = build_gpt_model(cfg.model, pstate, without_fp8_params(cfg.precision),
                                perform_initialization=False)  # all overwritten
        load_hf_weights(model, pstate, cfg.run.init_checkpoint, cfg.model)
        save_model_checkpoint(model, pstate, target, cfg.model, extra={"source": str(cfg.run.init_checkpoint)})
        del model
    return str(target)


def score_pairs(cfg, pstate, model, model_id: str, pair_dirs: list, out_dir: Path) -> list[dict]:
    """log p(y|x), log p(y'|x) under ``model`` (identified by ``model_id``) for every pair in ``pair_dirs``,
    via the reference pass (resumable in ``out_dir``)."""
    from spin_mcore.training.reference import compute_reference_logprobs

    compute_reference_logprobs(cfg, model, pstate, pair_dirs, out_dir, model_id=str(model_id))
    return list(read_stage(out_dir))


def evaluate(cfg: Config, pstate, data: Prepared, checkpoint: str, heldout_pairs: Path, heldout_ref: Optional[list],
             work_dir: Path) -> dict:
    """Held-out NLL, pair accuracy/margin against the opponent's scores, and verifiable accuracy of ``checkpoint``."""
    model = load_policy(cfg, pstate, checkpoint)
    policy = score_pairs(cfg, pstate, model, checkpoint, [heldout_pairs], work_dir / "heldout_scores")
    out = {"heldout_nll": heldout_nll(policy)}
    if heldout_ref is not None:
        out.update(pair_metrics(policy, heldout_ref))
    if data.answers is not None:
        answers, check = [data.answers[p.id] for p in data.heldout], checker_for(cfg.run.checker)[0]
        g = cfg.generation
        vocab = sampling_vocab_size(cfg.model.vocab_size, data.tokenizer)
        texts = decode_responses(model, pstate, data.heldout, data.tokenizer, g.max_new_tokens, vocab, g.batch_size)
        sampled = decode_responses(model, pstate, data.heldout, data.tokenizer, g.max_new_tokens,
                                   vocab, g.batch_size, temperature=max(g.temperature, 1e-3),
                                   seed=g.seed + 7919)  # a stream no training generation uses
        out["exact_match"] = exact_match(texts, answers, check)
        out["sampled_exact_match"] = exact_match(sampled, answers, check)
        out["example"] = texts[0] if texts else ""
    del model
    gc.collect()
    return out


def stage_complete(stage_dir: Path) -> bool:
    """Whether a sharded stage's manifest says it is complete (a resumed stage then has nothing to do)."""
    return bool((read_json(Path(stage_dir) / "manifest.json") or {}).get("complete"))


def generate_with_engine(cfg: Config, pstate, run: RunDir, t: int, theta: str, sets: list, tok,
                         timeline: Optional[Timeline] = None, resident: Optional[ResidentPolicy] = None) -> dict:
    """Step 1 with an external engine (``generation.backend=vllm|trtllm``): y' for every prompt set of
    iteration t from ONE engine start (:func:`spin_mcore.generation.external.generate_with_engine`).

    sets: ``(name, prompts)``, written to ``iter_t/<name>_generation``. Collective. The export is made
    from ``resident`` (the iteration's theta_t, parked in host memory while the engine runs; a fresh one,
    dropped after the export, when None). The call is one block here, so the timeline splits it
    afterwards: ``export`` (loading theta_t and writing the HF export), ``engine_start`` (the engine's own
    load seconds), ``generation`` (the rest).
    """
    from spin_mcore.generation import external

    it_dir = run.iteration(t)
    timeline = timeline or Timeline(run.root, pstate)
    own = resident is None
    resident = resident or ResidentPolicy(cfg, pstate, theta)
    load_span = []

    def load():
        t0 = time.time()
        model = resident.get()
        load_span.extend((t0, time.time()))
        return model

    with timeline.measured() as m:
        engine = external.generate_with_engine(cfg, pstate, load,
                                               [(n, p, it_dir / f"{n}_generation") for n, p in sets], tok, t,
                                               str(theta), it_dir,
                                               after_export=resident.release if own else resident.park)
    record_engine_stages(timeline, t, m, load_span, engine)
    _log(pstate, f"iter {t}: {cfg.generation.backend} engine: {engine.get('engine_starts', 0)} start(s), "
                 f"{engine.get('generated_tokens', 0)} tokens")
    return engine


def record_engine_stages(timeline: Timeline, t: int, m, load_span: list, engine: dict) -> None:
    """The engine call is one block here, so its record is split afterwards: ``export`` (loading theta_t,
    then writing the HF export, which follows the load at once), ``engine_start`` (the engine's own load
    seconds) and ``generation`` (the rest). Nothing to generate: one resumed ``generation`` record."""
    if not engine.get("engine_starts", 0) or not load_span:
        timeline.record(t, "generation", m.start, m.end, resumed=True, set="engine", **m.io())
        return
    export_end = load_span[1] + m.export_s
    engine_end = min(export_end + float(engine.get("load_seconds") or 0.0), m.end)
    timeline.record(t, "export", m.start, export_end, **m.io())  # planning the job counts here too
    timeline.record(t, "engine_start", export_end, engine_end)
    timeline.record(t, "generation", engine_end, m.end, set="engine")


def check_engine_agreement(cfg: Config, pstate, run: RunDir, t: int, name: str, ref_dir: Path) -> dict:
    """Trainer-engine agreement of iteration t's y' in ``ref_dir`` (see :mod:`spin_mcore.generation.agreement`):
    stats written to ``iter_t/<name>_agreement.json``; raises AgreementError past the threshold."""
    import torch

    from spin_mcore.generation.agreement import agreement_stats, check_agreement, default_threshold
    from spin_mcore.utils.io import atomic_write_json

    g = cfg.generation
    threshold = g.agreement_threshold or default_threshold(cfg.precision.recipe,
                                                           "cuda" if torch.cuda.is_available() else "cpu")
    stats = agreement_stats(read_stage(ref_dir), iteration=t)
    passed = stats["median"] <= threshold
    if pstate.rank == 0:
        atomic_write_json(run.iteration(t) / f"{name}_agreement.json", {**stats, "threshold": threshold, "passed": passed})
    _log(pstate, f"iter {t}: {name} trainer-engine agreement: median {stats['median']:.3g}, p90 {stats['p90']:.3g}, "
                 f"max {stats['max']:.3g} nats/token (threshold {threshold:g})")
    _barrier()
    check_agreement(stats, threshold, f"iteration {t} {name}")
    return {**stats, "threshold": threshold}


def generate_and_score(cfg: Config, pstate, run: RunDir, t: int, theta: str, prompts: list, tok, name: str,
                       extra_pairs: Optional[list] = None, timeline: Optional[Timeline] = None,
                       resident: Optional[ResidentPolicy] = None) -> Path:
    """Steps 1-2 for one prompt set: y' ~ theta_t into ``iter_t/<name>_generation``, then theta_t's log-probs.

    ``extra_pairs`` (earlier iterations' generation dirs) are scored by theta_t too: theta_t is
    the reference of every pair trained on in iteration t, whichever iterate generated it.
    ``resident``: the iteration's theta_t (loaded on first use and kept for the next stage); a
    fresh one, dropped at the end, when None.
    Timeline: ``generation`` (theta_t's load and the in-process engine, or reading the external
    engine's shards) and ``reference``, each ``resumed`` when its stage was complete before it started.
    """
    from spin_mcore.generation.stage import generate_opponent
    from spin_mcore.training.reference import compute_reference_logprobs

    timeline = timeline or Timeline(run.root, pstate)
    own = resident is None
    resident = resident or ResidentPolicy(cfg, pstate, theta)
    gen_dir = run.iteration(t) / f"{name}_generation"
    ref_dir = run.iteration(t) / f"{name}_reference"
    # A stage its manifest calls complete gets no model: the stage functions then only check that it was
    # written under this configuration (fingerprint) and return, and theta_t is not loaded for it.
    with timeline.stage(t, "generation", set=name) as stage:
        stage.resumed = stage_complete(gen_dir) and stage_complete(ref_dir)
        model = None if stage_complete(gen_dir) else resident.get()
        summary = generate_opponent(cfg, model, pstate, prompts, tok, gen_dir, t, checkpoint_id=str(theta))
    _log(pstate, f"iter {t}: generated {name}: {summary.get('samples', '?')} samples, "
                 f"{summary.get('tokens_per_s', 0):.0f} tok/s")
    with timeline.stage(t, "reference", set=name) as stage:
        stage.resumed = stage_complete(ref_dir)
        model = None if stage.resumed else resident.get()
        compute_reference_logprobs(cfg, model, pstate, [gen_dir, *(extra_pairs or [])], ref_dir, model_id=str(theta))
    del model
    if own:
        resident.release()
    if cfg.generation.backend != "megatron":
        check_engine_agreement(cfg, pstate, run, t, name, ref_dir)
    return ref_dir


def run_iteration(cfg: Config, pstate, run: RunDir, t: int, theta: str, data: Prepared) -> tuple[str, dict]:
    """One SPIN iteration from theta_t; returns (theta_{t+1} checkpoint, evaluation row)."""
    from spin_mcore.models.checkpoint import prestart_save_queue
    from spin_mcore.training.trainer import train

    start = time.perf_counter()
    prestart_save_queue()  # theta_{t+1}'s save at the end of training: its once-per-process set-up starts now
    timeline = Timeline(run.root, pstate)
    # 1-3. Opponent responses y' ~ theta_t, plus the previous iteration's pairs (paper: 50k -> 100k),
    #      all scored by theta_t; and the same for held-out prompts (evaluation only).
    previous = [run.iteration(t - 1) / "train_generation"] if cfg.spin.keep_previous_iteration and t > 0 else []
    # theta_t is read from disk at most once: the engine's export, both reference passes and the
    # trainer's start share one model (loaded by whichever needs it first).
    resident = ResidentPolicy(cfg, pstate, theta)
    if cfg.generation.backend != "megatron":  # one engine start serves both prompt sets
        generate_with_engine(cfg, pstate, run, t, theta, [("train", data.train), ("heldout", data.heldout)],
                             data.tokenizer, timeline, resident)
    train_pairs = generate_and_score(cfg, pstate, run, t, theta, data.train, data.tokenizer, "train", previous,
                                     timeline, resident)
    heldout_pairs = generate_and_score(cfg, pstate, run, t, theta, data.heldout, data.tokenizer, "heldout",
                                       timeline=timeline, resident=resident)
    # 4-5. Train E epochs from theta_t; the trainer writes theta_{t+1} as train/model.
    with timeline.stage(t, "training") as stage:
        stage.resumed = (run.train(t) / "model" / "spin_mcore.json").exists()
        summary = train(cfg, pstate, [train_pairs], theta, run.train(t), iteration=t, load_model=resident.take)
    resident.release()  # training had nothing left to do (a resumed iteration): the model was not taken
    theta_next = str(summary.get("model", run.train(t) / "model"))
    # 6. Evaluate theta_{t+1} against theta_t's scores of the held-out pairs.
    heldout_ref = list(read_stage(heldout_pairs))
    with timeline.stage(t, "evaluation"):
        row = evaluate(cfg, pstate, data, theta_next, run.iteration(t) / "heldout_generation", heldout_ref,
                       run.iteration(t) / "eval_work")
    row.update(iteration=t + 1, model=f"SPIN iter {t + 1}", beta=float(per_iteration(cfg.spin.beta, t)),
               lr=float(per_iteration(cfg.train.lr, t)), train_steps=summary.get("steps"),
               train_pair_accuracy=(summary.get("final") or {}).get("accuracy"),
               seconds=round(time.perf_counter() - start, 1))
    if cfg.generation.backend != "megatron":
        agreement = read_json(run.iteration(t) / "train_agreement.json") or {}
        row.update(engine_agreement_median=agreement.get("median"), engine_agreement_p90=agreement.get("p90"),
                   engine_agreement_max=agreement.get("max"))
    return theta_next, row


def _prune_train_states(run: RunDir, t: int) -> None:
    """Once iteration t is evaluated: its resumable checkpoints are never loaded again (theta_{t+1} is its
    model save), and at 70B each is ~700 GB. Keep only iteration t's newest, for inspection or re-training."""
    from spin_mcore.training.train_checkpoint import prune_train_state

    for s in range(t):
        prune_train_state(run.train(s), keep_newest=False)
    prune_train_state(run.train(t), keep_newest=True)


def run_spin(cfg: Config, pstate, force: bool = False, data: Optional[Prepared] = None) -> list[dict]:
    """All iterations of ``cfg`` in ``cfg.run.dir``; collective. Returns the per-iteration rows.

    ``data``: the run's :func:`prepare` output, when the caller already has it.
    """
    run = RunDir(cfg.run.dir)
    if pstate.is_logging_rank:
        claim_run_dir(run, cfg.to_dict(), force)
    _barrier()
    if cfg.run.init_checkpoint is None:
        raise ValueError("run.init_checkpoint is not set: SPIN starts from an SFT model (theta_0)")
    data = data or prepare(cfg, pstate, run.root / "data")
    rows: list[dict] = []
    theta = import_initial_model(cfg, pstate, run)
    for t in range(cfg.run.iterations):
        done = read_json(run.eval_file(t))
        if done is not None:
            _log(pstate, f"iter {t}: complete, skipping ({run.eval_file(t)})")
            row, theta = done["row"], done["theta_next"]
        else:
            theta, row = run_iteration(cfg, pstate, run, t, theta, data)
            if pstate.is_logging_rank:
                save_eval(run, t, {"row": row, "theta_next": theta})
                _prune_train_states(run, t)
            _barrier()
        rows.append(row)
        _log(pstate, "iter %d: " % t + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items() if k != "example"))
        if pstate.is_logging_rank:
            write_results(run, rows, title="SPIN")
        acc = row.get("pair_accuracy")
        if acc is not None and acc == acc and acc < cfg.run.stop_pair_accuracy and t < cfg.run.iterations - 1:
            _log(pstate, f"stopping after iteration {t}: held-out pair accuracy {acc:.3f} < "
                         f"run.stop_pair_accuracy={cfg.run.stop_pair_accuracy} (the main player can no longer "
                         "tell human from generated responses)")
            break
    return rows
