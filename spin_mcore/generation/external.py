"""Opponent generation by external engines (vLLM, TensorRT-LLM) in their own processes: one start per
instance per iteration, ``generation.engine_instances`` data-parallel instances fed from one work queue.

    generate_with_engine(...)       collective: the whole step, used by the loop and `spin-mcore generate`
      plan_engine_job(...)          rank 0: which shards of which prompt sets still need the engine
      export_hf(...)                every rank: theta_t as HF safetensors (deleted after the step)
      instance_layout(...)          which rank leads (starts) each instance, on which node, in which GPU slot
      run_engine(...)               each leading rank: its instances' worker processes, to completion
      finish_stages(...)            every rank: its share of the engine shards -> ``generate`` shards;
                                    rank 0: the manifests

Instances claim shards from the job's work queue (``protocol.claim_shard``), so a slow instance does
not hold the others, and a killed one's claimed, unwritten shards are served by the next run.

The worker (``spin_mcore.generation.workers.<backend>_worker``: vLLM or TensorRT-LLM) runs under
``generation.python`` (the engine's own environment, default ``.venv-<backend>/bin/python`` in the
checkout), as a child process or as its own ``srun`` step (``generation.engine_launcher``), with
``PYTHONPATH`` at this checkout, started with ``subprocess`` (not a multiprocessing Pool: vLLM
starts child processes, which daemonic Pool workers may not). It writes per prompt set an
``engine`` stage under ``<generate dir>/engine``; resume is per shard at both levels: a shard in
the ``generate`` manifest is never asked for again, and one the engine already wrote (before a
kill) is converted without generating it again.

While the engines work the other ranks wait in :func:`long_barrier` (a gloo group with a
day-long timeout), not in a collective under the default 10-minute timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from spin_mcore.config import ConfigError
from spin_mcore.generation.sampling import SamplingParams, sampling_vocab_size
from spin_mcore.generation.stage import STAGE, _records, _shard_text, prepare_prompts, stage_fingerprint
from spin_mcore.generation.workers import protocol
from spin_mcore.utils.io import atomic_write_json, atomic_write_text
from spin_mcore.utils.procs import end_session, stop_session
from spin_mcore.utils.shards import ShardedStage

CHECKOUT = Path(__file__).resolve().parents[2]
ENGINES = ("vllm", "trtllm")  # each has launch/setup_<name>.sh and workers/<name>_worker.py
ENGINE_WAIT = timedelta(hours=24)  # the engine may take hours on a large prompt set


def setup_hint(backend: str) -> str:
    return f"bash launch/setup_{backend}.sh"


def worker_module(backend: str) -> str:
    return f"spin_mcore.generation.workers.{backend}_worker"


@dataclass
class SetPlan:
    """One prompt set of the job (rank 0 only holds these)."""

    name: str
    gen_dir: Path
    stage: ShardedStage
    accepted: list
    report: dict
    todo: list          # shards missing from the generate manifest
    need: list          # of those, shards the engine has not written yet
    resumed: int


@dataclass
class EnginePlan:
    sets: list = field(default_factory=list)
    params: Optional[SamplingParams] = None
    needed: bool = False   # broadcast: every rank knows whether an export + engine start follows


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def long_barrier() -> None:
    """Barrier of every rank with a day-long timeout (a fresh gloo group). Collective."""
    if _dist():
        dist.barrier(group=dist.new_group(backend="gloo", timeout=ENGINE_WAIT))


def engine_python(gen_cfg) -> Path:
    """``generation.python`` (default ``.venv-<backend>/bin/python``) resolved against the checkout.

    ConfigError naming the setup command when it is missing.
    """
    if gen_cfg.backend not in ENGINES:
        raise ConfigError(f"generation.backend={gen_cfg.backend}: not an external engine ({', '.join(ENGINES)})")
    raw = gen_cfg.python or f".venv-{gen_cfg.backend}/bin/python"
    path = Path(raw) if Path(raw).is_absolute() else CHECKOUT / raw
    if not path.exists():
        raise ConfigError(f"generation.python={raw}: {path} does not exist; create the {gen_cfg.backend} "
                          f"environment with `{setup_hint(gen_cfg.backend)}` (or point generation.python at one)")
    return path


def engine_env(gen_cfg, device: str, environ=None, python: Optional[Path] = None) -> dict:
    """The worker's environment: this checkout importable, the engine environment's ``bin`` first on
    PATH, the CPU KV-cache size set (see config help).

    python: the engine's interpreter (default :func:`engine_python`). Its directory goes first on
    PATH because the engines start programs by name: ``trtllm-llmapi-launch`` runs ``python3 -m
    tensorrt_llm.llmapi.mgmn_*``, and under sbatch ``python3`` would otherwise be the submitting
    environment's, which has no engine.
    """
    env = dict(os.environ if environ is None else environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *filter(None, [env.get("PYTHONPATH")])])
    bin_dir = str(Path(python if python is not None else engine_python(gen_cfg)).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[d for d in env.get("PATH", "").split(os.pathsep) if d and d != bin_dir]])
    if device != "cuda" and "VLLM_CPU_KVCACHE_SPACE" not in env:
        frac = gen_cfg.engine_memory_fraction
        gib = 1 if frac is None else max(1, int(frac * _available_ram_gib()))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    return env


def _available_ram_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return 4.0


@dataclass(frozen=True)
class Instance:
    """One engine instance: its index, the rank that starts it, that rank's node, its TP-group slot there."""

    index: int
    leader: int
    node: str
    slot: int


def instance_layout(gen_cfg, device: str, hosts: list[str]) -> list[Instance]:
    """Where each of ``generation.engine_instances`` runs (pure). hosts: every rank's node name, by rank.

    CUDA: each node's ranks (one per GPU) form TP groups of ``engine_tensor_parallel`` in rank order;
    instance i is the next group, node by node, led (started) by the group's first rank; ``auto`` takes
    every group that fits a node (at least one). CPU: ``auto`` is 1, and rank 0 starts every instance
    (they share the node's cores). ConfigError for an int that does not fit the job's GPUs.
    """
    tp, want = gen_cfg.engine_tensor_parallel, gen_cfg.engine_instances
    if device != "cuda":
        n = 1 if want == "auto" else int(want)
        return [Instance(i, 0, hosts[0], i) for i in range(n)]
    by_node: dict = {}
    for rank, host in enumerate(hosts):
        by_node.setdefault(host, []).append(rank)
    groups = [Instance(0, ranks[j * tp], host, j) for host, ranks in by_node.items() for j in range(len(ranks) // tp)]
    if not groups:  # a TP group wider than a node's ranks: one instance on rank 0's node, as before
        groups = [Instance(0, 0, hosts[0], 0)]
    n = len(groups) if want == "auto" else int(want)
    if n > len(groups):
        raise ConfigError(f"generation.engine_instances={want}: only {len(groups)} TP group(s) of "
                          f"generation.engine_tensor_parallel={tp} GPUs fit this job's nodes")
    return [Instance(i, g.leader, g.node, g.slot) for i, g in enumerate(groups[:n])]


def _rank_hosts() -> list[str]:
    """Every rank's node name, by rank. Collective."""
    me = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if not _dist():
        return [me]
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, me)
    return hosts


def plan_engine_job(cfg, pstate, sets: list[tuple], tokenizer, iteration: int, checkpoint_id: str,
                    force: bool = False) -> EnginePlan:
    """Rank 0 opens each set's generate stage and finds the shards still to make. Collective (a broadcast).

    sets: ``(name, prompts, gen_dir)`` per prompt set; prompts are ``TokenizedPrompt``-like.
    """
    g = cfg.generation
    eos = getattr(tokenizer, "eos_id", None)
    plan = EnginePlan(params=SamplingParams.from_config(g, stop_ids=() if eos is None else (eos,)))
    if pstate.rank == 0:
        for name, prompts, gen_dir in sets:
            accepted, report = prepare_prompts(prompts, cfg.model.seq_length - g.max_new_tokens,
                                               g.overlong_prompts, getattr(tokenizer, "bos_id", None))
            fp = stage_fingerprint(cfg, iteration, checkpoint_id, accepted)
            stage = ShardedStage(gen_dir, STAGE, fp, force=force)
            if stage.complete:
                print(f"generate: {gen_dir} is complete (iteration {iteration}); nothing to do")
                continue
            n_shards = (len(accepted) + g.shard_size - 1) // g.shard_size
            todo = [k for k in range(n_shards) if not stage.has_shard(k)]
            done = protocol.done_shards(protocol.engine_stage(Path(gen_dir) / "engine", fp).dir)
            plan.sets.append(SetPlan(name, Path(gen_dir), stage, accepted, report, todo,
                                     [k for k in todo if k not in done], n_shards - len(todo)))
        plan.needed = any(s.need for s in plan.sets)
    flag = [plan.needed]
    if _dist():
        dist.broadcast_object_list(flag, src=0)
    plan.needed = flag[0]
    return plan


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU attention


def check_engine_model(backend: str, model_cfg, device: str) -> None:
    """ConfigError, before any export, for an engine or model that cannot run on ``device``."""
    if backend == "trtllm" and device != "cuda":
        raise ConfigError("generation.backend=trtllm needs CUDA GPUs (TensorRT-LLM has no CPU path); on this "
                          "machine use generation.backend=vllm or megatron")
    head = model_cfg.hidden_size // model_cfg.num_attention_heads
    if backend == "vllm" and device != "cuda" and head not in CPU_HEAD_SIZES:
        heads = [n for n in range(1, model_cfg.hidden_size + 1) if model_cfg.hidden_size % n == 0
                 and model_cfg.hidden_size // n in CPU_HEAD_SIZES and n % model_cfg.num_query_groups == 0]
        hint = f"; with model.hidden_size={model_cfg.hidden_size}: model.num_attention_heads in {heads}" if heads else ""
        raise ConfigError(f"generation.backend=vllm on CPU: head size {head} (model.hidden_size / "
                          f"model.num_attention_heads) is not one vLLM's CPU attention supports {CPU_HEAD_SIZES}"
                          f"{hint}")


def preflight(cfg, device: str) -> None:
    """Before any process starts: the engine can run on ``device`` and its environment exists (ConfigError)."""
    if cfg.generation.backend in ENGINES:
        check_engine_model(cfg.generation.backend, cfg.model, device)
        engine_python(cfg.generation)


def write_job(cfg, plan: EnginePlan, hf_dir: Path, dtype: str, job_dir: Path, tokenizer, device: str) -> Path:
    """Rank 0: the prompt files and ``job.json`` of one engine start (see :mod:`...workers.protocol`)."""
    g, p = cfg.generation, plan.params
    job_dir.mkdir(parents=True, exist_ok=True)
    psets = []
    for s in plan.sets:
        if not s.need:
            continue
        prompts = job_dir / f"{s.name}_prompts.jsonl"
        protocol.write_prompts(prompts, [str(pr.id) for pr, _ in s.accepted], [ids for _, ids in s.accepted])
        psets.append(protocol.PromptSet(s.name, str(prompts), str(s.gen_dir / "engine"), s.stage.fingerprint,
                                        g.shard_size, s.need))
    sampling = {**p.to_dict(), "vocab_size": sampling_vocab_size(cfg.model.vocab_size, tokenizer),
                "model_vocab_size": cfg.model.vocab_size}
    engine = {"max_num_seqs": g.engine_max_num_seqs, "memory_fraction": g.engine_memory_fraction,
              "tensor_parallel_size": g.engine_tensor_parallel, "seed": g.seed, "device": device,
              "quantization": g.engine_quantization, "window": 2 * g.engine_max_num_seqs}
    job = protocol.Job(model=str(hf_dir), dtype=dtype, max_model_len=cfg.model.seq_length, engine=engine,
                       sampling=sampling, sets=psets, status=str(job_dir / "status.json"))
    return job.save(job_dir / "job.json")


def engine_launcher(gen_cfg, environ=None) -> str:
    """``generation.engine_launcher`` resolved: ``srun`` inside a SLURM job with srun on PATH, else ``local``."""
    environ = os.environ if environ is None else environ
    if gen_cfg.engine_launcher != "auto":
        return gen_cfg.engine_launcher
    return "srun" if "SLURM_JOB_ID" in environ and shutil.which("srun") else "local"


# srun reads these as defaults of its options: the training step's values (e.g. 8 tasks per node)
# must not shape the engine's one-task step.
_STEP_SHAPE_VARS = ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_NODELIST",
                    "SLURM_STEP_NODELIST", "SLURM_GPUS_PER_TASK", "SLURM_DISTRIBUTION", "SLURM_CPU_BIND",
                    "SLURM_GPU_BIND", "SLURM_TASKS_PER_NODE")


_MPI_CONTEXT_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_")


def worker_command(gen_cfg, python: Path, job_path: Path, device: str, environ=None,
                   instance: Optional[Instance] = None) -> tuple[list[str], dict]:
    """argv and environment of the engine worker (pure: no process is started).

    instance: one of several (:func:`instance_layout`): its index follows ``JOB.json`` in the argv (the
    worker writes ``status-<index>.json``), its srun step is named ``spin-engine-<backend>-<index>``
    and runs on its node, and on CUDA its TP-group slot ``j`` of the node's GPUs is
    ``SPIN_ENGINE_DEVICE_SLICE=j*tp:tp`` (the srun step asks for the first ``(j+1)*tp`` GPUs: overlapping
    steps may all be handed the same ones, so each keeps its own slice). None: the single engine.

    ``local``: ``<python> -m <worker> JOB.json``. ``srun``: the same command as its own job step of
    the running allocation, one task on this node, ``--overlap`` (the training step keeps its
    resources while it waits: Slurm's --overlap shares CPUs, memory and GRES), with
    ``generation.engine_tensor_parallel`` GPUs on CUDA, so the engine has its own step in ``sacct`` and its own
    signal handling; TensorRT-LLM's step has one MPI task per TP rank (``--mpi=<generation.engine_mpi>``).
    Both launchers put the engine environment's ``bin`` first on PATH (:func:`engine_env`). Raises
    ConfigError naming the setting when srun is asked for outside a job.
    """
    environ = dict(os.environ if environ is None else environ)
    env = engine_env(gen_cfg, device, environ, python)
    argv = [str(python), "-m", worker_module(gen_cfg.backend), str(job_path)]
    tp = gen_cfg.engine_tensor_parallel
    if instance is not None:
        argv.append(str(instance.index))
        if device == "cuda":
            env[protocol.DEVICE_SLICE_ENV] = f"{instance.slot * tp}:{tp}"
    if engine_launcher(gen_cfg, environ) == "local":
        if gen_cfg.backend == "trtllm":
            # TensorRT-LLM spawns its TP ranks with MPI; inherited SLURM/PMI variables would make MPI
            # join the training step's world instead (trtllm-llmapi-launch strips them the same way).
            for name in [k for k in env if k.startswith(_MPI_CONTEXT_PREFIXES)]:
                del env[name]
        return argv, env
    if "SLURM_JOB_ID" not in environ:
        raise ConfigError("generation.engine_launcher=srun: not inside a SLURM job (SLURM_JOB_ID is not set); "
                          "use generation.engine_launcher=local or auto")
    node = instance.node if instance is not None else environ.get("SLURMD_NODENAME") or socket.gethostname()
    name = f"spin-engine-{gen_cfg.backend}" + ("" if instance is None else f"-{instance.index}")
    srun = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}", f"--jobid={environ['SLURM_JOB_ID']}",
            f"--job-name={name}", "--kill-on-bad-exit=1", "--export=ALL"]
    if device == "cuda":
        srun.append(f"--gpus={((instance.slot if instance is not None else 0) + 1) * tp}")
    for name in _STEP_SHAPE_VARS:
        env.pop(name, None)
    if gen_cfg.backend == "trtllm":
        # TensorRT-LLM on SLURM: one MPI task per TP rank, each running the same LLM-API script under
        # trtllm-llmapi-launch (NVIDIA's examples/llm-api/llm_mgmn_*.sh: tasks must equal tensor_parallel_size).
        srun[srun.index("--ntasks=1")] = f"--ntasks={tp}"
        srun.insert(srun.index("--export=ALL"), f"--mpi={gen_cfg.engine_mpi}")
        argv = [str(Path(python).with_name("trtllm-llmapi-launch")), *argv]
    return srun + argv, env


def run_engine(cfg, job_path: Path, device: str, instances: Optional[list[Instance]] = None,
               run: Optional[str] = None) -> dict:
    """Run the workers of ``instances`` (this rank's; None: the single engine) on ``job_path`` to
    completion; returns their combined status. Raises with the failed instance's log tail.

    Every instance runs to its end even when another fails (the survivors serve the rest of the
    queue); a failed instance's claimed shards are left for the next run.

    run: the claims' run id shared by every leading rank of one job, whose rank 0 has already called
    :func:`protocol.prepare_sets` (a second call while instances run would remove their claims and
    temporary files). None: the only caller of this job; the claims of unfinished shards are cleared
    here (whoever held them is gone) and the run id is fresh.
    """
    from spin_mcore.launcher import WorkerError

    g = cfg.generation
    python = engine_python(g)
    job = protocol.Job.load(job_path)
    if run is None:
        protocol.prepare_sets(job)
        run = uuid.uuid4().hex[:12]  # claims of this run; any other run's are stale
    started = []
    start = time.perf_counter()
    try:
        for inst in instances or [None]:
            argv, env = worker_command(g, python, job_path, device, instance=inst)
            env["SPIN_ENGINE_RUN"] = run
            status = Path(protocol.instance_status(job.status, None if inst is None else inst.index))
            status.unlink(missing_ok=True)
            log = job_path.with_name("worker.log" if inst is None else f"worker-{inst.index}.log")
            started.append((inst, argv, status, log, _start(argv, env, log)))
        codes = _wait_all([p for *_, p in started])
    except BaseException:
        for *_, proc in started:
            _stop(proc, signal.SIGKILL)
        raise
    failed = [(inst, code, log) for (inst, _, _, log, _), code in zip(started, codes) if code != 0]
    if failed:
        inst, code, log = failed[0]
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        which = "" if inst is None else f" instance {inst.index} of {len(started)} on {inst.node}"
        raise WorkerError(f"{g.backend} worker{which} exited with {code} (log {log}; "
                          f"{len(failed)} of {len(started)} failed):\n" + "\n".join(tail))
    out = merge_status([json.loads(st.read_text()) for _, _, st, _, _ in started])
    out["worker_seconds"] = round(time.perf_counter() - start, 3)
    out["launcher"] = started[0][1][0] if started[0][1][0] == "srun" else "local"
    return out


def merge_status(parts: list[dict]) -> dict:
    """One status for several instances: counts summed, wall times the slowest's, each instance's kept."""
    if len(parts) == 1:
        return dict(parts[0])
    out = {**parts[0], "instances": parts}
    for k in ("engine_starts", "generated_tokens", "shards"):
        out[k] = sum(p.get(k, 0) for p in parts)
    for k in ("load_seconds", "generate_seconds"):
        out[k] = max(p.get(k, 0) for p in parts)
    return out


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One worker, its output appended to ``log``, in its own session (stopped together, by this rank only)."""
    with log.open("ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(CHECKOUT),
                                start_new_session=True)


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker (:func:`_wait` each); a preemption stops the others too (``_wait`` raises)."""
    codes = []
    for i, proc in enumerate(procs):
        try:
            codes.append(_wait(proc))
        except BaseException:
            for other in procs[i + 1:]:
                _stop(other, signal.SIGTERM)
            raise
    return codes


def _wait(proc: subprocess.Popen) -> int:
    """Wait for the worker; on a stop signal (preemption) stop it and raise ``Preempted``.

    The worker writes whole shards only, so a stop loses at most the shards in flight; the
    requeued job's engine generates just the missing ones. A worker that ends by itself with
    :data:`protocol.REQUEUE_EXIT_CODE`, or with any status after this process received a stop
    signal, was stopped too (SLURM's ``--signal`` reaches the engine's step as well, often first):
    ``Preempted``, not a failure, so the job is requeued (finished shards are converted then).
    """
    from spin_mcore.platform import preemption

    while True:
        try:
            returncode = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            if preemption.received():
                _stop(proc, signal.SIGTERM)
                raise preemption.preempted("generation engine (finished shards kept)") from None
            continue
        # A worker that ended (SIGKILLed above all) may leave vLLM's engine-core processes behind,
        # holding the memory the next engine start needs.
        end_session(proc.pid)
        _raise_if_preempted(returncode)
        return returncode


def _raise_if_preempted(returncode: int) -> None:
    """``Preempted`` when the worker's exit says it was stopped (see :func:`_wait`)."""
    from spin_mcore.platform import preemption

    if returncode == protocol.REQUEUE_EXIT_CODE or preemption.received():
        raise preemption.preempted(f"generation engine (worker exited with {returncode}; finished shards kept)")


def _stop(proc: subprocess.Popen, sig: int) -> None:
    stop_session(proc, sig, grace_s=60.0)


def generate_with_engine(cfg, pstate, load_model, sets: list[tuple], tokenizer, iteration: int, checkpoint_id: str,
                         work_dir: Path, force: bool = False, after_export: Optional[Callable[[], None]] = None) -> dict:
    """y' for every prompt set from one start of each engine instance (:func:`instance_layout`). Collective;
    returns the instances' merged status on every rank (``{"engine_starts": 0}`` when nothing needed
    generating).

    load_model: ``() -> model`` (theta_t, built and loaded on every rank), called only when some
    shard needs the engine. sets: ``(name, prompts, generate_dir)``. theta_t is exported to HF once
    into ``work_dir/engine_export`` (every rank takes part), freed before the engine starts, and the
    export is deleted once its shards are converted (it is rebuilt if a later run needs the engine
    again). ``after_export``: called once the export is written, so the caller's copy of the model leaves
    the device (the loop parks its resident theta_t in host memory); by default the model is dropped.
    Each instance's leading rank starts it (:func:`run_engine`); the other ranks wait in
    :func:`long_barrier` meanwhile; a failure or preemption of any instance reaches every rank. Then
    every rank converts its share of the engine shards into the ``generate`` stages (:func:`finish_stages`).
    """
    import gc

    import torch

    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.platform import preemption

    g = cfg.generation
    plan = plan_engine_job(cfg, pstate, sets, tokenizer, iteration, checkpoint_id, force=force)
    engine: dict = {"engine_starts": 0}
    export = Path(work_dir) / "engine_export"
    if plan.needed:
        from spin_mcore.platform.distributed import select_device

        device = select_device(cfg.platform.device)
        check_engine_model(g.backend, cfg.model, device)
        model = load_model()
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        hf_dir = export_hf(model, pstate, export, cfg.model)
        del model  # the engine gets the memory
        if after_export is not None:
            after_export()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        job, run = _prepare_job(cfg, plan, hf_dir, dtype, Path(work_dir) / "engine_job", tokenizer, device,
                                pstate.rank)
        layout = instance_layout(g, device, _rank_hosts())
        mine = [i for i in layout if i.leader == pstate.rank]
        failure = [None]
        if mine:
            try:
                engine = run_engine(cfg, job, device, mine if len(layout) > 1 else None, run)
            except BaseException as exc:  # the other ranks learn of it after the barrier, then all raise
                failure[0] = exc
        long_barrier()
        engine = _gather_engines(engine, failure[0], pstate.rank)
        if failure[0] is not None:
            raise failure[0]
        if engine.get("failed") == "Preempted":  # every rank stops the same way, so the requeued job resumes
            raise preemption.preempted("generation engine (on a leading rank)")
        if engine.get("failed"):
            raise RuntimeError(f"a generation engine instance failed ({engine['failed']}; its message is in the "
                               f"output of rank {engine['failed_rank']})")
    finish_stages(cfg, plan, pstate, tokenizer, iteration, checkpoint_id, engine)
    if pstate.rank == 0:
        if plan.needed:
            atomic_write_json(Path(work_dir) / "engine.json", {"backend": g.backend, **engine})
        shutil.rmtree(export, ignore_errors=True)  # a 70B export is 140 GB per iteration
    if _dist():
        dist.barrier()
    return engine


def _prepare_job(cfg, plan: EnginePlan, hf_dir: Path, dtype: str, job_dir: Path, tokenizer, device: str,
                 rank: int) -> tuple[Path, str]:
    """Rank 0 writes the job and clears its stale claims (before any instance starts); every rank gets
    the job path and the run id of the claims. Collective (a broadcast): a failure on rank 0 raises
    there and, as a RuntimeError naming it, on every other rank."""
    out, failure = [None, ""], None
    if rank == 0:
        try:
            job = write_job(cfg, plan, hf_dir, dtype, job_dir, tokenizer, device)
            protocol.prepare_sets(protocol.Job.load(job))
            out = [str(job), uuid.uuid4().hex[:12]]
        except Exception as exc:
            failure, out = exc, [None, type(exc).__name__]
    if _dist():
        dist.broadcast_object_list(out, src=0)
    if failure is not None:
        raise failure
    if out[0] is None:
        raise RuntimeError(f"rank 0 could not write the engine job ({out[1]}; its message is in rank 0's output)")
    return Path(out[0]), out[1]


def _gather_engines(engine: dict, failure: Optional[BaseException], rank: int) -> dict:
    """Every leading rank's engine status merged, the same on every rank; ``failed`` names the first
    failure's type (``failed_rank``: whose). Collective."""
    mine = {"engine": engine, "failed": None if failure is None else type(failure).__name__, "rank": rank}
    parts = [mine]
    if _dist():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine, group=dist.new_group(backend="gloo"))
    engines = [p["engine"] for p in parts if p["engine"].get("engine_starts")]
    out = merge_status(engines) if engines else {"engine_starts": 0}
    if len(engines) > 1:  # merge_status of per-rank statuses: keep the ranks' instance lists flat
        out["instances"] = [i for e in engines for i in e.get("instances", [e])]
    bad = next((p for p in parts if p["failed"]), None)
    if bad is not None:
        out.update(failed=bad["failed"], failed_rank=bad["rank"])
    return out


def finish_stages(cfg, plan: EnginePlan, pstate, tokenizer, iteration: int, checkpoint_id: str, engine: dict) -> dict:
    """Collective: each set's engine shards become its ``generate`` shards, converted by every rank;
    rank 0 then writes each set's manifest once and finalises it.

    The shards to convert (each set's ``todo``, sets in order) are dealt out round robin: the i-th goes
    to rank ``i % world``, so a resumed run's scattered leftovers still spread evenly. Rank 0 sends each
    rank its shards' prompts; each rank reads those engine shards from the shared file system, decodes
    and writes its generate shards atomically. The gather of every rank's manifest entries is the
    barrier after which rank 0 adds them to the manifests, in shard order, so the stage is byte for
    byte the one a single rank writes. A kill before that loses only conversions: the engine shards
    stay, and the rerun converts them again without generating.

    engine: the workers' merged status (``engine_starts`` 0 when every shard was already generated).
    Returns ``{set name: summary}`` on rank 0, ``{}`` on the other ranks.
    """
    g, params = cfg.generation, plan.params
    group = dist.new_group(backend="gloo") if _dist() else None
    world = dist.get_world_size() if group is not None else 1
    work = None
    if pstate.rank == 0:
        items = [(si, k) for si, s in enumerate(plan.sets) for k in s.todo]
        work = [[(si, str(plan.sets[si].gen_dir), k, plan.sets[si].accepted[k * g.shard_size:(k + 1) * g.shard_size])
                 for i, (si, k) in enumerate(items) if i % world == r] for r in range(world)]
    mine = work[0] if group is None else _scatter(work, group)
    done, failure, entries = {}, None, {}
    try:
        for si, gen_dir, k, chunk in mine:
            engine_dir = Path(gen_dir) / "engine"
            if gen_dir not in entries:
                entries[gen_dir] = protocol.engine_entries(engine_dir)
            done[(si, k)] = convert_shard(engine_dir, k, chunk, entries[gen_dir], tokenizer, iteration, params)
    except Exception as exc:  # every rank learns of it from the gather below, then all raise
        failure = exc
    parts = [(done, None if failure is None else f"{type(failure).__name__}: {failure}")]
    if group is not None:
        mine_part, parts = parts[0], [None] * world
        dist.all_gather_object(parts, mine_part, group=group)
    if failure is not None:
        raise failure
    bad = next((r for r, (_, f) in enumerate(parts) if f), None)
    if bad is not None:
        raise RuntimeError(f"rank {bad} could not convert its engine shards ({parts[bad][1]})")
    if pstate.rank != 0:
        return {}
    converted = {key: v for d, _ in parts for key, v in d.items()}
    summaries = {}
    for si, s in enumerate(plan.sets):
        tokens = 0
        for k in s.todo:
            entry, shard_tokens = converted[(si, k)]
            s.stage.manifest["shards"][f"{k:05d}"] = entry
            tokens += shard_tokens
        summary = {"iteration": iteration, "prompts": len(s.accepted), "samples": len(s.accepted) * params.num_samples,
                   "shards": s.resumed + len(s.todo), "shards_resumed": s.resumed,
                   "generated_tokens_this_run": tokens,  # this set's; the engine's rate covers the whole job
                   "engine_seconds_this_run": engine.get("generate_seconds", 0.0),
                   "tokens_per_s": round(engine.get("generated_tokens", 0) / max(engine.get("generate_seconds", 0), 1e-9), 2),
                   "backend": g.backend, "checkpoint": checkpoint_id, "engine_starts": engine.get("engine_starts", 0),
                   "engine_load_seconds": engine.get("load_seconds"), **s.report}
        s.stage.finalize(summary)  # the one manifest write of this set
        summaries[s.name] = summary
        print("generate (" + g.backend + "): " + ", ".join(f"{k}={summary[k]}" for k in (
            "prompts", "samples", "engine_starts", "generated_tokens_this_run", "tokens_per_s", "shards_resumed")))
    return summaries


def _scatter(work: Optional[list], group) -> list:
    """Rank 0's ``work[r]`` on each rank r. Collective over ``group``."""
    out = [None]
    dist.scatter_object_list(out, work, src=0, group=group)
    return out[0]


def convert_shard(engine_dir: Path, k: int, chunk: list, entries: dict, tokenizer, iteration: int,
                  params: SamplingParams) -> tuple[dict, int]:
    """Engine shard ``k`` of ``engine_dir`` -> generate shard ``k`` beside it (written atomically, not yet in
    the manifest). chunk: the shard's ``(prompt, ids)`` pairs. entries: :func:`protocol.engine_entries`.
    Returns (the shard's manifest entry, generated tokens)."""
    got = protocol.read_engine_shard(engine_dir, k, entries)
    by_key: dict = {}
    for r in got:
        by_key.setdefault(r["key"], []).append(r)
    rows = [sorted(by_key.get(str(p.id), []), key=lambda r: r["sample_index"]) for p, _ in chunk]
    if any(len(r) != params.num_samples for r in rows):
        raise RuntimeError(f"{engine_dir} shard {k}: expected {params.num_samples} samples per prompt")
    recs = _records(chunk, [[r["generated_ids"] for r in row] for row in rows], tokenizer, iteration, params)
    for rec, er in zip(recs, (r for row in rows for r in row)):
        rec.update(engine_logp=er["engine_logp"], finish_reason=er["finish_reason"])
    text, entry = _shard_text(recs)
    name = f"shard-{k:05d}.jsonl"
    atomic_write_text(engine_dir.parent / name, text)
    return {"file": name, **entry}, sum(len(r["generated_ids"]) for r in recs)
