"""Per-step training metrics: TensorBoard scalars, an append-only ``metrics.jsonl`` and a progress bar.

Only the logging rank writes; every other rank gets a logger whose calls do nothing,
so the loop never branches on the rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines with ``step > last_step`` (logged by a killed run after its last checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
    if len(kept) == len(lines):
        return  # nothing to drop: leave the file as it is
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in kept))


class MetricsLogger:
    """Writes one record per step to ``DIR/metrics.jsonl`` and ``DIR/tensorboard/``, and drives a tqdm bar.

    ``start_step`` is the first step this process will log (after a resume, earlier lines are kept
    and later ones dropped). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, prefix: str = "train"):
        self.enabled = enabled
        self.prefix = prefix
        self._fh = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        truncate_jsonl(self.path, start_step)
        self._fh = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional; the JSONL file is the record
                self._tb = None
        if progress:
            from spin_mcore.utils.progress import progress_bar

            self._bar = progress_bar(total=total_steps, initial=start_step, desc=prefix, dynamic_ncols=True,
                             disable=os.environ.get("SPIN_MCORE_NO_PROGRESS") == "1")

    def log(self, step: int, metrics: dict) -> None:
        """Record ``metrics`` (floats) for 1-based ``step``; flushes so a kill loses nothing logged."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if value is not None:
                    self._tb.add_scalar(f"{self.prefix}/{key}", float(value), step)
            self._tb.flush()
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: metrics[k] for k in ("loss", "accuracy", "margin", "tokens_per_s") if metrics.get(k) is not None}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
