"""SFT data path: loaders, errors, templates, tokenizers, truncation, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_mcore.data.records import SFTRecord, load_sft_records
from spin_mcore.data.split import split_records
from spin_mcore.data.templates import CHAT_FALLBACK, format_prompt
from spin_mcore.data.tokenize import TokenizedPrompt, tokenize_records
from spin_mcore.data.tokenizer import load_tokenizer, train_sentencepiece

ROWS = [
    {"prompt": "What is 2+2?", "response": "4."},
    {"id": "q-7", "prompt": "Name a colour.", "response": "Blue."},
    {  # UltraChat shape: prompt + prompt_id + messages, first user->assistant turn wins
        "prompt": "ignored, messages win",
        "prompt_id": "uc1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Second turn"},
            {"role": "assistant", "content": "Not used"},
        ],
    },
]
WANT = [
    SFTRecord("sft-0", "What is 2+2?", "4."),
    SFTRecord("q-7", "Name a colour.", "Blue."),
    SFTRecord("uc1", "Hi there", "Hello!"),
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


# ----------------------------------------------------------------------------- loaders


def test_load_jsonl_both_shapes(tmp_path):
    records, stats = load_sft_records(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    assert records == WANT
    assert stats == {"rows": 3, "loaded": 3, "skipped_bad_lines": 0, "blank_lines": 0, "pair_rows": 2, "chat_rows": 1,
                     "rejects": []}


def test_load_json_array_and_blank_lines(tmp_path):
    (tmp_path / "sft.json").write_text(json.dumps(ROWS))
    assert load_sft_records(tmp_path / "sft.json")[0] == WANT
    # ids come from the 0-based line number, so a blank line shifts nothing but is counted
    path = write_jsonl(tmp_path / "b.jsonl", [ROWS[0], b"", b"  ", ROWS[0]])
    records, stats = load_sft_records(path)
    assert [r.id for r in records] == ["b-0", "b-3"] and stats["blank_lines"] == 2


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # columnar: a null id falls back to "<stem>-<row>"
    table = pa.table({"id": [None, "q-7"], "prompt": [r["prompt"] for r in ROWS[:2]], "response": [r["response"] for r in ROWS[:2]]})
    pq.write_table(table, tmp_path / "sft.parquet")
    records, stats = load_sft_records(tmp_path / "sft.parquet")
    assert records == WANT[:2] and stats["loaded"] == 2


def test_load_datasets_dir(tmp_path):
    import datasets

    chat = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "single"))
    records, stats = load_sft_records(tmp_path / "single")
    assert records == [SFTRecord(f"p{i}", f"q{i}", f"a{i}") for i in range(3)] and stats["chat_rows"] == 3
    dd = datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(chat[:2]), "test_sft": datasets.Dataset.from_list(chat[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [r.id for r in load_sft_records(tmp_path / "dict")[0]] == ["p0", "p1"]  # train_sft by default
    assert [r.id for r in load_sft_records(tmp_path / "dict", split="test_sft")[0]] == ["p2"]


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "a", "response": ', r"b\.jsonl:2: malformed JSON"),
        (b'{"prompt": "caf\xe9", "response": "x"}', r"b\.jsonl:2: invalid UTF-8"),
        (b'{"prompt": "a"}', r"b\.jsonl:2: missing fields"),
        (b'{"response": "a"}', r"b\.jsonl:2: missing field 'prompt'"),
        (b'{"prompt": "  ", "response": "a"}', r"b\.jsonl:2: empty prompt"),
        (b'{"prompt": "a", "response": ""}', r"b\.jsonl:2: empty response"),
        (b'{"prompt": 3, "response": "a"}', r"b\.jsonl:2: field 'prompt' must be a string"),
        (b'[1, 2]', r"b\.jsonl:2: expected a JSON object"),
        (b'{"messages": [{"role": "assistant", "content": "a"}]}', r"b\.jsonl:2: 'messages' has no user message"),
        (b'{"messages": [{"role": "user"}]}', r"b\.jsonl:2: messages\[0\] must be an object"),
        (b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}',
         r"b\.jsonl:2: messages\[1\] has unknown role 'robot' \(known roles: system, developer, user, assistant"),
        (b'{"id": "b-0", "prompt": "a", "response": "b"}', r"b\.jsonl:2: duplicate id 'b-0' \(first seen at .*b\.jsonl:1\)"),
    ],
)
def test_bad_input_errors_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "b.jsonl", [ROWS[0], line, ROWS[1]])
    with pytest.raises(ValueError, match=message):
        load_sft_records(path)


def test_bad_input_other_sources(tmp_path):
    (tmp_path / "a.json").write_bytes(b'[{"prompt": "a", "response": "b"},\n {"prompt": ]')
    with pytest.raises(ValueError, match=r"a\.json:2: malformed JSON"):
        load_sft_records(tmp_path / "a.json")
    (tmp_path / "c.json").write_bytes(b'[{"prompt": "a",\n "response": "\xff"}]')
    with pytest.raises(ValueError, match=r"c\.json:2: invalid UTF-8"):
        load_sft_records(tmp_path / "c.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_sft_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown SFT data format"):
        load_sft_records(tmp_path / "x.csv")


def test_skip_bad_lines_counts(tmp_path):
    from spin_mcore.data.records import skipped_summary, write_rejects

    lines = [ROWS[0], b"{not json", b"\xff\xfe", b"[1]", ROWS[1], b'{"prompt": "x"']
    path = write_jsonl(tmp_path / "s.jsonl", lines)
    records, stats = load_sft_records(path, skip_bad_lines=True)
    assert [r.id for r in records] == ["s-0", "q-7"]
    assert stats["skipped_bad_lines"] == 4 and stats["loaded"] == 2
    # every skipped line: file, 1-based line, reason, raw text (invalid bytes backslash-escaped)
    assert [(r["line"], r["text"]) for r in stats["rejects"]] == [(2, "{not json"), (3, "\\xff\\xfe"), (4, "[1]"),
                                                                  (6, '{"prompt": "x"')]
    assert {r["file"] for r in stats["rejects"]} == {str(path)}
    assert stats["rejects"][1]["reason"].startswith("invalid UTF-8") and "got list" in stats["rejects"][2]["reason"]
    summary = skipped_summary(stats, limit=2)
    assert summary.startswith("skipped 4 bad lines (data.skip_bad_lines=true): line 2: malformed JSON")
    assert "line 3: invalid UTF-8" in summary and summary.endswith("; and 2 more") and "line 4" not in summary
    out = write_rejects(tmp_path / "run" / "rejects.jsonl", stats["rejects"])
    assert [json.loads(x) for x in out.read_text().splitlines()] == stats["rejects"]
    # schema errors are not "bad lines": they still raise
    with pytest.raises(ValueError, match=r"s2\.jsonl:1: empty response"):
        load_sft_records(write_jsonl(tmp_path / "s2.jsonl", [{"prompt": "a", "response": ""}]), skip_bad_lines=True)


def test_empty_and_blank_files_are_refused(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"e\.jsonl: no records: the file is empty"):
        load_sft_records(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\n  \n\n")
    with pytest.raises(ValueError, match=r"b\.jsonl: no records: the file has only blank lines \(3\)"):
        load_sft_records(tmp_path / "b.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b"{x\n[1]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: no records: all 2 non-blank lines are bad .* line 1: malformed"):
        load_sft_records(tmp_path / "bad.jsonl", skip_bad_lines=True)


@pytest.mark.parametrize("encoding, bom, name", [
    ("utf-16-le", b"\xff\xfe", "UTF-16"), ("utf-16-be", b"\xfe\xff", "UTF-16"),
    ("utf-32-le", b"\xff\xfe\x00\x00", "UTF-32"), ("utf-32-be", b"\x00\x00\xfe\xff", "UTF-32"),
    ("utf-16-le", b"", "UTF-16LE"), ("utf-16-be", b"", "UTF-16BE"), ("utf-32-le", b"", "UTF-32LE"),
])
def test_utf16_and_utf32_files_are_named(tmp_path, encoding, bom, name):
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"w{suffix}"
        path.write_bytes(bom + text.encode(encoding))
        for skip in (False, True):  # an encoding is not a bad line: skip_bad_lines does not hide it
            with pytest.raises(ValueError) as err:
                load_sft_records(path, skip_bad_lines=skip)
            msg = str(err.value)
            assert msg.startswith(f"{path}: the file is {name}-encoded") and "\n" not in msg
            assert f"`iconv -f {name} -t UTF-8 {path} > {tmp_path / ('w.utf8' + suffix)}`" in msg


def test_utf8_bom_is_accepted(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "sft.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_sft_records(tmp_path / "sft.jsonl")[0] == WANT
    (tmp_path / "sft.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    assert load_sft_records(tmp_path / "sft.json")[0] == WANT
    # and it converts back: the iconv hint's output is what the loader reads
    (tmp_path / "u16.jsonl").write_bytes(text.encode("utf-16"))
    (tmp_path / "u16.utf8.jsonl").write_bytes((tmp_path / "u16.jsonl").read_bytes().decode("utf-16").encode())
    assert load_sft_records(tmp_path / "u16.utf8.jsonl")[0][0].prompt == WANT[0].prompt


# ----------------------------------------------------------------------------- templates + tokenizers

ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
CORPUS = [f"### Instruction: question number {i} about cats, dogs and café prices?\n\n### Response: answer {i * 7}." for i in range(200)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    train_sentencepiece(CORPUS, out, vocab_size=320, seed=0)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    out = tmp_path_factory.mktemp("hf")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": ZEPHYR}))
    return out


def test_instruction_and_fallback_templates():
    assert format_prompt("Hi?") == "### Instruction: Hi?\n\n### Response: "
    assert format_prompt("Hi?", "chat") == "<|user|>\nHi?\n<|assistant|>\n" == CHAT_FALLBACK.format(prompt="Hi?")
    with pytest.raises(ValueError, match="template='alpaca'"):
        format_prompt("Hi?", "alpaca")


def test_chat_template_matches_transformers(hf_dir):
    from transformers import PreTrainedTokenizerFast

    ours = load_tokenizer(hf_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), eos_token="</s>", bos_token="<s>")
    theirs.chat_template = ZEPHYR
    want = "<|user|>\nHi?</s>\n<|assistant|>\n"
    assert format_prompt("Hi?", "chat", ours) == want
    assert format_prompt("Hi?", "chat", theirs) == want


def test_sentencepiece_train_deterministic_and_round_trip(sp_tok, tmp_path):
    again = train_sentencepiece(CORPUS, tmp_path, vocab_size=320, seed=0)
    assert again.read_bytes() == sp_tok.path.read_bytes()
    assert (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (320, 1, 2, 3)
    for text in ["### Instruction: cats and dogs?\n\n### Response: ", "  two  spaces, ünïcode 你好 \t tab", "42"]:
        ids = sp_tok.encode(text)
        assert sp_tok.bos_id not in ids and sp_tok.eos_id not in ids
        assert sp_tok.decode(ids) == text  # byte fallback + identity normalisation: lossless
    assert sp_tok.decode([1] + sp_tok.encode("cats") + [2]) == "cats"
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_tok.path))
    assert sp_tok.encode_batch(["cats", "dogs"]) == [ref.encode("cats"), ref.encode("dogs")]


def test_hf_tokenizer_json(hf_dir):
    from tokenizers import Tokenizer

    tok = load_tokenizer(hf_dir / "tokenizer.json")
    ref = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, ref.get_vocab_size())
    text = "question about café prices?"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text) + [2]) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=8"):
        train_sentencepiece(CORPUS, tmp_path, vocab_size=8)


# ----------------------------------------------------------------------------- tokenize + split


def test_tokenize_truncation_counts(sp_tok):
    long_prompt = "cats " * 40
    records = [SFTRecord("a", "dogs?", "answer 7."), SFTRecord("b", long_prompt, "cats and dogs " * 20)]
    prompts, stats = tokenize_records(records, sp_tok, "instruction", max_prompt_length=48, max_response_length=16)
    body_a = sp_tok.encode(format_prompt("dogs?"))
    assert prompts[0] == TokenizedPrompt("a", [1] + body_a, sp_tok.encode("answer 7.") + [2])
    body_b = sp_tok.encode(format_prompt(long_prompt))
    resp_b = sp_tok.encode("cats and dogs " * 20) + [2]
    assert len(body_a) + 1 <= 48 < len(body_b) + 1 and len(resp_b) > 16
    assert prompts[1].prompt_ids == [1] + body_b[-47:]  # BOS kept, start of the text dropped
    assert prompts[1].response_ids == resp_b[:16]  # truncated: no EOS
    assert sp_tok.decode(prompts[1].prompt_ids).endswith("### Response: ")
    assert stats == {
        "records": 2,
        "prompts_truncated": 1,
        "responses_truncated": 1,
        "prompt_tokens_dropped": len(body_b) - 47,
        "response_tokens_dropped": len(resp_b) - 16,
        "max_prompt_tokens": len(body_b) + 1,
        "max_response_tokens": len(resp_b),
        "prompt_tokens": len(body_a) + 1 + 48,
        "response_tokens": len(sp_tok.encode("answer 7.")) + 1 + 16,
    }


def test_tokenize_chat_strips_template_bos(hf_dir):
    tok = load_tokenizer(hf_dir)
    tok.chat_template = "{{ bos_token }}" + ZEPHYR  # Llama-style templates start with BOS
    prompts, _ = tokenize_records([SFTRecord("a", "Hi?", "Yo")], tok, "chat", 64, 64)
    assert prompts[0].prompt_ids == [1] + tok.encode("<|user|>\nHi?</s>\n<|assistant|>\n")
    assert prompts[0].prompt_ids.count(1) == 1


def test_split_deterministic_disjoint_nested():
    records = [SFTRecord(str(i), "p", "r") for i in range(1000)]
    train, held = split_records(records, 0.05, seed=3)
    assert (len(train), len(held)) == (950, 50)
    assert split_records(records, 0.05, seed=3) == (train, held)
    assert {r.id for r in train}.isdisjoint({r.id for r in held})
    assert [int(r.id) for r in held] == sorted(int(r.id) for r in held)  # original order kept
    sub, held2 = split_records(records, 0.05, num_prompts=100, seed=3)
    assert held2 == held and len(sub) == 100 and set(sub) <= set(train)
    sub200, _ = split_records(records, 0.05, num_prompts=200, seed=3)
    assert set(sub) <= set(sub200)  # a bigger subsample extends a smaller one
    assert split_records(records, 0.05, seed=4)[1] != held
    with pytest.raises(ValueError, match="num_prompts=951 but only 950 records remain"):
        split_records(records, 0.05, num_prompts=951, seed=3)
    with pytest.raises(ValueError, match="heldout_fraction=1.0"):
        split_records(records, 1.0, seed=3)


def test_split_refuses_zero_heldout_and_names_the_file():
    from spin_mcore.data.split import min_records

    records = [SFTRecord(str(i), "p", "r") for i in range(19)]
    assert [len(x) for x in split_records(records[:11], 0.05, seed=0)] == [10, 1]  # round(0.55) = 1
    with pytest.raises(ValueError, match=r"^d\.jsonl: 10 records leave no held-out prompt at "
                                         r"data\.heldout_fraction=0\.05 \(round\(10 x 0\.05\) = 0\); "
                                         r"give at least 11 records"):
        split_records(records[:10], 0.05, seed=0, source="d.jsonl")
    assert split_records(records[:5], 0.0, seed=0) == (records[:5], [])  # 0 asks for no held-out set
    with pytest.raises(ValueError, match=r"^d\.jsonl: data\.num_prompts=19 but only 18 records remain"):
        split_records(records, 0.05, 19, seed=0, source="d.jsonl")
    # min_records is the exact threshold, including round-half-to-even and large fractions
    for f in (0.05, 0.02, 0.1, 0.3, 0.5, 0.9, 0.99):
        n = min_records(f)
        recs = [SFTRecord(str(i), "p", "r") for i in range(n)]
        train, held = split_records(recs, f, seed=0)
        assert len(train) >= 1 and len(held) >= 1, f
        with pytest.raises(ValueError, match="leave no held-out prompt|leaves no training record"):
            split_records(recs[:-1], f, seed=0)


def test_prepare_sft_data_composes_the_steps(tmp_path, sp_tok):
    from spin_mcore.config import DataConfig
    from spin_mcore.data.prepare import prepare_sft_data

    rows = [{"prompt": f"cats {i}?", "response": f"dogs {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path), tokenizer=str(sp_tok.path), num_prompts=10, heldout_fraction=0.1, seed=5)
    data = prepare_sft_data(cfg)
    records, _ = load_sft_records(path)
    train, held = split_records(records, 0.1, 10, seed=5)
    assert data.train == tokenize_records(train, sp_tok, "instruction", 128, 128)[0]
    assert data.heldout == tokenize_records(held, sp_tok, "instruction", 128, 128)[0]
    assert (len(data.train), len(data.heldout), data.stats["load"]["loaded"]) == (10, 4, 40)
