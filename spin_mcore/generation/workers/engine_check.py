"""Does this environment have what the engine worker needs? ``<engine python> -m spin_mcore.generation.workers.engine_check {vllm|trtllm}``

Prints ONE JSON line ``{"backend", "ok", "version", "problems"}`` (each problem one line naming
the fix) and exits 0 when ok, else 1. It imports the engine and reads its API (classes, their
fields, the log-prob mode) without starting an engine, so it needs no GPU; ``spin-mcore doctor``
and ``launch/setup_trtllm.sh`` run it in the engine's environment. Stdlib only, like the workers.

What is checked is what the workers pass: the keyword arguments of ``vllm_worker.llm_kwargs`` /
``sampling_kwargs`` and of ``trtllm_worker.llm_kwargs`` / ``sampling_kwargs``, TensorRT-LLM's
``LogprobMode.RAW`` (``make_sampling_params``), ``KvCacheConfig(free_gpu_memory_fraction)`` and the
``CompletionOutput`` fields the worker reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import sys
from typing import Optional

TRTLLM_PINNED = "1.3.0rc7"  # launch/setup_trtllm.sh installs this version; trtllm_worker.PINNED
VLLM_ENGINE_ARGS = ("skip_tokenizer_init", "dtype", "seed", "max_model_len", "max_num_seqs", "tensor_parallel_size",
                    "logprobs_mode", "enforce_eager", "gpu_memory_utilization")
VLLM_SAMPLING_ARGS = ("n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "seed", "detokenize",
                      "logprobs", "allowed_token_ids")
TRTLLM_LLM_ARGS = ("skip_tokenizer_init", "dtype", "tensor_parallel_size", "max_batch_size", "max_seq_len",
                   "max_num_tokens", "kv_cache_config")
TRTLLM_SAMPLING_ARGS = ("n", "max_tokens", "end_id", "pad_id", "stop_token_ids", "include_stop_str_in_output", "seed",
                        "detokenize", "logprobs", "logprobs_mode", "top_k", "top_p", "temperature", "bad_token_ids")
TRTLLM_OUTPUT_FIELDS = ("index", "token_ids", "logprobs", "finish_reason", "stop_reason")
TRTLLM_FP8_MODULES = ("modelopt", "transformers", "accelerate")  # generation.engine_quantization=fp8


def field_names(cls) -> Optional[set]:
    """Names a class takes as keyword arguments (dataclass, pydantic, msgspec or plain signature); None: unknown."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    for attr in ("model_fields", "__struct_fields__"):  # pydantic v2, msgspec
        names = getattr(cls, attr, None)
        if names:
            return set(names)
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None  # takes anything by name: nothing to compare
    return {p.name for p in params}


def missing_fields(cls, wanted, label: str, fix: str) -> list[str]:
    """One problem line when ``cls`` lacks keyword arguments the worker passes."""
    names = field_names(cls)
    if names is None:
        return []
    lost = [w for w in wanted if w not in names]
    return [f"{label} has no {', '.join(lost)}; {fix}"] if lost else []


def logprob_mode_problem(trtllm) -> Optional[str]:
    """Why ``tensorrt_llm`` cannot be asked for RAW log-probs (a phrase), else None."""
    try:
        sp = importlib.import_module("tensorrt_llm.sampling_params")
    except ImportError:
        sp = None
    mode = getattr(sp, "LogprobMode", None)
    names = field_names(getattr(trtllm, "SamplingParams", None)) if hasattr(trtllm, "SamplingParams") else None
    if mode is None or not hasattr(mode, "RAW") or (names is not None and "logprobs_mode" not in names):
        return ("has no SamplingParams.logprobs_mode (tensorrt_llm.sampling_params.LogprobMode.RAW), so it cannot be "
                "asked for the sampled tokens' raw log-probs")
    return None


def _import(name: str, setup: str):
    """(module, None) or (None, the problem line)."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # an engine that fails to import for any reason cannot run the worker
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{name} cannot be imported by {sys.executable} ({first}); create the environment with `{setup}`"


def check_vllm() -> dict:
    setup = "bash launch/setup_vllm.sh"
    vllm, problem = _import("vllm", setup)
    if vllm is None:
        return {"backend": "vllm", "ok": False, "version": None, "problems": [problem]}
    fix = f"the vLLM worker needs the version launch/setup_vllm.sh installs (`{setup}`)"
    problems = []
    for name in ("LLM", "SamplingParams", "EngineArgs"):
        if not hasattr(vllm, name):
            problems.append(f"vllm.{name} is missing; {fix}")
    if hasattr(vllm, "EngineArgs"):
        problems += missing_fields(vllm.EngineArgs, VLLM_ENGINE_ARGS, "vllm.EngineArgs (vllm.LLM's arguments)", fix)
    if hasattr(vllm, "SamplingParams"):
        problems += missing_fields(vllm.SamplingParams, VLLM_SAMPLING_ARGS, "vllm.SamplingParams", fix)
    return {"backend": "vllm", "ok": not problems, "version": getattr(vllm, "__version__", None), "problems": problems}


def check_trtllm() -> dict:
    setup = "bash launch/setup_trtllm.sh"
    trtllm, problem = _import("tensorrt_llm", setup)
    if trtllm is None:
        return {"backend": "trtllm", "ok": False, "version": None, "problems": [problem]}
    version = getattr(trtllm, "__version__", None)
    fix = f"the TensorRT-LLM worker needs tensorrt_llm=={TRTLLM_PINNED} (`{setup}`)"
    problems = []
    mode = logprob_mode_problem(trtllm)
    if mode is not None:
        problems.append(f"tensorrt_llm {version} {mode}; {fix}")
    for name in ("LLM", "SamplingParams"):
        if not hasattr(trtllm, name):
            problems.append(f"tensorrt_llm.{name} is missing; {fix}")
    if hasattr(trtllm, "SamplingParams"):
        problems += missing_fields(trtllm.SamplingParams, [a for a in TRTLLM_SAMPLING_ARGS if a != "logprobs_mode"],
                                   "tensorrt_llm.SamplingParams", fix)
    llmapi, problem = _import("tensorrt_llm.llmapi", setup)
    if llmapi is None:
        problems.append(problem)
    else:
        for name, wanted in (("TorchLlmArgs", TRTLLM_LLM_ARGS), ("KvCacheConfig", ("free_gpu_memory_fraction",)),
                             ("CompletionOutput", TRTLLM_OUTPUT_FIELDS)):
            cls = getattr(llmapi, name, None)
            if cls is None:
                problems.append(f"tensorrt_llm.llmapi.{name} is missing; {fix}")
            else:
                problems += missing_fields(cls, wanted, f"tensorrt_llm.llmapi.{name}", fix)
    for name in TRTLLM_FP8_MODULES:
        if importlib.util.find_spec(name) is None:
            problems.append(f"{name} is not installed (generation.engine_quantization=fp8 needs it; tensorrt_llm=="
                            f"{TRTLLM_PINNED} brings it): `{setup}`")
    return {"backend": "trtllm", "ok": not problems, "version": version, "problems": problems}


CHECKS = {"vllm": check_vllm, "trtllm": check_trtllm}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: python -m spin_mcore.generation.workers.engine_check {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    result = CHECKS[argv[0]]()
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
