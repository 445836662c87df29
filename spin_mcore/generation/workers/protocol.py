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

Data-parallel instances (``generation.engine_instances``): N workers serve one job, each started as
``-m <worker> JOB.json INSTANCE`` (one instance: no INSTANCE, the single-engine layout), writing its
status to ``STATUS-<INSTANCE>.json``. The listed shards are a work queue: an instance claims a shard
by creating ``out_dir/claims/shard-KKKKK.claim`` with ``O_CREAT|O_EXCL`` (atomic on a shared file
system, no lock server), so no two instances serve one shard and a fast instance takes more. A
claim names the run (``SPIN_ENGINE_RUN``, fresh per parent start); the parent clears the claims of
unfinished shards before its instances start (:func:`prepare_sets`), and a claim of another run
is taken over by an atomic rename, so a killed instance's shards are served again on resume and
finished ones never. Instances write shards lock-free: the shard file, then its manifest entry
as ``out_dir/done/shard-KKKKK.json`` (:func:`write_engine_shard`); the parent merges the entries
into ``manifest.json``. A prompt's samples depend only on (seed, prompt key, sample index), never
on which instance served it or what else was in its batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from spin_mcore.utils.io import atomic_write_json, read_json, remove_stale_tmp
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
    instance: Optional[int] = None  # set from the worker's argv, never saved: one job file serves every instance

    def save(self, path: str | Path) -> Path:
        raw = asdict(self)
        raw.pop("instance")
        atomic_write_json(path, raw)
        return Path(path)

    @property
    def status_path(self) -> str:
        """Where this instance's status goes (:func:`instance_status`)."""
        return instance_status(self.status, self.instance)

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        raw = read_json(path)
        if raw is None:
            raise FileNotFoundError(f"{path}: no engine job file")
        if raw.get("version") != VERSION:
            raise ValueError(f"{path}: job version {raw.get('version')!r}, this worker reads {VERSION}")
        raw["sets"] = [PromptSet(**s) for s in raw["sets"]]
        return cls(**raw)


def instance_status(status: str, instance: Optional[int]) -> str:
    """``STATUS.json`` for the single engine (instance None), ``STATUS-<i>.json`` for instance i of several."""
    if instance is None:
        return str(status)
    path = Path(status)
    return str(path.with_name(f"{path.stem}-{instance}{path.suffix}"))


def job_from_argv(argv: list[str], worker: str) -> Optional[Job]:
    """The Job named by a worker's arguments ``JOB.json [INSTANCE]``, or None after printing the usage line (exit 2)."""
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        print(f"usage: python -m spin_mcore.generation.workers.{worker} JOB.json [INSTANCE]", file=sys.stderr)
        return None
    job = Job.load(argv[0])
    job.instance = int(argv[1]) if len(argv) == 2 else None
    return job


DEVICE_SLICE_ENV = "SPIN_ENGINE_DEVICE_SLICE"


def apply_device_slice(environ=None) -> Optional[str]:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to ``SPIN_ENGINE_DEVICE_SLICE=<start>:<count>`` of the visible GPUs.

    Instances sharing a node each take their own TP group of its GPUs; the worker applies this before
    the engine is imported. (Overlapping srun steps may be given the same GPUs, so the parent asks each
    step for the first ``start + count`` and the worker keeps the last ``count``.) Returns the new value.
    """
    env = os.environ if environ is None else environ
    spec = env.get(DEVICE_SLICE_ENV)
    if not spec:
        return None
    start, count = (int(x) for x in spec.split(":"))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(start + count)]
    if len(devices) < start + count:
        raise RuntimeError(f"{DEVICE_SLICE_ENV}={spec}: only {len(devices)} GPU(s) visible ({visible})")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[start:start + count])
    return env["CUDA_VISIBLE_DEVICES"]


def write_prompts(path: str | Path, keys: list[str], prompt_ids: list[list[int]]) -> None:
    """``PROMPTS.jsonl``: one ``{"key", "prompt_ids"}`` per line, atomically."""
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"key": k, "prompt_ids": list(map(int, ids))}) + "\n"
                                    for k, ids in zip(keys, prompt_ids)))


def read_prompts(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def engine_stage(out_dir: str | Path, fp: str) -> ShardedStage:
    """The engine stage of one prompt set, opened by the parent only (it removes stale temporary files,
    which a running instance may be writing, and refuses another fingerprint's output)."""
    return ShardedStage(out_dir, ENGINE_STAGE, fp)


DONE, CLAIMS = "done", "claims"


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _done_entries(out_dir: Path) -> dict:
    """Manifest entries the instances wrote (``done/shard-KKKKK.json``), by manifest key."""
    done = out_dir / DONE
    if not done.is_dir():
        return {}
    entries = {}
    for f in done.glob("shard-*.json"):
        entry = read_json(f)
        if entry is not None:
            entries[f.stem[len("shard-"):]] = entry
    return entries


def _entries(out_dir: str | Path) -> dict:
    """Every finished shard's manifest entry: the merged manifest's and the instances' own."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json") or {"shards": {}}
    return {**_done_entries(out_dir), **manifest["shards"]}


def write_engine_shard(out_dir: str | Path, index: int, records: list[dict]) -> None:
    """Instance: shard ``index``'s file, then its manifest entry; both atomic, no lock (instances share the dir)."""
    from spin_mcore.utils.io import atomic_write_text

    out_dir = Path(out_dir)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    name = _shard_name(index)
    atomic_write_text(out_dir / f"{name}.jsonl", text)
    (out_dir / DONE).mkdir(exist_ok=True)
    atomic_write_json(out_dir / DONE / f"{name}.json", {"file": f"{name}.jsonl", "records": text.count("\n"),
                                                         "sha256": hashlib.sha256(text.encode()).hexdigest()})


def engine_entries(out_dir: str | Path) -> dict:
    """Every finished shard's manifest entry (by ``"KKKKK"``), to pass to :func:`read_engine_shard`
    when reading many shards: each lookup otherwise lists ``done/`` again."""
    return _entries(out_dir)


def read_engine_shard(out_dir: str | Path, index: int, entries: Optional[dict] = None) -> list[dict]:
    """Records of engine shard ``index`` (must be finished); ``entries``: :func:`engine_entries`, read once."""
    out_dir = Path(out_dir)
    entry = (_entries(out_dir) if entries is None else entries).get(f"{index:05d}")
    if entry is None:
        raise RuntimeError(f"{out_dir}: engine shard {index} is missing (the worker did not finish it)")
    with (out_dir / entry["file"]).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def done_shards(out_dir: str | Path) -> set[int]:
    """Shard indices an engine stage has finished (in its manifest or written by an instance since)."""
    return {int(k) for k in _entries(out_dir)}


def check_fingerprint(out_dir: str | Path, fp: str) -> None:
    """Instance: refuse a stage directory written under another fingerprint (read only: no cleanup)."""
    manifest = read_json(Path(out_dir) / "manifest.json")
    if manifest is not None and manifest.get("fingerprint") != fp:
        raise ValueError(f"{out_dir}: engine output of fingerprint {manifest.get('fingerprint')}, job has {fp}")


def prepare_sets(job: Job) -> None:
    """Parent, before any instance of ``job`` starts: per set, stale temporary files removed, the
    instances' finished entries merged into ``manifest.json``, and the claims of unfinished shards
    cleared (their claimants, of an earlier run, are gone)."""
    for pset in job.sets:
        stage = engine_stage(pset.out_dir, pset.fingerprint)
        for f in (stage.dir / DONE, stage.dir / CLAIMS):
            if f.is_dir():
                remove_stale_tmp(f)
        stage.manifest["shards"].update(_done_entries(stage.dir))
        atomic_write_json(stage.manifest_path, stage.manifest)
        done = done_shards(stage.dir)
        claims = stage.dir / CLAIMS
        if claims.is_dir():
            for f in claims.iterdir():
                if f.name.startswith("shard-") and int(f.name[6:11]) not in done:
                    f.unlink(missing_ok=True)


def run_id() -> str:
    """The run id of this serve call's claims: ``SPIN_ENGINE_RUN``, which the parent sets for all of a
    job's instances; without it (a worker started by hand, an in-process call) a fresh one per call,
    never stored in the environment, so later calls and child processes do not inherit it."""
    return os.environ.get("SPIN_ENGINE_RUN") or f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"


def claim_shard(out_dir: str | Path, index: int, run: str, instance: int) -> bool:
    """Claim shard ``index`` for ``instance`` of run ``run``; False when someone of this run has it.

    ``O_CREAT|O_EXCL`` is the lock: exactly one creator succeeds. A claim of another run (a dead
    one: a live run's parent cleared them before starting) is moved aside by ``rename`` (atomic:
    exactly one of the claimants racing for it moves it) and the creation is tried again.
    """
    claims = Path(out_dir) / CLAIMS
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{_shard_name(index)}.claim"
    body = json.dumps({"run": run, "instance": instance, "pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _take_over_stale(path, run, instance):
                return False
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        return True
    return False


def _take_over_stale(path: Path, run: str, instance: int) -> bool:
    """Move aside ``path`` when it is another run's claim; True when this caller moved it."""
    try:
        owner = json.loads(path.read_text() or "{}").get("run")
    except (OSError, ValueError):
        return False  # vanished, or being written by a live claimant this instant
    if owner is None or owner == run:
        return False
    try:
        os.rename(path, path.with_name(f"{path.name}.stale-{run}-{instance}"))
    except FileNotFoundError:
        return False  # another claimant moved it first
    return True


def claimed_shards(job: Job, run: str) -> Iterator[tuple]:
    """The work queue: yields ``(set index, pset, shard, chunk, sampling, stop_ids)`` for each listed,
    unfinished shard this instance claims, in job order, claiming lazily (one per ``next``)."""
    instance = job.instance or 0
    for si, pset in enumerate(job.sets):
        check_fingerprint(pset.out_dir, pset.fingerprint)
        sampling = {**job.sampling, **(pset.sampling or {})}
        stop_ids = [int(i) for i in sampling["stop_ids"]]
        prompts = None
        for k in pset.shards:
            if k in done_shards(pset.out_dir) or not claim_shard(pset.out_dir, k, run, instance):
                continue
            if k in done_shards(pset.out_dir):  # finished between the check and the claim
                continue
            prompts = read_prompts(pset.prompts) if prompts is None else prompts
            chunk = prompts[k * pset.shard_size:(k + 1) * pset.shard_size]
            if not chunk:
                raise ValueError(f"{pset.prompts}: shard {k} is past the last prompt")
            yield si, pset, k, chunk, sampling, stop_ids


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


def _kill_hook(name: str) -> Optional[str]:
    """``SPIN_<NAME>_KILL_AT=<set>:<shard>``: SIGKILL the worker once that shard is generated, before it
    is written (the tests' kill in the middle of a shard)."""
    return os.environ.get(f"SPIN_{name.upper()}_KILL_AT")


def _finish_shard(name: str, kill_at: Optional[str], pset: PromptSet, k: int, records: list[dict]) -> int:
    """Write one generated shard; returns its engine tokens."""
    if kill_at == f"{pset.name}:{k}":
        os.kill(os.getpid(), signal.SIGKILL)
    write_engine_shard(pset.out_dir, k, records)
    print(f"{name}: {pset.name} shard {k} done ({len(records)} samples)", flush=True)
    return sum(r["engine_tokens"] for r in records)


def serve_shards(job: Job, generate_chunk: Callable, name: str) -> dict:
    """Shard at a time: each shard this instance claims (:func:`claimed_shards`) is one blocking
    ``generate_chunk(chunk, sampling, stop_ids)`` returning its records (:func:`sample_record`), written
    as one whole shard. Returns the counts.

    A stop signal raises :class:`Stopped` (see :class:`interruptible`) with ``shards_done``, the shards
    this call wrote before it. See :func:`_kill_hook` for the tests' kill.
    """
    kill_at, run = _kill_hook(name), run_id()
    tokens, shards, start = 0, 0, time.perf_counter()
    for _, pset, k, chunk, sampling, stop_ids in claimed_shards(job, run):
        try:
            with interruptible():
                records = generate_chunk(chunk, sampling, stop_ids)
        except Stopped as exc:
            exc.shards_done = shards
            raise
        tokens += _finish_shard(name, kill_at, pset, k, records)
        shards += 1
    return {"generate_seconds": round(time.perf_counter() - start, 3), "generated_tokens": tokens, "shards": shards}


@dataclass
class _Open:
    """A claimed shard whose prompts are in the engine: records by prompt position, filled as they finish."""

    pset: PromptSet
    index: int
    size: int
    rows: dict = field(default_factory=dict)


def serve_windowed(job: Job, submit: Callable, step: Callable, name: str, window: int) -> dict:
    """The engine kept full across shard boundaries: shards are claimed and their prompts submitted while
    fewer than ``window`` prompts are in flight, and each shard is written as soon as its last prompt
    finishes (resume stays per shard). Returns the counts.

    ``submit(request_id, prompt, sampling, stop_ids)`` adds one prompt (all its samples) to the engine;
    ``step()`` advances it and returns ``[(request_id, records of that prompt)]`` for the prompts that
    finished. A stop signal abandons every open shard (:class:`Stopped` with ``shards_done``).
    """
    kill_at, run = _kill_hook(name), run_id()
    queue = claimed_shards(job, run)
    open_: dict = {}
    tokens, shards, in_flight, start = 0, 0, 0, time.perf_counter()
    exhausted = False
    try:
        while True:
            while not exhausted and in_flight < window:
                item = next(queue, None)
                if item is None:
                    exhausted = True
                    break
                si, pset, k, chunk, sampling, stop_ids = item
                open_[(si, k)] = _Open(pset, k, len(chunk))
                for i, p in enumerate(chunk):
                    submit(f"{si}:{k}:{i}", p, sampling, stop_ids)
                in_flight += len(chunk)
            if not in_flight:
                break
            with interruptible():
                finished = step()
            for request_id, records in finished:
                si, k, i = (int(x) for x in request_id.split(":"))
                shard = open_[(si, k)]
                shard.rows[i] = records
                in_flight -= 1
                if len(shard.rows) == shard.size:
                    del open_[(si, k)]
                    recs = [r for j in range(shard.size) for r in shard.rows[j]]
                    tokens += _finish_shard(name, kill_at, shard.pset, k, recs)
                    shards += 1
    except Stopped as exc:
        exc.shards_done = shards
        raise
    return {"generate_seconds": round(time.perf_counter() - start, 3), "generated_tokens": tokens, "shards": shards,
            "window": window}


def max_tokens(sampling: dict, prompt_ids: list, max_model_len: int) -> int:
    """New tokens a prompt may get: ``max_new_tokens``, capped by the context left after the prompt."""
    return min(int(sampling["max_new_tokens"]), max_model_len - len(prompt_ids))
