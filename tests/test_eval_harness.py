"""lm-evaluation-harness wiring: the paper's leaderboard settings and argument construction (no datasets here)."""

import pytest

from spin_mcore.eval.harness import HarnessUnavailableError, harness_calls, leaderboard_row, run_harness, select_tasks


def test_leaderboard_settings_match_the_paper():
    got = {(t.column, t.task, t.num_fewshot, t.metric.split(",")[0]) for t in select_tasks()}
    assert got == {
        ("ARC", "arc_challenge", 25, "acc_norm"),
        ("TruthfulQA", "truthfulqa_mc2", 0, "acc"),
        ("Winogrande", "winogrande", 5, "acc"),
        ("GSM8k", "gsm8k", 5, "exact_match"),
        ("HellaSwag", "hellaswag", 10, "acc_norm"),
        ("MMLU", "mmlu", 5, "acc"),
    }


def test_calls_group_tasks_by_fewshot(tmp_path):
    calls = harness_calls(tmp_path / "hf", select_tasks(), batch_size=8, device="cpu", dtype="float32")
    assert [(c["num_fewshot"], c["tasks"]) for c in calls] == [
        (0, ["truthfulqa_mc2"]), (5, ["winogrande", "gsm8k", "mmlu"]), (10, ["hellaswag"]), (25, ["arc_challenge"])]
    assert calls[0]["model"] == "hf" and calls[0]["model_args"] == f"pretrained={tmp_path / 'hf'},dtype=float32"
    assert all(c["batch_size"] == 8 and c["device"] == "cpu" for c in calls)


def test_row_and_average():
    tasks = select_tasks(["ARC", "gsm8k"])
    row = leaderboard_row({"arc_challenge": {"acc_norm,none": 0.6}, "gsm8k": {"exact_match,strict-match": 0.3}}, tasks)
    assert row == pytest.approx({"ARC": 60.0, "GSM8k": 30.0, "Average": 45.0})
    with pytest.raises(KeyError, match="gsm8k"):
        leaderboard_row({"arc_challenge": {"acc_norm,none": 0.6}, "gsm8k": {}}, tasks)
    with pytest.raises(ValueError, match=r"unknown harness task\(s\) \['squad'\]"):
        select_tasks(["squad"])


def test_missing_harness_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(HarnessUnavailableError, match=r"pip install 'spin_mcore\[eval\]'"):
        run_harness(tmp_path, select_tasks(["ARC"]))
