"""Atomic file writes and manifests: a killed stage leaves either the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional


def atomic_write_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG at ``path`` atomically, then close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def remove_stale_tmp(parent: str | Path, name: Optional[str] = None) -> list[Path]:
    """Clear what killed writes of ``parent/name`` left behind; returns the paths removed (or restored).

    * ``name.tmp-*``: a directory being saved (model checkpoint, HF export: ``DIR.tmp-<token>``);
    * ``.name.*.tmp``: a file being written by :func:`atomic_write_bytes`;
    * ``name.old-*``: the previous ``DIR`` that ``publish_dir`` moved aside; deleted when ``DIR``
      exists, renamed back to ``DIR`` when the kill came between the two renames (it is complete).

    ``name=None`` clears every such entry in ``parent`` (a stage directory at its start).
    Call it on one process, before the save's own temporary name is chosen, so a live write of
    the same save can never be what it removes.
    """
    import shutil

    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed: list[Path] = []
    olds: list[Path] = []
    for entry in parent.iterdir():
        target = _stale_target(entry.name)
        if target is None or (name is not None and target[0] != name):
            continue
        if target[1] == "old":
            olds.append(entry)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    for old in sorted(olds, key=_mtime, reverse=True):  # the newest old copy is the one to restore
        live = parent / _stale_target(old.name)[0]
        if live.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                old.rename(live)
            except FileNotFoundError:  # another process cleaning the same directory got there first
                continue
        removed.append(old)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _stale_target(entry: str) -> Optional[tuple[str, str]]:
    """``("DIR", "tmp")`` for ``DIR.tmp-x`` / ``.DIR.x.tmp``, ``("DIR", "old")`` for ``DIR.old-x``, else None."""
    for kind in ("tmp", "old"):
        base, sep, token = entry.rpartition(f".{kind}-")
        if sep and base and token and "/" not in token and "." not in token:
            return base, kind
    if entry.startswith(".") and entry.endswith(".tmp"):
        base, sep, _ = entry[1:-4].rpartition(".")  # ".NAME.<random>.tmp" (tempfile.mkstemp in atomic_write_bytes)
        if sep and base:
            return base, "tmp"
    return None
