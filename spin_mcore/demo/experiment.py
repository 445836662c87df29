"""The embedded demo: SFT a tiny Megatron GPT to a plateau, run SPIN, and compare with continued SFT.

    run_demo(out_dir, size)   collective; returns the result rows

Steps (all through the product's own stages, on the CPU platform):
1. copy the shipped arithmetic dataset and train a SentencePiece tokenizer on it;
2. SFT from random init in rounds of one epoch until held-out NLL improves by less than
   ``plateau_tol`` (relative) -- the paper starts from a fully SFT-trained model, which is
   what makes continued SFT a fair control; the model's weakness comes from its size;
3. ``iterations`` SPIN iterations from that theta_0 (:func:`spin_mcore.loop.run_spin`);
4. the paper's control: continued SFT from theta_0 on the human responses for SPIN's training
   compute (the same number of sequences through forward+backward; SPIN's generation cost is
   not charged, which favours the control), once with the SFT recipe (as the paper) and once
   with SPIN's optimizer and LR schedule (so that only the objective differs);
5. a table (held-out exact match, held-out NLL, pair accuracy) and a PNG plot, followed in
   ``results.md`` by the SPIN run's timeline (where each iteration's time went; ``spin/timeline.png``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from spin_mcore.config import Config, load_config
from spin_mcore.data.human_pairs import sft_records, write_human_pairs
from spin_mcore.utils.io import atomic_write_json, read_json

SHIPPED_DATA = Path(__file__).resolve().parent.parent / "demo_data" / "arith.jsonl"


@dataclass(frozen=True)
class DemoSize:
    """Knobs that set the demo's cost. ``full`` is the README demo, ``small`` the test."""

    hidden: int
    layers: int
    spin_prompts: int
    eval_prompts: int
    sft_max_rounds: int
    sft_records: int
    iterations: int = 3


SIZES = {
    "full": DemoSize(hidden=64, layers=2, spin_prompts=512, eval_prompts=200, sft_max_rounds=16, sft_records=6000),
    "small": DemoSize(hidden=48, layers=2, spin_prompts=128, eval_prompts=64, sft_max_rounds=3, sft_records=1500,
                      iterations=2),
}


def demo_config(out: Path, size: DemoSize, tokenizer: Path, vocab_size: int, seed: int,
                overrides: Optional[list[str]] = None) -> Config:
    """The SPIN config of the demo (also written to ``out/spin/config.yaml`` by the loop); ``overrides`` win."""
    heads = 4
    # init_std 0.1 ~ 1/sqrt(hidden): Megatron's 0.02 suits ~4k-wide models, and a 64-wide model
    # started there spends its first SFT epochs only growing its weights.
    return load_config(overrides=[
        "model.preset=tiny", f"model.hidden_size={size.hidden}", f"model.num_layers={size.layers}",
        "model.init_std=0.1",
        f"model.num_attention_heads={heads}", "model.num_query_groups=2",
        f"model.ffn_hidden_size={(size.hidden * 11 // 4) // 8 * 8}", f"model.vocab_size={vocab_size}",
        "model.seq_length=56", "model.make_vocab_size_divisible_by=64",
        f"data.path={out / 'data' / 'arith.jsonl'}", f"data.tokenizer={tokenizer}",
        "data.max_prompt_length=28", "data.max_response_length=24",
        f"data.heldout_fraction={max(size.eval_prompts / size.sft_records, 0.02):.4f}",
        f"data.num_prompts={size.spin_prompts}", f"data.seed={seed}",
        "generation.temperature=1.0", "generation.max_new_tokens=24", "generation.batch_size=64",
        "generation.shard_size=256", f"generation.seed={seed}",
        "spin.beta=[0.1]", "spin.loss=logistic",
        "train.optimizer=rmsprop", "train.lr=[1e-5]", "train.global_batch_size=32", "train.micro_batch_size=32",
        "train.epochs=2", "train.save_interval=1000", "train.clip_grad=1.0", f"train.seed={seed}",
        f"run.dir={out / 'spin'}", f"run.iterations={size.iterations}", "run.checker=arith",
        f"run.eval_prompts={size.eval_prompts}", "run.stop_pair_accuracy=0.0",
        *(overrides or []),
    ])


def _sft_config(cfg: Config, data_path: Path) -> Config:
    """The SFT recipe that takes the demo model from random init to theta_0 (Adam, one epoch per round)."""
    sft = copy.deepcopy(cfg)
    sft.train.objective = "sft"
    sft.train.optimizer = "adam"
    sft.train.lr = [3e-3]
    sft.train.global_batch_size = 64
    sft.train.micro_batch_size = 64
    sft.train.epochs = 1
    sft.train.warmup_fraction = 0.05
    sft.data.num_prompts = None
    sft.data.path = str(data_path)
    return sft


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def sft_to_plateau(cfg: Config, pstate, data, out: Path, max_rounds: int, plateau_tol: float = 0.02,
                   patience: int = 2, log=print) -> tuple[str, list[dict]]:
    """Rounds of one SFT epoch from random init until ``patience`` rounds in a row fail to lower the
    best held-out NLL by ``plateau_tol`` (relative).

    Returns (theta_0 = the round with the lowest held-out NLL, [{round, heldout_nll, steps}]).
    Each round resumes from the previous round's model, so a killed demo restarts at the round it was in.
    """
    from spin_mcore.eval.builtin import heldout_nll
    from spin_mcore.loop import load_policy, score_pairs
    from spin_mcore.training.trainer import train

    human = write_human_pairs(out / "heldout_human", data.heldout, pstate)
    history: list[dict] = []
    theta: Optional[str] = None
    best, best_theta, stale = float("inf"), None, 0
    for r in range(max_rounds):
        round_dir = out / f"round_{r}"
        summary = train(cfg, pstate, sft_records(data.train), theta, round_dir, iteration=0)
        theta = str(summary.get("model", round_dir / "model"))
        nll = heldout_nll(score_pairs(cfg, pstate, load_policy(cfg, pstate, theta), theta, [human],
                                      round_dir / "heldout_scores"))
        history.append({"round": r, "heldout_nll": nll, "steps": summary.get("steps")})
        log(f"SFT round {r}: held-out NLL {nll:.4f} ({summary.get('steps')} steps)")
        stale = 0 if nll < best * (1 - plateau_tol) else stale + 1
        if nll < best:
            best, best_theta = nll, theta
        if stale >= patience:
            break
    return best_theta, history


def _prepare_inputs(out: Path, size: DemoSize, seed: int, pstate) -> Path:
    """Copy the first ``size.sft_records`` shipped records and train the tokenizer (rank 0, once)."""
    from spin_mcore.data.templates import format_prompt
    from spin_mcore.data.tokenizer import train_sentencepiece
    from spin_mcore.utils.io import atomic_write_text

    data_path = out / "data" / "arith.jsonl"
    tok_dir = out / "tokenizer"
    if pstate.is_logging_rank:
        if not data_path.exists():
            lines = SHIPPED_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[: size.sft_records]
            atomic_write_text(data_path, "".join(lines))
        if not (tok_dir / "tokenizer.model").exists():
            import json

            recs = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines()]
            texts = [format_prompt(r["prompt"], "instruction") + r["response"] for r in recs]
            train_sentencepiece(texts, tok_dir, vocab_size=512, seed=seed)
    _barrier()
    return tok_dir / "tokenizer.model"


def append_timeline(results_md: Path, run_root: Path) -> None:
    """Add the SPIN run's per-iteration timeline table to ``results_md`` and draw ``run_root/timeline.png``
    (what ``spin-mcore report`` shows); nothing when the run has no timeline yet."""
    from spin_mcore.timeline import TIMELINE_FILE, TimelineError, format_timeline, plot_timeline, read_timeline
    from spin_mcore.utils.io import atomic_write_text

    try:
        records = read_timeline(run_root / TIMELINE_FILE)
    except TimelineError:
        return
    plot_timeline(records, run_root / "timeline.png")
    text = results_md.read_text(encoding="utf-8").rstrip("\n")
    atomic_write_text(results_md, f"{text}\n\n## Where the SPIN iterations' time went (spin/timeline.jsonl)\n\n"
                                  f"{format_timeline(records)}\n")


def run_demo(out_dir: str, size_name: str = "full", seed: int = 0, force: bool = False,
             overrides: Optional[list[str]] = None, method: str = "spin") -> dict:
    """The whole demo on this rank (collective). Returns {"rows": [...], "sft_history": [...], "seconds",
    "examples", "heldout_prompts"}.

    ``method="all"`` also runs ReST^EM, Iterative RPO and STaR from the same theta_0
    (:mod:`spin_mcore.selfimprove.demo`) into the same table and a per-method plot.
    """
    from spin_mcore.config import ParallelConfig
    from spin_mcore.data.tokenizer import load_tokenizer
    from spin_mcore.loop import evaluate, prepare, run_spin
    from spin_mcore.platform import init_distributed
    from spin_mcore.run_dir import RunDir, write_results
    from spin_mcore.training.trainer import train
    from spin_mcore.utils.shards import read_stage

    start = time.perf_counter()
    out = Path(out_dir)
    size = SIZES[size_name]
    pstate = init_distributed(ParallelConfig(), seed=seed)
    log = (lambda m: print(f"[demo] {m}", flush=True)) if pstate.is_logging_rank else (lambda m: None)

    tok_path = _prepare_inputs(out, size, seed, pstate)
    tok = load_tokenizer(tok_path)
    cfg = demo_config(out, size, tok_path, tok.vocab_size, seed, overrides)
    sft_cfg = _sft_config(cfg, out / "data" / "arith.jsonl")
    sft_data = prepare(sft_cfg, pstate)
    log(f"step 1: tokenizer ({tok.vocab_size} pieces), {len(sft_data.train)} SFT records, "
        f"{len(sft_data.heldout)} held-out prompts")

    # 2. SFT to a plateau: theta_0.
    sft_state = read_json(out / "sft" / "done.json")
    if sft_state is None:
        theta0, history = sft_to_plateau(sft_cfg, pstate, sft_data, out / "sft", size.sft_max_rounds, log=log)
        if pstate.is_logging_rank:
            atomic_write_json(out / "sft" / "done.json", {"theta0": theta0, "history": history})
        _barrier()
    else:
        theta0, history = sft_state["theta0"], sft_state["history"]
    log(f"step 2: SFT plateaued after {len(history)} rounds: best held-out NLL {min(h['heldout_nll'] for h in history):.4f}")

    # 3. SPIN iterations from theta_0.
    cfg.run.init_checkpoint = theta0
    data = prepare(cfg, pstate)
    spin_rows = run_spin(cfg, pstate, force=force, data=data)
    run = RunDir(cfg.run.dir)
    heldout0 = run.iteration(0) / "heldout_generation"
    ref0 = list(read_stage(run.iteration(0) / "heldout_reference"))
    base = evaluate(cfg, pstate, data, theta0, heldout0, None, out / "eval_sft")
    base.update(model="SFT (theta_0)", iteration=0)

    # 4. Controls: continued SFT from theta_0 for SPIN's training compute (sequences through
    #    forward+backward), (a) with the SFT recipe itself, as the paper does, and (b) with SPIN's
    #    optimizer, LR and schedule, so that only the objective differs.
    spin_sequences = sum(2 * cfg.train.global_batch_size * int(r.get("train_steps") or 0) for r in spin_rows)
    controls = []
    for name, base_cfg in (("continued SFT", sft_cfg), ("continued SFT, SPIN optimizer", cfg)):
        ctrl_cfg = copy.deepcopy(base_cfg)
        ctrl_cfg.train.objective = "sft"
        ctrl_cfg.train.global_batch_size = ctrl_cfg.train.micro_batch_size = 2 * cfg.train.global_batch_size
        ctrl_cfg.train.max_steps = max(1, spin_sequences // ctrl_cfg.train.global_batch_size)
        ctrl_dir = out / name.replace(",", "").replace(" ", "_")
        summary = train(ctrl_cfg, pstate, sft_records(sft_data.train), theta0, ctrl_dir, iteration=0)
        theta_ctrl = str(summary.get("model", ctrl_dir / "model"))
        ctrl = evaluate(cfg, pstate, data, theta_ctrl, heldout0, ref0, ctrl_dir / "eval")
        ctrl.update(model=name, iteration=len(spin_rows), train_steps=summary.get("steps"))
        controls.append(ctrl)
        log(f"control {name!r}: exact match {ctrl['exact_match']:.3f}, held-out NLL {ctrl['heldout_nll']:.4f}")

    verified = []
    if method == "all":  # the verifier-based loops from the same theta_0, same prompts
        from spin_mcore.selfimprove.demo import plot_methods, run_verified_methods, spin_diversity

        spin_diversity(run.root, spin_rows)
        for r in spin_rows:
            r["method"] = "SPIN"
        for r in (base, *spin_rows, *controls):  # the verified loops' rows are judged by their verifier
            r["judge"] = cfg.run.checker
        verified = run_verified_methods(cfg, pstate, theta0, out, log)
    rows = [base, *spin_rows, *controls, *verified]
    columns = ["model", "exact_match", "sampled_exact_match", "heldout_nll", "pair_accuracy", "margin", "train_steps"]
    if verified:
        columns[1:1] = ["judge"]
        columns[5:5] = ["distinct_2", "pass_at_1", "solved_share", "kept"]  # solved_share = pass@K
    table = [{c: r.get(c) for c in columns} for r in rows]
    if pstate.is_logging_rank:
        write_results(RunDir(out), table, title="SPIN vs continued SFT (held-out)", trajectory=1 + len(spin_rows))
        if verified:
            plot_methods(rows, out / "results.png", "SPIN, ReST^EM, Iterative RPO, STaR vs continued SFT (held-out)")
        from spin_mcore.run_dir import format_table

        append_timeline(out / "results.md", run.root)
        print(format_table(table), flush=True)
        print(f"[demo] table: {out / 'results.md'}  plot: {out / 'results.png'}", flush=True)
    return {"rows": table, "sft_history": history, "seconds": round(time.perf_counter() - start, 1),
            "examples": {r["model"]: r.get("example") for r in rows}, "heldout_prompts": len(data.heldout)}
