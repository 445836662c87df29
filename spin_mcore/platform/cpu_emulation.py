"""CUDA emulation for running Megatron-Core's real code paths on a CPU.

Megatron-Core 0.16 hard-codes CUDA in places that are otherwise device
agnostic: ``device="cuda"`` / ``torch.cuda.current_device()`` literals when
allocating buffers (DDP grad buffers, the distributed optimizer, the pipeline
schedules' send/recv tensors), CUDA streams and events, the CUDA RNG tracker,
and ``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizer
wrappers. None of that needs a GPU to be *correct*; it only names one.

This module meets those calls on the CPU:

* a ``TorchFunctionMode`` that rewrites CUDA device arguments to ``cpu``, makes
  ``Tensor.cuda()`` / ``pin_memory()`` / ``record_stream()`` no-ops and makes
  ``Tensor.type()`` report CUDA type names (``torch.cuda.FloatTensor``);
* stand-ins for ``torch.cuda.current_device``, ``synchronize``, the stream and
  event API, memory statistics and the CUDA RNG (backed by a private CPU
  ``torch.Generator`` so the tracker's fork/restore logic still works).

It is the only place in the project that does this. :func:`enable` refuses to
run when CUDA is available, so it can never mask a real GPU. It is global by
nature (it patches ``torch.cuda``); it is enabled once per process by
:mod:`spin_mcore.platform.distributed` and never disabled.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


def _map_device(value: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device``, int index) to cpu."""
    if _is_cuda_device(value) or (isinstance(value, int) and not isinstance(value, bool)):
        return torch.device("cpu")
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to the CPU for every torch call.

    This runs on every torch op of the process, so the common case (no kwargs to
    rewrite, not one of the few special methods) returns after two cheap checks.
    """

    _SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.record_stream,
                          torch.Tensor.type, torch.Tensor.to})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            if "device" in kwargs or kwargs.get("pin_memory"):
                kwargs = dict(kwargs)
                if "device" in kwargs:
                    kwargs["device"] = _map_device(kwargs["device"])
                if kwargs.get("pin_memory"):
                    kwargs["pin_memory"] = False
        else:
            kwargs = {}
        if func not in self._SPECIAL:
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            cpu_name = func(*args)
            return cpu_name if "cuda" in cpu_name else cpu_name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(_map_device(a) if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _FakeStream:
    """Stand-in for ``torch.cuda.Stream``: every operation is already ordered on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, event=None):
        return event if event is not None else _FakeEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeEvent:
    """Stand-in for ``torch.cuda.Event``; timings read as zero."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_FAKE_CUDA_GENERATOR = torch.Generator()
_DEFAULT_STREAM = _FakeStream()


def _noop():
    """A fresh no-op per patched name: torch._dynamo refuses one object under two rules."""
    return lambda *args, **kwargs: None


def _zero():
    return lambda *args, **kwargs: 0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    patches = {
        "current_device": lambda: 0,
        "set_device": _noop(),
        "synchronize": _noop(),
        "empty_cache": _noop(),
        "Stream": _FakeStream,
        "Event": _FakeEvent,
        "current_stream": lambda *a, **k: _DEFAULT_STREAM,
        "default_stream": lambda *a, **k: _DEFAULT_STREAM,
        "set_stream": _noop(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "memory_allocated": _zero(),
        "max_memory_allocated": _zero(),
        "memory_reserved": _zero(),
        "max_memory_reserved": _zero(),
        "reset_peak_memory_stats": _noop(),
        "memory_stats": lambda *a, **k: {},
        "get_rng_state": lambda *a, **k: _FAKE_CUDA_GENERATOR.get_state(),
        "set_rng_state": lambda state, *a, **k: _FAKE_CUDA_GENERATOR.set_state(state),
        "manual_seed": lambda seed: _FAKE_CUDA_GENERATOR.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: _FAKE_CUDA_GENERATOR.manual_seed(int(seed)),
        "default_generators": (_FAKE_CUDA_GENERATOR,),
    }
    for attr, value in patches.items():
        setattr(cuda, attr, value)
    cuda.random.get_rng_state = patches["get_rng_state"]
    cuda.random.set_rng_state = patches["set_rng_state"]
    cuda.nvtx.range_push = _zero()
    cuda.nvtx.range_pop = _zero()
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_rng() -> None:
    """Megatron's RNG helpers defer through ``torch.cuda._lazy_call``, which never runs without CUDA."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron is optional for pure-kernel use
        return
    mrandom._lazy_call = lambda cb: cb()
    mrandom.device_ctx_manager = lambda *a, **k: contextlib.nullcontext()


def enable() -> None:
    """Turn the emulation on for the rest of the process (idempotent).

    Raises:
        RuntimeError: if CUDA is available; the emulation must never hide a GPU.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("spin_mcore CPU emulation must not be enabled on a machine with CUDA")
    _patch_torch_cuda()
    _patch_megatron_rng()
    _MODE = _CudaToCpuMode()
    # Entered for the life of the process: Megatron allocates "cuda" tensors from
    # deep inside its schedules, optimizer and checkpoint loader.
    _MODE.__enter__()
    _ENABLED = True
