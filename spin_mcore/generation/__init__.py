"""Opponent generation: y' ~ p_theta_t(. | x) for every prompt (in-process Megatron engine, TensorRT-LLM or vLLM).

The names below load on first use, so ``spin_mcore.generation.workers`` imports in an engine's
environment without pulling in the in-process engine (torch) first.
"""

_LAZY = {"GenerationStats": "engine", "generate_tokens": "engine", "generate_with_stats": "engine",
         "SamplingParams": "sampling"}

__all__ = ["SamplingParams", "GenerationStats", "generate_tokens", "generate_with_stats"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"spin_mcore.generation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'spin_mcore.generation' has no attribute {name!r}")
