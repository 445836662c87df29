"""Benchmark of sequence_logprobs (chunked CPU path) against naive log_softmax+gather and Megatron.

    python benchmarks/sequence_logprobs.py [--quick]

Each method computes masked per-sequence log p(label) from [B, S, V] fp32 logits and
backpropagates a non-unit upstream gradient into the logits (forward + backward).

Peak extra memory is measured, not estimated: the torch profiler records every CPU
allocator allocation/free ("[memory]" events, signed bytes, timestamped) during one
forward+backward; the peak of their running sum is the most bytes the method held at
once beyond what existed before. From it we subtract the logits' gradient buffer when
the method allocates one, since every method must hand autograd a [B, S, V] gradient;
what remains is the method's working memory, reported as a multiple of the logits size.
Megatron's vocab_parallel_cross_entropy works in place on fp32 logits (it overwrites
them with its softmax and returns that buffer as the gradient), so its figure is that
of an in-place method; ours is reported both out of place (default, logits preserved)
and with inplace_grad. Because the benchmark's logits are an autograd leaf, autograd
clones an aliasing gradient into .grad, so in-place saves nothing here; inside a model
(logits produced by the output layer) it saves one [B, S, V] buffer.

The H100 figures are a bytes-moved model (HBM traffic / 3.35 TB/s) at 8 x 2048 x 128256
bf16, with each elementwise pass counted once per read and write (see BYTES_PER_ELEMENT).

The last printed line is JSON with the headline figures and ratios from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from spin_mcore.acceptance.measure import H100_HBM_BYTES_PER_S as HBM_BYTES_PER_S
from spin_mcore.acceptance.measure import logprob_methods, peak_extra_bytes, triton_kernel_bandwidth

MODEL_SHAPE = (8, 2048, 128256)  # Llama-3 vocab, 16k tokens, bf16 logits

# HBM bytes per logit element for bf16 logits, forward + backward (element = one of B*S*V).
BYTES_PER_ELEMENT = {
    # fwd: read x (2). bwd: read x (2), write grad (2).
    "ours": {"fwd": 2, "bwd": 4},
    # fwd: upcast read 2 + write 4; log_softmax read 4 + write 4 (saved for backward).
    # bwd: gather's zero-filled grad write 4; log_softmax bwd read 4 + 4, write 4; downcast read 4 + write 2.
    "naive": {"fwd": 14, "bwd": 22},
    # fwd: upcast 2 + 4; max read 4; x -= max read/write 8; exp in place 8; sum read 4; /= sum 8.
    # bwd: grad *= g in place 8; autograd's downcast to the input dtype read 4 + write 2.
    "megatron": {"fwd": 38, "bwd": 14},
}


def make_inputs(B: int, S: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, : S // 4] = False  # the prompt quarter of each row is not scored
    w = torch.randn(B, generator=g)  # non-unit upstream gradient, as from a DPO/SPIN loss
    return logits, labels, mask, w


def run_method(fn, logits, repeats: int):
    """(median seconds, peak extra bytes, grad) for one method; fresh logits copy each run."""
    times = []
    for _ in range(repeats):
        x = logits.clone().requires_grad_()
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        del x
    x = logits.clone().requires_grad_()
    peak = peak_extra_bytes(lambda: fn(x))
    # x is a leaf, so autograd always stores a fresh [B, S, V] .grad (it clones a gradient
    # that aliases the logits): that one buffer is the output every method owes, not working memory.
    grad = x.grad
    extra = peak - grad.numel() * grad.element_size()
    return statistics.median(times), extra, grad, not torch.equal(x.detach(), logits)


def h100_model() -> dict:
    n = MODEL_SHAPE[0] * MODEL_SHAPE[1] * MODEL_SHAPE[2]
    out = {}
    for name, per in BYTES_PER_ELEMENT.items():
        fwd_ms = n * per["fwd"] / HBM_BYTES_PER_S * 1e3
        bwd_ms = n * per["bwd"] / HBM_BYTES_PER_S * 1e3
        out[name] = {"fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_ms + bwd_ms, 3),
                     "gbytes": round(n * (per["fwd"] + per["bwd"]) / 1e9, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B=2, S=256, V=8000, one timed repeat")
    args = ap.parse_args(argv)
    B, S, V = (2, 256, 8000) if args.quick else (8, 512, 32000)
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # Megatron's cross entropy reads the TP group from parallel_state: a 1-process gloo world.
    from spin_mcore.config import ParallelConfig
    from spin_mcore.platform import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tp=1), seed=0)
    try:
        logits, labels, mask, w = make_inputs(B, S, V)
        logits_bytes = logits.numel() * logits.element_size()
        fns = logprob_methods(labels, mask, w)
        results, grads = {}, {}
        for name, fn in fns.items():
            secs, extra, grad, overwrote = run_method(fn, logits, repeats)
            grads[name] = grad
            results[name] = {"fwd_bwd_s": round(secs, 4), "extra_peak_mb": round(extra / 2**20, 1),
                             "extra_peak_x_logits": round(extra / logits_bytes, 3),
                             "overwrites_logits": overwrote}
            print(f"{name:13s} fwd+bwd {secs * 1e3:9.1f} ms   extra peak {extra / 2**20:8.1f} MiB "
                  f"= {extra / logits_bytes:5.2f} x logits   overwrites logits: {overwrote}", flush=True)
        for name in ("megatron", "ours", "ours_inplace"):
            err = (grads[name] - grads["naive"]).abs().max().item()
            results[name]["max_grad_diff_vs_naive"] = float(f"{err:.3g}")
    finally:
        destroy_distributed()

    measured_gpu = None
    if torch.cuda.is_available():
        measured_gpu = triton_kernel_bandwidth(MODEL_SHAPE, peak_bytes_per_s=HBM_BYTES_PER_S)
        print(f"MEASURED Triton kernels on {measured_gpu['device']} at {MODEL_SHAPE} bf16: fwd "
              f"{measured_gpu['fwd_ms']} ms ({measured_gpu['fwd_gb_per_s']} GB/s), bwd in place "
              f"{measured_gpu['bwd_ms']} ms ({measured_gpu['bwd_gb_per_s']} GB/s), peak assumed "
              f"{HBM_BYTES_PER_S / 1e9:.0f} GB/s")
    else:
        print("no CUDA device: the Triton kernels were not timed (the figures above are the CPU chunked path)")
    model = h100_model()
    print(f"MODEL, not measured: H100 bytes moved at {MODEL_SHAPE} bf16 / 3.35 TB/s:")
    for name, m in model.items():
        print(f"  {name:9s} {m['gbytes']:7.2f} GB  fwd {m['fwd_ms']:7.3f} ms  fwd+bwd {m['fwd_bwd_ms']:7.3f} ms")
    ours, naive, meg = results["ours"], results["naive"], results["megatron"]
    headline = {
        "shape": [B, S, V], "dtype": "float32", "logits_mb": round(logits_bytes / 2**20, 1),
        "cpu": results,
        "ratios": {
            "time_naive_over_ours": round(naive["fwd_bwd_s"] / ours["fwd_bwd_s"], 2),
            "time_megatron_over_ours": round(meg["fwd_bwd_s"] / ours["fwd_bwd_s"], 2),
            "mem_naive_over_ours": round(naive["extra_peak_x_logits"] / max(ours["extra_peak_x_logits"], 1e-9), 1),
        },
        "targets": {"ours_extra_le_0.25x": ours["extra_peak_x_logits"] <= 0.25,
                    "naive_extra_ge_2x": naive["extra_peak_x_logits"] >= 2.0},
        "h100_model": model,  # a bytes-moved model, not a measurement
        "h100_model_is_measured": False,
        "gpu_measured": measured_gpu,
    }
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
