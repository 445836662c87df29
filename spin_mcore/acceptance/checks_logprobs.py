"""The log-prob paths on CUDA: the Triton kernels (accuracy, bytes/s) and the fused linear log-prob op.

Accuracy (:func:`check_triton_accuracy`) uses the tolerances of tests/test_sequence_logprobs.py for bf16
logits: the inputs are exact in every dtype and the kernels compute in fp32, so token and sequence
log-probs agree with the fp64 oracle (:func:`spin_mcore.logprobs.reference.reference_token_logprobs`) within
atol = rtol = 2e-5, and the gradient, rounded once to bf16, within eps * (max|g| + |ref|) (eps = bf16's
2^-7). The oracle runs in row chunks, so [B, S, V] never exists in fp64. Before each run the allocator is
left holding a NaN-filled block of the output's size: an element a kernel failed to write shows as NaN.

Bytes/s (:func:`check_triton_bandwidth`): the forward reads the logits once, the backward reads them and
writes the gradient; achieved bytes over the median CUDA-event time, against the H200's 4.8 TB/s (goal
>= 70%, issue 25) and against a device-to-device copy measured on the same card.
"""

from __future__ import annotations

import os

from spin_mcore.acceptance.runner import Outcome, require_cuda

FULL_SHAPE = (8, 4096, 128256)  # 8 sequences x 4096 tokens x Llama-3's vocab, bf16: 8.4 GB of logits
ODD_CASE = dict(B=3, S=1531, V=128256, vocab_size=128001)  # odd length, odd vocab (127 padding columns)
BANDWIDTH_GOAL = 0.70
ATOL = RTOL = 2e-5  # tests/test_sequence_logprobs.py, bf16 logits
REF_ROWS = 512  # rows per fp64 oracle chunk (512 x 128256 x 8 B = 0.5 GB)


def make_case(B, S, V, vocab_size, seed, seq_major, mask_kind, device="cuda"):
    """bf16 logits ([B, S, V], or a [B, S, V] view of an [S, B, V] buffer), labels, mask, upstream grads."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    shape = (S, B, V) if seq_major else (B, S, V)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(2.0)
    if seq_major:
        x = x.transpose(0, 1)  # Megatron's output layer layout, seen as [B, S, V]
    vs = vocab_size or V
    labels = torch.randint(0, vs, (B, S), generator=g, device=device)
    if mask_kind == "prompt":  # the prompt quarter of every row is not scored
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        mask[:, : S // 4] = False
    else:  # random holes, one fully masked row, labels at the first and last valid id
        mask = torch.rand(B, S, generator=g, device=device) > 0.3
        labels[0, 0], labels[0, 1], labels[-1, -1] = 0, vs - 1, vs - 1
        mask[0, 0] = mask[0, 1] = mask[-1, -1] = True
        if B > 2:
            mask[1] = False
    labels = labels.masked_fill(~mask, -100)
    w_seq = torch.randn(B, generator=g, device=device) * 2
    w_tok = torch.randn(B, S, generator=g, device=device)
    return x, labels, mask, w_seq, w_tok


def run_ours(x, labels, mask, vocab_size, w_seq, w_tok, backend):
    """(token log-probs [B, S] fp32, seq log-probs [B], grad in the logits' dtype and layout) of our op."""
    from spin_mcore.logprobs import sequence_logprobs

    leaf = x.detach().requires_grad_()
    out = sequence_logprobs(leaf, labels, mask, vocab_size=vocab_size, return_token_logprobs=True, backend=backend)
    (out.seq_logps * w_seq).sum().add((out.token_logps * w_tok).sum()).backward()
    return out.token_logps.detach(), out.seq_logps.detach(), leaf.grad


def elementwise_ratio(diff, ref, eps: float) -> float:
    """max |got - ref| / (eps |ref| + 1e-12): <= 1 when every element is within one bf16 ulp of its reference.

    The tests' gradient tolerance adds eps * max|g| to every element, which no off-label column (|g p| ~ 1e-4 here)
    can exceed; this per-element bound catches a wrong softmax there too. Masked rows and padding columns have
    an exact-zero reference and must be exactly zero."""
    return float((diff / (eps * ref.abs() + 1e-12)).max())


class _Errors:
    """Running maxima of tolerance ratios (<= 1 passes) and relative-norm sums, over oracle chunks."""

    def __init__(self):
        self.ratio = {"tok": 0.0, "grad": 0.0, "grad_elementwise": 0.0}
        self.max_abs = {"tok": 0.0, "grad": 0.0}
        self.sq = {"grad_diff": 0.0, "grad_ref": 0.0}

    def add(self, key, got, ref, atol, rtol):
        diff = (got.double() - ref).abs()
        self.max_abs[key] = max(self.max_abs[key], float(diff.max()))
        self.ratio[key] = max(self.ratio[key], float((diff / (atol + rtol * ref.abs())).max()))
        if key == "grad":
            self.ratio["grad_elementwise"] = max(self.ratio["grad_elementwise"], elementwise_ratio(diff, ref, rtol))
            self.sq["grad_diff"] += float(diff.square().sum())
            self.sq["grad_ref"] += float(ref.square().sum())

    def grad_rel(self) -> float:
        return (self.sq["grad_diff"] / self.sq["grad_ref"]) ** 0.5 if self.sq["grad_ref"] else 0.0


def against_oracle(x, labels, mask, vocab_size, w_seq, w_tok, tok, seq, grad, rows: int = REF_ROWS) -> dict:
    """Compare our outputs with the fp64 oracle, row chunk by row chunk; returns the figures."""
    import torch

    from spin_mcore.logprobs.reference import reference_token_logprobs

    B, S, V = x.shape
    eps = torch.finfo(torch.bfloat16).eps
    gmax = float(w_seq.abs().max() + w_tok.abs().max())
    err = _Errors()
    seq_ref = torch.zeros(B, dtype=torch.float64, device=x.device)
    for b in range(B):
        for s0 in range(0, S, rows):
            s1 = min(S, s0 + rows)
            x64 = x[b:b + 1, s0:s1].double().requires_grad_()
            keep = mask[b:b + 1, s0:s1]
            ref = reference_token_logprobs(x64, labels[b:b + 1, s0:s1], keep, vocab_size)  # [1, n] fp64
            (ref * (w_seq[b].double() + w_tok[b:b + 1, s0:s1].double())).sum().backward()
            seq_ref[b] += ref.detach().sum()
            err.add("tok", tok[b:b + 1, s0:s1], ref.detach(), ATOL, RTOL)
            err.add("grad", grad[b:b + 1, s0:s1], x64.grad, eps * gmax, eps)
            del x64, ref
    seq_diff = (seq.double() - seq_ref).abs()
    seq_ratio = float((seq_diff / (ATOL + RTOL * seq_ref.abs())).max())
    masked_grad = float(grad[~mask].abs().max()) if bool((~mask).any()) else 0.0
    pad_grad = float(grad[..., vocab_size:].abs().max()) if vocab_size and vocab_size < V else 0.0
    return {"tok_max_abs_err": err.max_abs["tok"], "tok_tol_ratio": err.ratio["tok"],
            "seq_max_abs_err": float(seq_diff.max()), "seq_tol_ratio": seq_ratio,
            "grad_max_abs_err": err.max_abs["grad"], "grad_tol_ratio": err.ratio["grad"],
            "grad_elementwise_ratio": err.ratio["grad_elementwise"],
            "grad_rel_err": err.grad_rel(), "nan_outputs": int(torch.isnan(grad).sum()) + int(torch.isnan(tok).sum()),
            "masked_grad_max": masked_grad, "padding_grad_max": pad_grad}


def accurate(f: dict) -> bool:
    return (f["tok_tol_ratio"] <= 1 and f["seq_tol_ratio"] <= 1 and f["grad_tol_ratio"] <= 1
            and f["grad_elementwise_ratio"] <= 1 and f["nan_outputs"] == 0
            and f["masked_grad_max"] == 0 and f["padding_grad_max"] == 0)


def against_cpu(x, labels, mask, vocab_size, w_seq, w_tok, tok, grad, rows: int) -> dict:
    """The first sequence's first ``rows`` tokens through the CPU (chunked) path: token log-probs and grads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        xc = x[0:1, :rows].detach().cpu()
        tok_c, _, grad_c = run_ours(xc, labels[0:1, :rows].cpu(), mask[0:1, :rows].cpu(), vocab_size,
                                    w_seq[0:1].cpu(), w_tok[0:1, :rows].cpu(), "chunked")
    finally:
        torch.set_num_threads(threads)
    eps = torch.finfo(torch.bfloat16).eps
    gmax = float(w_seq[0].abs() + w_tok[0, :rows].abs().max())
    ref = grad_c.to(grad.device).double()  # compared where the kernel's result is (the GPU): fp64 of [rows, V] is big
    gdiff = (grad[0:1, :rows].double() - ref).abs()
    return {"cpu_rows": rows, "cpu_tok_max_abs_diff": float((tok[0:1, :rows] - tok_c.to(tok.device)).abs().max()),
            "cpu_grad_max_abs_diff": float(gdiff.max()),
            "cpu_grad_tol_ratio": float((gdiff / (eps * gmax + eps * ref.abs())).max()),
            "cpu_grad_elementwise_ratio": elementwise_ratio(gdiff, ref, eps),
            "cpu_grad_identical_share": float((gdiff == 0).double().mean())}


def check_triton_accuracy(ctx) -> Outcome:
    require_cuda()
    import torch

    from spin_mcore.acceptance.measure import poison_cuda_allocator

    B, S, V = FULL_SHAPE
    figures = {"shape": f"{B}x{S}x{V}", "dtype": "bfloat16"}
    # Main case: the full shape, prompt quarter masked, batch-major.
    x, labels, mask, w_seq, w_tok = make_case(B, S, V, None, seed=0, seq_major=False, mask_kind="prompt")
    poison_cuda_allocator(x.numel() * x.element_size())
    tok, seq, grad = run_ours(x, labels, mask, None, w_seq, w_tok, "triton")
    torch.cuda.synchronize()
    main = against_oracle(x, labels, mask, None, w_seq, w_tok, tok, seq, grad)
    figures.update({f"main_{k}": v for k, v in main.items()})
    cpu = against_cpu(x, labels, mask, None, w_seq, w_tok, tok, grad, 1024 if ctx.quick else S)
    figures.update(cpu)
    del x, grad
    torch.cuda.empty_cache()
    # Odd case: odd length, odd vocab with padding columns, random holes, Megatron's [S, B, V] layout.
    o = ODD_CASE
    x, labels, mask, w_seq, w_tok = make_case(o["B"], o["S"], o["V"], o["vocab_size"], seed=1, seq_major=True,
                                              mask_kind="random")
    poison_cuda_allocator(x.numel() * x.element_size())
    tok, seq, grad = run_ours(x, labels, mask, o["vocab_size"], w_seq, w_tok, "triton")
    torch.cuda.synchronize()
    odd = against_oracle(x, labels, mask, o["vocab_size"], w_seq, w_tok, tok, seq, grad)
    figures.update({f"odd_{k}": v for k, v in odd.items()})
    figures["odd_shape"] = f"{o['B']}x{o['S']}x{o['V']} (vocab {o['vocab_size']}, seq-major)"
    cpu_ok = cpu["cpu_tok_max_abs_diff"] <= 1e-4 and cpu["cpu_grad_tol_ratio"] <= 1 and \
        cpu["cpu_grad_elementwise_ratio"] <= 1
    ok = accurate(main) and accurate(odd) and cpu_ok
    summary = (f"vs fp64: tok |err| {main['tok_max_abs_err']:.1e}, grad rel {main['grad_rel_err']:.1e} "
               f"(tol ratio tok {main['tok_tol_ratio']:.2f}, seq {main['seq_tol_ratio']:.2f}, grad "
               f"{main['grad_tol_ratio']:.2f}, per element {main['grad_elementwise_ratio']:.2f}); "
               f"odd case tol ratios {odd['tok_tol_ratio']:.2f}/{odd['seq_tol_ratio']:.2f}/{odd['grad_tol_ratio']:.2f}"
               f"/{odd['grad_elementwise_ratio']:.2f}, "
               f"masked/padding grads {'0' if odd['masked_grad_max'] == 0 and odd['padding_grad_max'] == 0 else 'NONZERO'}; "
               f"vs CPU ({cpu['cpu_rows']} rows): tok |diff| {cpu['cpu_tok_max_abs_diff']:.1e}, grads identical "
               f"{cpu['cpu_grad_identical_share']:.1%}; NaN {main['nan_outputs'] + odd['nan_outputs']}")
    return Outcome(ok, summary, figures)


def check_triton_bandwidth(ctx) -> Outcome:
    require_cuda()
    import torch

    from spin_mcore.acceptance.checks_platform import init_cuda_platform
    from spin_mcore.acceptance.measure import (
        H200_HBM_BYTES_PER_S,
        copy_bytes_per_s,
        cuda_peak_extra_bytes,
        cuda_seconds,
        logprob_methods,
        triton_kernel_bandwidth,
    )

    init_cuda_platform(ctx)  # Megatron's cross entropy reads the TP group from parallel_state
    B, S, V = FULL_SHAPE
    repeats = 3 if ctx.quick else 10
    n_bytes = B * S * V * 2
    copy = copy_bytes_per_s(n_bytes, repeats)
    torch.cuda.empty_cache()
    k = triton_kernel_bandwidth(FULL_SHAPE, repeats, H200_HBM_BYTES_PER_S)
    torch.cuda.empty_cache()
    share = {name: k[f"{name}_gb_per_s"] * 1e9 / H200_HBM_BYTES_PER_S for name in ("fwd", "bwd", "fwd_bwd")}
    figures = {"shape": f"{B}x{S}x{V}", "copy_tb_per_s": copy / 1e12, "fwd_ms": k["fwd_ms"], "bwd_ms": k["bwd_ms"],
               "fwd_tb_per_s": k["fwd_gb_per_s"] / 1e3, "bwd_tb_per_s": k["bwd_gb_per_s"] / 1e3,
               "fwd_bwd_tb_per_s": k["fwd_bwd_gb_per_s"] / 1e3, "fwd_share_of_4.8": share["fwd"],
               "bwd_share_of_4.8": share["bwd"], "fwd_bwd_share_of_4.8": share["fwd_bwd"],
               "fwd_bwd_share_of_copy": k["fwd_bwd_gb_per_s"] * 1e9 / copy, "goal": BANDWIDTH_GOAL}

    # The whole op, forward + backward through autograd, side by side (every token counted).
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(B, S, V, generator=g, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, S), generator=g, device="cuda")
    mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    w = torch.randn(B, generator=g, device="cuda")
    methods = logprob_methods(labels, mask, w)
    side = {}
    for name in ("ours", "naive", "megatron"):
        leaf = x.detach().requires_grad_()

        def clear(leaf=leaf):
            leaf.grad = None

        try:
            seconds = cuda_seconds(lambda: methods[name](leaf), repeats=max(2, repeats // 2), setup=clear)
            clear()
            peak, _ = cuda_peak_extra_bytes(lambda: methods[name](leaf))
            extra = (peak - n_bytes) / n_bytes  # the bf16 gradient every method owes autograd is not extra
            side[name] = seconds
            figures[f"{name}_fwd_bwd_ms"] = seconds * 1e3
            figures[f"{name}_effective_tb_per_s"] = 3 * n_bytes / seconds / 1e12  # read, read, write: the least
            figures[f"{name}_extra_x_logits"] = extra
        except torch.cuda.OutOfMemoryError:
            figures[f"{name}_fwd_bwd_ms"] = "out of memory"
        finally:
            leaf.grad = None
            torch.cuda.empty_cache()
    for name in ("naive", "megatron"):
        if name in side and "ours" in side:
            figures[f"{name}_over_ours"] = side[name] / side["ours"]
    ok = share["fwd_bwd"] >= BANDWIDTH_GOAL
    ours_ms = f"{side['ours'] * 1e3:.1f} ms" if "ours" in side else "n/a"

    def vs(name, label):
        if name not in side:
            return f"{label} {figures.get(f'{name}_fwd_bwd_ms')}"
        return f"{label} {side[name] * 1e3:.1f} ms ({figures[f'{name}_over_ours']:.1f}x)" if "ours" in side else \
            f"{label} {side[name] * 1e3:.1f} ms"

    summary = (f"kernels fwd {figures['fwd_tb_per_s']:.2f} TB/s ({share['fwd']:.0%}), bwd {figures['bwd_tb_per_s']:.2f} TB/s "
               f"({share['bwd']:.0%}), fwd+bwd {share['fwd_bwd']:.0%} of 4.8 TB/s (goal {BANDWIDTH_GOAL:.0%}; copy "
               f"{copy / 1e12:.2f} TB/s); op fwd+bwd: ours {ours_ms}, {vs('naive', 'log_softmax+gather')}, "
               f"{vs('megatron', 'Megatron CE')}")
    return Outcome(ok, summary, figures,
                   None if ok else f"kernels reach {share['fwd_bwd']:.0%} of 4.8 TB/s, goal {BANDWIDTH_GOAL:.0%}")


def check_fused_linear(ctx) -> Outcome:
    require_cuda()
    import torch

    from spin_mcore.acceptance.measure import fused_linear_vs_materialised

    vocab, tokens, hidden = 128256, (4096 if ctx.quick else 8192), (2048 if ctx.quick else 4096)
    r = fused_linear_vs_materialised(vocab, tokens, hidden, None, 2 if ctx.quick else 5, torch.device("cuda"),
                                     torch.bfloat16)
    fused, mat, rel = r["fused"], r["materialised"], r["rel_diff"]
    figures = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "chunk_tokens": r["chunk_tokens"],
               "logits_mb": r["logits_mb"], "fused_extra_mb": fused["extra_mb"], "fused_extra_x_logits": fused["extra_x_logits"],
               "materialised_extra_mb": mat["extra_mb"], "materialised_extra_x_logits": mat["extra_x_logits"],
               "fused_ms": fused["fwd_bwd_s"] * 1e3, "materialised_ms": mat["fwd_bwd_s"] * 1e3,
               "time_fused_over_materialised": r["time_fused_over_materialised"],
               **{f"rel_diff_{k}": v for k, v in rel.items()}}
    # bf16: seq log-probs from logits rounded alike (1e-3 relative); dh rounds once (2e-2); dW is accumulated in
    # bf16 over tokens / chunk chunks, one rounding each (3e-2).
    close = rel["seq"] <= 1e-3 and rel["dh"] <= 2e-2 and rel["dw"] <= 3e-2
    ok = fused["extra_x_logits"] <= 0.1 and close
    summary = (f"V={vocab} h={hidden} {tokens} tokens bf16 (logits {r['logits_mb']:.0f} MB): extra memory fused "
               f"{fused['extra_x_logits']:.3f}x logits (goal <= 0.1), materialised {mat['extra_x_logits']:.2f}x; "
               f"fwd+bwd fused {fused['fwd_bwd_s'] * 1e3:.1f} ms vs {mat['fwd_bwd_s'] * 1e3:.1f} ms "
               f"({r['time_fused_over_materialised']:.2f}x; 4 GEMMs vs 3); rel diff seq {rel['seq']:.1e} "
               f"dh {rel['dh']:.1e} dW {rel['dw']:.1e}")
    return Outcome(ok, summary, figures)
