"""The cluster path under a real SLURM: `sbatch launch/spin_70b.sh` with tiny overrides, requeue, dry run.

`.ci/run` starts a one-node cluster with `launch/local_slurm.sh` before pytest; outside CI the
fixture starts it when `sbatch` is missing a configured cluster. The jobs run 2 tasks (TP=2) of
`spin-mcore run` through `srun`, one short SPIN iteration on the shipped demo data, from a random
theta_0 (what is checked is the cluster path, not learning).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import checkpoint_weights, make_tiny_spin_inputs, tiny_model_overrides

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed: .ci/run installs it, so CI must have it")
        pytest.skip(f"{tool} is not installed (bash launch/local_slurm.sh start installs SLURM)")


@pytest.fixture(scope="module")
def slurm_env():
    """Environment whose sbatch/srun/scontrol talk to a running cluster (local_slurm.sh's, if none is set)."""
    _need("sbatch")
    env = dict(os.environ)
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").exists():
        subprocess.run(["bash", str(LAUNCH / "local_slurm.sh"), "start"], check=True, timeout=300)
        env["SLURM_CONF"] = subprocess.run(["bash", str(LAUNCH / "local_slurm.sh"), "env"], check=True,
                                           capture_output=True, text=True).stdout.split("=", 1)[1].strip()
    # A job must not inherit this process's own job context, if pytest itself runs inside one.
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]
    env["SPIN_MCORE"] = str(Path(sys.executable).with_name("spin-mcore"))
    return env


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """Demo data (240 records), a SentencePiece tokenizer trained on it, and a random theta_0."""
    return make_tiny_spin_inputs(tmp_path_factory.mktemp("slurm_inputs"))


def _job_overrides(inputs, run_dir: Path) -> list[str]:
    """The 70B config brought down to a tiny model: the same script, the same file, these overrides."""
    root, tok = inputs
    # The config's TP4 x PP8 x VP10 and TensorRT-LLM engine become TP2 and the in-process engine on 2 CPU tasks.
    return [*tiny_model_overrides(), "parallel.pp=1", "parallel.vp=null", "generation.backend=megatron",
            "parallel.tp=2", "parallel.sequence_parallel=false", "precision.recipe=fp32", "platform.device=cpu",
            f"data.path={root / 'arith.jsonl'}", f"data.tokenizer={tok}", "data.template=instruction",
            "data.max_prompt_length=28", "data.max_response_length=24", "data.num_prompts=48",
            "data.heldout_fraction=0.05", "generation.max_new_tokens=24", "generation.batch_size=48",
            "generation.shard_size=16", "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=2",
            "train.recompute=false", "train.save_interval=4", "train.lr=[1e-4]", "run.init_from_hf=false",
            f"run.init_checkpoint={root / 'theta0'}", "run.iterations=1", "run.eval_prompts=8",
            f"run.dir={run_dir}"]


def _sbatch(env, log: Path, args: list[str], wait: bool) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=00:20:00", f"--output={log}", *(["--wait"] if wait else []), str(LAUNCH / "spin_70b.sh"), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}\n{log.read_text() if log.exists() else ''}"
    return proc.stdout.strip().split(";")[0]


def _job_state(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tiny_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_plain")
    log = out / "job.log"
    start = time.perf_counter()
    job = _sbatch(slurm_env, log, _job_overrides(tiny_inputs, out / "run"), wait=True)
    return out, log, job, time.perf_counter() - start


def test_sbatch_spin_70b_script_runs_a_tiny_iteration(slurm_env, uninterrupted):
    out, log, job, seconds = uninterrupted
    text = log.read_text()
    state = _job_state(slurm_env, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-3000:])
    run = out / "run"
    evaluation = json.loads((run / "iter_0" / "eval.json").read_text())
    row = evaluation["row"]
    assert row["iteration"] == 1 and row["train_steps"] == 24  # 48 prompts x 2 epochs / 4 pairs per step
    assert 0.0 <= row["pair_accuracy"] <= 1.0 and row["heldout_nll"] > 0
    assert (run / "results.md").read_text().count("SPIN iter 1") == 1
    assert (Path(evaluation["theta_next"]) / "spin_mcore.json").exists()
    # Two ranks of one srun step, TP=2, world 2: the job ran the loop, not a local launcher.
    assert f"spin_job.sh: job {job} restart 0" in text
    print(f"tiny sbatch SPIN iteration: {seconds:.1f} s")


def test_requeue_mid_training_resumes_to_identical_weights(slurm_env, tiny_inputs, uninterrupted, tmp_path):
    plain_out, *_ = uninterrupted
    log = tmp_path / "job.log"
    job = _sbatch(slurm_env, log, _job_overrides(tiny_inputs, tmp_path / "run"), wait=False)
    metrics = tmp_path / "run" / "iter_0" / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    # Requeue once the trainer has logged its second step and saved nothing final yet.
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert _job_state(slurm_env, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    # SLURM holds a requeued job back for about two minutes (its begin time); start it now.
    for _ in range(50):
        if _job_state(slurm_env, job).get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm_env)
            break
        time.sleep(0.2)
    while _job_state(slurm_env, job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    state = _job_state(slurm_env, job)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text[-3000:])
    assert f"spin_job.sh: job {job} restart 1" in text
    assert "resumed from" in text  # the trainer continued from its checkpoint, not from scratch
    mine = checkpoint_weights(tmp_path / "run" / "iter_0" / "train" / "model")
    plain = checkpoint_weights(plain_out / "run" / "iter_0" / "train" / "model")
    assert mine.keys() == plain.keys() and len(mine) > 0
    for name in plain:
        assert mine[name].equal(plain[name]), name


def test_scripts_pass_shellcheck():
    _need("shellcheck")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) >= 5
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_requeue_exit_code_matches_the_trainer():
    from spin_mcore.platform.preemption import REQUEUE_EXIT_CODE

    text = (LAUNCH / "spin_job.sh").read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in text


def test_dry_run_of_a_four_node_job_prints_every_rank():
    """`spin_70b.sh --dry-run` for a fake 4-node x 8-task allocation (environment only, no scheduler)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NODELIST="node[01-04]", SLURM_NNODES="4", SLURM_NTASKS="32",
               SLURM_TASKS_PER_NODE="8(x4)", SLURM_JOB_ID="4242", SPIN_MCORE=str(Path(sys.executable).with_name("spin-mcore")))
    proc = subprocess.run(["bash", str(LAUNCH / "spin_70b.sh"), "--dry-run", "train.micro_batch_size=2"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pattern = re.compile(r"^(\S+): RANK=(\d+) LOCAL_RANK=(\d+) WORLD_SIZE=(\d+) MASTER_ADDR=(\S+) MASTER_PORT=(\d+)"
                         r"(?: \S+=\S*)*\s+\[TP=(\d+) PP=(\d+) CP=(\d+) DP=(\d+)\]\s+(.*)$")
    rows = [m.groups() for m in map(pattern.match, proc.stdout.splitlines()) if m]
    assert len(rows) == 32, proc.stdout
    for rank, (host, r, local, world, addr, port, tp, pp, cp, dp, cmd) in enumerate(rows):
        assert int(r) == rank and int(local) == rank % 8 and host == f"node0{rank // 8 + 1}"
        assert (world, addr, port) == ("32", "node01", "14242")  # port: 10000 + job id % 20000
        # The 70B config's layout on 32 GPUs: TP 4 inside a node (two TP groups per node), PP 8 across
        # the nodes, DP 1 (Megatron's order tp-cp-ep-dp-pp: TP fastest, PP slowest).
        assert (int(tp), int(pp), int(cp), int(dp)) == (rank % 4, rank // 4, 0, 0)
        assert cmd.endswith("run spin_mcore/configs/spin_llama3_70b.yaml platform.device=cuda train.micro_batch_size=2")


def _fake_allocation(**extra) -> dict:
    """The batch shell of a fake 2-node x 8-task job (environment only), without inherited launch settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "TORCH_NCCL_", "NVTE_", "SPIN_")) and k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env.update(SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
               SLURM_TASKS_PER_NODE="8(x2)", SLURM_JOB_ID="77", SLURM_CPUS_PER_TASK="12",
               SPIN_MCORE=str(Path(sys.executable).with_name("spin-mcore")))
    env.update(extra)
    return env


LAYOUT_16 = ["parallel.pp=2", "parallel.vp=5"]  # the 70B config (TP4 PP8) brought to 16 ranks


def test_dry_run_shows_the_launch_environment_and_srun_options():
    """Every rank's printed environment carries the communication defaults; a value already set wins."""
    env = _fake_allocation(NCCL_IB_TIMEOUT="30", NCCL_ASYNC_ERROR_HANDLING="0", SPIN_SRUN_MPI="pmix")
    proc = subprocess.run(["bash", str(LAUNCH / "spin_70b.sh"), "--dry-run", *LAYOUT_16], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("node0")]
    assert len(rows) == 16
    launch_env = ("CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_ASYNC_ERROR_HANDLING=0 NCCL_IB_TIMEOUT=30 "
                  "NVTE_BWD_LAYERNORM_SM_MARGIN=8 NVTE_FWD_LAYERNORM_SM_MARGIN=8 TORCH_NCCL_ASYNC_ERROR_HANDLING=0 "
                  "TORCH_NCCL_AVOID_RECORD_STREAMS=1")
    assert rows[9].startswith(f"node02: RANK=9 LOCAL_RANK=1 WORLD_SIZE=16 MASTER_ADDR=node01 MASTER_PORT=10077 "
                              f"{launch_env}  [TP=1 PP=1 CP=0 DP=0]")
    spin = env["SPIN_MCORE"]
    config = "spin_mcore/configs/spin_llama3_70b.yaml"
    overrides = "platform.device=cuda parallel.pp=2 parallel.vp=5"
    assert f"# doctor step: srun --kill-on-bad-exit=1 --mpi=pmix --cpus-per-task=12 --nodes=2 --ntasks=2 " \
           f"--ntasks-per-node=1 {spin} doctor {config} {overrides}" in proc.stdout.splitlines()
    assert f"# job step: srun --kill-on-bad-exit=1 --mpi=pmix --cpus-per-task=12 {spin} run {config} {overrides}" \
        in proc.stdout.splitlines()


def _fake_srun(tmp_path: Path, fail_doctor: bool = False) -> Path:
    """A `srun` on PATH that records its argv and the launch variables it was given, one JSON line per call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"""#!{sys.executable}
import json, os, sys
keys = ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_AVOID_RECORD_STREAMS",
        "NCCL_IB_TIMEOUT", "SPIN_JOB_NTASKS", "SPIN_JOB_TASKS_PER_NODE")
with open({str(tmp_path / "calls.jsonl")!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
sys.exit(1 if {fail_doctor!r} and "doctor" in sys.argv else 0)
""")
    srun.chmod(0o755)
    return bin_dir


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_job_steps_get_cpus_per_task_mpi_and_the_launch_environment(tmp_path):
    bin_dir = _fake_srun(tmp_path)
    env = _fake_allocation(PATH=f"{bin_dir}:{os.environ['PATH']}", SPIN_CPUS_PER_TASK="6",
                           CUDA_DEVICE_MAX_CONNECTIONS="2")
    proc = subprocess.run(["bash", str(LAUNCH / "spin_70b.sh"), *LAYOUT_16], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doctor, job = _calls(tmp_path)
    spin = env["SPIN_MCORE"]
    config = "spin_mcore/configs/spin_llama3_70b.yaml"
    overrides = ["platform.device=cuda", "parallel.pp=2", "parallel.vp=5"]
    # No SPIN_SRUN_MPI: no --mpi, the cluster's default. SPIN_CPUS_PER_TASK wins over SLURM_CPUS_PER_TASK.
    assert doctor["argv"] == ["--kill-on-bad-exit=1", "--cpus-per-task=6", "--nodes=2", "--ntasks=2",
                              "--ntasks-per-node=1", spin, "doctor", config, *overrides]
    assert job["argv"] == ["--kill-on-bad-exit=1", "--cpus-per-task=6", spin, "run", config, *overrides]
    assert job["env"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "2", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                          "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_IB_TIMEOUT": "22",
                          "SPIN_JOB_NTASKS": "16", "SPIN_JOB_TASKS_PER_NODE": "8(x2)"}


def test_a_failed_doctor_stops_the_job_before_its_step(tmp_path):
    bin_dir = _fake_srun(tmp_path, fail_doctor=True)
    env = _fake_allocation(PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(LAUNCH / "spin_70b.sh"), *LAYOUT_16], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("spin_job.sh: spin-mcore doctor failed on a node (its table is "
                                                    "above); the job step was not started")
    assert [c["argv"][-5] for c in _calls(tmp_path)] == ["doctor"]
    # SPIN_SKIP_DOCTOR=1: straight to the job step.
    (tmp_path / "calls.jsonl").unlink()
    proc = subprocess.run(["bash", str(LAUNCH / "spin_70b.sh"), *LAYOUT_16], env=dict(env, SPIN_SKIP_DOCTOR="1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][3] for c in _calls(tmp_path)] == ["run"]


SIGNAL_PROBE = """
import json, multiprocessing, os, signal, sys, time


def main():  # spawned Managers import this file again: nothing may run at import
    from spin_mcore.models import checkpoint

    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    checkpoint.prestart_save_queue()
    checkpoint.await_save_queue()
    ours = checkpoint._queue_manager
    default = multiprocessing.get_context("spawn").Manager()  # the kind Megatron starts: default signal handlers
    out = sys.argv[1]
    open(out + ".ready", "w").write("ready")
    deadline = time.time() + 120
    while not got and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    try:
        fa._results_queue.put(1)
        queue = fa._results_queue.get() == 1
    except Exception as exc:
        queue = repr(exc)
    with open(out + ".tmp", "w") as f:
        json.dump({"signalled": bool(got), "ours_alive": ours._process.is_alive(), "queue": queue,
                   "default_alive": default._process.is_alive()}, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
"""


def test_save_queue_manager_survives_slurms_stop_signal(slurm_env, tmp_path):
    """`scancel --signal=USR1` (what `#SBATCH --signal=USR1@600` sends) reaches every process of the step:
    the Manager serving Megatron's write results stays up (its queue still works), while one with default
    handlers, as Megatron starts it, dies: the trainer's save after the signal needs the former."""
    probe = tmp_path / "probe.py"
    probe.write_text(SIGNAL_PROBE)
    out = tmp_path / "probe.json"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", f"--output={tmp_path / 'job.log'}",
           f"--chdir={ROOT}", f"--wrap=srun {sys.executable} {probe} {out}"]
    job = subprocess.run(cmd, env=slurm_env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while not Path(str(out) + ".ready").exists():
            assert time.monotonic() < deadline, f"the probe never started: {(tmp_path / 'job.log').read_text()}"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True)
        while not out.exists():
            assert time.monotonic() < deadline, f"no result: {(tmp_path / 'job.log').read_text()}"
            time.sleep(0.5)
        res = json.loads(out.read_text())
    finally:
        subprocess.run(["scancel", job], env=slurm_env)
    assert res["signalled"], res
    assert res["default_alive"] is False, res  # the control: the signal reached the step's other processes
    assert res["ours_alive"] is True and res["queue"] is True, res
