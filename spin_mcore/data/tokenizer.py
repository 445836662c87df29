"""Tokenizers: SentencePiece ``tokenizer.model`` and HF ``tokenizer.json``, behind one small interface.

``encode`` never adds BOS/EOS (the data path adds them explicitly, see tokenize.py), and
``decode`` drops special tokens, so ``decode(encode(s)) == s`` for a lossless tokenizer.
A ``tokenizer_config.json`` (or ``chat_template.jinja``) next to the tokenizer file supplies
the special-token names and the chat template, as in an HF model directory.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Optional

from spin_mcore.utils.io import atomic_write_bytes

# Names tried, in order, when no tokenizer_config.json says which tokens are BOS/EOS/PAD.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """Common interface. ``bos_id`` may be None (some vocabularies have no BOS); ``eos_id`` may not.

    ``pad_id`` falls back to ``eos_id`` when the vocabulary has no pad token (padding
    positions are masked out everywhere, so the id only has to be valid).
    """

    path: Path
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    vocab_size: int
    bos_token: str = ""
    eos_token: str = ""
    chat_template: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, batched in the backend for speed."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (BOS/EOS/PAD) are dropped.

        Raises ValueError for an id outside the vocabulary (a model whose ``model.vocab_size``
        exceeds this tokenizer's sampled it): never a crash deep in the backend, never a silent drop.
        """
        raise NotImplementedError

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"{self.path}: token id {bad} is outside this tokenizer's {self.vocab_size} ids "
                             "(is model.vocab_size larger than the tokenizer's vocabulary?)")
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        """Render ``messages`` with this tokenizer's Jinja chat template, as HF ``transformers`` does.

        Only renders text (``tokenize`` exists so callers can use HF's signature and must be False).
        """
        if tokenize:
            raise ValueError("apply_chat_template(tokenize=True) is not supported; call encode() on the text")
        if not self.chat_template:
            raise ValueError(f"{self.path}: tokenizer has no chat_template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
    """Render an HF-style Jinja chat template (sandboxed, trim/lstrip blocks, loop controls)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model``; BOS/EOS/PAD are the model's own control ids."""

    def __init__(self, path: Path, config: dict):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise ValueError(f"{path}: SentencePiece model has no EOS id")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.sp.id_to_piece(self.eos_id)
        self.chat_template = config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(self._checked_ids(ids))


class HFTokenizer(Tokenizer):
    """An HF ``tokenizers`` ``tokenizer.json``; special tokens from tokenizer_config.json or common names."""

    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        self.tok = _Tok.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        bos, self.bos_token = self._special(config, "bos_token", _BOS_NAMES)
        eos, self.eos_token = self._special(config, "eos_token", _EOS_NAMES)
        pad, _ = self._special(config, "pad_token", _PAD_NAMES)
        if eos is None:
            raise ValueError(f"{path}: cannot find the EOS token; set eos_token in tokenizer_config.json next to it")
        self.bos_id, self.eos_id = bos, eos
        self.pad_id = pad if pad is not None else eos
        self.chat_template = config.get("chat_template")

    def _special(self, config: dict, key: str, names: tuple[str, ...]) -> tuple[Optional[int], str]:
        value = config.get(key)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        if value is not None:
            token_id = self.tok.token_to_id(value)
            if token_id is None:
                raise ValueError(f"{self.path}: tokenizer_config.json {key}={value!r} is not in the vocabulary")
            return token_id, value
        for name in names:
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id, name
        return None, ""

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self._checked_ids(ids), skip_special_tokens=True)


def _tokenizer_config(directory: Path) -> dict:
    config: dict = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_path}: invalid JSON: {exc}") from None
    jinja = directory / "chat_template.jinja"  # transformers >= 4.43 may store the template here
    if not config.get("chat_template") and jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (HF), ``tokenizer.model`` (SentencePiece), or a directory holding one.

    A directory with both prefers ``tokenizer.json``, as HF ``transformers`` does.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ValueError(f"{path}: directory holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer file does not exist")
    config = _tokenizer_config(path.parent)
    if path.suffix == ".json":
        return HFTokenizer(path, config)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, config)
    raise ValueError(f"{path}: unknown tokenizer format (expected tokenizer.json or a SentencePiece .model)")


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, seed: int = 0, model_type: str = "bpe"
) -> Path:
    """Train a SentencePiece model on ``texts`` and write ``out_dir/tokenizer.model`` atomically.

    Deterministic for fixed inputs and seed (one thread, no input shuffling or sampling).
    Llama-style ids: unk=0, bos=1, eos=2, plus pad=3. Byte fallback makes every string
    encodable, and identity normalisation keeps ``decode(encode(s)) == s``; byte fallback
    needs ``vocab_size`` >= 260 + the number of distinct characters kept. Returns the path.
    """
    import sentencepiece as spm

    out = Path(out_dir) / "tokenizer.model"
    buf = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([t for t in texts if t]),
            model_writer=buf,
            vocab_size=int(vocab_size),
            model_type=model_type,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            character_coverage=1.0,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"train_sentencepiece(vocab_size={vocab_size}) into {out}: {exc}") from None
    atomic_write_bytes(out, buf.getvalue())
    return out
