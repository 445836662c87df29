"""The trainer's data loaders side by side: DALI over the token store vs the torch path over JSON shards.

    python benchmarks/loader.py [--quick | --size quick|large] [--threads 2]

One reference stage of random SPIN pairs (prompt, y, y', both reference log-probs) is written
once, through the same ``ShardedStage.write_shard`` the pipeline uses (JSON shard + token store).
Then, for each loader (``data.loader=dali`` and ``torch``):

    open_s          what a rank does before its first step: torch parses every JSON record,
                    DALI reads the manifests (no record);
    batches_per_s   optimizer-step batches (``pairs_per_step`` pairs, collated into the padded
                    micro-batches ``train()`` runs) per second, the loader alone, DP 1;
    step_s          the median wall time of a real ``train()`` step on the size's model (hidden 512,
                    8 layers, seq 512 at ``large``; warm-up steps dropped), the loader included;
    loader_share    the loader's seconds per step inside that same run (``step_examples`` + collate,
                    timed by wrapping them) over ``step_s``. The goal is under 1%.

Sizes: ``large`` = 50k pairs at seq 512 (the issue's size; several minutes on 2 cores: writing the
stage and the torch path's JSON parse dominate), ``quick`` = 2k pairs at seq 128 on the tiny model
(under 3 minutes). The last line of output is JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "quick": dict(pairs=2000, seq=128, hidden=64, ffn=176, layers=2, heads=4, groups=2, vocab=512, batch=4,
                  loader_steps=200, train_steps=10, warmup=3, shard=500),
    "large": dict(pairs=50000, seq=512, hidden=512, ffn=1408, layers=8, heads=8, groups=4, vocab=8192, batch=4,
                  loader_steps=500, train_steps=4, warmup=1, shard=1000),
}


def _overrides(s: dict, loader: str, steps: int) -> list[str]:
    return [f"model.num_layers={s['layers']}", f"model.hidden_size={s['hidden']}", f"model.ffn_hidden_size={s['ffn']}",
            f"model.num_attention_heads={s['heads']}", f"model.num_query_groups={s['groups']}",
            f"model.vocab_size={s['vocab']}", f"model.seq_length={s['seq']}", "train.optimizer=rmsprop",
            f"train.global_batch_size={s['batch']}", f"train.micro_batch_size={s['batch']}", f"train.max_steps={steps}",
            "train.lr=[0.000001]", "train.warmup_fraction=0.0", "spin.beta=[0.1]", "train.save_interval=1000000",
            "parallel.distributed_optimizer=false", f"data.loader={loader}"]


def write_stage(path: Path, s: dict, seed: int = 0) -> dict:
    """A complete reference stage of ``s['pairs']`` random pairs whose rows fit ``s['seq']``; its sizes and time."""
    from spin_mcore.utils.shards import ShardedStage

    import numpy as np

    rng = random.Random(seed)
    ids_rng = np.random.default_rng(seed)
    seq, vocab = s["seq"], s["vocab"]
    start = time.perf_counter()
    stage = ShardedStage(path, "reference", "bench")
    batch: list[dict] = []
    for i in range(s["pairs"]):
        prompt = rng.randint(seq // 8, seq // 2)
        ids = ids_rng.integers(3, vocab, prompt + 2 * (seq - prompt)).tolist()
        real, gen = rng.randint(seq // 8, seq - prompt), rng.randint(seq // 8, seq - prompt)
        batch.append({"prompt_id": i, "prompt_ids": ids[:prompt], "real_ids": ids[prompt:prompt + real],
                      "generated_ids": ids[seq:seq + gen], "ref_logp_real": -rng.uniform(50, 900),
                      "ref_logp_generated": -rng.uniform(50, 900)})
        if len(batch) == s["shard"]:
            stage.write_shard(i // s["shard"], batch)
            batch = []
    if batch:
        stage.write_shard(s["pairs"] // s["shard"], batch)
    stage.finalize()
    seconds = time.perf_counter() - start
    json_bytes = sum(p.stat().st_size for p in path.glob("shard-*.jsonl"))
    store_bytes = sum(p.stat().st_size for p in path.glob("tokens-*/*.npy"))
    return {"write_s": round(seconds, 2), "json_mb": round(json_bytes / 2**20, 1), "store_mb": round(store_bytes / 2**20, 1)}


def loader_alone(stage: Path, s: dict, loader: str) -> dict:
    """open_s and batches/s of one loader, DP 1 (no model)."""
    from types import SimpleNamespace

    import torch

    from spin_mcore.training.batches import collate, make_plan, open_training_data, step_microbatches
    from spin_mcore.training.loader import open_steps

    start = time.perf_counter()
    data = open_training_data(loader, [stage], "spin")
    open_s = time.perf_counter() - start
    plan, total = make_plan(data.n_items, 1, 1234, s["batch"], s["batch"], 1)
    steps = min(s["loader_steps"], total)
    reader = open_steps(data, plan, total, SimpleNamespace(dp_rank=0, dp=1, device=torch.device("cpu")))
    reader.step_examples(0)  # the first batch includes the pipeline's start
    start = time.perf_counter()
    for step in range(1, steps):
        for group in step_microbatches(reader.step_examples(step), s["batch"]):
            collate(group, s["seq"], "spin", multiple=16)
    seconds = time.perf_counter() - start
    reader.close()
    return {"open_s": round(open_s, 3), "batches_per_s": round((steps - 1) / seconds, 1),
            "pairs_per_s": round((steps - 1) * s["batch"] / seconds, 1)}


def in_training(stage: Path, work: Path, s: dict, loader: str, steps: int = 0) -> dict:
    """Median train() step and the loader's seconds per step inside the same run."""
    import spin_mcore.training.batches as batches
    import spin_mcore.training.loader as loaders
    import spin_mcore.training.trainer as trainer
    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed

    spent: list[float] = []

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)
        return wrapper

    cfg = load_config(overrides=_overrides(s, loader, steps or s["train_steps"]))
    pstate = init_distributed(cfg.parallel, seed=0)
    originals = (loaders.DaliSteps.step_examples, loaders.TorchSteps.step_examples, trainer.collate)
    loaders.DaliSteps.step_examples = timed(originals[0])
    loaders.TorchSteps.step_examples = timed(originals[1])
    trainer.collate = timed(batches.collate)  # the padded micro-batches of a step: ours, part of the loader
    try:
        out = work / f"train_{loader}"
        trainer.train(cfg, pstate, [stage], None, out)
    finally:
        loaders.DaliSteps.step_examples, loaders.TorchSteps.step_examples, trainer.collate = originals
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["step_seconds"] for r in rows[min(s["warmup"], len(rows) - 1):])
    per_step = sum(spent) / len(rows)  # one step_examples + its collates per step
    return {"step_s": round(step_s, 4), "loader_s_per_step": round(per_step, 6),
            "loader_share": round(per_step / step_s, 6), "first_loss": rows[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k pairs, seq 128, tiny model (< 3 min)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: large (50k pairs, seq 512)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick contradicts --size {args.size}")
    size = args.size or ("quick" if args.quick else "large")
    s = SIZES[size]

    import torch

    torch.set_num_threads(args.threads)
    from spin_mcore.data.dali_loader import dali_import_error

    if dali_import_error() is not None:
        sys.exit(f"benchmarks/loader.py: NVIDIA DALI does not import ({dali_import_error()}); run launch/setup_local.sh")
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        work = Path(tmp)
        stage_info = write_stage(work / "ref", s)
        print(f"stage: {s['pairs']} pairs, seq {s['seq']}: written in {stage_info['write_s']} s "
              f"(JSON {stage_info['json_mb']} MB, token store {stage_info['store_mb']} MB)", flush=True)
        # One throwaway run first: the first train() of a process pays one-off costs (imports, allocator
        # growth) that would land on whichever loader ran first.
        in_training(work / "ref", work / "warmup", s, "torch", steps=2)
        res = {}
        for loader in ("dali", "torch"):
            res[loader] = loader_alone(work / "ref", s, loader)
            res[loader].update(in_training(work / "ref", work, s, loader))
            r = res[loader]
            print(f"{loader:5s}  open {r['open_s']:8.3f} s  {r['batches_per_s']:8.1f} batches/s  "
                  f"step {r['step_s'] * 1e3:9.1f} ms  loader {r['loader_s_per_step'] * 1e3:7.2f} ms/step  "
                  f"share {100 * r['loader_share']:.3f}%", flush=True)
    assert res["dali"]["first_loss"] == res["torch"]["first_loss"], "the loaders fed different first batches"
    print(json.dumps({
        "size": size, "pairs": s["pairs"], "seq_len": s["seq"], "pairs_per_step": s["batch"], "threads": args.threads,
        "model": {k: s[k] for k in ("hidden", "layers", "vocab")}, "stage": stage_info,
        **{f"{name}_{k}": v for name, r in res.items() for k, v in r.items() if k != "first_loss"},
        "loader_share_goal": 0.01,
        "both_under_goal": all(r["loader_share"] < 0.01 for r in res.values()),
    }))


if __name__ == "__main__":
    main()
