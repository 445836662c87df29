"""One call from ``cfg.data`` to tokenised train / held-out prompts: load -> split -> tokenise.

The order matters: the split is taken on records (before tokenisation) so the held-out set
depends only on the data file, ``heldout_fraction`` and ``seed``, never on the tokenizer or
the length limits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spin_mcore.data.records import load_sft_records, skipped_summary, write_rejects
from spin_mcore.data.split import split_records
from spin_mcore.data.tokenize import TokenizedPrompt, tokenize_records
from spin_mcore.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class SFTData:
    """Tokenised prompts for training and for held-out evaluation, plus every count along the way."""

    train: list[TokenizedPrompt]
    heldout: list[TokenizedPrompt]
    stats: dict = field(default_factory=dict)


def prepare_sft_data(data_cfg, tok: Optional[Tokenizer] = None, verbose: bool = False,
                     rejects_path: Optional[str | Path] = None) -> SFTData:
    """Load ``data_cfg.path``, split and subsample with ``data_cfg.seed``, tokenise both parts.

    data_cfg: the ``data`` section of the config (path, tokenizer, template, max lengths,
    num_prompts, heldout_fraction, skip_bad_lines, seed). ``tok`` overrides ``data_cfg.tokenizer``.
    stats: ``{"load": ..., "train": tokenize stats, "heldout": tokenize stats}``. With
    ``verbose`` a one-line summary goes to stderr, including any truncation counts, and one
    more line names the first skipped bad lines (``data.skip_bad_lines``). ``rejects_path``
    (e.g. ``RUN/rejects.jsonl``): where the skipped lines are written, atomically, when there are any.
    """
    if data_cfg.path is None:
        raise ValueError("data.path is not set: point it at a .jsonl/.parquet file or a datasets directory")
    if tok is None:
        if data_cfg.tokenizer is None:
            raise ValueError("data.tokenizer is not set: point it at tokenizer.model / tokenizer.json or their directory")
        tok = load_tokenizer(data_cfg.tokenizer)
    records, load_stats = load_sft_records(data_cfg.path, skip_bad_lines=data_cfg.skip_bad_lines)
    train, heldout = split_records(records, data_cfg.heldout_fraction, data_cfg.num_prompts, seed=data_cfg.seed,
                                   source=str(data_cfg.path))
    limits = (data_cfg.template, data_cfg.max_prompt_length, data_cfg.max_response_length)
    train_ids, train_stats = tokenize_records(train, tok, *limits)
    heldout_ids, heldout_stats = tokenize_records(heldout, tok, *limits)
    if rejects_path is not None and load_stats["rejects"]:
        write_rejects(rejects_path, load_stats["rejects"])
    if verbose:
        t = train_stats
        print(
            f"data: {data_cfg.path}: loaded {load_stats['loaded']} (skipped {load_stats['skipped_bad_lines']} bad lines); "
            f"train {len(train_ids)}, held-out {len(heldout_ids)}; truncated {t['prompts_truncated']} prompts "
            f"(-{t['prompt_tokens_dropped']} tokens), {t['responses_truncated']} responses (-{t['response_tokens_dropped']} tokens)",
            file=sys.stderr,
        )
        if load_stats["rejects"]:
            where = f"; all of them in {rejects_path}" if rejects_path is not None else ""
            print(f"data: {data_cfg.path}: {skipped_summary(load_stats)}{where}", file=sys.stderr)
    return SFTData(train_ids, heldout_ids, {"load": load_stats, "train": train_stats, "heldout": heldout_stats})
