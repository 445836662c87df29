"""Progress bars that stay readable in logs: redrawn at most every 30 s when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(**kwargs) -> tqdm:
    """``tqdm(**kwargs)`` with a log-friendly refresh interval off a TTY (SLURM logs, CI, piped demos)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("maxinterval", 60.0)
    return tqdm(**kwargs)


class TokenRateBar:
    """A per-sample progress bar showing generated tokens/s; ``on_finish(n_tokens)`` per finished sample."""

    def __init__(self, total: int, desc: str, enabled: bool):
        import time

        self._clock = time.perf_counter
        self._start = self._clock()
        self.tokens = 0
        self._bar = progress_bar(total=total, desc=desc, unit="sample", dynamic_ncols=True) if enabled else None

    def on_finish(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(tok_s=f"{self.tokens / max(self._clock() - self._start, 1e-9):.1f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
