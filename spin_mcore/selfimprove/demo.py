"""``spin-mcore demo --method all``: ReST^EM, Iterative RPO and STaR from the demo's theta_0.

    run_verified_methods(cfg, pstate, theta0, out, log) -> rows   theta_0 judged by arith_equation, then
                                                                   one row per method and iteration
    spin_diversity(run_dir, rows)                                  distinct-2 of SPIN's samples per iteration
    plot_methods(rows, path)                                       one line per method against iteration

Every method starts from the same theta_0, samples the training prompts of the SPIN run's split (all
of them: SPIN samples the first 512) and is evaluated on the same held-out prompts. Verifier: ``arith_equation`` (the
whole "x op y = c. The answer is c." with its arithmetic computed), both for the samples kept and for the
methods' held-out exact match; the table carries theta_0 judged by it as its own row, since SPIN's rows
are judged by ``run.checker=arith`` (the answer only). Recipe (:data:`VERIFIED_RECIPE`): the improvement
test's loop (tests/test_selfimprove_improvement.py: keep verified samples, at most 1 per prompt, training
continues from theta_t) on every training prompt (the SPIN part samples 512) with K = 4 samples at
temperature 1, and theta_0's own SFT optimizer (Adam 3e-3, 5% warmup, batch 64); ReST^EM and STaR
2 epochs per iteration, Iterative RPO (DPO beta 0.1 + 1.0 x NLL of the chosen) 1. docs/demo.md has the
measured tables, this recipe's and the test's own, which memorises the 512 SPIN prompts here.
"""

from __future__ import annotations

import copy
from pathlib import Path

METHODS = ("ReST-EM", "Iterative RPO", "STaR")
VERIFIER = "arith_equation"
# K 4 on every training prompt, at most 1 kept per prompt, M-step from theta_t with theta_0's own SFT
# optimizer: on 512 prompts (the SPIN part's) the test's 10 epochs at 1e-3 memorise them (docs/demo.md).
VERIFIED_RECIPE = {"selfimprove.num_samples": 4, "selfimprove.keep_threshold": 1.0, "selfimprove.max_per_prompt": 1,
                   "selfimprove.restart_from_base": False, "train.optimizer": "adam", "train.lr": [3e-3],
                   "train.warmup_fraction": 0.05, "train.global_batch_size": 64, "train.micro_batch_size": 64,
                   "generation.temperature": 1.0, "generation.batch_size": 256, "data.num_prompts": None,
                   "selfimprove.min_distinct_2": 0.0}
EPOCHS = {"ReST-EM": 2, "STaR": 2, "Iterative RPO": 1}
_PLOT_METRICS = ("exact_match", "sampled_exact_match", "heldout_nll", "distinct_2")


def _method_config(cfg, out: Path, method: str):
    """``cfg`` (the demo's SPIN config) with the verifier, :data:`VERIFIED_RECIPE` and ``method``'s epochs."""
    m = copy.deepcopy(cfg)
    m.verify.kind = VERIFIER
    for key, value in VERIFIED_RECIPE.items():
        section, field = key.split(".")
        setattr(getattr(m, section), field, copy.deepcopy(value))
    m.train.epochs = EPOCHS[method]
    m.run.dir = str(out / method.lower().replace(" ", "_").replace("^", ""))
    if method == "Iterative RPO":
        m.spin.sft_weight = 1.0  # the paper's alpha = 1; beta stays SPIN's 0.1
    return m


def run_verified_methods(cfg, pstate, theta0: str, out: Path, log) -> list[dict]:
    """theta_0 judged by :data:`VERIFIER` (one row, ``method`` None), then every iteration of the three
    verified loops, each run in ``out/<method>``; every row has ``judge``. Collective."""
    from spin_mcore.selfimprove.restem import run_restem
    from spin_mcore.selfimprove.rpo import run_rpo
    from spin_mcore.selfimprove.star import run_star

    rows = []
    for method, fn in zip(METHODS, (run_restem, run_rpo, run_star)):
        m = _method_config(cfg, out, method)
        m.run.init_checkpoint = theta0
        base, *method_rows = fn(m, pstate)
        if not rows:  # the same checkpoint, prompts, decode and verifier for every method: one row
            rows.append({**base, "model": f"SFT (theta_0), judged by {VERIFIER}", "judge": VERIFIER})
        for r in method_rows:
            r.update(method=method, judge=VERIFIER)
        rows += method_rows
        last = method_rows[-1]
        log(f"{method}: exact match ({VERIFIER}) {base['exact_match']:.3f} -> "
            + " -> ".join(f"{r['exact_match']:.3f}" for r in method_rows)
            + f", held-out NLL {last['heldout_nll']:.4f}, distinct-2 {last['distinct_2']:.3f}")
    return rows


def spin_diversity(run_dir: Path, rows: list[dict]) -> None:
    """Adds ``distinct_2`` (of the samples SPIN trained against, from theta_t) to each SPIN row in place."""
    from spin_mcore.selfimprove.common import distinct_n
    from spin_mcore.utils.shards import read_stage

    for r in rows:
        gen = Path(run_dir) / f"iter_{int(r['iteration']) - 1}" / "train_generation"
        if gen.exists():
            r["distinct_2"] = distinct_n([x["generated_ids"] for x in read_stage(gen)], 2)


def plot_methods(rows: list[dict], path: Path, title: str) -> None:
    """One panel per metric of :data:`_PLOT_METRICS`, one line per ``method`` (rows' iteration on x);
    rows without a method (controls) as markers at their iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spin_mcore.utils.io import atomic_write_figure

    methods = []
    for r in rows:
        if r.get("method") and r["method"] not in methods:
            methods.append(r["method"])
    fig, axes = plt.subplots(1, len(_PLOT_METRICS), figsize=(4.4 * len(_PLOT_METRICS), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, _PLOT_METRICS):
        for i, method in enumerate(methods):
            own = [r for r in rows if r.get("method") == method]
            # theta_0 starts every line, judged as the method's rows are
            start = [r for r in rows if not r.get("method") and r.get("iteration") == 0
                     and r.get("judge") == own[0].get("judge")]
            pts = [(r["iteration"], r[key]) for r in start[:1] + own if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=method)
        controls = [x for x in rows if not x.get("method") and x.get("iteration") != 0 and x.get(key) is not None]
        for j, r in enumerate(controls):
            ax.plot([r["iteration"]], [r[key]], marker="s", linestyle="none", color=f"C{len(methods) + j}",
                    label=r["model"])
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_figure(fig, path)
