"""``spin-mcore demo --method all``: ReST^EM, Iterative RPO and STaR from the demo's theta_0.

    run_verified_methods(cfg, sft_cfg, pstate, theta0, out, log) -> rows   one row per method and iteration
    spin_diversity(run_dir, rows)                                         distinct-2 of SPIN's samples per iteration
    plot_methods(rows, path)                                              one line per method against iteration

Every method starts from the same theta_0, samples the same training prompts and is evaluated on
the same held-out prompts as the SPIN run (same ``data`` section). Recipes:
* ReST^EM and STaR fine-tune with the SFT recipe that made theta_0 (the continued-SFT control's);
* Iterative RPO uses SPIN's recipe (optimizer, LR, beta) plus the NLL term, ``spin.sft_weight=1``
  (the paper's alpha = 1).
"""

from __future__ import annotations

import copy
from pathlib import Path

METHODS = ("ReST-EM", "Iterative RPO", "STaR")
_PLOT_METRICS = ("exact_match", "sampled_exact_match", "heldout_nll", "distinct_2")


def _method_config(cfg, sft_cfg, out: Path, method: str):
    m = copy.deepcopy(cfg)
    m.verify.kind = "arith"
    m.selfimprove.num_samples = 4
    m.selfimprove.max_per_prompt = 1  # one kept sample per prompt: the same data size as SFT's
    m.selfimprove.min_distinct_2 = 0.2
    m.run.dir = str(out / method.lower().replace(" ", "_").replace("^", ""))
    if method in ("ReST-EM", "STaR"):
        for field in ("optimizer", "lr", "global_batch_size", "micro_batch_size", "warmup_fraction"):
            setattr(m.train, field, copy.deepcopy(getattr(sft_cfg.train, field)))
    else:
        m.spin.sft_weight = 1.0
    return m


def run_verified_methods(cfg, sft_cfg, pstate, theta0: str, out: Path, log) -> list[dict]:
    """Rows (theta_0's excluded) of the three verified loops, each in ``out/<method>``; collective."""
    from spin_mcore.selfimprove.restem import run_restem
    from spin_mcore.selfimprove.rpo import run_rpo
    from spin_mcore.selfimprove.star import run_star

    rows = []
    for method, fn in zip(METHODS, (run_restem, run_rpo, run_star)):
        m = _method_config(cfg, sft_cfg, out, method)
        m.run.init_checkpoint = theta0
        method_rows = fn(m, pstate)[1:]
        for r in method_rows:
            r["method"] = method
        rows += method_rows
        last = method_rows[-1]
        log(f"{method}: exact match {last['exact_match']:.3f}, held-out NLL {last['heldout_nll']:.4f}, "
            f"distinct-2 {last['distinct_2']:.3f}")
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
    start = [r for r in rows if not r.get("method") and r.get("iteration") == 0]  # theta_0 starts every line
    for ax, key in zip(axes.flat, _PLOT_METRICS):
        for i, method in enumerate(methods):
            pts = [(r["iteration"], r[key]) for r in start + [r for r in rows if r.get("method") == method]
                   if r.get(key) is not None]
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
