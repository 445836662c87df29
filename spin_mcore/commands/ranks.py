"""``spin-mcore ranks [CONFIG] [key=value ...] [--json] [-- CMD ...]``: the dry run of a SLURM launch.

Reads the allocation from the batch shell's environment (``SLURM_JOB_NODELIST``,
``SLURM_JOB_ID``, ``SLURM_TASKS_PER_NODE``, ``SLURM_NTASKS``), loads the config for
parallel.tp/pp/cp, and prints for every rank the host it lands on, the environment it will
get under ``srun`` (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, then the job-wide
CUDA_DEVICE_MAX_CONNECTIONS / NCCL_* / TORCH_NCCL_* / NVTE_* variables srun passes on), its place in
Megatron's grid (TP/PP/CP/DP rank) and the command it runs (CMD, default ``spin-mcore run
CONFIG key=value ...``). Nothing is started. The values come from the same functions the
ranks call (spin_mcore/platform/slurm.py), so the dry run cannot disagree with the real run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import warnings

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
GRID_KEYS = ("tp_rank", "pp_rank", "cp_rank", "dp_rank")


def split_rest(rest: list[str]) -> tuple[list[str], bool, list[str]]:
    """``[CONFIG] [key=value ...] [--json] [-- CMD ...]`` -> (config args, json flag, command)."""
    if "--" in rest:
        cut = rest.index("--")
        head, command = rest[:cut], rest[cut + 1:]
    else:
        head, command = rest, []
    as_json = "--json" in head
    head = [a for a in head if a != "--json"]
    unknown = [a for a in head if a.startswith("-")]
    if unknown:
        raise ValueError(f"ranks: unknown option {unknown[0]!r} (CMD options go after '--')")
    return head, as_json, command


def run(args) -> int:
    import os

    from spin_mcore.commands.common import split_config_and_overrides
    from spin_mcore.config import load_config

    head, as_json, command = split_rest(args.rest)
    as_json = as_json or args.json
    config_path, overrides = split_config_and_overrides(argparse.Namespace(config=head[0] if head else None,
                                                                           overrides=head[1:]))
    if not any(k in os.environ for k in ("SLURM_JOB_NODELIST", "SLURM_NODELIST")):
        raise ValueError("SLURM_JOB_NODELIST is not set: run inside an allocation (sbatch/salloc), "
                         "or set SLURM_JOB_NODELIST, SLURM_JOB_ID, SLURM_NTASKS and SLURM_TASKS_PER_NODE")
    cfg = load_config(config_path, overrides)
    if not command:
        command = ["spin-mcore", "run"] + ([config_path] if config_path else []) + overrides

    with warnings.catch_warnings():  # Megatron's import warns about missing GPU extras; not news here
        warnings.simplefilter("ignore")
        from spin_mcore.platform.slurm import launch_environment, plan_ranks

        plan = plan_ranks(os.environ, cfg.parallel)
    shared_env = launch_environment(os.environ)
    p = cfg.parallel
    world = len(plan)
    dp = world // (p.tp * p.pp * p.cp)
    hosts = list(dict.fromkeys(r["host"] for r in plan))  # in node order
    if as_json:
        print(json.dumps({
            "job_id": os.environ.get("SLURM_JOB_ID"), "world_size": world, "hosts": hosts,
            "master_addr": plan[0]["MASTER_ADDR"], "master_port": int(plan[0]["MASTER_PORT"]),
            "parallel": {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": dp},
            "command": command,
            "ranks": [{"host": r["host"], "env": {**{k: r[k] for k in ENV_KEYS}, **shared_env},
                       **{k: r[k] for k in GRID_KEYS}}
                      for r in plan],
        }))
        return 0
    print(f"# SLURM job {os.environ.get('SLURM_JOB_ID', '?')}: {world} ranks on {len(hosts)} node(s) "
          f"({','.join(hosts)}); tp={p.tp} pp={p.pp} cp={p.cp} dp={dp}")
    print("# per rank: host, the environment srun gives it, its Megatron grid position, then its command")
    cmd = shlex.join(command)
    for r in plan:
        env = " ".join([f"{k}={r[k]}" for k in ENV_KEYS] + [f"{k}={shlex.quote(v)}" for k, v in shared_env.items()])
        grid = " ".join(f"{k.split('_')[0].upper()}={r[k]}" for k in GRID_KEYS)
        print(f"{r['host']}: {env}  [{grid}]  {cmd}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ranks", help="dry run of a SLURM launch: every rank's host, environment, grid place, command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one line per rank")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG] [key=value ...] [-- CMD ...]",
                   help="config file and overrides (for parallel.tp/pp/cp), then after '--' the command each rank runs")
    p.set_defaults(func=run)
