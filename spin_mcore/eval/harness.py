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
                  device: str = "cuda", dtype: str = "bfloat16", limit: Optional[int] = None,
                  backend: str = "hf", tensor_parallel: int = 1, data_parallel: int = 1,
                  max_model_len: Optional[int] = None, log_samples: bool = False) -> list[dict]:
    """Keyword arguments for one ``lm_eval.simple_evaluate`` call per few-shot setting.

    ``backend="hf"``: transformers in this process on ``device`` (small models). ``backend="vllm"``:
    vLLM with ``tensor_parallel_size`` / ``data_parallel_size`` (run in the engine's environment by
    :mod:`spin_mcore.eval.harness_worker`); ``device`` is then vLLM's to choose.
    """
    if backend not in ("hf", "vllm"):
        raise ValueError(f"harness backend {backend!r}: hf or vllm")
    groups: dict[int, list[str]] = {}
    for t in tasks:
        groups.setdefault(t.num_fewshot, []).append(t.task)
    if backend == "hf":
        model_args, extra = f"pretrained={Path(hf_dir)},dtype={dtype}", {"device": device}
    else:
        model_args = (f"pretrained={Path(hf_dir)},dtype={dtype},tensor_parallel_size={int(tensor_parallel)},"
                      f"data_parallel_size={int(data_parallel)}")
        if max_model_len:
            model_args += f",max_model_len={int(max_model_len)}"
        extra = {}
    return [
        dict(model=backend, model_args=model_args, tasks=names, num_fewshot=shots, batch_size=batch_size,
             limit=limit, log_samples=log_samples, **extra)
        for shots, names in sorted(groups.items())
    ]


def harness_job(calls: list[dict], out: str | Path, include_path: Optional[str | Path] = None) -> dict:
    """The JSON job of :mod:`spin_mcore.eval.harness_worker`: its calls, local task folder and result file."""
    return {"calls": calls, "include_path": str(include_path) if include_path else None, "out": str(out)}


def local_tasks(names: list[str], num_fewshot: int = 0) -> list[HarnessTask]:
    """Tasks defined in an ``--include-path`` folder (lm-eval's YAML task files), not leaderboard columns:
    reported under their own names with all their metrics (``metric`` is left empty)."""
    return [HarnessTask(n, n, num_fewshot, "") for n in names]


def leaderboard_row(results: dict, tasks: list[HarnessTask]) -> dict[str, float]:
    """{column: score in percent, "Average": mean} from merged ``simple_evaluate(...)["results"]``."""
    row = {}
    if tasks and all(not t.metric for t in tasks):  # local tasks: every metric as the harness named it
        return {t.column: {k: v for k, v in results.get(t.task, {}).items() if "," in k} for t in tasks}
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
