"""Progress output for long stages (generation, training, the demo's SFT rounds), fit for terminals and logs.

In a terminal it is tqdm's bar. When the stream is not a terminal (a SLURM log, CI, a piped
demo) a redrawn bar would write one line per update, thousands per stage; there it prints a
plain line instead, at most one each time another 5% of the total is done or 30 s have
passed since the last line, whichever comes first, plus a last line at ``close()``::

    generate it0: 250/1000 (25%) 41 s, tok_s=612.3

So a stage writes at most 21 lines however many units it counts (fewer when it has fewer than 20),
plus one per 30 s of a slow stretch.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # off a terminal: the longest silence between two progress lines
LOG_STEP_FRACTION = 0.05  # ... and one line per this share of the total


def progress_bar(**kwargs):
    """``tqdm(**kwargs)`` in a terminal; off a terminal, a :class:`LogProgress` with the same calls.

    Takes tqdm's keyword arguments (``total``, ``initial``, ``desc``, ``disable``, ``file``, ...;
    ``file`` defaults to stderr, as tqdm's). Both objects support ``update``, ``set_postfix``,
    ``write`` and ``close``.
    """
    stream = kwargs.get("file") or sys.stderr
    if _isatty(stream):
        return tqdm(**kwargs)
    return LogProgress(total=kwargs.get("total"), desc=kwargs.get("desc") or "", initial=kwargs.get("initial") or 0,
                       disable=bool(kwargs.get("disable")), file=stream)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class LogProgress:
    """Progress as plain lines, for streams that are not terminals (see the module docstring).

    total: units of work (None: unknown, then only the 30 s rule applies); initial: units done
    before this process started (a resumed stage). ``clock`` is injectable for tests.
    """

    def __init__(self, total: Optional[int], desc: str = "", initial: int = 0, disable: bool = False,
                 file: Optional[TextIO] = None, interval_s: float = LOG_INTERVAL_S,
                 step_fraction: float = LOG_STEP_FRACTION, clock=time.monotonic):
        self.total, self.desc, self.n, self.disable = total, desc, initial, disable
        self.file = file
        self._interval, self._clock = interval_s, clock
        self._step = total * step_fraction if total else None  # units per line (a float: at most 20 lines)
        self._start = self._last_time = clock()
        self._last_n = initial
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; prints a line when the 5% or 30 s rule says so."""
        self.n += n
        if self.disable:
            return
        now = self._clock()
        stepped = self._step is not None and int(self.n / self._step) > int(self._last_n / self._step)
        if stepped or now - self._last_time >= self._interval:
            self._print(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Values shown after the count on the next line (``refresh`` is accepted and ignored: no redraws here)."""
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, text: str) -> None:
        """A message line (tqdm.write's counterpart)."""
        print(text, file=self._stream(), flush=True)

    def close(self) -> None:
        """Print the final count, unless the last line already showed it."""
        if not self.disable and self.n != self._last_n:
            self._print(self._clock())
        self.disable = True

    def _stream(self) -> TextIO:
        return self.file or sys.stderr

    def _print(self, now: float) -> None:
        self._last_time, self._last_n = now, self.n
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        tail = f", {self._postfix}" if self._postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{count} {now - self._start:.0f} s{tail}", file=self._stream(), flush=True)


class TokenRateBar:
    """A per-sample progress bar showing generated tokens/s; ``on_finish(n_tokens)`` per finished sample."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._clock = time.perf_counter
        self._start = self._clock()
        self.tokens = 0
        self._bar = progress_bar(total=total, desc=desc, unit="sample", dynamic_ncols=True) if enabled else None

    def on_finish(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        if self._bar is not None:
            # Postfix without refresh: a forced redraw per sample is what flooded logs.
            self._bar.set_postfix(tok_s=f"{self.tokens / max(self._clock() - self._start, 1e-9):.1f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
