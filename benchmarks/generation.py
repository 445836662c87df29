"""Generated tokens/s of the in-process Megatron KV-cache engine vs. transformers ``generate`` vs. vLLM (CPU).

All three run the identical weights: a random ``LlamaForCausalLM`` saved as safetensors,
imported into the Megatron ``GPTModel`` with ``load_hf_weights``, loaded by transformers
with ``from_pretrained`` and by ``vllm.LLM`` with the engine worker's own settings
(:func:`spin_mcore.generation.workers.vllm_worker.llm_kwargs` / ``sampling_kwargs``: eager
mode, fp32, raw log-probs of each sampled token, a seed per request).

The workload is SPIN's: ``prompt_count(batch)`` prompts of mixed lengths, sampled at temperature 1
with a stop-token set (2% of the vocabulary, so responses end at varied lengths, capped at
``max_new_tokens``), ``batch`` sequences in flight:

* in-process: continuous batching with ``batch`` cache slots (finished rows are refilled);
* transformers: ``generate`` over consecutive left-padded batches (a batch runs until its
  longest row ends);
* vLLM: one engine (``max_num_seqs`` = the largest batch), fed through ``LLMEngine.add_request``
  / ``step`` so that at most ``batch`` requests are in flight (continuous batching at that
  concurrency).

Throughput counts only produced tokens (up to and including the stop token). It is measured
in CPU time of every process doing the work (vLLM: its front end, engine-core and model-worker
processes), with the same thread count for all three, so load from other processes on a
shared machine skews the ratios less; wall-clock tokens/s, and vLLM's tokens per CPU second
of its model worker alone, are printed too. Threads: torch ``set_num_threads(T)`` in this
process; vLLM gets ``VLLM_CPU_OMP_THREADS_BIND`` = cores ``0..T-1``, so its model worker runs
``OMP_NUM_THREADS=T`` threads bound to those cores (its scheduler and front end are single
Python threads), and ``OMP_NUM_THREADS=T`` for its other processes.

Startup (until the first generate can run) is measured in a fresh interpreter per backend,
from process creation: imports (torch, Megatron / transformers / ``import vllm``), model
build and weight load, and for the in-process engine its KV-cache allocation.

A greedy check runs the first prompts through all three (8 tokens, no stop ids) and
compares the token ids.

Two rows measure the engine worker itself (``spin_mcore.generation.workers.vllm_worker``), on the
same prompts, in shards of ``max_num_seqs`` prompts, with the response-length mix reported
(mean / p50 / p90 / max generated tokens; the 2% stop set makes them vary):

* feed: one vLLM engine (the vLLM child's), shard at a time (``serve_per_shard``: one blocking
  ``LLM.generate`` per shard, which lasts as long as its longest sample) vs the windowed feed
  (``serve``: ``add_request`` / ``step`` with ``2 x max_num_seqs`` prompts in flight across shard
  boundaries), in alternating order; tokens/s over all rounds, wall and CPU, and the sampled ids of
  the two compared (each prompt's seed is its own, so they must be equal).
* instances: 1 vs 2 engine instances (``generation.engine_instances``) serving one work queue: two
  processes each load the worker's engine, and each round the named instances serve a fresh job
  with the worker's windowed feed, claiming shards through the job's claim files as the instances
  of a run do (``protocol.claim_shard``). A round starts only once both engines are up, so the
  timed span (first start to last end) holds generation only, and rounds alternate which count
  goes first. Each instance gets its own ``T`` cores (``VLLM_CPU_OMP_THREADS_BIND``) when two fit
  the machine, as each instance has its own GPUs on a cluster. On 2 cores that is one core each,
  and every instance also runs an engine-core and a front-end process, so two instances compete
  for the cores with each other (and with anything else running): the row shows what a second
  instance yields here, not a GPU cluster's scaling.

    python benchmarks/generation.py [--quick] [--threads T]

The last line is JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GREEDY_PROMPTS, GREEDY_NEW = 3, 8

# name -> (hidden, layers, heads, kv heads, vocab, prompt lengths [lo, hi), max_new_tokens).
# Head size 64 in both: vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ...
SIZES = {
    "quick": (128, 2, 2, 1, 1024, (16, 48), 32),
    "default": (512, 8, 8, 4, 8192, (48, 80), 128),
}
SEQ = 256  # model context: longest prompt + max_new_tokens fits


# ----------------------------------------------------------------------------- shared set-up


def save_hf_model(size: str, directory: str):
    """Save a random LlamaForCausalLM of ``size`` to ``directory`` (safetensors); return the fp32 model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, vocab, _, _ = SIZES[size]
    ffn = int(hidden * 8 / 3) // 16 * 16
    torch.manual_seed(0)
    # eos = the first stop id, so no backend stops on an id outside the stop set (vLLM reads it from the config).
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=stop_set(vocab)[0], pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    return hf


def load_ours(directory: str, slots: int, max_len: int):
    """(model, pstate, engine-ready) for the in-process engine from the HF export in ``directory``."""
    from spin_mcore.config import load_config
    from spin_mcore.generation.engine import MegatronEngine
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import load_hf_weights
    from spin_mcore.platform import init_distributed

    cfg = load_config(overrides=[f"model.hf_config={directory}", f"model.seq_length={SEQ}"])
    pstate = init_distributed(cfg.parallel, seed=0)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    load_hf_weights(model, pstate, directory, cfg.model)
    MegatronEngine(model, pstate, slots=slots, max_len=max_len)  # what generate_tokens allocates first
    return model.eval(), pstate


def prompt_count(batch: int) -> int:
    """Prompts per point: 4 waves of ``batch`` (the drain at the end weighs 1/4), at least 16 (batch 1's noise)."""
    return max(16, 4 * batch)


def stop_set(vocab: int) -> list[int]:
    """Every 50th id from 3: a 2% chance per sampled token to stop (random weights have no real EOS)."""
    return list(range(3, vocab, 50))


def make_prompts(size: str, count: int) -> list[list[int]]:
    """``count`` random prompts with lengths uniform in the size's range (ids >= 3: no bos/pad/stop-0)."""
    import torch

    _, _, _, _, vocab, (lo, hi), _ = SIZES[size]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(lo, hi, (count,), generator=g)]


def _useful(tokens: list[int], stops: set) -> int:
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1
    return len(tokens)


def _process_age() -> float:
    """Seconds since this process was created (interpreter start included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _tree_cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and its live descendants, and of the model worker alone.

    vLLM on CPU runs three processes: this front end, ``VLLM::EngineCore`` (scheduler) and
    ``VLLM::Worker`` (the model, with the bound OpenMP threads). The first figure is the
    whole cost; the second, the worker's, is what the model itself took.
    """
    import psutil

    me = psutil.Process()
    total = worker = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
            if "Worker" in p.name():
                worker += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total, worker


# ----------------------------------------------------------------------------- in-process and transformers


def bench_hf(hf, prompts: list[list[int]], batch: int, new: int, stops: list[int]) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, produced tokens) of HF sampling over consecutive left-padded batches."""
    import torch

    torch.manual_seed(0)
    cpu, wall, tokens = time.process_time(), time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=new, pad_token_id=0, eos_token_id=stops)
            tokens += sum(_useful(row[width:].tolist(), set(stops)) for row in out)
    return time.process_time() - cpu, time.perf_counter() - wall, tokens


def bench_ours(model, pstate, prompts: list[list[int]], batch: int, new: int, stops: list[int],
               vocab: int) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, produced tokens) of the engine with ``batch`` slots."""
    from spin_mcore.generation import SamplingParams, generate_with_stats

    params = SamplingParams(temperature=1.0, max_new_tokens=new, stop_ids=tuple(stops), seed=0)
    cpu, wall = time.process_time(), time.perf_counter()
    outs, _ = generate_with_stats(model, pstate, prompts, params, batch_size=batch, vocab_size=vocab)
    return time.process_time() - cpu, time.perf_counter() - wall, sum(len(o[0]) for o in outs)


def greedy_ours(model, pstate, prompts: list[list[int]], vocab: int) -> list[list[int]]:
    from spin_mcore.generation import SamplingParams, generate_tokens

    outs = generate_tokens(model, pstate, prompts, SamplingParams(temperature=0.0, max_new_tokens=GREEDY_NEW),
                           batch_size=len(prompts), progress=False, vocab_size=vocab)
    return [o[0] for o in outs]


def greedy_hf(hf, prompts: list[list[int]]) -> list[list[int]]:
    import torch

    with torch.inference_mode():
        return [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW,
                            pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]


# ----------------------------------------------------------------------------- startup (fresh interpreters)


def startup_child(kind: str, directory: str, slots: int, max_len: int) -> None:
    """Runs in a fresh interpreter: import + load one backend, print seconds since process creation."""
    warnings.filterwarnings("ignore")
    if kind == "ours":
        load_ours(directory, slots, max_len)
    else:
        from transformers import LlamaForCausalLM

        LlamaForCausalLM.from_pretrained(directory).eval()
    print(json.dumps({"startup_s": _process_age()}))


def measure_startup(kind: str, directory: str, slots: int, max_len: int, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--startup-child", kind, directory, str(slots), str(max_len),
                          "--threads", str(threads)], capture_output=True, text=True, env=_env(threads))
    if out.returncode != 0:
        raise RuntimeError(f"{kind} startup child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["startup_s"]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    return env


# ----------------------------------------------------------------------------- vLLM (runs in .venv-vllm)


def vllm_child(spec_path: str) -> None:
    """Runs under the vLLM environment's interpreter: one engine start, greedy check, each batch timed.

    Writes ``spec["result"]``: startup seconds (from process creation, ``import vllm``
    included), greedy token ids, and per batch (cpu seconds of all its processes, wall
    seconds, tokens, cpu seconds of the model worker).
    """
    from spin_mcore.generation.workers import protocol
    from spin_mcore.generation.workers.vllm_worker import llm_kwargs, sampling_kwargs
    from spin_mcore.utils.io import atomic_write_json

    spec = json.loads(Path(spec_path).read_text())
    job = protocol.Job.load(spec["job"])
    import vllm
    from vllm.sampling_params import RequestOutputKind

    llm = vllm.LLM(**llm_kwargs(job))
    startup = _process_age()
    engine = llm.llm_engine

    def run(prompts: list[list[int]], params_of, concurrency: int) -> list[list[int]]:
        """Keep at most ``concurrency`` requests in flight; return each prompt's output ids."""
        outs: dict[str, list[int]] = {}
        waiting = list(enumerate(prompts))[::-1]
        inflight = 0
        while waiting or inflight:
            while waiting and inflight < concurrency:
                i, p = waiting.pop()
                params = params_of(i, p)
                params.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
                inflight += 1
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
                    inflight -= 1
        # assign_request_id may decorate the id: match on the "r<i>" prefix.
        by_index = {int(k[1:].split("-")[0]): v for k, v in outs.items()}
        return [by_index[i] for i in range(len(prompts))]

    greedy = run(spec["greedy_prompts"], lambda i, p: vllm.SamplingParams(
        temperature=0.0, max_tokens=spec["greedy_new"], ignore_eos=True, detokenize=False), len(spec["greedy_prompts"]))
    sampling = job.sampling

    def sampled(i, p):
        return vllm.SamplingParams(**sampling_kwargs(sampling, str(i), sampling["max_new_tokens"]))

    run(spec["prompts"][:2], sampled, 2)  # warm-up
    rows = {}
    for b in spec["batches"]:
        prompts = spec["prompts"][:prompt_count(b)]
        best = None
        for _ in range(spec["repeats"]):
            (cpu, worker), wall = _tree_cpu(), time.perf_counter()
            outs = run(prompts, sampled, b)
            (cpu_end, worker_end), wall_end = _tree_cpu(), time.perf_counter()
            r = (cpu_end - cpu, wall_end - wall, sum(len(o) for o in outs), worker_end - worker)
            best = r if best is None or r[0] < best[0] else best
        rows[str(b)] = best
    feed = feed_rows(job, llm, vllm, spec["feed"])
    atomic_write_json(spec["result"], {"startup_s": startup, "greedy": greedy, "batches": rows, "feed": feed,
                                       "vllm": vllm.__version__})


def _feed_job(job, prompts_path: str, out_dir: Path, shard_size: int, n_prompts: int, feed: str = ""):
    """A job of one prompt set (``n_prompts`` prompts in shards of ``shard_size``) served into ``out_dir``."""
    from spin_mcore.generation.workers import protocol

    m = int(job.engine["max_num_seqs"])
    pset = protocol.PromptSet("bench", prompts_path, str(out_dir), "bench", shard_size,
                              list(range(-(-n_prompts // shard_size))))
    return protocol.Job(model=job.model, dtype=job.dtype, max_model_len=job.max_model_len,
                        engine={**job.engine, "window": 2 * m, "feed": feed}, sampling=job.sampling, sets=[pset],
                        status=str(out_dir / "status.json"))


def served_samples(out_dir: Path) -> dict:
    """{(key, sample index): generated ids} of every shard an engine stage finished."""
    from spin_mcore.generation.workers import protocol

    entries = protocol.engine_entries(out_dir)
    return {(r["key"], r["sample_index"]): r["generated_ids"]
            for k in sorted(int(e) for e in entries) for r in protocol.read_engine_shard(out_dir, k, entries)}


def feed_rows(job, llm, vllm, spec: dict) -> dict:
    """Shard at a time vs the windowed feed on this child's engine (see module docstring), ``spec["rounds"]``
    rounds in alternating order. Per side: summed cpu seconds (all processes), wall seconds, tokens, and
    the model worker's cpu seconds; ``lengths``: every sample's generated tokens; ``same_samples``."""
    from spin_mcore.generation.workers import protocol, vllm_worker

    work = Path(spec["dir"])
    prompts_path = str(work / "prompts.jsonl")
    protocol.write_prompts(prompts_path, [f"p{i}" for i in range(len(spec["prompts"]))], spec["prompts"])
    serve = {"shard": vllm_worker.serve_per_shard, "windowed": vllm_worker.serve}
    sums = {side: [0.0, 0.0, 0, 0.0] for side in serve}
    samples = {}
    for r in range(spec["rounds"]):
        for side in (("shard", "windowed") if r % 2 == 0 else ("windowed", "shard")):
            out = work / f"{side}-{r}"
            fjob = _feed_job(job, prompts_path, out, spec["shard_size"], len(spec["prompts"]), side)
            (cpu, worker), wall = _tree_cpu(), time.perf_counter()
            counts = serve[side](fjob, llm, vllm)
            (cpu_end, worker_end), wall_end = _tree_cpu(), time.perf_counter()
            for i, v in enumerate((cpu_end - cpu, wall_end - wall, counts["generated_tokens"], worker_end - worker)):
                sums[side][i] += v
            samples.setdefault(side, served_samples(out))
    return {"sides": sums, "same_samples": samples["shard"] == samples["windowed"],
            "lengths": [len(v) for v in samples["windowed"].values()], "rounds": spec["rounds"],
            "shard_size": spec["shard_size"], "window": 2 * int(job.engine["max_num_seqs"])}


def bench_job(directory: str, work: Path, max_num_seqs: int, new: int, stops, vocab: int):
    """The engine job every vLLM measurement starts from: fp32, sampled at T=1, one sample per prompt."""
    from spin_mcore.generation.workers import protocol

    return protocol.Job(model=directory, dtype="float32", max_model_len=SEQ,
                        engine={"max_num_seqs": max_num_seqs, "memory_fraction": None, "tensor_parallel_size": 1,
                                "seed": 0, "device": "cpu"},
                        sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": new,
                                  "num_samples": 1, "seed": 0, "stop_ids": stops, "vocab_size": vocab,
                                  "model_vocab_size": vocab},
                        sets=[], status=str(work / "status.json"))


def run_vllm(python: Path, directory: str, work: Path, prompts, greedy_prompts, batches, new: int, stops, vocab: int,
             threads: int, repeats: int, feed_rounds: int) -> dict:
    """Start :func:`vllm_child` under ``python`` (the vLLM environment) and return its result."""
    job = bench_job(directory, work, max(batches), new, stops, vocab)
    (work / "feed").mkdir()
    spec = {"job": str(job.save(work / "job.json")), "prompts": prompts, "greedy_prompts": greedy_prompts,
            "greedy_new": GREEDY_NEW, "batches": list(batches), "repeats": repeats, "result": str(work / "vllm.json"),
            "feed": {"dir": str(work / "feed"), "prompts": prompts, "shard_size": max(batches), "rounds": feed_rounds}}
    (work / "spec.json").write_text(json.dumps(spec))
    env = _env(threads)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default size's 32 x 256 tokens need ~0.1
    out = subprocess.run([str(python), __file__, "--vllm-child", str(work / "spec.json")], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"vLLM benchmark child failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads((work / "vllm.json").read_text())


# ----------------------------------------------------------------------------- engine instances (a shared work queue)


def instance_child(spec_path: str, index: int) -> None:
    """Runs under the vLLM environment's interpreter: engine instance ``index`` of the instance rows.

    Loads ``vllm.LLM`` with the worker's settings, writes ``ready-<index>``, then for each round waits
    for ``go-<round>.json`` (which names the instances that serve it and the job) and, when named,
    serves the job's work queue with the worker's windowed feed (``vllm_worker.serve``: claims shared
    with the other instance through the job's claim files), writing ``done-<round>-<index>.json``
    (wall start/end, cpu seconds of its processes, tokens). The parent releases a round only once
    every instance is up, so engine starts never overlap the timed generation.
    """
    from spin_mcore.generation.workers import protocol, vllm_worker
    from spin_mcore.utils.io import atomic_write_json

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["dir"])
    import vllm

    llm = vllm.LLM(**vllm_worker.llm_kwargs(protocol.Job.load(spec["job"])))
    (work / f"ready-{index}").write_text("up")
    for r in range(spec["rounds"]):
        go = work / f"go-{r}.json"
        while not go.exists():
            time.sleep(0.01)
        order = json.loads(go.read_text())
        if index < order["instances"]:
            job = protocol.Job.load(order["job"])
            job.instance = index
            os.environ["SPIN_ENGINE_RUN"] = f"round-{r}"  # one run: the instances share its claims
            cpu, start = _tree_cpu()[0], time.time()
            counts = vllm_worker.serve(job, llm, vllm)
            atomic_write_json(work / f"done-{r}-{index}.json", {"start": start, "end": time.time(),
                                                               "cpu": _tree_cpu()[0] - cpu, **counts})


def _bind(index: int, threads: int) -> str:
    """Instance ``index``'s cores (``VLLM_CPU_OMP_THREADS_BIND``): its own ``threads`` when two instances' fit
    the machine, as each engine instance has its own GPUs; else unbound (the OS shares the cores)."""
    if 2 * threads > (os.cpu_count() or 1):
        return "nobind"
    lo = index * threads
    return f"{lo}-{lo + threads - 1}" if threads > 1 else str(lo)


def _wait_for(files: list[Path], procs: list) -> None:
    """Until ``files[i]`` exists for every i; RuntimeError with its log's tail when ``procs[i]`` (the instance
    child that writes it) has exited without writing it."""
    while not all(f.exists() for f in files):
        for f, (proc, log) in zip(files, procs):
            if proc.poll() is not None and not f.exists():
                raise RuntimeError(f"vLLM instance child failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def instance_rows(python: Path, directory: str, work: Path, prompts, max_num_seqs: int, new: int, stops,
                  vocab: int, threads: int, rounds: int) -> dict:
    """1 vs 2 engine instances on one work queue (see module docstring), ``rounds`` rounds each, alternating
    which goes first. Per count: summed span seconds (first start to last end), cpu seconds, tokens,
    and every round's per-instance shards and tokens."""
    from spin_mcore.generation.workers import protocol
    from spin_mcore.utils.io import atomic_write_json

    work = work / "instances"
    work.mkdir()
    base = bench_job(directory, work, max_num_seqs, new, stops, vocab)
    prompts_path = work / "prompts.jsonl"
    protocol.write_prompts(prompts_path, [f"p{i}" for i in range(len(prompts))], prompts)
    order = [n for r in range(rounds) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
    spec = {"dir": str(work), "job": str(base.save(work / "job.json")), "rounds": len(order)}
    (work / "spec.json").write_text(json.dumps(spec))
    procs = []
    for i in range(2):
        env = _env(threads)
        env.update(VLLM_CPU_OMP_THREADS_BIND=_bind(i, threads), VLLM_CPU_KVCACHE_SPACE="1")
        log = work / f"instance-{i}.log"
        with log.open("w") as fh:  # the child holds its own copy of the descriptor
            procs.append((subprocess.Popen([str(python), __file__, "--instance-child", str(work / "spec.json"),
                                            str(i)], env=env, stdout=fh, stderr=subprocess.STDOUT), log))
    out = {n: {"span_s": 0.0, "cpu_s": 0.0, "tokens": 0, "rounds": []} for n in (1, 2)}
    samples = {}
    try:
        _wait_for([work / f"ready-{i}" for i in range(2)], procs)
        for r, n in enumerate(order):
            job = _feed_job(base, str(prompts_path), work / f"out-{r}", max_num_seqs, len(prompts))
            atomic_write_json(work / f"go-{r}.json", {"instances": n, "job": str(job.save(work / f"job-{r}.json"))})
            done = [work / f"done-{r}-{i}.json" for i in range(n)]
            _wait_for(done, procs)
            parts = [json.loads(d.read_text()) for d in done]
            out[n]["span_s"] += max(p["end"] for p in parts) - min(p["start"] for p in parts)
            out[n]["cpu_s"] += sum(p["cpu"] for p in parts)
            out[n]["tokens"] += sum(p["generated_tokens"] for p in parts)
            out[n]["rounds"].append([{"shards": p["shards"], "tokens": p["generated_tokens"]} for p in parts])
            samples.setdefault(n, served_samples(work / f"out-{r}"))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"counts": out, "same_samples": samples[1] == samples[2], "prompts": len(prompts), "rounds": rounds,
            "bind": [_bind(i, threads) for i in range(2)]}


def length_mix(lengths: list[int]) -> dict:
    """mean / p50 / p90 / max of generated tokens per sample."""
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": round(sum(ordered) / len(ordered), 1), "p50": pct(0.5), "p90": pct(0.9), "max": ordered[-1]}


# ----------------------------------------------------------------------------- main


def _best(fn, repeats: int):
    return min((fn() for _ in range(repeats)), key=lambda r: r[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and fewer tokens (CI smoke, < 2 min)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                    help="CPU threads for every backend (1 avoids spin-wait contention on shared machines)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per point, best CPU time reported (default: 1 with --quick, else 2)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                    help="interpreter of the vLLM environment (bash launch/setup_vllm.sh creates it)")
    ap.add_argument("--vllm-child", help=argparse.SUPPRESS)
    ap.add_argument("--startup-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--instance-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads < 1 or args.threads > (os.cpu_count() or 1):
        raise ValueError(f"--threads={args.threads}: must be in 1..{os.cpu_count()} (the cores vLLM binds to)")
    args.repeats = (1 if args.quick else 2) if args.repeats is None else args.repeats
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats}: must be >= 1")
    if args.vllm_child:
        return vllm_child(args.vllm_child)
    if args.instance_child:
        return instance_child(args.instance_child[0], int(args.instance_child[1]))
    import torch

    torch.set_num_threads(args.threads)
    if args.startup_child:
        kind, directory, slots, max_len = args.startup_child
        return startup_child(kind, directory, int(slots), int(max_len))
    vllm_python = Path(args.vllm_python)
    if not vllm_python.exists():
        raise ValueError(f"--vllm-python={vllm_python} does not exist: create it with `bash launch/setup_vllm.sh`")
    warnings.filterwarnings("ignore")

    size = "quick" if args.quick else "default"
    hidden, layers, heads, kv, vocab, (lo, hi), new = SIZES[size]
    batches = (1, 8, 32)
    stops = stop_set(vocab)
    prompts = make_prompts(size, prompt_count(max(batches)))
    greedy_prompts = prompts[:GREEDY_PROMPTS]
    max_len = hi + new
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "hf")
        hf = save_hf_model(size, directory)
        startup = {"ours": measure_startup("ours", directory, max(batches), max_len, args.threads),
                   "hf": measure_startup("hf", directory, max(batches), max_len, args.threads)}
        vl = run_vllm(vllm_python, directory, Path(tmp), prompts, greedy_prompts, batches, new, stops, vocab,
                      args.threads, args.repeats, 2 * args.repeats)
        startup["vllm"] = vl["startup_s"]
        inst = instance_rows(vllm_python, directory, Path(tmp), make_prompts(size, 4 * len(prompts)), max(batches),
                             new, stops, vocab, args.threads, args.repeats)
        model, pstate = load_ours(directory, 1, max_len)

    g_ours, g_hf = greedy_ours(model, pstate, greedy_prompts, vocab), greedy_hf(hf, greedy_prompts)
    same = g_ours == g_hf == vl["greedy"]
    print(f"model: hidden {hidden}, layers {layers}, heads {heads} (kv {kv}, head size {hidden // heads}), vocab "
          f"{vocab}, fp32; max(16, 4 x batch) prompts of {lo}-{hi - 1} tokens, <= {new} new tokens, sampled at T=1, "
          f"{len(stops)} stop ids; {args.threads} thread(s) each (vLLM: VLLM_CPU_OMP_THREADS_BIND="
          f"{'0' if args.threads == 1 else f'0-{args.threads - 1}'}); best of {args.repeats} by CPU time; "
          f"vllm {vl['vllm']}")
    print(f"greedy token ids identical (in-process / transformers / vLLM, {GREEDY_PROMPTS} prompts x {GREEDY_NEW}): "
          f"{same}")
    print("startup (fresh process until the first generate can run): " +
          ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()))
    bench_ours(model, pstate, prompts[:2], 2, 2, stops, vocab)  # warm-up
    bench_hf(hf, prompts[:2], 2, 2, stops)
    print(f"{'batch':>5} {'ours tok/s':>10} {'hf tok/s':>9} {'vllm tok/s':>10} {'ours/hf':>8} {'vllm/ours':>9} "
          f"{'vllm/hf':>8}   wall tok/s ours / hf / vllm   vllm tok per worker-process CPU s")
    rows = {}
    for b in batches:
        chunk = prompts[:prompt_count(b)]
        ours = _best(lambda: bench_ours(model, pstate, chunk, b, new, stops, vocab), args.repeats)
        theirs = _best(lambda: bench_hf(hf, chunk, b, new, stops), args.repeats)
        res = {"ours": ours, "hf": theirs, "vllm": tuple(vl["batches"][str(b)])}
        cpu = {k: r[2] / r[0] for k, r in res.items()}
        vllm_worker = res["vllm"][2] / res["vllm"][3]
        wall = {k: r[2] / r[1] for k, r in res.items()}
        rows[b] = {"prompts": len(chunk), **{f"{k}_tok_s": round(v, 1) for k, v in cpu.items()},
                   **{f"{k}_wall_tok_s": round(v, 1) for k, v in wall.items()},
                   **{f"{k}_tokens": r[2] for k, r in res.items()}, "vllm_worker_cpu_tok_s": round(vllm_worker, 1),
                   "ours_over_hf": round(cpu["ours"] / cpu["hf"], 2), "vllm_over_ours": round(cpu["vllm"] / cpu["ours"], 2),
                   "vllm_over_hf": round(cpu["vllm"] / cpu["hf"], 2)}
        r = rows[b]
        print(f"{b:>5} {cpu['ours']:>10.1f} {cpu['hf']:>9.1f} {cpu['vllm']:>10.1f} {r['ours_over_hf']:>8.2f} "
              f"{r['vllm_over_ours']:>9.2f} {r['vllm_over_hf']:>8.2f}   "
              f"{wall['ours']:.1f} / {wall['hf']:.1f} / {wall['vllm']:.1f}   {vllm_worker:.1f}")
    feed = vl["feed"]
    fs = {side: {"tok_s": round(v[2] / v[1], 1), "cpu_tok_s": round(v[2] / v[0], 1), "tokens": v[2]}
          for side, v in feed["sides"].items()}
    feed_row = {"prompts": len(prompts), "shard_size": feed["shard_size"], "window_prompts": feed["window"],
                "rounds": feed["rounds"], "length_mix": length_mix(feed["lengths"]), "same_samples": feed["same_samples"],
                **{f"{side}_{k}": v for side, d in fs.items() for k, v in d.items()},
                "windowed_over_shard": round(fs["windowed"]["tok_s"] / fs["shard"]["tok_s"], 2),
                "windowed_over_shard_cpu": round(fs["windowed"]["cpu_tok_s"] / fs["shard"]["cpu_tok_s"], 2)}
    mix = feed_row["length_mix"]
    print(f"feed (one vLLM engine, {len(prompts)} prompts in shards of {feed['shard_size']} = max_num_seqs, "
          f"{feed['rounds']} alternating rounds; generated tokens per sample mean {mix['mean']}, p50 {mix['p50']}, "
          f"p90 {mix['p90']}, max {mix['max']}): shard at a time {fs['shard']['tok_s']:.1f} tok/s wall "
          f"({fs['shard']['cpu_tok_s']:.1f} per CPU s), windowed ({feed['window']} prompts in flight) "
          f"{fs['windowed']['tok_s']:.1f} ({fs['windowed']['cpu_tok_s']:.1f}): {feed_row['windowed_over_shard']:.2f}x "
          f"wall, {feed_row['windowed_over_shard_cpu']:.2f}x CPU; same samples: {feed['same_samples']}")
    ic = inst["counts"]
    inst_row = {"prompts": inst["prompts"], "rounds": inst["rounds"], "same_samples": inst["same_samples"],
                "bind": inst["bind"],
                **{f"instances_{n}_tok_s": round(c["tokens"] / c["span_s"], 1) for n, c in ic.items()},
                **{f"instances_{n}_cpu_tok_s": round(c["tokens"] / c["cpu_s"], 1) for n, c in ic.items()},
                "per_round": {str(n): c["rounds"] for n, c in ic.items()}}
    inst_row["two_over_one"] = round(inst_row["instances_2_tok_s"] / inst_row["instances_1_tok_s"], 2)
    print(f"engine instances (one work queue, {inst['prompts']} prompts in shards of {max(batches)}, {inst['rounds']} "
          f"round(s) each, {args.threads} thread(s) per instance, cores {' / '.join(inst['bind'])}, on "
          f"{os.cpu_count()} cores): 1 instance {inst_row['instances_1_tok_s']:.1f} tok/s wall "
          f"({inst_row['instances_1_cpu_tok_s']:.1f} per CPU s), 2 instances {inst_row['instances_2_tok_s']:.1f} "
          f"({inst_row['instances_2_cpu_tok_s']:.1f}): {inst_row['two_over_one']:.2f}x; shards per instance "
          f"{[r['shards'] for r in ic[2]['rounds'][0]]}; same samples: {inst['same_samples']}"
          + ("; each instance also runs an engine-core and a front-end process, so on 2 cores two instances "
             "compete for them with each other (and with whatever else runs here)" if (os.cpu_count() or 1) <= 2
             else ""))
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cores")
    print(json.dumps({"benchmark": "generation", "quick": args.quick, "threads": args.threads,
                      "model": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv, "vocab": vocab},
                      "prompt_tokens": [lo, hi - 1], "max_new_tokens": new, "greedy_tokens_identical": same,
                      "startup_s": {k: round(v, 2) for k, v in startup.items()}, "batches": rows,
                      "ours_over_hf_at_32": rows[32]["ours_over_hf"], "target_ours_over_hf_at_32": 1.5,
                      "vllm_over_ours_at_32": rows[32]["vllm_over_ours"], "vllm_over_hf_at_32": rows[32]["vllm_over_hf"],
                      "feed": feed_row, "windowed_over_shard": feed_row["windowed_over_shard"],
                      "instances": inst_row, "two_instances_over_one": inst_row["two_over_one"],
                      "cores": os.cpu_count(),
                      "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)], "vllm": vl["vllm"]}))


if __name__ == "__main__":  # vLLM spawns processes: the entry must be guarded
    main()
