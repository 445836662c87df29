"""Load SFT records (prompt x, human response y) from JSONL, JSON, parquet, or an HF datasets directory.

Two record shapes are accepted, per row:
  * ``{"prompt": str, "response": str}``;
  * chat ``{"messages": [{"role", "content"}, ...]}``: the first user message that is
    directly followed by an assistant message gives (prompt, response), as the paper
    does with UltraChat200k. Earlier system messages and later turns are ignored.
    A row with a ``response`` field is read as the first shape even if it also has
    ``messages``; UltraChat's rows (``prompt`` + ``messages``) are read as chat.

Ids come from an ``id`` or ``prompt_id`` field, else ``"<file stem>-<index>"`` where the
index is the 0-based line number (JSONL) or row number (JSON array, parquet, datasets),
so ids do not shift when bad lines are skipped.

Errors are ``ValueError`` naming the file and the 1-based line (or 0-based row): malformed
JSON, invalid UTF-8, a non-object row, missing or non-string fields, an empty prompt or
response, a chat row without a user->assistant turn, duplicate ids. With
``skip_bad_lines=True`` lines that are not valid UTF-8 JSON objects are skipped and counted;
schema errors still raise, because they point at the wrong file or field, not at noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class SFTRecord:
    """One SFT example: ``prompt`` is the raw user text (no template), ``response`` the human answer."""

    id: str
    prompt: str
    response: str


def load_sft_records(path: str | Path, skip_bad_lines: bool = False, split: Optional[str] = None) -> tuple[list[SFTRecord], dict]:
    """Read every record of an SFT data source, in file order.

    path: ``.jsonl``/``.json`` (JSON lines, or one JSON array), ``.parquet``, or a directory
    written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
    split: for a ``DatasetDict`` directory, the split to read; default ``train``, else
    ``train_sft`` (UltraChat200k), else the only split.
    Returns ``(records, stats)``; stats counts ``rows`` (non-blank rows seen), ``loaded``,
    ``skipped_bad_lines``, ``blank_lines``, ``pair_rows`` and ``chat_rows``.
    """
    path = Path(path)
    stats = {"rows": 0, "loaded": 0, "skipped_bad_lines": 0, "blank_lines": 0, "pair_rows": 0, "chat_rows": 0}
    if path.is_dir():
        rows = _datasets_rows(path, split)
    elif not path.exists():
        raise ValueError(f"{path}: SFT data file does not exist")
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path, skip_bad_lines, stats)
    else:
        raise ValueError(f"{path}: unknown SFT data format (expected .jsonl, .json, .parquet or a datasets directory)")

    records: list[SFTRecord] = []
    seen: dict[str, str] = {}
    for where, index, row in rows:
        stats["rows"] += 1
        record, shape = _parse_row(row, where, default_id=f"{path.stem}-{index}")
        if record.id in seen:
            raise ValueError(f"{where}: duplicate id {record.id!r} (first seen at {seen[record.id]})")
        seen[record.id] = where
        stats[f"{shape}_rows"] += 1
        records.append(record)
    stats["loaded"] = len(records)
    return records, stats


# ----------------------------------------------------------------------------- sources
# Each source yields (where, index, row): `where` is the location quoted in errors.


def _json_rows(path: Path, skip_bad_lines: bool, stats: dict) -> Iterator[tuple[str, int, Any]]:
    data = path.read_bytes()
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", i, row
        return
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        where = f"{path}:{i + 1}"
        if not raw.strip():
            if i < len(lines) - 1:  # the piece after a final newline is not a blank line
                stats["blank_lines"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if skip_bad_lines:
                stats["skipped_bad_lines"] += 1
                continue
            raise ValueError(f"{where}: invalid UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            if skip_bad_lines:
                stats["skipped_bad_lines"] += 1
                continue
            raise ValueError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict) and skip_bad_lines:
            stats["skipped_bad_lines"] += 1
            continue
        yield where, i, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: cannot read parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", i, row


def _datasets_rows(path: Path, split: Optional[str]) -> Iterator[tuple[str, int, Any]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: is a directory, and reading HF datasets directories needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a datasets directory written by save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = next((s for s in ("train", "train_sft") if s in ds), names[0] if len(names) == 1 else None)
        if split not in ds:
            raise ValueError(f"{path}: choose a split with split=... (available: {', '.join(names)})")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{path}: holds a single Dataset, split={split!r} does not apply")
    for i, row in enumerate(ds):
        yield f"{path} row {i}", i, row


# ----------------------------------------------------------------------------- rows


def _parse_row(row: Any, where: str, default_id: str) -> tuple[SFTRecord, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("response") is not None:
        prompt, response, shape = row.get("prompt"), row["response"], "pair"
        if prompt is None:
            raise ValueError(f"{where}: missing field 'prompt' (has {sorted(row)})")
    elif row.get("messages") is not None:
        prompt, response = _first_turn(row["messages"], where)
        shape = "chat"
    else:
        raise ValueError(f"{where}: missing fields: need 'prompt' and 'response', or 'messages' (has {sorted(row)})")
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: empty {name}")
    raw_id = row.get("id", row.get("prompt_id"))
    if raw_id is None:
        record_id = default_id
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id):
        record_id = str(raw_id)
    else:
        raise ValueError(f"{where}: id must be a non-empty string or an integer, got {raw_id!r}")
    return SFTRecord(record_id, prompt, response), shape


def _first_turn(messages: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
    for k in range(len(messages) - 1):
        if messages[k]["role"] == "user" and messages[k + 1]["role"] == "assistant":
            return messages[k]["content"], messages[k + 1]["content"]
    raise ValueError(f"{where}: 'messages' has no user message directly followed by an assistant message")
