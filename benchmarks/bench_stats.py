"""Shared by the throughput benchmarks: alternating runs, median and spread, machine facts, the matmul ceiling.

    alternate(sides, repeats)      runs A B A B ... and returns every side's list of results
    summarize(values)              median, min, max, spread = (max - min) / median
    compare(a, b)                  ratio of medians, its range, and whether the two sides' ranges overlap
    machine_info()                 CPU model and flags, threads, torch's CPU capability, load average
    matmul_flops(m, k, n)          measured fp32 GEMM FLOP/s at one shape (the step's ceiling)
    llama_forward_flops(...)       model FLOPs of one forward over sequences of given lengths, attention included

A single run on a shared 2-core machine swings by 30% (issue 22): alternating the sides spreads
the machine's other load over all of them, and a ratio whose ranges overlap is not called a win.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def alternate(sides: dict[str, Callable[[], dict]], repeats: int, on_result: Callable | None = None) -> dict[str, list]:
    """Run each side ``repeats`` times, interleaved (A B A B ...), so slow phases of the machine hit every side.

    sides: name -> zero-argument callable returning that run's result dict. Returns name -> [results], in run order.
    """
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(repeats):
        for name, fn in sides.items():
            res = fn()
            out[name].append(res)
            if on_result is not None:
                on_result(name, r, res)
    return out


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max and spread = (max - min) / median of float ``values`` (n >= 1)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / med if med else 0.0, "n": len(values),
            "values": list(values)}


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """Ratio a/b of medians (higher = a larger) with its range [min a / max b, max a / min b].

    ``overlap`` is True when the two sides' [min, max] ranges intersect: the runs cannot tell the sides
    apart, and ``verdict`` says so instead of naming a winner.
    """
    sa, sb = summarize(a), summarize(b)
    overlap = sa["min"] <= sb["max"] and sb["min"] <= sa["max"]
    ratio = sa["median"] / sb["median"]
    if overlap:
        verdict = "overlap"
    else:
        verdict = "higher" if ratio > 1 else "lower"
    return {"ratio": ratio, "ratio_min": sa["min"] / sb["max"], "ratio_max": sa["max"] / sb["min"],
            "overlap": overlap, "verdict": verdict}


def fmt_ratio(c: dict) -> str:
    """'1.23x [1.10-1.31]' plus ' (ranges overlap)' when they do."""
    s = f"{c['ratio']:.2f}x [{c['ratio_min']:.2f}-{c['ratio_max']:.2f}]"
    return s + (" (ranges overlap)" if c["overlap"] else "")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    return model, flags


def machine_info(threads: int) -> dict:
    """CPU model, the SIMD flags that pick kernels, ``threads``, torch's ATen capability, MKL, load average now."""
    import torch

    model, flags = _cpuinfo()
    return {"cpu_model": model, "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
            "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
            "loadavg_before": list(os.getloadavg())}


def finish_machine_info(info: dict) -> dict:
    """Adds the load average after the runs to a :func:`machine_info` dict (returned)."""
    info["loadavg_after"] = list(os.getloadavg())
    return info


def matmul_flops(m: int, k: int, n: int, threads: int, seconds: float = 1.0) -> dict:
    """Measured fp32 FLOP/s of ``[m, k] @ [k, n]`` with ``threads`` torch threads: best and median of ~``seconds``.

    The best repeat is the ceiling (what the machine gives when nothing else runs); the median is reported too.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up: MKL picks its kernel and touches the pages
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    flops = 2.0 * m * k * n
    return {"shape": [m, k, n], "flops_per_s_best": flops / min(times), "flops_per_s_median": flops / statistics.median(times),
            "repeats": len(times)}


def llama_forward_flops(lengths: Sequence[int], hidden: int, ffn: int, layers: int, heads: int, groups: int,
                        vocab: int) -> float:
    """Model FLOPs (2 per multiply-add) of one forward over sequences of the given (real, unpadded) ``lengths``.

    Per token and layer: Q and O projections 2*2*h*h, K and V 2*2*h*(h*groups/heads), SwiGLU 3*2*h*ffn; the output
    layer 2*h*vocab. Causal attention: the token at position i (1-based) scores i keys and mixes i values,
    2*2*h*i. Padding is not model work; a training step (forward + backward) is 3x this.
    """
    kv = hidden * groups // heads
    per_token = layers * (2 * 2 * hidden * hidden + 2 * 2 * hidden * kv + 3 * 2 * hidden * ffn) + 2 * hidden * vocab
    total = 0.0
    for n in lengths:
        total += n * per_token + layers * 4 * hidden * n * (n + 1) / 2
    return total


def length_stats(lengths: Sequence[int]) -> dict:
    """mean, p50, p90, max of integer ``lengths``."""
    s = sorted(lengths)

    def pct(q: float) -> int:
        return s[min(len(s) - 1, int(q * len(s)))]
    return {"mean": round(sum(s) / len(s), 1), "p50": pct(0.5), "p90": pct(0.9), "max": s[-1]}
