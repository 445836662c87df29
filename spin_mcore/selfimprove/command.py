"""The CLI body shared by ``spin-mcore restem|rpo|star CONFIG [key=value ...]``.

Same contract as ``spin-mcore run``: the config (and the verifier: ``verify.kind``) is checked
before any process starts, re-running the same command resumes (complete iterations are skipped,
the interrupted stage resumes from its manifest or last checkpoint), and a run directory made
with another config is refused without --force.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

# command name -> (module, loop function)
LOOPS = {"restem": ("spin_mcore.selfimprove.restem", "run_restem"),
         "rpo": ("spin_mcore.selfimprove.rpo", "run_rpo"),
         "star": ("spin_mcore.selfimprove.star", "run_star")}


def run_rank(name: str, config_path, overrides: list, force: bool) -> list:
    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed

    cfg = load_config(config_path, overrides)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    module, fn = LOOPS[name]
    return getattr(importlib.import_module(module), fn)(cfg, pstate, force=force)


def run_command(name: str, args) -> int:
    from spin_mcore.commands.common import split_config_and_overrides
    from spin_mcore.config import ConfigError, load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.generation.external import preflight
    from spin_mcore.launcher import launch_rank, launched, run_local
    from spin_mcore.platform.distributed import select_device
    from spin_mcore.selfimprove.verifiers import build_verifier

    config_path, overrides = split_config_and_overrides(args)
    cfg = load_config(config_path, overrides)  # validate before any process starts
    build_verifier(cfg.verify)  # a verifier that cannot be imported or configured fails here
    if name == "rpo":
        from spin_mcore.selfimprove.rpo import rpo_config

        rpo_config(cfg)
    preflight(cfg, select_device(cfg.platform.device))  # generation.backend=vllm|trtllm can run here
    check_data(cfg)
    if cfg.run.init_checkpoint is None:
        raise ValueError(f"run.init_checkpoint is not set: {name} starts from a model (theta_0, an mcore checkpoint)")
    if not Path(cfg.run.init_checkpoint).exists():
        raise FileNotFoundError(f"run.init_checkpoint={cfg.run.init_checkpoint}: no such directory")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp={cfg.parallel.pp}: {name} samples with the in-process engine, which needs "
                          "parallel.pp=1")
    for field in ("path", "tokenizer"):
        if getattr(cfg.data, field) is None:
            raise ValueError(f"data.{field} is not set")
    call = (name, config_path, overrides, args.force)
    args.log_dir = cfg.run.dir
    rows = run_rank(*call) if launched() else run_local(run_rank, cfg.run.nproc, *call)[0]
    if launch_rank() == 0:
        print(json.dumps(rows, default=str))
    return 0


def register_command(sub, name: str, help: str, doc: str) -> None:
    from spin_mcore.commands.common import add_config_args

    p = sub.add_parser(name, help=help, description=doc)
    add_config_args(p, required=False)
    p.add_argument("--force", action="store_true", help="reuse run.dir even if it was made with another config")
    p.set_defaults(func=lambda args: run_command(name, args), preemptible=True)
