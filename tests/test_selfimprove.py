"""ReST^EM, Iterative RPO and STaR at tiny size (random theta_0, fixed seeds).

A random tiny model never answers the arithmetic correctly, so the loops' own logic is tested
with a plug-in verifier that accepts a seeded-random half of the samples: a response is "correct"
when its text has an even length (``parity_verifier``). What is checked:
* iteration bookkeeping: theta_0's row plus one row per iteration, eval.json per iteration;
* the filter: the records trained on are exactly the verified samples (distinct, capped per prompt),
  recomputed here from the verifier's own outputs;
* resume: a run whose last iteration lost its eval.json (a kill during evaluation) skips the
  complete iteration (its files untouched) and redoes only that evaluation, with the same numbers;
* STaR: rationalization prompts carry the hint, the records trained on never do;
* RPO: the first training step's loss is ln 2 + sft_weight * NLL(chosen) per token, from the
  reference pass's own log-probs (the policy equals the reference at step 0).
No improvement is asserted here: that needs an SFT-trained theta_0 (see the demo).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spin_mcore.selfimprove.verifiers import NO_ANSWER, Verdict, Verifier
from tests.helpers import make_tiny_spin_inputs, tiny_model_overrides


class _Parity(Verifier):
    name = "parity"

    def check(self, response, reference):
        text = response.strip()
        return NO_ANSWER if not text else Verdict(len(text) % 2 == 0, "correct" if len(text) % 2 == 0 else "wrong", text)


def parity_verifier(verify_section):
    return _Parity()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_tiny_spin_inputs(tmp_path_factory.mktemp("selfimprove_inputs"), records=200)


def _overrides(inputs, run_dir: Path, extra=()) -> list[str]:
    root, tok = inputs
    return [*tiny_model_overrides(), "precision.recipe=fp32", "platform.device=cpu",
            f"data.path={root / 'arith.jsonl'}", f"data.tokenizer={tok}", "data.max_prompt_length=28",
            "data.max_response_length=24", "data.num_prompts=16", "data.heldout_fraction=0.05",
            "generation.max_new_tokens=12", "generation.batch_size=32", "generation.shard_size=16",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=1", "train.lr=[1e-4]",
            f"run.init_checkpoint={root / 'theta0'}", "run.iterations=2", "run.eval_prompts=4",
            "verify.kind=tests.test_selfimprove:parity_verifier", "selfimprove.num_samples=3",
            "selfimprove.max_per_prompt=2", "selfimprove.min_distinct_2=0.0", f"run.dir={run_dir}", *extra]


def _loop_rank(method: str, overrides: list[str]) -> list:
    import warnings

    warnings.filterwarnings("ignore")
    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.selfimprove.command import LOOPS

    import importlib

    cfg = load_config(overrides=overrides)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    module, fn = LOOPS[method]
    return getattr(importlib.import_module(module), fn)(cfg, pstate)


def _run(method: str, overrides: list[str]) -> list:
    from spin_mcore.launcher import run_local

    return run_local(_loop_rank, 1, method, overrides)[0]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_kept(verified: list[dict], cap: int) -> list[tuple]:
    """Independent re-statement of the filter: correct, distinct per prompt, first ``cap`` by sample index."""
    out = []
    for pid in sorted({r["prompt_id"] for r in verified}):
        seen = []
        for r in sorted((r for r in verified if r["prompt_id"] == pid), key=lambda r: r["sample_index"]):
            if len(r["generated"].strip()) % 2 == 0 and r["generated"].strip() and r["generated_ids"] not in seen:
                seen.append(r["generated_ids"])
        out += [(pid, tuple(ids)) for ids in seen[:cap]]
    return out


def test_filter_unit():
    from spin_mcore.selfimprove.restem import filter_kept

    recs = [{"prompt_id": "a", "sample_index": i, "generated_ids": ids, "correct": ok}
            for i, (ids, ok) in enumerate([([1], True), ([1], True), ([2], False), ([3], True), ([4], True)])]
    assert [r["sample_index"] for r in filter_kept(recs, 1.0, 2)] == [0, 3]  # duplicate and wrong dropped, cap 2
    assert [r["sample_index"] for r in filter_kept(recs, 0.0, 9)] == [0, 2, 3, 4]  # threshold 0 keeps wrong ones


def test_rpo_pairs_unit():
    from spin_mcore.selfimprove.rpo import build_pairs

    base = {"prompt_ids": [1], "real_ids": [9, 9]}
    recs = [{**base, "prompt_id": "a", "sample_index": 0, "generated_ids": [5], "correct": False},
            {**base, "prompt_id": "a", "sample_index": 1, "generated_ids": [6], "correct": True},
            {**base, "prompt_id": "b", "sample_index": 0, "generated_ids": [7], "correct": False},
            {**base, "prompt_id": "c", "sample_index": 0, "generated_ids": [8], "correct": True}]
    pairs = {p["prompt_id"]: p for p in build_pairs(recs)}
    assert set(pairs) == {"a", "b"}  # c has no incorrect sample
    assert (pairs["a"]["real_ids"], pairs["a"]["generated_ids"], pairs["a"]["chosen_source"]) == ([6], [5], "sample")
    assert (pairs["b"]["real_ids"], pairs["b"]["generated_ids"], pairs["b"]["chosen_source"]) == ([9, 9], [7], "reference")


def test_restem_bookkeeping_filter_and_resume(inputs, tmp_path):
    run_dir = tmp_path / "restem"
    ov = _overrides(inputs, run_dir)
    rows = _run("restem", ov)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[0]["model"] == "theta_0"
    for t in range(2):
        it = run_dir / f"iter_{t}"
        verified = _jsonl(it / "train_verified.jsonl")
        assert len(verified) == 16 * 3 and rows[t + 1]["samples"] == 48
        trained = [(r["prompt_id"], tuple(r["real_ids"])) for r in _jsonl(it / "train_data.jsonl")]
        assert trained == _expected_kept(verified, cap=2) and rows[t + 1]["kept"] == len(trained) > 0
        assert (it / "eval.json").exists() and (it / "train" / "model").exists()
        assert rows[t + 1]["pass_at_1"] == pytest.approx(sum(r["correct"] for r in verified) / 48)
    assert (run_dir / "results.md").exists() and (run_dir / "results.png").exists()

    # Killed in iteration 1's evaluation: a re-run skips the complete iteration 0 (its files untouched)
    # and redoes only that evaluation, with the same numbers.
    (run_dir / "iter_1" / "eval.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "iter_0").rglob("*") if p.is_file()}
    resumed = _run("restem", ov)
    assert _strip(resumed) == _strip(rows)
    assert all(p.stat().st_mtime_ns == m for p, m in stamps.items())
    assert (run_dir / "iter_1" / "eval.json").exists()


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_star_never_trains_on_the_hint(inputs, tmp_path):
    from spin_mcore.data.tokenizer import load_tokenizer

    run_dir = tmp_path / "star"
    rows = _run("star", _overrides(inputs, run_dir, ["run.iterations=1", "selfimprove.num_samples=1"]))
    assert [r["iteration"] for r in rows] == [0, 1]
    it = run_dir / "iter_0"
    tried = _jsonl(it / "rationalize_verified.jsonl")
    assert len(tried) == rows[1]["rationalize_tried"] > 0
    refs = {r["id"]: r["answer"] for r in _jsonl(inputs[0] / "arith.jsonl")}
    # Generation saw the hint (prompts are left-truncated to 28 tokens here, so only its end may remain).
    assert all(f"answer is {refs[r['prompt_id']]}.)" in r["prompt"] for r in tried)
    originals = {r["prompt_id"]: r["prompt_ids"] for r in _jsonl(it / "train_verified.jsonl")}
    tok = load_tokenizer(inputs[1])
    trained = _jsonl(it / "train_data.jsonl")
    assert len(trained) == rows[1]["kept"] + rows[1]["rationalized"] and rows[1]["rationalized"] > 0
    for r in trained:
        assert r["prompt_ids"] == originals[r["prompt_id"]]  # the hint-free prompt, token for token
        assert "answer is" not in tok.decode(r["prompt_ids"])  # no task prompt says it; the hint does
    rationalized = {(r["prompt_id"], tuple(r["generated_ids"])) for r in tried if r["correct"]}
    assert {(r["prompt_id"], tuple(r["real_ids"])) for r in trained} >= rationalized


def test_rpo_step0_loss_is_ln2_plus_nll(inputs, tmp_path):
    from spin_mcore.training.batches import make_plan
    from spin_mcore.utils.shards import read_stage

    run_dir, w = tmp_path / "rpo", 0.5
    rows = _run("rpo", _overrides(inputs, run_dir, ["run.iterations=1", f"spin.sft_weight={w}", "spin.beta=[0.1]",
                                                     "train.seed=3"]))
    assert rows[1]["pairs"] > 0 and rows[1]["train_steps"] >= 1
    pairs = list(read_stage(run_dir / "iter_0" / "pairs_reference"))
    plan, _ = make_plan(len(pairs), 1, 3, 4, 2, 1)
    step0 = [pairs[i] for i in plan.step_indices(0).tolist()]
    nll = -sum(p["ref_logp_real"] for p in step0) / sum(len(p["real_ids"]) for p in step0)
    loss0 = _jsonl(run_dir / "iter_0" / "train" / "metrics.jsonl")[0]["loss"]
    # fp32 sums of ~10-token log-probs: agreement to 1e-5 (policy == reference at step 0).
    assert loss0 == pytest.approx(math.log(2) + w * nll, abs=1e-5)
    for p in pairs:  # chosen = a correct sample or the reference answer, rejected = an incorrect sample
        assert p["chosen_source"] in ("sample", "reference")
