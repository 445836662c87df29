"""``spin-mcore eval``: evaluate an iterate, built in (held-out NLL, pair accuracy, verifiable accuracy) or with
lm-evaluation-harness on its HF export with the paper's leaderboard settings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from spin_mcore.commands.common import add_config_args, split_config_and_overrides


def eval_rank(config_path, overrides: list, checkpoint: str, pairs, reference, out: str) -> dict:
    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.config import load_config
    from spin_mcore.loop import evaluate, prepare
    from spin_mcore.platform import init_distributed
    from spin_mcore.utils.shards import read_stage

    cfg = load_config(config_path, overrides)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    data = prepare(cfg, pstate)
    ref = list(read_stage(reference)) if reference else None
    return evaluate(cfg, pstate, data, checkpoint, Path(pairs), ref, Path(out))


def _export_rank(checkpoint: str, hf_dir: str) -> str:
    from spin_mcore.config import ParallelConfig
    from spin_mcore.models.checkpoint import load_model_checkpoint, model_config_from_meta, read_checkpoint_meta
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.config import PrecisionConfig
    from spin_mcore.platform import init_distributed

    pstate = init_distributed(ParallelConfig())
    model_cfg = model_config_from_meta(read_checkpoint_meta(checkpoint))
    model = build_gpt_model(model_cfg, pstate, PrecisionConfig(), perform_initialization=False)  # loaded next
    load_model_checkpoint(model, pstate, checkpoint)
    return str(export_hf(model, pstate, hf_dir, model_cfg))


def run(args) -> int:
    from spin_mcore.config import load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.launcher import launched, run_local
    from spin_mcore.platform.distributed import select_device
    from spin_mcore.utils.io import atomic_write_json

    args.log_dir = args.out  # cli.main writes a rank's traceback there
    if args.harness:
        from spin_mcore.eval.harness import run_harness, select_tasks

        tasks = select_tasks(args.tasks.split(",") if args.tasks else None)
        hf_dir = args.hf or str(Path(args.out) / "hf")
        if not args.hf:
            run_local(_export_rank, 1, args.checkpoint, hf_dir)
        row = run_harness(hf_dir, tasks, batch_size=args.batch_size, device=args.device, limit=args.limit)
    else:
        if not args.pairs:
            raise ValueError("--pairs is required for the built-in evaluation (a held-out generation stage directory)")
        config_path, overrides = split_config_and_overrides(args)
        cfg = load_config(config_path, overrides)
        check_data(cfg)  # data file, split sizes, tokenizer vs model.vocab_size: before any process starts
        select_device(cfg.platform.device)  # platform.device=cuda without CUDA: one clear error, no process started
        call = (config_path, overrides, args.checkpoint, args.pairs, args.reference, args.out)
        row = eval_rank(*call) if launched() else run_local(eval_rank, cfg.run.nproc, *call)[0]
    atomic_write_json(Path(args.out) / "eval.json", row)
    print(json.dumps(row, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: built-in metrics, or lm-evaluation-harness (--harness)",
                       description=__doc__)
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="mcore model checkpoint to evaluate")
    p.add_argument("--out", required=True, help="directory for eval.json (and scratch scores)")
    p.add_argument("--pairs", help="held-out generation stage dir (y' of theta_t) for NLL and pair accuracy")
    p.add_argument("--reference", help="theta_t's reference-pass dir of the same pairs, for pair accuracy/margin")
    p.add_argument("--harness", action="store_true", help="run lm-evaluation-harness on the HF export instead")
    p.add_argument("--hf", help="an existing HF export to evaluate with --harness (default: export --checkpoint)")
    p.add_argument("--tasks", help="comma-separated leaderboard columns (default: all six of the paper)")
    p.add_argument("--batch-size", default="auto", help="harness batch size")
    p.add_argument("--device", default="cuda", help="harness device")
    p.add_argument("--limit", type=int, default=None, help="harness: examples per task (for smoke runs)")
    p.set_defaults(func=run)
