"""Opponent generation: y' ~ p_theta_t(. | x) for every prompt (in-process Megatron engine, TensorRT-LLM or vLLM)."""

from spin_mcore.generation.engine import GenerationStats, generate_tokens, generate_with_stats
from spin_mcore.generation.sampling import SamplingParams

__all__ = ["SamplingParams", "GenerationStats", "generate_tokens", "generate_with_stats"]
