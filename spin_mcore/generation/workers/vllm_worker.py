"""vLLM engine worker: ``<engine python> -m spin_mcore.generation.workers.vllm_worker JOB.json``.

Starts ONE ``vllm.LLM`` on the job's HF export and serves the listed shards of every prompt
set it claims from the job's work queue (one of ``generation.engine_instances`` instances; see
:mod:`spin_mcore.generation.workers.protocol`). The engine is kept full: prompts go in through
``llm.llm_engine.add_request`` in a window that spans shard boundaries, ``step()`` advances it, and a
shard is written as soon as its last prompt finishes (``engine.feed == "shard"``: one blocking
``LLM.generate`` per shard instead, for the benchmark). Imports only the stdlib, vLLM, and
spin_mcore's stdlib-only modules: the parent runs it with ``PYTHONPATH=<checkout>`` in the
vLLM environment, which has no Megatron.

* Prompts go in as token ids and come back as token ids (``skip_tokenizer_init``): the
  export needs no tokenizer vLLM can load, and nothing is re-tokenised.
* Log-probs are the engine's raw ones (``logprobs_mode="raw_logprobs"``: log-softmax of the
  unscaled, unfiltered logits), the quantity the Megatron reference pass computes.
* Seeds: request ``i`` carries ``sample_seed(seed, key, 0)``; vLLM derives its ``n`` samples
  from it, so outputs do not depend on batching (they are not the in-process engine's streams).
* On CPU the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB), set by the parent.
* ``SPIN_VLLM_WORKER_KILL_AT=<set>:<shard>`` SIGKILLs the worker after generating that shard,
  before writing it (the resume test's kill in the middle of a shard).
* SIGUSR1/SIGTERM: the shard in flight is abandoned and the worker exits with
  ``protocol.REQUEUE_EXIT_CODE`` (75); finished shards stay in the manifest.
"""

from __future__ import annotations

import hashlib
import sys
import time


def sample_seed(seed: int, prompt_key: str, sample_index: int) -> int:
    """Same as :func:`spin_mcore.generation.sampling.sample_seed` (that module needs torch)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_key}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def llm_kwargs(job) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a job (pure: testable without vLLM)."""
    e = job.engine
    kw = dict(model=job.model, skip_tokenizer_init=True, dtype=job.dtype, seed=int(e["seed"]),
              max_model_len=int(job.max_model_len), max_num_seqs=int(e["max_num_seqs"]),
              tensor_parallel_size=int(e["tensor_parallel_size"]), logprobs_mode="raw_logprobs")
    if e.get("device") == "cuda":
        if e.get("memory_fraction") is not None:
            kw["gpu_memory_utilization"] = float(e["memory_fraction"])
    else:  # CPU: torch.compile of the model costs ~45 s per start on 2 cores and gains little at test sizes
        kw["enforce_eager"] = True
    return kw


def sampling_kwargs(sampling: dict, key: str, max_tokens: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt (``logprobs=0``: the sampled token's)."""
    kw = dict(n=int(sampling["num_samples"]), temperature=float(sampling["temperature"]),
              top_p=float(sampling["top_p"]), top_k=int(sampling["top_k"]) if sampling["top_k"] > 0 else 0,
              max_tokens=int(max_tokens), stop_token_ids=list(sampling["stop_ids"]),
              seed=sample_seed(int(sampling["seed"]), key, 0), detokenize=False, logprobs=0)
    vocab = sampling.get("vocab_size")
    if vocab is not None and vocab < sampling.get("model_vocab_size", vocab):
        kw["allowed_token_ids"] = list(range(int(vocab)))  # the in-process engine's tokenizer cut
    return kw


def _sampled_logps(out) -> list[float]:
    """The engine's log-prob of each sampled token of one CompletionOutput."""
    if out.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs (SamplingParams.logprobs=0 was ignored)")
    return [float(pos[tok].logprob) for tok, pos in zip(out.token_ids, out.logprobs)]


def window_prompts(job) -> int:
    """Prompts kept in flight: ``engine.window`` sequences (default twice ``max_num_seqs``, so the
    scheduler always has the next sequences queued when one finishes) over the samples per prompt."""
    e = job.engine
    seqs = int(e.get("window") or 2 * int(e["max_num_seqs"]))
    n = max([int(job.sampling["num_samples"])] + [int((s.sampling or {}).get("num_samples", 1)) for s in job.sets])
    return max(1, -(-seqs // n))


def _outcome(vllm, job, p, sampling, stop_ids):
    """``vllm.SamplingParams`` of one prompt, final output only (the windowed loop reads finished prompts)."""
    from spin_mcore.generation.workers import protocol

    params = vllm.SamplingParams(**sampling_kwargs(sampling, p["key"], protocol.max_tokens(
        sampling, p["prompt_ids"], job.max_model_len)))
    params.output_kind = vllm.sampling_params.RequestOutputKind.FINAL_ONLY
    return params


def _records_of(out, key: str, stop_ids) -> list[dict]:
    """One finished prompt's records, in sample order."""
    from spin_mcore.generation.workers import protocol

    records = []
    for s, o in enumerate(sorted(out.outputs, key=lambda o: o.index)):
        ids, logps = protocol.normalise_eos(o.token_ids, _sampled_logps(o), o.finish_reason, o.stop_reason, stop_ids)
        records.append(protocol.sample_record(key, s, ids, logps, o.finish_reason))
    return records


def serve(job, llm, vllm) -> dict:
    """Every listed shard this instance claims, fed through ``llm.llm_engine`` (add_request + step, the
    loop ``LLM.generate`` runs, without its drain per call) in a window across shard boundaries."""
    from spin_mcore.generation.workers import protocol

    engine = llm.llm_engine
    keys: dict = {}

    def submit(request_id, p, sampling, stop_ids):
        keys[request_id] = (p["key"], stop_ids)
        engine.add_request(request_id, {"prompt_token_ids": p["prompt_ids"]}, _outcome(vllm, job, p, sampling,
                                                                                        stop_ids))

    def step():
        done = []
        for out in engine.step():
            if out.finished:
                key, stop_ids = keys.pop(out.request_id)
                done.append((out.request_id, _records_of(out, key, stop_ids)))
        return done

    return protocol.serve_windowed(job, submit, step, "vllm_worker", window_prompts(job))


def serve_per_shard(job, llm, vllm) -> dict:
    """Shard at a time (one blocking ``LLM.generate`` per shard): the feed the windowed one replaces,
    kept for the benchmark's side-by-side."""
    from spin_mcore.generation.workers import protocol

    def generate_chunk(chunk, sampling, stop_ids):
        def params_for(p):
            return vllm.SamplingParams(**sampling_kwargs(sampling, p["key"], protocol.max_tokens(
                sampling, p["prompt_ids"], job.max_model_len)))

        def sample_of(o):
            ids, logps = protocol.normalise_eos(o.token_ids, _sampled_logps(o), o.finish_reason, o.stop_reason,
                                                stop_ids)
            return ids, logps, o.finish_reason

        return protocol.generate_records(llm, chunk, params_for, sample_of)

    return protocol.serve_shards(job, generate_chunk, "vllm_worker")


def main(argv: list[str]) -> int:
    from spin_mcore.generation.workers import protocol
    from spin_mcore.utils.io import atomic_write_json

    job = protocol.job_from_argv(argv, "vllm_worker")
    if job is None:
        return 2
    protocol.install_stop_handlers()  # a time-limit signal requeues the job instead of failing it
    protocol.apply_device_slice()  # this instance's GPUs, before vLLM sees any
    start = time.perf_counter()
    try:
        with protocol.interruptible():
            import vllm

            llm = vllm.LLM(**llm_kwargs(job))
        load_seconds = round(time.perf_counter() - start, 3)
        print(f"vllm_worker: engine up in {load_seconds} s (vllm {vllm.__version__})", flush=True)
        feed = serve_per_shard if job.engine.get("feed") == "shard" else serve
        counts = feed(job, llm, vllm)
    except protocol.Stopped as exc:
        return protocol.stopped_exit("vllm_worker", exc)
    atomic_write_json(job.status_path, {"engine_starts": 1, "instance": job.instance, "load_seconds": load_seconds, "vllm": vllm.__version__,
                                   **counts})
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the entry must be guarded
    sys.exit(main(sys.argv[1:]))
