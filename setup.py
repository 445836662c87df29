"""Packaging for spin_mcore.

* ``spin_mcore``      the package (config, platform, models, data, generation, training, loop, CLI)
* ``spin_kernels``    the Triton kernels, from the top-level ``kernels/`` folder. The PyPI
                      package ``kernels`` is unrelated, so ours installs under another name.
* ``spin_mcore._packing``  the C++ (pybind11) data-path extension built from ``csrc/``.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "spin_mcore._packing",
        sources=["csrc/packing.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="spin_mcore",
    version="0.1.0",
    description="Self-play fine-tuning (SPIN) and its siblings on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["spin_mcore", "spin_mcore.*"]) + ["spin_kernels"],
    package_dir={"spin_kernels": "kernels"},
    package_data={"spin_mcore": ["configs/*.yaml", "demo_data/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
        # GPU users install their CUDA build of torch first; pip then keeps it.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # needed by megatron dist_checkpointing
        "triton>=3.0",
        "numpy",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "tqdm",
        "jinja2",  # chat-template rendering in data/tokenizer.py
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        # Only usable on CUDA machines. NVIDIA apex and DALI come from NVIDIA's own
        # channels (see README); the PyPI names "apex"/"nvidia-dali" are not NVIDIA's.
        # The generation engines are not extras: vLLM and TensorRT-LLM pin their own torch and
        # transformers, so each gets its own environment (launch/setup_vllm.sh,
        # launch/setup_trtllm.sh) and runs as a worker. There is no combined [gpu] extra.
        # The range megatron-core 0.16.1 asks for (its metadata); TE builds against the installed
        # torch, so install it with --no-build-isolation (launch/setup_gpu.sh does).
        "te": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
        "test": ["pytest", "transformers", "trl", "accelerate", "datasets"],
        "eval": ["lm-eval"],
    },
    entry_points={"console_scripts": ["spin-mcore=spin_mcore.cli:main"]},
)
