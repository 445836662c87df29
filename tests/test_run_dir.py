"""Run directory: a different config is refused (naming the fields) unless forced; results table and plot."""

import pytest
import yaml

from spin_mcore.config import load_config
from spin_mcore.run_dir import RunConfigMismatchError, RunDir, claim_run_dir, format_table, write_results


def test_changed_config_is_refused_unless_forced(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = load_config(overrides=["model.preset=tiny"]).to_dict()
    claim_run_dir(run, cfg)
    claim_run_dir(run, cfg)  # same config: fine
    resumable = load_config(overrides=["model.preset=tiny", "run.nproc=4", "train.log_interval=5"]).to_dict()
    claim_run_dir(run, resumable)  # process count and logging may change between re-runs
    changed = load_config(overrides=["model.preset=tiny", "spin.loss=hinge", "train.lr=[1e-6]"]).to_dict()
    with pytest.raises(RunConfigMismatchError, match=r"spin.loss: 'logistic' -> 'hinge'; train.lr: .* --force"):
        claim_run_dir(run, changed)
    claim_run_dir(run, changed, force=True)
    assert yaml.safe_load(run.config_file.read_text())["spin"]["loss"] == "hinge"


def test_results_table_and_plot(tmp_path):
    rows = [{"model": "SFT", "exact_match": 0.5, "pair_accuracy": None},
            {"model": "SPIN iter 1", "exact_match": 0.625, "pair_accuracy": 0.75}]
    assert format_table(rows) == (
        "| model | exact_match | pair_accuracy |\n|---|---|---|\n"
        "| SFT | 0.5000 |  |\n| SPIN iter 1 | 0.6250 | 0.7500 |\n")
    # A learning-rate column keeps its digits (4 decimals read 1e-05 as 0.0000); a column of 0 stays 0.0000.
    rates = [{"lr": 1e-05, "beta": 0.1, "skipped": 0.0}, {"lr": 5e-07, "beta": 5.0, "skipped": 0.0}]
    assert format_table(rates) == ("| lr | beta | skipped |\n|---|---|---|\n"
                                   "| 1e-05 | 0.1000 | 0.0000 |\n| 5e-07 | 5.0000 | 0.0000 |\n")
    write_results(RunDir(tmp_path), rows)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 2


def test_run_made_before_a_new_field_existed_resumes_at_its_default(tmp_path):
    """A config written by an older release lacks newer fields and sections: at their defaults they
    are no change; set to anything else they are, and are named."""
    run = RunDir(tmp_path / "run")
    cfg = load_config(overrides=["model.preset=tiny"]).to_dict()
    old = {k: dict(v) for k, v in cfg.items() if k != "platform"}
    old["model"].pop("init_std")
    run.root.mkdir(parents=True)
    run.config_file.write_text(yaml.safe_dump(old))
    claim_run_dir(run, cfg)
    changed = load_config(overrides=["model.preset=tiny", "model.init_std=0.5", "platform.device=cpu"]).to_dict()
    with pytest.raises(RunConfigMismatchError, match=r"model.init_std: 0.02 -> 0.5; platform.device: 'auto' -> 'cpu'"):
        claim_run_dir(run, changed)


def test_evaluated_iterations_keep_only_the_newest_train_state(tmp_path):
    """After iteration t is evaluated: earlier iterations' train_state goes, iteration t keeps its newest save."""
    from spin_mcore.loop import _prune_train_states

    run = RunDir(tmp_path)
    for t in (0, 1):
        for step in (2, 4, 6):
            d = run.train(t) / "train_state" / f"step_{step:08d}"
            d.mkdir(parents=True)
            (d / "done.json").write_text("{}")
    (run.train(1) / "train_state" / "step_00000008.tmp").mkdir()  # a killed save
    _prune_train_states(run, 1)
    assert not (run.train(0) / "train_state").exists()
    assert sorted(p.name for p in (run.train(1) / "train_state").iterdir()) == ["step_00000006"]
