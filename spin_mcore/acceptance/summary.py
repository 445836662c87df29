"""Result records of the acceptance run, their one-line form, and the JSON summary with its validator.

The summary (``gpu_acceptance.json``), schema ``spin_mcore.gpu_acceptance/1``::

    {
      "schema": "spin_mcore.gpu_acceptance/1",
      "mode": "full" | "quick",
      "started_at": "2026-11-20T10:00:00Z", "finished_at": "...",   # UTC, ISO 8601
      "wall_s": 312.5,
      "environment": {name: str | number | bool | null},              # versions, GPU, driver, host
      "checks": [                                                    # every registered name exactly once
        {"name": "triton.accuracy", "group": "kernels",
         "status": "pass" | "fail" | "skip" | "not_checked",
         "summary": "one line of figures (or the reason)",
         "figures": {name: str | number | bool | null},              # flat; NaN/inf written as null
         "seconds": 12.3,
         "reason": null | "why it failed / was skipped / is not checked"},
        ...
      ],
      "counts": {"pass": n, "fail": n, "skip": n, "not_checked": n},
      "ok": true                                                     # no check failed
    }

A pass has no reason; every other status has one (``skipped: no CUDA`` for a GPU check on a machine
without CUDA). No torch here: the summary is written and checked on any Python.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

SCHEMA = "spin_mcore.gpu_acceptance/1"
STATUSES = ("pass", "fail", "skip", "not_checked")
MODES = ("full", "quick")
NO_CUDA = "skipped: no CUDA"
_TAG = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "not_checked": "----"}
_CHECK_KEYS = {"name": str, "group": str, "status": str, "summary": str, "figures": dict, "seconds": (int, float),
               "reason": (str, type(None))}
_TOP_KEYS = {"schema": str, "mode": str, "started_at": str, "finished_at": str, "wall_s": (int, float),
             "environment": dict, "checks": list, "counts": dict, "ok": bool}


class SummaryError(ValueError):
    """A summary does not follow the schema; the message lists every problem found."""


@dataclass
class CheckResult:
    """One check's outcome, as one JSON object of ``checks`` and one printed line."""

    name: str
    group: str
    status: str
    summary: str
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0
    reason: Optional[str] = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"CheckResult {self.name}: status {self.status!r} not in {STATUSES}")
        self.figures = clean_figures(self.figures)
        self.seconds = round(float(self.seconds), 3)

    def line(self) -> str:
        return format_line(self.status, self.name, self.summary, self.seconds)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "CheckResult":
        return cls(**{k: obj[k] for k in _CHECK_KEYS if k in obj})


def clean_figures(figures: dict) -> dict:
    """Figures as flat JSON scalars: numbers rounded to 6 significant digits, NaN/inf as None, others as str."""
    out = {}
    for key, value in figures.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, int):
            out[str(key)] = value
        elif isinstance(value, float):
            out[str(key)] = float(f"{value:.6g}") if math.isfinite(value) else None
        else:
            try:  # numpy / torch scalars
                number = float(value)
            except (TypeError, ValueError):
                out[str(key)] = str(value)
            else:
                out[str(key)] = float(f"{number:.6g}") if math.isfinite(number) else None
    return out


def format_line(status: str, name: str, summary: str, seconds: Optional[float] = None) -> str:
    """``PASS triton.accuracy        <figures>  (12.3 s)``: the one line each check prints."""
    took = f"  ({seconds:.1f} s)" if seconds else ""
    return f"{_TAG[status]} {name:22s} {summary}{took}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_summary(results: Iterable[CheckResult], mode: str, started_at: str, wall_s: float,
                  environment: dict, finished_at: Optional[str] = None) -> dict:
    """The summary dict (schema above) of ``results``, in their order."""
    checks = [r.to_json() for r in results]
    counts = {s: sum(c["status"] == s for c in checks) for s in STATUSES}
    return {"schema": SCHEMA, "mode": mode, "started_at": started_at, "finished_at": finished_at or utc_now(),
            "wall_s": round(float(wall_s), 3), "environment": clean_figures(environment), "checks": checks,
            "counts": counts, "ok": counts["fail"] == 0}


def validate_summary(obj: Any, expected_names: Optional[Iterable[str]] = None) -> None:
    """Raise :class:`SummaryError` listing every departure of ``obj`` from the schema.

    ``expected_names``: the check names a complete run holds (:func:`registry.all_names`); each must
    appear exactly once, and no other.
    """
    problems: list[str] = []
    if not isinstance(obj, dict):
        raise SummaryError(f"summary: expected a JSON object, got {type(obj).__name__}")
    for key, types in _TOP_KEYS.items():
        if key not in obj:
            problems.append(f"missing key {key!r}")
        elif not isinstance(obj[key], types) or (types is not bool and isinstance(obj[key], bool)):
            problems.append(f"{key!r} has type {type(obj[key]).__name__}")
    extra = set(obj) - set(_TOP_KEYS)
    if extra:
        problems.append(f"unknown keys {sorted(extra)}")
    if obj.get("schema") != SCHEMA:
        problems.append(f"schema is {obj.get('schema')!r}, expected {SCHEMA!r}")
    if obj.get("mode") not in MODES:
        problems.append(f"mode is {obj.get('mode')!r}, expected one of {MODES}")
    if isinstance(obj.get("environment"), dict):
        problems += _scalar_problems("environment", obj["environment"])
    checks = obj.get("checks") if isinstance(obj.get("checks"), list) else []
    names = []
    for i, check in enumerate(checks):
        where = f"checks[{i}]"
        if not isinstance(check, dict):
            problems.append(f"{where} is not an object")
            continue
        where = f"checks[{i}] ({check.get('name', '?')})"
        for key, types in _CHECK_KEYS.items():
            if key not in check:
                problems.append(f"{where}: missing key {key!r}")
            elif not isinstance(check[key], types) or isinstance(check[key], bool):
                problems.append(f"{where}: {key!r} has type {type(check[key]).__name__}")
        if set(check) - set(_CHECK_KEYS):
            problems.append(f"{where}: unknown keys {sorted(set(check) - set(_CHECK_KEYS))}")
        status = check.get("status")
        if status not in STATUSES:
            problems.append(f"{where}: status {status!r} not in {STATUSES}")
        elif status == "pass" and check.get("reason") is not None:
            problems.append(f"{where}: a pass has no reason, got {check.get('reason')!r}")
        elif status != "pass" and not check.get("reason"):
            problems.append(f"{where}: status {status!r} needs a reason")
        if isinstance(check.get("summary"), str) and ("\n" in check["summary"] or not check["summary"].strip()):
            problems.append(f"{where}: summary must be one non-empty line")
        if isinstance(check.get("figures"), dict):
            problems += _scalar_problems(f"{where}.figures", check["figures"])
        if isinstance(check.get("seconds"), (int, float)) and not check["seconds"] >= 0:
            problems.append(f"{where}: seconds {check['seconds']} is negative")
        names.append(check.get("name"))
    dupes = sorted({n for n in names if names.count(n) > 1}, key=str)
    if dupes:
        problems.append(f"names appear more than once: {dupes}")
    if expected_names is not None:
        expected = list(expected_names)
        missing = [n for n in expected if n not in names]
        unknown = [n for n in names if n not in expected]
        if missing:
            problems.append(f"checks missing: {missing}")
        if unknown:
            problems.append(f"checks not registered: {unknown}")
    if isinstance(obj.get("counts"), dict) and all(isinstance(c, dict) for c in checks):
        tally = {s: sum(c.get("status") == s for c in checks) for s in STATUSES}
        if obj["counts"] != tally:
            problems.append(f"counts {obj['counts']} do not match the checks {tally}")
        if isinstance(obj.get("ok"), bool) and obj["ok"] != (tally["fail"] == 0):
            problems.append(f"ok is {obj['ok']} with {tally['fail']} failed checks")
    if problems:
        raise SummaryError("summary: " + "; ".join(problems))


def _scalar_problems(where: str, values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        if not isinstance(key, str):
            out.append(f"{where}: key {key!r} is not a string")
        if not (value is None or isinstance(value, (str, bool, int, float))):
            out.append(f"{where}[{key!r}] is a {type(value).__name__}, not a JSON scalar")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{where}[{key!r}] is {value} (write null)")
    return out


def write_summary(summary: dict, path: Path, expected_names: Optional[Iterable[str]] = None) -> Path:
    """Validate, then write ``summary`` as indented JSON to ``path`` (atomically); returns the path."""
    validate_summary(summary, expected_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def table(results: Iterable[CheckResult]) -> str:
    """The closing table: one line per check, then the counts."""
    results = list(results)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines = [r.line() for r in results]
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
                 f"{counts['not_checked']} not checked")
    return "\n".join(lines)
