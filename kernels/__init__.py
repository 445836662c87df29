"""Triton kernels of spin_mcore, installed as ``spin_kernels`` (the PyPI ``kernels`` is unrelated)."""
