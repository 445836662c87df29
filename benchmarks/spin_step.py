"""SPIN training-step throughput and peak memory on CPU: spin_mcore vs TRL's DPOTrainer.

    python benchmarks/spin_step.py [--quick | --size quick|full|large] [--lengths uniform|mixed] [--repeats N]
                                   [--threads 2] [--sides ...] [--profile FILE]

Both sides train the identical tiny Llama (our weights, exported to HF safetensors and
loaded by ``LlamaForCausalLM``) on the same pairs (same token ids: a word-level tokenizer
maps "t17" to id 17), with the same batch (B pairs per step, chosen and rejected stacked
into 2B rows), the same sequence lengths (no padding: every row is prompt + response + eos),
fp32, RMSprop, the sigmoid (= SPIN logistic) loss. Each side runs in its own subprocess so
its peak RSS (ru_maxrss) is its own. Timed: the median optimizer-step wall time after the
warm-up steps; tokens/s = non-pad tokens of the 2B rows per step / that time.

    ours      spin_mcore: reference log-probs precomputed by the reference pass (timed separately),
              one model resident during training.
    trl_live  DPOTrainer(ref_model=<a second LlamaForCausalLM>): reference forward every step.
    trl_pre   DPOTrainer(precompute_ref_log_probs=True, ref_model=None): reference log-probs computed
              once by the policy before training (precompute time reported separately).

Our side also reports RSS per phase (current and peak-so-far after model build, checkpoint load,
reference pass, DDP buffers, optimizer, and within the first training steps after the forward
activations, the logits, the log-prob buffers, backward and the optimizer step). The benchmark
wraps the functions ``train()`` calls to read the RSS at those boundaries; the code measured is
unchanged.

``--lengths mixed`` (issue 22): every prompt, chosen and rejected response gets its own length from a
seeded long-tailed mix (:func:`mixed_lengths`), so TRL's padded batches carry padding and our
``train.pack_sequences=true`` side (``ours_packed``) can show what packing saves. Tokens/s then counts real
(non-pad) tokens on every side: the epoch's real tokens / the epoch's step time (the first step, which
carries one-time set-up, counted at the median of the others). The pad fraction is what TRL's policy forward
actually received (a forward pre-hook counts ``input_ids`` and ``attention_mask``).

Every side runs ``--repeats`` times alternately (A B A B ..., benchmarks/bench_stats.py); the JSON gives
each side's median and spread, each ratio's range, and says when the ranges overlap. It also records the
machine (CPU, flags, threads, torch capability, load before/after), the model FLOPs per real token (attention
included), each side's achieved FLOP/s, and the fp32 matmul FLOP/s measured in the same run at the step's
largest GEMM (the output layer over a micro-batch's tokens): the share of that ceiling.

The last line of output is JSON with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # name: (hidden, ffn, layers, heads, kv groups, vocab, prompt len, response len, pairs per step, steps, warmup)
    "quick": dict(hidden=64, ffn=176, layers=2, heads=4, groups=2, vocab=512, prompt=16, response=15, batch=4, steps=6, warmup=2),
    "full": dict(hidden=256, ffn=704, layers=4, heads=8, groups=4, vocab=4096, prompt=64, response=63, batch=8, steps=10, warmup=3),
    # issue 13's realistic small size: seq 512 = 255 + 256 + eos; a step is ~6 s (ours) to ~30 s (TRL live) on 2 cores.
    "large": dict(hidden=512, ffn=1408, layers=8, heads=8, groups=4, vocab=8192, prompt=255, response=256, batch=4, steps=5, warmup=2),
}
EOS = 2  # token id of "</s>"; ids 0/1 are <pad>/<unk>
LR, BETA = 1e-6, 0.1


def _overrides(s: dict) -> list[str]:
    seq = s["prompt"] + s["response"] + 1  # + eos; tokens = full[:-1] has exactly this many positions
    return [f"model.num_layers={s['layers']}", f"model.hidden_size={s['hidden']}", f"model.ffn_hidden_size={s['ffn']}",
            f"model.num_attention_heads={s['heads']}", f"model.num_query_groups={s['groups']}",
            f"model.vocab_size={s['vocab']}", f"model.seq_length={seq}", "train.optimizer=rmsprop",
            f"train.global_batch_size={s['batch']}", f"train.micro_batch_size={s['batch']}", f"train.max_steps={s['steps']}",
            f"train.lr=[{LR:.10f}]", "train.warmup_fraction=0.0", f"spin.beta=[{BETA}]", "train.save_interval=1000000",
            f"generation.shard_size={s['batch'] * s['steps']}", "parallel.distributed_optimizer=false"]


def mixed_lengths(n: int, cap: int, median_fraction: float, seed: int) -> list[int]:
    """``n`` seeded lengths in [2, cap]: log-normal with median ``median_fraction * cap`` and sigma 0.8, clipped.

    A long tail (p90 about 2.8x the median) like chat data: most turns are short, a few reach the cap. Padded
    to a batch's longest, such lengths leave roughly half of a batch as padding.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.lognormal(np.log(median_fraction * cap), 0.8, n)
    return [int(v) for v in np.clip(np.rint(x), 2, cap)]


def _records(s: dict, lengths: str = "uniform") -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = s["batch"] * s["steps"]
    ids = lambda k: torch.randint(3, s["vocab"], (k,), generator=g).tolist()  # noqa: E731
    if lengths == "uniform":
        pl, rl, gl = [s["prompt"]] * n, [s["response"]] * n, [s["response"]] * n
    else:  # prompt and both responses drawn independently; the longest fits seq_length exactly
        pl = mixed_lengths(n, s["prompt"], 0.25, 1)
        rl = mixed_lengths(n, s["response"], 0.3, 2)
        gl = mixed_lengths(n, s["response"], 0.3, 3)
    return [{"prompt_id": i, "prompt_ids": ids(pl[i]), "real_ids": ids(rl[i]) + [EOS],
             "generated_ids": ids(gl[i]) + [EOS]} for i in range(n)]


def real_lengths(records: list[dict]) -> list[int]:
    """Token count of every sequence (prompt + response + eos), chosen and rejected, in record order."""
    return [len(r["prompt_ids"]) + len(r[k]) for r in records for k in ("real_ids", "generated_ids")]


def _text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids)


def end_samples_at_eos(model, eos: int, mean_tokens: float, seed: int = 0) -> dict:
    """Give a randomly initialised model an SFT model's stopping behaviour: P(eos) ~ 1 / ``mean_tokens`` per step.

    A random model almost never samples eos, so every response runs to max_new_tokens, where no real theta_0 goes
    (an SFT model ends its answers at eos, at lengths like its data's). Hidden dimension 0 of every token embedding
    is set to 1 (the residual stream then carries a near-constant component that the final RMSNorm keeps), and
    eos's output row reads only that dimension, scaled so that the mean eos probability over random contexts is
    1 / mean_tokens: response lengths become roughly geometric with that mean. The other tokens stay near uniform.
    Changes ``model`` (a Megatron GPTModel, untied output layer) in place; returns the calibration.
    """
    import torch

    from spin_mcore.generation.engine import unwrap_gpt

    gpt = unwrap_gpt(model)
    emb, out = gpt.embedding.word_embeddings.weight, gpt.output_layer.weight  # [V, h] each
    if emb.data_ptr() == out.data_ptr():
        raise ValueError("end_samples_at_eos needs an untied output layer")
    with torch.no_grad():
        emb[:, 0] = 1.0
        out[eos] = 0.0
        out[eos, 0] = 1.0
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, emb.shape[0], (4, 128), generator=g)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        was = gpt.training
        gpt.eval()
        logits = gpt(ids, pos, attention_mask=None).float()  # [b, s, V]
        gpt.train(was)
        h0 = logits[..., eos].flatten()  # eos's logit at scale 1: the normalised dimension 0
        rest = torch.cat([logits[..., :eos], logits[..., eos + 1:]], -1).logsumexp(-1).flatten()
        lo, hi = 0.0, 10.0
        for _ in range(60):  # mean P(eos) grows with the scale: bisect for 1 / mean_tokens
            a = (lo + hi) / 2
            lo, hi = (a, hi) if torch.sigmoid(a * h0 - rest).mean() < 1.0 / mean_tokens else (lo, a)
        out[eos, 0] = a
    return {"eos_scale": round(a, 4), "mean_eos_probability": round(1.0 / mean_tokens, 5)}


def prepare(work: Path, size: str, lengths: str = "uniform", eos_mean: bool = False, steps: int | None = None) -> None:
    """theta_0 as an mcore checkpoint and an HF export, the pair stage, the text dataset and the tokenizer.

    ``eos_mean``: theta_0 ends its samples at eos after as many tokens, on average, as the records' rejected
    responses have (:func:`end_samples_at_eos`; ``iteration.py``, which samples from theta_0). ``steps``
    replaces the size's step count: ``steps * batch`` records.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model
    from spin_mcore.utils.shards import ShardedStage

    s = dict(SIZES[size], **({"steps": steps} if steps else {}))
    cfg = load_config(overrides=_overrides(s))
    pstate = init_distributed(cfg.parallel, seed=0)
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    records = _records(s, lengths)
    if eos_mean:
        mean = sum(len(r["generated_ids"]) for r in records) / len(records)  # eos included
        (work / "theta0_eos.json").write_text(json.dumps(end_samples_at_eos(model, EOS, mean)))
    save_model_checkpoint(model, pstate, work / "theta0", cfg.model)
    export_hf(model, pstate, work / "hf", cfg.model)

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, s["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(work / "tokenizer")

    (work / "lengths.json").write_text(json.dumps(real_lengths(records)))
    stage = ShardedStage(work / "pairs", "generation", "bench")
    stage.write_shard(0, records)
    stage.finalize()
    rows = [{"prompt": _text(r["prompt_ids"]), "chosen": " " + _text(r["real_ids"]),
             "rejected": " " + _text(r["generated_ids"])} for r in records]
    (work / "dpo.json").write_text(json.dumps(rows))


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS so far) of this process in MB."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseMemory:
    """RSS at phase boundaries of our side, read by wrapping the functions ``train()`` calls."""

    STEPS = 2  # step 1 creates the optimizer state; step 2 is the steady state

    def __init__(self):
        self.rows: list[dict] = []
        self.prefix = ""
        self.step = 0

    def mark(self, phase: str) -> None:
        cur, peak = _rss_mb()
        self.rows.append({"phase": self.prefix + phase, "rss_mb": round(cur, 1), "peak_rss_mb": round(peak, 1)})

    def in_step(self) -> bool:
        return 1 <= self.step <= self.STEPS

    def install(self) -> None:
        import megatron.core.distributed as mdist

        import spin_mcore.models.checkpoint as ckpt
        import spin_mcore.models.gpt as gpt
        import spin_mcore.training.optimizer as opt
        import spin_mcore.training.step as step
        import spin_mcore.training.trainer as trainer

        def after(fn, phase, when=lambda: True):
            def wrapped(*a, **k):
                out = fn(*a, **k)
                if when():
                    self.mark(phase)
                return out
            return wrapped

        gpt.build_gpt_chunks = after(gpt.build_gpt_chunks, "model build")
        ckpt.load_model_checkpoint = after(ckpt.load_model_checkpoint, "checkpoint load")
        mdist.DistributedDataParallel = _ddp_marking(mdist.DistributedDataParallel, self)
        step.sequence_logps = after(step.sequence_logps, "log-prob buffers", self.in_step)

        def build_optimizer(*a, **k):
            optimizer = opt_build(*a, **k)
            self.mark("optimizer built")
            prepare, step_ready = optimizer.prepare_grads, optimizer.step_with_ready_grads

            def prepare_grads():
                if self.in_step():
                    self.mark("backward")
                return prepare()
            optimizer.prepare_grads = prepare_grads
            optimizer.step_with_ready_grads = after(step_ready, "optimizer step (state)", self.in_step)
            return optimizer
        opt_build = opt.build_optimizer
        opt.build_optimizer = build_optimizer

        def train_step(model, *a, **k):
            self.step += 1
            self.prefix = f"step {self.step}: " if self.in_step() else ""
            if self.step == 1:
                for module in (m for c in _modules_of(model) for n, m in c.named_modules() if n.endswith("output_layer")):
                    module.register_forward_pre_hook(lambda *_: self.mark("forward activations") if self.in_step() else None)
                    module.register_forward_hook(lambda *_: self.mark("logits") if self.in_step() else None)
            try:
                return step_fn(model, *a, **k)
            finally:
                self.prefix = ""
        step_fn = trainer.train_step
        trainer.train_step = train_step


def _ddp_marking(cls, mem: PhaseMemory):
    class Marking(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            mem.mark("DDP buffers")
    return Marking


def _modules_of(model):
    from spin_mcore.models.chunks import model_chunks

    return model_chunks(model)


def _epoch_seconds(times: list[float]) -> float:
    """One epoch's step time, the first step (one-time set-up: optimizer state, allocator growth) counted at the
    median of the rest."""
    rest = times[1:] or times
    return sum(rest) + statistics.median(rest)


def _install_profile(path: str, step_no: int = 3) -> None:
    """torch.profiler over our ``step_no``-th training step; the op table (self CPU time) and the ops by input
    shape go to ``path``."""
    import torch.profiler as tp

    import spin_mcore.training.trainer as trainer

    step_fn, count = trainer.train_step, [0]

    def train_step(*a, **k):
        count[0] += 1
        if count[0] != step_no:
            return step_fn(*a, **k)
        with tp.profile(activities=[tp.ProfilerActivity.CPU], record_shapes=True) as prof:
            out = step_fn(*a, **k)
        # the op table, then the same ops by input shape: [S, 1, heads, 64] muls are RoPE, [S, 1, 1408] SwiGLU,
        # [S, 1, 512] RMSNorm and residuals, 1-D ones the optimizer
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40,
                                                                    max_name_column_width=40)
        Path(path).write_text(table + "\n\nBy input shape:\n" + shapes)
        return out
    trainer.train_step = train_step


def run_ours(work: Path, size: str, fused_linear: bool = False, packed: bool = False, profile: str | None = None) -> dict:
    import gc

    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model

    s = SIZES[size]
    mem = PhaseMemory()
    mem.install()
    if profile:
        _install_profile(profile)
    import spin_mcore.training.trainer as trainer  # after install: train() calls the wrapped functions

    cfg = load_config(overrides=_overrides(s) + [f"train.fused_linear_logprobs={str(fused_linear).lower()}",
                                                 f"train.pack_sequences={str(packed).lower()}"])
    pstate = init_distributed(cfg.parallel, seed=0)
    # Megatron's save-results queue (a spawned process that imports torch, once per process) is started now
    # and waited for: train() would start it beside its first steps, which --quick's millisecond steps feel
    from spin_mcore.models.checkpoint import await_save_queue, prestart_save_queue

    prestart_save_queue()
    await_save_queue()
    mem.mark("start (imports, process group)")
    t0 = time.perf_counter()
    mem.prefix = "reference: "
    ref_model = setup_model(cfg, pstate, str(work / "theta0"), wrap_ddp=False)
    tag = "ours_fused" if fused_linear else "ours_packed" if packed else "ours"
    ref_dir = work / f"{tag}_ref"
    import shutil

    for stale in (ref_dir, work / f"{tag}_train"):  # a repeat must run, not resume the previous run's outputs
        shutil.rmtree(stale, ignore_errors=True)
    compute_reference_logprobs(cfg, ref_model, pstate, [work / "pairs"], ref_dir)
    mem.mark("reference pass")
    ref_seconds = time.perf_counter() - t0
    del ref_model  # the reference pass is its own stage: training holds one model
    gc.collect()
    mem.mark("model freed")
    mem.prefix = "train: "
    out_dir = work / f"{tag}_train"
    summary = trainer.train(cfg, pstate, [ref_dir], str(work / "theta0"), out_dir)
    mem.prefix = ""
    mem.mark("end")
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    all_times = [x["step_seconds"] for x in steps]
    times = all_times[s["warmup"]:]
    return {"step_seconds": statistics.median(times), "epoch_seconds": _epoch_seconds(all_times),
            "reference_pass_seconds": ref_seconds,
            "first_loss": steps[0]["loss"], "final_loss": summary["final"]["loss"], "reference_resident": False,
            "memory_phases": mem.rows}


def run_trl(work: Path, size: str, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    s = SIZES[size]
    tok = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    policy = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    ref = None if precompute else LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    data = Dataset.from_list(json.loads((work / "dpo.json").read_text()))
    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen["on"] = True
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = DPOConfig(output_dir=str(work / ("trl_pre" if precompute else "trl_live")), per_device_train_batch_size=s["batch"],
                     gradient_accumulation_steps=1, max_steps=s["steps"], learning_rate=LR, lr_scheduler_type="constant",
                     beta=BETA, loss_type=["sigmoid"], optim="rmsprop", use_cpu=True, report_to=[], logging_steps=1,
                     save_strategy="no", max_length=s["prompt"] + s["response"] + 1, precompute_ref_log_probs=precompute,
                     dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     # TRL >= 0.2x defaults bf16=True: on CPU that is autocast to bf16 through torch's scalar
                     # fallback GEMM (minutes a step), and not the fp32 our side runs.
                     bf16=False, fp16=False)
    seen = {"on": False, "positions": 0, "real": 0}

    def count_tokens(module, args, kwargs):  # what TRL's padded batches hand the policy, training steps only
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if seen["on"] and ids is not None:
            seen["positions"] += ids.numel()
            seen["real"] += int(mask.sum()) if mask is not None else ids.numel()
    policy.register_forward_pre_hook(count_tokens, with_kwargs=True)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=data,
                         callbacks=[Timer()])
    setup_seconds = time.perf_counter() - t0
    sample = trainer.train_dataset[0]
    lengths = {k: len(v) for k, v in sample.items() if k.endswith("input_ids") or k.endswith("ids")}
    trainer.train()
    pad = 1 - seen["real"] / seen["positions"] if seen["positions"] else None
    return {"step_seconds": statistics.median(times[s["warmup"]:]), "epoch_seconds": _epoch_seconds(times),
            "pad_fraction": pad, "positions": seen["positions"], "real_positions": seen["real"],
            "setup_seconds": setup_seconds,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "token_lengths": lengths, "reference_resident": trainer.ref_model is not None}


SIDES = ("ours", "ours_packed", "ours_fused", "trl_live", "trl_pre")


def side_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.side == "prepare":
        prepare(work, args.size, args.lengths)
        out = {}
    elif args.side.startswith("ours"):
        out = run_ours(work, args.size, fused_linear=args.side == "ours_fused", packed=args.side == "ours_packed",
                       profile=args.profile)
    else:
        out = run_trl(work, args.size, precompute=args.side == "trl_pre")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _run_side(side: str, work: Path, size: str, threads: int, same_heap: bool = False, lengths: str = "uniform",
              profile: str | None = None) -> dict:
    env = dict(os.environ, SPIN_MCORE_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if same_heap:  # every side gets the glibc setting our trainer makes itself (utils/heap.py), so RSS compares models
        from spin_mcore.utils.heap import DEFAULT_THRESHOLD

        env["MALLOC_MMAP_THRESHOLD_"] = str(DEFAULT_THRESHOLD)
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--size", size, "--threads", str(threads),
           "--lengths", lengths] + (["--profile", profile] if profile else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark side {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize_runs(runs: dict[str, list[dict]], total_tokens: int, train_flops: float, ceiling: dict) -> dict:
    """Per side: tokens/s (real tokens / epoch seconds), peak RSS and achieved FLOP/s, each as median and spread
    over the alternating runs; ``train_flops`` = 3 x the forward model FLOPs of the epoch's real tokens."""
    out = {}
    best = ceiling["flops_per_s_best"]
    for name, rs in runs.items():
        tps = [total_tokens / r["epoch_seconds"] for r in rs]
        flops = [train_flops / r["epoch_seconds"] for r in rs]
        out[name] = {"tokens_per_s": bench_stats.summarize(tps), "peak_rss_mb": bench_stats.summarize([r["peak_rss_mb"] for r in rs]),
                     "achieved_flops_per_s": bench_stats.summarize(flops),
                     "ceiling_share": statistics.median(flops) / best,
                     "step0_loss": rs[0]["first_loss"], "reference_resident": rs[0]["reference_resident"]}
        if rs[0].get("pad_fraction") is not None:
            out[name]["pad_fraction"] = rs[0]["pad_fraction"]
    return out


def _r(x: float, n: int = 3) -> float:
    return round(x, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny size (CI smoke); default is the 'full' size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="model/batch size (default 'full'; --quick = 'quick'; 'large' = issue 13's hidden 512, seq 512)")
    parser.add_argument("--lengths", default="uniform", choices=("uniform", "mixed"),
                        help="uniform: every sequence prompt + response + eos long (no padding); mixed: a seeded "
                             "long-tailed mix of prompt and response lengths (see mixed_lengths)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating runs per side (A B A B ...); default 3 for large, 2 otherwise")
    parser.add_argument("--same-heap", action="store_true",
                        help="run the TRL sides with the fixed glibc mmap threshold our trainer sets itself "
                             "(MALLOC_MMAP_THRESHOLD_), to separate the allocator's share of the RSS ratio from the models'")
    parser.add_argument("--sides", default=None,
                        help="comma list of " + ", ".join(SIDES) + " (default: ours,trl_live,trl_pre for uniform "
                             "lengths, ours_packed,ours,trl_live,trl_pre for mixed)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also run our side once more (packed under mixed lengths) with torch.profiler over "
                             "its third step and write the op table to FILE")
    args = parser.parse_args()
    if args.side:
        return side_main(args)

    import tempfile

    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick contradicts --size {args.size}")
    size = args.size or ("quick" if args.quick else "full")
    repeats = args.repeats or (3 if size == "large" else 2)
    sides = (args.sides or ("ours_packed,ours,trl_live,trl_pre" if args.lengths == "mixed" else "ours,trl_live,trl_pre")).split(",")
    bad = [x for x in sides if x not in SIDES]
    if bad:
        parser.error(f"--sides: unknown side {bad[0]!r} (choose from {', '.join(SIDES)})")
    s = SIZES[size]
    seq = s["prompt"] + s["response"] + 1
    machine = bench_stats.machine_info(args.threads)
    # The step's largest GEMM: the output layer over one micro-batch's padded tokens (2B rows x seq).
    gemm = (2 * s["batch"] * seq, s["hidden"], s["vocab"])
    ceilings = [bench_stats.matmul_flops(*gemm, threads=args.threads)]
    with tempfile.TemporaryDirectory(prefix="spin_step_") as tmp:
        work = Path(tmp)
        _run_side("prepare", work, size, args.threads, lengths=args.lengths)
        lengths = json.loads((work / "lengths.json").read_text())

        def side_fn(name):
            return lambda: _run_side(name, work, size, args.threads, args.same_heap, args.lengths)

        def show(name, r, res):
            print(f"run {r + 1}/{repeats} {name:11s} epoch {res['epoch_seconds']:7.2f} s  peak RSS {res['peak_rss_mb']:7.1f} MB",
                  flush=True)
        runs = bench_stats.alternate({name: side_fn(name) for name in sides}, repeats, show)
        profile_rows = None
        if args.profile:
            _run_side("ours_packed" if args.lengths == "mixed" else "ours", work, size, args.threads,
                      lengths=args.lengths, profile=str(Path(args.profile).resolve()))
            profile_rows = str(args.profile)
    ceilings.append(bench_stats.matmul_flops(*gemm, threads=args.threads))
    ceiling = max(ceilings, key=lambda c: c["flops_per_s_best"])
    bench_stats.finish_machine_info(machine)
    total_tokens = sum(lengths)
    fwd = bench_stats.llama_forward_flops(lengths, s["hidden"], s["ffn"], s["layers"], s["heads"], s["groups"], s["vocab"])
    per_side = summarize_runs(runs, total_tokens, 3 * fwd, ceiling)
    if "ours" in runs:
        print(f"{'our phase (first run)':44s} {'RSS MB':>9s} {'peak RSS MB':>12s}")
        for row in runs["ours"][0]["memory_phases"]:
            print(f"{row['phase']:44s} {row['rss_mb']:9.1f} {row['peak_rss_mb']:12.1f}")
    for name, r in per_side.items():
        t, m = r["tokens_per_s"], r["peak_rss_mb"]
        print(f"{name:11s} {t['median']:9.1f} tokens/s (spread {t['spread']:.0%})  peak RSS {m['median']:7.1f} MB  "
              f"{r['achieved_flops_per_s']['median'] / 1e9:6.2f} GFLOP/s = {r['ceiling_share']:.0%} of the matmul ceiling  "
              f"step-0 loss {r['step0_loss']:.5f}")
    print(f"matmul ceiling {gemm}: {ceiling['flops_per_s_best'] / 1e9:.2f} GFLOP/s (best), "
          f"{ceiling['flops_per_s_median'] / 1e9:.2f} (median)")
    ours_name = "ours_packed" if args.lengths == "mixed" and "ours_packed" in runs else "ours"
    ratios = {}
    for a in [x for x in ("ours", "ours_packed", "ours_fused") if x in runs]:
        for b in [x for x in ("trl_live", "trl_pre") if x in runs] + (["ours"] if a != "ours" and "ours" in runs else []):
            tps = bench_stats.compare([total_tokens / r["epoch_seconds"] for r in runs[a]],
                                      [total_tokens / r["epoch_seconds"] for r in runs[b]])
            rss = bench_stats.compare([r["peak_rss_mb"] for r in runs[a]], [r["peak_rss_mb"] for r in runs[b]])
            ratios[f"{a}/{b}"] = {"tokens_per_s": {k: (_r(v) if isinstance(v, float) else v) for k, v in tps.items()},
                                  "peak_rss": {k: (_r(v) if isinstance(v, float) else v) for k, v in rss.items()}}
            print(f"{a}/{b}: tokens/s {bench_stats.fmt_ratio(tps)}  peak RSS {bench_stats.fmt_ratio(rss)}")
    pad = next((r["pad_fraction"] for n, r in per_side.items() if n.startswith("trl") and "pad_fraction" in r), None)
    summary = {
        "benchmark": "spin_step", "size": size, "lengths": args.lengths, "repeats": repeats, "same_heap": args.same_heap,
        "model": {k: s[k] for k in ("hidden", "ffn", "layers", "heads", "groups", "vocab")},
        "pairs_per_step": s["batch"], "steps": s["steps"], "seq_len": seq, "threads": args.threads,
        "length_stats": bench_stats.length_stats(lengths), "real_tokens_per_epoch": total_tokens,
        "trl_pad_fraction": None if pad is None else _r(pad),
        "model_flops_per_real_token_forward": _r(fwd / total_tokens, 1),
        "matmul_ceiling": {"shape": list(gemm), "flops_per_s_best": _r(ceiling["flops_per_s_best"], 0),
                           "flops_per_s_median": _r(ceiling["flops_per_s_median"], 0)},
        "headline_side": ours_name,
        "sides": {n: {"tokens_per_s_median": _r(r["tokens_per_s"]["median"], 1),
                      "tokens_per_s_spread": _r(r["tokens_per_s"]["spread"]),
                      "tokens_per_s_runs": [_r(v, 1) for v in r["tokens_per_s"]["values"]],
                      "peak_rss_mb_median": _r(r["peak_rss_mb"]["median"], 1),
                      "peak_rss_mb_spread": _r(r["peak_rss_mb"]["spread"]),
                      "achieved_gflops_median": _r(r["achieved_flops_per_s"]["median"] / 1e9),
                      "ceiling_share": _r(r["ceiling_share"]),
                      "step0_loss": r["step0_loss"], "reference_resident": r["reference_resident"]}
                  for n, r in per_side.items()},
        "ratios": ratios,
        "machine": machine,
        "profile_file": profile_rows,
    }
    if "ours" in runs:
        summary["ours_memory_phases"] = runs["ours"][0]["memory_phases"]
    summary.update(issue22_targets(summary))
    print(json.dumps(summary))


def issue22_targets(summary: dict) -> dict:
    """Issue 22's target for this run's lengths, from its ratios ({} when a side it needs did not run).

    mixed: ``target_mixed``, ours packed >= 0.8 x 1/(1 - pad) x TRL precomputed tokens/s;
    uniform: ``target_uniform``, ours >= 1.25 x TRL live tokens/s and peak RSS <= 0.8 x TRL live.
    """
    head, ratios = summary["headline_side"], summary["ratios"]
    if summary["lengths"] == "mixed":
        pad = summary.get("trl_pad_fraction")
        got = ratios.get(f"{head}/trl_pre", {}).get("tokens_per_s")
        if pad is None or got is None:
            return {}
        want = 0.8 / (1 - pad)
        return {"target_mixed": {"needed_ratio_vs_trl_pre": _r(want), "ratio": got["ratio"],
                                 "met": got["ratio"] >= want, "met_at_worst_run": got["ratio_min"] >= want}}
    live = ratios.get(f"{head}/trl_live")
    if live is None:
        return {}
    speed, rss = live["tokens_per_s"], live["peak_rss"]
    return {"target_uniform": {"needed_ratio_vs_trl_live": 1.25, "ratio": speed["ratio"],
                               "met": speed["ratio"] >= 1.25, "met_at_worst_run": speed["ratio_min"] >= 1.25,
                               "rss_bound_vs_trl_live": 0.8, "rss_ratio": rss["ratio"],
                               "rss_met": rss["ratio"] <= 0.8, "rss_met_at_worst_run": rss["ratio_max"] <= 0.8}}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
