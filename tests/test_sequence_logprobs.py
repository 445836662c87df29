"""sequence_logprobs: chunked and Triton (interpreted on CPU) paths against an fp64 log_softmax oracle,
TP=2 against TP=1, and against Megatron's vocab_parallel_cross_entropy."""

from __future__ import annotations

import pytest
import torch

from spin_mcore.logprobs import LogProbs, sequence_logprobs
from spin_mcore.logprobs import chunked as chunked_mod
from spin_mcore.logprobs.reference import reference_sequence_logprobs


def _case(B, S, V, seed=0, vocab_size=None, dtype=torch.float32, scale=3.0):
    """Random logits/labels/mask with the edge cases every test wants in one batch:
    row 1 fully masked (labels -100), labels at the first and last valid id, a partly masked row."""
    g = torch.Generator().manual_seed(seed)
    vs = vocab_size or V
    logits = (torch.randn(B, S, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, vs, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.25
    labels[0, 0], labels[0, 1], labels[-1, -1] = 0, vs - 1, vs - 1
    mask[0, 0] = mask[0, 1] = mask[-1, -1] = True
    if B > 2:
        mask[1] = False
        labels[1] = -100
    labels[~mask] = -100
    return logits, labels, mask


def _oracle(logits, labels, mask, vocab_size, w_seq, w_tok):
    """fp64 (seq_logps, token_logps, grad) of sum(w_seq * seq + w_tok * tok)."""
    x = logits.detach().double().requires_grad_()
    seq, tok = reference_sequence_logprobs(x, labels, mask, vocab_size)
    (seq * w_seq.double()).sum().add((tok * w_tok.double()).sum()).backward()
    return seq, tok, x.grad


def _ours(logits, labels, mask, vocab_size, w_seq, w_tok, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    out = sequence_logprobs(x, labels, mask, vocab_size=vocab_size, return_token_logprobs=True, backend=backend, **kw)
    (out.seq_logps * w_seq).sum().add((out.token_logps * w_tok).sum()).backward()
    return out, x.grad


def _check_against_oracle(backend, B, S, V, vocab_size, dtype, seed=0, seq_major=False):
    logits, labels, mask = _case(B, S, V, seed, vocab_size, dtype)
    if seq_major:  # same values, stored [S, B, V] as Megatron's transformer emits them: not contiguous
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    g = torch.Generator().manual_seed(seed + 1)
    w_seq, w_tok = torch.randn(B, generator=g) * 2, torch.randn(B, S, generator=g)  # non-unit upstream grads
    seq_r, tok_r, grad_r = _oracle(logits, labels, mask, vocab_size, w_seq, w_tok)
    out, grad = _ours(logits, labels, mask, vocab_size, w_seq, w_tok, backend)
    assert out.seq_logps.dtype == torch.float32 and out.token_logps.dtype == torch.float32
    assert grad.dtype == dtype
    assert torch.equal(out.token_counts, mask.sum(1))
    if dtype == torch.float32:
        tol, gtol = dict(atol=1e-5, rtol=1e-5), dict(atol=1e-5, rtol=1e-5)
    else:
        # Inputs are exactly representable, math is fp32: values are fp32-accurate. Grads are
        # rounded once to the logits' dtype: half a bf16/fp16 ulp of |g| (g <= max|w|).
        eps = torch.finfo(dtype).eps
        gmax = float((w_seq.abs().max() + w_tok.abs().max()))
        tol, gtol = dict(atol=2e-5, rtol=2e-5), dict(atol=eps * gmax, rtol=eps)
    torch.testing.assert_close(out.seq_logps.double(), seq_r, **tol)
    torch.testing.assert_close(out.token_logps.double(), tok_r, **tol)
    torch.testing.assert_close(grad.double(), grad_r, **gtol)
    # all-masked row: log-prob 0, gradient exactly 0; padding columns: gradient exactly 0
    if B > 2:
        assert out.seq_logps[1].item() == 0.0 and out.token_counts[1].item() == 0
        assert grad[1].abs().max().item() == 0.0
    if vocab_size is not None and vocab_size < V:
        assert grad[..., vocab_size:].abs().max().item() == 0.0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_matches_fp64_reference(monkeypatch, dtype):
    # Default budget, small vocab: one block spans every sequence of the batch.
    _check_against_oracle("chunked", 5, 9, 64, vocab_size=60, dtype=dtype, seed=5)
    # A 7-row budget: blocks straddle sequence boundaries (S = 41), V = 1271 is not a multiple of anything.
    monkeypatch.setattr(chunked_mod, "CHUNK_BYTES", 7 * 1271 * 4)
    monkeypatch.setattr(chunked_mod, "MIN_CHUNK_BYTES", 1)
    _check_against_oracle("chunked", 3, 41, 1271, vocab_size=1200, dtype=dtype)
    _check_against_oracle("chunked", 3, 41, 1271, vocab_size=None, dtype=dtype, seed=3)
    _check_against_oracle("chunked", 3, 41, 1271, vocab_size=1200, dtype=dtype, seed=4, seq_major=True)


def test_triton_interpreted_matches_fp64_reference(monkeypatch):
    from spin_kernels import fused_logprob as k

    # 128-wide blocks: several blocks per row and a ragged last block (V = 300, valid 290).
    monkeypatch.setattr(k, "FWD_BLOCK", 128)
    monkeypatch.setattr(k, "BWD_BLOCK", 128)
    _check_against_oracle("triton", 3, 12, 300, vocab_size=290, dtype=torch.float32)
    _check_against_oracle("triton", 2, 8, 300, vocab_size=None, dtype=torch.bfloat16, seed=5)


def test_triton_kernel_inplace_and_strided():
    """The launcher writes into the logits only when asked, and honours [B, S] strides."""
    from spin_kernels import fused_logprob as k

    logits, labels, mask = _case(2, 6, 200, seed=7, vocab_size=190)
    flat_lab = torch.where(mask, labels, 0).reshape(-1)
    keep = mask.reshape(-1).to(torch.uint8)
    base = torch.randn(6, 2, 200)  # a [S, B, V] buffer viewed as [B, S, V]: non-contiguous rows
    base.copy_(logits.transpose(0, 1))
    strided = base.transpose(0, 1)
    m, s, t = k.logprob_forward_partials(strided, flat_lab, keep, 0, 190, block=64)
    lse = m + torch.log(s)
    ref = torch.logsumexp(logits[..., :190].double(), -1).reshape(-1)
    torch.testing.assert_close(lse[keep.bool()].double(), ref[keep.bool()], atol=1e-5, rtol=1e-6)
    g = torch.randn(12)
    out_of_place = k.logprob_backward(strided, flat_lab, keep, lse, g, 0, 190, block=64)
    torch.testing.assert_close(strided, logits)  # untouched
    k.logprob_backward(strided, flat_lab, keep, lse, g, 0, 190, inplace=True, block=64)
    torch.testing.assert_close(strided, out_of_place, atol=0, rtol=0)


def test_no_grad_and_default_outputs():
    logits, labels, mask = _case(4, 9, 333, seed=11)
    with torch.no_grad():
        out = sequence_logprobs(logits, labels, mask.float())  # float mask, auto backend
    assert isinstance(out, LogProbs) and out.token_logps is None and not out.seq_logps.requires_grad
    seq_r, _ = reference_sequence_logprobs(logits.double(), labels, mask)
    torch.testing.assert_close(out.seq_logps.double(), seq_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(labels="oob"), r"labels\[2, 3\] = 1271 is outside \[0, vocab_size=1271\)"),
    (dict(labels="oob_padding"), r"outside \[0, vocab_size=1200\)"),
    (dict(labels="float"), "labels must be int64"),
    (dict(labels="shape"), r"labels shape \(3, 40\) does not match"),
    (dict(mask="shape"), r"loss_mask shape \(41, 3\) does not match"),
    (dict(logits="int"), "logits dtype torch.int64 not supported"),
    (dict(logits="2d"), r"logits must be \[B, S, V_local\]"),
    (dict(vocab_size=1272), r"vocab_size=1272 must be in \[1, tp \* V_local\]"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(backend="fast"), "backend='fast'"),
])
def test_bad_input_errors(bad, match):
    logits, labels, mask = _case(3, 41, 1271)
    vocab_size = bad.get("vocab_size")
    if bad.get("labels") == "oob":
        labels[2, 3], mask[2, 3] = 1271, True
    if bad.get("labels") == "oob_padding":
        labels[0, 5], mask[0, 5], vocab_size = 1250, True, 1200
    if bad.get("labels") == "float":
        labels = labels.float()
    if bad.get("labels") == "shape":
        labels = labels[:, :40]
    if bad.get("mask") == "shape":
        mask = mask.T
    if bad.get("logits") == "int":
        logits = logits.long()
    if bad.get("logits") == "2d":
        logits = logits[0]
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(logits, labels, mask, vocab_size=vocab_size, backend=bad.get("backend", "auto"))


def test_masked_positions_may_hold_any_label():
    logits, labels, mask = _case(3, 41, 1271)
    labels[~mask] = 10**9  # ignored: only counted labels are checked
    out = sequence_logprobs(logits, labels, mask)
    seq_r, _ = reference_sequence_logprobs(logits.double(), labels, mask)
    torch.testing.assert_close(out.seq_logps.double(), seq_r, atol=1e-5, rtol=1e-5)


def test_triton_kernels_compile_for_h100(tmp_path):
    """Ahead-of-time compile both kernels to sm_90 cubin (no GPU needed) so GPU-only
    compile errors the interpreter cannot see are caught on CPU CI.

    Runs in a subprocess with the interpreter off and an empty Triton cache: in this process
    TRITON_INTERPRET=1 (conftest) makes triton.compile fail, and a warm ~/.triton cache would
    hide a real failure by serving an earlier compile. Also checks code generation: with an odd
    ``n_valid`` both kernels still use vectorised global loads."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRITON_HOME=str(tmp_path / "triton-home"))
    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert set(result) == {"_fwd_partials_kernel", "_bwd_kernel"}
    for name, info in result.items():
        assert info["cubin_bytes"] > 1000, (name, info)
        # Specialised for an odd n_valid (tests/triton_aot.py): loads are bounded by the padded
        # V_local, so they stay 16-byte vectors (before: 0 vector loads in both kernels, 2 each
        # only when n_valid was a multiple of 16).
        assert info["vector_loads"] > 0, (name, info)
    # The cache was empty, so this compile really ran here.
    assert any((tmp_path / "triton-cache").rglob("*.cubin"))


# ---------------------------------------------------------------- multi-process: TP=2 and Megatron

def _tp_worker(vocab_size_cases):
    """Runs on each of 2 gloo ranks: ours at TP=2 vs ours at TP=1 (full logits, same process),
    vs the fp64 oracle, and vs Megatron's vocab_parallel_cross_entropy at TP=2."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from spin_mcore.config import ParallelConfig
    from spin_mcore.platform import init_distributed

    ps = init_distributed(ParallelConfig(tp=2), seed=1)
    errs = {}
    B, S, V = 3, 10, 256  # V_local = 128
    for backend in ("chunked", "triton"):
        for vs in vocab_size_cases:
            logits, labels, mask = _case(B, S, V, seed=21, vocab_size=vs)
            # labels on the shard boundary: last id of rank 0, first id of rank 1
            labels[2, 0], labels[2, 1], mask[2, :2] = min(127, (vs or V) - 1), min(128, (vs or V) - 1), True
            g = torch.Generator().manual_seed(4)
            w_seq, w_tok = torch.randn(B, generator=g), torch.randn(B, S, generator=g)
            lo, hi = ps.tp_rank * 128, (ps.tp_rank + 1) * 128
            shard = logits[..., lo:hi].contiguous()
            out2, grad2 = _run(shard, labels, mask, vs, w_seq, w_tok, backend, ps.tp_group)
            out1, grad1 = _run(logits, labels, mask, vs, w_seq, w_tok, backend, None)
            seq_r, tok_r, grad_r = _oracle(logits, labels, mask, vs, w_seq, w_tok)
            key = f"{backend}/vocab={vs}"
            errs[key + "/tp2-vs-tp1 seq"] = (out2.seq_logps - out1.seq_logps).abs().max().item()
            errs[key + "/tp2-vs-tp1 tok"] = (out2.token_logps - out1.token_logps).abs().max().item()
            errs[key + "/tp2-vs-tp1 grad"] = (grad2 - grad1[..., lo:hi]).abs().max().item()
            errs[key + "/tp2-vs-fp64 seq"] = (out2.seq_logps.double() - seq_r).abs().max().item()
            errs[key + "/tp2-vs-fp64 grad"] = (grad2.double() - grad_r[..., lo:hi]).abs().max().item()
        # Megatron has no vocab-padding notion: compare with every column counted.
        logits, labels, mask = _case(B, S, V, seed=22)
        lo, hi = ps.tp_rank * 128, (ps.tp_rank + 1) * 128
        x = logits[..., lo:hi].clone().requires_grad_()
        safe = torch.where(mask, labels, 0)
        loss = vocab_parallel_cross_entropy(x, safe)  # [B, S]; it edits fp32 inputs in place: x is a copy
        (loss * mask).sum().backward()
        out, grad = _run(logits[..., lo:hi], labels, mask, None, torch.zeros(B), mask.float(), backend, ps.tp_group)
        errs[f"{backend}/megatron tok"] = (out.token_logps + loss.detach() * mask).abs().max().item()
        errs[f"{backend}/megatron grad"] = (grad + x.grad).abs().max().item()
    return errs


def _run(logits, labels, mask, vocab_size, w_seq, w_tok, backend, tp_group):
    x = logits.detach().clone().requires_grad_()
    out = sequence_logprobs(x, labels, mask, tp_group=tp_group, vocab_size=vocab_size,
                            return_token_logprobs=True, backend=backend)
    (out.seq_logps * w_seq).sum().add((out.token_logps * w_tok).sum()).backward()
    return out, x.grad


def test_tp2_matches_tp1_reference_and_megatron():
    from spin_mcore.launcher import run_local

    # vocab 256 (no padding), 200 (rank 1 partly padding), 100 (rank 1 all padding)
    results = run_local(_tp_worker, 2, (None, 200, 100))
    for rank, errs in enumerate(results):
        for key, err in errs.items():
            assert err <= 1e-5, f"rank {rank} {key}: max abs error {err:.3g}"


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_inplace_grad_only_when_asked(backend):
    logits, labels, mask = _case(3, 8, 260, seed=13, vocab_size=250)
    w = torch.randn(3)
    x = logits.clone().requires_grad_()
    (sequence_logprobs(x, labels, mask, vocab_size=250, backend=backend).seq_logps * w).sum().backward()
    assert torch.equal(x.detach(), logits)  # default: the logits survive backward
    y = logits.clone().requires_grad_()
    (sequence_logprobs(y, labels, mask, vocab_size=250, backend=backend, inplace_grad=True).seq_logps * w).sum().backward()
    torch.testing.assert_close(y.grad, x.grad, atol=0, rtol=0)
    torch.testing.assert_close(y.detach(), x.grad, atol=0, rtol=0)  # the buffer now holds the gradient
