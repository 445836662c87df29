"""The TensorRT-LLM engine worker (generation.backend=trtllm).

CPU (CI): the LLM / SamplingParams arguments a job turns into, the EOS normalisation of
TensorRT-LLM outputs (fake output objects), the worker's shard loop with a fake engine, and the
one-line error of a worker started without tensorrt_llm (this project's .venv has none).
GPU (``-m gpu``, needs ``.venv-trtllm`` from ``bash launch/setup_trtllm.sh``): the worker end to
end on a tiny HF Llama against transformers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from spin_mcore.generation.workers import protocol
from spin_mcore.generation.workers import trtllm_worker as tw
from tests.helpers import hf_greedy_until, hf_logp
from tests.test_generation import BOS, EOS, MAX_NEW, VOCAB, _prompts

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-trtllm" / "bin" / "python"


def _job(tmp: Path, sets=(), device="cuda", **engine) -> protocol.Job:
    eng = {"max_num_seqs": 48, "memory_fraction": 0.35, "tensor_parallel_size": 2, "seed": 0, "device": device,
           "quantization": None, **engine}
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_NEW, "num_samples": 1,
                "seed": 3, "stop_ids": [EOS], "vocab_size": VOCAB, "model_vocab_size": VOCAB}
    return protocol.Job(model=str(tmp / "hf"), dtype="bfloat16", max_model_len=96, engine=eng, sampling=sampling,
                        sets=list(sets), status=str(tmp / "status.json"))


# ----------------------------------------------------------------------------- engine and sampling arguments


def test_llm_kwargs_from_a_job(tmp_path):
    kw = tw.llm_kwargs(_job(tmp_path))
    assert kw == {"model": str(tmp_path / "hf"), "skip_tokenizer_init": True, "dtype": "bfloat16",
                  "tensor_parallel_size": 2, "max_batch_size": 48, "max_seq_len": 96, "max_num_tokens": 8192,
                  "kv_cache_free_gpu_memory_fraction": 0.35}
    kw = tw.llm_kwargs(_job(tmp_path, memory_fraction=None, max_num_seqs=7), model_dir="/x/hf-fp8")
    assert kw["model"] == "/x/hf-fp8" and kw["max_batch_size"] == 7 and "kv_cache_free_gpu_memory_fraction" not in kw
    big = _job(tmp_path)
    big.max_model_len = 16384
    assert tw.llm_kwargs(big)["max_num_tokens"] == 16384  # one whole prompt fits one engine step
    with pytest.raises(ValueError, match="engine.device='cpu': TensorRT-LLM runs on CUDA GPUs only"):
        tw.llm_kwargs(_job(tmp_path, device="cpu"))


def test_sampling_kwargs_greedy_and_sampled():
    from spin_mcore.generation.sampling import sample_seed

    base = _job(Path("/tmp")).sampling
    greedy = tw.sampling_kwargs(base, "p3", 9)
    assert greedy == {"n": 1, "max_tokens": 9, "end_id": -1, "pad_id": EOS, "stop_token_ids": [EOS],
                      "include_stop_str_in_output": True, "seed": sample_seed(3, "p3", 0), "detokenize": False,
                      "logprobs": 1, "top_k": 1}
    sampled = tw.sampling_kwargs({**base, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "num_samples": 4,
                                  "vocab_size": 480}, "p0", 12)
    assert sampled["n"] == 4 and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["top_k"] == 40
    assert sampled["seed"] == sample_seed(3, "p0", 0) != greedy["seed"]
    assert sampled["bad_token_ids"] == list(range(480, VOCAB))  # the tokenizer's vocabulary cut
    plain = tw.sampling_kwargs({**base, "temperature": 1.0}, "p0", 12)
    assert "top_p" not in plain and "top_k" not in plain and "bad_token_ids" not in plain  # the full distribution


# ----------------------------------------------------------------------------- EOS normalisation on fake outputs


def _lp(ids, values):
    """TensorRT-LLM's per-position ``{token_id: Logprob}`` (top-1 plus the sampled token)."""
    return [{t: SimpleNamespace(logprob=v, rank=1)} for t, v in zip(ids, values)]


def test_normalise_keeps_a_stop_token_the_engine_returned():
    ids, logps, fin = tw.normalise_output([4, 7, EOS], _lp([4, 7, EOS], [-0.5, -1.0, -0.25]), "stop", EOS, [EOS])
    assert ids == [4, 7, EOS] and logps == [-0.5, -1.0, -0.25] and fin == "stop"


def test_normalise_appends_a_cut_stop_token_with_its_logprob():
    # include_stop_str_in_output ignored: result.py cut the id from token_ids but not from logprobs
    entries = _lp([4, 7, EOS], [-0.5, -1.0, -0.25])
    ids, logps, fin = tw.normalise_output([4, 7], entries, "stop", EOS, [EOS])
    assert ids == [4, 7, EOS] and math.isclose(sum(logps), -1.75) and fin == "stop"


def test_normalise_length_stop_unchanged_and_stop_token_at_the_limit():
    ids, logps, fin = tw.normalise_output([4, 7, 9], _lp([4, 7, 9], [-1.0, -2.0, -3.0]), "length", None, [EOS])
    assert (ids, logps, fin) == ([4, 7, 9], [-1.0, -2.0, -3.0], "length")
    # the sampler checks the length limit before stop words: EOS as the last allowed token reports LENGTH
    ids, logps, fin = tw.normalise_output([4, EOS], _lp([4, EOS], [-1.0, -0.1]), "length", None, [EOS])
    assert ids == [4, EOS] and fin == "stop" and logps == [-1.0, -0.1]


def test_normalise_refuses_inconsistent_outputs():
    with pytest.raises(RuntimeError, match="stop_reason=None .*end-id path dropped the stop token"):
        tw.normalise_output([4, 7], _lp([4, 7], [-1.0, -1.0]), "stop", None, [EOS])  # END_ID: token + logp lost
    with pytest.raises(RuntimeError, match=f"stopped on id {EOS} but left it"):
        tw.normalise_output([4, 7], _lp([4, 7], [-1.0, -1.0]), "stop", EOS, [EOS])
    with pytest.raises(RuntimeError, match="returned 2 log-prob entries for 3 tokens"):
        tw.normalise_output([4, 7, 9], _lp([4, 7], [-1.0, -1.0]), "length", None, [EOS])
    with pytest.raises(RuntimeError, match="no log-prob of the sampled token 9 at position 1"):
        tw.normalise_output([4, 9], _lp([4, 8], [-1.0, -1.0]), "length", None, [EOS])  # top-1 only, sampled missing
    with pytest.raises(RuntimeError, match="finished with 'cancelled'"):
        tw.normalise_output([4], _lp([4], [-1.0]), "cancelled", None, [EOS])


# ----------------------------------------------------------------------------- the shard loop with a fake engine


class _FakeLLM:
    """Answers each request with its prompt's last token, then EOS when the budget allows (an END-free output)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append(sampling_params)
        outs = []
        for p, sp in zip(prompts, sampling_params):
            last = p["prompt_token_ids"][-1]
            seqs = []
            for i in range(sp["n"]):
                ids = [last, 10 + i, EOS][:sp["max_tokens"]]
                fin = "stop" if ids[-1] == EOS else "length"
                seqs.append(SimpleNamespace(index=i, token_ids=ids, logprobs=_lp(ids, [-0.5] * len(ids)),
                                            finish_reason=fin, stop_reason=EOS if fin == "stop" else None))
            outs.append(SimpleNamespace(outputs=seqs[::-1]))  # the worker orders samples by index
        return outs


def _fake_trtllm(monkeypatch, with_logprob_mode=True):
    pkg, sp = ModuleType("tensorrt_llm"), ModuleType("tensorrt_llm.sampling_params")
    pkg.__version__ = "0.0-fake"
    pkg.SamplingParams = lambda **kw: kw
    if with_logprob_mode:
        sp.LogprobMode = SimpleNamespace(RAW="raw", PROCESSED="processed")
    pkg.sampling_params = sp
    monkeypatch.setitem(sys.modules, "tensorrt_llm", pkg)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.sampling_params", sp)
    return pkg


def test_serve_writes_whole_shards_in_the_protocol(tmp_path, monkeypatch):
    trtllm = _fake_trtllm(monkeypatch)
    keys = [f"p{i}" for i in range(len(_prompts()))]
    protocol.write_prompts(tmp_path / "prompts.jsonl", keys, _prompts())
    sets = [protocol.PromptSet("train", str(tmp_path / "prompts.jsonl"), str(tmp_path / "train"), "fp", 2, [0, 2]),
            protocol.PromptSet("held", str(tmp_path / "prompts.jsonl"), str(tmp_path / "held"), "fp", 5, [0],
                               sampling={"temperature": 0.7, "num_samples": 2, "max_new_tokens": 2})]
    job = _job(tmp_path, sets)
    llm = _FakeLLM()
    counts = tw.serve(job, llm, trtllm)
    assert counts["shards"] == 3 and counts["generated_tokens"] == 3 * 3 + 2 * 5 * 2
    assert protocol.done_shards(tmp_path / "train") == {0, 2}
    train = protocol.read_engine_shard(tmp_path / "train", 2)
    assert [r["key"] for r in train] == ["p4"]  # shard 2 of size 2: the 5th prompt only
    assert train[0]["generated_ids"] == [_prompts()[4][-1], 10, EOS] and train[0]["finish_reason"] == "stop"
    assert math.isclose(train[0]["engine_logp"], -1.5) and train[0]["engine_tokens"] == 3
    held = protocol.read_engine_shard(tmp_path / "held", 0)
    assert [(r["key"], r["sample_index"]) for r in held[:2]] == [("p0", 0), ("p0", 1)]
    assert held[1]["generated_ids"] == [_prompts()[0][-1], 11] and held[1]["finish_reason"] == "length"
    # every request asked for RAW log-probs, stop ids as stop words, no end id
    sp = llm.calls[-1][0]
    assert sp["logprobs_mode"] == "raw" and sp["end_id"] == -1 and sp["stop_token_ids"] == [EOS]
    assert sp["temperature"] == 0.7 and sp["n"] == 2
    # a second job skips the shards already written
    assert tw.serve(job, _FakeLLM(), trtllm)["shards"] == 0


class _FakeEngine(_FakeLLM):
    def __init__(self, **kw):
        super().__init__()
        self.kw, self.shut = kw, False
        _FakeEngine.last = self

    def shutdown(self):
        self.shut = True


def test_main_one_engine_for_the_job_status_and_fp8_checkpoint_reuse(tmp_path, monkeypatch):
    """main() with a fake tensorrt_llm: one LLM built from the job, STATUS.json, the FP8 copy used then removed."""
    trtllm = _fake_trtllm(monkeypatch)
    llmapi = ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kw: ("KvCacheConfig", kw)
    trtllm.llmapi, trtllm.LLM = llmapi, _FakeEngine
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    protocol.write_prompts(tmp_path / "prompts.jsonl", ["p0", "p1", "p2"], _prompts()[:3])
    sets = [protocol.PromptSet("train", str(tmp_path / "prompts.jsonl"), str(tmp_path / "train"), "fp", 2, [0, 1])]
    job = _job(tmp_path, sets, quantization="fp8", tensor_parallel_size=1)
    fp8 = tw.fp8_dir(job)
    assert fp8 == tmp_path / "hf-fp8"
    fp8.mkdir()
    (fp8 / "hf_quant_config.json").write_text("{}")  # a finished ModelOpt export (from a killed earlier worker)
    assert tw.main([str(job.save(tmp_path / "job.json"))]) == 0
    eng = _FakeEngine.last
    assert eng.kw["model"] == str(fp8) and eng.kw["max_batch_size"] == 48 and eng.shut
    assert eng.kw["kv_cache_config"] == ("KvCacheConfig", {"free_gpu_memory_fraction": 0.35})
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["engine_starts"] == 1 and status["shards"] == 2 and status["quantization"] == "fp8"
    assert status["generated_tokens"] == 3 * 3 and status["load_seconds"] >= 0 and "generate_seconds" in status
    assert not fp8.exists()  # every shard written: the FP8 copy goes, like the export
    bad = _job(tmp_path, sets, quantization="int4").save(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="engine.quantization='int4'"):
        tw.main([str(bad)])


def test_a_trtllm_without_logprob_mode_is_refused(tmp_path, monkeypatch):
    trtllm = _fake_trtllm(monkeypatch, with_logprob_mode=False)
    with pytest.raises(RuntimeError, match="0.0-fake has no SamplingParams.logprobs_mode.*tensorrt_llm==1.2.1"):
        tw.make_sampling_params(trtllm, {"n": 1})


# ----------------------------------------------------------------------------- the worker without TensorRT-LLM


def test_worker_without_tensorrt_llm_fails_with_one_line(tmp_path):
    job = _job(tmp_path).save(tmp_path / "job.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.generation.workers.trtllm_worker", str(job)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"trtllm_worker: tensorrt_llm cannot be imported by {sys.executable}")
    assert "bash launch/setup_trtllm.sh" in lines[0]
    assert not Path(job.with_name("status.json")).exists()


# ----------------------------------------------------------------------------- GPU: end to end against transformers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trtllm_worker_matches_transformers_with_eos(tmp_path):
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv-trtllm: create it with `bash launch/setup_trtllm.sh`")
    from transformers import LlamaConfig, LlamaForCausalLM

    # head size 64 (TensorRT-LLM's attention kernels); weights stored in bf16, the reference runs them in fp32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=BOS,
                         eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ref = model.float().eval()  # the bf16-rounded weights, run in fp32
    stop = hf_greedy_until(ref, _prompts(), -1, MAX_NEW)[0][3]  # prompt 0 stops after 4 tokens
    expected = hf_greedy_until(ref, _prompts(), stop, MAX_NEW)
    assert expected[0][-1] == stop and any(len(e) == MAX_NEW and stop not in e for e in expected)

    keys = [f"p{i}" for i in range(len(_prompts()))]
    sets = []
    for name in ("greedy", "sampled"):
        protocol.write_prompts(tmp_path / f"{name}.jsonl", keys, _prompts())
        sets.append(protocol.PromptSet(name, str(tmp_path / f"{name}.jsonl"), str(tmp_path / name), "fp", 2,
                                       [0, 1, 2]))
    sets[1].sampling = {"temperature": 0.7, "num_samples": 2}
    job = _job(tmp_path, sets, tensor_parallel_size=1, memory_fraction=0.2, max_num_seqs=8)
    job.max_model_len = 64
    job.sampling["stop_ids"] = [stop]
    path = job.save(tmp_path / "job.json")
    proc = subprocess.run([str(VENV_PYTHON), "-m", "spin_mcore.generation.workers.trtllm_worker", str(path)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["engine_starts"] == 1 and status["shards"] == 6

    greedy = [r for k in range(3) for r in protocol.read_engine_shard(tmp_path / "greedy", k)]
    assert [r["generated_ids"] for r in greedy] == expected  # EOS kept where greedy decoding stopped on it
    assert [r["finish_reason"] for r in greedy] == ["stop" if e[-1] == stop else "length" for e in expected]
    sampled = [r for k in range(3) for r in protocol.read_engine_shard(tmp_path / "sampled", k)]
    assert len(sampled) == 2 * len(_prompts())
    # engine_logp: the RAW log-probs (unscaled by the temperature), stop token included; bf16 engine
    for r in greedy + sampled:
        want = hf_logp(ref, _prompts()[int(r["key"][1:])], r["generated_ids"])
        assert abs(r["engine_logp"] - want) < 1e-2, (r, want)
        assert (r["finish_reason"] == "stop") == (r["generated_ids"][-1] == stop)
