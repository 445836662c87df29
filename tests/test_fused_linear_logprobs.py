"""fused_linear_sequence_logprobs (train.fused_linear_logprobs): values and both gradients against an
fp64 plain-PyTorch oracle that materialises the logits, at TP1 and TP2, chunk sizes that do not divide
the token count, masked rows; and a whole SPIN / SFT step and reference pass against the materialised path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from spin_mcore.logprobs import sequence_logprobs
from spin_mcore.logprobs.fused_linear import fused_linear_sequence_logprobs
from spin_mcore.logprobs.reference import reference_sequence_logprobs


def _case(S, B, H, V, seed=0, vocab_size=None):
    """hidden [S, B, H], weight [V, H], labels/mask [B, S]: row 1 fully masked, a partly masked row,
    labels at the first and last valid id."""
    g = torch.Generator().manual_seed(seed)
    vs = vocab_size or V
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    labels = torch.randint(0, vs, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.3
    labels[0, 0], labels[-1, -1] = 0, vs - 1
    mask[0, 0] = mask[-1, -1] = True
    mask[1] = False
    labels[~mask] = -100
    w_seq, w_tok = torch.randn(B, generator=g) * 2, torch.randn(B, S, generator=g)  # non-unit upstream grads
    return hidden, weight, labels, mask, w_seq, w_tok


def _oracle(hidden, weight, labels, mask, vocab_size, w_seq, w_tok):
    """fp64 (seq, tok, d hidden, d weight) of sum(w_seq * seq + w_tok * tok), logits materialised."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = (h @ w.t()).transpose(0, 1)  # [B, S, V]
    seq, tok = reference_sequence_logprobs(logits, labels, mask, vocab_size)
    (seq * w_seq.double()).sum().add((tok * w_tok.double()).sum()).backward()
    return seq, tok, h.grad, w.grad


def _fused(hidden, weight, labels, mask, vocab_size, w_seq, w_tok, tp_group=None, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fused_linear_sequence_logprobs(h, w, labels, mask, tp_group=tp_group, vocab_size=vocab_size,
                                         return_token_logprobs=True, **kw)
    (out.seq_logps * w_seq).sum().add((out.token_logps * w_tok).sum()).backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("chunk", [3, 7, 64, 10_000])
def test_matches_fp64_oracle(chunk):
    # 11 x 4 tokens, 22-27 kept: no chunk size divides the kept count (one chunk for 64 and 10000).
    hidden, weight, labels, mask, w_seq, w_tok = _case(11, 4, 24, 80, seed=chunk, vocab_size=73)
    seq_r, tok_r, dh_r, dw_r = _oracle(hidden, weight, labels, mask, 73, w_seq, w_tok)
    out, dh, dw = _fused(hidden, weight, labels, mask, 73, w_seq, w_tok, chunk_tokens=chunk)
    assert out.seq_logps.dtype == torch.float32 and dh.dtype == dw.dtype == torch.float32
    assert torch.equal(out.token_counts, mask.sum(1))
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.seq_logps.double(), seq_r, **tol)
    torch.testing.assert_close(out.token_logps.double(), tok_r, **tol)
    torch.testing.assert_close(dh.double(), dh_r, **tol)
    torch.testing.assert_close(dw.double(), dw_r, **tol)
    assert out.seq_logps[1].item() == 0.0
    assert dh.transpose(0, 1)[~mask].abs().max().item() == 0.0  # masked rows: exactly no gradient
    assert dw[73:].abs().max().item() == 0.0  # vocab padding rows of the weight


def test_triton_backend_matches_fp64_oracle():
    """The GPU path's partials and gradient kernels (interpreted on CPU without CUDA), same contract."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, labels, mask, w_seq, w_tok = _case(7, 3, 16, 72, seed=2, vocab_size=67)
    seq_r, tok_r, dh_r, dw_r = _oracle(hidden, weight, labels, mask, 67, w_seq, w_tok)
    dev = [t.to(device) for t in (hidden, weight, labels, mask, w_seq, w_tok)]
    out, dh, dw = _fused(*dev[:4], 67, *dev[4:], chunk_tokens=5, backend="triton")
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.seq_logps.double().cpu(), seq_r, **tol)
    torch.testing.assert_close(dh.double().cpu(), dh_r, **tol)
    torch.testing.assert_close(dw.double().cpu(), dw_r, **tol)


def test_masked_rows_are_never_read():
    """Poisoned (NaN) hidden states of masked tokens change nothing: they are never projected."""
    hidden, weight, labels, mask, w_seq, w_tok = _case(9, 3, 16, 40, seed=3)
    clean = _fused(hidden, weight, labels, mask, None, w_seq, w_tok, chunk_tokens=4)
    poisoned = hidden.clone()
    poisoned.transpose(0, 1)[~mask] = float("nan")
    dirty = _fused(poisoned, weight, labels, mask, None, w_seq, w_tok, chunk_tokens=4)
    assert torch.equal(clean[0].seq_logps, dirty[0].seq_logps)
    assert torch.equal(clean[1], dirty[1]) and torch.equal(clean[2], dirty[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_materialised_op(dtype):
    """Same numbers as the training path it replaces: output-layer logits, then sequence_logprobs."""
    hidden, weight, labels, mask, w_seq, w_tok = _case(10, 4, 32, 96, seed=7, vocab_size=90)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    out, dh, dw = _fused(hidden, weight, labels, mask, 90, w_seq, w_tok, chunk_tokens=6)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref = sequence_logprobs((h @ w.t()).transpose(0, 1), labels, mask, vocab_size=90, return_token_logprobs=True,
                            backend="chunked")
    (ref.seq_logps * w_seq).sum().add((ref.token_logps * w_tok).sum()).backward()
    # fp32: identical up to GEMM blocking. bf16: the logits round the same way; dW is summed per chunk in bf16.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(out.seq_logps, ref.seq_logps, **tol)
    torch.testing.assert_close(dh.float(), h.grad.float(), **tol)
    torch.testing.assert_close(dw.float(), w.grad.float(), **tol)


def test_no_grad_and_nothing_kept():
    hidden, weight, labels, mask, *_ = _case(5, 2, 8, 20, seed=1)
    with torch.no_grad():
        out = fused_linear_sequence_logprobs(hidden, weight, labels, mask, chunk_tokens=3)
    seq_r, *_ = _oracle(hidden, weight, labels, mask, None, torch.ones(2), torch.zeros(2, 5))
    torch.testing.assert_close(out.seq_logps.double(), seq_r, atol=1e-5, rtol=1e-5)
    assert out.token_logps is None
    h = hidden.clone().requires_grad_()
    none = fused_linear_sequence_logprobs(h, weight, labels, torch.zeros_like(mask))
    none.seq_logps.sum().backward()
    assert none.seq_logps.abs().max().item() == 0.0 and h.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.zeros(4, 2)), "hidden must be"),
    (dict(weight=torch.zeros(20, 9)), "weight must be"),
    (dict(weight=torch.zeros(20, 8, dtype=torch.float64)), "weight is torch.float64"),
    (dict(labels=torch.zeros(5, 2, dtype=torch.long)), "labels shape"),
    (dict(loss_mask=torch.ones(2, 4)), "loss_mask shape"),
    (dict(chunk_tokens=0), "chunk_tokens=0"),
    (dict(vocab_size=21), "vocab_size=21"),
    (dict(labels=torch.full((2, 5), 20)), r"labels\[0, 0\] = 20"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(hidden=torch.zeros(5, 2, 8), weight=torch.zeros(20, 8), labels=torch.zeros(2, 5, dtype=torch.long),
                loss_mask=torch.ones(2, 5, dtype=torch.bool), chunk_tokens=4, vocab_size=20)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_sequence_logprobs(**args)


def test_config_refuses_unsupported_combinations():
    from spin_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.fused_linear_logprobs=true does not support train.pack_sequences"):
        load_config(overrides=["train.fused_linear_logprobs=true", "train.pack_sequences=true"])
    with pytest.raises(ConfigError, match="does not support parallel.sequence_parallel"):
        load_config(overrides=["train.fused_linear_logprobs=true", "parallel.tp=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="train.fused_linear_chunk_tokens=0"):
        load_config(overrides=["train.fused_linear_chunk_tokens=0"])


# ----------------------------------------------------------------------------- the training step

SEQ = 24
# RMSprop with eps 0.01 (as tests/test_trainer.py): the update is smooth in the gradient, so 1e-6-level gradient
# differences stay 1e-6-level in the weights (Adam's eps 1e-8 amplifies them where a gradient is ~0).
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "model.vocab_size=300", "train.lr=[0.001]",
        "train.warmup_fraction=0.0", "train.optimizer=rmsprop", "train.eps=0.01", "train.clip_grad=1.0", "spin.beta=[0.5]",
        "generation.shard_size=8", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=2",
        "train.fused_linear_chunk_tokens=7"]


def _cfg(*overrides):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _first_losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _step_worker(tmp: str) -> dict:
    """Reference pass, 2 SPIN steps and 2 SFT steps, materialised vs fused, from one init checkpoint."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train
    from spin_mcore.utils.shards import read_stage
    from tests.helpers import random_pair_records, write_pair_stage

    tmp = Path(tmp)
    res: dict = {}
    cfg = _cfg()
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    write_pair_stage(tmp / "gen", random_pair_records(8, seed=3, vocab=300))
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    with torch.no_grad():  # the model stops at the hidden states; the output layer applied by hand matches
        tokens = torch.randint(0, 300, (2, SEQ))
        pos = torch.arange(SEQ).expand(2, SEQ)
        logits = model(tokens, pos, attention_mask=None, sequence_major_logits=True)
        hidden = model(tokens, pos, attention_mask=None, final_hidden_states=True)
        res["hidden_shape"] = list(hidden.shape)
        res["head_diff"] = float((hidden @ model.output_weight().t() - logits).abs().max())
    for name, flag in (("mat", "false"), ("fused", "true")):
        c = _cfg(f"train.fused_linear_logprobs={flag}")
        compute_reference_logprobs(c, model, pstate, [tmp / "gen"], tmp / f"ref_{name}")
        res[f"ref_{name}"] = [[r["ref_logp_real"], r["ref_logp_generated"]] for r in read_stage(tmp / f"ref_{name}")]
        train(c, pstate, [tmp / "ref_mat"], str(tmp / "init"), tmp / f"spin_{name}")
        res[f"spin_{name}"] = _first_losses(tmp / f"spin_{name}")
        train(_cfg(f"train.fused_linear_logprobs={flag}", "train.objective=sft"), pstate, [tmp / "gen"],
              str(tmp / "init"), tmp / f"sft_{name}")
        res[f"sft_{name}"] = _first_losses(tmp / f"sft_{name}")
    return res


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("fused_linear")
    return tmp, run_local(_step_worker, 1, str(tmp))[0]


def _weights_diff(tmp: Path, a: str, b: str) -> tuple[float, float]:
    from tests.helpers import checkpoint_weights

    wa, wb, w0 = (checkpoint_weights(tmp / d) for d in (f"{a}/model", f"{b}/model", "init"))
    assert wa.keys() == wb.keys()

    def diff(x, y):  # vocab-sized weights are padded per TP size (384 rows at TP1, 512 at TP2): compare the real ones
        n = min(x.shape[0], y.shape[0])
        return float((x[:n] - y[:n]).abs().max())

    moved = max(diff(wa[k], w0[k]) for k in wa)
    return max(diff(wa[k], wb[k]) for k in wa), moved


def test_model_stops_at_final_hidden_states(steps):
    _, res = steps
    assert res["hidden_shape"] == [SEQ, 2, 64]  # [s, b, h] of the tiny preset
    assert res["head_diff"] < 1e-5


def test_reference_pass_equals_materialised(steps):
    _, res = steps
    diff = (torch.tensor(res["ref_fused"]) - torch.tensor(res["ref_mat"])).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("objective", ["spin", "sft"])
def test_training_steps_equal_materialised(steps, objective):
    tmp, res = steps
    mat, fused = res[f"{objective}_mat"], res[f"{objective}_fused"]
    assert len(mat) == len(fused) == 2
    assert max(abs(a - b) for a, b in zip(mat, fused)) < 1e-5, (mat, fused)
    diff, moved = _weights_diff(tmp, f"{objective}_mat", f"{objective}_fused")
    assert moved > 1e-4  # the steps did something
    assert diff < 1e-5, diff


# ----------------------------------------------------------------------------- tensor parallelism

def _tp_worker(tmp: str) -> dict:
    """2 gloo ranks: the op at TP2 vs the fp64 oracle (full dh on both ranks, each rank's dW shard);
    then 2 fused SPIN steps at TP2 from the TP1 init checkpoint (compared with TP1 by the test)."""
    warnings.filterwarnings("ignore")
    from spin_mcore.config import ParallelConfig
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import train

    ps = init_distributed(ParallelConfig(tp=2), seed=1)
    errs = {}
    V = 96  # V_local = 48
    for vs in (None, 70, 40):  # no padding; rank 1 partly padding; rank 1 all padding
        hidden, weight, labels, mask, w_seq, w_tok = _case(9, 3, 16, V, seed=11, vocab_size=vs)
        labels[2, 0], labels[2, 1], mask[2, :2] = min(47, (vs or V) - 1), min(48, (vs or V) - 1), True  # shard edge
        lo, hi = ps.tp_rank * 48, (ps.tp_rank + 1) * 48
        _, _, dh_r, dw_r = _oracle(hidden, weight, labels, mask, vs, w_seq, w_tok)
        seq_r, tok_r, *_ = _oracle(hidden, weight, labels, mask, vs, w_seq, w_tok)
        out, dh, dw = _fused(hidden, weight[lo:hi], labels, mask, vs, w_seq, w_tok, ps.tp_group, chunk_tokens=5)
        key = f"vocab={vs}"
        errs[key + " seq"] = (out.seq_logps.double() - seq_r).abs().max().item()
        errs[key + " tok"] = (out.token_logps.double() - tok_r).abs().max().item()
        errs[key + " dh"] = (dh.double() - dh_r).abs().max().item()
        errs[key + " dw"] = (dw.double() - dw_r[lo:hi]).abs().max().item()
    tmp = Path(tmp)
    cfg = _cfg("train.fused_linear_logprobs=true", "parallel.tp=2")
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    train(cfg, pstate, [tmp / "ref_mat"], str(tmp / "init"), tmp / "spin_fused_tp2")
    return errs


def test_tp2_matches_fp64_and_tp1_step(steps):
    from spin_mcore.launcher import run_local

    tmp, res = steps
    for rank, errs in enumerate(run_local(_tp_worker, 2, str(tmp))):
        for key, err in errs.items():
            assert err <= 1e-5, f"rank {rank} {key}: max abs error {err:.3g}"
    losses = _first_losses(tmp / "spin_fused_tp2")
    assert max(abs(a - b) for a, b in zip(losses, res["spin_mat"])) < 1e-5, (losses, res["spin_mat"])
    diff, _ = _weights_diff(tmp, "spin_mat", "spin_fused_tp2")
    assert diff < 1e-5, diff


# ----------------------------------------------------------------------------- pipeline parallelism

def _pp_worker(tmp: str) -> None:
    """2 gloo ranks, PP2: the fused op runs on the last stage only, on the hidden states the pipeline sends there."""
    warnings.filterwarnings("ignore")
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import train

    tmp = Path(tmp)
    cfg = _cfg("train.fused_linear_logprobs=true", "parallel.pp=2")
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    train(cfg, pstate, [tmp / "ref_mat"], str(tmp / "init"), tmp / "spin_fused_pp2")


def test_pp2_step_equals_materialised_tp1(steps):
    from spin_mcore.launcher import run_local

    tmp, res = steps
    run_local(_pp_worker, 2, str(tmp))
    losses = _first_losses(tmp / "spin_fused_pp2")
    assert max(abs(a - b) for a, b in zip(losses, res["spin_mat"])) < 1e-5, (losses, res["spin_mat"])
    diff, _ = _weights_diff(tmp, "spin_mat", "spin_fused_pp2")
    assert diff < 1e-5, diff
