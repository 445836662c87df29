"""Platform layer: device, backend, layer spec and Megatron parallel state, chosen in one place."""

from spin_mcore.platform.distributed import ParallelState, destroy_distributed, init_distributed, on_gpu

__all__ = ["ParallelState", "init_distributed", "destroy_distributed", "on_gpu"]
