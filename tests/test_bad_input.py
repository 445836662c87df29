"""Bad input through the CLI a user runs: one error line naming the file/line/field, before any process starts.

Also the pieces of the same issue that are not errors: skipped lines reported and written to
RUN/rejects.jsonl, progress output fit for logs, and killed saves' temporary directories removed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "spin_mcore" / "demo_data" / "arith.jsonl"
TOKENIZER_VOCAB = 320


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 300-record slice of the demo data and a 320-piece SentencePiece tokenizer trained on it."""
    from spin_mcore.data.templates import format_prompt
    from spin_mcore.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("bad_input")
    lines = SHIPPED.read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    (root / "ok.jsonl").write_text("".join(lines), encoding="utf-8")
    (root / "theta0").mkdir()  # run.init_checkpoint must exist; nothing here loads it
    recs = [json.loads(x) for x in lines]
    tok = train_sentencepiece([format_prompt(r["prompt"], "instruction") + r["response"] for r in recs],
                              root / "tokenizer", vocab_size=TOKENIZER_VOCAB, seed=0)
    return SimpleNamespace(root=root, ok=root / "ok.jsonl", tok=tok, lines=lines)


def _overrides(inputs, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model.preset=tiny", f"model.vocab_size={TOKENIZER_VOCAB}", f"data.path={data}",
            f"data.tokenizer={inputs.tok}", f"run.init_checkpoint={inputs.root / 'theta0'}", f"run.dir={run_dir}",
            *extra]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a command gets as far as starting ranks."""
    import spin_mcore.launcher

    def refuse(*args, **kwargs):
        raise AssertionError("a process was started: the pre-flight let bad input through")

    monkeypatch.setattr(spin_mcore.launcher, "run_local", refuse)
    monkeypatch.delenv("RANK", raising=False)


def _cli(capsys, argv: list[str]) -> str:
    """Run ``spin-mcore argv`` in-process; assert it fails fast with one stderr line; return that line."""
    from spin_mcore.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert seconds < 20, f"took {seconds:.1f} s: the check should run before any process starts"
    return lines[0]


def _no_outputs(directory: Path) -> bool:
    """Nothing was produced in ``directory``: absent, or holding only the CLI's error.log."""
    return not directory.exists() or {p.name for p in directory.iterdir()} <= {"error.log"}


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ----------------------------------------------------------------------------- spin-mcore run

CASES = {
    # name: (file content, extra overrides, substrings the one line must hold)
    "empty": (b"", [], ["empty.jsonl: no records: the file is empty"]),
    "blank": (b"\n \n\n", [], ["blank.jsonl: no records: the file has only blank lines"]),
    "small": (None, [], ["small.jsonl: 10 records leave no held-out prompt at data.heldout_fraction=0.05",
                         "give at least 11 records"]),
    "utf16": ("utf-16", [], ["utf16.jsonl: the file is UTF-16-encoded", "iconv -f UTF-16 -t UTF-8"]),
    "utf32": ("utf-32", [], ["utf32.jsonl: the file is UTF-32-encoded", "iconv -f UTF-32 -t UTF-8"]),
    "robot": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}\n', [],
              ["robot.jsonl:1: messages[1] has unknown role 'robot'", "known roles: system, developer, user, assistant"]),
    "all_bad": (b"{oops\n[1, 2]\n", ["data.skip_bad_lines=true"],
                ["all_bad.jsonl: no records: all 2 non-blank lines are bad", "line 1: malformed JSON"]),
    "malformed": (None, [], ["malformed.jsonl:4: malformed JSON"]),
    "no_heldout": (None, ["data.heldout_fraction=0"], ["data.heldout_fraction=0 leaves no held-out prompt"]),
    "vocab": (None, ["model.vocab_size=256"],
              [f"has {TOKENIZER_VOCAB} tokens but model.vocab_size=256", "data.tokenizer="]),
    "num_prompts": (None, ["data.num_prompts=1000"], ["ok.jsonl: data.num_prompts=1000 but only 285 records remain"]),
    # every setting by its type and bounds (list items too), before anything reads the data
    "lr_word": (None, ["train.lr=[abc]"], ["config error: train.lr[0]='abc': expected a number"]),
    "beta_word": (None, ["spin.beta=[0.1,abc]"], ["config error: spin.beta[1]='abc': expected a number"]),
    "micro_zero": (None, ["train.micro_batch_size=0"], ["config error: train.micro_batch_size=0: must be >= 1"]),
    "lr_negative": (None, ["train.lr=[5e-7,-1e-7]"], ["train.lr[1]=-1e-07: must be > 0"]),
    "lr_empty": (None, ["train.lr=[]"], ["train.lr=[]: expected at least one value"]),
    "lr_nan": (None, ["train.lr=[nan]"], ["train.lr[0]='nan': expected a number"]),
    "percent": (None, ["data.heldout_fraction=5"], ["data.heldout_fraction=5.0: must be in [0, 1)"]),
    "top_p": (None, ["generation.top_p=0"], ["generation.top_p=0.0: must be in (0, 1]"]),
    "temperature": (None, ["generation.temperature=-0.7"], ["generation.temperature=-0.7: must be >= 0"]),
    "tp_half": (None, ["parallel.tp=1.5"], ["parallel.tp=1.5: expected an integer"]),
    "epochs_word": (None, ["train.epochs=two"], ["train.epochs='two': expected an integer"]),
    "bool_typo": (None, ["data.skip_bad_lines=ture"], ["data.skip_bad_lines='ture': expected true or false"]),
    "template": (None, ["data.template=chatml"], ["data.template='chatml': must be one of instruction, chat"]),
    "lr_mapping": (None, ["train.lr={peak: 1e-5}"], ["train.lr[0]={'peak': '1e-5'}: expected a number"]),
    "instances": (None, ["generation.engine_instances=all"], ["generation.engine_instances='all': expected auto or "
                                                               "an integer"]),
    "memory": (None, ["generation.engine_memory_fraction=90"], ["generation.engine_memory_fraction=90.0: must be in "
                                                                 "(0, 1]"]),
    "keep": (None, ["train.keep_checkpoints=-1"], ["train.keep_checkpoints=-1: must be >= 0"]),
    "warmup": (None, ["train.warmup_fraction=1"], ["train.warmup_fraction=1.0: must be in [0, 1)"]),
    "field_typo": (None, ["train.micro_batchsize=2"], ["train.micro_batchsize: unknown field (did you mean "
                                                       "train.micro_batch_size? known: adam_beta1, "]),
    "section_typo": (None, ["trian.lr=[1e-5]"], ["trian: unknown field (did you mean train? known: data, "]),
    "near_field": (None, ["spin.betas=[0.1]"], ["spin.betas: unknown field (did you mean spin.beta? known:"]),
}


def _case_file(inputs, tmp_path: Path, name: str) -> Path:
    content = CASES[name][0]
    if name == "small":
        return _write(tmp_path / "small.jsonl", "".join(inputs.lines[:10]))
    if name == "malformed":
        return _write(tmp_path / "malformed.jsonl", "".join(inputs.lines[:3]) + '{"prompt": "x", \n')
    if content in ("utf-16", "utf-32"):  # Python's codecs write the byte-order mark
        return _write(tmp_path / f"{name}.jsonl", "".join(inputs.lines).encode(content))
    if content is None:
        return inputs.ok
    return _write(tmp_path / f"{name}.jsonl", content)


@pytest.mark.parametrize("name", list(CASES))
def test_run_refuses_bad_input_in_one_line(inputs, tmp_path, capsys, no_launch, name):
    data = _case_file(inputs, tmp_path, name)
    run_dir = tmp_path / "run"
    line = _cli(capsys, ["run", *_overrides(inputs, data, run_dir, *CASES[name][1])])
    for part in CASES[name][2]:
        assert part in line, line
    assert line.startswith("spin-mcore run: ")
    assert _no_outputs(run_dir)


def test_run_accepts_utf8_bom_and_good_data(inputs, tmp_path, monkeypatch):
    """The pre-flight lets good input through: the command reaches the launcher (stubbed here)."""
    import spin_mcore.launcher

    launched = []
    monkeypatch.setattr(spin_mcore.launcher, "run_local", lambda fn, n, *a, **k: launched.append(a) or [[]])
    monkeypatch.delenv("RANK", raising=False)
    from spin_mcore.cli import main

    bom = _write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + inputs.ok.read_bytes())
    for data in (inputs.ok, bom):
        assert main(["run", *_overrides(inputs, data, tmp_path / "run")]) == 0
    assert len(launched) == 2


def test_preflight_reports_counts(inputs):
    from spin_mcore.config import load_config
    from spin_mcore.data.preflight import check_data

    cfg = load_config(overrides=_overrides(inputs, inputs.ok, Path("unused")))
    assert check_data(cfg) == {"tokenizer_vocab": TOKENIZER_VOCAB, "records": 300, "train": 285, "heldout": 15}
    assert check_data(cfg, records=False)["records"] is None


# ----------------------------------------------------------------------------- generate / train / eval


def test_generate_train_eval_run_the_same_preflight(inputs, tmp_path, capsys, no_launch):
    small = _write(tmp_path / "small.jsonl", "".join(inputs.lines[:10]))
    over = _overrides(inputs, small, tmp_path / "run")
    line = _cli(capsys, ["generate", *over, "--out", str(tmp_path / "gen")])
    assert line.startswith("spin-mcore generate: ") and "small.jsonl: 10 records leave no held-out prompt" in line
    # generate needs no held-out prompts: heldout_fraction=0 passes the pre-flight, a vocab mismatch does not
    line = _cli(capsys, ["generate", *_overrides(inputs, inputs.ok, tmp_path / "run", "data.heldout_fraction=0",
                                                 "model.vocab_size=300"), "--out", str(tmp_path / "gen")])
    assert f"has {TOKENIZER_VOCAB} tokens but model.vocab_size=300" in line
    # train reads --data stage directories, not data.path: only the tokenizer is checked
    line = _cli(capsys, ["train", *over, "model.vocab_size=128", "--data", str(tmp_path / "pairs"),
                         "--out", str(tmp_path / "train")])
    assert line.startswith("spin-mcore train: ") and f"has {TOKENIZER_VOCAB} tokens but model.vocab_size=128" in line
    line = _cli(capsys, ["eval", *over, "--checkpoint", str(tmp_path / "ck"), "--pairs", str(tmp_path / "p"),
                         "--out", str(tmp_path / "eval")])
    assert line.startswith("spin-mcore eval: ") and "small.jsonl: 10 records leave no held-out prompt" in line
    assert all(_no_outputs(tmp_path / d) for d in ("run", "gen", "train", "eval"))


SPIN = Path(sys.executable).parent / "spin-mcore"  # the installed console script


def test_console_script_refuses_a_mistyped_setting_in_one_line(inputs, tmp_path):
    """The issue's three tracebacks (TypeError on '<' twice, ZeroDivisionError) through the installed script:
    one line, exit 1, nothing written. The three run side by side (each start-up imports torch)."""
    cases = {"train.lr=[abc]": "config error: train.lr[0]='abc': expected a number",
             "spin.beta=[0.1,abc]": "config error: spin.beta[1]='abc': expected a number",
             "train.micro_batch_size=0": "config error: train.micro_batch_size=0: must be >= 1"}
    procs = {override: subprocess.Popen([str(SPIN), "run", *_overrides(inputs, inputs.ok, tmp_path / "run", override)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for override in cases}
    for override, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and err.strip() == f"spin-mcore run: {cases[override]}", (override, err)
    assert _no_outputs(tmp_path / "run")


def test_every_field_is_typed_and_bounded():
    """No field is left untyped (Any, bare list) and each size/rate/fraction carries bounds in its metadata."""
    import dataclasses
    import typing

    from spin_mcore.config import Config

    loose, unbounded = [], []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp in (typing.Any, list) or (typing.get_origin(tp) is list and not typing.get_args(tp)):
                loose.append(f"{section.name}.{f.name}")
            numeric = {int, float} & ({tp} | set(typing.get_args(tp)))
            if numeric and not {"ge", "gt", "le", "lt"} & set(f.metadata):
                unbounded.append(f"{section.name}.{f.name}")
    assert loose == [] and unbounded == [], (loose, unbounded)


def test_console_script_prints_one_line(inputs, tmp_path):
    """The real entry point in a fresh interpreter: exit status != 0, one stderr line, no traceback."""
    data = _write(tmp_path / "w.jsonl", "".join(inputs.lines).encode("utf-16"))
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.cli", "run", *_overrides(inputs, data, tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spin-mcore run"), proc.stderr
    assert lines[0].endswith(
        f"{data}: the file is UTF-16-encoded (it starts with a byte-order mark), SFT data must be UTF-8; "
        f"convert it with `iconv -f UTF-16 -t UTF-8 {data} > {tmp_path / 'w.utf8.jsonl'}`"), proc.stderr
    assert _no_outputs(tmp_path / "run")


# ----------------------------------------------------------------------------- tokenizer vs model


def test_special_ids_and_decode_out_of_range(inputs):
    from spin_mcore.config import ConfigError, ModelConfig
    from spin_mcore.data.preflight import check_tokenizer
    from spin_mcore.data.tokenizer import load_tokenizer

    tok = load_tokenizer(inputs.tok)
    check_tokenizer(tok, ModelConfig(vocab_size=TOKENIZER_VOCAB))  # equal: fine
    check_tokenizer(tok, ModelConfig(vocab_size=1001))  # smaller tokenizer: fine (padded embedding)
    fake = SimpleNamespace(path="t.json", vocab_size=300, bos_id=1, eos_id=300, pad_id=None)
    with pytest.raises(ConfigError, match=r"^data.tokenizer=t.json: eos id 300 is outside the vocabulary "
                                          r"\(tokenizer 300 tokens, model.vocab_size=512\)"):
        check_tokenizer(fake, ModelConfig(vocab_size=512))
    # the crash: a model larger than its tokenizer sampled id 700; decode names it instead of IndexError
    assert tok.decode(tok.encode("12 + 3")) == "12 + 3"
    with pytest.raises(ValueError, match=rf"token id 700 is outside this tokenizer's {TOKENIZER_VOCAB} ids"):
        tok.decode([5, 700, 6])


# ----------------------------------------------------------------------------- data.skip_bad_lines


def test_skipped_lines_reported_and_written_to_run_dir(inputs, tmp_path, capsys):
    from spin_mcore.config import load_config
    from spin_mcore.loop import prepare

    bad = [b"{oops\n", b"\xff\xfe garbage\n", b"[1, 2]\n", b'{"prompt": \n', b"nope\n", b"{}}\n", b"{{\n"]
    body = b"".join(x.encode() for x in inputs.lines[:40])
    data = _write(tmp_path / "noisy.jsonl", b"".join(bad) + body)
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=_overrides(inputs, data, run_dir, "data.skip_bad_lines=true", "data.heldout_fraction=0.1"))
    prepared = prepare(cfg, SimpleNamespace(is_logging_rank=True))
    assert len(prepared.train) + len(prepared.heldout) == 40
    err = capsys.readouterr().err.splitlines()
    assert err[1].startswith(f"data: {data}: skipped 7 bad lines (data.skip_bad_lines=true): line 1: malformed JSON")
    assert all(f"line {i}:" in err[1] for i in range(1, 6)) and "line 6:" not in err[1]
    assert err[1].endswith(f"; and 2 more; all of them in {run_dir / 'rejects.jsonl'}")
    rejects = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(data), i) for i in range(1, 8)]
    assert rejects[0]["text"] == "{oops" and rejects[1]["text"] == "\\xff\\xfe garbage"
    assert rejects[2]["reason"] == "expected a JSON object, got list"
    # a clean file writes no rejects file; ranks other than the logging one never write it
    cfg = load_config(overrides=_overrides(inputs, inputs.ok, tmp_path / "clean", "data.skip_bad_lines=true"))
    prepare(cfg, SimpleNamespace(is_logging_rank=True))
    assert not (tmp_path / "clean" / "rejects.jsonl").exists()


# ----------------------------------------------------------------------------- progress in logs


def test_progress_off_a_terminal_is_a_few_lines():
    from spin_mcore.utils.progress import LogProgress, TokenRateBar, progress_bar

    out = io.StringIO()  # not a TTY, as a SLURM log
    bar = progress_bar(total=1000, desc="generate it0", file=out)
    assert isinstance(bar, LogProgress)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(tok_s="12.5")  # refresh=True by default: must not force a line
    bar.close()
    lines = out.getvalue().splitlines()
    assert 20 <= len(lines) <= 21 and "\r" not in out.getvalue()
    assert lines[0].startswith("generate it0: 50/1000 (5%) ") and lines[-1].startswith("generate it0: 1000/1000 (100%)")
    # slow updates: one line per 30 s at most, even below the next 5%
    clock = iter(range(0, 10_000, 31))
    out = io.StringIO()
    slow = LogProgress(total=1000, desc="train", file=out, clock=lambda: next(clock))
    for _ in range(3):
        slow.update(1)
    assert out.getvalue().splitlines() == ["train: 1/1000 (0%) 31 s", "train: 2/1000 (0%) 62 s",
                                           "train: 3/1000 (0%) 93 s"]
    # the generation bar goes through the same helper (stderr here is pytest's capture, not a TTY)
    rate = TokenRateBar(100, "gen", enabled=True)
    assert isinstance(rate._bar, LogProgress)
    rate.close()


def test_progress_in_a_terminal_is_tqdm():
    from tqdm import tqdm

    from spin_mcore.utils.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(total=10, desc="x", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


# ----------------------------------------------------------------------------- killed saves


def test_remove_stale_tmp(tmp_path):
    from spin_mcore.utils.io import remove_stale_tmp

    for d in ("theta_1.tmp-1a2b", "theta_1.tmp-ffff/model", "theta_2.tmp-0c0c", "theta_1", "other", "hf.old-77"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "hf.old-77" / "config.json").write_text("{}")
    for f in (".theta_1.abc_123.tmp", "theta_1.tmp-notes.txt", "keep.tmp"):
        (tmp_path / f).write_text("x")
    removed = remove_stale_tmp(tmp_path, "theta_1")
    assert sorted(p.name for p in removed) == [".theta_1.abc_123.tmp", "theta_1.tmp-1a2b", "theta_1.tmp-ffff"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["hf.old-77", "keep.tmp", "other", "theta_1", "theta_1.tmp-notes.txt", "theta_2.tmp-0c0c"]
    # killed between publish_dir's two renames: DIR is missing, DIR.old-* is the complete old one
    remove_stale_tmp(tmp_path, "hf")
    assert (tmp_path / "hf" / "config.json").exists() and not (tmp_path / "hf.old-77").exists()
    (tmp_path / "hf.old-88").mkdir()
    remove_stale_tmp(tmp_path)  # everything: DIR exists now, so the old copy goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "keep.tmp", "other", "theta_1",
                                                          "theta_1.tmp-notes.txt"]
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_sharded_stage_start_removes_partial_writes(tmp_path):
    from spin_mcore.utils.shards import ShardedStage, read_stage

    stage = ShardedStage(tmp_path / "gen", "generation", "fp")
    stage.write_shard(0, [{"a": 1}])
    (tmp_path / "gen" / ".shard-00001.jsonl.k1ll3d.tmp").write_text('{"a": 2}\n{"a"')  # cut short by a kill
    (tmp_path / "gen" / ".manifest.json.x_y.tmp").write_text("{")
    (tmp_path / "gen" / "hf-iterate.tmp-dead").mkdir()
    stage = ShardedStage(tmp_path / "gen", "generation", "fp")
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["manifest.json", "shard-00000.jsonl"]
    stage.finalize()
    assert list(read_stage(tmp_path / "gen")) == [{"a": 1}]


def _save_worker(root: str) -> dict:
    """One rank: a tiny model saved (mcore) and exported (HF) next to a killed save's leftovers."""
    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import read_checkpoint_meta, save_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import export_hf
    from spin_mcore.platform import init_distributed

    root = Path(root)
    cfg = load_config(overrides=["model.preset=tiny", "model.num_layers=1", "model.hidden_size=32",
                                 "model.ffn_hidden_size=64", "model.vocab_size=64", "model.seq_length=16"])
    pstate = init_distributed(cfg.parallel, seed=0, platform=cfg.platform)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    for d in ("theta_1.tmp-dead/model", "theta_1.old-0001", "hf.tmp-dead", "theta_2.tmp-keep"):
        (root / d).mkdir(parents=True)
    (root / "theta_1.old-0001" / "stale.txt").write_text("the previous theta_1, moved aside by a killed publish")
    save_model_checkpoint(model, pstate, root / "theta_1", cfg.model, extra={"iteration": 1})
    export_hf(model, pstate, root / "hf", cfg.model)
    return {"iteration": read_checkpoint_meta(root / "theta_1")["iteration"],
            "left": sorted(p.name for p in root.iterdir()), "theta_1": sorted(p.name for p in (root / "theta_1").iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One rank's tiny model saved as mcore ``theta_1`` and exported to ``hf``, beside a killed save's leftovers."""
    from spin_mcore.launcher import run_local

    root = tmp_path_factory.mktemp("saved")
    out = run_local(_save_worker, 1, str(root))[0]
    return SimpleNamespace(root=root, out=out, theta=root / "theta_1", hf=root / "hf")


def test_saves_remove_a_killed_saves_leftovers(saved):
    out = saved.out
    assert out["iteration"] == 1 and out["theta_1"] == ["model", "spin_mcore.json"]
    assert out["left"] == ["hf", "theta_1", "theta_2.tmp-keep"]  # another target's tmp is not this save's business


# ----------------------------------------------------------------------------- damaged checkpoints


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _truncate(path: Path) -> tuple[int, int]:
    """Cut ``path`` to half its length; returns (new size, old size)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


def test_save_records_every_weights_file_with_its_size_and_sha256(saved):
    import hashlib

    meta = json.loads((saved.theta / "spin_mcore.json").read_text())
    on_disk = sorted(p.relative_to(saved.theta / "model").as_posix() for p in (saved.theta / "model").rglob("*")
                     if p.is_file())
    assert sorted(meta["files"]) == on_disk and {".metadata", "common.pt", "metadata.json"} <= set(on_disk)
    for rel, rec in meta["files"].items():
        data = (saved.theta / "model" / rel).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "hashed": "whole"}


def test_damaged_mcore_checkpoints_are_named_file_by_file(saved, tmp_path):
    from spin_mcore.models.integrity import CheckpointCorrupt, check_model_checkpoint

    check_model_checkpoint(saved.theta)  # the intact one passes
    last = sorted(p.name for p in (saved.theta / "model").glob("*.distcp"))[-1]

    def damaged(name, damage) -> tuple[Path, str]:
        ck = _copy(saved.theta, tmp_path / name)
        return ck, damage(ck / "model")

    def truncate(d):
        size, _ = _truncate(d / last)
        return rf"model/{last}: truncated: {size} bytes, .metadata places data up to byte \d+"

    def flip(d):
        data = bytearray((d / last).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / last).write_bytes(bytes(data))
        return rf"model/{last}: its SHA-256 differs from the one recorded at save time"

    def grow(d):
        with open(d / last, "ab") as f:
            f.write(b"\0" * 10)
        return rf"model/{last}: \d+ bytes, \d+ at save time"

    cases = {
        "truncated": truncate, "flipped": flip, "grown": grow,
        "no_common": lambda d: (d / "common.pt").unlink() or "model/common.pt: missing",
        "no_distcp": lambda d: (d / last).unlink() or rf"model/{last}: missing \(named by .metadata\)",
        "bad_metadata": lambda d: (d / ".metadata").write_bytes(b"not a pickle") and r"model/.metadata: unreadable",
        "empty_json": lambda d: (d / "metadata.json").write_text("") or r"model/metadata.json: empty \(0 bytes\)",
    }
    for name, damage in cases.items():
        ck, pattern = damaged(name, damage)
        with pytest.raises(CheckpointCorrupt, match=rf"^checkpoint {ck} is damaged: {pattern}"):
            check_model_checkpoint(ck)
    # a checkpoint saved before the manifest existed: the structure is still checked against .metadata
    old = _copy(saved.theta, tmp_path / "no_manifest")
    meta = json.loads((old / "spin_mcore.json").read_text())
    del meta["files"]
    (old / "spin_mcore.json").write_text(json.dumps(meta))
    check_model_checkpoint(old)
    _truncate(old / "model" / last)
    with pytest.raises(CheckpointCorrupt, match=rf"model/{last}: truncated"):
        check_model_checkpoint(old)


def test_truncated_distcp_through_the_console_script_is_one_line_and_exit_1(inputs, saved, tmp_path):
    """The issue's rc 3 with PyTorch's multi-line CheckpointException: the rank that loads refuses the file first."""
    ck = _copy(saved.theta, tmp_path / "theta0")
    last = sorted((ck / "model").glob("*.distcp"))[-1]
    size, _ = _truncate(last)
    proc = subprocess.run([str(SPIN), "run", *_overrides(inputs, inputs.ok, tmp_path / "run",
                                                         f"run.init_checkpoint={ck}")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()  # data-loading progress lines may come first
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert sum(line.startswith("spin-mcore ") for line in lines) == 1, proc.stderr
    assert lines[-1].startswith(f"spin-mcore run: error: checkpoint {ck} is damaged: model/{last.name}: truncated: "
                                f"{size} bytes, .metadata places data up to byte "), proc.stderr


def test_damaged_safetensors_are_refused_in_one_line(saved, tmp_path, capsys):
    from spin_mcore.models.integrity import CheckpointCorrupt, check_hf_weights

    check_hf_weights(saved.hf)
    hf = _copy(saved.hf, tmp_path / "hf")
    size, _ = _truncate(hf / "model.safetensors")
    line = _cli(capsys, ["convert", "--from", "hf", "--to", "mcore", "--src", str(hf), "--dst", str(tmp_path / "out")])
    assert line.startswith(f"spin-mcore convert: error: checkpoint {hf} is damaged: model.safetensors: truncated: "
                           f"{size} bytes, its header places tensors up to byte "), line
    assert not (tmp_path / "out").exists()
    data = (saved.hf / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")  # the JSON header's length
    for content, pattern in [(data[:5], r"5 bytes, shorter than a safetensors header"),
                             (b"\xff" * 8 + data[8:], r"truncated: \d+ bytes, its header alone claims"),
                             (data[:8] + b"{" * n + data[8 + n:], r"its safetensors header is not valid JSON"),
                             (data + b"\0\0\0", r"3 bytes follow the last tensor its header names")]:
        (hf / "model.safetensors").write_bytes(content)
        with pytest.raises(CheckpointCorrupt, match=rf"^checkpoint {hf} is damaged: model.safetensors: {pattern}"):
            check_hf_weights(hf)
