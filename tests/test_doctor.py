"""`spin-mcore doctor`: each check with concrete facts, the CLI on this CPU machine, and a real sbatch
of launch/spin_70b.sh whose doctor step fails (the job ends in seconds with the table in its log)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spin_mcore.cli import main
from spin_mcore.commands import doctor as d
from spin_mcore.config import load_config
from spin_mcore.plan.disk import iteration_write_bytes
from tests.test_slurm import _job_state, slurm_env  # noqa: F401  (slurm_env: the cluster fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "parallel.tp=1", "parallel.pp=1", "generation.backend=megatron"]


def cfg_of(*overrides: str):
    return load_config(None, [*TINY, *overrides])


# ----------------------------------------------------------------------------- parsers


def test_parsers():
    assert d.parse_version("12.4") == (12, 4) and d.parse_version("2.21.5") == (2, 21, 5)
    assert d.parse_version("12.8.1+cu") == (12, 8, 1) and d.parse_version(None) is None
    smi = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8     |"
    assert d.driver_cuda_from_smi(smi) == "12.8" and d.driver_cuda_from_smi("no header") is None
    assert d.gpus_per_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}) == (4, "SLURM_GPUS_ON_NODE")
    assert d.gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:8"}) == (8, "SLURM_GPUS_PER_NODE")
    assert d.gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:2"}) == (2, "SLURM_GPUS_PER_NODE")
    assert d.gpus_per_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == (3, "CUDA_VISIBLE_DEVICES")
    assert d.gpus_per_node({"CUDA_VISIBLE_DEVICES": ""}) == (0, "CUDA_VISIBLE_DEVICES")
    assert d.gpus_per_node({}) == (None, "")


def test_nearest_existing(tmp_path):
    assert d.nearest_existing(str(tmp_path / "a" / "b" / "c")) == tmp_path


# ----------------------------------------------------------------------------- checks


def test_check_cuda():
    gpu = d.Facts(cuda_available=True, device_count=8)
    none = d.Facts(cuda_available=False)
    assert (d.check_cuda("cuda", gpu).status, d.check_cuda("cuda", gpu).detail) == ("ok", "8 device(s) visible")
    assert d.check_cuda("auto", gpu).status == "ok"
    row = d.check_cuda("cuda", none)
    assert row.status == "FAIL" and row.detail.startswith("CUDA not visible: platform.device=cuda")
    assert row.fix.startswith("request GPUs (sbatch --gpus-per-node=N)")
    assert d.check_cuda("auto", none).status == "skip" and "no CUDA device" in d.check_cuda("auto", none).detail
    assert d.check_cuda("cpu", none).status == "skip"
    row = d.check_cuda("cpu", d.Facts(cuda_available=True, env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert row.status == "FAIL" and "CUDA is visible (CUDA_VISIBLE_DEVICES='0')" in row.detail
    assert row.fix == "export CUDA_VISIBLE_DEVICES= (or set platform.device=cuda)"


def test_check_capability():
    bf16 = cfg_of("precision.recipe=bf16").precision
    fp8 = cfg_of("precision.recipe=fp8").precision
    mx = cfg_of("precision.recipe=fp8", "precision.fp8_scaling=mxfp8", "precision.fp8_format=e4m3").precision
    assert d.check_capability(bf16, (9, 0)).status == "ok"
    assert d.check_capability(bf16, (7, 0)).status == "FAIL"  # V100: no bf16
    assert d.check_capability(fp8, (9, 0)).detail == "compute capability 9.0, precision.recipe=fp8"
    row = d.check_capability(fp8, (8, 0))
    assert row.status == "FAIL" and "needs compute capability >= 8.9" in row.detail and "found compute capability 8.0" in row.detail
    assert d.check_capability(fp8, (8, 9)).status == "ok"
    assert d.check_capability(mx, (9, 0)).status == "FAIL" and "Blackwell" in d.check_capability(mx, (9, 0)).detail
    assert d.check_capability(mx, (10, 0)).status == "ok"


def test_check_driver():
    assert d.check_driver("torch", "12.8", "12.9").status == "ok"
    assert d.check_driver("torch", "12.8", "12.8").status == "ok"
    row = d.check_driver("torch", "12.8", "12.4")
    assert row.status == "warn" and "driver supports 12.4" in row.detail
    row = d.check_driver("torch", "13.0", "12.9")
    assert row.status == "FAIL" and row.detail == "torch needs CUDA 13.0; the driver supports up to 12.9"
    assert "SPIN_TORCH_CUDA" in row.fix
    row = d.check_driver("torch", None, "12.9")
    assert row.status == "FAIL" and "CPU build" in row.detail and row.fix.endswith("bash launch/setup_gpu.sh")
    assert d.check_driver("vllm engine's torch", "12.8", None).status == "warn"


def test_te_requirement_comes_from_megatron_metadata():
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(d.te_requirement()) == SpecifierSet(">=2.9.0a0,<2.12.0")


def test_check_transformer_engine():
    spec = "<2.12.0,>=2.9.0a0"
    assert d.check_transformer_engine("2.10.0", None, spec, fp8=True).status == "ok"
    assert d.check_transformer_engine("2.9.0a0", None, spec, fp8=False).status == "ok"
    row = d.check_transformer_engine("2.12.0", None, spec, fp8=False)
    assert (row.status, row.detail) == ("FAIL", "2.12.0 is outside megatron-core's range <2.12.0,>=2.9.0a0")
    assert row.fix == "pip install --no-build-isolation 'transformer-engine[pytorch]<2.12.0,>=2.9.0a0'"
    assert d.check_transformer_engine("2.8.0", None, spec, fp8=False).status == "FAIL"
    assert d.check_transformer_engine(None, None, spec, fp8=True).status == "FAIL"
    assert d.check_transformer_engine(None, None, spec, fp8=False).status == "warn"
    row = d.check_transformer_engine("2.10.0", "OSError: libcudnn.so.9: cannot open", spec, fp8=True)
    assert row.status == "FAIL" and "libcudnn" in row.detail


def test_check_apex():
    assert d.check_apex(False, False, False).status == "skip"
    assert d.check_apex(True, True, False).status == "ok"
    row = d.check_apex(True, False, False)
    assert row.status == "FAIL" and "Megatron refuses" in row.detail and "launch/setup_gpu.sh" in row.fix
    assert d.check_apex(True, False, True).status == "warn"


def test_check_nccl_and_max_connections():
    assert d.check_nccl("2.21.5") == d.Check("NCCL", "ok", "2.21.5")
    assert d.check_nccl(None).status == "FAIL"
    tp2, tp1 = cfg_of("parallel.tp=2").parallel, cfg_of().parallel
    assert d.check_max_connections({"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, tp2).status == "ok"
    row = d.check_max_connections({}, tp2)
    assert (row.status, row.fix) == ("FAIL", "export CUDA_DEVICE_MAX_CONNECTIONS=1 (launch/spin_job.sh sets it)")
    assert row.detail.startswith("unset; parallel.tp=2")
    assert d.check_max_connections({"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, tp2).detail.startswith("'8'")
    assert d.check_max_connections({}, tp1).status == "warn"


def test_check_engine():
    assert d.check_engine("megatron", None, None).status == "skip"
    ok = {"backend": "vllm", "ok": True, "version": "0.32.0", "problems": []}
    assert d.check_engine("vllm", None, ok) == d.Check("engine (vllm)", "ok", "0.32.0")
    bad = {"backend": "trtllm", "ok": False, "version": None, "problems": ["tensorrt_llm: no module", "no MPI"]}
    row = d.check_engine("trtllm", None, bad)
    assert (row.status, row.detail) == ("FAIL", "tensorrt_llm: no module; no MPI")
    assert row.fix.startswith("bash launch/setup_trtllm.sh")
    assert d.check_engine("vllm", "generation.python=x: missing", None).detail == "generation.python=x: missing"


def test_engine_python_missing_is_a_fail_row(tmp_path):
    cfg = cfg_of("generation.backend=vllm", f"generation.python={tmp_path / 'nope' / 'python'}")
    facts = d.Facts()
    d._engine_facts(cfg, facts)
    assert facts.engine_error.startswith(f"generation.python={tmp_path / 'nope' / 'python'}: ")
    assert "bash launch/setup_vllm.sh" in facts.engine_error


FAKE_ENGINE_PYTHON = """#!/bin/sh
echo "$@" >> {log}
case "$1" in
  -m) echo 'loading...'; echo '{{"backend": "trtllm", "ok": false, "version": "1.2.0", "problems": ["no LogprobMode.RAW"]}}'; exit 1 ;;
  *) echo 9.9.9 ;;
esac
"""


def _fake_engine_python(tmp_path) -> Path:
    fake = tmp_path / "python"
    fake.write_text(FAKE_ENGINE_PYTHON.format(log=tmp_path / "argv"))
    fake.chmod(0o755)
    return fake


def test_engine_check_runs_in_the_engine_python(tmp_path):
    """engine_check's JSON line (after other output) is the result, with PYTHONPATH at the checkout."""
    cfg = cfg_of("generation.backend=trtllm", f"generation.python={_fake_engine_python(tmp_path)}",
                 "platform.device=cpu")
    facts = d.Facts()
    d._engine_facts(cfg, facts)
    assert (tmp_path / "argv").read_text() == "-m spin_mcore.generation.workers.engine_check trtllm\n"
    assert facts.engine_error is None
    row = d.check_engine("trtllm", facts.engine_error, facts.engine_result)
    assert (row.status, row.detail) == ("FAIL", "no LogprobMode.RAW")


def test_engine_import_fallback_without_engine_check(tmp_path, monkeypatch):
    """A checkout without engine_check.py: the engine's python must at least import the engine."""
    monkeypatch.setattr(d, "CHECKOUT", tmp_path)
    cfg = cfg_of("generation.backend=trtllm", f"generation.python={_fake_engine_python(tmp_path)}",
                 "platform.device=cpu")
    facts = d.Facts()
    d._engine_facts(cfg, facts)
    assert (tmp_path / "argv").read_text() == "-c import tensorrt_llm; print(tensorrt_llm.__version__)\n"
    assert facts.engine_result == {"backend": "trtllm", "ok": True, "version": "9.9.9", "problems": []}


def test_check_pmix():
    trt = cfg_of("generation.backend=trtllm").generation
    listing = "MPI plugin types are...\n\tnone\n\tpmi2\n\tcray_shasta\n"
    row = d.check_pmix(trt, True, listing)
    assert row.status == "FAIL" and "(cray_shasta, none, pmi2)" in row.detail
    assert row.fix.endswith("generation.engine_launcher=local")
    assert d.check_pmix(trt, True, listing + "\tpmix\nspecific pmix plugin versions available: pmix_v4\n").status == "ok"
    assert d.check_pmix(trt, False, None).status == "skip"
    assert d.check_pmix(cfg_of("generation.backend=trtllm", "generation.engine_launcher=local").generation,
                        True, listing).status == "skip"
    assert d.check_pmix(cfg_of("generation.backend=vllm").generation, True, listing).status == "skip"


JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}


def test_check_layout():
    cfg = cfg_of("parallel.tp=4", "parallel.pp=2", "model.num_layers=4", "model.num_query_groups=4")
    assert d.check_layout(cfg, "cuda", {}).status == "skip"
    row = d.check_layout(cfg, "cuda", dict(JOB, SPIN_JOB_NTASKS="16"))
    assert (row.status, row.detail) == ("ok", "world 16 = 2 node(s) x 8, dp=2")
    row = d.check_layout(cfg, "cuda", dict(JOB, SLURM_GPUS_ON_NODE="3"))
    assert row.status == "FAIL" and row.detail == "world 6 is not divisible by parallel.tp*pp*cp = 4*2*1 = 8"
    row = d.check_layout(cfg, "cuda", dict(JOB, SPIN_JOB_NTASKS="32"))
    assert row.status == "FAIL" and "32 tasks for 16 GPUs" in row.detail and row.fix == "sbatch --ntasks-per-node=8"
    assert d.check_layout(cfg, "cuda", dict(JOB, SPIN_JOB_NTASKS="8")).status == "warn"
    assert d.check_layout(cfg, "cuda", dict(JOB, SLURM_GPUS_ON_NODE="0")).status == "FAIL"
    trt = cfg_of("generation.backend=trtllm", "generation.engine_tensor_parallel=8")
    row = d.check_layout(trt, "cuda", dict(JOB, SLURM_GPUS_ON_NODE="4"))
    assert row.status == "FAIL" and row.fix == "set generation.engine_tensor_parallel<=4"
    # CPU: the world is the job's tasks (SPIN_JOB_NTASKS, which spin_job.sh passes, wins over the step's).
    tp2 = cfg_of("parallel.tp=2")
    assert d.check_layout(tp2, "cpu", {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SPIN_JOB_NTASKS": "2",
                                       "SLURM_NTASKS": "1"}).status == "ok"
    assert d.check_layout(tp2, "cpu", {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS": "3"}).status == "FAIL"


def test_iteration_write_bytes():
    cfg = load_config(str(ROOT / "spin_mcore/configs/spin_mistral_7b.yaml"))
    need = iteration_write_bytes(cfg)
    n = need["params"]
    assert n == 7_241_732_096  # Mistral-7B, untied embedding and output layer
    # bf16 + RMSProp: 2 (weights) + 4 (fp32 main) + 4 (square_avg) B/param; keep_checkpoints=2 -> 3 at the peak
    assert (need["model"], need["train_state"], need["train_state_count"], need["hf_export"]) == (2 * n, 3 * 10 * n, 3, 0)
    assert need["total"] == 32 * n
    vllm = iteration_write_bytes(load_config(str(ROOT / "spin_mcore/configs/spin_mistral_7b.yaml"),
                                             ["generation.backend=vllm", "train.optimizer=adam", "train.keep_checkpoints=1"]))
    assert (vllm["hf_export"], vllm["train_state"]) == (2 * n, 2 * 14 * n)
    fp32 = iteration_write_bytes(cfg_of("precision.recipe=fp32", "train.keep_checkpoints=0", "data.num_prompts=100",
                                        "train.global_batch_size=10", "train.epochs=2", "train.save_interval=15"))
    # 100 prompts x 2 (previous iteration's pairs) x 2 epochs / 10 = 40 steps -> saves after 15 and 30 (none at the
    # last step: the model save follows); fp32 + RMSProp = 8 B/param
    assert fp32["train_state_count"] == 2 and fp32["train_state"] == 2 * 8 * fp32["params"]


def test_check_disk():
    gb = 10**9
    need = {"model": 10 * gb, "train_state": 60 * gb, "train_state_count": 3, "hf_export": 5 * gb, "total": 75 * gb}
    assert d.check_disk("/x", 700 * gb, need, 3).status == "ok"
    row = d.check_disk("/x", 150 * gb, need, 3)
    assert row.status == "warn" and "2 of run.iterations=3" in row.detail
    row = d.check_disk("/x", 69 * gb, need, 3)
    assert (row.status, row.detail) == ("FAIL", "69.0 GB free at /x; one iteration writes 75.0 GB (model 10.0 GB, "
                                        "3 train states 60.0 GB, HF export 5.0 GB)")
    assert d.check_disk("/x", 3 * 10**12, {**need, "total": 2 * 10**6}, 1).detail.startswith(
        "3.0 TB free at /x; one iteration writes 2.0 MB")


def test_run_checks_on_cpu_skips_the_cuda_rows():
    facts = d.Facts(disk_path="/x", disk_free=10**15)
    rows = {c.name: c for c in d.run_checks(cfg_of("platform.device=cpu"), facts)}
    for name in ("compute capability", "driver vs torch CUDA", "Transformer Engine", "NCCL", "CUDA_DEVICE_MAX_CONNECTIONS"):
        assert rows[name].status == "skip" and rows[name].detail == "platform.device=cpu: running on the CPU (gloo)"
    assert not any(c.status == "FAIL" for c in rows.values())


def test_run_checks_on_a_gpu_node():
    facts = d.Facts(cuda_available=True, device_count=8, capability=(9, 0), torch_cuda="12.8", driver_cuda="12.9",
                    nccl="2.21.5", te_version="2.10.0", te_spec="<2.12.0,>=2.9.0a0", apex_wgrad=False,
                    disk_path="/x", disk_free=10**15,
                    env=dict(JOB, SPIN_JOB_NTASKS="16", CUDA_DEVICE_MAX_CONNECTIONS="1"))
    rows = {c.name: c.status for c in d.run_checks(cfg_of("platform.device=cuda", "parallel.tp=2"), facts)}
    assert rows == {"CUDA": "ok", "compute capability": "ok", "driver vs torch CUDA": "ok", "Transformer Engine": "ok",
                    "apex fused wgrad": "FAIL", "NCCL": "ok", "CUDA_DEVICE_MAX_CONNECTIONS": "ok", "engine": "skip",
                    "SLURM PMIx": "skip", "allocation": "ok", "disk at run.dir": "ok", "data loader (DALI)": "ok"}
    off = {c.name: c.status for c in d.run_checks(cfg_of("platform.device=cuda", "train.fused_kernels=off"), facts)}
    assert off["apex fused wgrad"] == "skip"


def test_check_dali():
    name = "data loader (DALI)"
    ok = d.Facts(dali_build="nvidia-dali-cuda120 2.4.0", dali_device=0)
    assert d.check_dali("torch", "cuda", "12.8", d.Facts(dali_error="x")) == d.Check(name, "skip", "data.loader=torch")
    missing = d.Facts(dali_error="ModuleNotFoundError: No module named 'nvidia'")
    row = d.check_dali("auto", "cpu", None, missing)
    assert row.status == "warn" and "falls back to the torch loader" in row.detail and "No module named" in row.detail
    assert d.check_dali("dali", "cpu", None, missing).status == "FAIL"
    broken = d.Facts(dali_build="nvidia-dali-cuda120 2.4.0", dali_read_error="RuntimeError: CUDA driver too old")
    row = d.check_dali("auto", "cuda", "12.8", broken)  # auto would pick it: a reader that fails is a FAIL
    assert row.status == "FAIL" and "CUDA driver too old" in row.detail and row.fix
    assert d.check_dali("auto", "cuda", "12.8", ok) == d.Check(
        name, "ok", "nvidia-dali-cuda120 2.4.0: two token-store files read back with device_id=0")
    row = d.check_dali("auto", "cuda", "13.0", ok)
    assert row.status == "warn" and row.detail == "nvidia-dali-cuda120 2.4.0 is built for CUDA 12, torch uses CUDA 13.0"
    assert d.check_dali("auto", "cpu", None, ok).status == "ok"  # a CPU run does not care about the wheel's CUDA
    assert d.dali_build_cuda_major("nvidia-dali-cuda130 2.4.0") == 13 and d.dali_build_cuda_major(None) is None


def test_dali_facts_read_a_token_store_here_and_report_a_failing_reader(monkeypatch):
    """The real probe on this machine (DALI is installed by setup_local.sh), then with a reader that breaks."""
    cfg = cfg_of("platform.device=cpu")
    facts = d.Facts()
    d._dali_facts(cfg, facts)
    assert facts.dali_error is None and facts.dali_read_error is None, facts
    assert facts.dali_build.startswith("nvidia-dali-cuda120 ") and facts.dali_device is None
    import spin_mcore.data.dali_loader as dl

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("nvml: driver/library version mismatch\nmore")

    monkeypatch.setattr(dl, "DaliRecordReader", Broken)
    facts = d.Facts()
    d._dali_facts(cfg, facts)
    assert facts.dali_read_error == "RuntimeError: nvml: driver/library version mismatch"
    assert d.check_dali("auto", "cpu", None, facts).status == "FAIL"


# ----------------------------------------------------------------------------- CLI


def test_cli_on_this_cpu_machine(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine running the CPU tests
    assert main(["doctor", *TINY, "platform.device=cpu", f"run.dir={tmp_path / 'run'}", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# spin-mcore doctor on ")
    assert re.match(r"^skip  CUDA +platform.device=cpu: running on the CPU \(gloo\)$", out[1])
    assert re.match(r"^ok    disk at run.dir +[\d,.]+ GB free at " + re.escape(str(tmp_path)), out[11])
    assert re.match(r"^ok    data loader \(DALI\) +nvidia-dali-cuda120 [\d.]+: two token-store files read back on the CPU$",
                    out[12])
    assert out[-2].endswith(": 0 FAIL, 0 warn -> ready")
    report = json.loads(out[-1])
    assert report["ok"] is True and [c["name"] for c in report["checks"]][:2] == ["CUDA", "compute capability"]


def test_cli_packaged_config_through_the_console_script(tmp_path):
    exe = Path(sys.executable).with_name("spin-mcore")
    proc = subprocess.run([str(exe), "doctor", "spin_mcore/configs/spin_mistral_7b.yaml", "platform.device=cpu",
                           "model.preset=tiny", "model.num_layers=2", f"run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-> ready" in proc.stdout and "skip  CUDA " in proc.stdout


def test_cli_cuda_on_a_machine_without_it_fails_with_the_fix(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["doctor", *TINY, "platform.device=cuda", f"run.dir={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL  CUDA +CUDA not visible: platform.device=cuda", out, re.M)
    assert "FAIL  CUDA: request GPUs (sbatch --gpus-per-node=N) and check `nvidia-smi`, or set platform.device=cpu" in out
    assert out.rstrip().endswith(": 1 FAIL, 0 warn -> not ready")


def test_cli_bad_config_value_is_one_line(capsys):
    assert main(["doctor", *TINY, "platform.device=gpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spin-mcore doctor: config error: platform.device")


# ----------------------------------------------------------------------------- under a real SLURM


@pytest.mark.slurm
def test_sbatch_job_whose_doctor_fails_ends_fast_with_the_table(slurm_env, tmp_path):
    import time

    env = slurm_env
    log = tmp_path / "job.log"
    # platform.device=cuda (spin_job.sh's default) on a CPU node: the doctor step fails.
    args = [*TINY, "parallel.vp=null", "parallel.sequence_parallel=false", "precision.recipe=fp32",
            f"run.dir={tmp_path / 'run'}"]
    cmd = ["sbatch", "--parsable", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=00:05:00", f"--output={log}", str(ROOT / "launch/spin_70b.sh"), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    text = log.read_text()
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode != 0, text
    state = _job_state(env, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", (state, text)
    assert re.search(r"^FAIL  CUDA +CUDA not visible: platform.device=cuda", text, re.M), text
    assert "spin_job.sh: spin-mcore doctor failed on a node" in text
    assert "spin_job.sh: job" not in text  # the job step never started
    assert seconds < 120, seconds
