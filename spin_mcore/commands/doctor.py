"""``spin-mcore doctor [CONFIG] [key=value ...] [--json]``: is this node ready for what the config needs?

Checks this machine (inside an allocation: the node it runs on; ``launch/spin_job.sh`` runs it once per
node before the job step) and prints one row per check, ``ok`` / ``warn`` / ``FAIL`` / ``skip``, with the
one line that fixes each failure. Exit status 0 when nothing FAILs, 1 otherwise (a warning does not fail).

Checked: CUDA visible (platform.device cuda/auto), compute capability against precision.recipe (FP8 >= 8.9,
mxfp8 10.x), the driver's CUDA against torch's and the engine's, Transformer Engine inside the range
megatron-core's own metadata asks for, apex's fused weight-gradient extension where gradient-accumulation
fusion is on, NCCL, CUDA_DEVICE_MAX_CONNECTIONS, the external engine's environment (generation.backend
vllm/trtllm), SLURM's PMIx plug-in and the allocation's GPUs against the layout, free space at run.dir
against what one iteration writes (spin_mcore/plan/disk.py), and NVIDIA DALI for data.loader auto/dali (it
imports, its wheel's CUDA major is torch's, and a reader over two token-store files returns them, on this
rank's GPU when CUDA is in use). On a CPU run the CUDA checks are ``skip``.

Each check is a pure function of the facts it needs (tests call them with made-up facts); :func:`gather`
collects the facts of this machine and :func:`run_checks` applies the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from spin_mcore.commands.common import add_config_args, split_config_and_overrides
from spin_mcore.config import ConfigError

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
ENGINE_MODULES = {"vllm": "vllm", "trtllm": "tensorrt_llm"}
CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass
class Check:
    """One row of the table: ``fix`` is the one line that repairs a FAIL (or a warn)."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Facts:
    """What :func:`gather` found on this machine; every field has a neutral default for tests."""

    cuda_available: bool = False
    device_count: int = 0
    capability: Optional[tuple] = None
    torch_cuda: Optional[str] = None
    driver_cuda: Optional[str] = None
    nccl: Optional[str] = None
    te_version: Optional[str] = None
    te_error: Optional[str] = None
    te_spec: Optional[str] = None
    apex_wgrad: bool = False
    apex_fallback: bool = False
    engine_error: Optional[str] = None
    engine_result: Optional[dict] = None
    engine_torch_cuda: Optional[str] = None
    mpi_list: Optional[str] = None
    dali_error: Optional[str] = None  # why nvidia.dali does not import (None: it does, or was not probed)
    dali_build: Optional[str] = None  # e.g. "nvidia-dali-cuda120 2.4.0"
    dali_read_error: Optional[str] = None  # why reading two token-store files back failed
    dali_device: Optional[int] = None  # the device_id the read ran with (None: CPU pipeline)
    disk_path: str = "."
    disk_free: int = 0
    env: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- small parsers


def parse_version(text: Optional[str]) -> Optional[tuple]:
    """``"12.4"`` / ``"2.21.5"`` / ``"12.8.1+cu"`` -> (12, 4) / (2, 21, 5) / (12, 8, 1); None when unreadable."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def driver_cuda_from_smi(output: str) -> Optional[str]:
    """The driver's highest supported CUDA from plain ``nvidia-smi`` output ("CUDA Version: 12.4")."""
    m = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", output or "")
    return m.group(1) if m else None


def gpus_per_node(environ: Mapping[str, str]) -> tuple[Optional[int], str]:
    """(GPUs this node's allocation gives, the variable it came from); (None, "") when nothing says.

    SLURM_GPUS_ON_NODE is set in steps; SLURM_GPUS_PER_NODE may read ``8`` or ``h100:8``;
    CUDA_VISIBLE_DEVICES is a comma list (empty: no GPU).
    """
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = environ.get(name, "")
        m = re.search(r"(\d+)\s*$", raw.split(",")[0]) if raw else None
        if m:
            return int(m.group(1)), name
    if "CUDA_VISIBLE_DEVICES" in environ:
        raw = environ["CUDA_VISIBLE_DEVICES"].strip()
        return (len([d for d in raw.split(",") if d.strip()]) if raw else 0), "CUDA_VISIBLE_DEVICES"
    return None, ""


def _int_env(environ: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of ``names`` set to an integer, else None."""
    for name in names:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return None


def _gb(n: float) -> str:
    """Bytes in the largest decimal unit that keeps a digit before the point (tiny test models write kB)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


# ----------------------------------------------------------------------------- checks (pure)


def check_cuda(setting: str, facts: Facts) -> Check:
    """platform.device against what this process sees, by the same rule the ranks apply (select_device)."""
    from spin_mcore.platform.distributed import select_device

    visible = facts.env.get("CUDA_VISIBLE_DEVICES")
    try:
        device = select_device(setting, facts.cuda_available, visible)
    except ConfigError as exc:
        if setting == "cuda":
            return Check("CUDA", FAIL, f"CUDA not visible: {exc}",
                         "request GPUs (sbatch --gpus-per-node=N) and check `nvidia-smi`, or set platform.device=cpu")
        return Check("CUDA", FAIL, str(exc), "export CUDA_VISIBLE_DEVICES= (or set platform.device=cuda)")
    if device == "cpu":
        why = "platform.device=cpu" if setting == "cpu" else "platform.device=auto and no CUDA device"
        return Check("CUDA", SKIP, f"{why}: running on the CPU (gloo)")
    return Check("CUDA", OK, f"{facts.device_count} device(s) visible")


def check_capability(precision, capability: Optional[tuple]) -> Check:
    """Compute capability against precision.recipe / fp8_scaling (spin_mcore.models.fp8's rule)."""
    from spin_mcore.models.fp8 import check_fp8_hardware

    found = f"compute capability {capability[0]}.{capability[1]}" if capability else "no capability read"
    try:
        check_fp8_hardware(precision, capability, te_available=True)  # TE has its own row
    except ConfigError as exc:
        return Check("compute capability", FAIL, str(exc), "run on Hopper/Ada (Blackwell for mxfp8) GPUs, "
                     "or set precision.recipe=bf16")
    if capability and tuple(capability) < (8, 0) and precision.recipe in ("auto", "bf16"):
        return Check("compute capability", FAIL, f"bf16 needs compute capability >= 8.0 (Ampere); found {found}",
                     "run on Ampere or newer GPUs, or set precision.recipe=fp32")
    return Check("compute capability", OK, f"{found}, precision.recipe={precision.recipe}")


def check_driver(what: str, runtime_cuda: Optional[str], driver_cuda: Optional[str]) -> Check:
    """The driver must support the CUDA ``what`` (torch, an engine's torch) was built for.

    A lower major version cannot run at all; a lower minor version runs through CUDA's minor-version
    compatibility but cannot JIT newer PTX (Triton kernels, some extensions): a warning.
    """
    name = f"driver vs {what} CUDA"
    if runtime_cuda is None:
        return Check(name, FAIL, f"{what} is a CPU build (torch.version.cuda is None)",
                     "install the CUDA build of torch: bash launch/setup_gpu.sh")
    runtime, driver = parse_version(runtime_cuda), parse_version(driver_cuda)
    if driver is None:
        return Check(name, WARN, f"{what} needs CUDA {runtime_cuda}; the driver's CUDA could not be read",
                     "check `nvidia-smi` (its header shows the driver's CUDA version)")
    if driver[:1] < runtime[:1]:
        return Check(name, FAIL, f"{what} needs CUDA {runtime_cuda}; the driver supports up to {driver_cuda}",
                     f"update the NVIDIA driver, or install a torch built for CUDA <= {driver_cuda} "
                     "(SPIN_TORCH_CUDA=cuXY bash launch/setup_gpu.sh)")
    if driver[:2] < runtime[:2]:
        return Check(name, WARN, f"{what} needs CUDA {runtime_cuda}; the driver supports {driver_cuda} "
                     "(minor-version compatibility: no PTX JIT of newer code)",
                     f"update the NVIDIA driver, or install a torch built for CUDA <= {driver_cuda}")
    return Check(name, OK, f"{what} CUDA {runtime_cuda}, driver supports {driver_cuda}")


def check_transformer_engine(te_version: Optional[str], te_error: Optional[str], spec: Optional[str],
                             fp8: bool) -> Check:
    """TE importable and inside megatron-core's range; required for FP8, else only faster (warn)."""
    from packaging.specifiers import SpecifierSet

    fix = f"pip install --no-build-isolation 'transformer-engine[pytorch]{spec or ''}'"
    if te_version is None or te_error:
        why = te_error or "not installed"
        status = FAIL if fp8 else WARN
        need = "precision.recipe=fp8 needs it" if fp8 else "Megatron's local layers are used instead (slower)"
        return Check("Transformer Engine", status, f"not importable ({why}); {need}", fix)
    if spec and not SpecifierSet(spec).contains(te_version, prereleases=True):
        return Check("Transformer Engine", FAIL, f"{te_version} is outside megatron-core's range {spec}", fix)
    return Check("Transformer Engine", OK, f"{te_version} (megatron-core asks {spec or 'any'})")


def check_apex(fusion_on: bool, available: bool, falls_back: bool) -> Check:
    """apex's fused_weight_gradient_mlp_cuda, needed by Megatron's gradient-accumulation fusion.

    Without it Megatron 0.16.1 refuses to build the non-TE output layer (RuntimeError) unless the model
    builder turns the fusion off (``falls_back``: spin_mcore.models.gpt.apex_fused_wgrad_available exists),
    which only costs speed.
    """
    if not fusion_on:
        return Check("apex fused wgrad", SKIP, "gradient-accumulation fusion is off (train.fused_kernels, or no TE)")
    if available:
        return Check("apex fused wgrad", OK, "fused_weight_gradient_mlp_cuda importable")
    fix = "build apex with its CUDA extensions: bash launch/setup_gpu.sh (or set train.fused_kernels=off)"
    if falls_back:
        return Check("apex fused wgrad", WARN, "apex's extension is missing: gradient-accumulation fusion "
                     "turns itself off (slower weight gradients)", fix)
    return Check("apex fused wgrad", FAIL, "apex's fused_weight_gradient_mlp_cuda is missing and "
                 "gradient-accumulation fusion is on: Megatron refuses to build the output layer", fix)


def check_nccl(nccl: Optional[str]) -> Check:
    """torch's NCCL (the GPU collectives); its absence means a torch built without distributed GPU support."""
    if not nccl:
        return Check("NCCL", FAIL, "torch.cuda.nccl.version() gave nothing: this torch has no NCCL",
                     "install the CUDA build of torch: bash launch/setup_gpu.sh")
    return Check("NCCL", OK, nccl)


def check_max_connections(environ: Mapping[str, str], parallel) -> Check:
    """CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron's TP/SP communication overlap relies on it for ordering."""
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value == "1":
        return Check("CUDA_DEVICE_MAX_CONNECTIONS", OK, "1")
    shown = "unset" if value is None else repr(value)
    fix = "export CUDA_DEVICE_MAX_CONNECTIONS=1 (launch/spin_job.sh sets it)"
    if parallel.tp > 1:
        return Check("CUDA_DEVICE_MAX_CONNECTIONS", FAIL, f"{shown}; parallel.tp={parallel.tp} overlaps its "
                     "all-gather/reduce-scatter with GEMMs and relies on one hardware queue to order them", fix)
    return Check("CUDA_DEVICE_MAX_CONNECTIONS", WARN, f"{shown}; Megatron's communication overlap expects 1", fix)


def check_engine(backend: str, error: Optional[str], result: Optional[dict]) -> Check:
    """The external engine's own environment (``engine_check`` JSON: backend, ok, version, problems)."""
    name = f"engine ({backend})"
    if backend not in ENGINE_MODULES:
        return Check("engine", SKIP, f"generation.backend={backend} runs in-process")
    fix = f"bash launch/setup_{backend}.sh (or point generation.python at the engine's python)"
    if error:
        return Check(name, FAIL, error, fix)
    if not result:
        return Check(name, FAIL, "the engine check printed no result", fix)
    problems = "; ".join(result.get("problems") or [])
    if not result.get("ok"):
        return Check(name, FAIL, problems or "not usable", fix)
    return Check(name, OK, f"{result.get('version') or '?'}" + (f" ({problems})" if problems else ""))


def check_pmix(gen, in_slurm: bool, mpi_list: Optional[str]) -> Check:
    """TensorRT-LLM's multi-GPU engine under srun needs SLURM's PMIx plug-in (``srun --mpi=list``)."""
    if gen.backend != "trtllm" or gen.engine_launcher == "local" or not in_slurm:
        why = ("not in a SLURM job" if not in_slurm and gen.backend == "trtllm" and gen.engine_launcher != "local"
               else f"generation.backend={gen.backend}, engine_launcher={gen.engine_launcher}")
        return Check("SLURM PMIx", SKIP, why)
    if mpi_list is None:
        return Check("SLURM PMIx", FAIL, "`srun --mpi=list` did not run", "check that srun is on PATH")
    if re.search(r"\bpmix", mpi_list):
        return Check("SLURM PMIx", OK, "srun --mpi=list offers pmix")
    listed = ", ".join(sorted(set(re.findall(r"\b(none|pmi2|pmix\S*|cray_shasta|openmpi)\b", mpi_list)))) or "none"
    return Check("SLURM PMIx", FAIL, f"srun --mpi=list offers no pmix ({listed}); the TensorRT-LLM engine step needs it",
                 "use a SLURM built with PMIx (ask the admins), or set generation.engine_launcher=local")


def dali_build_cuda_major(build: Optional[str]) -> Optional[int]:
    """12 for "nvidia-dali-cuda120 2.4.0", 13 for "...-cuda130 ..."; None when unreadable."""
    m = re.search(r"cuda(\d\d)\d", build or "")
    return int(m.group(1)) if m else None


def check_dali(setting: str, device: str, torch_cuda: Optional[str], facts: Facts) -> Check:
    """data.loader auto|dali: DALI imports, its wheel matches torch's CUDA major on GPUs, and it reads a token store."""
    name = "data loader (DALI)"
    fix = "install the DALI wheel for torch's CUDA (launch/setup_gpu.sh; launch/setup_local.sh on CPU), or set data.loader=torch"
    if setting == "torch":
        return Check(name, SKIP, "data.loader=torch")
    if facts.dali_error:
        if setting == "dali":
            return Check(name, FAIL, f"data.loader=dali but NVIDIA DALI does not import ({facts.dali_error})", fix)
        return Check(name, WARN, f"NVIDIA DALI does not import ({facts.dali_error}): data.loader=auto falls back to "
                                 "the torch loader, which parses every stage's JSON on every rank", fix)
    if facts.dali_read_error:
        return Check(name, FAIL, f"{facts.dali_build or 'NVIDIA DALI'} imports but reading two token-store files "
                                 f"failed ({facts.dali_read_error}); data.loader={setting} would pick it", fix)
    built, wanted = dali_build_cuda_major(facts.dali_build), parse_version(torch_cuda)
    where = "on the CPU" if facts.dali_device is None else f"with device_id={facts.dali_device}"
    if device == "cuda" and built is not None and wanted is not None and built != wanted[0]:
        return Check(name, WARN, f"{facts.dali_build} is built for CUDA {built}, torch uses CUDA {torch_cuda}", fix)
    return Check(name, OK, f"{facts.dali_build or 'NVIDIA DALI'}: two token-store files read back {where}")


def check_layout(cfg, device: str, environ: Mapping[str, str]) -> Check:
    """The allocation against parallel.tp*pp*cp and the engine's tensor parallel size (inside SLURM)."""
    p, g = cfg.parallel, cfg.generation
    if not environ.get("SLURM_JOB_ID"):
        return Check("allocation", SKIP, "not in a SLURM job (SLURM_JOB_ID unset)")
    nodes = _int_env(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    tasks = _int_env(environ, "SPIN_JOB_NTASKS", "SLURM_NTASKS")
    model_parallel = p.tp * p.pp * p.cp
    gpus, source = gpus_per_node(environ)
    if device == "cuda":
        if not gpus:
            return Check("allocation", FAIL, f"no GPUs in the allocation ({source or 'no SLURM_GPUS_* set'}={gpus})",
                         "sbatch --gpus-per-node=8 (or as many as each node has)")
        world = nodes * gpus
        if tasks is not None and tasks > world:
            return Check("allocation", FAIL, f"{tasks} tasks for {world} GPUs ({nodes} node(s) x {gpus}, {source}): "
                         "ranks would share a GPU", f"sbatch --ntasks-per-node={gpus}")
        if g.backend in ENGINE_MODULES and g.engine_tensor_parallel > gpus:
            return Check("allocation", FAIL, f"generation.engine_tensor_parallel={g.engine_tensor_parallel} is more "
                         f"than the {gpus} GPUs of a node ({source})",
                         f"set generation.engine_tensor_parallel<={gpus}")
    else:
        world = tasks if tasks is not None else nodes
    if world % model_parallel:
        return Check("allocation", FAIL, f"world {world} is not divisible by parallel.tp*pp*cp = "
                     f"{p.tp}*{p.pp}*{p.cp} = {model_parallel}",
                     f"use a multiple of {model_parallel} {'GPUs' if device == 'cuda' else 'tasks'}, or change parallel.tp/pp")
    detail = f"world {world} = {nodes} node(s) x {gpus if device == 'cuda' else world // nodes}, dp={world // model_parallel}"
    if device == "cuda" and tasks is not None and tasks < world:
        return Check("allocation", WARN, f"{detail}, but only {tasks} tasks: some GPUs idle",
                     f"sbatch --ntasks-per-node={gpus}")
    return Check("allocation", OK, detail)


def check_disk(path: str, free: int, need: dict, iterations: int) -> Check:
    """Free space at run.dir against one iteration's writes (FAIL) and the whole run's (warn)."""
    parts = f"model {_gb(need['model'])}, {need['train_state_count']} train states {_gb(need['train_state'])}"
    if need["hf_export"]:
        parts += f", HF export {_gb(need['hf_export'])}"
    if free < need["total"]:
        return Check("disk at run.dir", FAIL, f"{_gb(free)} free at {path}; one iteration writes {_gb(need['total'])} "
                     f"({parts})", "free space there, point run.dir at a larger file system, or lower "
                     "train.keep_checkpoints")
    if free < need["total"] * iterations:
        return Check("disk at run.dir", WARN, f"{_gb(free)} free at {path}: {free // need['total']} of "
                     f"run.iterations={iterations} iterations of {_gb(need['total'])} ({parts})",
                     "free space, or move finished iterations' train_state/ away between iterations")
    return Check("disk at run.dir", OK, f"{_gb(free)} free at {path}; one iteration writes {_gb(need['total'])} ({parts})")


def run_checks(cfg, facts: Facts) -> list[Check]:
    """Every check of ``cfg`` against ``facts`` (pure: tests build Facts by hand)."""
    from spin_mcore.plan.disk import iteration_write_bytes

    env = facts.env
    cuda_row = check_cuda(cfg.platform.device, facts)
    checks = [cuda_row]
    device = "cuda" if cuda_row.status == OK else "cpu"
    if device == "cuda":
        # Gradient-accumulation fusion follows train.fused_kernels (spin_mcore.models.gpt.use_fused_kernels):
        # auto is on exactly where CUDA and Transformer Engine are.
        fusion = cfg.train.fused_kernels == "on" or (cfg.train.fused_kernels == "auto" and facts.te_version is not None
                                                     and not facts.te_error)
        checks += [
            check_capability(cfg.precision, facts.capability),
            check_driver("torch", facts.torch_cuda, facts.driver_cuda),
            check_transformer_engine(facts.te_version, facts.te_error, facts.te_spec, cfg.precision.recipe == "fp8"),
            check_apex(fusion, facts.apex_wgrad, facts.apex_fallback),
            check_nccl(facts.nccl),
            check_max_connections(env, cfg.parallel),
        ]
        if cfg.generation.backend in ENGINE_MODULES and facts.engine_error is None:
            checks.append(check_driver(f"{cfg.generation.backend} engine's torch", facts.engine_torch_cuda,
                                       facts.driver_cuda))
    else:
        reason = cuda_row.detail if cuda_row.status == SKIP else "CUDA is not in use"
        for name in ("compute capability", "driver vs torch CUDA", "Transformer Engine", "apex fused wgrad", "NCCL",
                     "CUDA_DEVICE_MAX_CONNECTIONS"):
            checks.append(Check(name, SKIP, reason))
    checks += [
        check_engine(cfg.generation.backend, facts.engine_error, facts.engine_result),
        check_pmix(cfg.generation, bool(env.get("SLURM_JOB_ID")), facts.mpi_list),
        check_layout(cfg, device, env),
        check_disk(facts.disk_path, facts.disk_free, iteration_write_bytes(cfg, gpu=device == "cuda"),
                   cfg.run.iterations),
        check_dali(cfg.data.loader, device, facts.torch_cuda, facts),
    ]
    return checks


# ----------------------------------------------------------------------------- gathering the facts


def _run(argv: list[str], timeout: float = 120, env: Optional[dict] = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``argv``; 127 and the reason when it cannot start or times out."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def te_requirement() -> Optional[str]:
    """The transformer-engine version range in megatron-core's installed metadata (e.g. ``<2.12.0,>=2.9.0a0``)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("megatron-core") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        req = Requirement(line)
        if req.name.replace("_", "-").lower() == "transformer-engine":
            return str(req.specifier) or None
    return None


def _te_version() -> tuple[Optional[str], Optional[str]]:
    """(installed TE version, why it does not import) — the error is None when ``transformer_engine.pytorch`` imports."""
    from importlib import metadata

    version = None
    for name in ("transformer-engine", "transformer_engine"):
        try:
            version = metadata.version(name)
            break
        except metadata.PackageNotFoundError:
            continue
    if version is None:
        return None, None
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # a broken TE raises all sorts (OSError for a missing libcudnn, ...)
        return version, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return version, None


def _apex_facts() -> tuple[bool, bool]:
    """(apex's fused wgrad extension importable, the model builder falls back without it)."""
    try:
        from spin_mcore.models import gpt
    except Exception:
        gpt = None
    probe = getattr(gpt, "apex_fused_wgrad_available", None)
    if probe is not None:
        return bool(probe()), True
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False, False
    return True, False


def _engine_facts(cfg, facts: Facts) -> None:
    """Run the engine's own check in its own python (it cannot be imported here: other torch)."""
    from spin_mcore.generation.external import engine_python

    backend = cfg.generation.backend
    try:
        python = str(engine_python(cfg.generation))
    except ConfigError as exc:
        facts.engine_error = str(exc)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])))
    if (CHECKOUT / "spin_mcore" / "generation" / "workers" / "engine_check.py").exists():
        rc, out, err = _run([python, "-m", "spin_mcore.generation.workers.engine_check", backend], env=env)
        lines = [line for line in out.splitlines() if line.strip().startswith("{")]
        try:
            facts.engine_result = json.loads(lines[-1])
        except (IndexError, ValueError):
            facts.engine_error = f"{python} -m spin_mcore.generation.workers.engine_check {backend} exited {rc}: " + \
                (err.strip().splitlines() or ["no output"])[-1]
    else:  # a checkout without the engine check: at least the engine must import
        module = ENGINE_MODULES[backend]
        rc, out, err = _run([python, "-c", f"import {module}; print({module}.__version__)"], env=env)
        facts.engine_result = {"backend": backend, "ok": rc == 0, "version": out.strip() or None,
                               "problems": [] if rc == 0 else [(err.strip().splitlines() or ["import failed"])[-1]]}
    if cfg.platform.device != "cpu":
        rc, out, _ = _run([python, "-c", "import torch; print(torch.version.cuda)"], env=env)
        facts.engine_torch_cuda = None if rc or out.strip() == "None" else out.strip()


def _cuda_facts(facts: Facts) -> None:
    import torch

    facts.cuda_available = torch.cuda.is_available()
    if not facts.cuda_available:
        return
    facts.device_count = torch.cuda.device_count()
    facts.capability = tuple(torch.cuda.get_device_capability(0))
    facts.torch_cuda = torch.version.cuda
    try:
        nccl = torch.cuda.nccl.version()
        facts.nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:
        facts.nccl = None
    rc, out, _ = _run(["nvidia-smi"], timeout=60)
    facts.driver_cuda = driver_cuda_from_smi(out) if rc == 0 else None
    if facts.driver_cuda is None and hasattr(torch._C, "_cuda_getDriverVersion"):
        v = torch._C._cuda_getDriverVersion()  # e.g. 12040
        facts.driver_cuda = f"{v // 1000}.{v % 1000 // 10}"
    facts.te_version, facts.te_error = _te_version()
    facts.te_spec = te_requirement()
    facts.apex_wgrad, facts.apex_fallback = _apex_facts()


def _dali_facts(cfg, facts: Facts) -> None:
    """Import DALI, name its wheel, and read two int32 records back through the trainer's reader."""
    import tempfile
    from importlib import metadata

    import numpy as np

    from spin_mcore.data.dali_loader import DaliRecordReader, dali_import_error

    facts.dali_error = dali_import_error()
    if facts.dali_error:
        return
    builds = [f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
              if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda")]
    facts.dali_build = ", ".join(sorted(builds)) or None
    if facts.cuda_available and cfg.platform.device != "cpu":
        facts.dali_device = 0  # the trainer passes each rank's own device; the node's first is enough here
    try:
        with tempfile.TemporaryDirectory(prefix="spin-doctor-dali-") as tmp:
            records = [np.arange(5, dtype=np.int32), np.arange(7, 10, dtype=np.int32)]
            files = []
            for i, rec in enumerate(records):
                files.append(str(Path(tmp) / f"r{i}.npy"))
                np.save(files[-1], rec)
            reader = DaliRecordReader(files, 1, 0, 1, device_id=facts.dali_device, num_threads=1, prefetch=1)
            got = [reader.next()[0][0] for _ in records]
            reader.close()
        if not all(np.array_equal(a, b) for a, b in zip(got, records)):
            facts.dali_read_error = f"read {[a.tolist() for a in got]}, wrote {[b.tolist() for b in records]}"
    except Exception as exc:  # a DALI that imports can still fail to build a pipeline (driver, CUDA libs)
        facts.dali_read_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def nearest_existing(path: str) -> Path:
    """``path`` or its nearest existing parent (run.dir may not exist before the first run)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def gather(cfg, environ: Mapping[str, str]) -> Facts:
    """This machine's facts for ``cfg`` (CUDA is only probed when platform.device is not cpu)."""
    facts = Facts(env=dict(environ))
    if cfg.platform.device != "cpu":
        _cuda_facts(facts)
    else:  # the CPU rule still refuses a visible GPU: a cheap look, without initialising CUDA
        import torch

        facts.cuda_available = torch.cuda.is_available()
    if cfg.generation.backend in ENGINE_MODULES:
        _engine_facts(cfg, facts)
    if (cfg.generation.backend == "trtllm" and cfg.generation.engine_launcher != "local"
            and environ.get("SLURM_JOB_ID")):
        rc, out, err = _run(["srun", "--mpi=list"], timeout=60)
        facts.mpi_list = None if rc == 127 else out + err
    where = nearest_existing(cfg.run.dir)
    facts.disk_path, facts.disk_free = str(where), shutil.disk_usage(where).free
    if cfg.data.loader != "torch":
        _dali_facts(cfg, facts)
    return facts


# ----------------------------------------------------------------------------- output


def format_table(checks: list[Check], host: str) -> str:
    """The table: one row per check, then the fix line of every FAIL and warn."""
    width = max(len(c.name) for c in checks)
    lines = [f"# spin-mcore doctor on {host}"]
    lines += [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    fixes = [c for c in checks if c.fix and c.status in (FAIL, WARN)]
    if fixes:
        lines.append("# to fix:")
        lines += [f"{c.status:<4}  {c.name}: {c.fix}" for c in fixes]
    failed = sum(c.status == FAIL for c in checks)
    lines.append(f"# {host}: {failed} FAIL, {sum(c.status == WARN for c in checks)} warn" +
                 (" -> not ready" if failed else " -> ready"))
    return "\n".join(lines)


def run(args) -> int:
    import socket
    import warnings

    from spin_mcore.config import load_config

    config, overrides = split_config_and_overrides(args)
    cfg = load_config(config, overrides)
    with warnings.catch_warnings():  # Megatron's import warns about missing GPU extras: a row says it better
        warnings.simplefilter("ignore")
        checks = run_checks(cfg, gather(cfg, os.environ))
    host = socket.gethostname()
    print(format_table(checks, host), flush=True)
    if args.json:
        print(json.dumps({"host": host, "ok": not any(c.status == FAIL for c in checks),
                          "checks": [asdict(c) for c in checks]}))
    sys.stdout.flush()
    return 1 if any(c.status == FAIL for c in checks) else 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check this node against what the config needs (CUDA, TE, apex, NCCL, engine, "
                       "SLURM, disk, DALI): a table of ok/warn/FAIL with fixes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="also print the checks as one JSON object (last line)")
    p.set_defaults(func=run)
