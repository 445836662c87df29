"""In-process batched decoding of a Megatron ``GPTModel`` with a preallocated KV cache.

Why not ``megatron.core.inference``: its ``StaticInferenceContext`` does run on the
CPU platform (checked with Megatron-Core 0.16.1, ``runtime_gather_output=True``),
but it keeps one ``sequence_len_offset`` for the whole batch, so prompts of
different lengths cannot decode side by side and a finished row cannot be
replaced. Its ``DynamicInferenceContext`` (paged cache, continuous batching)
needs CUDA kernels and flash-attn. So this module drives the model's own
Megatron submodules (embedding, fused QKV, RowParallel projections, MLP, output
layer: all TP collectives stay Megatron's) and only replaces the attention step
with one that reads a per-row KV cache, gpt-fast style:

* ``prefill``: a length bucket of waiting prompts, right-padded, causal attention
  over the prompt, K/V written into free cache rows, logits of each row's last
  prompt token only;
* ``decode_one_token``: one token for every active row at its own position;
* ``generate`` (continuous batching): active rows are kept as a prefix
  ``[0, n)`` of the cache; a finished row is swapped with the last active row so
  attention always reads a contiguous slice, and free rows are refilled from the
  length-sorted queue of waiting (prompt, sample) items.

Shapes (per TP rank): hidden [s, b, h] (Megatron's sequence-first layout), query
[s, b, np, hn], key/value [s, b, ng, hn], cache [layers, slots, ng, max_len, hn].
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from spin_mcore.generation.sampling import SamplingParams, gather_vocab_parallel, make_generator, sample_tokens


@dataclass
class GenerationStats:
    """Counts and timing of one :func:`generate_tokens` call."""

    prompts: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    prefill_calls: int = 0
    decode_steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Item:
    """One (prompt, sample) to generate."""

    prompt: int
    sample: int
    ids: list
    max_new: int
    generator: Optional[torch.Generator]
    out: list = field(default_factory=list)


def unwrap_gpt(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def _check_supported(gpt) -> None:
    """The engine re-implements the layer math of our Llama spec; refuse anything else loudly."""
    cfg = gpt.config
    if cfg.add_bias_linear or cfg.add_qkv_bias or not cfg.gated_linear_unit or cfg.num_moe_experts:
        raise NotImplementedError("the megatron generation engine supports the Llama/Mistral spec only "
                                  "(no linear biases, SwiGLU, dense MLP)")
    if (cfg.num_query_groups or cfg.num_attention_heads) < cfg.tensor_model_parallel_size:
        raise NotImplementedError("num_query_groups must be >= TP for the generation engine")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MegatronEngine:
    """KV-cache decoding for this rank's ``GPTModel`` (PP = 1, any TP)."""

    def __init__(self, model, pstate, slots: int, max_len: int, vocab_size: Optional[int] = None):
        gpt = unwrap_gpt(model)
        if pstate.pp != 1 or not (gpt.pre_process and gpt.post_process):
            raise NotImplementedError(
                "the in-process megatron generation engine needs parallel.pp=1 (use generation.backend=trtllm or vllm, "
                "or generate with a pp=1 layout)")
        if gpt.position_embedding_type != "rope":
            raise NotImplementedError(f"position_embedding_type={gpt.position_embedding_type!r}: only rope is supported")
        _check_supported(gpt)
        if max_len > gpt.max_sequence_length:
            raise ValueError(f"max_len={max_len} exceeds the model's seq_length={gpt.max_sequence_length}")
        self.gpt = gpt
        self.pstate = pstate
        self.vocab_size = vocab_size or gpt.vocab_size
        self.slots = slots
        self.max_len = max_len
        attn = gpt.decoder.layers[0].self_attention
        self.np = attn.num_attention_heads_per_partition
        self.ng = attn.num_query_groups_per_partition
        self.hn = attn.hidden_size_per_attention_head
        param = next(gpt.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers = len(gpt.decoder.layers)
        shape = (layers, slots, self.ng, max_len, self.hn)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # The model's own frequencies (llama3-scaled by build_gpt_model when configured), never recomputed here.
        freqs = gpt.rotary_pos_emb(max_len).reshape(max_len, -1).float()  # [max_len, hn]
        # Megatron casts cos/sin to the activation dtype before rotating; so do we.
        self.cos = freqs.cos().to(self.dtype)
        self.sin = freqs.sin().to(self.dtype)

    # ------------------------------------------------------------------ model pieces

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """t [s, b, heads, hn]; positions [s, b] int64."""
        cos = self.cos[positions].unsqueeze(2)  # [s, b, 1, hn]
        sin = self.sin[positions].unsqueeze(2)
        return t * cos + _rotate_half(t) * sin

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, row0: int, prefill: bool) -> torch.Tensor:
        """Run the layers on ids [b, s] at positions [b, s], reading/writing cache rows [row0, row0 + b).

        Prefill: the rows start empty, s = the padded prompt length. Decode: s = 1, each
        row at its own position. Returns the final-norm hidden states [s, b, h].
        The layer math is Megatron's (fused QKV per query group, SwiGLU ``[gate; up]``
        fc1) on the model's own weights, called with plain ``F.linear`` so one decode
        step is a few hundred cheap ops instead of Megatron's autograd-function calls.
        """
        b, s = ids.shape
        x = self.gpt.embedding(input_ids=ids, position_ids=positions)  # [s, b, h], TP-reduced
        pos_sb = positions.t()  # [s, b]
        rows = torch.arange(row0, row0 + b, device=ids.device)
        rep = self.np // self.ng
        if not prefill:
            length = int(positions.max()) + 1
            # [b, 1, 1, L]: a row attends to its own cached tokens and the new one.
            mask = (torch.arange(length, device=ids.device)[None, :] <= positions[:, :1]).view(b, 1, 1, length)
        for li, layer in enumerate(self.gpt.decoder.layers):
            attn, mlp = layer.self_attention, layer.mlp
            qkv = F.linear(self._norm(layer.input_layernorm, attn.linear_qkv, x), attn.linear_qkv.weight)  # [s, b, ng * (rep + 2) * hn]
            qkv = qkv.view(s, b, self.ng, (rep + 2) * self.hn)
            q, k, v = torch.split(qkv, [rep * self.hn, self.hn, self.hn], dim=-1)
            q = self._rope(q.reshape(s, b, self.np, self.hn), pos_sb).permute(1, 2, 0, 3)  # [b, np, s, hn]
            k = self._rope(k, pos_sb).permute(1, 2, 0, 3)  # [b, ng, s, hn]
            v = v.permute(1, 2, 0, 3)
            if prefill:
                self.k_cache[li, row0:row0 + b, :, :s] = k
                self.v_cache[li, row0:row0 + b, :, :s] = v
                # Right padding is harmless under a causal mask: real tokens never see it.
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
            else:
                pos = positions[:, 0]
                self.k_cache[li, rows, :, pos] = k[:, :, 0]  # [b, ng, hn] at each row's own position
                self.v_cache[li, rows, :, pos] = v[:, :, 0]
                kc = self.k_cache[li, row0:row0 + b, :, :length]  # [b, ng, L, hn]
                vc = self.v_cache[li, row0:row0 + b, :, :length]
                out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=rep > 1)
            out = out.permute(2, 0, 1, 3).reshape(s, b, self.np * self.hn)  # [s, b, np*hn]
            x = x + self._reduce(F.linear(out, attn.linear_proj.weight))  # RowParallel: sum over TP
            h = self._norm(layer.pre_mlp_layernorm, mlp.linear_fc1, x)
            gate, up = torch.chunk(F.linear(h, mlp.linear_fc1.weight), 2, dim=-1)
            x = x + self._reduce(F.linear(F.silu(gate) * up, mlp.linear_fc2.weight))
        return self.gpt.decoder.final_layernorm(x)

    def _norm(self, norm, linear, x: torch.Tensor) -> torch.Tensor:
        # Transformer Engine fuses the RMSNorm into the next linear (the norm module is an identity).
        weight = getattr(linear, "layer_norm_weight", None)
        if weight is not None:
            return F.rms_norm(x, (x.shape[-1],), weight, self.gpt.config.layernorm_epsilon)
        return norm(x)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.pstate.tp > 1:
            torch.distributed.all_reduce(t, group=self.pstate.tp_group)
        return t

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, h] -> full-vocab fp32 logits [b, vocab_size] (gathered over TP)."""
        local = F.linear(hidden, self.gpt.output_layer.weight)  # [b, padded_vocab / tp]
        return gather_vocab_parallel(local, self.vocab_size, self.pstate.tp_group)

    def prefill(self, prompts: list[list[int]], row0: int) -> torch.Tensor:
        """Encode prompts into cache rows [row0, row0 + len(prompts)); return last-token logits [k, vocab] fp32."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        s = int(lengths.max())
        ids = torch.zeros(len(prompts), s, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        positions = torch.arange(s, device=self.device).expand(len(prompts), s)
        hidden = self._forward(ids, positions, row0, prefill=True)  # [s, k, h]
        last = hidden[lengths - 1, torch.arange(len(prompts), device=self.device)]  # [k, h]
        return self._logits(last)

    def decode_one_token(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed one token per active row [0, n) at its position; return logits [n, vocab] fp32."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # [n, 1]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)
        hidden = self._forward(ids, pos, 0, prefill=False)  # [1, n, h]
        return self._logits(hidden[0])

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy cache row ``src`` (its first ``length`` positions) to row ``dst`` in every layer."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    # ------------------------------------------------------------------ the loop

    def generate(self, items: list[_Item], params: SamplingParams,
                 on_finish: Optional[Callable[[int], None]] = None) -> GenerationStats:
        """Continuous batching over ``items`` (outputs land in ``item.out``)."""
        stats = GenerationStats(prompt_tokens=sum(len(it.ids) for it in items), samples=len(items))
        # Length bucketing: longest first, so each prefill batch pads little and the attended
        # cache length shrinks as the run goes on. Ties keep input order (determinism).
        queue = deque(sorted(items, key=lambda it: (-len(it.ids), it.prompt, it.sample)))
        active: list[_Item] = []  # row i of the cache belongs to active[i]
        pos: list[int] = []       # next position to write for each active row
        stop = set(params.stop_ids)
        start = time.perf_counter()

        def sample(logits: torch.Tensor, rows: list[_Item]) -> list[int]:
            uniforms = None
            if not params.greedy:
                uniforms = torch.stack([torch.rand((), generator=it.generator, dtype=torch.float64) for it in rows])
            return sample_tokens(logits, params, uniforms).tolist()

        def done(it: _Item) -> bool:
            return it.out[-1] in stop or len(it.out) >= it.max_new

        def retire(finished_rows: list[int]) -> None:
            for i in sorted(finished_rows, reverse=True):
                last = len(active) - 1
                if on_finish is not None:
                    on_finish(len(active[i].out))
                if i != last:
                    self.move_row(last, i, pos[last])
                    active[i], pos[i] = active[last], pos[last]
                active.pop()
                pos.pop()

        with torch.inference_mode(), _fast_torch_calls(self.device):
            while queue or active:
                if queue and len(active) < self.slots:
                    new = [queue.popleft() for _ in range(min(self.slots - len(active), len(queue)))]
                    row0 = len(active)
                    logits = []
                    for group in length_buckets([len(it.ids) for it in new]):
                        logits.append(self.prefill([new[j].ids for j in group], row0 + group[0]))
                        stats.prefill_calls += 1
                    tokens = sample(torch.cat(logits), new)
                    for it, t in zip(new, tokens):
                        it.out.append(t)
                        active.append(it)
                        pos.append(len(it.ids))
                    stats.generated_tokens += len(new)
                    retire([row0 + j for j, it in enumerate(new) if done(it)])
                if not active:
                    continue
                logits = self.decode_one_token([it.out[-1] for it in active], pos)
                stats.decode_steps += 1
                for it, t in zip(active, sample(logits, active)):
                    it.out.append(t)
                stats.generated_tokens += len(active)
                pos = [p + 1 for p in pos]
                retire([i for i, it in enumerate(active) if done(it)])
        stats.seconds = time.perf_counter() - start
        return stats


def length_buckets(lengths: list[int], max_waste: float = 0.125, slack: int = 8) -> list[list[int]]:
    """Split consecutive indices of descending ``lengths`` into prefill groups.

    A group grows while the padding of its next member (group max - its length) stays
    within ``max(slack, max_waste * group max)`` tokens, so prefill FLOPs stay within
    ~12% of the unpadded cost.
    """
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups and lengths[groups[-1][0]] - n <= max(slack, max_waste * lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _fast_torch_calls(device: torch.device):
    """On the CPU platform, step outside the CUDA-emulation ``TorchFunctionMode`` for the decode loop.

    The emulation only rewrites CUDA device requests, which this engine never makes, and
    its per-op dispatch costs more than a small decode op itself.
    """
    import contextlib

    if device.type != "cpu":
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()


def generate_with_stats(model, pstate, prompts: list[list[int]], params: SamplingParams,
                        prompt_keys: Optional[list[str]] = None, batch_size: int = 16,
                        vocab_size: Optional[int] = None,
                        on_finish: Optional[Callable[[int], None]] = None) -> tuple[list[list[list[int]]], GenerationStats]:
    """:func:`generate_tokens` plus its :class:`GenerationStats`; ``on_finish(n_tokens)`` is called per finished sample."""
    gpt = unwrap_gpt(model)
    seq_length = gpt.max_sequence_length
    keys = list(prompt_keys) if prompt_keys is not None else [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts):
        raise ValueError(f"prompt_keys has {len(keys)} entries for {len(prompts)} prompts")
    items = []
    for p, (ids, key) in enumerate(zip(prompts, keys)):
        if len(ids) == 0:
            raise ValueError(f"prompt {key!r} is empty")
        if len(ids) >= seq_length:
            raise ValueError(f"prompt {key!r} has {len(ids)} tokens; the model's context is {seq_length} "
                             f"(truncate it, see generation.overlong_prompts)")
        max_new = min(params.max_new_tokens, seq_length - len(ids))
        for s in range(params.num_samples):
            gen = None if params.greedy else make_generator(params.seed, key, s)
            items.append(_Item(p, s, list(map(int, ids)), max_new, gen))
    outputs: list[list[list[int]]] = [[[] for _ in range(params.num_samples)] for _ in prompts]
    if not items:
        return outputs, GenerationStats()
    max_len = max(len(it.ids) + it.max_new for it in items)
    engine = MegatronEngine(model, pstate, slots=max(1, min(batch_size, len(items))), max_len=max_len,
                            vocab_size=vocab_size)
    was_training = gpt.training
    gpt.eval()
    try:
        stats = engine.generate(items, params, on_finish=on_finish)
    finally:
        gpt.train(was_training)
    stats.prompts = len(prompts)
    for it in items:
        outputs[it.prompt][it.sample] = it.out
    return outputs, stats


def generate_tokens(model, pstate, prompts: list[list[int]], params: SamplingParams,
                    prompt_keys: Optional[list[str]] = None, batch_size: int = 16, progress: bool = True,
                    vocab_size: Optional[int] = None) -> list[list[list[int]]]:
    """Generate ``params.num_samples`` continuations per prompt with the in-process engine.

    model: this rank's Megatron ``GPTModel`` (PP = 1; TP any: call on every TP rank with
    the same prompts). prompts: token ids per prompt. prompt_keys: stable ids that seed
    each (prompt, sample) stream (default: the prompt's index). vocab_size: the
    tokenizer's vocabulary; logits columns past it (TP padding) are never sampled
    (default: the model's padded vocab). Returns, per prompt and per sample, the
    generated ids without the prompt, ending with the stop token when one was hit.
    """
    from spin_mcore.utils.progress import TokenRateBar

    bar = TokenRateBar(len(prompts) * params.num_samples, "generate", enabled=progress and pstate.rank == 0)
    try:
        outputs, _ = generate_with_stats(model, pstate, prompts, params, prompt_keys, batch_size, vocab_size,
                                         bar.on_finish)
    finally:
        bar.close()
    return outputs
