"""vLLM engine worker: ``<engine python> -m spin_mcore.generation.workers.vllm_worker JOB.json``.

Starts ONE ``vllm.LLM`` on the job's HF export and serves every listed shard of every prompt
set (see :mod:`spin_mcore.generation.workers.protocol`). Imports only the stdlib, vLLM, and
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


def serve(job, llm, vllm) -> dict:
    """Generate every listed shard of every set of ``job`` with the started ``llm``; returns the counts."""
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
    start = time.perf_counter()
    try:
        with protocol.interruptible():
            import vllm

            llm = vllm.LLM(**llm_kwargs(job))
        load_seconds = round(time.perf_counter() - start, 3)
        print(f"vllm_worker: engine up in {load_seconds} s (vllm {vllm.__version__})", flush=True)
        counts = serve(job, llm, vllm)
    except protocol.Stopped as exc:
        return protocol.stopped_exit("vllm_worker", exc)
    atomic_write_json(job.status, {"engine_starts": 1, "load_seconds": load_seconds, "vllm": vllm.__version__,
                                   **counts})
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the entry must be guarded
    sys.exit(main(sys.argv[1:]))
