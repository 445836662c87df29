"""Where a run's time went: one JSON line per stage in ``RUN/timeline.jsonl``.

    STAGES                         the stage names, shared with the planner (spin_mcore/plan/search.py)
    Timeline(run_dir, pstate)      .stage(t, name) times a block; .record(...) writes a finished one
    read_timeline(path)            the records, or TimelineError naming the file and line
    iteration_table(records)       {iteration: {stage: totals}} (seconds, share, loads, bytes)

A record: ``{"iteration", "stage", "start", "end", "wall_s", "ranks", "loads", "loaded", "bytes_read",
"bytes_written", "resumed"}`` plus stage-specific fields (``set``: train/heldout). ``start``/``end``
are Unix seconds. Only rank 0 writes, one ``os.write`` of one line on an ``O_APPEND`` descriptor,
so a killed run leaves whole lines (a stage killed before its end leaves none).

Model loads and bytes are counted from the outside (:func:`counting_io`): while a stage runs, the
checkpoint readers and writers the stages call (mcore checkpoint load/save, HF import/export, the
training-state writer) are wrapped to tally loads and to add the size of the directory each one read
or wrote. Bytes are whole checkpoint directories (what the job as a whole reads or writes once), not
per rank: every rank loads a model, but a sharded checkpoint is read once in total by the fully
parallel strategies. On CPU every rank is one process, so what rank 0 counts is what every rank does.

``checkpoint`` is measured inside ``training``: the seconds training spent blocked in training-state
saves and the model-only save. The training record's ``wall_s`` excludes them, so the stages of an
iteration add up to its wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

# Every stage of an iteration, in the order it runs. The planner predicts hours for the same names
# (tests/test_timeline.py keeps the two lists equal).
STAGES = ("export", "engine_start", "generation", "reference", "training", "checkpoint", "evaluation")
TIMELINE_FILE = "timeline.jsonl"
REQUIRED_FIELDS = ("iteration", "stage", "start", "end", "wall_s", "ranks", "loads", "bytes_read", "bytes_written")


class TimelineError(ValueError):
    """A timeline that is missing or malformed (the message names the file and line)."""


def dir_bytes(path) -> int:
    """Total size of the files under ``path`` (a file's own size; 0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # pruned while we walk (an older train_state)
                pass
    return total


@dataclass
class Tally:
    """Running totals of this process's checkpoint I/O (what :func:`counting_io` wraps adds to them)."""

    loads: int = 0
    loaded: list = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    checkpoint_s: float = 0.0
    checkpoint_first: Optional[float] = None
    checkpoint_last: Optional[float] = None
    export_s: float = 0.0

    def snapshot(self) -> dict:
        return dict(loads=self.loads, n_loaded=len(self.loaded), bytes_read=self.bytes_read,
                    bytes_written=self.bytes_written, checkpoint_s=self.checkpoint_s, export_s=self.export_s)


TALLY = Tally()
_MEASURE = [True]  # only the writing rank walks directories for their sizes


def _add_load(path) -> None:
    TALLY.loads += 1
    TALLY.loaded.append(str(path))
    if _MEASURE[0]:
        TALLY.bytes_read += dir_bytes(path)


def _add_written(path) -> None:
    if _MEASURE[0] and path is not None:
        TALLY.bytes_written += dir_bytes(path)


def _timed_checkpoint(fn):
    """Seconds training is blocked in ``fn`` count as the checkpoint stage."""
    def wrapper(*args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.time()
            TALLY.checkpoint_s += t1 - t0
            TALLY.checkpoint_first = t0 if TALLY.checkpoint_first is None else TALLY.checkpoint_first
            TALLY.checkpoint_last = t1
    wrapper.__wrapped__ = fn
    return wrapper


def _wrappers() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every checkpoint reader/writer the stages reach.

    Callers import these at call time (or, for the trainer's train-state loader and writer class, look
    them up as module globals / class attributes at call time), so replacing the attribute is seen.
    """
    from spin_mcore.models import checkpoint, hf_convert
    from spin_mcore.training import train_checkpoint, trainer

    def load_ckpt(model, pstate, directory, *a, **k):
        out = orig["load_model_checkpoint"](model, pstate, directory, *a, **k)
        _add_load(directory)
        return out

    def load_hf(model, pstate, path, *a, **k):
        out = orig["load_hf_weights"](model, pstate, path, *a, **k)
        _add_load(path)
        return out

    def load_state(directory, *a, **k):
        out = orig["load_train_checkpoint"](directory, *a, **k)
        _add_load(directory)
        return out

    def save_ckpt(model, pstate, directory, *a, **k):
        out = orig["save_model_checkpoint"](model, pstate, directory, *a, **k)
        _add_written(directory)
        return out

    def export(*a, **k):
        t0 = time.time()
        out = orig["export_hf"](*a, **k)
        TALLY.export_s += time.time() - t0
        _add_written(out)
        return out

    def writer_save(self, *a, **k):
        out = orig["save"](self, *a, **k)
        if self.queue is None:  # synchronous: published on return
            _add_written(self.published)
        return out

    def writer_finalize(name):
        def run(self, *a, **k):
            out = orig[name](self, *a, **k)
            _add_written(out)  # the directory just published, or None
            return out
        return run

    orig = {"load_model_checkpoint": checkpoint.load_model_checkpoint, "load_hf_weights": hf_convert.load_hf_weights,
            "load_train_checkpoint": getattr(trainer, "load_train_checkpoint", None),
            "save_model_checkpoint": checkpoint.save_model_checkpoint, "export_hf": hf_convert.export_hf,
            "save": train_checkpoint.CheckpointWriter.save, "poll": train_checkpoint.CheckpointWriter.poll,
            "finish": train_checkpoint.CheckpointWriter.finish}
    writer = train_checkpoint.CheckpointWriter
    patches = [(checkpoint, "load_model_checkpoint", load_ckpt), (hf_convert, "load_hf_weights", load_hf),
            (trainer, "load_train_checkpoint", load_state),
            (checkpoint, "save_model_checkpoint", _timed_checkpoint(save_ckpt)), (hf_convert, "export_hf", export),
            (writer, "save", _timed_checkpoint(writer_save)),
            (writer, "poll", _timed_checkpoint(writer_finalize("poll"))),
            (writer, "finish", _timed_checkpoint(writer_finalize("finish")))]
    # What another change renamed is skipped (its loads go uncounted) rather than breaking a run.
    return [(owner, name, new) for owner, name, new in patches if getattr(owner, name, None) is not None]


_DEPTH = [0]


@contextlib.contextmanager
def counting_io(measure_sizes: bool = True) -> Iterator[Tally]:
    """Count checkpoint loads, bytes and checkpoint stalls into :data:`TALLY` while inside (re-entrant)."""
    if _DEPTH[0]:
        _DEPTH[0] += 1
        try:
            yield TALLY
        finally:
            _DEPTH[0] -= 1
        return
    patches = _wrappers()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, new in patches:
        setattr(owner, name, new)
    _DEPTH[0], _MEASURE[0] = 1, measure_sizes
    try:
        yield TALLY
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)
        _DEPTH[0] = 0


def append_record(path, record: dict) -> None:
    """One JSON line appended with a single write (a concurrent reader sees whole lines only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class Measured:
    """What a :meth:`Timeline.measured` block did: times, checkpoint I/O, stalls (filled in on exit).

    The block may set ``resumed`` (it had nothing to do) and ``extra`` (fields for its record)."""

    def __init__(self):
        self.resumed = False
        self.extra: dict = {}
        self.start = self.end = 0.0
        self.loads, self.loaded, self.bytes_read, self.bytes_written = 0, [], 0, 0
        self.checkpoint_s, self.checkpoint_span, self.export_s = 0.0, (0.0, 0.0), 0.0

    def io(self) -> dict:
        return dict(loads=self.loads, loaded=self.loaded, bytes_read=self.bytes_read, bytes_written=self.bytes_written)


class Timeline:
    """Writes ``RUN/timeline.jsonl`` (rank 0 only; every rank runs the same blocks)."""

    def __init__(self, run_dir, pstate=None):
        self.path = Path(run_dir) / TIMELINE_FILE
        self.writer = pstate is None or getattr(pstate, "rank", 0) == 0
        self.ranks = int(getattr(pstate, "world_size", 1) or 1)

    def record(self, iteration: int, stage: str, start: float, end: float, wall_s: Optional[float] = None,
               loads: int = 0, loaded: Optional[list] = None, bytes_read: int = 0, bytes_written: int = 0,
               resumed: bool = False, **extra) -> dict:
        """Append one finished stage (``wall_s`` defaults to end - start; 0 when ``resumed``)."""
        if stage not in STAGES:
            raise ValueError(f"timeline stage {stage!r}: not one of {', '.join(STAGES)}")
        wall = 0.0 if resumed else (end - start if wall_s is None else wall_s)
        rec = {"iteration": iteration, "stage": stage, "start": round(start, 3), "end": round(end, 3),
               "wall_s": round(max(wall, 0.0), 3), "ranks": self.ranks, "loads": loads, "loaded": loaded or [],
               "bytes_read": int(bytes_read), "bytes_written": int(bytes_written), "resumed": bool(resumed), **extra}
        if self.writer:
            append_record(self.path, rec)
        return rec

    @contextlib.contextmanager
    def measured(self) -> Iterator[Measured]:
        """Time the block and count the checkpoint I/O it causes; writes nothing (see :meth:`stage`)."""
        m = Measured()
        with counting_io(self.writer):
            before = TALLY.snapshot()
            TALLY.checkpoint_first = None
            m.start = time.time()
            yield m
            m.end = time.time()
            after = TALLY.snapshot()
        m.loads = after["loads"] - before["loads"]
        m.loaded = TALLY.loaded[before["n_loaded"]:after["n_loaded"]]
        m.bytes_read = after["bytes_read"] - before["bytes_read"]
        m.bytes_written = after["bytes_written"] - before["bytes_written"]
        m.checkpoint_s = after["checkpoint_s"] - before["checkpoint_s"]
        m.export_s = after["export_s"] - before["export_s"]
        if TALLY.checkpoint_first is not None:
            m.checkpoint_span = (TALLY.checkpoint_first, TALLY.checkpoint_last)

    @contextlib.contextmanager
    def stage(self, iteration: int, name: str, **extra) -> Iterator[Measured]:
        """Time the block as stage ``name``, with the loads and bytes it caused; nothing is written if it raises.

        Inside ``training``, checkpoint stalls become their own ``checkpoint`` record (and leave training's).
        """
        with self.measured() as m:
            yield m
        io = m.io()
        wall = m.end - m.start
        if name == "training" and m.checkpoint_s > 0:
            self.record(iteration, "checkpoint", *m.checkpoint_span, wall_s=m.checkpoint_s,
                        bytes_written=m.bytes_written, **extra)
            io["bytes_written"] = 0  # the checkpoint record owns what the saves wrote
            wall -= m.checkpoint_s
        self.record(iteration, name, m.start, m.end, wall_s=wall, resumed=m.resumed, **io, **extra, **m.extra)


def read_timeline(path) -> list[dict]:
    """Every record of a timeline file; TimelineError names the file (missing, empty) or the bad line."""
    path = Path(path)
    if not path.is_file():
        raise TimelineError(f"{path}: no timeline (a run writes it as its stages finish)")
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TimelineError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise TimelineError(f"{path}:{n}: not a JSON object")
            missing = [k for k in REQUIRED_FIELDS if k not in rec]
            if missing:
                raise TimelineError(f"{path}:{n}: missing {', '.join(missing)}")
            if rec["stage"] not in STAGES:
                raise TimelineError(f"{path}:{n}: unknown stage {rec['stage']!r}")
            if not all(isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool)
                       for k in REQUIRED_FIELDS if k != "stage"):
                raise TimelineError(f"{path}:{n}: a non-numeric value in {', '.join(REQUIRED_FIELDS[2:])}")
            records.append(rec)
    if not records:
        raise TimelineError(f"{path}: empty timeline")
    return records


def iteration_table(records: list[dict]) -> dict:
    """{iteration: {stage: {"wall_s", "share", "loads", "bytes_read", "bytes_written", "resumed"}}}, stages in
    :data:`STAGES` order; records of the same stage (two prompt sets, a re-run) are summed."""
    out: dict = {}
    for rec in records:
        row = out.setdefault(rec["iteration"], {}).setdefault(
            rec["stage"], {"wall_s": 0.0, "loads": 0, "bytes_read": 0, "bytes_written": 0, "resumed": True})
        for k in ("wall_s", "loads", "bytes_read", "bytes_written"):
            row[k] += rec[k]
        row["resumed"] = row["resumed"] and bool(rec.get("resumed"))
    for t, stages in out.items():
        total = sum(s["wall_s"] for s in stages.values())
        for s in stages.values():
            s["share"] = s["wall_s"] / total if total > 0 else 0.0
        out[t] = {name: stages[name] for name in STAGES if name in stages}
    return dict(sorted(out.items()))


def human_bytes(n: float) -> str:
    """Decimal units, three significant digits: 222 kB, 1.41 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def format_timeline(records: list[dict]) -> str:
    """A markdown table: one row per iteration x stage (seconds, share of the iteration, loads, bytes)."""
    lines = ["| iteration | stage | seconds | share | loads | read | written |",
             "|---|---|---|---|---|---|---|"]
    for t, stages in iteration_table(records).items():
        for name, s in stages.items():
            note = " (resumed)" if s["resumed"] else ""
            lines.append(f"| {t} | {name}{note} | {s['wall_s']:.2f} | {100 * s['share']:.1f}% | {s['loads']} | "
                         f"{human_bytes(s['bytes_read'])} | {human_bytes(s['bytes_written'])} |")
        total = sum(s["wall_s"] for s in stages.values())
        lines.append(f"| {t} | **total** | {total:.2f} | 100.0% | {sum(s['loads'] for s in stages.values())} | "
                     f"{human_bytes(sum(s['bytes_read'] for s in stages.values()))} | "
                     f"{human_bytes(sum(s['bytes_written'] for s in stages.values()))} |")
    return "\n".join(lines)


def plot_timeline(records: list[dict], path) -> None:
    """A Gantt chart of the records (one row per stage, time from the first record's start, one colour per
    iteration), written atomically. Bars are spans (training's includes its checkpoint stalls), except
    ``checkpoint``: the sum of its stalls, drawn ending where the last one ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spin_mcore.utils.io import atomic_write_figure

    t0 = min(r["start"] for r in records)
    names = [s for s in STAGES if any(r["stage"] == s for r in records)]
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    for rec in records:
        y = names.index(rec["stage"])
        width = max(rec["end"] - rec["start"], 1e-3)  # the span (training's includes its checkpoint stalls)
        left = rec["start"] - t0
        if rec["stage"] == "checkpoint":  # stalls scattered over training: their sum, drawn at the end
            width = max(rec["wall_s"], 1e-3)
            left = rec["end"] - t0 - width
        ax.barh(y, width, left=left, color=colors(rec["iteration"] % 10), edgecolor="black",
                linewidth=0.3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first stage")
    iters = sorted({r["iteration"] for r in records})
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors(t % 10)) for t in iters],
              labels=[f"iteration {t}" for t in iters], loc="upper right", fontsize=8)
    ax.set_title("Where the run's time went")
    fig.tight_layout()
    atomic_write_figure(fig, path)
