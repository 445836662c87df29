"""The in-process KV-cache engine on CUDA against transformers' ``generate`` on the same weights.

The model of tests/test_generation.py (a random 2-layer Llama, vocab 500 so TP padding columns exist,
peaked logits so greedy has clear winners), saved by transformers as safetensors and loaded into
Megatron with :func:`spin_mcore.models.hf_convert.load_hf_weights`. Five prompts of different lengths run
through the engine's continuous batching (2 slots) and through ``generate`` one by one. In fp32 (TF32
off) the greedy tokens must be identical; in bf16 the two stacks round differently, so the share of
identical continuations is reported, not required.
"""

from __future__ import annotations

from spin_mcore.acceptance.runner import Outcome, require_cuda

VOCAB, EOS, BOS = 500, 2, 1
PROMPT_LENS = (5, 11, 3, 17, 8)
MAX_NEW = 12


def hf_greedy_until(model, prompts: list[list[int]], stop: int, max_new: int, device=None) -> list[list[int]]:
    """transformers' greedy continuations of each prompt, stopping on ``stop`` (kept at the end, as y keeps EOS)."""
    import torch

    device = device or next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 eos_token_id=stop, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def prompts() -> list[list[int]]:
    """Five prompts of lengths PROMPT_LENS, BOS first."""
    import torch

    g = torch.Generator().manual_seed(7)
    return [[BOS] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in PROMPT_LENS]


def tiny_hf_llama(path, heads: int = 4):
    """The random LlamaForCausalLM of these checks (and tests/test_generation.py, tests/test_vllm_engine.py with
    ``heads=2``: head size 32, which vLLM's CPU attention takes), 2 KV heads, seeded, saved at ``path``;
    returns it (eval, CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _engine_tokens(hf_dir, recipe: str, pstate) -> list[list[int]]:
    from spin_mcore.config import load_config
    from spin_mcore.generation import SamplingParams, generate_tokens
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import load_hf_weights

    cfg = load_config(overrides=["model.preset=tiny", f"model.vocab_size={VOCAB}", "model.seq_length=64",
                                 f"precision.recipe={recipe}"])
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    load_hf_weights(model, pstate, hf_dir, cfg.model)
    out = generate_tokens(model.eval(), pstate, prompts(), SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                                          stop_ids=(EOS,)),
                          batch_size=2, progress=False, vocab_size=VOCAB)
    return [o[0] for o in out]


def engine_vs_transformers(pstate, work, recipes=("fp32", "bf16")) -> dict:
    """{recipe: (engine's greedy tokens, transformers' greedy tokens)} per prompt, on ``pstate.device``."""
    import torch

    hf_dir = work / "hf_tiny"
    hf = tiny_hf_llama(hf_dir).to(pstate.device)
    out = {}
    for recipe in recipes:
        ref = hf.to(torch.float32 if recipe == "fp32" else torch.bfloat16)
        out[recipe] = (_engine_tokens(hf_dir, recipe, pstate), hf_greedy_until(ref, prompts(), EOS, MAX_NEW))
    return out


def check_engine_greedy(ctx) -> Outcome:
    require_cuda()
    import torch

    from spin_mcore.acceptance.checks_platform import init_cuda_platform

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pstate, _ = init_cuda_platform(ctx)
    res = engine_vs_transformers(pstate, ctx.work)
    fp32, expected = res["fp32"]
    same = sum(a == b for a, b in zip(fp32, expected))
    same_bf16 = sum(a == b for a, b in zip(*res["bf16"]))
    figures = {"prompts": len(expected), "tokens": sum(map(len, expected)), "fp32_identical": same,
               "bf16_identical": same_bf16, "full_length_rows": sum(len(e) == MAX_NEW for e in expected)}
    ok = same == len(expected) and figures["tokens"] > 0
    first_bad = next((i for i, (a, b) in enumerate(zip(fp32, expected)) if a != b), None)
    detail = "" if first_bad is None else f"; prompt {first_bad}: engine {fp32[first_bad]} vs transformers {expected[first_bad]}"
    return Outcome(ok, f"fp32: {same}/{len(expected)} prompts identical to transformers ({figures['tokens']} tokens, "
                       f"continuous batching over 2 slots); bf16: {same_bf16}/{len(expected)} identical (reported){detail}",
                   figures)
