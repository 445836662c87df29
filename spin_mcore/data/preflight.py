"""Pre-flight: the data checks a command runs in the launching process, before any rank starts.

    check_data(cfg)                      run, eval: records, split sizes, tokenizer vs model
    check_data(cfg, heldout=False)       generate: held-out prompts are not needed
    check_data(cfg, records=False)       train: reads pair stages, not data.path; tokenizer only

What it checks (each failure is one ValueError line naming the file and line, or the field):
  * ``data.loader=dali``: NVIDIA DALI imports;
  * ``data.tokenizer`` (when set) loads; its vocabulary is no larger than ``model.vocab_size``,
    and its BOS/EOS/PAD ids are inside it. A smaller tokenizer is accepted (HF models often
    round their vocabulary up): the data never holds the extra ids, and a tokenizer refuses
    to decode an id outside its vocabulary rather than dropping it;
  * ``data.path`` (when set) loads: every line parses (the loader's errors name the file and
    line: malformed JSON, UTF-16 files, unknown chat roles, ...) and there is at least one record;
  * the split leaves at least one training prompt, at least one held-out prompt at a positive
    ``data.heldout_fraction`` (``run`` and ``eval`` need one: every iterate is evaluated on
    them), and ``data.num_prompts`` fits;
  * the first record tokenises with ``data.template`` and the length limits.

Cost: one pass over the data file (JSON parsing, no tokenisation past the first record) and one
tokenizer load; the ranks then load the same file again, which keeps them independent of this.
"""

from __future__ import annotations

from pathlib import Path

from spin_mcore.config import ConfigError


def check_tokenizer(tok, model_cfg, source: str = "") -> None:
    """Refuse a tokenizer whose ids do not all fit the model's embedding (``model.vocab_size`` rows).

    tok: a :class:`~spin_mcore.data.tokenizer.Tokenizer`; source: how to name it (``data.tokenizer=...``).
    Raises :class:`ConfigError` naming both numbers and both fields.
    """
    source = source or f"data.tokenizer={tok.path}"
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"{source} has {tok.vocab_size} tokens but model.vocab_size={model_cfg.vocab_size}: token ids "
            f">= {model_cfg.vocab_size} have no embedding row; set model.vocab_size >= {tok.vocab_size} "
            f"(the tokenizer's vocabulary) or use the model's own tokenizer"
        )
    for name in ("bos_id", "eos_id", "pad_id"):
        token_id = getattr(tok, name, None)
        if token_id is not None and not 0 <= token_id < min(tok.vocab_size, model_cfg.vocab_size):
            raise ConfigError(
                f"{source}: {name.replace('_id', '')} id {token_id} is outside the vocabulary "
                f"(tokenizer {tok.vocab_size} tokens, model.vocab_size={model_cfg.vocab_size})"
            )


def check_data(cfg, *, records: bool = True, heldout: bool = True) -> dict:
    """Run the checks of the module docstring on ``cfg`` (a loaded :class:`~spin_mcore.config.Config`).

    records: check ``data.path`` and its split (False for commands that do not read it).
    heldout: the command needs held-out prompts, so ``data.heldout_fraction=0`` is refused too.
    Unset ``data.path`` / ``data.tokenizer`` are skipped: the commands that need them say so.
    Returns what it found, for logs and tests: ``{"tokenizer_vocab", "records", "train", "heldout"}``
    (None where not checked).
    """
    from spin_mcore.data.records import load_sft_records
    from spin_mcore.data.split import split_records
    from spin_mcore.data.tokenize import tokenize_records
    from spin_mcore.data.tokenizer import load_tokenizer

    d = cfg.data
    if d.loader == "dali":  # a missing or broken DALI: one line here, not a traceback per rank
        from spin_mcore.data.dali_loader import require_dali

        require_dali()
    found = {"tokenizer_vocab": None, "records": None, "train": None, "heldout": None}
    tok = None
    if d.tokenizer is not None:
        tok = load_tokenizer(d.tokenizer)
        check_tokenizer(tok, cfg.model, f"data.tokenizer={d.tokenizer}")
        found["tokenizer_vocab"] = tok.vocab_size
    if not records or d.path is None:
        return found
    if heldout and d.heldout_fraction == 0:
        raise ConfigError(f"data.heldout_fraction=0 leaves no held-out prompt from {d.path}; this command "
                          "evaluates on held-out prompts, so set data.heldout_fraction > 0")
    rows, _ = load_sft_records(d.path, skip_bad_lines=d.skip_bad_lines)
    train, held = split_records(rows, d.heldout_fraction, d.num_prompts, seed=d.seed, source=str(Path(d.path)))
    if tok is not None:
        tokenize_records(train[:1], tok, d.template, d.max_prompt_length, d.max_response_length)
    found.update(records=len(rows), train=len(train), heldout=len(held))
    return found
