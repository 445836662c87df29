"""Verifier plug-ins: each kind's cases, the python_tests sandbox's limits, and config-time errors."""

from __future__ import annotations

import time

import pytest

from spin_mcore.config import ConfigError, load_config
from spin_mcore.selfimprove.verifiers import (ArithAnswer, ExactMatch, NumericAnswer, PythonTests, RegexAnswer,
                                              Verdict, Verifier, build_verifier, run_verifier)


def _build(**fields):
    cfg = load_config()
    for k, v in fields.items():
        setattr(cfg.verify, k, v)
    return build_verifier(cfg.verify)


def make_plugin(verify_section):
    """A user plug-in factory (verify.kind=tests.test_verifiers:make_plugin)."""
    return ExactMatch()


def test_exact_match():
    v = ExactMatch()
    assert run_verifier(v, "  Paris \n", "Paris").status == "correct"
    assert run_verifier(v, "paris", "Paris").status == "wrong"
    assert run_verifier(v, "   ", "Paris").status == "no_answer"


def test_numeric_with_tolerance():
    v = NumericAnswer(tolerance=0.01)
    assert run_verifier(v, "so x = 3.14159", 3.14).correct
    assert run_verifier(v, "first 7, finally 1,234.5", 1234.5).correct  # the last number, commas dropped
    assert run_verifier(v, "x = 3.2", 3.14).status == "wrong"
    assert run_verifier(v, "no digits here", 3).status == "no_answer"
    tagged = _build(kind="numeric", tolerance=0.5, pattern=r"####\s*(\S+)")
    assert run_verifier(tagged, "5 apples ... #### 12.3", 12).correct
    assert run_verifier(tagged, "5 apples ... 12", 12).status == "no_answer"


def test_regex_final_answer():
    v = RegexAnswer(r"answer is (\w+)")
    assert run_verifier(v, "the answer is B, no wait, the answer is C", "C").correct  # last match counts
    assert run_verifier(v, "the answer is B", "C").status == "wrong"
    assert run_verifier(v, "I do not know", "C").status == "no_answer"


def test_arith_is_the_demo_checker():
    from spin_mcore.demo.task import is_correct

    v = ArithAnswer()
    for text, ref in [("12 + 30 = 42. The answer is 42.", 42), ("12 + 30 = 41. The answer is 41.", 42),
                      ("The answer is -3.", -3), ("12 + 30 = 42.", 42)]:
        assert run_verifier(v, text, ref).correct == is_correct(text, ref)
    assert run_verifier(v, "12 + 30 = 42.", 42).status == "no_answer"


def test_arith_equation_checks_the_whole_equation():
    v = _build(kind="arith_equation")
    assert run_verifier(v, "8 + 4 = 12. The answer is 12.", 12).correct
    assert run_verifier(v, "4 + 8 = 12. The answer is 12.", 12).correct  # another valid rationale
    assert run_verifier(v, "3 - 5 = -2. The answer is -2.", -2).correct
    wrong = run_verifier(v, "8 + 12 = 12. The answer is 20.", 20)  # arith accepts this one
    assert (wrong.correct, wrong.status, wrong.answer) == (False, "wrong", "20")
    assert run_verifier(_build(kind="arith"), "8 + 12 = 12. The answer is 20.", 20).correct
    assert run_verifier(v, "9 + 4 = 12. The answer is 12.", 12).status == "wrong"  # false equation
    assert run_verifier(v, "8 + 4 = 12. The answer is 13.", 13).status == "wrong"  # answer is not c
    assert run_verifier(v, "12 + 1W 8. The answer is 21.", 21).status == "no_answer"
    assert run_verifier(v, "8 - 1 = 7. The answer is 7. 7", 7).status == "no_answer"  # trailing text


def test_python_tests_pass_fail_and_fence():
    v = PythonTests(timeout_s=10, memory_mb=256)
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert run_verifier(v, "def add(a, b):\n    return a + b", tests).status == "correct"
    assert run_verifier(v, "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", tests).correct
    wrong = run_verifier(v, "def add(a, b):\n    return a - b", tests)
    assert wrong.status == "wrong" and "AssertionError" in wrong.detail
    assert run_verifier(v, "def add(a, b) return", tests).status == "wrong"  # syntax error
    assert run_verifier(v, "", tests).status == "no_answer"


def test_python_tests_kills_infinite_loop_within_limit():
    v = PythonTests(timeout_s=1.5, memory_mb=256)
    t0 = time.perf_counter()
    out = run_verifier(v, "def f():\n    while True:\n        pass\nf()", "assert True")
    assert out.status == "timeout" and not out.correct
    assert time.perf_counter() - t0 < 6.0  # 1.5 s limit plus interpreter start, far from forever


def test_python_tests_memory_hog_fails_within_limit():
    v = PythonTests(timeout_s=10, memory_mb=200)
    t0 = time.perf_counter()
    out = run_verifier(v, "x = bytearray(2 * 1024 ** 3)", "assert len(x) > 0")  # 2 GiB against 200 MiB
    assert out.status == "wrong" and "MemoryError" in out.detail
    assert time.perf_counter() - t0 < 10.0


def test_python_tests_has_no_network():
    v = PythonTests(timeout_s=10, memory_mb=256)
    code = ("import socket\nok = False\ntry:\n    s = socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
            "except OSError:\n    ok = True\n")
    assert run_verifier(v, code, "assert ok").correct  # every connect attempt fails inside the sandbox


def test_crashing_verifier_fails_the_sample_only():
    class Broken(Verifier):
        name = "broken"

        def check(self, response, reference):
            raise RuntimeError("boom")

    out = run_verifier(Broken(), "x", "y")
    assert out == Verdict(False, "error", None, "RuntimeError: boom")
    assert run_verifier(ArithAnswer(), "The answer is 3.", "not a number").status == "error"


def test_config_time_errors():
    with pytest.raises(ConfigError, match="verify.kind is not set"):
        build_verifier(load_config().verify)
    with pytest.raises(ConfigError, match="verify.kind='nope'"):
        _build(kind="nope")
    with pytest.raises(ConfigError, match="cannot import"):
        _build(kind="no_such_module_xyz:Verifier")
    with pytest.raises(ConfigError, match="verify.pattern"):
        _build(kind="regex")
    with pytest.raises(ConfigError, match="capturing group"):
        _build(kind="regex", pattern="answer")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        _build(kind="regex", pattern="(unclosed")
    with pytest.raises(ConfigError, match="verify.tolerance"):
        _build(kind="numeric", tolerance=-1)
    with pytest.raises(ConfigError, match="verify.timeout_s"):
        _build(kind="python_tests", timeout_s=0)
    plugin = _build(kind="tests.test_verifiers:make_plugin")
    assert run_verifier(plugin, "a", "a").correct


def test_eval_arith_checker_routes_through_the_plugin():
    from spin_mcore.demo.task import is_correct
    from spin_mcore.eval.builtin import checker_for

    check = checker_for("arith")[0]
    for text, ref in [("1 + 2 = 3. The answer is 3.", 3), ("The answer is 4.", 3), ("no answer", 3)]:
        assert check(text, ref) == is_correct(text, ref)


def test_collapse_watch_counts_and_warns():
    from spin_mcore.selfimprove.common import collapse_watch

    def rec(pid, ids, correct, status=None, answer=None):
        return {"prompt_id": pid, "generated_ids": ids, "correct": correct,
                "status": status or ("correct" if correct else "wrong"), "answer": answer}

    recs = [rec("a", [1, 2, 3], True, answer="3"), rec("a", [1, 2, 4], False, answer="4"),
            rec("b", [1, 2, 3], False, answer="3"), rec("b", [5], False, status="no_answer")]
    s = collapse_watch(recs, 2, min_distinct_2=0.0)
    # unigrams: 1,2,3,1,2,4,1,2,3,5 -> 5 distinct of 10; bigrams: 12,23,12,24,12,23 -> 3 of 6
    assert (s["distinct_1"], s["distinct_2"]) == (0.5, 0.5)
    assert s["unique_answers"] == 1.5 and s["pass_at_1"] == 0.25 and s["pass_at_2"] == 0.5 == s["solved_share"]
    assert s["no_answer"] == 0.25 and s["verifier_errors"] == 0.0
    logged = []
    with pytest.warns(UserWarning, match="distinct-2"):
        collapse_watch(recs, 2, min_distinct_2=0.6, log=logged.append)
    assert len(logged) == 1


def test_cli_refuses_a_bad_verifier_before_any_process(capsys):
    from spin_mcore.cli import main

    assert main(["restem", "verify.kind=no_such_module_xyz:make"]) == 1
    assert "verify.kind='no_such_module_xyz:make': cannot import" in capsys.readouterr().err
    assert main(["rpo", "verify.kind=exact", "spin.sft_weight=0"]) == 1
    assert "spin.sft_weight=0.0" in capsys.readouterr().err
