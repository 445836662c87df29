"""Test helpers: checkpoint reading without Megatron, random pair records, one-shard pair stages."""

from pathlib import Path

import torch


def checkpoint_weights(ckpt_dir) -> dict:
    """{name: full tensor} of ``ckpt_dir/model`` (torch_dist format), cached next to it as ``.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(str(ckpt_dir) + ".pt")
    if not out.exists():
        dcp_to_torch_save(str(Path(ckpt_dir) / "model"), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and "_extra_state" not in k}


def random_pair_records(n: int, seed: int = 0, vocab: int = 500) -> list[dict]:
    """``n`` random generation-stage records: prompt 3-6 tokens, real and generated responses 2-8 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_id": i, "prompt_ids": ids(3, 7), "real_ids": ids(2, 9), "generated_ids": ids(2, 9)} for i in range(n)]


def write_pair_stage(path, records: list[dict]) -> None:
    """A complete one-shard generation stage at ``path`` holding ``records``."""
    from spin_mcore.utils.shards import ShardedStage

    stage = ShardedStage(path, "generation", "test")
    stage.write_shard(0, records)
    stage.finalize()


SHIPPED_DATA = Path(__file__).resolve().parent.parent / "spin_mcore" / "demo_data" / "arith.jsonl"
TINY_VOCAB = 320


def tiny_model_overrides(vocab_size: int = TINY_VOCAB) -> list[str]:
    """A 2-layer, 32-wide Llama for loop-level tests (seconds per stage on 2 cores)."""
    return ["model.preset=tiny", "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=88",
            "model.num_attention_heads=4", "model.num_query_groups=2", f"model.vocab_size={vocab_size}",
            "model.seq_length=56", "model.make_vocab_size_divisible_by=64", "model.init_std=0.1"]


def save_random_theta0(out_dir, vocab_size: int = TINY_VOCAB) -> None:
    """Rank worker: a seeded random tiny model saved as an mcore checkpoint (theta_0 of loop tests)."""
    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    cfg = load_config(overrides=tiny_model_overrides(vocab_size))
    pstate = init_distributed(cfg.parallel, seed=0)
    save_model_checkpoint(build_gpt_model(cfg.model, pstate, cfg.precision), pstate, out_dir, cfg.model)


def make_tiny_data(root: Path, records: int = 240) -> tuple[Path, Path]:
    """The first ``records`` demo records as ``root/arith.jsonl`` and a SentencePiece tokenizer trained on
    them. Returns (root, tokenizer.model path)."""
    import json

    from spin_mcore.data.templates import format_prompt
    from spin_mcore.data.tokenizer import train_sentencepiece

    lines = SHIPPED_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:records]
    (root / "arith.jsonl").write_text("".join(lines), encoding="utf-8")
    recs = [json.loads(line) for line in lines]
    tok = train_sentencepiece([format_prompt(r["prompt"], "instruction") + r["response"] for r in recs],
                              root / "tokenizer", vocab_size=TINY_VOCAB, seed=0)
    return root, tok


def make_tiny_spin_inputs(root: Path, records: int = 240) -> tuple[Path, Path]:
    """:func:`make_tiny_data` plus a random theta_0 under ``root``. Returns (root, tokenizer.model path)."""
    from spin_mcore.launcher import run_local

    root, tok = make_tiny_data(root, records)
    run_local(save_random_theta0, 1, str(root / "theta0"), TINY_VOCAB)
    return root, tok


def hf_greedy_until(model, prompts: list[list[int]], stop: int, max_new: int) -> list[list[int]]:
    """transformers' greedy continuations of each prompt, stopping on ``stop`` (kept at the end, as y keeps EOS);
    the same function the one-GPU acceptance run compares the engine with on CUDA."""
    from spin_mcore.acceptance.checks_engine import hf_greedy_until as greedy

    return greedy(model, prompts, stop, max_new)


def hf_logp(model, prompt: list[int], gen: list[int]) -> float:
    """log p(gen | prompt) under the unscaled model (fp64 log-softmax of the fp32 logits)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1:-1].double()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None]).sum())
