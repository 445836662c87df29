"""The one-GPU acceptance run (issue 25), checked on the CPU: the scripts, the summary's schema, the runner's
refusals and failure records, and the check bodies at tiny sizes on the CPU (the GPU checks themselves need
a lent GPU: bash launch/gpu_acceptance.sh there)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spin_mcore.acceptance import registry
from spin_mcore.acceptance.runner import run_group
from spin_mcore.acceptance.summary import (
    NO_CUDA,
    SCHEMA,
    CheckResult,
    SummaryError,
    build_summary,
    validate_summary,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]
ACCEPTANCE = ROOT / "launch" / "gpu_acceptance.sh"
FETCH = ROOT / "launch" / "fetch_gpu_wheels.sh"


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)
    env.pop("OUT", None)
    return env


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed: .ci/run installs it, so CI must have it")
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "-x", str(ACCEPTANCE), str(FETCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("quick", [False, True])
def test_dry_run_lists_every_check_and_writes_nothing(tmp_path, quick):
    out = tmp_path / "out"
    args = ["bash", str(ACCEPTANCE), "--dry-run"] + (["--quick"] if quick else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(OUT=str(out)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for name in [registry.INSTALL.name] + [c.name for c in registry.CHECKS]:
        assert f"  {name} " in text, name
    for n in registry.NOT_CHECKED:
        assert f"not_checked.{n.name}" in text and n.why in text
    mode = "quick" if quick else "full"
    assert f"({mode}: budget {registry.BUDGET_S[mode]} s" in text
    assert "--no-index" in text and "--target" in text  # what it would install, without network
    assert not out.exists()


def test_bad_arguments_are_refused():
    for script in (ACCEPTANCE, FETCH):
        proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, env=_env())
        assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.acceptance", "--only", "nope", "--out", "/nonexistent"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 2 and "unknown groups or checks ['nope']" in proc.stderr


def test_fetch_refuses_wheels_over_the_limit(tmp_path):
    """Offline: --check-only measures the directory against the limit (apparent sizes, as they travel)."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "small-1.0-py3-none-any.whl").write_bytes(b"x" * 1024 * 1024)
    proc = subprocess.run(["bash", str(FETCH), "--dest", str(wheels), "--check-only"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "holds 1.0 MiB (limit 60 MiB)" in proc.stdout
    with open(wheels / "big-1.0-py3-none-any.whl", "wb") as f:  # sparse: 61 MiB apparent, no disk used
        f.truncate(61 * 1024 * 1024)
    proc = subprocess.run(["bash", str(FETCH), "--dest", str(wheels), "--check-only"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "REFUSED" in proc.stderr and "62.0 MiB, over the 60 MiB limit" in proc.stderr
    assert "61.0 MiB  big-1.0-py3-none-any.whl" in proc.stdout  # the culprit is listed
    proc = subprocess.run(["bash", str(FETCH), "--dest", str(wheels), "--check-only", "--max-mib", "100"],
                          capture_output=True, text=True)
    assert proc.returncode == 0


def test_fetch_pins_the_megatron_of_setup_py():
    assert '"megatron-core==0.16.1"' in (ROOT / "setup.py").read_text()
    text = FETCH.read_text()
    assert "--python-version 3.12" in text and "--only-binary=:all:" in text and "manylinux" in text
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()


def test_registry_fits_the_budgets_and_every_check_exists():
    """Group limits leave the install its share of the 8 (full) and 3 (quick) minutes; every func resolves."""
    import importlib

    assert sum(g.timeout_full for g in registry.GROUPS) <= registry.BUDGET_S["full"] - 60 == 420
    assert sum(g.timeout_quick for g in registry.GROUPS) <= registry.BUDGET_S["quick"] - 35 == 145
    names = registry.all_names()
    assert len(names) == len(set(names))
    assert {c.group for c in registry.CHECKS} == {g.name for g in registry.GROUPS}
    for check in registry.CHECKS:
        module, func = check.func.split(":")
        assert callable(getattr(importlib.import_module(f"spin_mcore.acceptance.{module}"), func)), check.func


def _synthetic_results() -> list[CheckResult]:
    """A recorded-looking run: every registered name, every status."""
    out = [CheckResult("install", "install", "pass", "installed", {"pip_status": 0, "path": "/tmp/site"}, 21.0)]
    for i, c in enumerate(registry.CHECKS):
        if i == 0:
            out.append(CheckResult(c.name, c.group, "pass", "cuda:0 = NVIDIA H200",
                                   {"memory_gib": 139.8, "nan": float("nan"), "ok": True, "n": 132, "none": None}, 3.2))
        elif i == 1:
            out.append(CheckResult(c.name, c.group, "fail", "kernels reach 61% of 4.8 TB/s",
                                   {"fwd_tb_per_s": 2.9}, 5.0, "kernels reach 61% of 4.8 TB/s, goal 70%"))
        else:
            out.append(CheckResult(c.name, c.group, "skip", NO_CUDA, {}, 0.1, NO_CUDA))
    out += [CheckResult(f"not_checked.{n.name}", "not_checked", "not_checked", n.what, {}, 0.0, n.why)
            for n in registry.NOT_CHECKED]
    return out


def test_summary_schema_on_a_synthetic_run(tmp_path):
    summary = build_summary(_synthetic_results(), "full", "2026-11-20T10:00:00Z", 312.5,
                            {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "gpus": 1})
    path = write_summary(summary, tmp_path / "gpu_acceptance.json", registry.all_names())
    loaded = json.loads(path.read_text())
    validate_summary(loaded, registry.all_names())
    assert loaded["schema"] == SCHEMA and loaded["ok"] is False
    assert loaded["counts"] == {"pass": 2, "fail": 1, "skip": len(registry.CHECKS) - 2,
                                "not_checked": len(registry.NOT_CHECKED)}
    assert loaded["checks"][1]["figures"]["nan"] is None  # NaN is written as null, never as NaN

    def broken(mutate) -> str:
        bad = json.loads(path.read_text())
        mutate(bad)
        with pytest.raises(SummaryError) as err:
            validate_summary(bad, registry.all_names())
        return str(err.value)

    assert "checks missing: ['engine.greedy']" in broken(lambda s: s["checks"].pop(-len(registry.NOT_CHECKED) - 1))
    assert "more than once" in broken(lambda s: s["checks"].append(s["checks"][0]))
    assert "status 'passed'" in broken(lambda s: s["checks"][0].update(status="passed"))
    assert "a pass has no reason" in broken(lambda s: s["checks"][0].update(reason="x"))
    assert "needs a reason" in broken(lambda s: s["checks"][2].update(reason=None))
    assert "counts" in broken(lambda s: s["counts"].update(fail=0))
    assert "ok is True with 1 failed" in broken(lambda s: s.update(ok=True))
    assert "not a JSON scalar" in broken(lambda s: s["checks"][1]["figures"].update(nested={"a": 1}))
    assert "write null" in broken(lambda s: s["checks"][1]["figures"].update(x=math.inf))
    assert "one non-empty line" in broken(lambda s: s["checks"][1].update(summary="a\nb"))
    assert "schema is" in broken(lambda s: s.update(schema="other/2"))
    assert "missing key 'environment'" in broken(lambda s: s.pop("environment"))
    assert "not registered: ['mystery']" in broken(
        lambda s: s["checks"].append(dict(s["checks"][2], name="mystery")) or s["counts"].update(skip=s["counts"]["skip"] + 1))


def test_runner_on_cpu_records_every_gpu_check_as_skipped(tmp_path):
    """No CUDA: each GPU check refuses in one line and is recorded as 'skipped: no CUDA'; nothing crashes."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.acceptance", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_acceptance.json").read_text())
    validate_summary(summary, registry.all_names())
    by_name = {c["name"]: c for c in summary["checks"]}
    for check in registry.CHECKS:
        assert by_name[check.name]["status"] == "skip" and by_name[check.name]["reason"] == NO_CUDA, by_name[check.name]
        assert f"SKIP {check.name:22s} {NO_CUDA}" in proc.stdout
    assert by_name["install"]["status"] == "skip"  # not run through the script: nothing was installed
    assert all(by_name[f"not_checked.{n.name}"]["status"] == "not_checked" for n in registry.NOT_CHECKED)
    assert summary["ok"] is True and summary["counts"]["fail"] == 0 and summary["mode"] == "quick"


def test_only_selected_groups_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.acceptance", "--only", "engine", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads((out / "gpu_acceptance.json").read_text())["checks"]}
    assert checks["engine.greedy"]["reason"] == NO_CUDA
    assert checks["spin.step"]["reason"] == "skipped: not selected (--only engine)"


def _script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "fake_worker.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_a_crashed_or_hung_worker_fails_its_unfinished_checks(tmp_path):
    checks = registry.checks_for("platform")
    results = tmp_path / "platform.jsonl"
    first = CheckResult(checks[0].name, "platform", "pass", "fine", {"x": 1}, 1.0)
    crash = _script(tmp_path, f"import json, os\nopen({str(results)!r}, 'a').write(json.dumps({first.to_json()!r}) + '\\n')\n"
                              "print('RuntimeError: CUDA error: an illegal memory access', flush=True)\nos._exit(3)\n")
    out = run_group("platform", checks, crash, 30, results)
    assert [r.status for r in out] == ["pass", "fail", "fail"]
    assert out[1].reason.startswith("not finished: group 'platform' worker exited with status 3")
    assert "illegal memory access" in out[1].reason

    hang = _script(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    t0 = time.monotonic()
    out = run_group("platform", checks, hang, 2, results)
    assert time.monotonic() - t0 < 30
    assert all(r.status == "fail" and "killed at its 2 s limit" in r.reason for r in out)


# ----------------------------------------------------------------------------- the check bodies, tiny, on the CPU


def test_accuracy_comparisons_on_cpu():
    """The oracle comparison of triton.accuracy (Triton interpreted here): passes our op, catches a wrong grad."""
    from spin_mcore.acceptance import checks_logprobs as cl

    x, labels, mask, w_seq, w_tok = cl.make_case(3, 21, 300, 290, seed=1, seq_major=True, mask_kind="random",
                                                 device="cpu")
    backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "chunked"
    tok, seq, grad = cl.run_ours(x, labels, mask, 290, w_seq, w_tok, backend)
    figures = cl.against_oracle(x, labels, mask, 290, w_seq, w_tok, tok, seq, grad, rows=8)
    assert cl.accurate(figures), figures
    assert figures["padding_grad_max"] == 0 and figures["masked_grad_max"] == 0 and figures["nan_outputs"] == 0
    assert figures["grad_elementwise_ratio"] <= 1 and figures["grad_tol_ratio"] <= 1
    wrong = grad.clone()
    wrong[0, 3, 5] += 0.05
    assert not cl.accurate(cl.against_oracle(x, labels, mask, 290, w_seq, w_tok, tok, seq, wrong, rows=8))
    # 5% off in one off-label column: within the tests' eps * max|g| tolerance, caught per element.
    subtle = grad.clone()
    assert int(labels[0, 0]) == 0 and bool(mask[0, 0])
    subtle[0, 0, 7] *= 1.05
    caught = cl.against_oracle(x, labels, mask, 290, w_seq, w_tok, tok, seq, subtle, rows=8)
    assert caught["grad_tol_ratio"] <= 1 < caught["grad_elementwise_ratio"] and not cl.accurate(caught)

    x, labels, mask, w_seq, w_tok = cl.make_case(2, 16, 256, None, seed=2, seq_major=False, mask_kind="prompt",
                                                 device="cpu")
    tok, seq, grad = cl.run_ours(x, labels, mask, None, w_seq, w_tok, backend)
    cpu = cl.against_cpu(x, labels, mask, None, w_seq, w_tok, tok, grad, rows=12)
    assert cpu["cpu_grad_tol_ratio"] <= 1 and cpu["cpu_grad_elementwise_ratio"] <= 1, cpu
    assert cpu["cpu_tok_max_abs_diff"] <= 1e-4, cpu


def test_fused_linear_comparison_on_cpu():
    from spin_mcore.acceptance.measure import fused_linear_vs_materialised

    r = fused_linear_vs_materialised(512, 64, 32, None, 1, torch.device("cpu"), torch.float32)
    assert set(r["rel_diff"]) == {"seq", "dh", "dw"} and max(r["rel_diff"].values()) < 1e-5, r
    assert r["fused"]["extra_x_logits"] < r["materialised"]["extra_x_logits"]


TINY_SPIN = dict(layers=2, hidden=64, ffn=176, heads=4, groups=2, vocab=512, seq=64, batch=4, micro=2, steps=2)


def test_spin_steps_on_cpu(tmp_path):
    """spin.step's body at a tiny size in fp32: the calls of one SPIN iteration, step-0 loss exactly ln 2."""
    from spin_mcore.acceptance.checks_training import spin_steps
    from spin_mcore.launcher import run_local

    (f,) = run_local(spin_steps, 1, TINY_SPIN, tmp_path, "cpu")
    assert f["ln2_deviation"] < 1e-6 and f["all_finite"], f
    assert f["steps"] == 2 and f["skipped"] == 0 and f["tokens_per_s"] > 0 and f["mfu_of_989"] > 0
    assert f["core_attention"] == "SDPAttention" and f["precision"] == "fp32"


def _engine_worker(work: str) -> dict:
    from spin_mcore.acceptance.checks_engine import engine_vs_transformers
    from spin_mcore.config import ParallelConfig, PlatformConfig
    from spin_mcore.platform import init_distributed

    torch.set_num_threads(1)
    pstate = init_distributed(ParallelConfig(), seed=1, platform=PlatformConfig(device="cpu"))
    return engine_vs_transformers(pstate, Path(work), ("fp32",))


def test_engine_comparison_on_cpu(tmp_path):
    from spin_mcore.launcher import run_local

    (res,) = run_local(_engine_worker, 1, str(tmp_path))
    got, expected = res["fp32"]
    assert got == expected and sum(map(len, expected)) > 0
