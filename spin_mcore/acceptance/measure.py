"""Measuring the log-prob paths: timers, allocator peaks, and the methods compared side by side.

Shared by ``benchmarks/sequence_logprobs.py``, ``benchmarks/fused_linear_logprobs.py`` (which import
from here) and the acceptance checks (:mod:`spin_mcore.acceptance.checks_logprobs`).

* CPU memory: the torch profiler's allocator events (:func:`peak_extra_bytes`).
* CUDA memory: ``torch.cuda.max_memory_allocated`` above what was allocated before (:func:`cuda_peak_extra_bytes`).
* CUDA time: CUDA events around each call, warm-up first, the median of the repeats (:func:`cuda_seconds`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

H200_HBM_BYTES_PER_S = 4.8e12  # H200 SXM HBM3e, the vendor's datasheet
H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


# ----------------------------------------------------------------------------- timers and allocator peaks


def peak_extra_bytes(fn) -> int:
    """Peak of live CPU-allocator bytes allocated while ``fn()`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_extra_bytes(fn: Callable):
    """(peak bytes the CUDA caching allocator handed out above its level before ``fn()``, fn's result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def cuda_seconds(fn: Callable, repeats: int = 10, warmup: int = 1, setup: Callable | None = None) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, timed with CUDA events.

    ``warmup`` untimed calls first (Triton compilation, cuBLAS heuristics, allocator growth).
    ``setup()``, when given, runs before every call outside the timed region (fresh leaves, cleared grads).
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def poison_cuda_allocator(nbytes: int, device="cuda") -> None:
    """Leave a NaN-filled block of ``nbytes`` in the caching allocator, so that an output the next
    allocation of that size reuses shows NaN wherever a kernel failed to write it."""
    block = torch.full((max(1, nbytes // 2),), float("nan"), dtype=torch.bfloat16, device=device)
    del block


def copy_bytes_per_s(nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy rate (bytes read + written per second) of a ``nbytes`` bf16 buffer: the
    achievable ceiling of a memory-bound kernel on this card (METHOD.md's first number)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_seconds(lambda: dst.copy_(src), repeats=repeats)
    return 2 * src.numel() * 2 / seconds


# ----------------------------------------------------------------------------- sequence log-probs, side by side


def logprob_methods(labels, mask, w) -> dict:
    """name -> fn(logits_leaf) running forward + backward of masked sequence log-probs, upstream grad ``w`` [B].

    naive: log_softmax + gather (fp32); megatron: Megatron's ``vocab_parallel_cross_entropy`` (needs its
    parallel state); ours / ours_inplace: :func:`spin_mcore.logprobs.sequence_logprobs` with the default
    backend of the logits' device (Triton on CUDA, chunked on CPU).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from spin_mcore.logprobs import sequence_logprobs
    from spin_mcore.logprobs.reference import reference_sequence_logprobs

    def naive(x):
        seq, _ = reference_sequence_logprobs(x, labels, mask)
        (seq * w).sum().backward()

    def megatron(x):
        safe = torch.where(mask, labels, 0)
        loss = vocab_parallel_cross_entropy(x, safe)  # [B, S] = -log p
        (-(loss * mask).sum(1) * w).sum().backward()

    def ours(x):
        out = sequence_logprobs(x, labels, mask)
        (out.seq_logps * w).sum().backward()

    def ours_inplace(x):
        out = sequence_logprobs(x, labels, mask, inplace_grad=True)
        (out.seq_logps * w).sum().backward()

    return {"naive": naive, "megatron": megatron, "ours": ours, "ours_inplace": ours_inplace}


def triton_kernel_bandwidth(shape, repeats: int = 10, peak_bytes_per_s: float = H200_HBM_BYTES_PER_S) -> dict:
    """MEASURED on the CUDA device: the Triton kernels alone (bf16 logits [B, S, V], every token kept),
    median of ``repeats`` CUDA-event timings, and the achieved HBM bytes/s (forward reads the logits once,
    backward reads them and writes the gradient in place) against ``peak_bytes_per_s``."""
    from spin_kernels import fused_logprob as k

    B, S, V = shape
    x = torch.randn(B, S, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B * S,), device="cuda")
    keep = torch.ones(B * S, dtype=torch.uint8, device="cuda")
    g = torch.ones(B * S, device="cuda")
    m, s_, _ = k.logprob_forward_partials(x, labels, keep, 0, V)
    lse = m + torch.log(s_)
    fwd_s = cuda_seconds(lambda: k.logprob_forward_partials(x, labels, keep, 0, V), repeats=repeats)
    bwd_s = cuda_seconds(lambda: k.logprob_backward(x, labels, keep, lse, g, 0, V, inplace=True), repeats=repeats)
    n = x.numel() * x.element_size()
    return {"device": torch.cuda.get_device_name(), "shape": [B, S, V], "dtype": "bfloat16",
            "fwd_ms": round(fwd_s * 1e3, 3), "bwd_ms": round(bwd_s * 1e3, 3),
            "fwd_gb_per_s": round(n / fwd_s / 1e9, 1), "bwd_gb_per_s": round(2 * n / bwd_s / 1e9, 1),
            "fwd_bwd_gb_per_s": round(3 * n / (fwd_s + bwd_s) / 1e9, 1),
            "peak_gb_per_s_assumed": peak_bytes_per_s / 1e9}


# ----------------------------------------------------------------------------- fused linear log-probs against materialised logits


def fused_linear_inputs(tokens: int, hidden: int, vocab: int, dtype, device, seed: int = 0):
    """hidden [s, b, h], weight [V, h], labels [b, s], mask [b, s] (all ones), upstream grad [b]."""
    b = 4
    s = tokens // b
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(s, b, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (b, s), generator=g).to(device)
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    up = torch.randn(b, generator=g).to(device)
    return h, w, labels, mask, up


def fused_linear_sides(labels, mask, up, chunk: int) -> dict:
    """name -> fn(h_leaf, w_leaf) running forward + backward; returns seq_logps (detached).

    materialised: logits = h @ W^T as Megatron's output layer makes them, then ``sequence_logprobs``
    with ``inplace_grad``; fused: ``fused_linear_sequence_logprobs`` in chunks of ``chunk`` tokens.
    """
    from spin_mcore.logprobs import sequence_logprobs
    from spin_mcore.logprobs.fused_linear import fused_linear_sequence_logprobs

    def materialised(h, w):
        logits = h @ w.t()  # [s, b, V]: Megatron's output layer
        out = sequence_logprobs(logits.transpose(0, 1), labels, mask, inplace_grad=True)
        (out.seq_logps * up).sum().backward()
        return out.seq_logps.detach()

    def fused(h, w):
        out = fused_linear_sequence_logprobs(h, w, labels, mask, chunk_tokens=chunk)
        (out.seq_logps * up).sum().backward()
        return out.seq_logps.detach()

    return {"materialised": materialised, "fused": fused}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sides(fns: dict, h, w, repeats: int, device) -> dict:
    """name -> (median wall seconds, median process CPU seconds) of fwd+bwd; the sides alternate run by
    run (after one warm-up run each), so a change in machine load hits both alike."""
    times: dict = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(a, b)
            _sync(device)
            if r:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            del a, b
    return {name: (statistics.median(x for x, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def measure_memory(fn, h, w, device) -> dict:
    """Peak extra bytes of one fwd+bwd (minus the owed gradients), and its results."""
    owed = h.numel() * h.element_size() + w.numel() * w.element_size()  # d hidden + d W
    a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
    if device.type == "cuda":
        peak, seq = cuda_peak_extra_bytes(lambda: fn(a, b))
    else:
        box = {}
        peak = peak_extra_bytes(lambda: box.setdefault("seq", fn(a, b)))
        seq = box["seq"]
    return {"extra_bytes": peak - owed, "seq": seq, "dh": a.grad, "dw": b.grad}


def fused_linear_vs_materialised(vocab: int, tokens: int, hidden: int, chunk, repeats: int, device, dtype) -> dict:
    """Both sides at one vocab size: extra memory (x the logits), fwd+bwd time, and how far their results differ.

    ``chunk``: fused chunk tokens (None = tokens / 16). ``rel_diff`` is ||fused - materialised|| / ||materialised||
    of the sequence log-probs and both gradients; ``max_abs_diff`` the largest elementwise difference.
    """
    h, w, labels, mask, up = fused_linear_inputs(tokens, hidden, vocab, dtype, device)
    chunk = chunk or max(1, tokens // 16)
    fns = fused_linear_sides(labels, mask, up, chunk)
    res = {name: measure_memory(fn, h, w, device) for name, fn in fns.items()}
    for name, (wall, cpu) in time_sides(fns, h, w, repeats, device).items():
        res[name]["fwd_bwd_s"], res[name]["cpu_s"] = wall, cpu
    logits_bytes = tokens * vocab * h.element_size()
    mat, fus = res["materialised"], res["fused"]
    out = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk_tokens": chunk,
           "dtype": str(dtype).replace("torch.", ""), "logits_mb": round(logits_bytes / 2**20, 1)}
    for name, r in res.items():
        out[name] = {"fwd_bwd_s": round(r["fwd_bwd_s"], 4), "cpu_s": round(r["cpu_s"], 4),
                     "extra_mb": round(r["extra_bytes"] / 2**20, 1),
                     "extra_x_logits": round(r["extra_bytes"] / logits_bytes, 4)}
    out["time_fused_over_materialised"] = round(fus["fwd_bwd_s"] / mat["fwd_bwd_s"], 3)
    out["cpu_time_fused_over_materialised"] = round(fus["cpu_s"] / mat["cpu_s"], 3)
    out["max_abs_diff"] = {k: float((fus[k].float() - mat[k].float()).abs().max()) for k in ("seq", "dh", "dw")}
    out["rel_diff"] = {k: float(f"{_rel(fus[k], mat[k]):.3g}") for k in ("seq", "dh", "dw")}
    out["targets"] = {"extra_le_0.1x_logits": out["fused"]["extra_x_logits"] <= 0.1,
                      "time_le_1.2x": out["time_fused_over_materialised"] <= 1.2}
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64 (0 when both are zero)."""
    ref64 = ref.double()
    denom = float(ref64.norm())
    diff = float((a.double() - ref64).norm())
    return diff / denom if denom else diff
