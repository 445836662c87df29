"""Prompt templates: the text the model sees before its response.

* ``instruction``: the SPIN paper's format, ``"### Instruction: {prompt}\\n\\n### Response: "``.
* ``chat``: the tokenizer's own Jinja chat template (an HF ``transformers`` tokenizer, or a
  :class:`~spin_mcore.data.tokenizer.Tokenizer` that found one in tokenizer_config.json),
  rendered for one user message with the generation prompt appended. Without a template the
  fallback is Zephyr's layout without its end-of-turn tokens:
  ``"<|user|>\\n{prompt}\\n<|assistant|>\\n"`` (:data:`CHAT_FALLBACK`).
"""

from __future__ import annotations

INSTRUCTION_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
CHAT_FALLBACK = "<|user|>\n{prompt}\n<|assistant|>\n"
TEMPLATES = ("instruction", "chat")


def format_prompt(prompt: str, template: str = "instruction", tokenizer=None) -> str:
    """Return the templated prompt text (no BOS; tokenization adds it).

    tokenizer: only used by ``chat``; anything with ``chat_template`` and
    ``apply_chat_template(messages, add_generation_prompt=True)`` (ours or HF's).
    """
    if template == "instruction":
        return INSTRUCTION_TEMPLATE.format(prompt=prompt)
    if template == "chat":
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return CHAT_FALLBACK.format(prompt=prompt)
    raise ValueError(f"template={template!r}: must be one of {', '.join(TEMPLATES)}")

