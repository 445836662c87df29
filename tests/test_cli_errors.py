"""What a user sees when something goes wrong: one line naming the cause, not nested tracebacks.

Through the console script a user runs (stderr and exit status as a shell sees them), for an
error raised inside the launched ranks, and through ``cli.main`` for the checks that run before
any process starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spin_mcore.cli import EXIT_BAD_INPUT, EXIT_FAILURE, main
from spin_mcore.launcher import WorkerError, run_local

SPIN = str(Path(sys.executable).with_name("spin-mcore"))
SHIPPED = Path(__file__).resolve().parent.parent / "spin_mcore" / "demo_data" / "arith.jsonl"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """60 demo records and a SentencePiece tokenizer of 320 pieces trained on them."""
    from spin_mcore.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("cli_errors")
    lines = SHIPPED.read_text(encoding="utf-8").splitlines(keepends=True)[:60]
    (root / "data.jsonl").write_text("".join(lines), encoding="utf-8")
    tok = train_sentencepiece([line for line in lines], root / "tok", vocab_size=320, seed=0)
    return root, tok


def _run_args(inputs, run_dir, init) -> list[str]:
    root, tok = inputs
    return ["run", "model.preset=tiny", "model.vocab_size=320", f"data.path={root / 'data.jsonl'}",
            f"data.tokenizer={tok}", "data.heldout_fraction=0.1", f"run.init_checkpoint={init}", f"run.dir={run_dir}"]


def test_error_inside_a_rank_is_one_line_with_the_traceback_in_the_run_dir(inputs, tmp_path):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    proc = subprocess.run([SPIN, *_run_args(inputs, tmp_path / "run", not_a_checkpoint)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    # Progress lines (data loading) may come first; the error is one line, and the last.
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and sum(line.startswith("spin-mcore ") for line in lines) == 1, proc.stderr
    assert lines[-1] == (f"spin-mcore run: error: {not_a_checkpoint} is not a complete spin_mcore checkpoint "
                         "(needs spin_mcore.json and model/)"), proc.stderr
    log = (tmp_path / "run" / "error.log").read_text()
    assert log.startswith("spin-mcore run: error: ") and "Traceback (most recent call last)" in log


def test_debug_shows_the_traceback(inputs, tmp_path):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    proc = subprocess.run([SPIN, *_run_args(inputs, tmp_path / "run", not_a_checkpoint), "--debug"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "\nspin-mcore run: error: " in proc.stderr and "Traceback (most recent call last)" in proc.stderr
    assert "load_model_checkpoint" in proc.stderr


def test_overrides_are_accepted_after_options(capsys):
    # parallel.cp=2 after --out is read as an override (it used to be "unrecognized arguments"),
    # and refused by name before any process starts.
    assert main(["generate", "--out", "/nonexistent/out", "model.preset=tiny", "parallel.cp=2"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spin-mcore generate: config error: parallel.cp=2: context parallelism")
    with pytest.raises(SystemExit):
        main(["generate", "--out", "x", "--no-such-option"])


def test_run_refuses_pipeline_parallel_generation_up_front(inputs, tmp_path, capsys):
    init = tmp_path / "theta0"
    init.mkdir()
    args = _run_args(inputs, tmp_path / "run", init) + ["model.num_layers=2", "parallel.pp=2"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.pp=2: the loop generates with the in-process engine" in err[0]
    assert not (tmp_path / "run").exists()  # refused before any process or run directory


def test_missing_theta0_is_refused_before_any_process(inputs, tmp_path, capsys):
    assert main(_run_args(inputs, tmp_path / "run", tmp_path / "nope")) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"spin-mcore run: error: run.init_checkpoint={tmp_path / 'nope'}: no such directory"
    assert not (tmp_path / "run").exists()  # no run directory, no error.log for input refused up front


def _raise_runtime_error():
    raise RuntimeError("boom in the rank")


def _raise_value_error():
    raise ValueError("data.path=x.jsonl, line 3: no 'prompt' field")


def test_worker_error_carries_the_rank_message_and_its_kind():
    with pytest.raises(WorkerError) as bug:
        run_local(_raise_runtime_error, 1)
    assert bug.value.summary == "rank 0 failed: RuntimeError: boom in the rank" and not bug.value.user_error
    assert "Traceback" in bug.value.traceback and str(bug.value).startswith("rank 0 failed:\n")
    with pytest.raises(WorkerError) as bad:
        run_local(_raise_value_error, 1)
    assert bad.value.summary == "data.path=x.jsonl, line 3: no 'prompt' field" and bad.value.user_error
    assert EXIT_FAILURE != EXIT_BAD_INPUT
