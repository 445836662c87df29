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


def _export_rank(config_path, overrides: list, checkpoint: str, hf_dir: str, tokenizer_dir) -> str:
    """Rank worker: the iterate exported to HF at the config's layout (TP/PP over every rank), in bf16
    where the config trains with FP8 params (an FP8 export would be the iterate rounded to FP8)."""
    import dataclasses

    from spin_mcore.config import load_config
    from spin_mcore.loop import load_policy
    from spin_mcore.models.checkpoint import model_config_from_meta, read_checkpoint_meta
    from spin_mcore.models.fp8 import without_fp8_params
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.platform import init_distributed

    cfg = load_config(config_path, overrides)
    cfg = dataclasses.replace(cfg, model=model_config_from_meta(read_checkpoint_meta(checkpoint)),
                              precision=without_fp8_params(cfg.precision))
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    model = load_policy(cfg, pstate, checkpoint)
    return str(export_hf(model, pstate, hf_dir, cfg.model, tokenizer_dir=tokenizer_dir))


def _harness_vllm(cfg, hf_dir: str, calls: list, include_path, out: Path) -> dict:
    """lm-eval's vLLM backend in the vLLM environment (:mod:`spin_mcore.eval.harness_worker`); its results."""
    import dataclasses
    import subprocess

    from spin_mcore.generation.external import CHECKOUT, engine_env, engine_python
    from spin_mcore.launcher import WorkerError
    from spin_mcore.platform.distributed import select_device
    from spin_mcore.utils.io import atomic_write_json, read_json
    from spin_mcore.utils.procs import run_in_own_session

    gen = dataclasses.replace(cfg.generation, backend="vllm")
    python = engine_python(gen)  # ConfigError naming launch/setup_vllm.sh when it is missing
    job, result, log = out / "harness_job.json", out / "harness_results.json", out / "harness_worker.log"
    result.unlink(missing_ok=True)
    from spin_mcore.eval.harness import harness_job

    atomic_write_json(job, harness_job(calls, result, include_path))
    env = engine_env(gen, select_device(cfg.platform.device), python=python)
    if env.get("HF_HUB_OFFLINE") == "1":  # local task files: datasets must not try the hub either
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    with log.open("ab") as fh:
        rc = run_in_own_session([str(python), "-m", "spin_mcore.eval.harness_worker", str(job)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=str(CHECKOUT))
    got = read_json(result)
    if rc != 0 or got is None:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise WorkerError(f"lm-eval (vLLM backend) exited with {rc} (log {log}):\n{tail}")
    return got


def run(args) -> int:
    from spin_mcore.config import load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.launcher import launch_rank, launched, run_local
    from spin_mcore.platform.distributed import select_device
    from spin_mcore.utils.io import atomic_write_json

    args.log_dir = args.out  # cli.main writes a rank's traceback there
    if args.harness:
        from spin_mcore.eval.harness import harness_calls, leaderboard_row, local_tasks, run_harness, select_tasks

        names = args.tasks.split(",") if args.tasks else None
        if args.include_path:  # tasks defined by YAML files there, reported under their own names
            if not names:
                raise ValueError("--include-path needs --tasks naming the tasks defined there")
            tasks = local_tasks(names)
        else:
            tasks = select_tasks(names)
        config_path, overrides = split_config_and_overrides(args)
        cfg = load_config(config_path, overrides)
        device = select_device(cfg.platform.device)
        hf_dir = args.hf or str(Path(args.out) / "hf")
        if args.backend == "vllm":
            from spin_mcore.generation.external import check_engine_model
            from spin_mcore.models.checkpoint import model_config_from_meta, read_checkpoint_meta

            check_engine_model("vllm", model_config_from_meta(read_checkpoint_meta(args.checkpoint)), device)
        tokenizer = args.tokenizer or (cfg.data.tokenizer if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir()
                                       else None)
        if not args.hf:
            call = (config_path, overrides, args.checkpoint, hf_dir, tokenizer)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            _export_rank(*call) if launched() else run_local(_export_rank, cfg.run.nproc, *call)
        if launch_rank() != 0:  # under srun every rank exported its part; rank 0 evaluates
            return 0
        dtype = "float32" if device != "cuda" else "bfloat16"
        if args.backend == "vllm":
            calls = harness_calls(hf_dir, tasks, batch_size=args.batch_size, dtype=dtype, limit=args.limit,
                                  backend="vllm", tensor_parallel=cfg.generation.engine_tensor_parallel,
                                  data_parallel=args.data_parallel, max_model_len=cfg.model.seq_length,
                                  log_samples=args.log_samples)
            got = _harness_vllm(cfg, hf_dir, calls, args.include_path, Path(args.out))
            row = leaderboard_row(got["results"], tasks)
            if args.log_samples:
                row = {"scores": row, "samples": got["samples"]}
        else:
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
    p.add_argument("--device", default="cuda", help="harness device (--backend hf)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="vllm (default): lm-eval's vLLM backend in .venv-vllm, the model sharded over "
                        "generation.engine_tensor_parallel GPUs and replicated --data-parallel times; hf: "
                        "transformers in this process on --device (small models only)")
    p.add_argument("--data-parallel", type=int, default=1, help="vLLM replicas of the model (--backend vllm)")
    p.add_argument("--tokenizer", help="HF tokenizer directory copied into the export (lm-eval tokenizes text; "
                                       "default: data.tokenizer when it is a directory)")
    p.add_argument("--include-path", help="a folder of lm-eval YAML task files (local tasks); --tasks names them")
    p.add_argument("--log-samples", action="store_true",
                   help="also write each request's log-likelihood to eval.json (--backend vllm)")
    p.add_argument("--limit", type=int, default=None, help="harness: examples per task (for smoke runs)")
    p.set_defaults(func=run)
