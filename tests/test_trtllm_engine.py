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
    with pytest.raises(RuntimeError, match=r"0.0-fake has no SamplingParams.logprobs_mode.*tensorrt_llm==1\.3\.0rc7"):
        tw.make_sampling_params(trtllm, {"n": 1})


# ----------------------------------------------------------------------------- the stand-in library on disk
# The same stand-in as _FakeLLM above (prompt's last token, 10 + sample index, EOS; log-prob -0.5 each), as an
# importable package, for the worker as a real process. FAKE_TRTLLM_* variables shape it:
# VERSION; NO_LOGPROB_MODE (a 1.2-like SamplingParams); TOPK_ONLY (each position's entry is another token's:
# top-K without the sampled one); DELAY (seconds per generate call); LOG (a file: one line per generate call);
# SELF_SIGNAL_AT=n (the n-th generate call, the start-up probe being the 1st, sends SIGUSR1 to its own process,
# as SLURM's --signal reaches the engine's step, then keeps generating for DELAY seconds).

STANDIN = {
    "tensorrt_llm/__init__.py": """
import os
__version__ = os.environ.get("FAKE_TRTLLM_VERSION", "1.3.0rc7")
from tensorrt_llm.sampling_params import SamplingParams
from tensorrt_llm.llmapi import LLM
""",
    "tensorrt_llm/sampling_params.py": """
import enum, os
from dataclasses import dataclass


@dataclass(kw_only=True)
class _Common:
    n: int = 1
    max_tokens: int = 32
    end_id: int = None
    pad_id: int = None
    stop_token_ids: list = None
    include_stop_str_in_output: bool = False
    seed: int = None
    detokenize: bool = True
    logprobs: int = None
    top_k: int = None
    top_p: float = None
    temperature: float = None
    bad_token_ids: list = None


if os.environ.get("FAKE_TRTLLM_NO_LOGPROB_MODE"):
    SamplingParams = _Common
else:
    class LogprobMode(str, enum.Enum):
        RAW = "raw"
        PROCESSED = "processed"

    @dataclass(kw_only=True)
    class SamplingParams(_Common):
        logprobs_mode: LogprobMode = LogprobMode.RAW
""",
    "tensorrt_llm/llmapi/__init__.py": """
import json, os, signal, time
from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(kw_only=True)
class KvCacheConfig:
    free_gpu_memory_fraction: float = None


@dataclass(kw_only=True)
class TorchLlmArgs:
    model: str
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_batch_size: int = 2048
    max_seq_len: int = None
    max_num_tokens: int = 8192
    kv_cache_config: KvCacheConfig = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list = None
    logprobs: list = None
    finish_reason: str = None
    stop_reason: int = None


_CALLS = [0]


class LLM:
    def __init__(self, **kw):
        self.args = TorchLlmArgs(**kw)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        _CALLS[0] += 1
        env = os.environ
        if env.get("FAKE_TRTLLM_LOG"):
            with open(env["FAKE_TRTLLM_LOG"], "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "prompts": [p["prompt_token_ids"] for p in prompts]}) + "\\n")
        if env.get("FAKE_TRTLLM_SELF_SIGNAL_AT") == str(_CALLS[0]):
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(float(env.get("FAKE_TRTLLM_DELAY", "0")))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            stop = sp.stop_token_ids[0]
            seqs = []
            for i in range(sp.n):
                ids = [p["prompt_token_ids"][-1], 10 + i, stop][:sp.max_tokens]
                shift = 1 if env.get("FAKE_TRTLLM_TOPK_ONLY") else 0
                lps = [{t + shift: SimpleNamespace(logprob=-0.5, rank=1)} for t in ids]
                fin = "stop" if ids[-1] == stop else "length"
                seqs.append(CompletionOutput(i, ids, lps, fin, stop if fin == "stop" else None))
            outs.append(SimpleNamespace(outputs=seqs))
        return outs

    def shutdown(self):
        pass
""",
}


def standin_library(root: Path) -> Path:
    """Write the stand-in tensorrt_llm package under ``root``; returns the directory to put on PYTHONPATH."""
    for rel, text in STANDIN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text.lstrip())
    return root


def _worker_job(tmp: Path, shards=(0, 1, 2, 3, 4)) -> Path:
    """A job of the 5 test prompts in shards of 1 (a signal can land between any two)."""
    protocol.write_prompts(tmp / "prompts.jsonl", [f"p{i}" for i in range(len(_prompts()))], _prompts())
    sets = [protocol.PromptSet("train", str(tmp / "prompts.jsonl"), str(tmp / "train"), "fp", 1, list(shards))]
    job = _job(tmp, sets, tensor_parallel_size=1)
    job.status = str(tmp / "job" / "status.json")  # where run_engine reads it
    return job.save(tmp / "job" / "job.json")


def _run_worker(job: Path, lib: Path, **fake) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{lib}",
           **{f"FAKE_TRTLLM_{k.upper()}": str(v) for k, v in fake.items()}}
    return subprocess.Popen([sys.executable, "-m", "spin_mcore.generation.workers.trtllm_worker", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def _generated_prompts(log: Path) -> dict:
    """{pid: [prompt ids of each generate call after that process's start-up probe]}."""
    calls: dict = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        calls.setdefault(rec["pid"], []).append(rec["prompts"])
    return {pid: [p for call in c[1:] for p in call] for pid, c in calls.items()}


def test_the_worker_refuses_a_version_without_logprob_mode_in_one_line_shown_by_the_driver(tmp_path, monkeypatch):
    """A 1.2-like stand-in (no LogprobMode): exit 1, one line naming the version found and the pinned one."""
    from spin_mcore.config import load_config
    from spin_mcore.generation.external import run_engine
    from spin_mcore.launcher import WorkerError

    lib = standin_library(tmp_path / "lib")
    job = _worker_job(tmp_path)
    proc = _run_worker(job, lib, version="1.2.1", no_logprob_mode=1)
    out, err = proc.communicate(timeout=120)
    line = ("trtllm_worker: tensorrt_llm 1.2.1 has no SamplingParams.logprobs_mode (tensorrt_llm.sampling_params."
            "LogprobMode.RAW), so it cannot be asked for the sampled tokens' raw log-probs; the worker needs "
            "tensorrt_llm==1.3.0rc7 (run `bash launch/setup_trtllm.sh`)")
    assert proc.returncode == 1 and err.strip() == line, err
    assert tw.PINNED == "1.3.0rc7" and protocol.done_shards(tmp_path / "train") == set()
    # through the driver: the same line in its error
    monkeypatch.setenv("PYTHONPATH", str(lib))
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")
    monkeypatch.setenv("FAKE_TRTLLM_NO_LOGPROB_MODE", "1")
    cfg = load_config(overrides=["generation.backend=trtllm", "generation.engine_launcher=local",
                                 f"generation.python={sys.executable}"])
    with pytest.raises(WorkerError, match="trtllm worker exited with 1") as info:
        run_engine(cfg, job, "cuda")
    assert str(info.value).splitlines()[-1] == line


def test_the_startup_probe_refuses_top_k_without_the_sampled_token(tmp_path):
    lib = standin_library(tmp_path / "lib")
    job = _worker_job(tmp_path)
    proc = _run_worker(job, lib, topk_only=1)
    out, err = proc.communicate(timeout=120)
    first = _prompts()[0][-1]
    assert proc.returncode == 1, err
    assert err.strip() == (
        "trtllm_worker: tensorrt_llm 1.3.0rc7 did not return the sampled token's raw log-prob (start-up probe: no "
        f"entry for the returned token {first} at position 0 (entries for [{first + 1}])); the worker needs "
        "tensorrt_llm==1.3.0rc7 (run `bash launch/setup_trtllm.sh`)"), err
    assert protocol.done_shards(tmp_path / "train") == set() and not (tmp_path / "job" / "status.json").exists()


def test_check_probe_output_cases():
    assert tw.check_probe_output([5, 7], _lp([5, 7], [-0.1, -2.0])) is None
    both = [{5: SimpleNamespace(logprob=-0.1), 6: SimpleNamespace(logprob=-3.0)}]
    assert tw.check_probe_output([5], both) is None  # greedy: the sampled one is the maximum
    assert tw.check_probe_output([6], both) == ("greedy token 6 at position 0 has log-prob -3.0 below the returned "
                                                "maximum -0.1")
    assert tw.check_probe_output([5], [{5: 0.3}]) == "log-prob 0.3 of token 5 at position 0 is not a finite value <= 0"
    assert tw.check_probe_output([5], [{5: float("nan")}]).startswith("log-prob nan of token 5")
    assert tw.check_probe_output([5, 7], [{5: -1.0}]) == "1 log-prob entries for 2 tokens"
    assert tw.check_probe_output([], []) == "no token came back"


# ----------------------------------------------------------------------------- stop signals: exit 75, requeue


def test_requeue_status_is_the_preemption_modules():
    from spin_mcore.platform import preemption

    assert protocol.REQUEUE_EXIT_CODE == preemption.REQUEUE_EXIT_CODE == 75
    assert set(protocol.STOP_SIGNALS) == set(preemption.STOP_SIGNALS)


def test_sigusr1_mid_job_exits_75_keeps_whole_shards_and_the_rerun_generates_only_the_missing(tmp_path):
    """A real worker process and a real SIGUSR1 while a shard is being generated (1 s per generate call)."""
    import signal
    import time

    lib = standin_library(tmp_path / "lib")
    job = _worker_job(tmp_path)
    log = tmp_path / "calls.jsonl"
    proc = _run_worker(job, lib, delay=1.0, log=log)
    deadline = time.time() + 60
    while len(protocol.done_shards(tmp_path / "train")) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    done = protocol.done_shards(tmp_path / "train")
    assert 2 <= len(done) < 5 and done == set(range(len(done)))  # shards go in order; the one in flight is dropped
    assert err.strip().startswith(f"trtllm_worker: stopped by SIGUSR1 after {len(done)} shard(s) this run"), err
    for k in done:  # whole and listed
        (rec,) = protocol.read_engine_shard(tmp_path / "train", k)
        assert rec["key"] == f"p{k}" and rec["generated_ids"] == [_prompts()[k][-1], 10, EOS]
    assert not (tmp_path / "job" / "status.json").exists()
    rerun = _run_worker(job, lib, log=log)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["shards"] == 5 - len(done) and protocol.done_shards(tmp_path / "train") == set(range(5))
    assert _generated_prompts(log)[rerun.pid] == [_prompts()[k] for k in range(len(done), 5)]


def test_the_driver_raises_preempted_when_the_engine_step_alone_was_signalled(tmp_path, monkeypatch):
    """SIGUSR1 reaches only the worker (as --signal reaches the engine's srun step): it exits 75, run_engine raises
    Preempted instead of WorkerError, and the requeued run generates just the shards the stop lost."""
    from spin_mcore.config import load_config
    from spin_mcore.generation.external import run_engine
    from spin_mcore.platform import preemption

    lib = standin_library(tmp_path / "lib")
    job = _worker_job(tmp_path)
    cfg = load_config(overrides=["generation.backend=trtllm", "generation.engine_launcher=local",
                                 f"generation.python={sys.executable}"])
    monkeypatch.setenv("PYTHONPATH", str(lib))
    monkeypatch.setenv("FAKE_TRTLLM_SELF_SIGNAL_AT", "3")  # the probe, shard 0, then the signal during shard 1
    monkeypatch.setenv("FAKE_TRTLLM_DELAY", "0.5")
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(tmp_path / "calls.jsonl"))
    preemption.reset()
    with pytest.raises(preemption.Preempted, match=r"generation engine \(worker exited with 75; finished shards kept"):
        run_engine(cfg, job, "cuda")
    assert protocol.done_shards(tmp_path / "train") == {0}
    monkeypatch.delenv("FAKE_TRTLLM_SELF_SIGNAL_AT")
    status = run_engine(cfg, job, "cuda")
    assert status["shards"] == 4 and protocol.done_shards(tmp_path / "train") == set(range(5))
    runs = list(_generated_prompts(tmp_path / "calls.jsonl").values())
    assert runs == [[_prompts()[0], _prompts()[1]], [_prompts()[k] for k in range(1, 5)]]


# ----------------------------------------------------------------------------- engine_check with the stand-in


def _engine_check(lib: Path, **fake) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{lib}",
           **{f"FAKE_TRTLLM_{k.upper()}": str(v) for k, v in fake.items()}}
    proc = subprocess.run([sys.executable, "-m", "spin_mcore.generation.workers.engine_check", "trtllm"],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0])


def test_engine_check_trtllm_with_the_stand_in(tmp_path):
    lib = standin_library(tmp_path / "lib")
    (lib / "modelopt").mkdir()
    (lib / "modelopt" / "__init__.py").write_text("")  # the FP8 path's library (transformers, accelerate: real)
    rc, out = _engine_check(lib)
    assert (rc, out) == (0, {"backend": "trtllm", "ok": True, "version": "1.3.0rc7", "problems": []})
    rc, out = _engine_check(lib, version="1.2.1", no_logprob_mode=1)
    assert rc == 1 and out["ok"] is False and out["version"] == "1.2.1"
    assert out["problems"] == [
        "tensorrt_llm 1.2.1 has no SamplingParams.logprobs_mode (tensorrt_llm.sampling_params.LogprobMode.RAW), so it "
        "cannot be asked for the sampled tokens' raw log-probs; the TensorRT-LLM worker needs tensorrt_llm==1.3.0rc7 "
        "(`bash launch/setup_trtllm.sh`)"]
    rc, out = _engine_check(tmp_path / "empty")  # this .venv: no tensorrt_llm at all
    assert rc == 1 and out["version"] is None and out["problems"][0].startswith(
        f"tensorrt_llm cannot be imported by {sys.executable} (No module named 'tensorrt_llm')")


# ----------------------------------------------------------------------------- FP8: the model spread over the GPUs


def test_fp8_load_spreads_a_model_larger_than_one_gpu_over_the_steps_gpus(tmp_path):
    """The placement quantize_fp8 uses, given to accelerate's own planner for a meta-device Llama: a model larger
    than one GPU's cap lands on both GPUs, none on CPU or disk. (Real GPUs: the gpu test below.)"""
    from accelerate import init_empty_weights, infer_auto_device_map
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16)
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # ~0.44 GB
    gpu = int(size * 0.7 / tw.FP8_GPU_FRACTION)  # one GPU's cap holds 70 % of the model
    kw = tw.fp8_load_kwargs([gpu, gpu], size)
    assert kw == {"device_map": "auto", "max_memory": {0: int(gpu * 0.85), 1: int(gpu * 0.85)}}
    placed = infer_auto_device_map(model, max_memory=kw["max_memory"], no_split_module_classes=["LlamaDecoderLayer"])
    assert set(placed.values()) == {0, 1}, placed
    with pytest.raises(tw.Refused, match=r"fp8: the 0.4 GiB model does not fit 1 GPU\(s\) at 85% .*raise "
                                         r"generation.engine_tensor_parallel"):
        tw.fp8_load_kwargs([gpu], size)
    with pytest.raises(tw.Refused, match="needs CUDA GPUs, none is visible"):
        tw.fp8_load_kwargs([], size)


def test_quantize_fp8_loads_over_every_visible_gpu_and_feeds_the_first_device(tmp_path, monkeypatch):
    """quantize_fp8 with stand-in ModelOpt and from_pretrained: the arguments used, captured."""
    import transformers

    job = _worker_job(tmp_path)
    job = protocol.Job.load(job)
    Path(job.model).mkdir(parents=True)
    (Path(job.model) / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3000)
    (Path(job.model) / "model-00002-of-00002.safetensors").write_bytes(b"x" * 1000)
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, ids):
            seen.setdefault("inputs", []).append((ids.device.type, ids.tolist()))

    def from_pretrained(path, **kw):
        seen["load"] = (path, kw)
        return Model()

    mtq = ModuleType("modelopt.torch.quantization")
    mtq.FP8_DEFAULT_CFG = {"fp8": True}
    mtq.quantize = lambda model, cfg, loop: (seen.__setitem__("cfg", cfg), loop(model))
    export = ModuleType("modelopt.torch.export")
    export.export_hf_checkpoint = lambda model, export_dir: (Path(export_dir).mkdir(),
                                                             (Path(export_dir) / "hf_quant_config.json").write_text("{}"))
    for name, mod in {"modelopt": ModuleType("modelopt"), "modelopt.torch": ModuleType("modelopt.torch"),
                      "modelopt.torch.quantization": mtq, "modelopt.torch.export": export}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(tw, "_visible_gpu_free_bytes", lambda: [2500, 2500])  # 2 GPUs, neither holds 4000 bytes
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tw.quantize_fp8(job)
    assert out == tw.fp8_dir(job) and (out / "hf_quant_config.json").exists()
    path, kw = seen["load"]
    assert path == job.model and kw == {"torch_dtype": torch.bfloat16, "device_map": "auto",
                                        "max_memory": {0: 2125, 1: 2125}}
    assert seen["cfg"] == {"fp8": True} and seen["inputs"] == [("cpu", [p]) for p in _prompts()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fp8_quantization_of_a_model_spread_over_two_gpus(tmp_path):
    """Not reachable on CPU: ModelOpt calibration and export of a dispatched (device_map='auto') model."""
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv-trtllm: create it with `bash launch/setup_trtllm.sh`")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=BOS, eos_token_id=EOS)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "hf", safe_serialization=True)
    job = _worker_job(tmp_path)
    script = ("import sys, torch; from spin_mcore.generation.workers import protocol, trtllm_worker as tw\n"
              "free = tw._visible_gpu_free_bytes(); size = tw.checkpoint_bytes(sys.argv[2])\n"
              "tw._visible_gpu_free_bytes = lambda: [int(size * 0.7 / tw.FP8_GPU_FRACTION)] * len(free)\n"
              "print(tw.quantize_fp8(protocol.Job.load(sys.argv[1])))")
    proc = subprocess.run([str(VENV_PYTHON), "-c", script, str(job), str(tmp_path / "hf")], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf-fp8" / "hf_quant_config.json").exists()


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
