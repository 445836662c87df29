"""TensorRT-LLM engine worker: ``<engine python> -m spin_mcore.generation.workers.trtllm_worker JOB.json``.

Starts ONE ``tensorrt_llm.LLM`` (the LLM API, PyTorch backend) on the job's HF export and serves
every listed shard of every prompt set (see :mod:`spin_mcore.generation.workers.protocol`), like
:mod:`...vllm_worker`. Imports only the stdlib, TensorRT-LLM (and, for FP8, NVIDIA ModelOpt +
transformers, both dependencies of the pinned ``tensorrt_llm``) and spin_mcore's stdlib-only
modules; the parent runs it with ``PYTHONPATH=<checkout>`` in ``.venv-trtllm``
(``bash launch/setup_trtllm.sh``, CUDA machines only). Pinned: ``tensorrt_llm==1.3.0rc7`` (:data:`PINNED`),
the first release whose published source and API reference could be checked to have
``SamplingParams.logprobs_mode`` (``LogprobMode``); 1.2.x (the newest non-rc line) has not: its
release notes and ``sampling_params.py`` have no log-prob mode, and ``logprobs=K`` there returns the
top K, not necessarily the sampled token. Because the pin cannot be proven on CPU, the worker checks
the API before it starts the engine and asks the started engine one tiny greedy request
(:func:`probe_problem`); either failing, it exits 1 with one line naming the version it found and
:data:`PINNED`.

Facts this module relies on, read in NVIDIA/TensorRT-LLM (main, and the 1.3.0rc7 API reference:
``LLM(model, skip_tokenizer_init, tensor_parallel_size, dtype, **kwargs)`` with ``max_batch_size``,
``max_seq_len``, ``max_num_tokens``, ``kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=...)``;
``SamplingParams(end_id, pad_id, max_tokens, bad_token_ids, stop_token_ids,
include_stop_str_in_output, n, logprobs_mode, top_k, top_p, seed, temperature, logprobs, detokenize)``;
``CompletionOutput(index, token_ids, logprobs, finish_reason, stop_reason)``; no ``quant_config``
argument on the PyTorch-backend LLM):

* ``tensorrt_llm/llmapi/llm.py`` ``_prepare_sampling_params``: with no tokenizer
  (``skip_tokenizer_init=True``) every ``SamplingParams`` must carry ``end_id``; nothing is
  re-tokenised, prompts go in as ``{"prompt_token_ids": [...]}``.
* ``tensorrt_llm/executor/base_worker.py`` ``_enqueue_request``: ``end_id`` goes to the
  request as is (``-1`` is what ``ignore_eos`` sends: no token ends the request); the newest
  version also sends ``stop_words=[]`` when ``ignore_eos`` is set, so ``ignore_eos`` is NOT used.
* ``tensorrt_llm/_torch/pyexecutor/sampler.py`` (``sampler/`` on main) ``_handle_stop_criteria`` (after the new
  token was added to the request): a token equal to ``end_id`` -> ``FinishReason.END_ID``; else
  the length limit -> ``LENGTH``; else a completed stop word -> ``STOP_WORDS``. So a stop token
  drawn as the last allowed token reports LENGTH (handled in :func:`normalise_output`).
* ``tensorrt_llm/executor/result.py`` ``_handle_sequence``: ``END_ID`` -> ``finish_reason="stop"``
  with ``stop_reason=None`` (the end token is missing from ``token_ids``, as issue 11 observed;
  that part happens in the C++ response, not re-read here); ``STOP_WORDS`` ->
  ``"stop"``, ``stop_reason`` = the stop token id, and the stop token cut from ``token_ids``
  unless ``include_stop_str_in_output`` (``logprobs`` is not cut); ``LENGTH`` -> ``"length"``.
  ``CompletionOutput.logprobs`` is a list (one per output token) of ``{token_id: Logprob}``.
* ``tensorrt_llm/sampling_params.py`` (1.3.0rc7 API reference; PR #9675, Jan 2026): ``logprobs=K``
  returns the top-K plus the sampled token's log-prob (its last entry when not in the top K;
  ``logprobs=0``: the sampled token's only); ``logprobs_mode`` (``LogprobMode.RAW``, the
  default) is log-softmax of the model's logits before temperature/top-k/top-p
  (``LogprobMode.PROCESSED``: after them; the sampler tests apply the temperature only for
  PROCESSED). Older releases return top-K only, without the sampled token. The RAW numbers
  are what the Megatron reference pass computes, so the worker asks for them explicitly and
  refuses a TensorRT-LLM without ``LogprobMode`` (it could not say which numbers it returns).

EOS (the project's convention, :func:`protocol.normalise_eos`): y' ends in the stop id exactly
when generation stopped on it, and ``engine_logp`` includes that token's log-prob. TensorRT-LLM's
end-id path drops the token AND its log-prob, so the worker never uses it: ``end_id=-1`` and the
stop ids go in as ``stop_token_ids`` with ``include_stop_str_in_output=True`` (the STOP_WORDS
path, which keeps the token and its log-prob). :func:`normalise_output` checks each output and
also repairs the one recoverable shape (stop token cut from ``token_ids`` but its log-prob still
in ``logprobs``); an end-id stop without the token is refused, not patched.

FP8 (``engine.quantization == "fp8"``): the LLM API's ``quant_config=QuantConfig(quant_algo=
QuantAlgo.FP8)`` quantises while building a TensorRT *engine* (the legacy ``_tensorrt_engine.LLM``);
the PyTorch-backend ``LLM`` of 1.3.0rc7 takes no ``quant_config`` (its argument list has none),
it runs checkpoints quantised by NVIDIA ModelOpt (docs
``features/quantization.md``: "Running Pre-quantized Models", "Offline Quantization with
ModelOpt"; ModelOpt's ``deployment/1_tensorrt_llm``: ``export_hf_checkpoint`` and load the HF
checkpoint with the PyTorch backend). So :func:`quantize_fp8` calibrates the HF export with
``modelopt.torch.quantization.quantize(model, FP8_DEFAULT_CFG, forward_loop)`` on the job's own
prompts and writes ``modelopt.torch.export.export_hf_checkpoint`` (``hf_quant_config.json`` +
FP8 safetensors) next to the export, atomically; the engine loads that directory. The bf16 model is
loaded with ``device_map="auto"`` over the step's visible GPUs (``generation.engine_tensor_parallel``
of them), each capped at :data:`FP8_GPU_FRACTION` of its free memory (:func:`fp8_load_kwargs`): a
70B model (141 GB) does not fit one 80 GB GPU.

* Seeds: request ``i`` carries ``sample_seed(seed, key, 0)``; TensorRT-LLM draws its ``n``
  samples from it, so outputs do not depend on batching (they are not the in-process engine's).
* ``SPIN_TRTLLM_WORKER_KILL_AT=<set>:<shard>`` SIGKILLs the worker after generating that shard,
  before writing it (the resume tests' kill in the middle of a shard).
* SIGUSR1/SIGTERM (SLURM signals every process of the engine's step): the shard in flight is
  abandoned, the engine shut down, and the worker exits with ``protocol.REQUEUE_EXIT_CODE`` (75).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from spin_mcore.generation.workers.engine_check import TRTLLM_PINNED as PINNED  # see the module docstring
from spin_mcore.generation.workers.vllm_worker import sample_seed

NO_END_ID = -1  # what base_worker sends for ignore_eos: no token ends a request through the END_ID path
FP8_CALIBRATION_PROMPTS = 128
FP8_GPU_FRACTION = 0.85  # of each GPU's free memory for bf16 weights; the rest holds calibration activations
PROBE_TOKENS = 2


def llm_kwargs(job, model_dir: str | None = None) -> dict:
    """Keyword arguments of ``tensorrt_llm.LLM`` for a job (pure: testable without TensorRT-LLM).

    ``KvCacheConfig`` needs the library, so the memory fraction comes back as the plain
    ``kv_cache_free_gpu_memory_fraction`` entry that :func:`build_llm` turns into one.
    """
    e = job.engine
    if e.get("device") != "cuda":
        raise ValueError(f"job engine.device={e.get('device')!r}: TensorRT-LLM runs on CUDA GPUs only")
    max_len = int(job.max_model_len)
    kw = dict(model=model_dir or job.model, skip_tokenizer_init=True, dtype=job.dtype,
              tensor_parallel_size=int(e["tensor_parallel_size"]),
              max_batch_size=int(e["max_num_seqs"]),  # the engine's concurrency (vLLM's max_num_seqs)
              max_seq_len=max_len,
              # tokens per engine step; llm.py _check_arguments refuses (without chunked prefill) a prompt
              # longer than this, so it holds at least one whole prompt
              max_num_tokens=max(8192, max_len))
    if e.get("memory_fraction") is not None:
        kw["kv_cache_free_gpu_memory_fraction"] = float(e["memory_fraction"])
    return kw


def sampling_kwargs(sampling: dict, key: str, max_tokens: int) -> dict:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one prompt (pure).

    Greedy (temperature 0) is ``top_k=1`` alone: every TensorRT-LLM version reads that as greedy.
    ``logprobs=1``: the top-1 and the sampled token's raw log-prob (``logprobs_mode`` is added by
    :func:`make_sampling_params`, which needs the library).
    """
    stop_ids = [int(i) for i in sampling["stop_ids"]]
    kw = dict(n=int(sampling["num_samples"]), max_tokens=int(max_tokens), end_id=NO_END_ID,
              pad_id=stop_ids[0] if stop_ids else 0, stop_token_ids=stop_ids,
              include_stop_str_in_output=True, seed=sample_seed(int(sampling["seed"]), key, 0),
              detokenize=False, logprobs=1)
    if float(sampling["temperature"]) == 0.0:
        kw["top_k"] = 1
    else:
        kw["temperature"] = float(sampling["temperature"])
        if float(sampling["top_p"]) < 1.0:
            kw["top_p"] = float(sampling["top_p"])
        if int(sampling["top_k"]) > 0:
            kw["top_k"] = int(sampling["top_k"])
    vocab, model_vocab = sampling.get("vocab_size"), sampling.get("model_vocab_size")
    if vocab is not None and model_vocab is not None and vocab < model_vocab:
        # the in-process engine's tokenizer cut; bans change sampling, not the RAW log-probs
        kw["bad_token_ids"] = list(range(int(vocab), int(model_vocab)))
    return kw


def _logprob_value(entry) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def normalise_output(token_ids, logprobs, finish_reason, stop_reason, stop_ids) -> tuple[list, list, str]:
    """One TensorRT-LLM ``CompletionOutput`` -> (y' ids, per-token raw log-probs, finish reason) in the EOS convention.

    token_ids: the output ids; logprobs: one ``{token_id: Logprob-or-float}`` per position (the
    sampled token's entry must be there). Cases:

    * stopped on a stop id (``finish_reason="stop"``, ``stop_reason`` that id) and the ids end in
      it: kept as is (``include_stop_str_in_output=True``);
    * stopped on a stop id, cut from the ids but its log-prob still the extra last entry of
      ``logprobs`` (``include_stop_str_in_output`` ignored): the id is appended with that log-prob;
    * ``"length"`` with the ids ending in a stop id: the sampler checks the length limit before
      stop words, so a stop token drawn as the last allowed token reports LENGTH; it did stop
      there, so the finish reason becomes ``"stop"`` (as y' of the other engines);
    * other ``"length"`` outputs: unchanged;
    * anything else (the end-id path, which drops the token and its log-prob; log-prob counts
      that do not match the ids; another finish reason) raises RuntimeError: a y' without its stop
      token, or without its log-prob, would bias the margin and the agreement check.
    """
    ids = [int(t) for t in token_ids]
    entries = list(logprobs or [])
    stops = {int(s) for s in stop_ids}
    if finish_reason == "stop":
        if not isinstance(stop_reason, int) or stop_reason not in stops:
            raise RuntimeError(f"TensorRT-LLM stopped with stop_reason={stop_reason!r} (stop ids {sorted(stops)}): "
                               "the end-id path dropped the stop token and its log-prob; the worker must send "
                               "end_id=-1 with stop_token_ids")
        if (len(entries) == len(ids) + 1 and (not ids or ids[-1] != stop_reason)
                and isinstance(entries[-1], dict) and stop_reason in entries[-1]):
            ids.append(stop_reason)  # cut from the ids, log-prob kept: restore the token
        elif not ids or ids[-1] != stop_reason:
            raise RuntimeError(f"TensorRT-LLM stopped on id {stop_reason} but left it (and its log-prob) out of the "
                               "output")
    elif finish_reason == "length":
        if ids and ids[-1] in stops:
            finish_reason = "stop"  # the stop token was the last allowed one
    else:
        raise RuntimeError(f"TensorRT-LLM output finished with {finish_reason!r} (expected 'stop' or 'length')")
    if len(entries) != len(ids):
        raise RuntimeError(f"TensorRT-LLM returned {len(entries)} log-prob entries for {len(ids)} tokens")
    logps = []
    for pos, (tok, entry) in enumerate(zip(ids, entries)):
        if not isinstance(entry, dict) or tok not in entry:
            raise RuntimeError(f"TensorRT-LLM returned no log-prob of the sampled token {tok} at position {pos}")
        logps.append(_logprob_value(entry[tok]))
    return ids, logps, finish_reason


class Refused(RuntimeError):
    """A one-line reason the worker cannot run this job here; main() prints it and exits 1."""


def needs_line(found: str, what: str) -> str:
    """The worker's one-line refusal of a TensorRT-LLM it cannot use: the version found and the one needed."""
    return (f"trtllm_worker: tensorrt_llm {found} {what}; the worker needs tensorrt_llm=={PINNED} "
            f"(run `bash launch/setup_trtllm.sh`)")


def logprob_mode_problem(trtllm) -> Optional[str]:
    """The refusal line when ``tensorrt_llm`` cannot be asked for RAW log-probs, else None."""
    from spin_mcore.generation.workers import engine_check

    problem = engine_check.logprob_mode_problem(trtllm)
    return None if problem is None else needs_line(getattr(trtllm, "__version__", "?"), problem)


def make_sampling_params(trtllm, kw: dict):
    """``SamplingParams(**kw)`` asking for RAW log-probs; RuntimeError on a TensorRT-LLM without ``LogprobMode``."""
    problem = logprob_mode_problem(trtllm)
    if problem is not None:
        raise RuntimeError(problem)
    from tensorrt_llm import sampling_params as sp

    return trtllm.SamplingParams(**kw, logprobs_mode=sp.LogprobMode.RAW)


def check_probe_output(token_ids, logprobs) -> Optional[str]:
    """Why a greedy probe's output lacks the sampled tokens' raw log-probs (None: it has them).

    Every returned token needs its own entry, finite and <= 0, and, the probe being greedy, the
    largest of its position's entries (top-K without the sampled token, or processed/scaled
    values, fail here).
    """
    ids, entries = list(token_ids or []), list(logprobs or [])
    if not ids:
        return "no token came back"
    if len(entries) != len(ids):
        return f"{len(entries)} log-prob entries for {len(ids)} tokens"
    for pos, (tok, entry) in enumerate(zip(ids, entries)):
        if not isinstance(entry, dict) or int(tok) not in entry:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            return f"no entry for the returned token {tok} at position {pos} (entries for {got})"
        value = _logprob_value(entry[int(tok)])
        if not math.isfinite(value) or value > 0:
            return f"log-prob {value} of token {tok} at position {pos} is not a finite value <= 0"
        best = max(_logprob_value(v) for v in entry.values())
        if value < best - 1e-4:
            return f"greedy token {tok} at position {pos} has log-prob {value} below the returned maximum {best}"
    return None


def probe_problem(llm, trtllm, job) -> Optional[str]:
    """One greedy request of :data:`PROBE_TOKENS` tokens on the job's first prompt; the refusal line or None."""
    from spin_mcore.generation.workers import protocol

    prompt = next((protocol.read_prompts(s.prompts)[0]["prompt_ids"] for s in job.sets
                   if protocol.read_prompts(s.prompts)), None)
    if prompt is None:
        return None
    sampling = {**job.sampling, "temperature": 0.0, "num_samples": 1, "max_new_tokens": PROBE_TOKENS}
    kw = sampling_kwargs(sampling, "probe", protocol.max_tokens(sampling, prompt, job.max_model_len))
    out = llm.generate([{"prompt_token_ids": prompt}], sampling_params=[make_sampling_params(trtllm, kw)],
                       use_tqdm=False)[0].outputs[0]
    detail = check_probe_output(out.token_ids, out.logprobs)
    return None if detail is None else needs_line(trtllm.__version__, f"did not return the sampled token's raw "
                                                  f"log-prob (start-up probe: {detail})")


def build_llm(trtllm, job, model_dir: str):
    """The job's one ``tensorrt_llm.LLM`` (PyTorch backend)."""
    from tensorrt_llm.llmapi import KvCacheConfig

    kw = llm_kwargs(job, model_dir)
    frac = kw.pop("kv_cache_free_gpu_memory_fraction", None)
    if frac is not None:
        kw["kv_cache_config"] = KvCacheConfig(free_gpu_memory_fraction=frac)
    return trtllm.LLM(**kw)


def fp8_dir(job) -> Path:
    """The FP8 copy of the export; one per instance (instances on other nodes share the file system)."""
    suffix = "" if job.instance is None else f"-{job.instance}"
    return Path(str(job.model).rstrip("/") + "-fp8" + suffix)


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Size of an HF checkpoint's weights (its safetensors files)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def fp8_load_kwargs(free_bytes: list[int], model_bytes: int) -> dict:
    """``from_pretrained`` placement for calibration: the model spread over every visible GPU (pure).

    free_bytes: free memory of each GPU the engine's step sees (its ``engine_tensor_parallel`` GPUs);
    each takes at most :data:`FP8_GPU_FRACTION` of it. No CPU entry: offloaded layers would make the
    calibration crawl, so a model that does not fit is refused in one line instead.
    """
    if not free_bytes:
        raise Refused("trtllm_worker: generation.engine_quantization=fp8 needs CUDA GPUs, none is visible")
    caps = {i: int(b * FP8_GPU_FRACTION) for i, b in enumerate(free_bytes)}
    if sum(caps.values()) < model_bytes:
        raise Refused(f"trtllm_worker: generation.engine_quantization=fp8: the {model_bytes / 2**30:.1f} GiB model "
                           f"does not fit {len(caps)} GPU(s) at {FP8_GPU_FRACTION:.0%} of their free memory "
                           f"({sum(caps.values()) / 2**30:.1f} GiB); raise generation.engine_tensor_parallel")
    return {"device_map": "auto", "max_memory": caps}


def _visible_gpu_free_bytes() -> list[int]:
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def quantize_fp8(job) -> Path:
    """ModelOpt FP8 (per-tensor, ``FP8_DEFAULT_CFG``) checkpoint of the job's HF export; returns its directory.

    Calibrated on up to :data:`FP8_CALIBRATION_PROMPTS` of the job's own prompts. Written to a
    temporary sibling of the export and renamed: a killed worker leaves no half checkpoint, and a
    finished one is reused by the resumed job (the export is theta_t's, per iteration); the worker
    deletes it once every shard is written, as the parent deletes the export.
    """
    out = fp8_dir(job)
    if (out / "hf_quant_config.json").exists():
        return out
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from spin_mcore.generation.workers import protocol

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(job.dtype, torch.bfloat16)
    place = fp8_load_kwargs(_visible_gpu_free_bytes(), checkpoint_bytes(job.model))
    model = AutoModelForCausalLM.from_pretrained(job.model, torch_dtype=dtype, **place).eval()
    calib = [p["prompt_ids"] for s in job.sets for p in protocol.read_prompts(s.prompts)][:FP8_CALIBRATION_PROMPTS]
    first = model.get_input_embeddings().weight.device  # where the dispatched model takes its input

    def forward_loop(m):
        with torch.no_grad():
            for ids in calib:
                m(torch.tensor([ids], device=first))

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(tmp))
    del model
    torch.cuda.empty_cache()  # the engine gets the memory back
    os.replace(tmp, out)
    return out


def serve(job, llm, trtllm) -> dict:
    """Generate the listed shards this instance claims from ``job``'s queue with the started ``llm``; returns
    the counts.

    Still shard at a time (one blocking ``LLM.generate`` per shard, so each shard lasts as long as its
    longest sample): the windowed feed of the vLLM worker would go through ``LLM.generate_async`` here,
    which is not done yet because nothing on a CPU machine can check it against TensorRT-LLM's executor.
    """
    from spin_mcore.generation.workers import protocol

    def generate_chunk(chunk, sampling, stop_ids):
        def params_for(p):
            return make_sampling_params(trtllm, sampling_kwargs(sampling, p["key"], protocol.max_tokens(
                sampling, p["prompt_ids"], job.max_model_len)))

        def sample_of(o):
            ids, logps, finish = normalise_output(o.token_ids, o.logprobs, o.finish_reason, o.stop_reason, stop_ids)
            # the shared convention check (the same one the vLLM worker's outputs pass)
            ids, logps = protocol.normalise_eos(ids, logps, finish, ids[-1] if finish == "stop" else None, stop_ids)
            return ids, logps, finish

        return protocol.generate_records(llm, chunk, params_for, sample_of)

    return protocol.serve_shards(job, generate_chunk, "trtllm_worker")


def main(argv: list[str]) -> int:
    from spin_mcore.generation.workers import protocol
    from spin_mcore.utils.io import atomic_write_json

    job = protocol.job_from_argv(argv, "trtllm_worker")
    if job is None:
        return 2
    quant = job.engine.get("quantization")
    if quant not in (None, "fp8"):
        raise ValueError(f"job engine.quantization={quant!r}: TensorRT-LLM worker runs None or 'fp8'")
    protocol.install_stop_handlers()  # a time-limit signal requeues the job instead of failing it
    protocol.apply_device_slice()  # this instance's GPUs, before TensorRT-LLM sees any
    try:
        import tensorrt_llm as trtllm
    except ImportError as exc:
        print(f"trtllm_worker: tensorrt_llm cannot be imported by {sys.executable} ({exc}); create the TensorRT-LLM "
              f"environment on a CUDA machine with `bash launch/setup_trtllm.sh`", file=sys.stderr)
        return 1
    problem = logprob_mode_problem(trtllm)
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        return 1
    start = time.perf_counter()
    llm = None
    try:
        with protocol.interruptible():
            model_dir = str(quantize_fp8(job)) if quant == "fp8" else job.model
            llm = build_llm(trtllm, job, model_dir)
            problem = probe_problem(llm, trtllm, job)
        if problem is not None:
            print(problem, file=sys.stderr, flush=True)
            return 1
        load_seconds = round(time.perf_counter() - start, 3)
        print(f"trtllm_worker: engine up in {load_seconds} s (tensorrt_llm {trtllm.__version__}, "
              f"{'fp8 ' if quant else ''}{model_dir})", flush=True)
        counts = serve(job, llm, trtllm)
    except protocol.Stopped as exc:
        return protocol.stopped_exit("trtllm_worker", exc)
    except Refused as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    finally:
        if llm is not None:
            llm.shutdown()  # BaseLLM.shutdown (llm.py): the executor and its MPI session (tensor_parallel_size > 1)
    if quant == "fp8":
        shutil.rmtree(model_dir, ignore_errors=True)  # every shard is written: a 70B FP8 copy is 70 GB
    atomic_write_json(job.status_path, {"engine_starts": 1, "instance": job.instance, "load_seconds": load_seconds,
                                   "tensorrt_llm": trtllm.__version__, "quantization": quant, **counts})
    return 0


if __name__ == "__main__":  # the LLM API starts MPI worker processes: the entry must be guarded
    sys.exit(main(sys.argv[1:]))
