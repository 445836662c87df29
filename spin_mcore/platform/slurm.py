"""SLURM's environment, read without calling SLURM: hostlists, tasks per node, the rendezvous, the rank plan.

Under ``srun`` every task gets ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID`` (rank on its
node), ``SLURM_NODEID``, ``SLURM_NTASKS``, the step's node list and tasks per node. From these
we derive what torch.distributed needs (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) identically on every task, so ranks on different nodes meet:

* ``MASTER_ADDR`` is the first host of the step's node list; with SLURM's default block
  distribution task 0 runs there.
* ``MASTER_PORT`` is ``10000 + SLURM_JOB_ID % 20000``: the same on every task of a job,
  different for consecutive jobs sharing a node, and below Linux's ephemeral range
  (32768-60999) so it does not collide with outgoing connections.
* An explicit ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment wins over both.

Everything here is pure (a mapping in, values out) so it is tested without a cluster, and
the dry run (``spin-mcore ranks``) computes the same values for every rank from the batch
shell's environment.

Facts checked on Slurm 22.05: the batch shell has ``SLURM_PROCID=0`` and the allocation's
``SLURM_NTASKS`` but no ``SLURM_STEP_ID``; an ``srun`` task has ``SLURM_STEP_ID`` (0, 1, ...
per step) and ``SLURM_NTASKS`` / ``SLURM_STEP_NUM_TASKS`` of its own step.
"""

from __future__ import annotations

import re
from typing import Mapping

# Hostlists like node[1-100000] would be a typo; refuse before building a huge list.
_MAX_HOSTS = 100_000
# Step ids at or above this are SLURM's special steps (batch script, extern, interactive,
# pending: 0xfffffffa..0xfffffffe depending on the version), not an srun job step.
_SPECIAL_STEP_IDS = 0xFFFFFFF0

PORT_BASE = 10000
PORT_SPAN = 20000


# ----------------------------------------------------------------------------- parsing


def _split_top_level(s: str, what: str) -> list[str]:
    """Split ``s`` at commas outside brackets; raise on unbalanced or nested brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{what} {s!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what} {s!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{what} {s!r}: '[' is never closed")
    items.append(s[start:])
    return items


def _expand_range_set(body: str, hostlist: str) -> list[str]:
    """``01-04,07`` -> ['01', '02', '03', '04', '07']: zero padding follows the low bound's width."""
    out: list[str] = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"hostlist {hostlist!r}: bad range {part!r} in [{body}] (expected N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"hostlist {hostlist!r}: range {part!r} runs backwards")
        if len(out) + hi - lo + 1 > _MAX_HOSTS:
            raise ValueError(f"hostlist {hostlist!r}: more than {_MAX_HOSTS} hosts")
        out.extend(str(v).zfill(len(lo_s)) for v in range(lo, hi + 1))
    return out


def expand_hostlist(s: str) -> list[str]:
    """Expand a SLURM hostlist (``SLURM_JOB_NODELIST``) into host names, in SLURM's order.

    ``node[01-04,07]`` -> node01..node04, node07 (padding kept); ``a,b``; ``gpu-[1-2]x`` ->
    gpu-1x, gpu-2x; ``r[1-2]n[3-4]`` -> r1n3, r1n4, r2n3, r2n4 (the first group varies
    slowest); ``a[1-2],b3``. Raises ValueError naming the string when it is malformed.
    """
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"hostlist {s!r} is empty")
    if re.search(r"\s", s):
        raise ValueError(f"hostlist {s!r}: contains whitespace")
    hosts: list[str] = []
    for item in _split_top_level(s, "hostlist"):
        if not item:
            raise ValueError(f"hostlist {s!r}: empty host name (stray comma)")
        if "[]" in item:
            raise ValueError(f"hostlist {s!r}: empty brackets in {item!r}")
        # re.split with a capture group alternates literal, bracket body, literal, ...
        pieces = re.split(r"\[([^\[\]]*)\]", item)
        names = [""]
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                names = [n + piece for n in names]
                continue
            expanded = _expand_range_set(piece, s)
            if len(names) * len(expanded) > _MAX_HOSTS:
                raise ValueError(f"hostlist {s!r}: more than {_MAX_HOSTS} hosts")
            names = [n + e for n in names for e in expanded]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(s: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE``: ``8(x2)`` -> [8, 8]; ``2(x3),1`` -> [2, 2, 2, 1]."""
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"tasks per node {s!r} is empty")
    out: list[int] = []
    for part in s.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"tasks per node {s!r}: bad item {part!r} (expected N or N(xM))")
        count, times = int(m.group(1)), int(m.group(2) or 1)
        if times < 1:
            raise ValueError(f"tasks per node {s!r}: repeat count in {part!r} must be >= 1")
        if len(out) + times > _MAX_HOSTS:
            raise ValueError(f"tasks per node {s!r}: more than {_MAX_HOSTS} nodes")
        out.extend([count] * times)
    return out


# ----------------------------------------------------------------------------- environment


def _int_var(environ: Mapping[str, str], name: str, minimum: int = 0, why: str = "") -> int:
    """``environ[name]`` as an int >= minimum, or one ValueError line naming the variable."""
    if name not in environ:
        raise ValueError(f"{name} is not set{why}")
    raw = environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def in_job_step(environ: Mapping[str, str]) -> bool:
    """True inside an ``srun`` task (a job step); False in the batch/salloc shell and outside SLURM."""
    if "SLURM_PROCID" not in environ:
        return False
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    try:
        return step is not None and 0 <= int(step) < _SPECIAL_STEP_IDS
    except ValueError:
        return False


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a job: the same on all its tasks, see the module docstring."""
    return PORT_BASE + job_id % PORT_SPAN


def _nodelist_var(environ: Mapping[str, str], step: bool = True) -> str:
    """The name of the variable holding the step's node list where srun set one (step=True), else the job's."""
    names = ("SLURM_STEP_NODELIST",) if step else ()
    for name in names + ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            return name
    raise ValueError("SLURM_JOB_NODELIST is not set (nor SLURM_NODELIST): cannot find the master host")


def _master_port(environ: Mapping[str, str]) -> int:
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT", minimum=1)
        if port > 65535:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        return port
    why = " (the rendezvous port is derived from it; or set MASTER_PORT)"
    return port_for_job(_int_var(environ, "SLURM_JOB_ID", why=why))


def rendezvous_from_slurm(environ: Mapping[str, str]) -> dict:
    """torch.distributed's rendezvous variables for one srun task, from its SLURM variables.

    Returns ``{"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}`` as strings.
    Raises ValueError (one line, naming the variable) when a variable is missing, not an
    integer, or inconsistent with the others (rank beyond the world, local rank beyond the
    tasks of its node, node list and tasks per node of different lengths).
    """
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    world = _int_var(environ, "SLURM_NTASKS", minimum=1)
    if rank >= world:
        raise ValueError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    if local_rank > rank:
        raise ValueError(f"SLURM_LOCALID={local_rank} is above SLURM_PROCID={rank}")
    nodelist_name = _nodelist_var(environ)
    hosts = expand_hostlist(environ[nodelist_name])
    tpn_name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if environ.get(n)), None)
    if tpn_name is not None:
        tasks = expand_tasks_per_node(environ[tpn_name])
        if len(tasks) != len(hosts):
            raise ValueError(f"{tpn_name}={environ[tpn_name]!r} names {len(tasks)} nodes but "
                             f"{nodelist_name}={environ[nodelist_name]!r} has {len(hosts)}")
        if sum(tasks) != world:
            raise ValueError(f"{tpn_name}={environ[tpn_name]!r} adds up to {sum(tasks)} tasks, "
                             f"not SLURM_NTASKS={world}")
        if "SLURM_NODEID" in environ:
            node = _int_var(environ, "SLURM_NODEID")
            if node >= len(hosts):
                raise ValueError(f"SLURM_NODEID={node} is beyond the {len(hosts)} nodes of {nodelist_name}")
            if local_rank >= tasks[node]:
                raise ValueError(f"SLURM_LOCALID={local_rank} is not below the {tasks[node]} tasks that "
                                 f"{tpn_name} gives node {node} ({hosts[node]})")
    if rank == 0 and not environ.get("MASTER_ADDR") and environ.get("SLURM_NODEID", "0") != "0":
        raise ValueError(f"SLURM_PROCID=0 runs on SLURM_NODEID={environ['SLURM_NODEID']}, not on the first host of "
                         f"{nodelist_name} (a non-block task distribution?): set MASTER_ADDR to this task's host")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": str(_master_port(environ)),
    }


# ----------------------------------------------------------------------------- dry run

# Job-wide variables that change how the ranks compute and communicate; launch/spin_job.sh sets
# defaults for some, srun passes all of them (and whatever the user set) on to every task.
LAUNCH_ENV_NAMES = ("CUDA_DEVICE_MAX_CONNECTIONS",)
LAUNCH_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "NVTE_")


def launch_environment(environ: Mapping[str, str]) -> dict:
    """The variables of :data:`LAUNCH_ENV_NAMES` / ``LAUNCH_ENV_PREFIXES`` in ``environ``, sorted by name."""
    return {k: environ[k] for k in sorted(environ)
            if k in LAUNCH_ENV_NAMES or k.startswith(LAUNCH_ENV_PREFIXES)}



def plan_ranks(environ: Mapping[str, str], parallel) -> list[dict]:
    """What every rank of the allocation in ``environ`` will get under ``srun`` (the dry run).

    ``environ`` is the batch shell's: ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``,
    ``SLURM_TASKS_PER_NODE``, ``SLURM_NTASKS`` (else the sum of tasks per node) and optionally
    ``SLURM_NNODES``. Tasks are placed with SLURM's default block distribution (node 0 gets
    ranks 0..n0-1, ...). Each rank's rendezvous comes from :func:`rendezvous_from_slurm` on the
    environment that task will see, and its tp/pp/cp/dp ranks from Megatron's own
    ``RankGenerator`` (see :func:`spin_mcore.platform.grid.parallel_grid`).

    Returns one dict per rank: host, node, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, tp_rank, pp_rank, cp_rank, dp_rank. Raises ValueError naming the variable,
    or ConfigError when the world does not split into tp*pp*cp.
    """
    from spin_mcore.platform.grid import check_world_size, parallel_grid

    dist_mode = environ.get("SLURM_DISTRIBUTION", "")
    if dist_mode and not dist_mode.startswith("block"):
        raise ValueError(f"SLURM_DISTRIBUTION={dist_mode!r}: the rank plan assumes block distribution (the default)")
    nodelist_name = _nodelist_var(environ, step=False)
    hosts = expand_hostlist(environ[nodelist_name])
    if "SLURM_NNODES" in environ:
        nnodes = _int_var(environ, "SLURM_NNODES", minimum=1)
        if nnodes != len(hosts):
            raise ValueError(f"SLURM_NNODES={nnodes} but {nodelist_name}={environ[nodelist_name]!r} has {len(hosts)} hosts")
    if not environ.get("SLURM_TASKS_PER_NODE"):
        raise ValueError("SLURM_TASKS_PER_NODE is not set: run this inside an allocation (sbatch/salloc)")
    tasks = expand_tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
    world = _int_var(environ, "SLURM_NTASKS", minimum=1) if "SLURM_NTASKS" in environ else sum(tasks)
    check_world_size(world, parallel)
    grid = parallel_grid(world, parallel)

    if sum(tasks) != world:
        raise ValueError(f"SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r} adds up to {sum(tasks)} tasks, "
                         f"not SLURM_NTASKS={world}")
    # What a full-allocation srun will export to each task: the job's variables (its own step
    # variables describe the same nodes and tasks), and MASTER_* inherited from the batch shell.
    shared = {k: v for k, v in environ.items()
              if k.startswith(("SLURM_", "MASTER_")) and not k.startswith("SLURM_STEP")}
    plan: list[dict] = []
    for node, (host, n) in enumerate(zip(hosts, tasks)):
        for local in range(n):
            rank = len(plan)
            task_env = dict(shared, SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                            SLURM_NTASKS=str(world))
            plan.append({"host": host, "node": node, **rendezvous_from_slurm(task_env), **grid[rank]})
    return plan
