"""``spin-mcore run CONFIG [key=value ...]``: the whole SPIN loop (generate, score, train, evaluate) x T.

Re-running the same command resumes: complete stages are skipped, the interrupted one resumes
from its manifest or last checkpoint. A run directory made with a different config is refused
unless --force is given.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from spin_mcore.commands.common import add_config_args, split_config_and_overrides


def run_rank(config_path, overrides: list, force: bool) -> list:
    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.config import load_config
    from spin_mcore.loop import run_spin
    from spin_mcore.platform import init_distributed

    cfg = load_config(config_path, overrides)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    return run_spin(cfg, pstate, force=force)


def run(args) -> int:
    from spin_mcore.config import ConfigError, load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.generation.external import preflight
    from spin_mcore.launcher import launch_rank, launched, run_local
    from spin_mcore.platform.distributed import select_device

    config_path, overrides = split_config_and_overrides(args)
    cfg = load_config(config_path, overrides)  # validate before any process starts
    device = select_device(cfg.platform.device)  # platform.device=cuda without CUDA: one clear error, no process started
    preflight(cfg, device)  # generation.backend=vllm|trtllm: runs here, its environment exists
    check_data(cfg)  # data file, split sizes, tokenizer vs model.vocab_size: also before any process
    if cfg.run.init_checkpoint is None:
        raise ValueError("run.init_checkpoint is not set: SPIN starts from an SFT model (theta_0)")
    if not Path(cfg.run.init_checkpoint).exists():
        raise FileNotFoundError(f"run.init_checkpoint={cfg.run.init_checkpoint}: no such directory")
    if cfg.parallel.pp > 1 and cfg.generation.backend == "megatron":
        raise ConfigError(f"parallel.pp={cfg.parallel.pp}: the loop generates with the in-process engine "
                          "(generation.backend=megatron), which needs parallel.pp=1; use pp=1 for spin-mcore run "
                          "(spin-mcore train accepts pp > 1)")
    for field in ("path", "tokenizer"):
        if getattr(cfg.data, field) is None:
            raise ValueError(f"data.{field} is not set")
    call = (config_path, overrides, args.force)
    args.log_dir = cfg.run.dir  # cli.main writes a rank's traceback there
    rows = run_rank(*call) if launched() else run_local(run_rank, cfg.run.nproc, *call)[0]
    if launch_rank() == 0:  # under srun every rank gets here: print once
        print(json.dumps(rows, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole SPIN loop for run.iterations iterations (resumable)",
                       description=__doc__)
    add_config_args(p, required=False)
    p.add_argument("--force", action="store_true", help="reuse run.dir even if it was made with another config")
    p.set_defaults(func=run, preemptible=True)  # SIGUSR1/SIGTERM: save, exit 75 (platform/preemption.py)
