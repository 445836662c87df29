"""Benchmark of the fused linear log-prob op against the materialised output layer, forward + backward.

    python benchmarks/fused_linear_logprobs.py [--quick] [--vocab 32768 131072] [--hidden 1024]
                                               [--tokens 2048] [--chunk N] [--repeats 3]

Both sides compute masked per-sequence log p(label) from final hidden states [s, b, h] and a
vocab-parallel output weight [V, h] (TP=1), and backpropagate a non-unit per-sequence upstream
gradient into both (what a SPIN/DPO loss does):

* materialised (the baseline, what ``training/step.py`` does without ``train.fused_linear_logprobs``):
  logits = hidden @ W^T as Megatron's output layer makes them ([s, b, V], the weight's dtype), then
  ``sequence_logprobs`` on their [b, s, V] view with ``inplace_grad`` (the gradient overwrites the
  logits; no second [tokens, V] buffer);
* fused: ``fused_linear_sequence_logprobs`` with ``--chunk`` tokens per chunk (default tokens / 16:
  chunk x V is 1/16 of the logits, and a chunk's GEMM still has enough rows to run at full speed).

Memory is measured, not estimated. CPU: the torch profiler records every CPU-allocator
allocation and free during one forward+backward (the same counter as
``benchmarks/sequence_logprobs.py``; tracemalloc does not see torch's allocator and RSS mixes in
glibc's caching); the peak of their running sum is the most bytes held at once beyond the inputs.
CUDA: ``max_memory_allocated`` minus what was allocated before. From both we subtract the two
gradients every method owes autograd (d hidden [s, b, h] and d W [V, h]); what remains is the
extra memory, reported as a multiple of the full logits tensor [tokens, V] in the compute dtype.
Time is the median of ``--repeats`` unprofiled runs, wall clock and process CPU time (fresh leaves
each run; the two sides alternate, after a warm-up run each, so load from other processes hits both
alike). On a shared, oversubscribed machine many small multi-threaded ops pay for every wait on a
descheduled thread, which wall time charges to the side with more ops (the fused one); run with
``--threads 1`` and read the CPU time there. Every token is scored (no prompt mask), so the fused
side gets no credit for skipping masked rows.

Targets (issue 13): fused extra memory <= 0.1 x the logits, fused time <= 1.2 x materialised.
The GEMM count is 4 against 3 (backward recomputes each chunk's logits), so where the matmuls
dominate the time the expected ratio is about 4/3. The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from spin_mcore.acceptance.measure import fused_linear_vs_materialised


def run_vocab(vocab: int, args, device, dtype) -> dict:
    return fused_linear_vs_materialised(vocab, args.tokens, args.hidden, args.chunk, args.repeats, device, dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (V 8k and 32k, hidden 256, 1024 tokens) for a smoke run")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="default 32768 131072 (8192 32768 with --quick)")
    p.add_argument("--hidden", type=int, default=None, help="default 1024 (256 with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="default 2048 (1024 with --quick); a multiple of 4")
    p.add_argument("--chunk", type=int, default=None, help="fused chunk tokens (default tokens / 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3, 2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's). With 1, the "
                   "process CPU time is a load-independent measure of work; wall time is reported too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.vocab = args.vocab or ([8192, 32768] if args.quick else [32768, 131072])
    args.hidden = args.hidden or (256 if args.quick else 1024)
    args.tokens = args.tokens or (1024 if args.quick else 2048)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.tokens % 4:
        p.error(f"--tokens={args.tokens}: must be a multiple of 4 (4 sequences)")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for vocab in args.vocab:
            r = run_vocab(vocab, args, device, dtype)
            r["device"] = device.type
            results.append(r)
            print(f"{device.type} V={vocab} h={args.hidden} tokens={args.tokens} {r['dtype']} chunk={r['chunk_tokens']}: "
                  f"logits {r['logits_mb']} MB | materialised {r['materialised']['fwd_bwd_s']:.3f} s, extra "
                  f"{r['materialised']['extra_mb']} MB ({r['materialised']['extra_x_logits']}x) | fused "
                  f"{r['fused']['fwd_bwd_s']:.3f} s, extra {r['fused']['extra_mb']} MB ({r['fused']['extra_x_logits']}x)"
                  f" | time ratio {r['time_fused_over_materialised']} (CPU time {r['cpu_time_fused_over_materialised']})"
                  f" | max diff {r['max_abs_diff']}", flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU path (Triton partials, bf16) was not timed")
    print(json.dumps({"benchmark": "fused_linear_logprobs", "quick": args.quick, "threads": torch.get_num_threads(),
                      "cpu_cores": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
