"""How the ranks of one job leave it: together after a preemption, with one copy of each warning, and
with a checkpoint's common state equal on every rank.

* ``srun --kill-on-bad-exit=1`` kills the step's other tasks as soon as one exits non-zero; the
  requeue status 75 counts. A rank that left a preempted job before rank 0 finished its
  clean-up (publishing a checkpoint, flushing metrics) had rank 0 killed mid-write. Checked
  under a real ``srun`` (the one-node cluster of ``launch/local_slurm.sh``, as in test_slurm.py).
* Every ``srun`` task is its own process, so each torch / Megatron FutureWarning printed once
  per rank; only rank 0 prints them now.
* The trainer's loop state (with per-rank step timings) went into Megatron's common state
  dict, and ``dist_checkpointing`` warned on every save that rank 1's differed from rank 0's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from tests.helpers import random_pair_records, write_pair_stage
from tests.test_slurm import slurm_env  # noqa: F401  (a fixture: the same one-node cluster)

ROOT = Path(__file__).resolve().parent.parent

# A stand-in subcommand run through the real ``spin_mcore.cli.main``: the CLI's exit path is what
# is tested, not a stage. Its body is given per test.
_CLI_SCRIPT = """
import argparse, os, sys, time, warnings
sys.path.insert(0, {root!r})
import spin_mcore.cli as cli
from spin_mcore.platform import preemption

def body(args):
{body}

def build_parser():
    parser = argparse.ArgumentParser(prog="spin-mcore")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("fake").set_defaults(func=body, preemptible=True)
    return parser

cli.build_parser = build_parser
sys.exit(cli.main(["fake"]))
"""


def _cli_script(path: Path, body: str) -> Path:
    path.write_text(_CLI_SCRIPT.format(root=str(ROOT), body=textwrap.indent(textwrap.dedent(body), "    ")))
    return path


# ----------------------------------------------------------------------------- warnings once per job


_WARN_BODY = """
import warnings
for _ in range(3):  # one place: Python shows it once per process
    warnings.warn("library deprecation", FutureWarning)
warnings.warn_explicit("megatron fallback", UserWarning, "layers.py", 1, module="megatron.core.layers")
warnings.warn("spin_mcore's own warning", UserWarning)
return 0
"""


def _run_as_task(script: Path, procid: int, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``script`` with the environment of task ``procid`` of a 2-task srun step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "SPIN_MCORE_SHOW"))}
    env.update(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID=str(procid), SLURM_NTASKS="2", **(extra_env or {}))
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)


def test_library_warnings_are_printed_by_rank_0_only(tmp_path):
    script = _cli_script(tmp_path / "warn.py", _WARN_BODY)
    rank0, rank1 = _run_as_task(script, 0), _run_as_task(script, 1)
    assert rank0.returncode == 0 and rank1.returncode == 0, rank0.stderr + rank1.stderr
    assert rank0.stderr.count("FutureWarning: library deprecation") == 1
    assert rank0.stderr.count("megatron fallback") == 1
    assert "library deprecation" not in rank1.stderr and "megatron fallback" not in rank1.stderr
    # A warning of this project's own code can be about the rank itself: every rank keeps it.
    own = "UserWarning: spin_mcore's own warning"
    assert rank0.stderr.count(own) == rank1.stderr.count(own) == 1
    shown = _run_as_task(script, 1, {"SPIN_MCORE_SHOW_WARNINGS": "1"})
    assert shown.stderr.count("FutureWarning: library deprecation") == 1


def test_quiet_repeated_warnings_leaves_rank_0_alone():
    from spin_mcore.launcher import quiet_repeated_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_repeated_warnings(0, environ={})
        warnings.warn("a", FutureWarning)
        quiet_repeated_warnings(3, environ={})
        warnings.warn("b", FutureWarning)
        warnings.warn("c", DeprecationWarning)
    assert [str(w.message) for w in seen] == ["a"]


# ----------------------------------------------------------------------------- the common state dict


def _dp2_train(tmp: str) -> dict:
    """Rank r: train 5 steps at DP 2 with checkpoints after steps 2 and 4; Megatron's warnings captured."""
    import torch.distributed as dist

    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.training import trainer
    from spin_mcore.training.train_checkpoint import latest_checkpoint, load_train_checkpoint

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron.core.dist_checkpointing").addHandler(Keep(logging.WARNING))
    cfg = load_config(overrides=["model.preset=tiny", "model.seq_length=24", "train.lr=[0.001]", "run.nproc=2",
                                 "train.micro_batch_size=1", "train.global_batch_size=4", "train.max_steps=5",
                                 "train.save_interval=2", "train.keep_checkpoints=2", "spin.beta=[0.5]"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    tmp = Path(tmp)
    if pstate.rank == 0:
        # Reference log-probs of 0: the numbers trained on do not matter here, only the checkpoints.
        write_pair_stage(tmp / "ref", [dict(r, ref_logp_real=0.0, ref_logp_generated=0.0)
                                       for r in random_pair_records(8)])
    dist.barrier()
    trainer.train(cfg, pstate, [tmp / "ref"], None, tmp / "out")
    # The saved loop state, read back through the same loader a resumed run uses.
    model = trainer.setup_model(cfg, pstate, None)
    from spin_mcore.training.optimizer import build_optimizer
    from spin_mcore.training.schedule import build_lr_schedule

    import torch

    optimizer = build_optimizer(cfg.train, [model], 1e-3, cfg.parallel.distributed_optimizer, torch.float32)
    scheduler = build_lr_schedule(optimizer, 1e-3, 5, cfg.train.warmup_fraction)
    loop = load_train_checkpoint(latest_checkpoint(tmp / "out" / "train_state"), model, optimizer, scheduler, pstate)
    return {"messages": messages, "loop": loop}


def test_train_checkpoint_common_state_is_the_same_on_every_rank(tmp_path):
    from spin_mcore.launcher import run_local

    ranks = run_local(_dp2_train, 2, str(tmp_path))
    for r in ranks:
        assert not [m for m in r["messages"] if "common state dict differs" in m], r["messages"]
    # Both ranks read rank 0's loop state: its step timing, not a mix.
    assert ranks[0]["loop"] == ranks[1]["loop"]
    assert ranks[0]["loop"]["step"] == 4 and ranks[0]["loop"]["last"]["step_seconds"] > 0


# ----------------------------------------------------------------------------- leaving a preempted job


# Both ranks are preempted; rank 0 still publishes in a finally block (as the trainer's logger
# closes and a checkpoint is renamed) for longer than SLURM's KillWait, rank 1 raises at once.
# (srun's kill is SIGTERM, which the preemption handler only records, then SIGKILL after KillWait:
# a publish shorter than KillWait survived even before the fix.)
_PREEMPT_BODY = """
import torch.distributed as dist
rank = int(os.environ["SLURM_PROCID"])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"], RANK=str(rank),
                  WORLD_SIZE=os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo")
dist.barrier()
try:
    raise preemption.Preempted(10, "a test boundary")
finally:
    if rank == 0:
        time.sleep(float(os.environ["TEST_PUBLISH_SECONDS"]))
        with open(os.environ["TEST_MARKER"], "w") as fh:
            fh.write("published")
"""


@pytest.mark.slurm
def test_no_rank_leaves_a_preempted_job_before_rank_0_has_published(tmp_path, slurm_env):
    env = dict(slurm_env)
    script = _cli_script(tmp_path / "preempt.py", _PREEMPT_BODY)
    marker = tmp_path / "published"
    config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True).stdout
    kill_wait = int(re.search(r"^KillWait\s*=\s*(\d+)", config, re.M).group(1))
    env.update(TEST_MARKER=str(marker), TEST_PORT=str(29000 + os.getpid() % 1000),
               TEST_PUBLISH_SECONDS=str(kill_wait + 5))
    proc = subprocess.run(["srun", "--ntasks=2", "--nodes=1", "--kill-on-bad-exit=1", "--time=5",
                           sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    # srun's own status is the tasks' 75; a task it killed would make it report a kill instead.
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert marker.read_text() == "published", proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("spin-mcore fake: preempted")]
    assert lines == ["spin-mcore fake: preempted (SIGUSR1 after a test boundary); state saved, "
                     "re-run the same command to resume"], proc.stderr

