"""Platform checks on CUDA: ``platform.device=cuda`` selects the GPU, NCCL at world size 1, Megatron's parallel state.

All three go through :func:`spin_mcore.platform.init_distributed`, the one entry point every command
uses; the first check to call it keeps the state (or the error) in the worker's context for the others.
"""

from __future__ import annotations

import time

from spin_mcore.acceptance.runner import Outcome, require_cuda


def init_cuda_platform(ctx):
    """:func:`init_distributed` with ``platform.device=cuda``, once per worker: (pstate, seconds)."""
    if "platform" not in ctx.state:
        from spin_mcore.config import ParallelConfig, PlatformConfig
        from spin_mcore.platform import init_distributed

        t0 = time.perf_counter()
        try:
            pstate = init_distributed(ParallelConfig(), seed=1234, platform=PlatformConfig(device="cuda"))
            ctx.state["platform"] = (pstate, time.perf_counter() - t0, None)
        except Exception as exc:  # noqa: BLE001 - re-raised to every check that needs it
            ctx.state["platform"] = (None, time.perf_counter() - t0, exc)
    pstate, seconds, error = ctx.state["platform"]
    if error is not None:
        raise RuntimeError(f"init_distributed(platform.device=cuda) failed: {type(error).__name__}: {error}")
    return pstate, seconds


def check_device(ctx) -> Outcome:
    require_cuda()
    import torch

    from spin_mcore.platform.distributed import select_device

    chosen = select_device("cuda")
    pstate, seconds = init_cuda_platform(ctx)
    props = torch.cuda.get_device_properties(pstate.device)
    cap = torch.cuda.get_device_capability(pstate.device)
    x = torch.ones(1024, device=pstate.device)
    on_card = bool((x * 2).sum().item() == 2048.0)
    figures = {"selected": chosen, "device": str(pstate.device), "name": props.name, "capability": f"{cap[0]}.{cap[1]}",
               "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
               "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device_count": torch.cuda.device_count(),
               "init_s": seconds}
    ok = chosen == "cuda" and pstate.device.type == "cuda" and pstate.device.index == torch.cuda.current_device() \
        and on_card
    return Outcome(ok, f"{pstate.device} = {props.name} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, "
                       f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__} CUDA {torch.version.cuda}, "
                       f"init {seconds:.1f} s", figures)


def check_nccl(ctx) -> Outcome:
    require_cuda()
    import torch
    import torch.distributed as dist

    pstate, _ = init_cuda_platform(ctx)
    backend = dist.get_backend()
    t = torch.arange(8, dtype=torch.float32, device=pstate.device)
    dist.all_reduce(t)
    dist.broadcast(t, src=0)
    gathered = torch.empty(8 * dist.get_world_size(), device=pstate.device)
    dist.all_gather_into_tensor(gathered, t)
    dist.barrier()
    torch.cuda.synchronize()
    values_ok = torch.equal(t.cpu(), torch.arange(8, dtype=torch.float32)) and torch.equal(gathered.cpu(), t.cpu())
    version = torch.cuda.nccl.version()
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    figures = {"backend": backend, "world_size": dist.get_world_size(), "rank": dist.get_rank(), "nccl": nccl}
    ok = backend == "nccl" and dist.get_world_size() == 1 and values_ok
    return Outcome(ok, f"backend {backend} (NCCL {nccl}), world size {dist.get_world_size()}: all_reduce, broadcast, "
                       f"all_gather {'correct' if values_ok else 'WRONG'}", figures)


def check_megatron(ctx) -> Outcome:
    require_cuda()
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel

    import megatron.core

    pstate, _ = init_cuda_platform(ctx)
    sizes = {"tp": mps.get_tensor_model_parallel_world_size(), "pp": mps.get_pipeline_model_parallel_world_size(),
             "cp": mps.get_context_parallel_world_size(), "dp": mps.get_data_parallel_world_size()}
    groups = {"tp_group": mps.get_tensor_model_parallel_group(), "dp_group": mps.get_data_parallel_group(),
              "pp_group": mps.get_pipeline_model_parallel_group()}
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = list(tracker.get_states()) if hasattr(tracker, "get_states") else []
    figures = {**sizes, "megatron_core": getattr(megatron.core, "__version__", None),
               "initialized": mps.model_parallel_is_initialized(), "rng_states": ",".join(map(str, states)),
               "pstate_matches": (pstate.tp, pstate.pp, pstate.dp) == (sizes["tp"], sizes["pp"], sizes["dp"])}
    ok = (figures["initialized"] and all(v == 1 for v in sizes.values()) and all(g is not None for g in groups.values())
          and bool(states) and figures["pstate_matches"])
    return Outcome(ok, f"megatron-core {figures['megatron_core']}: TP {sizes['tp']} PP {sizes['pp']} CP {sizes['cp']} "
                       f"DP {sizes['dp']}, groups built, CUDA RNG tracker states: {figures['rng_states'] or 'none'}",
                   figures)
