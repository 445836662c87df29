"""One whole SPIN iteration: spin_mcore as ``spin-mcore run`` does it vs the SPIN authors' pipeline.

    python benchmarks/iteration.py [--quick | --size quick|large] [--repeats N] [--threads 2]

Both sides start from the same theta_0 (our checkpoint and its HF export) and the same prompts and human
responses (spin_step.py's data at ``--lengths mixed``: a long-tailed mix of prompt and response lengths),
sample one opponent response per prompt (temperature 1, no top-k/top-p, at most ``max_new`` tokens, ending at
eos), and train one epoch of SPIN pairs (B pairs a step, RMSprop, beta 0.1, fp32, the same threads).
theta_0 is random except that it ends its samples at eos after as many tokens on average as the human
responses have (spin_step.end_samples_at_eos), as an SFT model does: a plain random model never samples eos,
and every response would run to ``max_new``, which no real theta_0 does.

    ours      the stage functions ``spin-mcore run`` calls (spin_mcore.loop.generate_and_score, then
              training.trainer.train with the resident theta_t): the in-process KV-cache engine, the
              reference pass and training, both packed (train.pack_sequences=true; ``--no-pack`` pads
              each micro-batch to its longest row instead); stage seconds from the run's timeline.jsonl
              (model loads inside the stage that loads; the final model save inside training, on both sides).
    ours_vllm the same with ``generation.backend=vllm``: theta_t exported to HF, vLLM-CPU started in its own
              environment (.venv-vllm, ``bash launch/setup_vllm.sh --device cpu``) as ``spin-mcore run``
              starts it, the trainer-engine agreement check included; generation = export + engine
              start + generation. Left out, with a line saying so, when .venv-vllm is missing.
    authors   the pipeline of the SPIN authors' code (uclaml/SPIN): ``transformers`` ``generate`` in
              left-padded batches of GEN_BATCH = 16 prompts, then TRL ``DPOTrainer`` with a live reference
              model on padded batches (model loads and dataset tokenisation counted in its stages).

Each side runs in its own subprocess, alternately (A B A B ...); the JSON gives each stage's median
seconds, the whole iteration's median and spread, and the ratio authors / ours with its range.
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stats  # noqa: E402
import spin_step  # noqa: E402  (shared sizes, data and the theta_0 preparation)

ROOT = Path(__file__).resolve().parents[1]
GEN_BATCH = 16  # prompts per generate() call, the SPIN repo's default batch for its generation script
PROMPTS = {"quick": 24, "large": 64}  # default --prompts


def _size(size: str, prompts: int) -> dict:
    """spin_step's size ``size`` with as many steps as ``prompts`` prompts fill (one pair per prompt)."""
    s = spin_step.SIZES[size]
    return dict(s, steps=prompts // s["batch"])


def _max_new(s: dict) -> int:
    return s["response"] + 1


def _prompts(work: Path):
    from spin_mcore.data.tokenize import TokenizedPrompt
    from spin_mcore.utils.shards import read_stage

    return [TokenizedPrompt(str(r["prompt_id"]), r["prompt_ids"], r["real_ids"]) for r in read_stage(work / "pairs")]


def run_ours(work: Path, size: str, prompts: int, tag: str, pack: bool = True, backend: str = "megatron") -> dict:
    """One iteration through spin_mcore.loop's stage functions; returns stage seconds from the timeline.

    backend: generation.backend, ``megatron`` (in-process engine) or ``vllm`` (vLLM-CPU in .venv-vllm).
    """
    from spin_mcore.config import load_config
    from spin_mcore.data.tokenizer import load_tokenizer
    from spin_mcore.loop import generate_and_score, generate_with_engine
    from spin_mcore.models.checkpoint import prestart_save_queue
    from spin_mcore.platform import init_distributed
    from spin_mcore.run_dir import RunDir
    from spin_mcore.timeline import Timeline
    from spin_mcore.training.resident import ResidentPolicy
    from spin_mcore.training.trainer import train

    s = _size(size, prompts)
    n = s["batch"] * s["steps"]
    cfg = load_config(overrides=spin_step._overrides(s) + [
        f"train.pack_sequences={str(pack).lower()}", f"generation.backend={backend}", f"generation.max_new_tokens={_max_new(s)}",
        "generation.temperature=1.0", "generation.top_k=0", "generation.top_p=1.0", f"generation.shard_size={n}",
        "train.epochs=1"])
    pstate = init_distributed(cfg.parallel, seed=0)
    run = RunDir(work / f"run_{tag}")
    run.root.mkdir(parents=True)
    theta = str(work / "theta0")
    tok = load_tokenizer(work / "tokenizer")
    prompts = _prompts(work)
    t0 = time.perf_counter()
    prestart_save_queue()  # as run_iteration
    timeline = Timeline(run.root, pstate)
    resident = ResidentPolicy(cfg, pstate, theta)
    if backend != "megatron":  # as run_iteration: the engine writes the generation stage, then scoring
        generate_with_engine(cfg, pstate, run, 0, theta, [("train", prompts)], tok, timeline, resident)
    ref_dir = generate_and_score(cfg, pstate, run, 0, theta, prompts, tok, "train", [], timeline, resident)
    with timeline.stage(0, "training"):
        train(cfg, pstate, [ref_dir], theta, run.train(0), iteration=0, load_model=resident.take)
    resident.release()
    whole = time.perf_counter() - t0
    stages: dict[str, float] = {}
    for line in (run.root / "timeline.jsonl").read_text().splitlines():
        rec = json.loads(line)
        name = "checkpoint_in_training" if rec["stage"] == "checkpoint" else rec["stage"]
        if name in ("export", "engine_start"):  # parts of generation with an external engine
            stages[name] = stages.get(name, 0.0) + rec["wall_s"]
            name = "generation"
        stages[name] = stages.get(name, 0.0) + rec["wall_s"]
    # training = the rest of the iteration's wall time: the trainer's final model save is timed apart from the
    # timeline's training span, and the authors' side counts its save_model in training too
    stages["training"] = whole - stages.get("generation", 0.0) - stages.get("reference", 0.0)
    pairs = [json.loads(x) for x in (run.train(0) / "metrics.jsonl").read_text().splitlines()]
    gen = sum(len(r["generated_ids"]) for r in _read_records(ref_dir))
    return {"seconds": whole, "stages": stages, "generated_tokens": gen, "train_steps": len(pairs),
            "first_loss": pairs[0]["loss"]}


def _read_records(stage_dir: Path) -> list[dict]:
    from spin_mcore.utils.shards import read_stage

    return list(read_stage(stage_dir))


def run_authors(work: Path, size: str, prompts: int, tag: str) -> dict:
    """transformers generate in left-padded batches, then TRL DPOTrainer (live reference) for one epoch."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    s = _size(size, prompts)
    prompts = _prompts(work)
    t0 = time.perf_counter()
    tok = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    model.eval()
    torch.manual_seed(0)
    generated: list[list[int]] = []
    with torch.no_grad():
        for i in range(0, len(prompts), GEN_BATCH):
            batch = [p.prompt_ids for p in prompts[i:i + GEN_BATCH]]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(b)) + b for b in batch])  # left padding, pad id 0
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=_max_new(s), eos_token_id=spin_step.EOS, pad_token_id=0)
            for row in out[:, width:].tolist():
                row = row[: row.index(spin_step.EOS) + 1] if spin_step.EOS in row else row
                generated.append(row)
    t_gen = time.perf_counter()
    del model
    rows = [{"prompt": spin_step._text(p.prompt_ids), "chosen": " " + spin_step._text(p.response_ids),
             "rejected": " " + spin_step._text(g)} for p, g in zip(prompts, generated)]
    policy = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    args = DPOConfig(output_dir=str(work / f"authors_{tag}"), per_device_train_batch_size=s["batch"],
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=spin_step.LR,
                     lr_scheduler_type="constant", beta=spin_step.BETA, loss_type=["sigmoid"], optim="rmsprop",
                     use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     max_length=s["prompt"] + s["response"] + 1, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     bf16=False, fp16=False)  # fp32 like ours (TRL's bf16 default is a scalar fallback on CPU)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(str(work / f"authors_{tag}" / "model"))  # the authors' script saves theta_{t+1}; ours does too
    t_end = time.perf_counter()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {"seconds": t_end - t0, "stages": {"generation": t_gen - t0, "reference": 0.0, "training": t_end - t_gen},
            "generated_tokens": sum(map(len, generated)), "train_steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None}


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _run_side(side: str, work: Path, size: str, prompts: int, threads: int, tag: str, pack: bool = True) -> dict:
    env = dict(os.environ, SPIN_MCORE_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--size", size, "--prompts", str(prompts),
           "--threads", str(threads), "--tag", tag] + ([] if pack else ["--no-pack"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"iteration side {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick size (default: large)")
    parser.add_argument("--size", default=None, choices=("quick", "large"))
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs per side (default 3 large, 2 quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts of the iteration, a multiple of the size's pairs per step (default 64 large, 24 quick)")
    parser.add_argument("--sides", default=None,
                        help="comma list of ours, ours_vllm, authors (default: all three; ours_vllm only where "
                             ".venv-vllm exists)")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--no-pack", dest="pack", action="store_false",
                        help="our reference pass and training padded per micro-batch (train.pack_sequences=false)")
    args = parser.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        if args.side == "prepare":
            spin_step.prepare(Path(args.work), args.size, "mixed", eos_mean=True,
                              steps=_size(args.size, args.prompts)["steps"])
            out = {}
        elif args.side in ("ours", "ours_vllm"):
            out = run_ours(Path(args.work), args.size, args.prompts, args.tag, args.pack,
                           "vllm" if args.side == "ours_vllm" else "megatron")
        else:
            out = run_authors(Path(args.work), args.size, args.prompts, args.tag)
        print("RESULT " + json.dumps(out))
        return
    import tempfile

    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick contradicts --size {args.size}")
    size = args.size or ("quick" if args.quick else "large")
    repeats = args.repeats or (3 if size == "large" else 2)
    args.prompts = args.prompts or PROMPTS[size]
    batch = spin_step.SIZES[size]["batch"]
    if args.prompts < batch or args.prompts % batch:
        parser.error(f"--prompts {args.prompts}: a positive multiple of {batch} (pairs per step at size {size})")
    known = ("ours", "ours_vllm", "authors")
    names = args.sides.split(",") if args.sides else list(known)
    if any(n not in known for n in names) or "authors" not in names or len(names) < 2:
        parser.error(f"--sides {args.sides}: a comma list of {', '.join(known)} with authors and one of ours")
    if "ours_vllm" in names and not VLLM_PYTHON.exists():
        print(f"ours_vllm left out: {VLLM_PYTHON} is missing (bash launch/setup_vllm.sh --device cpu)", flush=True)
        names.remove("ours_vllm")
    s = _size(size, args.prompts)
    if "ours_vllm" in names:
        from spin_mcore.config import load_config
        from spin_mcore.errors import ConfigError
        from spin_mcore.generation.external import check_engine_model

        try:  # vLLM's CPU attention takes a few head sizes only: --quick's 16 is not one of them
            check_engine_model("vllm", load_config(overrides=spin_step._overrides(s)).model, "cpu")
        except ConfigError as e:
            print(f"ours_vllm left out at size {size}: {e}", flush=True)
            names.remove("ours_vllm")
    machine = bench_stats.machine_info(args.threads)
    counter = iter(range(10**6))
    with tempfile.TemporaryDirectory(prefix="spin_iter_") as tmp:
        work = Path(tmp)
        _run_side("prepare", work, size, args.prompts, args.threads, "0")
        theta0 = json.loads((work / "theta0_eos.json").read_text())

        def side_fn(name):
            return lambda: _run_side(name, work, size, args.prompts, args.threads, str(next(counter)), args.pack)

        def show(name, r, res):
            st = "  ".join(f"{k} {v:.1f} s" for k, v in res["stages"].items())
            print(f"run {r + 1}/{repeats} {name:9s} {res['seconds']:7.1f} s  ({st})", flush=True)
        runs = bench_stats.alternate({n: side_fn(n) for n in names}, repeats, show)
    bench_stats.finish_machine_info(machine)
    stage_names = ("generation", "reference", "training")
    stage_seconds = {}
    for st in stage_names + ("export", "engine_start"):
        if any(st in r["stages"] for rs in runs.values() for r in rs):
            stage_seconds[st] = {side: round(statistics.median(r["stages"].get(st, 0.0) for r in rs), 2)
                                 for side, rs in runs.items()}
    ours_sides = [n for n in names if n != "authors"]
    ratios, biggest, saved = {}, {}, {}
    for side in ours_sides:
        whole = bench_stats.compare([r["seconds"] for r in runs["authors"]], [r["seconds"] for r in runs[side]])
        ratios[f"authors/{side}"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in whole.items()}
        saved[side] = {st: round(stage_seconds[st]["authors"] - stage_seconds[st][side], 2) for st in stage_names}
        biggest[side] = max(saved[side], key=saved[side].get)
    sides = {n: {"seconds_median": round(statistics.median(r["seconds"] for r in rs), 2),
                 "seconds_spread": round(bench_stats.summarize([r["seconds"] for r in rs])["spread"], 3),
                 "seconds_runs": [round(r["seconds"], 2) for r in rs],
                 "generated_tokens": rs[0]["generated_tokens"], "train_steps": rs[0]["train_steps"],
                 "step0_loss": rs[0]["first_loss"]} for n, rs in runs.items()}
    for st, row in stage_seconds.items():
        print(f"{st:12s} " + "   ".join(f"{side} {v:7.1f} s" for side, v in row.items()))
    for side in ours_sides:
        print(f"whole iteration: authors / {side} = {bench_stats.fmt_ratio(ratios['authors/' + side])}; "
              f"the stage that gives the most: {biggest[side]}")
    headline = "ours" if "ours" in ours_sides else ours_sides[0]
    summary = {"benchmark": "iteration", "size": size, "prompts": s["batch"] * s["steps"], "max_new_tokens": _max_new(s),
               "pairs_per_step": s["batch"], "repeats": repeats, "ours_packed_training": args.pack,
               "threads": args.threads, "theta0_stops_at_eos": theta0, "headline_side": headline, "sides": sides, "stage_seconds": stage_seconds,
               "ratios": ratios, "stage_giving_most": biggest[headline], "stage_giving_most_by_side": biggest,
               "seconds_saved_by_stage": saved[headline], "seconds_saved_by_stage_by_side": saved,
               "target_2x_met": ratios[f"authors/{headline}"]["ratio"] >= 2.0, "machine": machine}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
