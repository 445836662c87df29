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
response, a chat message with a role outside :data:`KNOWN_ROLES`, a chat row without a
user->assistant turn, duplicate ids, and a source with no records at all. A UTF-16 or UTF-32
file is named as such, with the ``iconv`` line that converts it; a UTF-8 byte-order mark is
accepted. With ``skip_bad_lines=True`` lines that are not valid UTF-8 JSON objects are skipped:
``stats["rejects"]`` lists every one (file, 1-based line, reason, raw text),
:func:`skipped_summary` words the first few for a log and :func:`write_rejects` stores them.
Schema errors still raise, because they point at the wrong file or field, not at noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

# Roles a chat record may use (HF chat templates' names); anything else is a typo or another
# dataset's schema (ShareGPT's "human"/"gpt"), and is refused naming the role.
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# Byte-order marks of encodings that are not UTF-8, longest first (UTF-32 LE starts with UTF-16 LE's).
_FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                 (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_UTF8_BOM = b"\xef\xbb\xbf"


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
    ``skipped_bad_lines``, ``blank_lines``, ``pair_rows`` and ``chat_rows``, and lists the
    skipped lines in ``rejects`` (``{"file", "line", "reason", "text"}`` each, in file order).
    Raises ValueError naming the file when it holds no record at all.
    """
    path = Path(path)
    stats = {"rows": 0, "loaded": 0, "skipped_bad_lines": 0, "blank_lines": 0, "pair_rows": 0, "chat_rows": 0,
             "rejects": []}
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
    if not records:
        raise ValueError(_no_records_message(path, stats))
    return records, stats


def _no_records_message(path: Path, stats: dict) -> str:
    if stats["skipped_bad_lines"]:
        first = stats["rejects"][0]
        return (f"{path}: no records: all {stats['skipped_bad_lines']} non-blank lines are bad and were skipped "
                f"(data.skip_bad_lines=true); the first, line {first['line']}: {first['reason']}")
    if stats["blank_lines"]:
        return f"{path}: no records: the file has only blank lines ({stats['blank_lines']})"
    return f"{path}: no records: the {'dataset' if path.is_dir() else 'file'} is empty"


def skipped_summary(stats: dict, limit: int = 5) -> str:
    """One log line naming the first ``limit`` skipped lines and why, e.g.
    ``skipped 3 bad lines: line 2: malformed JSON: ...; line 5: invalid UTF-8 ...``; "" when none."""
    rejects = stats.get("rejects") or []
    if not rejects:
        return ""
    shown = "; ".join(f"line {r['line']}: {r['reason']}" for r in rejects[:limit])
    more = f"; and {len(rejects) - limit} more" if len(rejects) > limit else ""
    return f"skipped {len(rejects)} bad line{'s' if len(rejects) != 1 else ''} (data.skip_bad_lines=true): {shown}{more}"


def write_rejects(path: str | Path, rejects: list[dict]) -> Path:
    """Write the skipped lines as JSONL (``{"file", "line", "reason", "text"}`` per line) atomically."""
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    return Path(path)


def check_encoding(path: Path, data: bytes) -> bytes:
    """``data`` without a UTF-8 byte-order mark; ValueError naming the encoding of a UTF-16/UTF-32 file.

    Files without a mark are recognised by the NUL bytes that ASCII text gets in those encodings.
    """
    for bom, name in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise ValueError(_convert_hint(path, name, "it starts with a byte-order mark"))
    if data.startswith(_UTF8_BOM):
        return data[len(_UTF8_BOM):]
    head = data[:4]
    if len(head) == 4 and b"\x00" in head:
        name = "UTF-32" if head.count(b"\x00") == 3 else "UTF-16"
        order = "LE" if head[0] != 0 else "BE"
        raise ValueError(_convert_hint(path, name + order, "it has NUL bytes between its characters"))
    return data


def _convert_hint(path: Path, encoding: str, why: str) -> str:
    out = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (f"{path}: the file is {encoding}-encoded ({why}), SFT data must be UTF-8; convert it with "
            f"`iconv -f {encoding} -t UTF-8 {path} > {out}`")


# ----------------------------------------------------------------------------- sources
# Each source yields (where, index, row): `where` is the location quoted in errors.


def _json_rows(path: Path, skip_bad_lines: bool, stats: dict) -> Iterator[tuple[str, int, Any]]:
    data = check_encoding(path, path.read_bytes())
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

    def skip(i: int, raw: bytes, reason: str) -> None:
        stats["skipped_bad_lines"] += 1
        stats["rejects"].append({"file": str(path), "line": i + 1, "reason": reason,
                                 "text": raw.decode("utf-8", errors="backslashreplace")})

    for i, raw in enumerate(lines):
        where = f"{path}:{i + 1}"
        if not raw.strip():
            if i < len(lines) - 1:  # the piece after a final newline is not a blank line
                stats["blank_lines"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"invalid UTF-8 ({exc.reason} at byte {exc.start} of the line)"
            if skip_bad_lines:
                skip(i, raw, reason)
                continue
            raise ValueError(f"{where}: {reason}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = f"malformed JSON: {exc.msg} (column {exc.colno})"
            if skip_bad_lines:
                skip(i, raw, reason)
                continue
            raise ValueError(f"{where}: {reason}") from None
        if not isinstance(row, dict) and skip_bad_lines:
            skip(i, raw, f"expected a JSON object, got {type(row).__name__}")
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
        if msg["role"] not in KNOWN_ROLES:
            raise ValueError(f"{where}: messages[{k}] has unknown role {msg['role']!r} "
                             f"(known roles: {', '.join(KNOWN_ROLES)})")
    for k in range(len(messages) - 1):
        if messages[k]["role"] == "user" and messages[k + 1]["role"] == "assistant":
            return messages[k]["content"], messages[k + 1]["content"]
    raise ValueError(f"{where}: 'messages' has no user message directly followed by an assistant message")
