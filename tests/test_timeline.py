"""RUN/timeline.jsonl of a tiny `spin-mcore run`, `spin-mcore report`, and the planner's stage names.

One iteration of the tiny SPIN loop (in-process Megatron engine, 2-layer model, CPU) runs once; its
timeline must list every stage the loop runs with the model loads it makes: theta_t is loaded ONCE per
iteration (issue 21 part 3), by the first stage that needs it (generation of the training prompts); the
held-out generation, both reference passes and the trainer use that resident model; evaluation loads
theta_{t+1}. (Before: 3 loads of theta_t with the in-process engine, 4 with an external one.) Then the
iteration is re-run after deleting its eval.json
(as a kill during evaluation leaves it): every earlier stage is recorded as resumed (0 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spin_mcore.timeline import STAGES
from tests.helpers import make_tiny_spin_inputs, tiny_model_overrides

SPIN = str(Path(sys.executable).with_name("spin-mcore"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_tiny_spin_inputs(tmp_path_factory.mktemp("timeline_inputs"), records=120)


def _command(inputs, run_dir: Path) -> list[str]:
    root, tok = inputs
    return [SPIN, "run", *tiny_model_overrides(), "precision.recipe=fp32", "platform.device=cpu",
            f"data.path={root / 'arith.jsonl'}", f"data.tokenizer={tok}", "data.max_prompt_length=28",
            "data.max_response_length=24", "data.num_prompts=16", "data.heldout_fraction=0.05",
            "generation.max_new_tokens=12", "generation.batch_size=16", "generation.shard_size=8",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=1", "train.save_interval=2",
            "train.lr=[1e-4]", f"run.init_checkpoint={root / 'theta0'}", "run.iterations=1", "run.eval_prompts=4",
            "run.stop_pair_accuracy=0.0", f"run.dir={run_dir}"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("timeline") / "run"
    proc = subprocess.run(_command(inputs, run_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _records(run_dir)
    (run_dir / "iter_0" / "eval.json").unlink()  # as a kill during evaluation leaves the run
    proc = subprocess.run(_command(inputs, run_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, first, _records(run_dir)[len(first):]


def test_timeline_lists_every_stage_with_its_loads(run, inputs):
    run_dir, first, _ = run
    theta0 = str(inputs[0] / "theta0")
    got = [(r["stage"], r.get("set"), r["loads"], r["resumed"]) for r in first]
    # 4 steps at save_interval=2: one train_state save (step 2; none at the last step) and the model save.
    assert got == [("generation", "train", 1, False), ("reference", "train", 0, False),
                   ("generation", "heldout", 0, False), ("reference", "heldout", 0, False),
                   ("checkpoint", None, 0, False), ("training", None, 0, False), ("evaluation", None, 1, False)]
    theta_t_loads = sum(r["loads"] for r in first if r["stage"] != "evaluation")
    assert theta_t_loads == 1
    assert [p for r in first for p in r["loaded"] if r["stage"] != "evaluation"] == [theta0]
    assert [p for r in first for p in r["loaded"] if r["stage"] == "evaluation"] == [str(run_dir / "iter_0" / "train" / "model")]
    size = sum(f.stat().st_size for f in Path(theta0).rglob("*") if f.is_file())
    assert [r["bytes_read"] for r in first if r["loads"]][:1] == [size]
    ckpt = next(r for r in first if r["stage"] == "checkpoint")
    model = run_dir / "iter_0" / "train" / "model"
    assert ckpt["bytes_written"] >= sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) > 0
    assert ckpt["wall_s"] > 0
    for r in first:
        assert r["iteration"] == 0 and r["ranks"] == 1 and r["stage"] in STAGES
        assert r["start"] <= r["end"] and r["wall_s"] >= 0


def test_resumed_stages_record_zero_seconds(run):
    _, _, again = run
    got = [(r["stage"], r.get("set"), r["resumed"], r["wall_s"]) for r in again if r["resumed"]]
    assert got == [("generation", "train", True, 0.0), ("reference", "train", True, 0.0),
                   ("generation", "heldout", True, 0.0), ("reference", "heldout", True, 0.0),
                   ("training", None, True, 0.0)]
    assert [r["stage"] for r in again if not r["resumed"]] == ["evaluation"]


def test_report_prints_the_table_and_writes_the_gantt(run, capsys):
    from spin_mcore.cli import main

    run_dir, _, _ = run
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for stage in ("generation", "reference", "training", "checkpoint", "evaluation", "**total**"):
        assert f"| 0 | {stage}" in out, stage
    assert "100.0%" in out
    assert (run_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content,expected", [
    (None, "timeline.jsonl: no timeline"),
    ('{"iteration": 0}\n{not json\n', "timeline.jsonl:1: missing stage"),
    ('{"iteration": 0, "stage": "training", "start": 0, "end": 1, "wall_s": 1, "ranks": 1, "loads": 0, '
     '"bytes_read": 0, "bytes_written": 0}\n{not json\n', "timeline.jsonl:2: not JSON"),
    ('{"iteration": 0, "stage": "lunch", "start": 0, "end": 1, "wall_s": 1, "ranks": 1, "loads": 0, '
     '"bytes_read": 0, "bytes_written": 0}\n', "timeline.jsonl:1: unknown stage 'lunch'"),
])
def test_report_refuses_a_bad_timeline_in_one_line(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "timeline.jsonl").write_text(content)
    proc = subprocess.run([SPIN, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert lines[0].startswith("spin-mcore report: error: ")
    assert not (tmp_path / "timeline.png").exists()


def test_planner_and_timeline_share_stage_names():
    from spin_mcore.plan.search import PLAN_STAGES

    assert PLAN_STAGES == STAGES


def test_engine_call_is_split_into_export_engine_start_generation(tmp_path):
    """The external engine's one call becomes three records: export (planning, theta_t's load and the HF
    export), engine_start (the engine's own load seconds), generation (the rest); nothing to do: resumed."""
    from spin_mcore.loop import record_engine_stages
    from spin_mcore.timeline import Measured, Timeline, read_timeline

    m = Measured()
    m.start, m.end, m.export_s = 100.0, 160.0, 4.0
    m.loads, m.loaded, m.bytes_read, m.bytes_written = 1, ["/ckpt/theta_1"], 1000, 2000
    tl = Timeline(tmp_path)
    record_engine_stages(tl, 1, m, [101.0, 103.0], {"engine_starts": 2, "load_seconds": 10.0})
    record_engine_stages(tl, 2, m, [], {"engine_starts": 0})
    got = [(r["iteration"], r["stage"], r["start"], r["end"], r["wall_s"], r["loads"], r["bytes_read"],
            r["bytes_written"], r["resumed"]) for r in read_timeline(tmp_path / "timeline.jsonl")]
    assert got == [(1, "export", 100.0, 107.0, 7.0, 1, 1000, 2000, False),
                   (1, "engine_start", 107.0, 117.0, 10.0, 0, 0, 0, False),
                   (1, "generation", 117.0, 160.0, 43.0, 0, 0, 0, False),
                   (2, "generation", 100.0, 160.0, 0.0, 1, 1000, 2000, True)]


def test_restem_loop_records_its_stages(inputs, tmp_path):
    """The verifier loops record generation, training (with its checkpoint stall) and evaluation per iteration."""
    from tests.test_selfimprove import _overrides, _run

    run_dir = tmp_path / "restem"
    _run("restem", _overrides(inputs, run_dir, ["run.iterations=1"]))
    got = [(r["iteration"], r["stage"], r.get("set"), r["loads"], r["resumed"]) for r in _records(run_dir)]
    # ReST^EM restarts each iteration from theta_0 (selfimprove.restart_from_base): training loads it once.
    assert got == [(0, "generation", "train", 1, False), (0, "checkpoint", None, 0, False),
                   (0, "training", None, 1, False), (0, "evaluation", None, 1, False)]


def test_demo_results_show_the_timeline(run, tmp_path):
    from spin_mcore.demo.experiment import append_timeline

    run_dir, first, _ = run
    results = tmp_path / "results.md"
    results.write_text("| model |\n|---|\n| SFT (theta_0) |\n")
    append_timeline(results, run_dir)
    text = results.read_text()
    assert text.startswith("| model |") and "## Where the SPIN iterations' time went" in text
    assert "| 0 | training |" in text and "| 0 | **total** |" in text
    assert (run_dir / "timeline.png").stat().st_size > 0
    append_timeline(results, tmp_path / "no_run")  # no timeline: left as it was
    assert results.read_text() == text
