"""``spin-mcore demo``: the embedded CPU demo (SFT -> SPIN vs continued SFT on a checkable arithmetic task)."""

from __future__ import annotations

import json


def _demo_rank(out: str, size: str, seed: int, force: bool, overrides: list, method: str = "spin") -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.demo.experiment import run_demo

    return run_demo(out, size, seed, force, overrides, method)


def _preflight(args) -> None:
    """Overrides and the generation engine checked before the demo spends minutes on SFT (ConfigError)."""
    from pathlib import Path

    from spin_mcore.demo.experiment import SIZES, demo_config
    from spin_mcore.generation.external import preflight
    from spin_mcore.platform.distributed import select_device

    # The tokenizer and vocabulary are made later; these stand-ins do not affect what is checked here.
    cfg = demo_config(Path(args.out), SIZES[args.size], Path(args.out) / "tokenizer", 512, args.seed, args.overrides)
    preflight(cfg, select_device(cfg.platform.device))


def run(args) -> int:
    from spin_mcore.launcher import launched, run_local
    from spin_mcore.platform.cpu_numerics import pin_cpu_numerics, pinned_threads

    args.log_dir = args.out  # cli.main writes a rank's traceback there
    _preflight(args)
    # docs/demo.md quotes this run's table: the same kernels and threads on every Intel AVX2 (or newer) CPU.
    pinned = pin_cpu_numerics()
    if launched():
        result = _demo_rank(args.out, args.size, args.seed, args.force, args.overrides, args.method)
    else:
        result = run_local(_demo_rank, args.nproc, args.out, args.size, args.seed, args.force, args.overrides,
                           args.method, threads=pinned_threads(args.nproc))[0]
    print(f"demo numerics: {', '.join(f'{k}={v}' for k, v in pinned.items())}, "
          f"{pinned_threads(args.nproc)} thread(s) per rank")
    rows = {r["model"]: r for r in result["rows"]}
    spin_last = [r for name, r in rows.items() if name.startswith("SPIN")][-1]
    base, ctrl, ctrl_opt = rows["SFT (theta_0)"], rows["continued SFT"], rows["continued SFT, SPIN optimizer"]
    print(f"demo finished in {result['seconds']:.0f} s")
    print(f"held-out exact match: SFT {base['exact_match']:.3f} -> SPIN {spin_last['exact_match']:.3f} "
          f"(continued SFT {ctrl['exact_match']:.3f}; with SPIN's optimizer {ctrl_opt['exact_match']:.3f})")
    print(f"held-out NLL of human responses: SFT {base['heldout_nll']:.4f} -> SPIN {spin_last['heldout_nll']:.4f} "
          f"(continued SFT {ctrl['heldout_nll']:.4f}; with SPIN's optimizer {ctrl_opt['heldout_nll']:.4f})")
    verified = [r for r in result["rows"] if r.get("judge") not in (None, base.get("judge"))]
    if verified:  # --method all: each loop against theta_0 judged by the same verifier, in its binomial se
        import math

        start = verified[0]
        p0 = start["exact_match"]
        se = max(math.sqrt(p0 * (1 - p0) / result["heldout_prompts"]), 1e-9)
        for name in dict.fromkeys(r["model"].rsplit(" iter ", 1)[0] for r in verified[1:]):
            path = [r["exact_match"] for r in verified[1:] if r["model"].startswith(name + " iter ")]
            print(f"{name}, exact match judged by {start['judge']}: theta_0 {p0:.3f} -> "
                  + " -> ".join(f"{x:.3f}" for x in path)
                  + f" ({(path[-1] - p0) / se:+.1f} se of theta_0, se {se:.3f})")
    print(json.dumps({"seconds": result["seconds"], "rows": result["rows"]}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="embedded CPU demo: SFT a tiny model, run SPIN, compare with continued SFT",
        description="Trains a SentencePiece tokenizer and a tiny Megatron GPT on the shipped arithmetic data, SFTs it "
        "to a plateau, runs SPIN iterations and the paper's continued-SFT control, and writes a table and a "
        "plot into --out. Re-running resumes from what is complete.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--size", choices=("full", "small"), default="full", help="full (README demo) or small (tests)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, init and sampling")
    p.add_argument("--method", choices=("spin", "all"), default="spin",
                   help="spin (SPIN vs continued SFT), or all: also ReST^EM, Iterative RPO and STaR from the same theta_0")
    p.add_argument("--nproc", type=int, default=1, help="local processes (data parallel)")
    p.add_argument("--force", action="store_true", help="reuse --out even if it was made with another config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the SPIN config, e.g. train.lr=[3e-5] spin.beta=[0.1]")
    p.set_defaults(func=run, preemptible=True)  # SIGUSR1/SIGTERM: save, exit 75 (platform/preemption.py)
