"""``spin-mcore demo --method all``: its verified loops judge and keep samples with ``arith_equation``
and run the loop of tests/test_selfimprove_improvement.py (where ReST^EM gains 7-10 standard errors) with
the demo's own data and theta_0's SFT optimizer: every training prompt, K = 4 (docs/demo.md has the measured
tables of this recipe and of the test's, which memorises the demo's 512 SPIN prompts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spin_mcore.config import VerifyConfig
from spin_mcore.demo.experiment import SHIPPED_DATA, SIZES, _sft_config, demo_config
from spin_mcore.selfimprove.demo import METHODS, _method_config
from spin_mcore.selfimprove.verifiers import build_verifier, run_verifier
from tests.test_selfimprove_improvement import RECIPE_RESTEM


def _value(cfg, key: str):
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


@pytest.mark.parametrize("method", METHODS)
def test_demo_methods_run_the_improvement_tests_loop_on_the_demos_data(tmp_path, method):
    cfg = demo_config(tmp_path, SIZES["full"], tmp_path / "tok.model", 512, 0)
    m = _method_config(cfg, tmp_path, method)
    # Shared with the improvement test: keep verified only, 1 per prompt, continue from theta_t, 3 iterations.
    shared = [x for x in RECIPE_RESTEM if x.split("=")[0] in ("selfimprove.keep_threshold",
              "selfimprove.max_per_prompt", "selfimprove.restart_from_base", "run.iterations")]
    # The demo's own: theta_0's SFT optimizer (experiment._sft_config), K 4 on every training prompt.
    sft = _sft_config(cfg, tmp_path / "data.jsonl").train
    recipe = [*shared, "verify.kind=arith_equation", f"train.optimizer={sft.optimizer}", f"train.lr={sft.lr}",
              f"train.warmup_fraction={sft.warmup_fraction}", f"train.global_batch_size={sft.global_batch_size}",
              "generation.temperature=1.0", "selfimprove.num_samples=4",
              f"train.epochs={1 if method == 'Iterative RPO' else 2}"]
    if method == "Iterative RPO":  # DPO beta 0.1 + 1.0 x NLL of the chosen
        recipe += ["spin.sft_weight=1.0", "spin.beta=[0.1]", "spin.loss=logistic"]
    want = demo_config(tmp_path, SIZES["full"], tmp_path / "tok.model", 512, 0, recipe)  # parsed as the CLI does
    for key in dict(item.split("=", 1) for item in recipe):
        assert _value(m, key) == _value(want, key), (method, key)
    assert len(shared) == 4 and m.data.num_prompts is None  # every training prompt
    assert (m.selfimprove.max_per_prompt, m.selfimprove.restart_from_base, m.train.lr, m.run.iterations) == (
        1, False, [3e-3], 3)
    # The SPIN part of the demo is untouched: the method configs are copies.
    assert (cfg.verify.kind, cfg.train.optimizer, cfg.train.lr, cfg.run.checker, cfg.data.num_prompts) == (
        None, "rmsprop", [1e-5], "arith", 512)
    assert Path(m.run.dir).parent == tmp_path


def test_arith_equation_judges_the_shipped_data_by_its_arithmetic():
    records = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    equation = build_verifier(VerifyConfig(kind="arith_equation"))
    answer_only = build_verifier(VerifyConfig(kind="arith"))
    human = [run_verifier(equation, r["response"], r["answer"]).correct for r in records]
    assert sum(human) == len(records) == 6000  # every human answer is a well-formed, right rationale

    def broken(text: str) -> str:  # the equation's result off by one, the final answer kept right
        c = re.match(r"\d+ [+-] \d+ = (-?\d+)\.", text).group(1)
        return text.replace(f"= {c}.", f"= {int(c) + 1}.", 1)

    # Every broken rationale passes the SPIN part's checker (the integer after "The answer is"), none this one.
    assert sum(run_verifier(answer_only, broken(r["response"]), r["answer"]).correct for r in records) == 6000
    assert sum(run_verifier(equation, broken(r["response"]), r["answer"]).correct for r in records) == 0
