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


# ----------------------------------------------------------------------------- engine-shard conversion over ranks


class _DigitTokenizer:
    """Decodes ids as their digits, so the converted records hold text a rank had to produce."""

    eos_id, bos_id = None, 1

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def _conversion_sets(out: Path) -> list[tuple]:
    """Two prompt sets under ``out``: 20 prompts (7 shards of 3) and 9 (3 shards), as ``(name, prompts, dir)``."""
    from spin_mcore.data.tokenize import TokenizedPrompt

    return [(name, [TokenizedPrompt(f"{name}{i}", [1, 3 + i, 4 + i % 5], [7, i % 9 + 3]) for i in range(n)], out / name)
            for name, n in (("train", 20), ("heldout", 9))]


def _write_engine_shards(out: Path) -> None:
    """Every engine shard of :func:`_conversion_sets` (2 samples per prompt), so generate_with_engine only
    converts: no export, no engine start."""
    for _, prompts, gen_dir in _conversion_sets(out):
        for k in range(-(-len(prompts) // 3)):
            protocol.write_engine_shard(gen_dir / "engine", k, [
                protocol.sample_record(p.id, s, [5 + s, 6 + k, p.prompt_ids[1]], [-0.25, -0.5, -1.0 - s], "length")
                for p in prompts[3 * k:3 * k + 3] for s in range(2)])


def _conversion_cfg():
    return load_config(overrides=["generation.backend=vllm", "generation.shard_size=3", "generation.num_samples=2",
                                  "generation.max_new_tokens=3", "model.seq_length=16"])


def _convert_rank(out: str) -> list:
    """Rank worker: generate_with_engine over finished engine shards; returns the (set, shard)s this rank converted."""
    from spin_mcore.platform import init_distributed

    cfg = _conversion_cfg()
    pstate = init_distributed(cfg.parallel, seed=0)
    seen, real = [], external.convert_shard

    def spy(engine_dir, k, *args):
        seen.append((Path(engine_dir).parent.name, k))
        return real(engine_dir, k, *args)

    external.convert_shard = spy

    def no_model():
        raise AssertionError("every shard is generated: nothing should load a model")

    status = external.generate_with_engine(cfg, pstate, no_model, _conversion_sets(Path(out)), _DigitTokenizer(), 0,
                                           "ckpt", Path(out))
    assert status == {"engine_starts": 0}
    return seen


def test_conversion_spread_over_two_ranks_is_byte_identical_to_one_rank(tmp_path):
    """Each rank converts the i-th shard to convert when i % world == rank (both sets in one round robin); the
    generate stages (shards, manifests) are byte for byte those of a single rank, decoded text included."""
    from spin_mcore.launcher import run_local

    dirs = {}
    for world in (1, 2):
        dirs[world] = tmp_path / f"world{world}"
        _write_engine_shards(dirs[world])
        got = run_local(_convert_rank, world, str(dirs[world]))
        if world == 2:
            todo = [("train", k) for k in range(7)] + [("heldout", k) for k in range(3)]
            assert got == [todo[0::2], todo[1::2]]  # rank 1 converted train 1, 3, 5 and heldout 0, 2
        else:
            assert len(got[0]) == 10
    files = {w: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
                 and "engine" not in p.parts} for w, d in dirs.items()}
    assert sorted(map(str, files[1])) == sorted(
        [f"{n}/manifest.json" for n in ("train", "heldout")] + [f"train/shard-{k:05d}.jsonl" for k in range(7)]
        + [f"heldout/shard-{k:05d}.jsonl" for k in range(3)])
    assert files[1] == files[2]
    manifest = json.loads(files[2][Path("train/manifest.json")])
    assert manifest["complete"] and list(manifest["shards"]) == [f"{k:05d}" for k in range(7)]
    rec = json.loads(files[2][Path("train/shard-00001.jsonl")].splitlines()[0])
    assert (rec["prompt_id"], rec["generated"], rec["engine_logp"], rec["real"]) == ("train3", "5 7 6", -1.75, "7 6")
