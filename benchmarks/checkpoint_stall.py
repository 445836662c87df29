"""Training stall per train_state save, synchronous vs asynchronous (Megatron async save), on 2 ranks (DP=2).

    python benchmarks/checkpoint_stall.py [--quick] [--threads 1]

For each model size, the same run (``train.save_interval=3``) with ``train.async_save=false`` and
``=true``. The stall is the time rank 0's training loop spends inside the checkpoint writer (starting
a save, polling it, waiting for the previous one, and the wait before the final model save), divided
by the number of saves. The run's wall time is printed too: on a CPU the forked writer competes with
training for the same cores, so less stall does not mean the whole of the write is free there (on a
GPU node the writer uses host cores the training step leaves idle). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {
    "tiny": ["model.preset=tiny", "model.seq_length=32"],
    # ~27M parameters: a train_state (bf16-free fp32 model + main params + RMSProp square_avg) of ~0.3 GB.
    "larger": ["model.preset=tiny", "model.hidden_size=512", "model.ffn_hidden_size=1408", "model.num_layers=8",
               "model.num_attention_heads=8", "model.num_query_groups=4", "model.vocab_size=8192",
               "model.seq_length=32"],
}
COMMON = ["run.nproc=2", "train.micro_batch_size=1", "train.global_batch_size=4", "train.lr=[0.0001]",
          "train.warmup_fraction=0.0", "train.save_interval=3", "train.keep_checkpoints=2"]


def _worker(work: str, size: str, async_save: bool, steps: int) -> dict:
    """One training run on this rank; rank 0's time inside the checkpoint writer, per save."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.training import trainer
    from spin_mcore.training.train_checkpoint import CheckpointWriter

    work = Path(work)
    cfg = load_config(overrides=SIZES[size] + COMMON + [f"train.max_steps={steps}",
                                                        f"train.async_save={str(async_save).lower()}"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    data = work / "ref"
    if pstate.rank == 0 and not data.exists():
        from tests.helpers import random_pair_records, write_pair_stage

        vocab = cfg.model.vocab_size
        write_pair_stage(data, [dict(r, ref_logp_real=-3.0, ref_logp_generated=-3.0)
                                for r in random_pair_records(4 * steps, vocab=min(vocab, 500))])
    dist.barrier()
    spent = {"save": 0.0, "poll": 0.0, "finish": 0.0, "saves": 0}
    for name in ("save", "poll", "finish"):
        real = getattr(CheckpointWriter, name)

        def timed(self, *a, _real=real, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _real(self, *a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0
                spent["saves"] += _name == "save"

        setattr(CheckpointWriter, name, timed)
    out = work / f"{size}-{'async' if async_save else 'sync'}"
    t0 = time.perf_counter()
    trainer.train(cfg, pstate, [data], None, out)
    spent["train_seconds"] = time.perf_counter() - t0
    state = sorted((out / "train_state").glob("step_*"))
    spent["state_mb"] = round(sum(f.stat().st_size for d in state[-1:] for f in d.rglob("*") if f.is_file()) / 1e6, 1)
    return spent


def measure(work: Path, size: str, async_save: bool, steps: int, threads: int) -> dict:
    from spin_mcore.launcher import run_local

    r = run_local(_worker, 2, str(work), size, async_save, steps, threads=threads)[0]
    stall = r["save"] + r["poll"] + r["finish"]
    return {"size": size, "mode": "async" if async_save else "sync", "saves": r["saves"],
            "stall_per_save_s": round(stall / max(r["saves"], 1), 3), "save_call_s": round(r["save"] / max(r["saves"], 1), 3),
            "wait_s": round(r["poll"] + r["finish"], 3), "train_seconds": round(r["train_seconds"], 2),
            "state_mb": r["state_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny size only, 7 steps (CI smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    sizes = ["tiny"] if args.quick else ["tiny", "larger"]
    steps = 7 if args.quick else 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for async_save in (False, True):
                row = measure(Path(tmp) / size, size, async_save, steps, args.threads)
                print(f"{size:7s} {row['mode']:5s}: {row['saves']} saves of {row['state_mb']} MB, stall/save "
                      f"{row['stall_per_save_s']:.3f} s (start {row['save_call_s']:.3f} s), train {row['train_seconds']} s",
                      flush=True)
                rows.append(row)
    ratios = {s: round(next(r for r in rows if r["size"] == s and r["mode"] == "sync")["stall_per_save_s"]
                       / max(next(r for r in rows if r["size"] == s and r["mode"] == "async")["stall_per_save_s"], 1e-6), 2)
              for s in sizes}
    print(json.dumps({"rows": rows, "sync_over_async_stall": ratios}))


if __name__ == "__main__":
    main()
