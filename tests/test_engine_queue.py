"""The engine instances' work queue and windowed feed (issue 21), without an engine.

Claims are ``O_CREAT|O_EXCL`` files in the engine stage directory; a claim of another (dead) run is taken
over, the parent clears the claims of unfinished shards before a run, and the windowed feed keeps a
bounded number of prompts in flight across shard boundaries while writing each shard when it completes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from spin_mcore.config import ConfigError, load_config
from spin_mcore.generation import external
from spin_mcore.generation.workers import protocol


def _claim_all(out_dir: str, run: str, instance: int, n: int, q) -> None:
    q.put((instance, [k for k in range(n) if protocol.claim_shard(out_dir, k, run, instance)]))


def test_two_claimants_never_get_the_same_shard(tmp_path):
    """Two processes race over 200 shards: every shard claimed exactly once."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), "run-a", i, 200, q)) for i in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert sorted(got[0] + got[1]) == list(range(200)) and not set(got[0]) & set(got[1])
    # a second claimant of the same run gets nothing
    assert not any(protocol.claim_shard(tmp_path, k, "run-a", 2) for k in range(200))


def test_a_stale_claim_of_a_dead_run_is_served_again(tmp_path):
    assert protocol.claim_shard(tmp_path, 4, "dead-run", 1)
    assert not protocol.claim_shard(tmp_path, 4, "dead-run", 0)  # same run: taken
    assert protocol.claim_shard(tmp_path, 4, "live-run", 0)  # another run's claim: moved aside, claimed
    claim = json.loads((tmp_path / "claims" / "shard-00004.claim").read_text())
    assert claim["run"] == "live-run" and claim["instance"] == 0
    assert [f.name for f in (tmp_path / "claims").glob("*.stale-*")] == ["shard-00004.claim.stale-live-run-0"]


def _job(tmp_path: Path, n_prompts: int = 10, shard_size: int = 3) -> protocol.Job:
    keys = [f"k{i}" for i in range(n_prompts)]
    protocol.write_prompts(tmp_path / "p.jsonl", keys, [[1, i + 3] for i in range(n_prompts)])
    n_shards = -(-n_prompts // shard_size)
    pset = protocol.PromptSet("train", str(tmp_path / "p.jsonl"), str(tmp_path / "out"), "fp", shard_size,
                              list(range(n_shards)))
    job = protocol.Job(model="m", dtype="float32", max_model_len=16, engine={}, sampling={
        "num_samples": 1, "stop_ids": [2], "max_new_tokens": 4}, sets=[pset], status=str(tmp_path / "status.json"))
    job.save(tmp_path / "job.json")
    return job


def test_prepare_sets_clears_claims_of_unfinished_shards_only(tmp_path):
    job = _job(tmp_path)
    out = tmp_path / "out"
    protocol.write_engine_shard(out, 0, [{"key": "k0", "engine_tokens": 1}])
    for k in (0, 1):
        assert protocol.claim_shard(out, k, "old", 0)
    protocol.prepare_sets(job)
    assert sorted(f.name for f in (out / "claims").iterdir()) == ["shard-00000.claim"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == "fp" and sorted(manifest["shards"]) == ["00000"]  # the entry merged
    assert protocol.done_shards(out) == {0}


class FakeEngine:
    """Finishes one in-flight prompt per step, longest-waiting last for odd keys (out of order)."""

    def __init__(self):
        self.pending, self.max_in_flight, self.order = [], 0, []

    def submit(self, request_id, p, sampling, stop_ids):
        self.pending.append((request_id, p))
        self.max_in_flight = max(self.max_in_flight, len(self.pending))

    def step(self):
        request_id, p = self.pending.pop(-1 if len(self.pending) % 2 else 0)
        self.order.append(request_id)
        return [(request_id, [protocol.sample_record(p["key"], 0, [p["prompt_ids"][-1], 2], [-0.5, -0.5], "stop")])]


def test_windowed_feed_crosses_shard_boundaries_and_writes_each_shard_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_ENGINE_RUN", "r1")
    job = _job(tmp_path)  # 10 prompts in shards of 3: 4 shards, the last of 1
    engine = FakeEngine()
    counts = protocol.serve_windowed(job, engine.submit, engine.step, "fake_worker", window=4)
    assert counts["shards"] == 4 and counts["generated_tokens"] == 20 and counts["window"] == 4
    # a whole shard goes in while fewer than 4 prompts are in flight: at most 4 + 3 - 1
    assert engine.max_in_flight == 6
    out = tmp_path / "out"
    for k in range(4):
        recs = protocol.read_engine_shard(out, k)
        assert [r["key"] for r in recs] == [f"k{i}" for i in range(3 * k, min(3 * k + 3, 10))]  # prompt order
    # a second instance of the same run finds nothing left
    assert protocol.serve_windowed(job, engine.submit, engine.step, "fake_worker", window=4)["shards"] == 0


def test_instance_layout_cpu_cuda_and_bad_counts():
    g = load_config(overrides=["generation.backend=vllm"]).generation
    assert external.instance_layout(g, "cpu", ["n0", "n0"]) == [external.Instance(0, 0, "n0", 0)]  # auto on CPU: 1
    g = load_config(overrides=["generation.backend=vllm", "generation.engine_tensor_parallel=8"]).generation
    hosts = ["a"] * 8 + ["b"] * 8 + ["c"] * 8  # 3 nodes of 8 GPUs, ranks node by node
    assert [(i.leader, i.node, i.slot) for i in external.instance_layout(g, "cuda", hosts)] == [
        (0, "a", 0), (8, "b", 0), (16, "c", 0)]
    g = load_config(overrides=["generation.backend=vllm", "generation.engine_tensor_parallel=3",
                               "generation.engine_instances=4"]).generation
    assert [(i.index, i.leader, i.slot) for i in external.instance_layout(g, "cuda", hosts)] == [
        (0, 0, 0), (1, 3, 1), (2, 8, 0), (3, 11, 1)]  # 2 groups of 3 fit a node of 8
    g = load_config(overrides=["generation.backend=vllm", "generation.engine_tensor_parallel=8",
                               "generation.engine_instances=4"]).generation
    with pytest.raises(ConfigError, match=r"generation.engine_instances=4: only 3 TP group\(s\) of "
                                          r"generation.engine_tensor_parallel=8"):
        external.instance_layout(g, "cuda", hosts)
    for bad in ("0", "-1", "many", "1.5", "true"):
        with pytest.raises(ConfigError, match=f"generation.engine_instances="):
            load_config(overrides=[f"generation.engine_instances={bad}"])


def test_merged_status_of_instances():
    parts = [{"engine_starts": 1, "shards": 3, "generated_tokens": 30, "load_seconds": 2.0, "generate_seconds": 5.0},
             {"engine_starts": 1, "shards": 1, "generated_tokens": 9, "load_seconds": 3.0, "generate_seconds": 4.0}]
    out = external.merge_status(parts)
    assert (out["engine_starts"], out["shards"], out["generated_tokens"]) == (2, 4, 39)
    assert (out["load_seconds"], out["generate_seconds"]) == (3.0, 5.0) and out["instances"] == parts
