"""Chaos test of the whole loop: SIGKILL `spin-mcore run` at seeded random points, resume, compare.

The tiny SPIN loop (2 iterations) runs once uninterrupted, and once killed (the whole process
group, SIGKILL: no handler runs) at random delays after reaching each phase in turn: opponent
generation, the reference pass, training, a training checkpoint save, evaluation, and the
second iteration's training. Each kill is followed by the same command, which must resume.
What must hold afterwards:
* the results table and the final weights are bitwise equal to the uninterrupted run's;
* every stage manifest is complete, lists each shard once, and each shard matches its hash;
* no temporary file or directory (``*.tmp*``, ``*.old-*``) is left anywhere in the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import checkpoint_weights, make_tiny_spin_inputs, tiny_model_overrides

SPIN = str(Path(sys.executable).with_name("spin-mcore"))
SEED = 20261123


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_tiny_spin_inputs(tmp_path_factory.mktemp("chaos_inputs"), records=200)


def _command(inputs, run_dir: Path) -> list[str]:
    root, tok = inputs
    return [SPIN, "run", *tiny_model_overrides(), "precision.recipe=fp32", "platform.device=cpu",
            f"data.path={root / 'arith.jsonl'}", f"data.tokenizer={tok}", "data.max_prompt_length=28",
            "data.max_response_length=24", "data.num_prompts=24", "data.heldout_fraction=0.05",
            "generation.max_new_tokens=24", "generation.batch_size=24", "generation.shard_size=8",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=1", "train.save_interval=2",
            "train.lr=[1e-4]", f"run.init_checkpoint={root / 'theta0'}", "run.iterations=2", "run.eval_prompts=8",
            "run.checker=arith", "run.stop_pair_accuracy=0.0", f"run.dir={run_dir}"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _shards(stage: Path) -> int:
    try:
        return len(json.loads((stage / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# (phase, condition on the run directory that says the run is in it), in the order a run reaches them.
PHASES = [
    ("generation", lambda r: _shards(r / "iter_0" / "train_generation") >= 1),
    ("reference pass", lambda r: (r / "iter_0" / "train_reference").exists()),
    ("training", lambda r: _lines(r / "iter_0" / "train" / "metrics.jsonl") >= 2),
    ("checkpoint save", lambda r: any((r / "iter_0" / "train" / "train_state").glob("step_*"))),
    ("evaluation", lambda r: (r / "iter_0" / "eval_work").exists()),
    ("iteration 2 training", lambda r: _lines(r / "iter_1" / "train" / "metrics.jsonl") >= 1),
]


def _run_to_end(cmd: list[str], log) -> None:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd[:2])} failed ({proc.returncode}); see {log.name}"


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # wall time differs


def test_sigkill_anywhere_then_resume_is_bitwise_identical(inputs, tmp_path):
    plain, chaos = tmp_path / "plain", tmp_path / "chaos"
    with open(tmp_path / "plain.log", "w") as log:
        _run_to_end(_command(inputs, plain), log)

    rng = random.Random(SEED)
    kills = []
    with open(tmp_path / "chaos.log", "w") as log:
        for phase, reached in PHASES:
            proc = subprocess.Popen(_command(inputs, chaos), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + 600
            while proc.poll() is None and not reached(chaos):
                assert time.monotonic() < deadline, f"never reached {phase}"
                time.sleep(0.05)
            if proc.poll() is None:
                time.sleep(rng.uniform(0.0, 0.4))
                os.killpg(proc.pid, signal.SIGKILL)  # parent and its ranks, no handler runs
                kills.append(phase)
            proc.wait()
        _run_to_end(_command(inputs, chaos), log)
    # At least the first phases are long enough to be hit on any machine.
    assert len(kills) >= 4, kills

    assert _rows(chaos) == _rows(plain)
    final = [checkpoint_weights(run / "iter_1" / "train" / "model") for run in (chaos, plain)]
    assert final[0].keys() == final[1].keys() and final[0]
    for name in final[1]:
        assert final[0][name].equal(final[1][name]), name

    manifests = sorted(chaos.rglob("manifest.json"))
    assert len(manifests) >= 8  # train/held-out generation and reference stages of 2 iterations
    for manifest_path in manifests:
        manifest = json.loads(manifest_path.read_text())
        assert manifest["complete"], manifest_path
        files = [s["file"] for s in manifest["shards"].values()]
        assert len(files) == len(set(files)), manifest_path
        on_disk = sorted(p.name for p in manifest_path.parent.glob("shard-*"))
        assert on_disk == sorted(files), manifest_path
        for shard in manifest["shards"].values():
            data = (manifest_path.parent / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert data.count(b"\n") == shard["records"]
    leftovers = [p for p in chaos.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers
    print(f"killed during: {kills}")
