"""SPIN training steps on CUDA with Megatron's local layer spec (no Transformer Engine) in bf16.

The same calls as one SPIN iteration (spin_mcore.loop): the policy built once with a seeded init
(:func:`~spin_mcore.training.trainer.build_policy`), its reference pass over random pairs
(:func:`~spin_mcore.training.reference.compute_reference_logprobs`), then :func:`~spin_mcore.training.trainer.train`
on that same resident model. At step 0 the policy equals the reference, so the loss is ln 2 within
:data:`spin_mcore.training.loss.BF16_STEP0_LOSS_TOL`.

Size: Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV groups, FFN 8192, vocab 128,256) at
2048 tokens, 16 pairs (32 rows) per step: about 5e14 model FLOPs a step, a second or two on an H200.
``--quick``: 4 layers at 1024 tokens, 8 pairs a step. Model FLOPs per token: spin_mcore.plan.throughput
(6 x (GEMM weights + causal attention + output layer), no recompute), against the 989 TFLOP/s dense bf16
peak of :data:`spin_mcore.plan.throughput.GPUS` ``["h200"]``.
"""

from __future__ import annotations

import json
import math
import statistics
import time

from spin_mcore.acceptance.runner import Outcome, require_cuda

SIZES = {
    "full": dict(layers=16, hidden=2048, ffn=8192, heads=32, groups=8, vocab=128256, seq=2048, batch=16, micro=4, steps=4),
    "quick": dict(layers=4, hidden=2048, ffn=8192, heads=32, groups=8, vocab=128256, seq=1024, batch=8, micro=4, steps=3),
}
EOS = 2


def overrides(size: dict, device: str = "cuda") -> list[str]:
    return [f"model.num_layers={size['layers']}", f"model.hidden_size={size['hidden']}",
            f"model.ffn_hidden_size={size['ffn']}", f"model.num_attention_heads={size['heads']}",
            f"model.num_query_groups={size['groups']}", f"model.vocab_size={size['vocab']}",
            f"model.seq_length={size['seq']}", "model.rope_theta=500000.0",
            f"precision.recipe={'bf16' if device == 'cuda' else 'fp32'}", f"platform.device={device}",
            f"train.global_batch_size={size['batch']}", f"train.micro_batch_size={size['micro']}",
            f"train.max_steps={size['steps']}", "train.lr=[0.000001]", "train.warmup_fraction=0.0", "spin.beta=[0.1]",
            "train.save_interval=1000000", f"generation.shard_size={size['batch'] * size['steps']}"]


def pair_records(size: dict, seed: int = 0) -> list[dict]:
    """Random pairs whose rows fill the context: prompt + response + EOS = seq_length tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    response = size["seq"] // 8
    prompt = size["seq"] - response - 1

    def ids(k):
        return torch.randint(3, size["vocab"], (k,), generator=g).tolist()

    return [{"prompt_id": i, "prompt_ids": ids(prompt), "real_ids": ids(response) + [EOS],
             "generated_ids": ids(response) + [EOS]} for i in range(size["batch"] * size["steps"])]


def spin_steps(size: dict, work, device: str = "cuda") -> dict:
    """Build, score and train as one SPIN iteration does, at ``size``, on ``device``; returns the figures.

    bf16 on CUDA, fp32 on the CPU (where tests run it at a tiny size). Call once per process (it
    initialises the process group and Megatron's parallel state).
    """
    import torch

    from spin_mcore.config import load_config
    from spin_mcore.models.chunks import model_chunks
    from spin_mcore.plan.memory import ModelShape
    from spin_mcore.plan.throughput import GPUS, model_flops_per_token
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import build_policy, train
    from spin_mcore.utils.shards import ShardedStage

    cfg = load_config(overrides=overrides(size, device))
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    pairs = work / "pairs"
    stage = ShardedStage(pairs, "generation", "gpu-acceptance")
    stage.write_shard(0, pair_records(size))
    stage.finalize()

    t0 = time.perf_counter()
    model = build_policy(cfg, pstate, None)
    build_s = time.perf_counter() - t0
    core = model_chunks(model)[0]
    attention = type(core.decoder.layers[0].self_attention.core_attention).__name__
    params = sum(p.numel() for p in core.parameters())
    t0 = time.perf_counter()
    compute_reference_logprobs(cfg, model, pstate, [pairs], work / "ref")
    ref_s = time.perf_counter() - t0
    cuda = pstate.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg, pstate, [work / "ref"], None, work / "train", load_model=lambda: model)
    steps = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]

    timed = steps[1:] or steps  # the first step carries the warm-up (cuBLAS heuristics, allocator growth)
    tokens_per_s = statistics.median(float(s["tokens_per_s"]) for s in timed)
    flops_per_token = model_flops_per_token(ModelShape.from_config(cfg.model), size["seq"])
    loss0 = float(steps[0]["loss"])
    return {"layers": size["layers"], "hidden": size["hidden"], "seq": size["seq"], "pairs_per_step": size["batch"],
            "micro_batch": size["micro"], "precision": cfg.precision.recipe, "params_b": params / 1e9,
            "core_attention": attention, "step0_loss": loss0, "ln2_deviation": abs(loss0 - math.log(2)),
            "final_loss": float(steps[-1]["loss"]), "all_finite": all(math.isfinite(float(s["loss"])) for s in steps),
            "steps": summary["steps"], "skipped": summary["skipped_steps"],
            "step_s": statistics.median(float(s["step_seconds"]) for s in timed), "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
            "mfu_of_989": tokens_per_s * flops_per_token / (GPUS["h200"].bf16_tflops * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "build_s": build_s, "reference_pass_s": ref_s, "train_s": summary["seconds"]}


def check_spin_step(ctx) -> Outcome:
    require_cuda()
    from spin_mcore.training.loss import BF16_STEP0_LOSS_TOL

    size = SIZES["quick" if ctx.quick else "full"]
    f = spin_steps(size, ctx.work, "cuda")
    f["tolerance"] = BF16_STEP0_LOSS_TOL
    ok = f["ln2_deviation"] <= BF16_STEP0_LOSS_TOL and f["all_finite"] and f["skipped"] == 0 and \
        f["steps"] == size["steps"]
    line = (f"{f['params_b']:.2f}B params ({f['layers']} layers, h {f['hidden']}, {f['core_attention']}), {f['seq']} "
            f"tokens x {2 * f['pairs_per_step']} rows/step: step-0 loss {f['step0_loss']:.6f} (|loss - ln 2| "
            f"{f['ln2_deviation']:.1e}, tol {BF16_STEP0_LOSS_TOL}), {f['tokens_per_s']:,.0f} tokens/s, "
            f"{f['step_s']:.2f} s/step, {f['model_tflops_per_s']:.0f} TFLOP/s = {f['mfu_of_989']:.1%} of 989, "
            f"peak {f['peak_memory_gib']:.1f} GiB")
    return Outcome(ok, line, f)
