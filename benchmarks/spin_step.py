"""SPIN training-step throughput and peak memory on CPU: spin_mcore vs TRL's DPOTrainer.

    python benchmarks/spin_step.py [--quick | --size quick|full|large] [--threads 2]

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


def _records(s: dict) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = s["batch"] * s["steps"]
    ids = lambda k: torch.randint(3, s["vocab"], (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_id": i, "prompt_ids": ids(s["prompt"]), "real_ids": ids(s["response"]) + [EOS],
             "generated_ids": ids(s["response"]) + [EOS]} for i in range(n)]


def _text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids)


def prepare(work: Path, size: str) -> None:
    """theta_0 as an mcore checkpoint and an HF export, the pair stage, the text dataset and the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model
    from spin_mcore.utils.shards import ShardedStage

    s = SIZES[size]
    cfg = load_config(overrides=_overrides(s))
    pstate = init_distributed(cfg.parallel, seed=0)
    model = setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, work / "theta0", cfg.model)
    export_hf(model, pstate, work / "hf", cfg.model)

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, s["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(work / "tokenizer")

    records = _records(s)
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


def run_ours(work: Path, size: str, fused_linear: bool = False) -> dict:
    import gc

    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model

    s = SIZES[size]
    mem = PhaseMemory()
    mem.install()
    import spin_mcore.training.trainer as trainer  # after install: train() calls the wrapped functions

    cfg = load_config(overrides=_overrides(s) + [f"train.fused_linear_logprobs={str(fused_linear).lower()}"])
    pstate = init_distributed(cfg.parallel, seed=0)
    mem.mark("start (imports, process group)")
    t0 = time.perf_counter()
    mem.prefix = "reference: "
    ref_model = setup_model(cfg, pstate, str(work / "theta0"), wrap_ddp=False)
    ref_dir = work / ("ours_fused_ref" if fused_linear else "ours_ref")
    compute_reference_logprobs(cfg, ref_model, pstate, [work / "pairs"], ref_dir)
    mem.mark("reference pass")
    ref_seconds = time.perf_counter() - t0
    del ref_model  # the reference pass is its own stage: training holds one model
    gc.collect()
    mem.mark("model freed")
    mem.prefix = "train: "
    out_dir = work / ("ours_fused_train" if fused_linear else "ours_train")
    summary = trainer.train(cfg, pstate, [ref_dir], str(work / "theta0"), out_dir)
    mem.prefix = ""
    mem.mark("end")
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [x["step_seconds"] for x in steps][s["warmup"]:]
    return {"step_seconds": statistics.median(times), "reference_pass_seconds": ref_seconds,
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
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=data,
                         callbacks=[Timer()])
    setup_seconds = time.perf_counter() - t0
    sample = trainer.train_dataset[0]
    lengths = {k: len(v) for k, v in sample.items() if k.endswith("input_ids") or k.endswith("ids")}
    trainer.train()
    return {"step_seconds": statistics.median(times[s["warmup"]:]), "setup_seconds": setup_seconds,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "token_lengths": lengths, "reference_resident": trainer.ref_model is not None}


def side_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.side == "prepare":
        prepare(work, args.size)
        out = {}
    elif args.side in ("ours", "ours_fused"):
        out = run_ours(work, args.size, fused_linear=args.side == "ours_fused")
    else:
        out = run_trl(work, args.size, precompute=args.side == "trl_pre")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _run_side(side: str, work: Path, size: str, threads: int, same_heap: bool = False) -> dict:
    env = dict(os.environ, SPIN_MCORE_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if same_heap:  # every side gets the glibc setting our trainer makes itself (utils/heap.py), so RSS compares models
        from spin_mcore.utils.heap import DEFAULT_THRESHOLD

        env["MALLOC_MMAP_THRESHOLD_"] = str(DEFAULT_THRESHOLD)
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--size", size, "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark side {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny size (CI smoke); default is the 'full' size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="model/batch size (default 'full'; --quick = 'quick'; 'large' = issue 13's hidden 512, seq 512)")
    parser.add_argument("--same-heap", action="store_true",
                        help="run the TRL sides with the fixed glibc mmap threshold our trainer sets itself "
                             "(MALLOC_MMAP_THRESHOLD_), to separate the allocator's share of the RSS ratio from the models'")
    parser.add_argument("--sides", default="ours,trl_live,trl_pre",
                        help="comma list of ours, ours_fused (train.fused_linear_logprobs=true), trl_live, trl_pre; "
                             "the ratio summary needs the default three, other lists print each side's JSON")
    args = parser.parse_args()
    if args.side:
        return side_main(args)

    import tempfile

    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick contradicts --size {args.size}")
    size = args.size or ("quick" if args.quick else "full")
    s = SIZES[size]
    tokens_per_step = 2 * s["batch"] * (s["prompt"] + s["response"] + 1)
    with tempfile.TemporaryDirectory(prefix="spin_step_") as tmp:
        work = Path(tmp)
        _run_side("prepare", work, size, args.threads)
        res = {side: _run_side(side, work, size, args.threads, args.same_heap) for side in args.sides.split(",")}
    if "ours" in res:
        print(f"{'our phase':44s} {'RSS MB':>9s} {'peak RSS MB':>12s}")
        for row in res["ours"]["memory_phases"]:
            print(f"{row['phase']:44s} {row['rss_mb']:9.1f} {row['peak_rss_mb']:12.1f}")
    if not {"ours", "trl_live", "trl_pre"} <= set(res):
        print(json.dumps(res))
        return
    for name, r in res.items():
        r["tokens_per_s"] = tokens_per_step / r["step_seconds"]
        print(f"{name:9s} step {r['step_seconds'] * 1e3:8.1f} ms  {r['tokens_per_s']:9.1f} tokens/s  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB  reference model resident during training: {r['reference_resident']}  "
              f"loss {r['first_loss']:.5f} -> {r['final_loss']:.5f}")
    ours, live, pre = res["ours"], res["trl_live"], res["trl_pre"]
    summary = {
        "size": size, "same_heap": args.same_heap, "model": {k: s[k] for k in ("hidden", "layers", "vocab")},
        "pairs_per_step": s["batch"],
        "seq_len": s["prompt"] + s["response"] + 1, "threads": args.threads, "tokens_per_step": tokens_per_step,
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "trl_live_tokens_per_s": round(live["tokens_per_s"], 1),
        "trl_precomputed_tokens_per_s": round(pre["tokens_per_s"], 1),
        "speedup_vs_trl_live": round(ours["tokens_per_s"] / live["tokens_per_s"], 3),
        "speedup_vs_trl_precomputed": round(ours["tokens_per_s"] / pre["tokens_per_s"], 3),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "trl_live_peak_rss_mb": round(live["peak_rss_mb"], 1),
        "trl_precomputed_peak_rss_mb": round(pre["peak_rss_mb"], 1),
        "rss_ratio_vs_trl_live": round(ours["peak_rss_mb"] / live["peak_rss_mb"], 3),
        "rss_ratio_vs_trl_precomputed": round(ours["peak_rss_mb"] / pre["peak_rss_mb"], 3),
        "ours_reference_pass_seconds": round(ours["reference_pass_seconds"], 3),
        "reference_resident": {"ours": ours["reference_resident"], "trl_live": live["reference_resident"],
                               "trl_precomputed": pre["reference_resident"]},
        "step0_loss": {"ours": ours["first_loss"], "trl_live": live["first_loss"], "trl_precomputed": pre["first_loss"]},
        "trl_token_lengths": live.get("token_lengths"),
        "ours_memory_phases": ours["memory_phases"],
    }
    if "ours_fused" in res:  # the same step with train.fused_linear_logprobs=true
        fused = res["ours_fused"]
        summary.update({"ours_fused_tokens_per_s": round(fused["tokens_per_s"], 1),
                        "fused_step_time_ratio": round(fused["step_seconds"] / ours["step_seconds"], 3),
                        "ours_fused_peak_rss_mb": round(fused["peak_rss_mb"], 1),
                        "fused_rss_ratio_vs_trl_live": round(fused["peak_rss_mb"] / live["peak_rss_mb"], 3),
                        "fused_step0_loss": fused["first_loss"]})
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
