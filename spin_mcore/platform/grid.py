"""The TP x PP x CP x DP grid of a world of ranks, without any process group: a leaf module.

Both the rendezvous (:mod:`spin_mcore.platform.distributed`) and the SLURM dry run
(:func:`spin_mcore.platform.slurm.plan_ranks`) need each rank's place; keeping it here lets
``slurm`` stay a parser that ``distributed`` uses, never the reverse.
"""

from __future__ import annotations

from spin_mcore.config import ConfigError, ParallelConfig


def check_world_size(world_size: int, parallel: ParallelConfig) -> None:
    """Raise ConfigError when ``world_size`` ranks cannot be split into TP x PP x CP x DP."""
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
            f"{parallel.tp}*{parallel.pp}*{parallel.cp} = {model_parallel}"
        )


def _megatron_order() -> str:
    """The rank order ``initialize_model_parallel`` uses by default (``"tp-cp-ep-dp-pp"`` in 0.16)."""
    import inspect

    from megatron.core import parallel_state as mps

    return inspect.signature(mps.initialize_model_parallel).parameters["order"].default


def parallel_grid(world_size: int, parallel: ParallelConfig) -> list[dict]:
    """Each global rank's ``tp_rank``, ``pp_rank``, ``cp_rank``, ``dp_rank``, without any process group.

    Uses Megatron's own ``RankGenerator`` with the order ``initialize_model_parallel``
    uses, so it is what :func:`init_distributed` will report on that rank (TP varies
    fastest, then CP, then DP, then PP). ``dp_rank`` is the rank in the data-parallel
    group without CP, like ``get_data_parallel_rank()``.
    """
    from megatron.core.parallel_state import RankGenerator

    check_world_size(world_size, parallel)
    dp = world_size // (parallel.tp * parallel.pp * parallel.cp)
    gen = RankGenerator(tp=parallel.tp, ep=1, dp=dp, pp=parallel.pp, cp=parallel.cp, order=_megatron_order())
    grid: list[dict] = [{} for _ in range(world_size)]
    for name in ("tp", "pp", "cp", "dp"):
        for group in gen.get_ranks(name):
            for index, rank in enumerate(sorted(group)):  # torch numbers a group's ranks in ascending order
                grid[rank][f"{name}_rank"] = index
    return grid
