"""The benchmarks' statistics (benchmarks/bench_stats.py) and the README table generator (benchmarks/readme_table.py).

Alternating-run summaries against hand-computed medians and ranges, the FLOP count against a count written
out by hand from the Llama layer shapes, and the README block regenerated from a recorded JSON line.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_stats  # noqa: E402
import readme_table  # noqa: E402


def test_alternate_runs_sides_interleaved():
    order = []
    sides = {name: (lambda n=name: order.append(n) or {"x": len(order)}) for name in ("a", "b")}
    out = bench_stats.alternate(sides, 3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert [r["x"] for r in out["a"]] == [1, 3, 5] and [r["x"] for r in out["b"]] == [2, 4, 6]


def test_summarize_and_compare():
    s = bench_stats.summarize([10.0, 14.0, 12.0])
    assert (s["median"], s["min"], s["max"]) == (12.0, 10.0, 14.0)
    assert s["spread"] == pytest.approx(4 / 12)
    # disjoint ranges: a real difference, ratio range from the extremes
    c = bench_stats.compare([20.0, 22.0, 21.0], [10.0, 11.0, 12.0])
    assert c["ratio"] == pytest.approx(21 / 11)
    assert c["ratio_min"] == pytest.approx(20 / 12) and c["ratio_max"] == pytest.approx(22 / 10)
    assert not c["overlap"] and c["verdict"] == "higher"
    # overlapping ranges are reported as such, not as a win
    c = bench_stats.compare([10.0, 13.0], [9.0, 11.0])
    assert c["overlap"] and c["verdict"] == "overlap" and c["ratio"] > 1
    assert "(ranges overlap)" in bench_stats.fmt_ratio(c)
    assert bench_stats.compare([1.0], [2.0])["verdict"] == "lower"


def test_llama_forward_flops_hand_count():
    # h 4, ffn 6, 1 layer, 2 heads, 1 kv group (kv dim 2), vocab 10; sequences of 1 and 3 tokens.
    # Per token: q 2*4*4=32, o 32, k 2*4*2=16, v 16, gate/up/down 3*2*4*6=144 -> 240; output 2*4*10=80 -> 320.
    # Attention per token at position i: 4*h*i = 16*i -> lengths 1: 16; 3: 16*(1+2+3)=96.
    want = (1 + 3) * 320 + 16 + 96
    got = bench_stats.llama_forward_flops([1, 3], hidden=4, ffn=6, layers=1, heads=2, groups=1, vocab=10)
    assert got == want


def test_matmul_ceiling_and_machine_info():
    c = bench_stats.matmul_flops(64, 32, 48, threads=1, seconds=0.05)
    assert c["shape"] == [64, 32, 48] and c["flops_per_s_best"] >= c["flops_per_s_median"] > 0
    info = bench_stats.finish_machine_info(bench_stats.machine_info(2))
    import torch
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(info["loadavg_before"]) == 3 and len(info["loadavg_after"]) == 3 and info["threads"] == 2


RECORDED = {
    "benchmark": "spin_step", "size": "large", "lengths": "mixed", "repeats": 3, "trl_pad_fraction": 0.5,
    "headline_side": "ours_packed",
    "sides": {"ours_packed": {"tokens_per_s_median": 900.0, "tokens_per_s_spread": 0.1, "ceiling_share": 0.25}},
    "ratios": {"ours_packed/trl_live": {"tokens_per_s": {"ratio": 2.0, "ratio_min": 1.8, "ratio_max": 2.2, "overlap": False},
                                        "peak_rss": {"ratio": 0.7, "ratio_min": 0.69, "ratio_max": 0.71, "overlap": False}},
               "ours_packed/trl_pre": {"tokens_per_s": {"ratio": 1.1, "ratio_min": 0.9, "ratio_max": 1.3, "overlap": True},
                                       "peak_rss": {"ratio": 0.8, "ratio_min": 0.79, "ratio_max": 0.81, "overlap": False}}},
    "target_mixed": {"needed_ratio_vs_trl_pre": 1.6, "ratio": 1.1, "met": False},
    "machine": {"cpu_model": "AMD EPYC", "threads": 2, "loadavg_before": [1.0, 1.0, 1.0],
                "loadavg_after": [3.0, 2.0, 1.0]},
}


def test_readme_block_from_recorded_json(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "spin_step_large_mixed.json").write_text("some log line\n" + json.dumps(RECORDED) + "\n")
    readme = tmp_path / "README.md"
    doc = tmp_path / "bench.md"
    for f in (readme, doc):
        f.write_text(f"# {f.name}\nbefore\n{readme_table.BEGIN}\nold table\n{readme_table.END}\nafter\n")
    assert readme_table.main(["--results", str(results), "--readme", str(readme), "--doc", str(doc)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# README.md\nbefore\n") and text.endswith("after\n")
    row = [line for line in text.splitlines() if line.startswith("| `spin_step.py`")]
    assert row == ["| `spin_step.py` ours_packed | large, mixed lengths (pad 50%) | 3 | 900 tok/s (10%) | "
                   "2.00x [1.80-2.20] | 1.10x [0.90-1.30] overlap | 0.70x [0.69-0.71] | 25.0% | "
                   "AMD EPYC, 2 threads; load 1.0 / 3.0 | "
                   "target 1.60x vs TRL pre: not met |"]
    assert readme_table.BEGIN in doc.read_text() and row[0] in doc.read_text()


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md"])
def test_committed_tables_are_the_recorded_results(doc):
    """A hand edit of the table, or a result recorded without regenerating it, fails here."""
    text = (ROOT / doc).read_text()
    block = readme_table.render_table(readme_table.load_results(ROOT / "benchmarks" / "results"))
    assert readme_table.replace_block(text, block, doc) == text


def test_readme_table_bad_input(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "x.json").write_text("{not json\n")
    assert readme_table.main(["--results", str(results), "--readme", str(tmp_path / "R.md"),
                              "--doc", str(tmp_path / "d.md")]) == 1
    assert "x.json" in capsys.readouterr().err
    (results / "x.json").write_text(json.dumps(RECORDED))
    (tmp_path / "R.md").write_text("no markers\n")
    (tmp_path / "d.md").write_text("no markers\n")
    assert readme_table.main(["--results", str(results), "--readme", str(tmp_path / "R.md"),
                              "--doc", str(tmp_path / "d.md")]) == 1
    assert "R.md: no <!-- bench-table:begin -->" in capsys.readouterr().err


RECORDED_ITERATION = {
    "benchmark": "iteration", "size": "large", "prompts": 20, "repeats": 3, "ours_packed_training": True,
    "headline_side": "ours",
    "sides": {"ours": {"seconds_median": 90.0, "seconds_spread": 0.05},
              "ours_vllm": {"seconds_median": 100.0, "seconds_spread": 0.1},
              "authors": {"seconds_median": 200.0, "seconds_spread": 0.2}},
    "stage_seconds": {"generation": {"ours": 50.0, "ours_vllm": 60.0, "authors": 140.0},
                      "reference": {"ours": 10.0, "ours_vllm": 10.0, "authors": 0.0},
                      "engine_start": {"ours": 0.0, "ours_vllm": 20.0, "authors": 0.0}},
    "ratios": {"authors/ours": {"ratio": 2.22, "ratio_min": 2.0, "ratio_max": 2.5, "overlap": False},
               "authors/ours_vllm": {"ratio": 2.0, "ratio_min": 1.5, "ratio_max": 2.4, "overlap": True}},
    "machine": {"loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 2.0, 1.0]},
}


def test_iteration_rows_one_per_side_of_ours():
    rows = [r for r in readme_table.render_table([RECORDED_ITERATION]).splitlines() if r.startswith("| `iteration")]
    assert len(rows) == 2
    assert rows[0].startswith("| `iteration.py` ours | large, 20 prompts packed | 3 | 90 s (5%) |")
    assert "2.22x [2.00-2.50] (above 1: ours faster)" in rows[0]
    # a stage neither side spent time in is left out; the in-process side has no engine start
    assert "generation 50.0 vs 140.0 s, reference 10.0 vs 0.0 s" in rows[0] and "engine_start" not in rows[0]
    assert rows[1].startswith("| `iteration.py` ours_vllm |") and "2.00x [1.50-2.40] overlap" in rows[1]
    assert "engine_start 20.0 vs 0.0 s" in rows[1]


def _eos_lengths(mean_tokens: float) -> dict:
    """Rank worker: spin_step's quick-size random model given an eos rate, then 64 sampled responses."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import spin_step
    from spin_mcore.config import load_config
    from spin_mcore.generation.engine import generate_with_stats
    from spin_mcore.generation.sampling import SamplingParams
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model

    s = dict(spin_step.SIZES["quick"])
    cfg = load_config(overrides=spin_step._overrides(s) + ["model.seq_length=256"])
    pstate = init_distributed(cfg.parallel, seed=0)
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=0, stop_ids=(spin_step.EOS,))
    prompts = [[3 + (7 * i + j) % 500 for j in range(8)] for i in range(64)]
    before, _ = generate_with_stats(model, pstate, prompts, params, batch_size=64)
    calibration = spin_step.end_samples_at_eos(model, spin_step.EOS, mean_tokens)
    after, _ = generate_with_stats(model, pstate, prompts, params, batch_size=64)
    return {"before": [len(o[0]) for o in before], "after": [len(o[0]) for o in after], "calibration": calibration}


def test_end_samples_at_eos_gives_the_asked_mean_length():
    """iteration.py's theta_0: a random model samples eos at ~1/vocab, so its samples run long; calibrated, they
    end at eos after about the asked number of tokens (64 samples: the mean within 0.6-1.5x of 20)."""
    from spin_mcore.launcher import run_local

    (out,) = run_local(_eos_lengths, 1, 20.0)
    before, after = out["before"], out["after"]
    mean_before = sum(before) / len(before)  # eos at 1/vocab: most samples run long or to max_new
    mean = sum(after) / len(after)
    print(f"mean length {mean_before:.1f} -> {mean:.1f} (asked 20), calibration {out['calibration']}")
    assert mean_before > 100, before
    assert 12 <= mean <= 30, after
    assert max(after) < 200 and out["calibration"]["mean_eos_probability"] == 0.05
