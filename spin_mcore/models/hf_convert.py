"""HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` safetensors <-> Megatron-Core ``GPTModel`` weights.

One table (:func:`_stage_entries`) names, for each parameter of this rank's
stage, its HF source tensor(s) and how it is split across TP:

=========================  ============================================  ==========
Megatron (local name)      HF                                            TP split
=========================  ============================================  ==========
embedding.word_embeddings  model.embed_tokens                            vocab rows (padded)
layers.i.input_layernorm   model.layers.L.input_layernorm                replicated
layers.i...linear_qkv      model.layers.L.self_attn.{q,k,v}_proj         query groups
layers.i...linear_proj     model.layers.L.self_attn.o_proj               input dim
layers.i.pre_mlp_layernorm model.layers.L.post_attention_layernorm       replicated
layers.i.mlp.linear_fc1    model.layers.L.mlp.{gate,up}_proj             [gate_r; up_r]
layers.i.mlp.linear_fc2    model.layers.L.mlp.down_proj                  input dim
decoder.final_layernorm    model.norm                                    replicated
output_layer               lm_head                                       vocab rows (padded)
=========================  ============================================  ==========

``L`` is the global layer index (``layer_number - 1``), so a PP stage reads only
its own layers. Megatron's fused QKV weight is laid out per query group as
``[q (heads_per_group * head_dim); k (head_dim); v (head_dim)]`` and a TP rank
holds a contiguous run of groups. The vocab is padded with zero rows up to
``padded_vocab_size``; export drops them. Both formats use the same (half-split,
"rotate_half") RoPE convention, so Q/K need no permutation. ``config.json`` is
mapped both ways by :mod:`spin_mcore.hf_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from spin_mcore.config import ModelConfig
from spin_mcore.models.checkpoint import bare_chunks, publish_dir, shared_tmp_dir, unwrap_model
from spin_mcore.models.integrity import check_safetensors
from spin_mcore.hf_config import check_hf_config_matches, hf_config_dict
from spin_mcore.utils.io import remove_stale_tmp

HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
# Buffers some older HF checkpoints store; they are recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# Files copied next to an export so TensorRT-LLM / vLLM / transformers find the tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")


class HFWeightsError(ValueError):
    """The HF checkpoint does not match the architecture: missing/extra tensors or wrong shapes."""


def _hf_layer(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclasses.dataclass(frozen=True)
class _Dims:
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, m: ModelConfig) -> "_Dims":
        return cls(m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
                   m.hidden_size // m.num_attention_heads, m.vocab_size, m.num_layers)


def expected_hf_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Llama/Mistral checkpoint of this architecture holds, with its shape."""
    d = _Dims.of(model_cfg)
    shapes = {HF_EMBED: (d.vocab, d.hidden), HF_NORM: (d.hidden,), HF_LM_HEAD: (d.vocab, d.hidden)}
    for layer in range(d.layers):
        p = _hf_layer(layer)
        shapes.update({
            p + "input_layernorm.weight": (d.hidden,),
            p + "self_attn.q_proj.weight": (d.heads * d.head_dim, d.hidden),
            p + "self_attn.k_proj.weight": (d.groups * d.head_dim, d.hidden),
            p + "self_attn.v_proj.weight": (d.groups * d.head_dim, d.hidden),
            p + "self_attn.o_proj.weight": (d.hidden, d.heads * d.head_dim),
            p + "post_attention_layernorm.weight": (d.hidden,),
            p + "mlp.gate_proj.weight": (d.ffn, d.hidden),
            p + "mlp.up_proj.weight": (d.ffn, d.hidden),
            p + "mlp.down_proj.weight": (d.hidden, d.ffn),
        })
    return shapes


# ----------------------------------------------------------------------------- reading safetensors


class SafetensorsDir:
    """Lazy, slice-wise reader of an HF safetensors directory (one file, or sharded with an index).

    Only headers are read up front; :meth:`slice` returns a safetensors slice that
    reads just the requested rows/columns from disk.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (self.path / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shard files that do not exist: {', '.join(absent[:5])}")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors weights found")
        for f in files:  # a cut or overwritten file: one line naming it, not the Rust reader's error
            check_safetensors(self.path / f, checkpoint=self.path)
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():
                self._where[name] = f

    def names(self) -> set[str]:
        return set(self._where)

    def slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self.slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise HFWeightsError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]


def _fmt(names: list[str], limit: int = 6) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_hf_checkpoint(hf_dir: str | Path, model_cfg: ModelConfig) -> SafetensorsDir:
    """Open ``hf_dir`` and check it against ``model_cfg``: its config.json, then tensor names and shapes (headers only).

    Raises ``ConfigError`` when the config computes something else than ``model_cfg``
    (RoPE, norm epsilon, sliding window; see :func:`check_hf_config_matches`), and
    :class:`HFWeightsError` naming the missing, unexpected or mis-shaped tensors.
    Both are one line. Returns the open reader.
    """
    check_hf_config_matches(hf_dir, model_cfg)
    reader = SafetensorsDir(hf_dir)
    expected = expected_hf_shapes(model_cfg)
    present = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    missing = set(expected) - present
    if missing:
        raise HFWeightsError(f"{hf_dir}: missing tensors: {_fmt(list(missing))}")
    extra = present - set(expected)
    if extra:
        raise HFWeightsError(f"{hf_dir}: unexpected tensors (not part of a {model_cfg.num_layers}-layer "
                             f"Llama/Mistral): {_fmt(list(extra))}")
    wrong = [f"{n} has {list(reader.shape(n))}, expected {list(s)}" for n, s in expected.items() if reader.shape(n) != s]
    if wrong:
        raise HFWeightsError(f"{hf_dir}: shape mismatch vs config (hidden={model_cfg.hidden_size}, "
                             f"heads={model_cfg.num_attention_heads}, kv_heads={model_cfg.num_query_groups}, "
                             f"ffn={model_cfg.ffn_hidden_size}, vocab={model_cfg.vocab_size}): {'; '.join(wrong[:4])}")
    return reader


def hf_checkpoint_dtype(hf_dir: str | Path) -> torch.dtype:
    """The dtype of ``model.embed_tokens.weight`` in an HF checkpoint (the checkpoint's storage dtype)."""
    return SafetensorsDir(hf_dir).dtype(HF_EMBED)


# ----------------------------------------------------------------------------- the name/split table


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str            # local Megatron parameter name
    kind: str            # vocab | replicated | qkv | fc1 | row
    hf: tuple[str, ...]  # HF tensor names, in the order the kind expects


def _pick(params: dict, *candidates: str) -> str:
    """The first candidate that is a parameter (local spec vs Transformer Engine spec names)."""
    for c in candidates:
        if c in params:
            return c
    raise KeyError(f"model has none of the parameters {candidates}; unsupported layer spec")


def _stage_entries(core, params: dict) -> list[_Entry]:
    """The table of the module docstring for this rank's stage, in HF checkpoint order."""
    entries: list[_Entry] = []
    if core.pre_process:
        entries.append(_Entry("embedding.word_embeddings.weight", "vocab", (HF_EMBED,)))
    for i, layer in enumerate(core.decoder.layers):
        hf, mc = _hf_layer(layer.layer_number - 1), f"decoder.layers.{i}."
        entries += [
            # Transformer Engine fuses the norms into the next linear (layer_norm_weight).
            _Entry(_pick(params, mc + "input_layernorm.weight", mc + "self_attention.linear_qkv.layer_norm_weight"),
                   "replicated", (hf + "input_layernorm.weight",)),
            _Entry(mc + "self_attention.linear_qkv.weight", "qkv",
                   tuple(hf + f"self_attn.{x}_proj.weight" for x in "qkv")),
            _Entry(mc + "self_attention.linear_proj.weight", "row", (hf + "self_attn.o_proj.weight",)),
            _Entry(_pick(params, mc + "pre_mlp_layernorm.weight", mc + "mlp.linear_fc1.layer_norm_weight"),
                   "replicated", (hf + "post_attention_layernorm.weight",)),
            _Entry(mc + "mlp.linear_fc1.weight", "fc1", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")),
            _Entry(mc + "mlp.linear_fc2.weight", "row", (hf + "mlp.down_proj.weight",)),
        ]
    if core.post_process:
        entries.append(_Entry("decoder.final_layernorm.weight", "replicated", (HF_NORM,)))
        entries.append(_Entry("output_layer.weight", "vocab", (HF_LM_HEAD,)))
    return entries


# ----------------------------------------------------------------------------- HF -> Megatron


def _read_shard(reader: SafetensorsDir, e: _Entry, d: _Dims, tp: int, r: int, padded_vocab: int) -> torch.Tensor:
    """This TP rank's part of the Megatron tensor for ``e``, read slice-wise from disk (HF dtype)."""
    if e.kind == "replicated":
        return reader.slice(e.hf[0])[:]
    if e.kind == "row":  # RowParallelLinear: split the input (column) dim
        n = reader.shape(e.hf[0])[1] // tp
        return reader.slice(e.hf[0])[:, r * n:(r + 1) * n]
    if e.kind == "vocab":  # [padded_vocab / tp, hidden]; rows >= vocab stay zero
        rows = padded_vocab // tp
        start, stop = r * rows, min((r + 1) * rows, d.vocab)
        out = torch.zeros(rows, d.hidden, dtype=reader.dtype(e.hf[0]))
        if start < stop:
            out[: stop - start] = reader.slice(e.hf[0])[start:stop]
        return out
    if e.kind == "fc1":  # [gate_r; up_r]: Megatron chunks the local fc1 output in two
        n = d.ffn // tp
        return torch.cat([reader.slice(name)[r * n:(r + 1) * n] for name in e.hf])
    if e.kind == "qkv":
        g = d.groups // tp  # query groups on this rank
        hpg = d.heads // d.groups
        q = reader.slice(e.hf[0])[r * g * hpg * d.head_dim:(r + 1) * g * hpg * d.head_dim]
        k = reader.slice(e.hf[1])[r * g * d.head_dim:(r + 1) * g * d.head_dim]
        v = reader.slice(e.hf[2])[r * g * d.head_dim:(r + 1) * g * d.head_dim]
        fused = torch.cat([q.view(g, hpg * d.head_dim, d.hidden), k.view(g, d.head_dim, d.hidden),
                           v.view(g, d.head_dim, d.hidden)], dim=1)  # [g, (hpg + 2) * hd, hidden]
        return fused.reshape(-1, d.hidden)
    raise AssertionError(e.kind)


def load_hf_weights(model, pstate, hf_dir: str | Path, model_cfg: ModelConfig) -> None:
    """Fill this rank's stage of ``model`` (bare or DDP-wrapped ``GPTModel``) from an HF safetensors dir.

    Reads only this stage's layers and this TP rank's slices. Tensors are cast to the
    model's parameter dtype. Raises :class:`HFWeightsError` (one line, naming the
    tensors) for missing, unexpected or mis-shaped tensors, before touching the model.
    Call before building a distributed optimizer (it copies the weights at construction).
    """
    from spin_mcore.models.gpt import padded_vocab_size

    reader = check_hf_checkpoint(hf_dir, model_cfg)
    core = unwrap_model(model)
    params = dict(core.named_parameters())
    d = _Dims.of(model_cfg)
    padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, pstate.tp)
    entries = _stage_entries(core, params)
    unmapped = set(params) - {e.name for e in entries}
    if unmapped:
        raise HFWeightsError(f"model parameters without an HF source: {_fmt(list(unmapped))}")
    with torch.no_grad():
        for e in entries:
            shard = _read_shard(reader, e, d, pstate.tp, pstate.tp_rank, padded)
            param = params[e.name]
            if tuple(shard.shape) != tuple(param.shape):
                raise HFWeightsError(f"{e.name}: built shard {list(shard.shape)} from {', '.join(e.hf)} "
                                     f"but the model parameter is {list(param.shape)}")
            param.copy_(shard.to(param.dtype))


# ----------------------------------------------------------------------------- Megatron -> HF


def _gather_tp(t: torch.Tensor, pstate) -> list[torch.Tensor]:
    """All TP shards of ``t`` (in TP-rank order); the caller concatenates along the split dim."""
    if pstate.tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(pstate.tp)]
    dist.all_gather(parts, t.contiguous(), group=pstate.tp_group)
    return parts


def _to_hf(e: _Entry, local: torch.Tensor, pstate, d: _Dims) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs for one table entry; collective over the TP group."""
    if e.kind == "replicated":
        yield e.hf[0], local
    elif e.kind == "row":
        yield e.hf[0], torch.cat(_gather_tp(local, pstate), dim=1)
    elif e.kind == "vocab":
        yield e.hf[0], torch.cat(_gather_tp(local, pstate))[: d.vocab]
    elif e.kind == "fc1":
        parts = _gather_tp(local, pstate)
        n = d.ffn // pstate.tp
        yield e.hf[0], torch.cat([p[:n] for p in parts])
        yield e.hf[1], torch.cat([p[n:] for p in parts])
    elif e.kind == "qkv":
        hpg = d.heads // d.groups
        fused = torch.cat(_gather_tp(local, pstate)).view(d.groups, hpg + 2, d.head_dim, d.hidden)
        yield e.hf[0], fused[:, :hpg].reshape(-1, d.hidden)
        yield e.hf[1], fused[:, hpg].reshape(-1, d.hidden)
        yield e.hf[2], fused[:, hpg + 1].reshape(-1, d.hidden)
    else:
        raise AssertionError(e.kind)


def _rank_table(model) -> tuple[dict, list[_Entry]]:
    """(parameters by name, table entries) of this rank's stage, every chunk of it: with virtual stages
    each chunk's names carry its index (``chunk<i>.``); its layers keep their global HF names."""
    chunks = bare_chunks(model)
    params: dict = {}
    entries: list[_Entry] = []
    for i, core in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        own = dict(core.named_parameters())
        params.update({prefix + k: v for k, v in own.items()})
        entries += [dataclasses.replace(e, name=prefix + e.name) for e in _stage_entries(core, own)]
    return params, entries


def _hf_tensors(params: dict, entries: list[_Entry], pstate, d: _Dims, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full CPU tensor) for ``entries`` in order; collective over the TP group."""
    with torch.no_grad():
        for e in entries:
            for name, full in _to_hf(e, params[e.name].detach(), pstate, d):
                yield name, full.to(device="cpu", dtype=dtype or full.dtype).contiguous().clone()


def gather_hf_stage(model, pstate, model_cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """This PP stage's weights as full (TP-merged, vocab-unpadded) HF tensors on the CPU.

    Collective over the TP group; every TP rank gets the same dict. ``dtype`` casts
    (default: keep the parameter dtype). Keys are in HF checkpoint order. Holds the
    whole stage in memory; :func:`export_hf` streams file by file instead.
    """
    params, entries = _rank_table(model)
    return dict(_hf_tensors(params, entries, pstate, _Dims.of(model_cfg), dtype))


def _plan_files(entries: list[_Entry], shapes: dict, itemsize: int, max_bytes: int) -> list[list[_Entry]]:
    """Split this stage's entries, in order, into files of at most ``max_bytes`` (an entry is never split).

    Sizes come from the HF shapes, so every TP rank computes the same plan without any data.
    """
    files: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = sum(math.prod(shapes[n]) for n in e.hf) * itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += nbytes
    return [f for f in files if f]


def export_hf(model, pstate, out_dir: str | Path, model_cfg: ModelConfig, dtype: Optional[torch.dtype] = None, *,
              hf_config_base: Optional[dict] = None, tokenizer_dir: Optional[str | Path] = None,
              max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write this model as an HF safetensors checkpoint loadable by ``AutoModelForCausalLM``. Collective.

    ``model``: this rank's stage, bare or DDP-wrapped, one ``GPTModel`` or the ``ModelChunks`` of its
    virtual stages (the trainer's layout). Each PP stage's first TP rank (of DP replica 0) writes its own files, gathering
    one file's tensors at a time over TP, so no rank holds more than ``max_shard_bytes``
    of merged weights. Rank 0 writes ``config.json`` (see :func:`hf_config_dict`) and,
    when there is more than one file, ``model.safetensors.index.json``. The directory
    appears atomically (written as ``out_dir.tmp-*``, then renamed; an existing one is
    replaced). ``dtype`` casts the weights (default: the parameter dtype).
    ``tokenizer_dir``: a directory whose tokenizer files are copied alongside. Returns ``out_dir``.
    """
    from megatron.core import parallel_state as mps
    from safetensors.torch import save_file

    out_dir = Path(out_dir).absolute()
    params, entries = _rank_table(model)
    dtype = dtype or next(iter(params.values())).dtype
    d = _Dims.of(model_cfg)
    shapes = expected_hf_shapes(model_cfg)
    files = _plan_files(entries, shapes,
                        torch.empty((), dtype=dtype).element_size(), max_shard_bytes)
    writer = pstate.tp_rank == 0 and pstate.dp_rank == 0 and mps.get_context_parallel_rank() == 0
    # Every rank learns every writer's plan, so file numbering is global and deterministic.
    mine = [[n for e in f for n in e.hf] for f in files] if writer else []
    plans: list = [None] * dist.get_world_size()
    dist.all_gather_object(plans, (pstate.pp_rank, mine))
    stages = sorted((p for p in plans if p[1]), key=lambda p: p[0])
    total = sum(len(stage_files) for _, stage_files in stages)
    names, weight_map, first = [], {}, 0
    for pp_rank, stage_files in stages:
        if pp_rank == pstate.pp_rank:
            first = len(names)
        for tensor_names in stage_files:
            fname = "model.safetensors" if total == 1 else f"model-{len(names) + 1:05d}-of-{total:05d}.safetensors"
            names.append(fname)
            weight_map.update({n: fname for n in tensor_names})

    if pstate.rank == 0:  # a killed earlier export's DIR.tmp-*/DIR.old-*, cleared before this one's tmp name exists
        remove_stale_tmp(out_dir.parent, out_dir.name)
    tmp = shared_tmp_dir(out_dir)
    if pstate.rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    for k, entries in enumerate(files):
        tensors = dict(_hf_tensors(params, entries, pstate, d, dtype))  # collective over TP
        if writer:
            save_file(tensors, str(tmp / names[first + k]), metadata={"format": "pt"})
        del tensors
    if pstate.rank == 0:
        if total > 1:
            total_size = sum(math.prod(shapes[n]) for n in weight_map) * torch.empty((), dtype=dtype).element_size()
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, dtype, hf_config_base), indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / fname).is_file():
                    shutil.copy2(Path(tokenizer_dir) / fname, tmp / fname)
    dist.barrier()
    if pstate.rank == 0:
        publish_dir(tmp, out_dir)
    dist.barrier()
    return out_dir
