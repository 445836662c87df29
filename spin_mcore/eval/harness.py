"""lm-evaluation-harness on an iterate's HF export, with the Open LLM Leaderboard settings the SPIN paper reports.

The harness downloads its datasets from the HF hub on first use. Where they are not
cached and cannot be fetched, :func:`run_harness` stops with a message naming the
missing tasks and how to provide them (``HF_DATASETS_CACHE`` / ``HF_HOME``), rather
than a traceback from deep inside ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class HarnessTask:
    """One leaderboard column: harness task name, few-shot count and the metric reported."""

    column: str
    task: str
    num_fewshot: int
    metric: str


# Paper, Table 1 / Open LLM Leaderboard v1 settings.
LEADERBOARD_TASKS: tuple[HarnessTask, ...] = (
    HarnessTask("ARC", "arc_challenge", 25, "acc_norm,none"),
    HarnessTask("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),
    HarnessTask("Winogrande", "winogrande", 5, "acc,none"),
    HarnessTask("GSM8k", "gsm8k", 5, "exact_match,strict-match"),
    HarnessTask("HellaSwag", "hellaswag", 10, "acc_norm,none"),
    HarnessTask("MMLU", "mmlu", 5, "acc,none"),
)


class HarnessUnavailableError(RuntimeError):
    """lm_eval or its datasets are missing; the message says what to install or cache."""


def select_tasks(names: Optional[list[str]] = None) -> list[HarnessTask]:
    """Leaderboard tasks by column or task name (all when ``names`` is None)."""
    if not names:
        return list(LEADERBOARD_TASKS)
    by_name = {t.column.lower(): t for t in LEADERBOARD_TASKS} | {t.task: t for t in LEADERBOARD_TASKS}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        raise ValueError(f"unknown harness task(s) {unknown}; known: {', '.join(t.column for t in LEADERBOARD_TASKS)}")
    return [by_name[n.lower()] for n in names]


def harness_calls(hf_dir: str | Path, tasks: list[HarnessTask], batch_size: int | str = "auto",
                  device: str = "cuda", dtype: str = "bfloat16", limit: Optional[int] = None) -> list[dict]:
    """Keyword arguments for one ``lm_eval.simple_evaluate`` call per few-shot setting."""
    groups: dict[int, list[str]] = {}
    for t in tasks:
        groups.setdefault(t.num_fewshot, []).append(t.task)
    return [
        dict(model="hf", model_args=f"pretrained={Path(hf_dir)},dtype={dtype}", tasks=names,
             num_fewshot=shots, batch_size=batch_size, device=device, limit=limit, log_samples=False)
        for shots, names in sorted(groups.items())
    ]


def leaderboard_row(results: dict, tasks: list[HarnessTask]) -> dict[str, float]:
    """{column: score in percent, "Average": mean} from merged ``simple_evaluate(...)["results"]``."""
    row = {}
    for t in tasks:
        if t.task not in results or t.metric not in results[t.task]:
            raise KeyError(f"harness result for {t.task!r} has no metric {t.metric!r}")
        row[t.column] = 100.0 * float(results[t.task][t.metric])
    row["Average"] = sum(row.values()) / len(row)
    return row


def run_harness(hf_dir: str | Path, tasks: list[HarnessTask], **kwargs) -> dict[str, float]:
    """Run the harness on an HF export and return its leaderboard row (see module docstring)."""
    try:
        import lm_eval
    except ImportError:
        raise HarnessUnavailableError("lm-evaluation-harness is not installed: pip install 'spin_mcore[eval]'") from None
    merged: dict = {}
    for call in harness_calls(hf_dir, tasks, **kwargs):
        try:
            out = lm_eval.simple_evaluate(**call)
        except Exception as exc:  # datasets raise many types when offline
            if "connect" in str(exc).lower() or "offline" in str(exc).lower() or "not found" in str(exc).lower():
                raise HarnessUnavailableError(
                    f"lm_eval could not load the datasets for {call['tasks']} ({type(exc).__name__}: {exc}). "
                    "Pre-download them on a machine with internet access into HF_HOME/HF_DATASETS_CACHE "
                    "and set HF_DATASETS_OFFLINE=1 here."
                ) from None
            raise
        merged.update(out["results"])
    return leaderboard_row(merged, tasks)
