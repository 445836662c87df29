"""spin_mcore: self-play fine-tuning (SPIN) on Megatron-Core."""

__version__ = "0.1.0"
