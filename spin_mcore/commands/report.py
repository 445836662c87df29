"""``spin-mcore report RUN``: where a run's time went, from ``RUN/timeline.jsonl``.

Prints one table row per iteration and stage (wall seconds, share of the iteration, model loads,
bytes read and written) and writes ``RUN/timeline.png``, a Gantt chart of the stages. A missing or
malformed timeline is refused in one line naming the file (and line); exit status 1.
"""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from spin_mcore.timeline import TIMELINE_FILE, format_timeline, plot_timeline, read_timeline

    run_dir = Path(args.run_dir)
    records = read_timeline(run_dir / TIMELINE_FILE)  # TimelineError (a ValueError): one line, exit 1
    print(format_timeline(records))
    png = run_dir / "timeline.png"
    plot_timeline(records, png)
    print(f"plot: {png}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="per-iteration table of stage wall times, loads and bytes, and a Gantt plot",
                       description=__doc__)
    p.add_argument("run_dir", metavar="RUN", help="the run directory (run.dir) holding timeline.jsonl")
    p.set_defaults(func=run)
