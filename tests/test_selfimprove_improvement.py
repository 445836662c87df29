"""The issue's "one assertion of improvement" at test size: ReST^EM raises held-out greedy exact match
over theta_0 by more than 3 binomial standard errors (measured on seeds 0, 1 and 2; asserted on seed 0).

Setting (built here, CPU, tiny model): small-operand arithmetic in the demo's human format
("7 + 5 = 12. The answer is 12."), operands 0..12, four addition and three subtraction phrasings,
900 distinct records split by ``data.seed`` into 200 held-out and 700 training records. Prompts are
left-truncated to 28 tokens (``data.max_prompt_length``, the earlier experiment's setting): that drops the
constant "### Instruction: " head and at most the words "Find the", never an operand or the operation
(checked below on every loop prompt). Without truncation (48 tokens) theta_0 is weaker (0.100) and the same
loop gains only +2.8 se on seed 0 (0.100 -> 0.130 -> 0.170 -> 0.160; pass@16 0.28 -> 0.50).
* theta_0: a 2-layer, 48-wide GPT, SFT from random init on the human answers of the first 300 training
  records (Adam 3e-3, 20 epochs, 187 steps). A partial solver: 0.105-0.14 held-out exact match.
* The loop: ReST^EM on the other 400 training prompts, whose human answers nothing ever trains on; the
  held-out prompts are never sampled or trained on (both checked below). K = 16 samples per prompt at
  temperature 1, keep the verified ones (at most 1 per prompt), M-step continuing from theta_t
  (``selfimprove.restart_from_base=false``) for 10 epochs at Adam 1e-3 with no warmup (the warmup's first
  step runs at LR 0), 3 iterations.
* The verifier: ``verify.kind=arith_equation`` (spin_mcore/selfimprove/verifiers.py). The whole response
  must be "x op y = c. The answer is w." with x op y = c = w = the reference. It checks the rationale's
  arithmetic by computing it, not by comparing with the human text. Held-out exact match is judged by the
  same verifier (the loops' ``evaluate_policy``), so theta_0's numbers are lower than ``arith``'s.
* Noise: the binomial standard error of theta_0's held-out exact match, se = sqrt(p0 (1 - p0) / 200).

Measured with this file (2 cores), held-out greedy exact match theta_0 -> iter 1 -> iter 2 -> iter 3,
final gain in se of theta_0, the paired McNemar statistic theta_0 vs theta_3 over the same 200 prompts
(b: wrong -> right, c: right -> wrong, z = (b - c) / sqrt(b + c), also asserted > 3), pass@16 on the loop
prompts per iteration:
* seed 0: 0.120 -> 0.215 -> 0.255 -> 0.340 (se 0.023, +9.6 se; b 47, c 3, z 6.2); pass@16 0.38 / 0.55 / 0.65,
  kept 150 / 218 / 260.
* seed 1: 0.105 -> 0.170 -> 0.270 -> 0.305 (se 0.022, +9.2 se; b 48, c 8, z 5.3); pass@16 0.34 / 0.52 / 0.64.
* seed 2: 0.140 -> 0.170 -> 0.235 -> 0.315 (se 0.025, +7.1 se; b 45, c 10, z 4.7); pass@16 0.43 / 0.59 / 0.71.
Held-out NLL of the human answers stays about level (seed 0: 0.183 -> 0.196). Runtime 110-143 s per seed on
2 shared cores (SFT ~22 s, sampling 3 x 6400 samples ~40 s, M-steps ~20 s, evaluations ~10 s). Seeds 1 and 2
run with SPIN_IMPROVEMENT_ALL_SEEDS=1.
Control, this file with ``selfimprove.keep_threshold=0`` (the same loop keeping every sample, 1 per prompt),
seed 0: 0.120 -> 0.095 -> 0.105 -> 0.080 (-1.7 se; b 7, c 15, z -1.7), pass@16 falling 0.38 -> 0.28 -> 0.22,
held-out NLL rising 0.183 -> 0.319; the "trained only on verified samples" check below fails on it, as it
should. The gain is the verifier's.

What did NOT work, for the record (same data unless said; gains in se of theta_0):
* The demo's ``arith`` verifier (the integer after "The answer is" only). It accepts rationales such as
  "8 + 12 = 12. The answer is 20." or "12 + 1W 8. The answer is 21."; only 298 of its 610 correct
  samples in iteration 1 (seed 0) were well-formed, and training on the rest teaches garbage. With the
  recipe above (exact match judged by ``arith``): 0.165 -> 0.170 -> 0.215 -> 0.220 (+2.1 se, seed 0).
  Earlier recipes with it (K = 4, 700 loop prompts including the labelled 300, Iterative RPO at 3e-4 or
  ReST^EM from theta_0 at 1e-3) moved exact match by about +-2 se in a direction that changed with the
  seed (+3.1 se once, seed 0, not repeated).
* Iterative RPO with this verifier and data (a /tmp scratch copy, seed 0; K = 16, DPO beta 0.1 + 1.0 x NLL,
  Adam 1e-3, 4 epochs, no warmup; 248 / 154 / 116 of 400 chosen answers were the reference fallback):
  0.120 -> 0.125 -> 0.185 -> 0.150 (+1.3 se; McNemar z 1.0), held-out NLL 0.183 -> 0.165. Not beyond noise.
* M-step from theta_0 each iteration (the paper's default) on the 400 unlabelled prompts, with ``arith``
  (exact match judged by ``arith``, K = 16): 4 epochs at 1e-3: 0.165 -> 0.175 -> 0.175; 20 epochs at 3e-3:
  0.165 -> 0.190 -> 0.180 with held-out NLL 0.18 -> 0.33, while pass@1 on the loop prompts rose 0.10 -> 0.47
  (it fits the kept prompts; the 300 labelled ones are no longer in its training data, so probably forgotten).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
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


# ReST^EM on the unlabelled prompts: K = 16, keep verified (1 per prompt), M-step from theta_t, 10 epochs
# at Adam 1e-3 without warmup, 3 iterations.
RECIPE_RESTEM = ["selfimprove.num_samples=16", "selfimprove.keep_threshold=1.0", "selfimprove.max_per_prompt=1",
                 "selfimprove.restart_from_base=false", "train.lr=[1e-3]", "train.epochs=10",
                 "train.warmup_fraction=0", "run.iterations=3"]
# theta_0's SFT (from random init) on the first N_SFT training records' human answers.
RECIPE_SFT = {"lr": 3e-3, "epochs": 20, "warmup_fraction": 0.1}


def _overrides(root: Path, seed: int) -> list[str]:
    return [*tiny_model_overrides(), "model.hidden_size=48", "model.ffn_hidden_size=128", "precision.recipe=fp32",
            "platform.device=cpu", f"data.path={root / 'arith.jsonl'}",
            f"data.tokenizer={root / 'tokenizer' / 'tokenizer.model'}", "data.max_prompt_length=28",
            "data.max_response_length=26", f"data.heldout_fraction={N_HELDOUT / N_RECORDS}", f"data.seed={seed}",
            "generation.max_new_tokens=26", "generation.batch_size=256", "generation.shard_size=100000",
            "generation.temperature=1.0", f"generation.seed={seed}", "train.optimizer=adam",
            "train.global_batch_size=32", "train.micro_batch_size=32", "train.save_interval=100000",
            f"train.seed={seed}", f"run.eval_prompts={N_HELDOUT}", f"run.dir={root / 'restem'}",
            "verify.kind=arith_equation", "selfimprove.min_distinct_2=0.0",
            *RECIPE_RESTEM]


def _greedy_correct(cfg, pstate, data, theta: str) -> list[bool]:
    """Per held-out prompt: is ``theta``'s greedy decode correct (the decode of the loops' evaluate_policy)."""
    from spin_mcore.eval.builtin import decode_responses
    from spin_mcore.generation.sampling import sampling_vocab_size
    from spin_mcore.loop import load_policy
    from spin_mcore.selfimprove.verifiers import run_verifier

    model = load_policy(cfg, pstate, theta)
    texts = decode_responses(model, pstate, data.heldout, data.tokenizer, cfg.generation.max_new_tokens,
                             sampling_vocab_size(cfg.model.vocab_size, data.tokenizer), cfg.generation.batch_size)
    return [run_verifier(data.verifier, x, data.references[str(p.id)]).correct for x, p in zip(texts, data.heldout)]


def _rank(root: str, seed: int) -> dict:
    import copy
    import warnings

    warnings.filterwarnings("ignore")
    from spin_mcore.config import load_config
    from spin_mcore.loop import prepare
    from spin_mcore.platform import init_distributed
    from spin_mcore.run_dir import RunDir
    from spin_mcore.selfimprove.common import prepare_verified
    from spin_mcore.selfimprove.restem import run_restem
    from spin_mcore.training.trainer import train
    from spin_mcore.utils.io import read_json

    root = Path(root)
    cfg = load_config(overrides=_overrides(root, seed))
    pstate = init_distributed(cfg.parallel, seed=seed, platform=cfg.platform)
    sft = copy.deepcopy(cfg)
    sft.train.objective, sft.train.lr, sft.train.epochs = "sft", [RECIPE_SFT["lr"]], RECIPE_SFT["epochs"]
    sft.train.warmup_fraction = RECIPE_SFT["warmup_fraction"]
    labelled = prepare(sft, pstate).train[:N_SFT]
    summary = train(sft, pstate, [{"prompt_id": p.id, "prompt_ids": p.prompt_ids, "real_ids": p.response_ids}
                                  for p in labelled], None, root / "sft")
    cfg.run.init_checkpoint = str(summary.get("model", root / "sft" / "model"))
    data = prepare_verified(cfg, pstate)  # the same split (data.seed, heldout_fraction) as theta_0's SFT
    labelled_ids = {str(p.id) for p in labelled}
    data.train = [p for p in data.train if str(p.id) not in labelled_ids]  # unlabelled prompts only
    rows = run_restem(cfg, pstate, data=data)
    theta_last = read_json(RunDir(cfg.run.dir).eval_file(cfg.run.iterations - 1))["theta_next"]
    paired = [_greedy_correct(cfg, pstate, data, theta) for theta in (cfg.run.init_checkpoint, theta_last)]
    return {"rows": rows, "paired": paired, "labelled": sorted(labelled_ids), "loop": [str(p.id) for p in data.train],
            "heldout": [str(p.id) for p in data.heldout]}


def mcnemar(before: list[bool], after: list[bool]) -> tuple[int, int, float]:
    """Paired test over the same prompts: b = wrong before and right after, c = the reverse,
    z = (b - c) / sqrt(b + c) (approximately standard normal when nothing changed)."""
    b = sum((not x) and y for x, y in zip(before, after))
    c = sum(x and not y for x, y in zip(before, after))
    return b, c, (b - c) / math.sqrt(b + c) if b + c else 0.0


def run_improvement(root: Path, seed: int) -> dict:
    """Data, tokenizer, theta_0 and the ReST^EM rows (theta_0 first) under ``root``; the prompt id sets."""
    from spin_mcore.data.templates import format_prompt
    from spin_mcore.data.tokenizer import train_sentencepiece
    from spin_mcore.launcher import run_local

    records = small_arith_records(N_RECORDS, seed=1000 + seed)
    (root / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    train_sentencepiece([format_prompt(r["prompt"], "instruction") + r["response"] for r in records],
                        root / "tokenizer", vocab_size=320, seed=0)
    return run_local(_rank, 1, str(root), seed)[0]


def test_restem_beats_theta0_by_more_than_the_noise(tmp_path):
    start = time.time()
    out = run_improvement(tmp_path, SEED)
    rows = out["rows"]
    p0, p1, n = rows[0]["exact_match"], rows[-1]["exact_match"], len(out["heldout"])
    se = math.sqrt(p0 * (1 - p0) / n)
    b, c, z = mcnemar(*out["paired"])
    summary = (f"held-out greedy exact match over {n} prompts: theta_0 {p0:.3f} -> "
               + " -> ".join(f"{r['exact_match']:.3f}" for r in rows[1:])
               + f"; gain {p1 - p0:+.3f}, binomial se of theta_0 {se:.3f}, gain/se {(p1 - p0) / max(se, 1e-9):.1f}"
               + f"; McNemar b={b} c={c} z={z:.1f}; {time.time() - start:.0f} s")
    print(summary)
    # The paired decodes are the rows' own (same checkpoints, same greedy decode, same verifier).
    assert [sum(x) / n for x in out["paired"]] == [p0, p1], summary
    assert n == N_HELDOUT and len(out["loop"]) == N_RECORDS - N_HELDOUT - N_SFT
    loop, heldout, labelled = set(out["loop"]), set(out["heldout"]), set(out["labelled"])
    texts = {r["id"]: r["prompt"] for r in map(json.loads, (tmp_path / "arith.jsonl").open())}
    assert not loop & heldout and not loop & labelled and not labelled & heldout
    # Nothing fakes the gain: every record the M-steps trained on is a verified sample of an unlabelled prompt.
    for t in range(len(rows) - 1):
        assert rows[t + 1]["train_steps"], f"iteration {t} did not train: {rows[t + 1]}"
        verified = [json.loads(x) for x in (tmp_path / "restem" / f"iter_{t}" / "train_verified.jsonl").open()]
        trained = [json.loads(x) for x in (tmp_path / "restem" / f"iter_{t}" / "train_data.jsonl").open()]
        correct = {(str(r["prompt_id"]), tuple(r["generated_ids"])) for r in verified if r["correct"]}
        assert {str(r["prompt_id"]) for r in verified} == loop
        assert all(re.findall(r"\d+", r["prompt"]) == re.findall(r"\d+", texts[str(r["prompt_id"])]) for r in verified)
        assert len(trained) == rows[t + 1]["kept"] > 0
        assert all((str(r["prompt_id"]), tuple(r["real_ids"])) in correct for r in trained)
    assert 0.05 < p0 < 0.5, f"theta_0 is not a partial solver ({summary}); the setting is off"
    assert p1 - p0 > 3 * se, summary
    assert z > 3, summary


@pytest.mark.skipif(os.environ.get("SPIN_IMPROVEMENT_ALL_SEEDS") != "1",
                    reason="the docstring's other seeds, ~2 min each: SPIN_IMPROVEMENT_ALL_SEEDS=1")
@pytest.mark.parametrize("seed", [1, 2])
def test_restem_beats_theta0_other_seeds(tmp_path, seed):
    out = run_improvement(tmp_path, seed)
    rows, (b, c, z) = out["rows"], mcnemar(*out["paired"])
    p0, p1 = rows[0]["exact_match"], rows[-1]["exact_match"]
    summary = f"seed {seed}: {[r['exact_match'] for r in rows]}, McNemar b={b} c={c} z={z:.1f}"
    print(summary)
    assert p1 - p0 > 3 * math.sqrt(p0 * (1 - p0) / N_HELDOUT) and z > 3, summary
