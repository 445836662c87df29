"""The self-describing run directory of a SPIN run.

    RUN/config.yaml                      resolved config (a re-run with a different config is refused without --force)
    RUN/checkpoints/theta_0/             theta_0 as an mcore checkpoint, when converted from HF (run.init_from_hf)
    RUN/iter_{t}/train_generation/       y' ~ theta_t for every training prompt (shards + manifest)
    RUN/iter_{t}/train_reference/        those pairs (and the previous iteration's) with theta_t's log p(y|x), log p(y'|x)
    RUN/iter_{t}/heldout_generation/     the same for the held-out prompts (evaluation only)
    RUN/iter_{t}/heldout_reference/
    RUN/iter_{t}/train/                  trainer checkpoints (train_state/), metrics.jsonl, TensorBoard events,
                                         and model/, theta_{t+1}
    RUN/iter_{t}/eval_work/              theta_{t+1}'s scores of the held-out pairs
    RUN/iter_{t}/eval.json               evaluation of theta_{t+1} (written last: its presence marks the iteration done)
    RUN/results.jsonl, RUN/results.md, RUN/results.png   per-iteration table and plot
    RUN/rejects.jsonl                    lines skipped under data.skip_bad_lines, with file, line and reason
    RUN/error.log                        the traceback of the last error a rank raised (the CLI prints one line)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from spin_mcore.utils.io import atomic_write_figure, atomic_write_json, atomic_write_text

# Fields that do not change results: a run may resume with other values.
_RESUMABLE_FIELDS = {("run", "nproc"), ("run", "iterations"), ("train", "log_interval"), ("train", "save_interval"),
                     ("train", "save_interval_minutes"), ("train", "async_save"), ("platform", "dist_timeout_minutes")}


class RunConfigMismatchError(ValueError):
    """The run directory was made with a different config."""


class RunDir:
    """Paths of one run directory (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def generation(self, t: int) -> Path:
        return self.iteration(t) / "generation"

    def reference(self, t: int) -> Path:
        return self.iteration(t) / "reference"

    def train(self, t: int) -> Path:
        return self.iteration(t) / "train"

    def eval_file(self, t: int) -> Path:
        return self.iteration(t) / "eval.json"

    def theta(self, t: int) -> Path:
        return self.root / "checkpoints" / f"theta_{t}"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"


def _diff(old: dict, new: dict, prefix: tuple = (), defaults: Optional[dict] = None) -> list[str]:
    """Changed fields between two config dicts, as ``"section.field: old -> new"`` lines.

    A field (or section) the old config lacks was added to the product after the run began: it
    counts as unchanged when the new value is its default, so new releases can resume old runs.
    """
    if defaults is None:
        from spin_mcore.config import Config

        defaults = Config().to_dict()
    out = []
    for key in sorted(set(old) | set(new)):
        path = prefix + (key,)
        a, b, d = old.get(key), new.get(key), (defaults or {}).get(key)
        if key not in old and isinstance(b, dict):
            a = {}
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, path, d if isinstance(d, dict) else {})
        elif key not in old and b == d:
            continue
        elif a != b and path not in _RESUMABLE_FIELDS:
            out.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return out


def claim_run_dir(run: RunDir, cfg_dict: dict, force: bool = False) -> None:
    """Write the resolved config, or check it against the one already there.

    Raises RunConfigMismatchError listing the changed fields unless ``force``.
    """
    if run.config_file.exists():
        old = yaml.safe_load(run.config_file.read_text()) or {}
        changes = _diff(old, cfg_dict)
        if changes and not force:
            raise RunConfigMismatchError(
                f"{run.root} was made with a different config ({'; '.join(changes[:5])}"
                f"{' ...' if len(changes) > 5 else ''}); pass --force to reuse it or choose another run.dir"
            )
    atomic_write_text(run.config_file, yaml.safe_dump(cfg_dict, sort_keys=False))


def write_results(run: RunDir, rows: list[dict], title: str = "SPIN", trajectory: Optional[int] = None) -> None:
    """Write results.jsonl, a markdown table and a PNG plot of the per-iteration rows.

    The first ``trajectory`` rows (default: all) are one run's iterates and are joined by a line;
    later rows (controls) are drawn as separate markers.
    """
    if not rows:
        return
    atomic_write_text(run.root / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(run.root / "results.md", format_table(rows))
    plot_results(rows, run.root / "results.png", title, trajectory)


def format_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """Markdown table. Columns default to the union of row keys in order of appearance.

    Floats are formatted per column for its magnitude: 4 decimals, or 3 significant digits
    (``%.3g``) in a column whose largest non-zero value is below 0.01, such as a learning rate
    (1e-05 would read 0.0000 with 4 decimals).
    """
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    formats = {c: _column_format([r.get(c) for r in rows]) for c in columns}
    lines += ["| " + " | ".join(_cell(r.get(c), formats[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _column_format(values: list) -> str:
    floats = [abs(v) for v in values if isinstance(v, float) and v == v and v != 0.0]
    return ".3g" if floats and max(floats) < 0.01 else ".4f"


def _cell(value, spec: str) -> str:
    if isinstance(value, float):
        return format(value, spec)
    return "" if value is None else str(value)


def plot_results(rows: list[dict], path: Path, title: str, trajectory: Optional[int] = None) -> None:
    """One panel per numeric metric against the row label (matplotlib, Agg backend), saved atomically.

    Rows past ``trajectory`` are controls: drawn as separate markers, not joined to the iterates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics: list[str] = []
    for r in rows:  # a metric may be missing from some rows (no pair accuracy for the SFT baseline)
        metrics += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in ("iteration", "train_steps", "seconds") and k not in metrics]
    labels = [str(r.get("model", r.get("iteration"))) for r in rows]
    cols = min(3, max(1, len(metrics)))
    nrows = -(-max(1, len(metrics)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, metrics):
        values = [float("nan") if r.get(key) is None else r[key] for r in rows]
        n = len(rows) if trajectory is None else trajectory
        ax.plot(range(n), values[:n], marker="o", color="tab:blue")
        for i in range(n, len(rows)):
            ax.plot([i], [values[i]], marker="s", linestyle="none", color=f"C{1 + i - n}")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_figure(fig, path)


def save_eval(run: RunDir, t: int, metrics: dict) -> None:
    atomic_write_json(run.eval_file(t), metrics)
