"""The engine-worker protocol: one job file in, one ShardedStage directory per prompt set out.

Stdlib only, so it imports in an engine's environment (no torch, no Megatron).

Job (``JOB.json``, written by the parent, atomically)::

    {"version": 1,
     "model": HF export dir, "dtype": "float32", "max_model_len": int,
     "engine": {"max_num_seqs", "memory_fraction" (or null), "tensor_parallel_size", "seed"},
     "sampling": {"temperature", "top_p", "top_k", "max_new_tokens", "num_samples", "seed",
                  "stop_ids", "vocab_size"},
     "sets": [{"name", "prompts": PROMPTS.jsonl, "out_dir": DIR, "fingerprint", "shard_size",
               "shards": [k, ...], "sampling": null or {overrides of the job's sampling}}],
     "status": STATUS.json}

``PROMPTS.jsonl`` holds one ``{"key", "prompt_ids"}`` per accepted prompt, in stage order;
shard ``k`` is lines ``[k * shard_size, (k + 1) * shard_size)``. The worker generates exactly
the listed shards, each written atomically to ``out_dir`` (stage ``engine``) as one record
per (prompt, sample)::

    {"key", "sample_index", "generated_ids", "engine_logp", "engine_tokens", "finish_reason"}

``generated_ids`` ends in the stop id exactly when generation stopped on it (the in-process
engine's convention); ``engine_logp`` is the sum of the engine's raw (unscaled, unfiltered)
log-probs of ``generated_ids``. ``STATUS.json`` gets ``{"engine_starts", "load_seconds",
"generate_seconds", "generated_tokens", "shards"}`` when the worker ends. A killed worker
leaves whole shards only; shards already in ``out_dir``'s manifest are skipped on the next job.

Stop signals (SIGUSR1 from ``#SBATCH --signal=USR1@<s>``, which reaches the engine's own srun
step too; SIGTERM): :func:`install_stop_handlers` records the signal; the shard in flight is
abandoned (its generate call is interrupted, nothing of it is written) and the worker exits
with :data:`REQUEUE_EXIT_CODE`, which the parent treats as preemption. The next job generates
only the shards missing from the manifests.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from spin_mcore.utils.io import atomic_write_json, read_json
from spin_mcore.utils.shards import ShardedStage

VERSION = 1
ENGINE_STAGE = "engine"
#: Exit status of a worker stopped by a signal: the same as spin_mcore.platform.preemption's
#: (EX_TEMPFAIL), defined again here because the worker must not import torch.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Stopped(BaseException):
    """A stop signal arrived; raised at a shard boundary or out of the interrupted engine call.

    A BaseException, so the engine's own ``except Exception`` cannot swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.shards_done = 0  # set by serve_shards

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


# Process-wide by nature: a signal handler has nowhere else to write.
_STOP = {"signum": 0, "interruptible": False}


def _on_stop(signum, frame) -> None:
    if not _STOP["signum"]:
        _STOP["signum"] = signum
    if _STOP["interruptible"]:
        # once only: a second signal must not interrupt the unwinding of the first
        _STOP["interruptible"] = False
        raise Stopped(signum)


def install_stop_handlers() -> None:
    """SIGUSR1/SIGTERM stop the worker (see module docstring) instead of killing it mid-write."""
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop)


def stop_received() -> int:
    """The stop signal this worker received (0: none)."""
    return _STOP["signum"]


class interruptible:
    """Context for a long engine call (engine start, one shard's generate) that a stop signal may abandon.

    Outside it the handler only records the signal, so a shard being written is finished first.
    Any error of the call after a stop signal counts as the stop: under SLURM the engine's own
    helper processes get the signal too and die, which the engine reports as its own error.
    """

    def __enter__(self):
        if _STOP["signum"]:
            raise Stopped(_STOP["signum"])
        _STOP["interruptible"] = True
        return self

    def __exit__(self, exc_type, exc, tb):
        _STOP["interruptible"] = False
        if exc_type is not None and not issubclass(exc_type, Stopped) and _STOP["signum"]:
            raise Stopped(_STOP["signum"]) from exc
        return False


def stopped_exit(worker: str, exc: Stopped) -> int:
    """Print the worker's one line for a stop and return :data:`REQUEUE_EXIT_CODE`."""
    print(f"{worker}: {exc} after {exc.shards_done} shard(s) this run; the shard in flight was abandoned, "
          f"the requeued job generates the rest", file=sys.stderr, flush=True)
    return REQUEUE_EXIT_CODE


@dataclass
class PromptSet:
    """One prompt set of a job (e.g. the train or held-out prompts of an iteration)."""

    name: str
    prompts: str
    out_dir: str
    fingerprint: str
    shard_size: int
    shards: list = field(default_factory=list)
    sampling: Optional[dict] = None  # keys that override the job's sampling for this set


@dataclass
class Job:
    """What one engine start serves (see module docstring)."""

    model: str
    dtype: str
    max_model_len: int
    engine: dict
    sampling: dict
    sets: list
    status: str
    version: int = VERSION

    def save(self, path: str | Path) -> Path:
        atomic_write_json(path, asdict(self))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        raw = read_json(path)
        if raw is None:
            raise FileNotFoundError(f"{path}: no engine job file")
        if raw.get("version") != VERSION:
            raise ValueError(f"{path}: job version {raw.get('version')!r}, this worker reads {VERSION}")
        raw["sets"] = [PromptSet(**s) for s in raw["sets"]]
        return cls(**raw)


def job_from_argv(argv: list[str], worker: str) -> Optional[Job]:
    """The Job named by a worker's only argument, or None after printing the usage line (exit 2)."""
    if len(argv) != 1:
        print(f"usage: python -m spin_mcore.generation.workers.{worker} JOB.json", file=sys.stderr)
        return None
    return Job.load(argv[0])


def write_prompts(path: str | Path, keys: list[str], prompt_ids: list[list[int]]) -> None:
    """``PROMPTS.jsonl``: one ``{"key", "prompt_ids"}`` per line, atomically."""
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"key": k, "prompt_ids": list(map(int, ids))}) + "\n"
                                    for k, ids in zip(keys, prompt_ids)))


def read_prompts(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def engine_stage(out_dir: str | Path, fp: str) -> ShardedStage:
    """The worker's output stage of one prompt set (refuses another fingerprint's output)."""
    return ShardedStage(out_dir, ENGINE_STAGE, fp)


def read_engine_shard(out_dir: str | Path, index: int) -> list[dict]:
    """Records of engine shard ``index`` (must be in the manifest)."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json") or {"shards": {}}
    entry = manifest["shards"].get(f"{index:05d}")
    if entry is None:
        raise RuntimeError(f"{out_dir}: engine shard {index} is missing (the worker did not finish it)")
    with (out_dir / entry["file"]).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def done_shards(out_dir: str | Path) -> set[int]:
    """Shard indices already in an engine stage's manifest."""
    manifest = read_json(Path(out_dir) / "manifest.json") or {"shards": {}}
    return {int(k) for k in manifest["shards"]}


def normalise_eos(ids: list[int], logps: list[float], finish_reason: str, stop_reason, stop_ids) -> tuple[list, list]:
    """Apply the project's EOS convention to one engine output.

    y' ends in the stop id exactly when generation stopped on it. Engines that leave the stop
    token out (``finish_reason == "stop"`` with ``stop_reason`` a stop id not at the end) are
    refused rather than patched: its log-prob would be missing from the agreement check.
    """
    ids = list(map(int, ids))
    if finish_reason == "stop" and isinstance(stop_reason, int) and stop_reason in stop_ids:
        if not ids or ids[-1] != stop_reason:
            raise RuntimeError(f"engine stopped on id {stop_reason} but left it out of the output ids")
    elif ids and ids[-1] in stop_ids and finish_reason != "stop":
        raise RuntimeError(f"engine output ends in stop id {ids[-1]} with finish_reason={finish_reason!r}")
    return ids, logps


def sample_record(key: str, index: int, ids: list, logps: list, finish_reason: str) -> dict:
    """One engine-shard record (see module docstring)."""
    return {"key": key, "sample_index": index, "generated_ids": ids, "engine_logp": sum(logps),
            "engine_tokens": len(ids), "finish_reason": finish_reason}


def generate_records(llm, chunk: list[dict], params_for: Callable, sample_of: Callable) -> list[dict]:
    """One ``llm.generate`` call (vLLM's and TensorRT-LLM's LLM API have the same shape) over a shard's
    prompts; ``params_for(prompt)`` gives each prompt's sampling params, ``sample_of(output)`` turns one
    completion into (ids, logps, finish_reason). Records in (prompt, sample index) order."""
    outs = llm.generate([{"prompt_token_ids": p["prompt_ids"]} for p in chunk],
                        sampling_params=[params_for(p) for p in chunk], use_tqdm=False)
    records = []
    for p, res in zip(chunk, outs):
        for s, o in enumerate(sorted(res.outputs, key=lambda o: o.index)):
            records.append(sample_record(p["key"], s, *sample_of(o)))
    return records


def serve_shards(job: Job, generate_chunk: Callable, name: str) -> dict:
    """Every listed shard of every prompt set of ``job``: ``generate_chunk(chunk, sampling, stop_ids)``
    returns the chunk's records (:func:`sample_record`), written as one whole shard. Returns the counts.

    Shards already in a set's manifest (an earlier, killed worker's) are skipped. ``SPIN_<NAME>_KILL_AT=
    <set>:<shard>`` SIGKILLs the worker after generating that shard, before writing it (the tests' kill
    in the middle of a shard). A stop signal raises :class:`Stopped` (see :class:`interruptible`) with
    ``shards_done``, the shards this call wrote before it.
    """
    kill_at = os.environ.get(f"SPIN_{name.upper()}_KILL_AT")
    tokens, shards, start = 0, 0, time.perf_counter()
    for pset in job.sets:
        sampling = {**job.sampling, **(pset.sampling or {})}
        stop_ids = [int(i) for i in sampling["stop_ids"]]
        stage = engine_stage(pset.out_dir, pset.fingerprint)
        prompts = read_prompts(pset.prompts)
        for k in pset.shards:
            if stage.has_shard(k):
                continue
            chunk = prompts[k * pset.shard_size:(k + 1) * pset.shard_size]
            if not chunk:
                raise ValueError(f"{pset.prompts}: shard {k} is past the last prompt")
            try:
                with interruptible():
                    records = generate_chunk(chunk, sampling, stop_ids)
            except Stopped as exc:
                exc.shards_done = shards
                raise
            if kill_at == f"{pset.name}:{k}":
                os.kill(os.getpid(), signal.SIGKILL)
            stage.write_shard(k, records)
            tokens += sum(r["engine_tokens"] for r in records)
            shards += 1
            print(f"{name}: {pset.name} shard {k} done ({len(records)} samples)", flush=True)
    return {"generate_seconds": round(time.perf_counter() - start, 3), "generated_tokens": tokens, "shards": shards}


def max_tokens(sampling: dict, prompt_ids: list, max_model_len: int) -> int:
    """New tokens a prompt may get: ``max_new_tokens``, capped by the context left after the prompt."""
    return min(int(sampling["max_new_tokens"]), max_model_len - len(prompt_ids))
