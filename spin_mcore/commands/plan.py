"""``spin-mcore plan``: which layout, how much memory, how many hours per SPIN iteration (no GPU needed).

    spin-mcore plan spin_mcore/configs/spin_llama3_70b.yaml --gpus 64 --gpu h100 precision.recipe=fp8
    spin-mcore plan model.preset=llama3-8b --gpus 8 --json

Takes the model, batch, precision, optimizer and generation settings from the config; ``--tp/--pp/--vp``
(all three, or none) fix a layout instead of searching. Everything is arithmetic on stated
assumptions (spin_mcore/plan/*); the output lists them.
"""

from __future__ import annotations

import json
import sys

from spin_mcore.commands.common import add_config_args, split_config_and_overrides


def run(args) -> int:
    from spin_mcore.config import ConfigError, load_config
    from spin_mcore.plan.memory import Layout, ModelShape, Precision
    from spin_mcore.plan.search import SpinWorkload, plan
    from spin_mcore.plan.stages import RESPONSE_SHARE, StageSettings
    from spin_mcore.plan.throughput import DEFAULT_EFFICIENCY, GPUS

    config, overrides = split_config_and_overrides(args)
    cfg = load_config(config, overrides)
    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu {args.gpu}: must be one of {', '.join(GPUS)}")
    gpu = GPUS[args.gpu]
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: must be >= 1")
    if args.fs_gbps <= 0:
        raise ConfigError(f"--fs-gbps {args.fs_gbps}: must be > 0")
    shape = ModelShape.from_config(cfg.model)
    precision = Precision.from_config(cfg.precision, gpu=True)
    if precision.recipe == "fp8" and gpu.fp8_tflops <= 0:
        raise ConfigError(f"precision.recipe=fp8: --gpu {args.gpu} ({gpu.name}) has no FP8 tensor cores")
    seq = args.seq_tokens or min(cfg.model.seq_length, cfg.data.max_prompt_length + cfg.data.max_response_length)
    # Mean response length: ~30% of the cap unless measured (issue 21's ~300 of 1,024 tokens; a shard at a
    # time then lasts as long as its longest sample, the cap, which is what its 30% busy share restates).
    new_tokens = max(1, round(RESPONSE_SHARE * cfg.generation.max_new_tokens))
    if args.measure_data:
        seq, new_tokens = measure_lengths(cfg)
        print(f"spin-mcore plan: measured from {cfg.data.path}: padded row length {seq} tokens, mean response "
              f"{new_tokens} tokens", file=sys.stderr)
    work = SpinWorkload(prompts=cfg.data.num_prompts or args.prompts, keep_previous=cfg.spin.keep_previous_iteration,
                        epochs=cfg.train.epochs, samples=cfg.generation.num_samples, new_tokens=new_tokens)
    fixed = None
    given = [args.tp, args.pp]
    if any(v is not None for v in given):
        if None in given:
            raise ConfigError("--tp and --pp: give both (and optionally --vp, --mbs) or neither")
        if args.gpus % (args.tp * args.pp):
            raise ConfigError(f"--gpus {args.gpus} is not divisible by --tp {args.tp} x --pp {args.pp}")
        fixed = Layout(tp=args.tp, pp=args.pp, dp=args.gpus // (args.tp * args.pp), vp=args.vp or 1,
                       micro_batch=args.mbs or cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size,
                       seq=seq, recompute=cfg.train.recompute, sequence_parallel=args.tp > 1)
    result = plan(shape, args.gpus, gpu, precision, cfg.train.optimizer, cfg.train.global_batch_size, seq,
                  args.efficiency or DEFAULT_EFFICIENCY, work, cfg.generation.backend, fixed=fixed, top=args.top,
                  min_headroom_gb=args.min_headroom_gb, settings=StageSettings.from_config(cfg, args.fs_gbps))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_plan(result, args.gpus, gpu.name))
    return 0 if result["best"] else 1


def measure_lengths(cfg, draws: int = 2000) -> tuple[int, int]:
    """(expected padded row length, mean response length) of ``cfg.data`` tokenised as training sees it.

    A micro-batch of ``train.micro_batch_size`` pairs has 2 x that many rows; each is padded to the
    longest, rounded up to 16 (``train.pad_to_longest``). The opponent's answer y' is not known before
    generation: it is assumed as long as a human answer drawn at random (an assumption). Seeded draws.
    """
    import random

    from spin_mcore.config import ConfigError
    from spin_mcore.data.prepare import prepare_sft_data

    if not cfg.data.path or not cfg.data.tokenizer:
        raise ConfigError("--measure-data needs data.path and data.tokenizer")
    prompts = prepare_sft_data(cfg.data).train
    rng = random.Random(cfg.train.seed)
    responses = [len(p.response_ids) for p in prompts]
    rows = 2 * cfg.train.micro_batch_size
    total = 0
    for _ in range(draws):
        longest = 0
        for _ in range(rows // 2):
            p = rng.choice(prompts)
            longest = max(longest, len(p.prompt_ids) + max(len(p.response_ids), rng.choice(responses)))
        total += min(cfg.model.seq_length, -(-longest // 16) * 16)
    return round(total / draws), round(sum(responses) / len(responses))


def format_plan(result: dict, gpus: int, gpu_name: str) -> str:
    """Human-readable summary of :func:`spin_mcore.plan.search.plan`'s dict."""
    from spin_mcore.plan.search import PLAN_STAGES

    lines = [f"spin-mcore plan: {gpus} x {gpu_name}; {result['fits']} of {result['considered']} layouts fit"]

    def layout_str(lay: dict) -> str:
        return (f"TP{lay['tp']} PP{lay['pp']} VP{lay['vp']} DP{lay['dp']} mbs {lay['micro_batch']} "
                f"gbs {lay['global_batch']} seq {lay['seq']} recompute {'on' if lay['recompute'] else 'off'}")

    best = result["best"]
    if best is None:
        lines.append("no layout fits in memory")
        if result.get("closest_over"):
            c = result["closest_over"]
            lines.append(f"closest: {layout_str(c['layout'])}: needs {c['memory_gb']['total']:.1f} GB of "
                         f"{c['memory_gb']['capacity']:.0f}")
    else:
        m, h, s = best["memory_gb"], best["hours_per_iteration"], best["step_seconds"]
        lines += [
            f"best layout: {layout_str(best['layout'])}",
            f"  training throughput: {best['tokens_per_s_per_gpu']:.0f} tokens/s/GPU "
            f"(step {s['total']:.2f} s: compute {s['compute']:.2f}, bubble {s['bubble']:.2f}, "
            f"TP comm {s['tp_comm']:.2f}, DP comm exposed {s['dp_comm_exposed']:.2f})",
            f"  memory per GPU: {m['total']:.1f} of {m['capacity']:.0f} GB (weights {m['weights']:.1f}, grads "
            f"{m['grads']:.1f}, main params {m['main_params']:.1f}, optimizer {m['optimizer_state']:.1f}, "
            f"activations {m['activations']:.1f}, logits {m['logits']:.1f}, reserved {m['reserved']:.1f}); "
            f"headroom {m['headroom']:.1f} GB",
            f"  hours per SPIN iteration: {h['total']:.2f} = "
            + " + ".join(f"{name.replace('_', ' ')} {h[name]:.3f}" for name in PLAN_STAGES),
            f"  generation estimate source: {h['generation_source']}",
            f"  launch with (e.g. launch/spin_70b.sh for the 70B config): parallel.tp={best['layout']['tp']} parallel.pp={best['layout']['pp']}"
            + (f" parallel.vp={best['layout']['vp']}" if best['layout']['vp'] > 1 else "")
            + f" train.micro_batch_size={best['layout']['micro_batch']}"
            + f" train.recompute={str(best['layout']['recompute']).lower()}",
        ]
        if result["alternatives"]:
            lines.append("alternatives:")
            for alt in result["alternatives"]:
                lines.append(f"  {layout_str(alt['layout'])}: {alt['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
                             f"{alt['memory_gb']['total']:.1f} GB, {alt['hours_per_iteration']['total']:.2f} h/iteration")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory, throughput and hours per SPIN iteration for a model and GPU count",
                       description="Search the TP/PP/VP/micro-batch/recompute layouts of --gpus GPUs for the config's "
                       "model, keep those that fit in memory, rank them by predicted training tokens/s/GPU, and "
                       "estimate hours per SPIN iteration stage by stage (export, engine start, generation, reference pass, "
                       "training, checkpoint stalls, evaluation: the stage names of RUN/timeline.jsonl). No GPU needed.")
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=8, help="GPU count (default 8)")
    p.add_argument("--gpu", default="h100", help="GPU type: h100, h200, a100 (default h100)")
    p.add_argument("--tp", type=int, default=None, help="fix tensor-parallel size (with --pp) instead of searching")
    p.add_argument("--pp", type=int, default=None, help="fix pipeline-parallel size (with --tp)")
    p.add_argument("--vp", type=int, default=None, help="virtual pipeline stages of a fixed layout (default 1)")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch (pairs) of a fixed layout (default: config)")
    p.add_argument("--seq-tokens", type=int, default=None,
                   help="padded tokens per row (default: data.max_prompt_length + data.max_response_length, "
                        "capped at model.seq_length)")
    p.add_argument("--measure-data", action="store_true",
                   help="measure the padded row length and the mean response length from data.path with "
                        "data.tokenizer instead of using the limits")
    p.add_argument("--prompts", type=int, default=50_000, help="prompts per iteration when data.num_prompts is unset")
    p.add_argument("--efficiency", type=float, default=None,
                   help="achieved fraction of peak FLOP/s (default: calibrated on Megatron-Bridge's 70B FP8 run)")
    p.add_argument("--min-headroom-gb", type=float, default=4.0,
                   help="memory a layout must leave free beyond the 4 GB reserve to count as fitting (default 4)")
    p.add_argument("--fs-gbps", type=float, default=2.0,
                   help="shared file-system bandwidth per node in GB/s, for model loads, the export, the engine "
                        "start and checkpoint saves (default 2)")
    p.add_argument("--top", type=int, default=5, help="layouts to show (best + alternatives)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
