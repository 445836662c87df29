"""The issue's "one assertion of improvement" at test size -- NOT MET; this file keeps the measured
setting so that it can be re-run (opt-in: SPIN_IMPROVEMENT_EXPERIMENT=1, ~7 min on a loaded 2-core
machine) instead of a CI test that would assert noise.

Setting (built here, CPU, tiny model): small-operand arithmetic in the demo's human format
("7 + 5 = 12. The answer is 12."), operands 0..12, a few phrasings, 900 distinct records of which 200
are held out (never sampled or trained on). theta_0: a 2-layer, 48-wide GPT, SFT from random init on
the human answers of 300 training records (Adam 3e-3, 20 epochs, 187 steps). Then a verified loop on
700 training prompts, K = 4 samples each, graded by the ``arith`` verifier. Noise: the binomial
standard error of theta_0's held-out greedy exact match, se = sqrt(p0 (1 - p0) / 200) ~ 0.026.

Measured, greedy held-out exact match theta_0 -> iter 1 -> iter 2 (-> iter 3):
* Iterative RPO (RECIPE_RPO below: DPO beta 0.1 + 1.0 x NLL, Adam 3e-4, 2 epochs ~43 steps):
  seed 0: 0.165 -> 0.170 -> 0.200 -> 0.170; seed 1: 0.150 -> 0.140 -> 0.195 -> 0.145;
  seed 2: 0.175 -> 0.165 -> 0.235 -> 0.200. Held-out NLL falls every time (seed 0: 0.183 -> 0.166,
  seed 1: 0.218 -> 0.179, seed 2: 0.167 -> 0.139; 2/3 of the chosen answers are the reference).
* ReST^EM from theta_0 each iteration, Adam 1e-3, 4 epochs (~30-44 steps): seed 0: 0.165 -> 0.205
  -> 0.245 (+3.1 se); seed 1: 0.150 -> 0.130 -> 0.145 -> 0.180; seed 2: 0.175 -> 0.190 -> 0.175 ->
  0.210. pass@4 on the training prompts rises (seed 1: 0.42 -> 0.48 -> 0.51), held-out NLL rises.
* ReST^EM variants, seed 0: LR 3e-4 4 epochs 0.210 / 0.185; continuing from theta_t at 3e-4 2 epochs
  0.205 / 0.215; continuing at 1e-3 2 epochs 0.185 / 0.195 / 0.195; 400 prompts, 8 steps: 0.180.
So both loops move held-out exact match by about +-2 se, in a direction that changes with seed and
iteration; the one +3 se result (ReST^EM, seed 0) did not repeat on seeds 1 and 2.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

from tests.helpers import tiny_model_overrides

SEED = 0
N_RECORDS, N_HELDOUT, N_SFT = 900, 200, 300
_ADD = ("What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Find the total of {a} and {b}.")
_SUB = ("What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?")


def small_arith_records(n: int, seed: int, max_operand: int = 12) -> list[dict]:
    """``n`` distinct {id, prompt, response, answer} records, operands 0..max_operand, no negatives."""
    from spin_mcore.demo.task import human_response

    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        template = rng.choice(_ADD if op == "+" else _SUB)
        if (a, b, op, template) in seen:
            continue
        seen.add((a, b, op, template))
        out.append({"id": f"q{len(out):04d}", "prompt": template.format(a=a, b=b), "response": human_response(a, b, op),
                    "answer": a + b if op == "+" else a - b})
    return out


def _overrides(root: Path, seed: int) -> list[str]:
    return [*tiny_model_overrides(), "model.hidden_size=48", "model.ffn_hidden_size=128", "precision.recipe=fp32",
            "platform.device=cpu", f"data.path={root / 'arith.jsonl'}",
            f"data.tokenizer={root / 'tokenizer' / 'tokenizer.model'}", "data.max_prompt_length=28",
            "data.max_response_length=26", f"data.heldout_fraction={N_HELDOUT / N_RECORDS}", f"data.seed={seed}",
            "generation.max_new_tokens=26", "generation.batch_size=128", "generation.shard_size=512",
            "generation.temperature=1.0", f"generation.seed={seed}", "train.optimizer=adam", "train.warmup_fraction=0.1",
            "train.global_batch_size=32", "train.micro_batch_size=32", "train.save_interval=100000",
            f"train.seed={seed}", f"run.eval_prompts={N_HELDOUT}", f"run.dir={root / 'rpo'}", "verify.kind=arith",
            "selfimprove.max_per_prompt=1", "selfimprove.min_distinct_2=0.0", *RECIPE_RPO]


# theta_0's SFT (from random init) and the verified loop under test.
RECIPE_SFT = {"lr": 3e-3, "epochs": 20}
# Iterative RPO from theta_0: 3 iterations, one (chosen, rejected) pair per training prompt, DPO
# (beta 0.1) + 1.0 x NLL of the chosen, Adam at LR 3e-4 for 2 epochs of the pairs (~43 steps).
RECIPE_RPO = ["data.num_prompts=700", "selfimprove.num_samples=4", "spin.loss=logistic", "spin.beta=[0.1]",
              "spin.sft_weight=1.0", "train.lr=[3e-4]", "train.epochs=2", "run.iterations=3"]


def _rank(root: str, seed: int) -> list[dict]:
    import copy
    import warnings

    warnings.filterwarnings("ignore")
    from spin_mcore.config import load_config
    from spin_mcore.loop import prepare
    from spin_mcore.platform import init_distributed
    from spin_mcore.selfimprove.rpo import run_rpo
    from spin_mcore.training.trainer import train

    root = Path(root)
    cfg = load_config(overrides=_overrides(root, seed))
    pstate = init_distributed(cfg.parallel, seed=seed, platform=cfg.platform)
    sft = copy.deepcopy(cfg)
    sft.train.objective, sft.train.lr, sft.train.epochs = "sft", [RECIPE_SFT["lr"]], RECIPE_SFT["epochs"]
    sft.data.num_prompts = None
    data = prepare(sft, pstate)
    labelled = [{"prompt_id": p.id, "prompt_ids": p.prompt_ids, "real_ids": p.response_ids} for p in data.train[:N_SFT]]
    summary = train(sft, pstate, labelled, None, root / "sft")
    cfg.run.init_checkpoint = str(summary.get("model", root / "sft" / "model"))
    return run_rpo(cfg, pstate)


def run_improvement(root: Path, seed: int) -> list[dict]:
    """Data, tokenizer, theta_0 and the ReST^EM rows (theta_0 first) under ``root``."""
    from spin_mcore.data.templates import format_prompt
    from spin_mcore.data.tokenizer import train_sentencepiece
    from spin_mcore.launcher import run_local

    records = small_arith_records(N_RECORDS, seed=1000 + seed)
    (root / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    train_sentencepiece([format_prompt(r["prompt"], "instruction") + r["response"] for r in records],
                        root / "tokenizer", vocab_size=320, seed=0)
    return run_local(_rank, 1, str(root), seed)[0]


@pytest.mark.skipif(os.environ.get("SPIN_IMPROVEMENT_EXPERIMENT") != "1",
                    reason="opt-in experiment (SPIN_IMPROVEMENT_EXPERIMENT=1): the improvement does not hold "
                           "beyond noise across seeds, see the module docstring")
def test_rpo_beats_theta0_by_more_than_the_noise(tmp_path):
    rows = run_improvement(tmp_path, SEED)
    p0, p1, n = rows[0]["exact_match"], rows[-1]["exact_match"], N_HELDOUT
    se = math.sqrt(p0 * (1 - p0) / n)
    summary = (f"held-out greedy exact match over {n} prompts: theta_0 {p0:.3f} -> "
               + " -> ".join(f"{r['exact_match']:.3f}" for r in rows[1:])
               + f"; gain {p1 - p0:+.3f}, binomial se of theta_0 {se:.3f}, gain/se {(p1 - p0) / max(se, 1e-9):.1f}")
    print(summary)
    assert all(r["train_steps"] for r in rows[1:]), f"an iteration did not train: {rows[1:]}"
    assert 0.05 < p0 < 0.5, f"theta_0 is not a partial solver ({summary}); the setting is off"
    assert p1 - p0 > 3 * se, summary
