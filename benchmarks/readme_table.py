"""The README's benchmark table, generated from the benchmarks' recorded JSON (never written by hand).

    python benchmarks/readme_table.py [--results benchmarks/results] [--readme README.md] [--doc docs/benchmarks.md]

Each ``*.json`` under ``--results`` is the last line a benchmark printed (``spin_step.py``, ``iteration.py``);
record one with ``python benchmarks/spin_step.py ... | tail -1 > benchmarks/results/NAME.json``. The table
replaces the text between ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->`` in the README and in
the doc; everything outside the markers (the method, the profile) stays as written. Both files are written
atomically. Bad input (unreadable JSON, missing markers) is one line naming the file, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


class TableError(Exception):
    """Bad input for the table: the message names the file."""


def _ratio(c: dict | None) -> str:
    if not c:
        return ""
    s = f"{c['ratio']:.2f}x [{c['ratio_min']:.2f}-{c['ratio_max']:.2f}]"
    return s + " overlap" if c.get("overlap") else s


def _machine(m: dict) -> str:
    """CPU model and threads, then the 1-minute load average before / after: rows measured elsewhere differ."""
    a, b = m.get("loadavg_before"), m.get("loadavg_after")
    load = f"load {a[0]:.1f} / {b[0]:.1f}" if a and b else ""
    cpu = f"{m['cpu_model']}, {m['threads']} threads" if m.get("cpu_model") and m.get("threads") else ""
    return "; ".join(x for x in (cpu, load) if x)


def _spin_step_row(r: dict) -> list[str]:
    head = r["headline_side"]
    side = r["sides"][head]
    ratios = r["ratios"]
    cfg = (f"{r['size']}, {r['lengths']} lengths (pad {r['trl_pad_fraction']:.0%})" if r.get("trl_pad_fraction") is not None
           else f"{r['size']}, {r['lengths']} lengths")
    target, uniform = r.get("target_mixed"), r.get("target_uniform")
    note = ""
    if target and r.get("lengths") == "mixed":
        note = f"target {target['needed_ratio_vs_trl_pre']:.2f}x vs TRL pre: {'met' if target['met'] else 'not met'}"
    elif uniform:
        note = (f"target {uniform['needed_ratio_vs_trl_live']:.2f}x vs TRL live: {'met' if uniform['met'] else 'not met'}; "
                f"RSS <= {uniform['rss_bound_vs_trl_live']:.2f}x: {'met' if uniform['rss_met'] else 'not met'} "
                f"(worst run: {'met' if uniform['rss_met_at_worst_run'] else 'not met'})")
    return [f"`spin_step.py` {head}", cfg, f"{r['repeats']}",
            f"{side['tokens_per_s_median']:.0f} tok/s ({side['tokens_per_s_spread']:.0%})",
            _ratio(ratios.get(f"{head}/trl_live", {}).get("tokens_per_s")),
            _ratio(ratios.get(f"{head}/trl_pre", {}).get("tokens_per_s")),
            _ratio(ratios.get(f"{head}/trl_live", {}).get("peak_rss")),
            f"{side['ceiling_share']:.1%}", _machine(r.get("machine", {})), note]


def _iteration_rows(r: dict) -> list[list[str]]:
    """One row per side of ours (``ours``, ``ours_vllm``) timed against the authors' pipeline."""
    rows = []
    for key, whole in r["ratios"].items():  # "authors/<side>": their seconds / ours = our speed-up
        ours = key.split("/", 1)[1]
        stages = ", ".join(f"{k} {v[ours]:.1f} vs {v['authors']:.1f} s" for k, v in r["stage_seconds"].items()
                           if ours in v and (v[ours] or v["authors"]))
        packed = " packed" if r.get("ours_packed_training") else ""
        rows.append([f"`iteration.py` {ours}", f"{r['size']}, {r['prompts']} prompts{packed}", f"{r['repeats']}",
                     f"{r['sides'][ours]['seconds_median']:.0f} s ({r['sides'][ours]['seconds_spread']:.0%})",
                     "", "", "", "", _machine(r.get("machine", {})),
                     f"authors' pipeline time / ours {_ratio(whole)} (above 1: ours faster); ours vs authors: {stages}"])
    return rows


HEADER = ["benchmark", "configuration", "runs", "ours (spread)", "vs TRL live", "vs TRL precomputed",
          "peak RSS vs TRL live", "matmul ceiling share", "machine", "note"]


def render_table(results: list[dict]) -> str:
    """Markdown table (one row per recorded result, in the given order) of benchmark JSON dicts."""
    rows = []
    for r in results:
        kind = r.get("benchmark")
        if kind == "spin_step":
            rows.append(_spin_step_row(r))
        elif kind == "iteration":
            rows.extend(_iteration_rows(r))
        else:
            raise TableError(f"unknown benchmark {kind!r}")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str, name: str = "file") -> str:
    """``text`` with everything between the bench-table markers replaced by ``block``."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise TableError(f"{name}: no {BEGIN} ... {END} markers")
    return text[: i + len(BEGIN)] + "\n" + block + text[j:]


def load_results(directory: Path) -> list[dict]:
    """Every ``*.json`` under ``directory`` (sorted by name) as a dict."""
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            out.append(json.loads(path.read_text().strip().splitlines()[-1]))
        except (ValueError, IndexError) as e:
            raise TableError(f"{path}: not a benchmark's JSON line ({e})") from None
    if not out:
        raise TableError(f"{directory}: no *.json results")
    return out


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    try:
        block = render_table(load_results(Path(args.results)))
        for name in (args.readme, args.doc):
            path = Path(name)
            if not path.exists():
                raise TableError(f"{path}: no such file")
            _write_atomic(path, replace_block(path.read_text(), block, str(path)))
    except TableError as e:
        print(f"readme_table: {e}", file=sys.stderr)
        return 1
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
