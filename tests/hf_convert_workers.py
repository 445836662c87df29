"""Rank-side functions of tests/test_hf_convert.py, kept apart so spawned ranks do not import transformers."""

from __future__ import annotations

import warnings

import torch

IDS = torch.tensor([[0, 5, 299, 17, 128, 255, 3, 42, 256, 7, 1, 298],
                    [11, 12, 13, 200, 201, 202, 297, 150, 151, 9, 8, 127]])  # [b=2, s=12], ids near VOCAB-1


def _setup(hf_dir: str, tp: int, pp: int, seed: int = 0):
    from spin_mcore.config import ModelConfig, ParallelConfig, PrecisionConfig
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.hf_config import hf_config_to_fields
    from spin_mcore.platform import init_distributed

    model_cfg = ModelConfig(**hf_config_to_fields(hf_dir))
    pstate = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=seed)
    model = build_gpt_model(model_cfg, pstate, PrecisionConfig(recipe="fp32")).eval()
    return model_cfg, pstate, model


def _pipeline_logits(model, pstate, vocab: int, ids: torch.Tensor = IDS):
    """Full logits [b, s, vocab] of ``ids`` [b, s] on (last stage, TP rank 0), None elsewhere: stages run in
    order, hidden states [s, b, h] go stage to stage by send/recv, vocab shards are gathered over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    b, s = ids.shape
    with torch.no_grad():
        if not pstate.is_first_stage:
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, src=mps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, torch.arange(s).expand(b, s), attention_mask=None)
        if not pstate.is_last_stage:
            dist.send(out.contiguous(), dst=mps.get_pipeline_model_parallel_next_rank())
            return None
        parts = [torch.empty_like(out) for _ in range(pstate.tp)]
        dist.all_gather(parts, out.contiguous(), group=pstate.tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab].numpy() if pstate.tp_rank == 0 else None


def _hf_logits_at(hf_dir: str, tp: int, pp: int):
    from spin_mcore.models.hf_convert import load_hf_weights

    model_cfg, pstate, model = _setup(hf_dir, tp, pp)
    load_hf_weights(model, pstate, hf_dir, model_cfg)
    return _pipeline_logits(model, pstate, model_cfg.vocab_size)


def parity_worker(hf_dirs: dict, layouts: list) -> dict:
    """Logits of every (model, layout) after load_hf_weights; keys 'name@tpxpp'."""
    warnings.filterwarnings("ignore", category=UserWarning)
    out = {}
    for tp, pp in layouts:
        for name, hf_dir in hf_dirs.items():
            out[f"{name}@{tp}x{pp}"] = _hf_logits_at(hf_dir, tp, pp)
    return out


def reshard_worker(hf_dirs: dict, work: str) -> dict:
    """TP=2xPP=2 parity for both models; then for llama: save at 2x2, export at 2x2, and load the
    checkpoint into fresh differently-seeded models at 1x1, 2x1 and 1x2 (the rest of the 4 ranks is DP)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.models.checkpoint import load_model_checkpoint, save_model_checkpoint
    from spin_mcore.models.hf_convert import export_hf, load_hf_weights

    out = {f"{name}@2x2": _hf_logits_at(d, 2, 2) for name, d in hf_dirs.items()}
    hf_dir = hf_dirs["llama"]
    model_cfg, pstate, model = _setup(hf_dir, 2, 2)
    load_hf_weights(model, pstate, hf_dir, model_cfg)
    save_model_checkpoint(model, pstate, f"{work}/ckpt", model_cfg, extra={"iteration": 7})
    export_hf(model, pstate, f"{work}/export_2x2", model_cfg)
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        model_cfg, pstate, model = _setup(hf_dir, tp, pp, seed=100 + tp * 10 + pp)
        meta = load_model_checkpoint(model, pstate, f"{work}/ckpt")
        out[f"ckpt@{tp}x{pp}"] = _pipeline_logits(model, pstate, model_cfg.vocab_size)
        out["iteration"] = meta["iteration"]
    export_hf(model, pstate, f"{work}/export_1x2", model_cfg, max_shard_bytes=100_000)  # several files per stage
    # Saving over an existing checkpoint replaces it atomically.
    save_model_checkpoint(model, pstate, f"{work}/ckpt", model_cfg, extra={"iteration": 8})
    return out


def _load_checkpoint_model(ckpt: str, model_cfg, tp: int):
    from spin_mcore.config import ParallelConfig, PrecisionConfig
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    pstate = init_distributed(ParallelConfig(tp=tp), seed=0)
    model = build_gpt_model(model_cfg, pstate, PrecisionConfig(recipe="fp32")).eval()
    load_model_checkpoint(model, pstate, ckpt)
    return pstate, model


def rope_scaled_worker(ckpts: dict, ids: list, runs: list, exports: dict) -> dict:
    """For each (checkpoint name, tp) in ``runs`` (PP=1), with ``ids`` [b, s]: logits [b, s, vocab] of the
    model the checkpoint's metadata describes ('name@tp'); the generation engine's prefill logits of the
    last token [b, vocab] ('name@tp/engine'); and logits of the same weights with plain RoPE
    ('name@tp/plain', the sensitivity check). Values on rank 0, None elsewhere. ``exports`` maps a
    'name@tp' to a directory: that model is exported to HF there, as ``convert --to hf`` does."""
    import dataclasses

    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.generation.engine import MegatronEngine
    from spin_mcore.models.checkpoint import model_config_from_meta, read_checkpoint_meta
    from spin_mcore.models.hf_convert import export_hf

    ids = torch.tensor(ids)
    out = {}
    for name, tp in runs:
        meta = read_checkpoint_meta(ckpts[name])
        model_cfg = model_config_from_meta(meta)
        pstate, model = _load_checkpoint_model(ckpts[name], model_cfg, tp)
        out[f"{name}@{tp}"] = _pipeline_logits(model, pstate, model_cfg.vocab_size, ids)
        if f"{name}@{tp}" in exports:
            export_hf(model, pstate, exports[f"{name}@{tp}"], model_cfg, hf_config_base=meta.get("hf_config"))
        engine = MegatronEngine(model, pstate, slots=len(ids), max_len=ids.shape[1], vocab_size=model_cfg.vocab_size)
        with torch.inference_mode():
            last = engine.prefill([row.tolist() for row in ids], 0)  # gathered over TP
        out[f"{name}@{tp}/engine"] = last.numpy() if pstate.rank == 0 else None
        # The same weights with plain RoPE. Loading the checkpoint into such a model is refused
        # (its RoPE differs from the checkpoint's), so the weights are copied in memory.
        from spin_mcore.config import PrecisionConfig
        from spin_mcore.models.gpt import build_gpt_model

        plain = dataclasses.replace(model_cfg, rope_scaling=None)
        plain_model = build_gpt_model(plain, pstate, PrecisionConfig(recipe="fp32")).eval()
        plain_model.load_state_dict(model.state_dict())
        out[f"{name}@{tp}/plain"] = _pipeline_logits(plain_model, pstate, plain.vocab_size, ids)
    return out
