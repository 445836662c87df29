"""How rank 0 starts an external engine's worker: as a child process, or as its own srun job step.

The argv/environment construction is pure and checked field by field; the srun step is also
run for real under the one-node SLURM cluster (`.ci/run` starts it) with a stand-in worker
that records what SLURM gave it (the vLLM worker itself is exercised in tests/test_vllm_engine.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spin_mcore.config import ConfigError, load_config
from spin_mcore.generation import external

from tests.test_slurm import ROOT, slurm_env  # noqa: F401  (the running cluster's environment)

JOB_ENV = {"SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "gpu-node07", "SLURM_NTASKS": "16", "SLURM_NPROCS": "16",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NNODES": "2",
           "SLURM_STEP_NODELIST": "gpu-node[07-08]", "PATH": os.environ["PATH"]}


def _empty_job(path: Path) -> Path:
    """A job with no prompt sets (the stand-in workers below ignore it), its status beside it."""
    from spin_mcore.generation.workers import protocol

    path.parent.mkdir(parents=True, exist_ok=True)
    return protocol.Job(model="m", dtype="float32", max_model_len=8, engine={}, sampling={}, sets=[],
                        status=str(path.with_name("status.json"))).save(path)


def _cfg(*extra: str):
    return load_config(overrides=["generation.backend=vllm", *extra]).generation


def test_local_worker_command_and_environment():
    g = _cfg("generation.engine_launcher=local", "generation.engine_memory_fraction=0.5")
    argv, env = external.worker_command(g, Path("/e/bin/python"), Path("/r/job.json"), "cpu",
                                        {"PYTHONPATH": "/x", "PATH": "/bin"})
    assert argv == ["/e/bin/python", "-m", "spin_mcore.generation.workers.vllm_worker", "/r/job.json"]
    assert env["PYTHONPATH"] == f"{external.CHECKOUT}{os.pathsep}/x"
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1  # half the available RAM, whole GiB
    _, env = external.worker_command(g, Path("/p"), Path("/j"), "cpu", {"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # the user's explicit value wins
    argv, _ = external.worker_command(load_config(overrides=["generation.backend=trtllm"]).generation,
                                      Path("/p"), Path("/j"), "cuda", {})
    assert argv[2] == "spin_mcore.generation.workers.trtllm_worker"


def test_srun_step_command_on_rank_zeros_node_with_the_engines_gpus(monkeypatch):
    monkeypatch.setattr(external.shutil, "which", lambda name: "/usr/bin/srun")
    g = _cfg("generation.engine_tensor_parallel=4")
    assert external.engine_launcher(g, JOB_ENV) == "srun"
    assert external.engine_launcher(g, {"PATH": "/bin"}) == "local"  # auto outside a job
    argv, env = external.worker_command(g, Path("/e/python"), Path("/r/job.json"), "cuda", JOB_ENV)
    assert argv == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "--nodelist=gpu-node07", "--jobid=4242",
                    "--job-name=spin-engine-vllm", "--kill-on-bad-exit=1", "--export=ALL", "--gpus=4",
                    "/e/python", "-m", "spin_mcore.generation.workers.vllm_worker", "/r/job.json"]
    # The training step's shape (16 tasks, 8 per node, 2 nodes) must not reach the engine's step.
    for name in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_STEP_NODELIST"):
        assert name not in env
    assert env["SLURM_JOB_ID"] == "4242"
    argv, _ = external.worker_command(g, Path("/e/python"), Path("/r/job.json"), "cpu", JOB_ENV)
    assert not any(a.startswith("--gpus") for a in argv)
    monkeypatch.setattr(external.shutil, "which", lambda name: None)
    assert external.engine_launcher(g, JOB_ENV) == "local"  # no srun on PATH
    with pytest.raises(ConfigError, match="generation.engine_launcher=srun: not inside a SLURM job"):
        external.worker_command(_cfg("generation.engine_launcher=srun"), Path("/p"), Path("/j"), "cpu", {})


def test_srun_steps_of_n_instances_on_n_nodes(monkeypatch):
    """generation.engine_instances=auto on 2 nodes x 8 GPUs at TP 4: 4 instances, each its own srun step on
    its leader's node, named by index, asking for the first (slot+1)*tp GPUs and keeping its slice."""
    monkeypatch.setattr(external.shutil, "which", lambda name: "/usr/bin/srun")
    g = _cfg("generation.engine_tensor_parallel=4")
    layout = external.instance_layout(g, "cuda", ["gpu-node07"] * 8 + ["gpu-node08"] * 8)
    assert [(i.index, i.leader, i.node, i.slot) for i in layout] == [
        (0, 0, "gpu-node07", 0), (1, 4, "gpu-node07", 1), (2, 8, "gpu-node08", 0), (3, 12, "gpu-node08", 1)]
    got = [external.worker_command(g, Path("/e/python"), Path("/r/job.json"), "cuda", JOB_ENV, instance=i)
           for i in layout]
    for inst, (argv, env) in zip(layout, got):
        assert argv == ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={inst.node}", "--jobid=4242",
                        f"--job-name=spin-engine-vllm-{inst.index}", "--kill-on-bad-exit=1", "--export=ALL",
                        f"--gpus={4 * (inst.slot + 1)}", "/e/python", "-m",
                        "spin_mcore.generation.workers.vllm_worker", "/r/job.json", str(inst.index)]
        assert env["SPIN_ENGINE_DEVICE_SLICE"] == f"{4 * inst.slot}:4" and "SLURM_NTASKS" not in env
    # one instance per node at TP 8: the steps differ by node only
    g8 = _cfg("generation.engine_tensor_parallel=8")
    nodes = [external.worker_command(g8, Path("/e/python"), Path("/r/job.json"), "cuda", JOB_ENV, instance=i)[0]
             for i in external.instance_layout(g8, "cuda", ["gpu-node07"] * 8 + ["gpu-node08"] * 8)]
    assert [a[4] for a in nodes] == ["--nodelist=gpu-node07", "--nodelist=gpu-node08"]
    assert all(a[9] == "--gpus=8" for a in nodes)
    # locally (a child process per instance) the slice picks the node's GPUs the same way
    _, env = external.worker_command(_cfg("generation.engine_launcher=local", "generation.engine_tensor_parallel=4"),
                                     Path("/e/python"), Path("/r/job.json"), "cuda", {}, instance=layout[1])
    assert env["SPIN_ENGINE_DEVICE_SLICE"] == "4:4"


def test_device_slice_narrows_the_visible_gpus():
    from spin_mcore.generation.workers import protocol

    env = {"SPIN_ENGINE_DEVICE_SLICE": "4:4", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert protocol.apply_device_slice(env) == "4,5,6,7" and env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    env = {"SPIN_ENGINE_DEVICE_SLICE": "2:2"}
    assert protocol.apply_device_slice(env) == "2,3"
    assert protocol.apply_device_slice({}) is None
    with pytest.raises(RuntimeError, match="SPIN_ENGINE_DEVICE_SLICE=4:4: only 4 GPU"):
        protocol.apply_device_slice({"SPIN_ENGINE_DEVICE_SLICE": "4:4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_trtllm_worker_runs_under_mpi_with_one_task_per_tp_rank(monkeypatch):
    monkeypatch.setattr(external.shutil, "which", lambda name: "/usr/bin/srun")
    g = load_config(overrides=["generation.backend=trtllm", "generation.engine_tensor_parallel=8"]).generation
    argv, env = external.worker_command(g, Path("/v/bin/python"), Path("/r/job.json"), "cuda",
                                        {**JOB_ENV, "PMIX_RANK": "3"})
    assert argv[:10] == ["srun", "--overlap", "--nodes=1", "--ntasks=8", "--nodelist=gpu-node07", "--jobid=4242",
                         "--job-name=spin-engine-trtllm", "--kill-on-bad-exit=1", "--mpi=pmix", "--export=ALL"]
    assert argv[10:] == ["--gpus=8", "/v/bin/trtllm-llmapi-launch", "/v/bin/python", "-m",
                         "spin_mcore.generation.workers.trtllm_worker", "/r/job.json"]
    # trtllm-llmapi-launch runs `python3 -m tensorrt_llm.llmapi.mgmn_*`: the engine's bin must come first
    assert env["PATH"].split(os.pathsep)[0] == "/v/bin"
    g = load_config(overrides=["generation.backend=trtllm", "generation.engine_mpi=pmi2"]).generation
    argv, _ = external.worker_command(g, Path("/v/bin/python"), Path("/r/job.json"), "cuda", JOB_ENV)
    assert argv[8] == "--mpi=pmi2" and "--mpi=pmix" not in argv
    # Started locally inside a job, its MPI must not see the training step's SLURM/PMI context.
    g = load_config(overrides=["generation.backend=trtllm", "generation.engine_launcher=local"]).generation
    argv, env = external.worker_command(g, Path("/v/bin/python"), Path("/r/job.json"), "cuda",
                                        {**JOB_ENV, "PMIX_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16"})
    assert argv[0] == "/v/bin/python" and not [k for k in env if k.startswith(("SLURM_", "PMI", "OMPI_"))]


def test_every_launch_puts_the_engine_bin_first_on_path(monkeypatch):
    monkeypatch.setattr(external.shutil, "which", lambda name: "/usr/bin/srun")
    for backend in external.ENGINES:
        for launcher in ("local", "srun"):
            g = load_config(overrides=[f"generation.backend={backend}",
                                       f"generation.engine_launcher={launcher}"]).generation
            _, env = external.worker_command(g, Path("/v/bin/python"), Path("/r/job.json"), "cuda",
                                             {**JOB_ENV, "PATH": "/usr/bin:/v/bin:/bin"})
            assert env["PATH"] == "/v/bin:/usr/bin:/bin", (backend, launcher)


def test_local_worker_finds_the_engines_python3_first(tmp_path):
    """A real child process started by run_engine (local launcher) resolves `python3` in the engine's bin."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    fake = venv / "python"
    fake.write_text('#!/usr/bin/env bash\necho "{\\"engine_starts\\": 1, \\"python3\\": \\"$(command -v python3)\\"}" '
                    '> "$(dirname "$3")/status.json"\n')
    (venv / "python3").write_text("#!/bin/sh\n")
    for f in (fake, venv / "python3"):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    job = _empty_job(tmp_path / "job" / "job.json")
    cfg = load_config(overrides=["generation.backend=trtllm", "generation.engine_launcher=local",
                                 f"generation.python={fake}"])
    assert external.run_engine(cfg, job, "cuda")["python3"] == str(venv / "python3")


def test_a_worker_exit_after_a_stop_signal_or_with_75_is_preemption_not_failure(tmp_path):
    """Exit 75 (the worker's requeue status) without a signal here, and exit 3 after this process got SIGUSR1:
    both Preempted (before: WorkerError / a plain return code)."""
    import signal

    from spin_mcore.platform import preemption

    preemption.reset()
    proc = subprocess.Popen(["sh", "-c", "exit 75"], start_new_session=True)
    with pytest.raises(preemption.Preempted, match=r"generation engine \(worker exited with 75"):
        external._wait(proc)
    newly = preemption.install()
    try:
        proc = subprocess.Popen(["sh", "-c", "sleep 0.5; exit 3"], start_new_session=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(preemption.Preempted, match=r"preempted by SIGUSR1 after generation engine"):
            external._wait(proc)
    finally:
        preemption.reset()
        if newly:
            preemption.uninstall()


def test_bad_launcher_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="generation.engine_launcher='mpirun'"):
        _cfg("generation.engine_launcher=mpirun")
    with pytest.raises(ConfigError, match=r"generation.engine_mpi='pmix --export=NONE': must be one srun MPI plugin"):
        _cfg("generation.engine_mpi=pmix --export=NONE")
    with pytest.raises(ConfigError, match="generation.engine_tensor_parallel=0"):
        _cfg("generation.engine_tensor_parallel=0")
    with pytest.raises(ConfigError, match="generation.engine_quantization=fp8: only generation.backend=trtllm"):
        _cfg("generation.engine_quantization=fp8")
    with pytest.raises(ConfigError, match="generation.backend=trtllm needs CUDA"):
        external.check_engine_model("trtllm", load_config().model, "cpu")


FAKE_WORKER = """#!/usr/bin/env bash
# Stands in for <engine python>: argv is "-m MODULE JOB.json [INSTANCE]"; records what SLURM gave the step.
job="$3"
sleep "${FAKE_ENGINE_SLEEP:-0}"  # instances overlap in time: each is its own running step
cat > "$(dirname "$job")/status${4:+-$4}.json" <<EOF
{"engine_starts": 1, "module": "$2", "step_id": "${SLURM_STEP_ID:-none}", "step_tasks": "${SLURM_STEP_NUM_TASKS:-none}",
 "job_id": "${SLURM_JOB_ID:-none}", "step_name": "${SLURM_JOB_NAME:-none}", "instance": "${4:-none}",
 "node": "${SLURMD_NODENAME:-none}"}
EOF
"""

DRIVER = """import json, os, sys
from pathlib import Path
from spin_mcore.config import load_config
from spin_mcore.generation.external import _rank_hosts, instance_layout, run_engine
cfg = load_config(overrides=sys.argv[2:])
layout = instance_layout(cfg.generation, "cpu", _rank_hosts())
print("RESULT " + json.dumps({**run_engine(cfg, Path(sys.argv[1]), "cpu", layout if len(layout) > 1 else None),
                              "parent_step": os.environ.get("SLURM_STEP_ID")}), flush=True)
"""


def _sbatch_driver(slurm_env, tmp_path: Path, prelude: str = "", overrides: str = "") -> tuple[str, dict]:
    """Run DRIVER as step 0 of a 2-task sbatch job (as a real run's training step has; only the srun task of
    rank 0 starts the engine) with FAKE_WORKER as the engine's python. Returns (job id, its RESULT)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_WORKER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "driver.py").write_text(DRIVER)
    job = _empty_job(tmp_path / "engine_job" / "job.json")
    log = tmp_path / "job.log"
    script = (f"#!/bin/bash\n{prelude}srun --ntasks=1 {sys.executable} {tmp_path / 'driver.py'} {job} "
              f"generation.backend=vllm generation.python={fake} {overrides}\n")
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=1", "--ntasks=2", "--cpus-per-task=1",
                           "--time=00:05:00", f"--output={log}"], input=script, env=slurm_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{text}"
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    return proc.stdout.strip().split(";")[0], result


@pytest.mark.slurm
def test_worker_runs_as_its_own_srun_step_inside_the_job(slurm_env, tmp_path):  # noqa: F811
    job_id, result = _sbatch_driver(slurm_env, tmp_path)
    assert result["launcher"] == "srun" and result["engine_starts"] == 1
    assert result["module"] == "spin_mcore.generation.workers.vllm_worker"
    # Its own step of the same job (the driver ran as step 0; the engine got the next one), one task.
    assert result["job_id"] == job_id
    assert result["parent_step"] == "0" and result["step_id"] == "1" and result["step_tasks"] == "1", result
    assert result["step_name"] == "spin-engine-vllm"


@pytest.mark.slurm
def test_two_instances_run_as_two_overlapping_srun_steps_of_the_job(slurm_env, tmp_path):  # noqa: F811
    """generation.engine_instances=2 inside a job: two `srun --overlap` steps on the node, named by instance,
    running at the same time (each sleeps 3 s), each writing its own status; the parent merges them."""
    _, result = _sbatch_driver(slurm_env, tmp_path, "export FAKE_ENGINE_SLEEP=3\n", "generation.engine_instances=2")
    assert result["launcher"] == "srun" and result["engine_starts"] == 2 and result["parent_step"] == "0"
    parts = sorted(result["instances"], key=lambda r: r["instance"])
    assert [(r["instance"], r["step_name"], r["step_tasks"]) for r in parts] == [
        ("0", "spin-engine-vllm-0", "1"), ("1", "spin-engine-vllm-1", "1")]
    assert sorted(r["step_id"] for r in parts) == ["1", "2"] and parts[0]["node"] == parts[1]["node"] != "none"
    assert result["worker_seconds"] < 6  # both slept 3 s at the same time: two concurrent steps


def test_cli_refuses_an_engine_that_cannot_run_before_any_process_starts(tmp_path):
    """One line, exit 1, nothing written: TensorRT-LLM on a CPU machine; vLLM with a missing environment."""
    spin = str(Path(sys.executable).with_name("spin-mcore"))
    cases = [(["generate", "generation.backend=trtllm", "platform.device=cpu", "--out", str(tmp_path / "gen")],
              "spin-mcore generate: config error: generation.backend=trtllm needs CUDA GPUs"),
             (["run", "generation.backend=vllm", "platform.device=cpu", "model.num_attention_heads=2",
               "model.num_query_groups=2", f"generation.python={tmp_path / 'none' / 'python'}",
               f"run.dir={tmp_path / 'run'}"],
              f"spin-mcore run: config error: generation.python={tmp_path / 'none' / 'python'}: "
              f"{tmp_path / 'none' / 'python'} does not exist; create the vllm environment with "
              f"`bash launch/setup_vllm.sh`")]
    for args, line in cases:
        proc = subprocess.run([spin, *args, "model.preset=tiny"], capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and err.startswith(line) and "\n" not in err, proc.stderr
    assert not (tmp_path / "gen").exists() and not (tmp_path / "run").exists()
