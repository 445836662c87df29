"""Tokenise SFT records into (prompt ids, response ids) with length limits.

* prompt ids: ``[BOS] + encode(format_prompt(prompt))``. Prompts longer than
  ``max_prompt_length`` are left-truncated: BOS and the *end* of the templated prompt (the
  ``### Response:`` cue the model answers) are kept, the start of the text is dropped.
* response ids: ``encode(response) + [EOS]``, right-truncated to ``max_response_length``
  (a truncated response therefore has no EOS: it did not end).
* prompt and response are encoded separately, as TRL's DPO trainer does, so the
  boundary between x and y is exact.
Every truncation is counted in the returned stats; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from spin_mcore.data.records import SFTRecord
from spin_mcore.data.templates import format_prompt
from spin_mcore.data.tokenizer import Tokenizer


@dataclass
class TokenizedPrompt:
    """One tokenised example: ``prompt_ids`` (BOS + templated prompt) and ``response_ids`` (y + EOS)."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]


def tokenize_records(
    records: Sequence[SFTRecord], tok: Tokenizer, template: str, max_prompt_length: int, max_response_length: int
) -> tuple[list[TokenizedPrompt], dict]:
    """Tokenise every record (order kept).

    Returns ``(prompts, stats)``; stats has ``records``, ``prompts_truncated``,
    ``responses_truncated``, ``prompt_tokens_dropped``, ``response_tokens_dropped``,
    ``max_prompt_tokens`` / ``max_response_tokens`` (before truncation) and the token totals
    after truncation ``prompt_tokens`` / ``response_tokens``.
    """
    bos = [] if tok.bos_id is None else [tok.bos_id]
    if max_prompt_length < len(bos) + 1 or max_response_length < 1:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} must be >= {len(bos) + 1} and max_response_length={max_response_length} >= 1"
        )
    texts = [_strip_bos_text(format_prompt(r.prompt, template, tok), tok) for r in records]
    prompt_bodies = tok.encode_batch(texts)
    responses = tok.encode_batch([r.response for r in records])
    stats = dict.fromkeys(
        ("records", "prompts_truncated", "responses_truncated", "prompt_tokens_dropped", "response_tokens_dropped",
         "max_prompt_tokens", "max_response_tokens", "prompt_tokens", "response_tokens"), 0
    )
    stats["records"] = len(records)
    body_limit = max_prompt_length - len(bos)
    out = []
    for record, body, resp in zip(records, prompt_bodies, responses):
        resp = resp + [tok.eos_id]
        stats["max_prompt_tokens"] = max(stats["max_prompt_tokens"], len(bos) + len(body))
        stats["max_response_tokens"] = max(stats["max_response_tokens"], len(resp))
        if len(body) > body_limit:
            stats["prompts_truncated"] += 1
            stats["prompt_tokens_dropped"] += len(body) - body_limit
            body = body[len(body) - body_limit :]
        if len(resp) > max_response_length:
            stats["responses_truncated"] += 1
            stats["response_tokens_dropped"] += len(resp) - max_response_length
            resp = resp[:max_response_length]
        prompt_ids = bos + body
        stats["prompt_tokens"] += len(prompt_ids)
        stats["response_tokens"] += len(resp)
        out.append(TokenizedPrompt(record.id, prompt_ids, resp))
    return out, stats


def _strip_bos_text(text: str, tok: Tokenizer) -> str:
    # Chat templates such as Llama's start with "{{ bos_token }}"; BOS is added as an id here,
    # so a leading BOS string would give a second BOS.
    if tok.bos_id is not None and tok.bos_token and text.startswith(tok.bos_token):
        return text[len(tok.bos_token) :]
    return text
