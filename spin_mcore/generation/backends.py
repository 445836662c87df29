"""TensorRT-LLM and vLLM backends: generation from the iterate's HF safetensors export.

Both read the directory written by :func:`spin_mcore.models.hf_convert.export_hf`,
re-exported once per SPIN iteration (generation runs once per iteration, so an
export plus engine build is small next to the generation itself). Each of the
``generation.trt_instances`` data-parallel instances runs in its own spawned
process that sees only its ``trt_tp`` GPUs (``CUDA_VISIBLE_DEVICES``), and gets
every ``instances``-th prompt.

Everything that decides *what* is run (engine arguments, sampling arguments, GPU
sets, prompt split) is a pure function, testable without a GPU. A missing package
or GPU fails in :func:`check_backend_available`, at configuration time, with the
install command.

Seeding: each request carries its own seed ``sample_seed(seed, prompt_key, 0)``;
both engines derive a request's ``n`` samples from it, so outputs do not depend on
batching. They are not bit-identical to the in-process engine's streams.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from spin_mcore.config import ConfigError
from spin_mcore.generation.sampling import SamplingParams, sample_seed

PACKAGES = {"trtllm": "tensorrt_llm", "vllm": "vllm"}
INSTALL_HINT = "pip install 'spin_mcore[gpu]'"


def check_backend_available(backend: str, gpu_count: Optional[int] = None, needed_gpus: int = 1) -> None:
    """Raise :class:`ConfigError` naming what to install when ``backend`` cannot run here."""
    if backend == "megatron":
        return
    if backend not in PACKAGES:
        raise ConfigError(f"generation.backend={backend!r}: must be one of megatron, trtllm, vllm")
    package = PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"generation.backend={backend} needs the {package} package, which is not installed: "
                          f"{INSTALL_HINT} (on a CUDA machine), or set generation.backend=megatron")
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    if gpus < needed_gpus:
        raise ConfigError(f"generation.backend={backend} needs {needed_gpus} CUDA GPU(s) "
                          f"(generation.trt_tp x generation.trt_instances) but {gpus} are visible; "
                          f"use generation.backend=megatron on this machine")


def instance_gpu_sets(tp: int, instances: int, gpu_count: int) -> list[list[int]]:
    """GPU ids of each data-parallel instance: instance i gets ``[i*tp, (i+1)*tp)``."""
    if tp < 1 or instances < 1:
        raise ConfigError(f"generation.trt_tp={tp} and generation.trt_instances={instances} must be >= 1")
    if tp * instances > gpu_count:
        raise ConfigError(f"generation.trt_tp * trt_instances = {tp} * {instances} = {tp * instances} GPUs, "
                          f"but only {gpu_count} are visible")
    return [list(range(i * tp, (i + 1) * tp)) for i in range(instances)]


def split_for_instances(n_prompts: int, instances: int) -> list[list[int]]:
    """Prompt indices per instance (round-robin, so long and short prompts spread evenly)."""
    return [list(range(i, n_prompts, instances)) for i in range(instances)]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]


def trtllm_llm_kwargs(gen_cfg, hf_dir: str | Path, max_seq_len: int, dtype: torch.dtype) -> dict:
    """Keyword arguments of ``tensorrt_llm.LLM`` for one instance (its GPUs are set by the environment)."""
    return dict(model=str(hf_dir), tokenizer=str(hf_dir), tensor_parallel_size=gen_cfg.trt_tp,
                dtype=dtype_name(dtype), max_batch_size=gen_cfg.batch_size, max_seq_len=max_seq_len,
                skip_tokenizer_init=True)


def trtllm_sampling_kwargs(params: SamplingParams, prompt_key: str, end_id: Optional[int] = None) -> dict:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one request."""
    kw = dict(max_tokens=params.max_new_tokens, n=params.num_samples, stop_token_ids=list(params.stop_ids),
              seed=sample_seed(params.seed, prompt_key, 0), detokenize=False)
    if params.greedy:
        kw.update(temperature=0.0, top_k=1, top_p=1.0)
    else:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    if end_id is not None:  # without a tokenizer (skip_tokenizer_init) the engine must be told EOS/pad
        kw.update(end_id=end_id, pad_id=end_id)
    return kw


def vllm_llm_kwargs(gen_cfg, hf_dir: str | Path, max_seq_len: int, dtype: torch.dtype) -> dict:
    """Keyword arguments of ``vllm.LLM`` for one instance."""
    return dict(model=str(hf_dir), tokenizer=str(hf_dir), tensor_parallel_size=gen_cfg.trt_tp,
                dtype=dtype_name(dtype), seed=gen_cfg.seed, max_model_len=max_seq_len,
                max_num_seqs=gen_cfg.batch_size, skip_tokenizer_init=True)


def vllm_sampling_kwargs(params: SamplingParams, prompt_key: str) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (``top_k=-1`` disables top-k)."""
    return dict(n=params.num_samples, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                stop_token_ids=list(params.stop_ids), seed=sample_seed(params.seed, prompt_key, 0),
                detokenize=False)


def _run_instance(backend: str, gpus: list[int], llm_kwargs: dict, prompts: list[list[int]],
                  sampling: list[dict], max_new: list[int]) -> list[list[list[int]]]:
    """Child process: one engine on ``gpus``; returns per prompt, per sample, the generated ids."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if backend == "vllm":
        import vllm

        llm = vllm.LLM(**llm_kwargs)
        sps = [vllm.SamplingParams(**{**kw, "max_tokens": m}) for kw, m in zip(sampling, max_new)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sps, use_tqdm=True)
    else:
        import tensorrt_llm

        llm = tensorrt_llm.LLM(**llm_kwargs)
        sps = [tensorrt_llm.SamplingParams(**{**kw, "max_tokens": m}) for kw, m in zip(sampling, max_new)]
        outs = llm.generate(prompts, sampling_params=sps, use_tqdm=True)
    return [[list(map(int, o.token_ids)) for o in out.outputs] for out in outs]


class HFEngineBackend:
    """TensorRT-LLM or vLLM over an HF export, ``instances`` data-parallel copies."""

    def __init__(self, backend: str, gen_cfg, hf_dir: str | Path, max_seq_len: int, dtype: torch.dtype,
                 end_id: Optional[int] = None):
        check_backend_available(backend, needed_gpus=gen_cfg.trt_tp * gen_cfg.trt_instances)
        self.backend, self.gen_cfg, self.max_seq_len, self.end_id = backend, gen_cfg, max_seq_len, end_id
        make = trtllm_llm_kwargs if backend == "trtllm" else vllm_llm_kwargs
        self.llm_kwargs = make(gen_cfg, hf_dir, max_seq_len, dtype)
        self.gpu_sets = instance_gpu_sets(gen_cfg.trt_tp, gen_cfg.trt_instances, torch.cuda.device_count())

    def sampling_kwargs(self, params: SamplingParams, key: str) -> dict:
        if self.backend == "trtllm":
            return trtllm_sampling_kwargs(params, key, self.end_id)
        return vllm_sampling_kwargs(params, key)

    def generate(self, prompts: list[list[int]], keys: list[str], params: SamplingParams) -> list[list[list[int]]]:
        """Same contract as :func:`spin_mcore.generation.generate_tokens`."""
        from spin_mcore.launcher import WorkerError

        sampling = [self.sampling_kwargs(params, k) for k in keys]
        max_new = [min(params.max_new_tokens, self.max_seq_len - len(p)) for p in prompts]
        parts = split_for_instances(len(prompts), len(self.gpu_sets))
        ctx = torch.multiprocessing.get_context("spawn")
        outputs: list = [None] * len(prompts)
        with ctx.Pool(len(self.gpu_sets)) as pool:
            jobs = [pool.apply_async(_run_instance, (self.backend, gpus, self.llm_kwargs, [prompts[i] for i in idx],
                                                     [sampling[i] for i in idx], [max_new[i] for i in idx]))
                    for gpus, idx in zip(self.gpu_sets, parts)]
            for job, idx in zip(jobs, parts):
                try:
                    result = job.get()
                except Exception as exc:  # keep the engine's own message, name the backend
                    raise WorkerError(f"{self.backend} instance failed: {type(exc).__name__}: {exc}") from exc
                for i, out in zip(idx, result):
                    outputs[i] = out
        return outputs
