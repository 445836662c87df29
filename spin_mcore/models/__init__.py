"""Llama/Mistral-family policies on Megatron-Core, and HF conversion."""
