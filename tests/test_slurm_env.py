"""SLURM environment: hostlists, tasks per node, the srun rendezvous and its errors, device choice,
the dry-run rank plan (unit, CLI, and against a real 4-process gloo world started the way srun starts it)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spin_mcore.cli import main
from spin_mcore.config import ConfigError, ParallelConfig, PlatformConfig, load_config
from spin_mcore.launcher import launched
from spin_mcore.platform.distributed import local_device_index, parallel_grid, rendezvous_env, select_device
from spin_mcore.platform.slurm import (expand_hostlist, expand_tasks_per_node, in_job_step, plan_ranks,
                                       port_for_job, rendezvous_from_slurm)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a,b", ["a", "b"]),
    ("gpu-[1-2]x", ["gpu-1x", "gpu-2x"]),
    ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("single", ["single"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("x[1,3],y[2-3]z,w", ["x1", "x3", "y2z", "y3z", "w"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad, match", [
    ("", "is empty"),
    ("n[1-", r"'\[' is never closed"),
    ("n]1", r"'\]' without '\['"),
    ("n[[1]]", r"nested '\['"),
    ("n[2-1]", "runs backwards"),
    ("n[a]", "bad range 'a'"),
    ("n[1-2-3]", "bad range '1-2-3'"),
    ("n[]", "empty brackets"),
    ("a,,b", "stray comma"),
    ("a,", "stray comma"),
    ("a b", "whitespace"),
    ("n[1-9999999]", "more than"),
])
def test_expand_hostlist_errors_name_the_string(bad, match):
    with pytest.raises(ValueError, match=match) as exc:
        expand_hostlist(bad)
    assert repr(bad) in str(exc.value)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x2)") == [8, 8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    for bad in ("", "8(x)", "x2", "8(2)", "8(x0)", "2,,1"):
        with pytest.raises(ValueError, match="tasks per node"):
            expand_tasks_per_node(bad)


# ----------------------------------------------------------------------------- rendezvous

# An srun task's environment on Slurm 22.05 (observed: 2-node job, rank 9 = node 1, local 1).
TASK = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "16",
        "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"}
# The batch shell of the same job: SLURM_PROCID=0 but no step.
BATCH = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "node[01-02]",
         "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}


def test_rendezvous_from_slurm():
    assert rendezvous_from_slurm(TASK) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16",
                                           "MASTER_ADDR": "node01", "MASTER_PORT": "14242"}
    assert port_for_job(4242) == 14242 and port_for_job(24242) == 14242 and port_for_job(19999) == 29999
    # explicit MASTER_* win; the step's node list wins over the job's
    env = dict(TASK, MASTER_ADDR="10.1.2.3", MASTER_PORT="29400")
    assert rendezvous_from_slurm(env)["MASTER_ADDR"] == "10.1.2.3" and rendezvous_from_slurm(env)["MASTER_PORT"] == "29400"
    env = dict(TASK, SLURM_STEP_NODELIST="node[05-06]", SLURM_STEP_TASKS_PER_NODE="8(x2)")
    assert rendezvous_from_slurm(env)["MASTER_ADDR"] == "node05"


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": None}, "^SLURM_PROCID is not set"),
    ({"SLURM_PROCID": "x"}, "^SLURM_PROCID='x' is not an integer"),
    ({"SLURM_PROCID": "16"}, "^SLURM_PROCID=16 is not below SLURM_NTASKS=16"),
    ({"SLURM_LOCALID": None}, "^SLURM_LOCALID is not set"),
    ({"SLURM_LOCALID": "8"}, "^SLURM_LOCALID=8 is not below the 8 tasks that SLURM_TASKS_PER_NODE gives node 1"),
    ({"SLURM_NTASKS": None}, "^SLURM_NTASKS is not set"),
    ({"SLURM_NTASKS": "0"}, "^SLURM_NTASKS=0 must be >= 1"),
    ({"SLURM_NTASKS": "12"}, "^SLURM_TASKS_PER_NODE='8\\(x2\\)' adds up to 16 tasks, not SLURM_NTASKS=12"),
    ({"SLURM_JOB_NODELIST": None}, "^SLURM_JOB_NODELIST is not set"),
    ({"SLURM_JOB_NODELIST": "node[01-03]"}, "^SLURM_TASKS_PER_NODE='8\\(x2\\)' names 2 nodes but SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NODELIST": "node[01-"}, "^hostlist 'node\\[01-'"),
    ({"SLURM_NODEID": "2"}, "^SLURM_NODEID=2 is beyond the 2 nodes"),
    ({"SLURM_JOB_ID": None}, "^SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_ID": "12a"}, "^SLURM_JOB_ID='12a' is not an integer"),
    ({"MASTER_PORT": "70000"}, "^MASTER_PORT=70000 is not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "^SLURM_PROCID=0 runs on SLURM_NODEID=1"),
])
def test_rendezvous_errors_name_the_variable(change, match):
    env = dict(TASK)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(ValueError, match=match) as exc:
        rendezvous_from_slurm(env)
    assert "\n" not in str(exc.value)


def test_launched_only_in_a_multi_task_step():
    assert not launched({}) and launched({"RANK": "0"})
    assert not launched(BATCH) and not in_job_step(BATCH)  # batch shell: SLURM_PROCID=0 but no step
    assert launched(TASK) and in_job_step(TASK)
    assert not launched(dict(TASK, SLURM_NTASKS="1"))  # one-task step: run.nproc local ranks
    assert not in_job_step(dict(TASK, SLURM_STEP_ID="4294967291"))  # a special step (batch/interactive)
    assert in_job_step({"SLURM_PROCID": "0", "SLURM_STEPID": "3"})


def test_rendezvous_env_precedence():
    # torchrun's variables win over SLURM's
    env = dict(TASK, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234")
    assert rendezvous_env(env) == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert rendezvous_env(TASK)["MASTER_ADDR"] == "node01"
    # the batch shell is a one-process world on a free local port, not rank 0 of 16
    single = rendezvous_env(BATCH)
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(single["MASTER_PORT"]) < 65536
    # a one-task step does not bind the job's shared port on the first node
    one = rendezvous_env(dict(TASK, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1",
                              SLURM_STEP_NODELIST="node02", SLURM_STEP_TASKS_PER_NODE="1", SLURM_STEP_NUM_TASKS="1"))
    assert one["WORLD_SIZE"] == "1" and one["MASTER_ADDR"] == "127.0.0.1"
    with pytest.raises(ValueError, match="^WORLD_SIZE=2 but MASTER_PORT is not set"):
        rendezvous_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="^RANK is set but WORLD_SIZE is not"):
        rendezvous_env({"RANK": "0"})
    with pytest.raises(ValueError, match="^RANK=2 is not below WORLD_SIZE=2"):
        rendezvous_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


# ----------------------------------------------------------------------------- devices


def test_local_device_index():
    assert local_device_index(3, 8, None) == 3  # every GPU of the node visible
    assert local_device_index(7, 8, "0,1,2,3,4,5,6,7") == 7
    assert local_device_index(5, 1, "5") == 0  # srun --gpus-per-task=1: each task sees its one GPU
    assert local_device_index(0, 1, None) == 0
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=5 needs at least 6 visible CUDA devices but this task sees 4 "
                                         r"\(CUDA_VISIBLE_DEVICES='0,1,2,3'\)"):
        local_device_index(5, 4, "0,1,2,3")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES=unset"):
        local_device_index(1, 1, None)  # two local ranks would share the only, unbound GPU
    with pytest.raises(ValueError, match=r"^LOCAL_RANK=0: no CUDA device is visible \(CUDA_VISIBLE_DEVICES=''\)"):
        local_device_index(0, 0, "")


def test_select_device():
    assert select_device("auto", cuda_available=True) == "cuda"
    assert select_device("auto", cuda_available=False) == "cpu"
    assert select_device("cuda", cuda_available=True) == "cuda"
    assert select_device("cpu", cuda_available=False) == "cpu"
    with pytest.raises(ConfigError, match=r"^platform.device=cuda but CUDA is not visible .*CUDA_VISIBLE_DEVICES=''"):
        select_device("cuda", cuda_available=False, visible="")
    with pytest.raises(ConfigError, match=r"^platform.device=cpu but CUDA is visible \(CUDA_VISIBLE_DEVICES=unset\)"):
        select_device("cpu", cuda_available=True, visible=None)
    with pytest.raises(ConfigError, match="platform.device='tpu': must be one of auto, cuda, cpu"):
        load_config(overrides=["platform.device=tpu"])
    with pytest.raises(ConfigError, match="platform.dist_timeout_minutes=0"):
        load_config(overrides=["platform.dist_timeout_minutes=0"])
    assert load_config(overrides=["platform.dist_timeout_minutes=90"]).platform.dist_timeout_minutes == 90


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusal")
def test_device_cuda_fails_loudly_without_cuda(monkeypatch, capsys):
    from spin_mcore.platform import init_distributed

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # in-process: refused before any process group or emulation is set up
    with pytest.raises(ConfigError, match=r"^platform.device=cuda but CUDA is not visible.*CUDA_VISIBLE_DEVICES=unset"):
        init_distributed(ParallelConfig(), platform=PlatformConfig(device="cuda"))
    # through the CLI: one line, exit 2, before any rank starts
    assert main(["run", "platform.device=cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("spin-mcore run: config error: platform.device=cuda but CUDA is not visible")
    assert err.count("\n") == 1


# ----------------------------------------------------------------------------- dry run


def _megatron_order_oracle(rank: int, tp: int, pp: int, dp: int) -> dict:
    """Megatron's documented default order tp-cp-ep-dp-pp (cp=1): TP fastest, then DP, then PP."""
    return {"tp_rank": rank % tp, "dp_rank": (rank // tp) % dp, "pp_rank": rank // (tp * dp), "cp_rank": 0}


@pytest.mark.parametrize("tp, pp", [(8, 2), (4, 2)])
def test_plan_two_nodes_eight_tasks_each(tp, pp):
    plan = plan_ranks(BATCH, ParallelConfig(tp=tp, pp=pp))
    dp = 16 // (tp * pp)
    assert [r["RANK"] for r in plan] == [str(i) for i in range(16)]
    assert [r["LOCAL_RANK"] for r in plan] == [str(i % 8) for i in range(16)]
    assert [r["host"] for r in plan] == ["node01"] * 8 + ["node02"] * 8
    assert {(r["WORLD_SIZE"], r["MASTER_ADDR"], r["MASTER_PORT"]) for r in plan} == {("16", "node01", "14242")}
    for i, r in enumerate(plan):
        assert {k: r[k] for k in ("tp_rank", "pp_rank", "dp_rank", "cp_rank")} == _megatron_order_oracle(i, tp, pp, dp)
    # each rank's plan is exactly what rendezvous_from_slurm gives that srun task
    task = dict(BATCH, SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_STEP_ID="0")
    assert {k: plan[9][k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == rendezvous_from_slurm(task)


def test_plan_errors():
    with pytest.raises(ConfigError, match=r"world size 16 is not divisible by parallel.tp\*pp\*cp = 3\*1\*1 = 3"):
        plan_ranks(BATCH, ParallelConfig(tp=3))
    with pytest.raises(ValueError, match="^SLURM_NNODES=3 but SLURM_JOB_NODELIST='node\\[01-02\\]' has 2 hosts"):
        plan_ranks(dict(BATCH, SLURM_NNODES="3"), ParallelConfig())
    with pytest.raises(ValueError, match="^SLURM_TASKS_PER_NODE is not set"):
        plan_ranks({k: v for k, v in BATCH.items() if k != "SLURM_TASKS_PER_NODE"}, ParallelConfig())
    with pytest.raises(ValueError, match="^SLURM_DISTRIBUTION='cyclic'"):
        plan_ranks(dict(BATCH, SLURM_DISTRIBUTION="cyclic"), ParallelConfig())
    # uneven nodes: 2(x3),1 -> ranks 0-1, 2-3, 4-5 on a1..a3 and rank 6 on b4
    plan = plan_ranks({"SLURM_JOB_NODELIST": "a[1-3],b4", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_ID": "7"},
                      ParallelConfig())
    assert [(r["host"], r["LOCAL_RANK"]) for r in plan] == [("a1", "0"), ("a1", "1"), ("a2", "0"), ("a2", "1"),
                                                            ("a3", "0"), ("a3", "1"), ("b4", "0")]
    assert plan[6]["WORLD_SIZE"] == "7" and plan[6]["MASTER_PORT"] == "10007"


def _set_env(monkeypatch, env):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))] + ["RANK"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


TINY_TP4 = ["model.preset=tiny", "model.num_layers=4", "model.num_query_groups=4", "parallel.tp=4", "parallel.pp=2"]


def test_ranks_cli(monkeypatch, capsys):
    _set_env(monkeypatch, BATCH)
    assert main(["ranks", *TINY_TP4]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# SLURM job 4242: 16 ranks on 2 node(s) (node01,node02); tp=4 pp=2 cp=1 dp=2"
    ranks = [line for line in lines if not line.startswith("#")]
    assert len(ranks) == 16
    assert ranks[9] == ("node02: RANK=9 LOCAL_RANK=1 WORLD_SIZE=16 MASTER_ADDR=node01 MASTER_PORT=14242  "
                        "[TP=1 PP=1 CP=0 DP=0]  spin-mcore run " + " ".join(TINY_TP4))

    assert main(["ranks", "--json", *TINY_TP4, "--", "spin-mcore", "train", "--out", "x y"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["world_size"], out["master_addr"], out["master_port"], out["hosts"]) == (16, "node01", 14242, ["node01", "node02"])
    assert out["parallel"] == {"tp": 4, "pp": 2, "cp": 1, "dp": 2} and out["command"] == ["spin-mcore", "train", "--out", "x y"]
    assert out["ranks"][15] == {"host": "node02", "env": {"RANK": "15", "LOCAL_RANK": "7", "WORLD_SIZE": "16",
                                                         "MASTER_ADDR": "node01", "MASTER_PORT": "14242"},
                                "tp_rank": 3, "pp_rank": 1, "cp_rank": 0, "dp_rank": 1}
    # --json after the config arguments works too
    assert main(["ranks", *TINY_TP4, "--json"]) == 0 and json.loads(capsys.readouterr().out)["world_size"] == 16


def test_ranks_cli_errors(monkeypatch, capsys):
    _set_env(monkeypatch, {})
    assert main(["ranks"]) == 1
    assert capsys.readouterr().err.startswith("spin-mcore ranks: error: SLURM_JOB_NODELIST is not set")
    _set_env(monkeypatch, dict(BATCH, SLURM_NTASKS="6", SLURM_TASKS_PER_NODE="3(x2)"))
    assert main(["ranks", *TINY_TP4]) == 1
    assert capsys.readouterr().err == ("spin-mcore ranks: config error: world size 6 is not divisible by "
                                       "parallel.tp*pp*cp = 4*2*1 = 8\n")
    _set_env(monkeypatch, dict(BATCH, SLURM_JOB_ID="x"))
    assert main(["ranks"]) == 1
    assert capsys.readouterr().err == "spin-mcore ranks: error: SLURM_JOB_ID='x' is not an integer\n"


# ----------------------------------------------------------------------------- a real world, started like srun


def _grid_rank() -> list:
    """One srun-like task (no RANK, only SLURM_*): the ParallelState init_distributed reports per layout."""
    import torch.distributed as dist

    from spin_mcore.platform import destroy_distributed, init_distributed

    def timeout_min(group) -> float:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60

    torch.set_num_threads(1)
    seen = []
    platform = PlatformConfig(dist_timeout_minutes=7)
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        ps = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=0, platform=platform)
        seen.append({"rank": ps.rank, "world": ps.world_size, "tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank,
                     "dp_rank": ps.dp_rank, "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]],
                     "timeouts": [timeout_min(dist.group.WORLD), timeout_min(ps.tp_group)]})
    destroy_distributed()
    return seen


def _free_job_id() -> int:
    """A job id whose derived rendezvous port is free right now."""
    for job in range(os.getpid() % 1000, 20000, 997):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port_for_job(job)))
                return job
            except OSError:
                continue
    pytest.skip("no free port in the rendezvous range")


def test_srun_style_world_meets_and_matches_the_plan():
    """4 processes with only srun's variables (2 'nodes' x 2 tasks, both this machine) meet on the
    derived master and port, Megatron reports exactly the dry run's tp/pp/dp grid, and the
    process groups carry platform.dist_timeout_minutes."""
    job = _free_job_id()
    alloc = {"SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4",
             "SLURM_JOB_ID": str(job), "SLURM_NNODES": "2"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_")) and
            k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    code = "import json, tests.test_slurm_env as t; print('RESULT', json.dumps(t._grid_rank()))"
    procs = []
    for rank in range(4):
        env = dict(base, **alloc, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % 2), SLURM_NODEID=str(rank // 2),
                   SLURM_STEP_ID="0", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for layout, (tp, pp) in enumerate(((2, 1), (1, 2), (2, 2))):
        plan = plan_ranks(alloc, ParallelConfig(tp=tp, pp=pp))
        assert parallel_grid(4, ParallelConfig(tp=tp, pp=pp)) == [
            {k: r[k] for k in ("tp_rank", "pp_rank", "cp_rank", "dp_rank")} for r in plan]
        for rank, res in enumerate(results):
            got = res[layout]
            assert (got["rank"], got["world"], got["timeouts"]) == (rank, 4, [7.0, 7.0])  # platform.dist_timeout_minutes
            assert got["master"] == [plan[rank]["MASTER_ADDR"], plan[rank]["MASTER_PORT"]] == ["localhost", str(port_for_job(job))]
            assert {k: got[k] for k in ("tp_rank", "pp_rank", "dp_rank")} == {
                k: plan[rank][k] for k in ("tp_rank", "pp_rank", "dp_rank")}


def test_launch_environment_and_the_ranks_cli_show_it(monkeypatch, capsys):
    from spin_mcore.platform.slurm import launch_environment

    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
           "NVTE_FWD_LAYERNORM_SM_MARGIN": "8", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root", "NCCLX": "no"}
    assert launch_environment(env) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22",
                                       "NVTE_FWD_LAYERNORM_SM_MARGIN": "8", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    for key in [k for k in os.environ if launch_environment({k: ""})]:
        monkeypatch.delenv(key)
    _set_env(monkeypatch, dict(BATCH, CUDA_DEVICE_MAX_CONNECTIONS="1", NCCL_SOCKET_IFNAME="ib0 eth0"))
    assert main(["ranks", *TINY_TP4]) == 0
    ranks = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert ranks[0].startswith("node01: RANK=0 LOCAL_RANK=0 WORLD_SIZE=16 MASTER_ADDR=node01 MASTER_PORT=14242 "
                               "CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_SOCKET_IFNAME='ib0 eth0'  [TP=0 PP=0 CP=0 DP=0]")
    assert main(["ranks", "--json", *TINY_TP4]) == 0
    rank = json.loads(capsys.readouterr().out)["ranks"][3]
    assert rank["env"] == {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "node01",
                           "MASTER_PORT": "14242", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_SOCKET_IFNAME": "ib0 eth0"}
