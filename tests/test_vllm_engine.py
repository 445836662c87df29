"""The vLLM engine worker (generation.backend=vllm) on CPU: parity, log-probs, the loop, the agreement check.

Needs ``.venv-vllm`` (``bash launch/setup_vllm.sh``): skipped without it locally, FAILED without
it in CI (``CI`` set), where .ci/run creates it. Each test module start of vLLM costs ~30 s on 2
cores, so engine starts are shared: one job serves the parity and log-prob checks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from spin_mcore.config import load_config
from spin_mcore.generation.workers import protocol
from spin_mcore.launcher import run_local
from tests.helpers import hf_greedy_until, hf_logp
from spin_mcore.acceptance.checks_engine import tiny_hf_llama
from tests.test_generation import BOS, MAX_NEW, VOCAB, _prompts

# vLLM's CPU attention takes head sizes 32, 64, 80, ... (not the tiny preset's 16): 2 heads of 32, and
# 2 KV heads so the in-process engine also runs at TP=2.
HEADS = ["model.num_attention_heads=2", "model.num_query_groups=2"]

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _need_vllm_env() -> None:
    if not VENV_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VENV_PYTHON} is missing: .ci/run creates it with launch/setup_vllm.sh, so CI must have it")
        pytest.skip("no .venv-vllm: create it with `bash launch/setup_vllm.sh`")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random LlamaForCausalLM with head size 32 (peaked logits: greedy has clear winners)."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    return tiny_hf_llama(path, heads=2), str(path)


def _megatron_greedy(tp: int, hf_dir: str, stop: int) -> list[list[int]]:
    from spin_mcore.generation import SamplingParams, generate_tokens
    from tests.test_generation import _setup

    cfg, pstate, model = _setup(tp, hf_dir, HEADS)
    out = generate_tokens(model, pstate, _prompts(), SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                                   stop_ids=(stop,)),
                          batch_size=2, progress=False, vocab_size=VOCAB)
    return [o[0] for o in out]


@pytest.fixture(scope="module")
def engine_run(hf_model, tmp_path_factory):
    """One worker job, two prompt sets: greedy (stop id = a token greedy decoding reaches) and sampled."""
    _need_vllm_env()
    from spin_mcore.generation.external import run_engine

    model, hf_dir = hf_model
    free = hf_greedy_until(model, _prompts(), -1, MAX_NEW)
    stop = free[0][3]  # prompt 0 stops after 4 tokens: the EOS convention is exercised
    tmp = tmp_path_factory.mktemp("vllm")
    keys = [f"p{i}" for i in range(len(_prompts()))]
    sets = []
    for name in ("greedy", "sampled"):
        protocol.write_prompts(tmp / f"{name}.jsonl", keys, _prompts())
        sets.append(protocol.PromptSet(name, str(tmp / f"{name}.jsonl"), str(tmp / name), "fp", 2, [0, 1, 2]))
    base = {"top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_NEW, "seed": 3, "stop_ids": [stop],
            "vocab_size": VOCAB, "model_vocab_size": VOCAB}
    sets[1].sampling = {"temperature": 0.7, "num_samples": 2}
    job = protocol.Job(model=hf_dir, dtype="float32", max_model_len=64,
                       engine={"max_num_seqs": 8, "memory_fraction": None, "tensor_parallel_size": 1, "seed": 0,
                               "device": "cpu"},
                       sampling={**base, "temperature": 0.0, "num_samples": 1}, sets=sets,
                       status=str(tmp / "status.json"))
    status = run_engine(load_config(overrides=["generation.backend=vllm"]), job.save(tmp / "job.json"), "cpu")
    (mega,) = run_local(_megatron_greedy, 1, 1, hf_dir, stop)
    mega_tp2 = run_local(_megatron_greedy, 2, 2, hf_dir, stop)
    read = {s.name: [r for k in range(3) for r in protocol.read_engine_shard(s.out_dir, k)] for s in sets}
    return {"stop": stop, "free": free, "status": status, "megatron": mega, "megatron_tp2": mega_tp2, **read,
            "tmp": tmp}


def test_greedy_parity_vllm_transformers_megatron_with_eos(hf_model, engine_run):
    """Token ids identical across the engines (vLLM, transformers, in-process TP1 and TP2), y' ending in the stop id exactly when it stopped there."""
    expected = hf_greedy_until(hf_model[0], _prompts(), engine_run["stop"], MAX_NEW)
    got = [r["generated_ids"] for r in engine_run["greedy"]]
    assert expected[0][-1] == engine_run["stop"] and len(expected[0]) == 4  # stopped on the stop id, kept it
    assert any(len(e) == MAX_NEW and engine_run["stop"] not in e for e in expected)  # and a length-capped one
    assert got == expected
    assert engine_run["megatron"] == expected
    assert engine_run["megatron_tp2"] == [expected, expected]  # both TP ranks return the full outputs
    assert [r["finish_reason"] for r in engine_run["greedy"]] == ["stop" if e[-1] == engine_run["stop"] and
                                                                  len(e) < MAX_NEW else "length" for e in expected]
    assert engine_run["status"]["engine_starts"] == 1 and engine_run["status"]["shards"] == 6


def test_engine_logprobs_are_raw_model_logprobs(hf_model, engine_run):
    """engine_logp = log p(y'|x) of the unscaled model, also for samples drawn at temperature 0.7."""
    model = hf_model[0]
    sampled = engine_run["sampled"]
    assert len(sampled) == 2 * len(_prompts()) and {r["sample_index"] for r in sampled} == {0, 1}
    gaps = []
    for r in engine_run["greedy"] + sampled:
        p = _prompts()[int(r["key"][1:])]
        ref = hf_logp(model, p, r["generated_ids"])
        gaps.append(abs(r["engine_logp"] - ref) / len(r["generated_ids"]))
    assert max(gaps) < 1e-4, gaps
    # Temperature 0.7 samples differ from greedy ones, and a sample's pair is not a copy.
    assert any(a["generated_ids"] != b["generated_ids"] for a, b in zip(sampled[::2], sampled[1::2]))


# ----------------------------------------------------------------------------- the loop with generation.backend=vllm

LOOP_HEADS = ["model.num_attention_heads=1", "model.num_query_groups=1"]  # hidden 32: one head of 32


def _save_theta0(out_dir: str) -> None:
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from tests.helpers import tiny_model_overrides

    cfg = load_config(overrides=tiny_model_overrides() + LOOP_HEADS)
    pstate = init_distributed(cfg.parallel, seed=0)
    save_model_checkpoint(build_gpt_model(cfg.model, pstate, cfg.precision), pstate, out_dir, cfg.model)


@pytest.fixture(scope="module")
def loop_inputs(tmp_path_factory):
    """Demo data, a SentencePiece tokenizer trained on it, and a random theta_0 with head size 32."""
    from tests.helpers import make_tiny_data

    _need_vllm_env()
    root, tok = make_tiny_data(tmp_path_factory.mktemp("vllm_loop"), 240)
    run_local(_save_theta0, 1, str(root / "theta0"))
    return root, tok


def _loop_overrides(inputs, run_dir: Path) -> list[str]:
    from tests.helpers import tiny_model_overrides

    root, tok = inputs
    return [*tiny_model_overrides(), *LOOP_HEADS, "precision.recipe=fp32", "platform.device=cpu",
            f"data.path={root / 'arith.jsonl'}", f"data.tokenizer={tok}", "data.template=instruction",
            "data.max_prompt_length=28", "data.max_response_length=24", "data.num_prompts=40",
            "data.heldout_fraction=0.1", "generation.backend=vllm", "generation.max_new_tokens=24",
            "generation.shard_size=16", "generation.engine_max_num_seqs=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.max_steps=2", "train.recompute=false", "train.lr=[1e-4]",
            f"run.init_checkpoint={root / 'theta0'}", "run.iterations=1", "run.eval_prompts=4",
            f"run.dir={run_dir}"]


@pytest.fixture(scope="module")
def vllm_iteration(loop_inputs, tmp_path_factory):
    """The iteration killed in the middle of train shard 1 (the worker SIGKILLed), then run again to the end."""
    from spin_mcore.commands.run import run_rank
    from spin_mcore.launcher import WorkerError

    run_dir = tmp_path_factory.mktemp("vllm_run") / "run"
    os.environ["SPIN_VLLM_WORKER_KILL_AT"] = "train:1"
    try:
        with pytest.raises(WorkerError, match="vllm worker exited with -9"):
            run_local(run_rank, 1, None, _loop_overrides(loop_inputs, run_dir), False)
    finally:
        del os.environ["SPIN_VLLM_WORKER_KILL_AT"]
    engine_dir = run_dir / "iter_0" / "train_generation" / "engine"
    killed = {"shards": sorted(protocol.done_shards(engine_dir)),  # the worker's entries, merged on the next run
              "shard0": (engine_dir / "shard-00000.jsonl").read_bytes()}
    (rows,) = run_local(run_rank, 1, None, _loop_overrides(loop_inputs, run_dir), False)
    return rows, run_dir, killed


def test_spin_iteration_with_vllm_resumes_after_worker_kill_one_engine_start_and_agreement(vllm_iteration,
                                                                                          loop_inputs):
    rows, run_dir, killed = vllm_iteration
    it = run_dir / "iter_0"
    engine = json.loads((it / "engine.json").read_text())
    # 40 train prompts in shards of 16 (3), 4 held-out (1). The kill left train shard 0 only; the resumed
    # run's single engine start generated the other 3 and kept shard 0 as it was.
    assert killed["shards"] == [0]
    assert engine["engine_starts"] == 1 and engine["shards"] == 2 + 1 and engine["launcher"] == "local"
    assert not (it / "engine_export").exists()  # theta_t's HF export is deleted once its shards are converted
    assert (it / "train_generation" / "engine" / "shard-00000.jsonl").read_bytes() == killed["shard0"]
    for name in ("train", "heldout"):
        summary = json.loads((it / f"{name}_generation" / "manifest.json").read_text())["summary"]
        assert summary["backend"] == "vllm" and summary["engine_starts"] == 1
        agreement = json.loads((it / f"{name}_agreement.json").read_text())
        assert agreement["passed"] and agreement["threshold"] == 1e-3
        assert agreement["sequences"] == summary["samples"] and agreement["median"] < 1e-4, agreement
    recs = [json.loads(line) for f in sorted((it / "train_generation").glob("shard-*.jsonl")) for line in open(f)]
    assert all(r["generated_ids"] and "engine_logp" in r for r in recs)
    eos = recs[0]["sampling"]["stop_ids"][0]
    # EOS convention: finished on EOS <=> ends in EOS; otherwise the length cap was reached.
    assert all((r["finish_reason"] == "stop") == (r["generated_ids"][-1] == eos) for r in recs)
    assert all(r["finish_reason"] == "stop" or len(r["generated_ids"]) == 24 for r in recs)
    assert rows[0]["engine_agreement_median"] < 1e-4 and rows[0]["train_steps"] == 2
    # theta_t is read once in the resumed run: for the export; the reference passes and the trainer use
    # the same model, kept in memory while the engine ran (issue 21 part 3; before: 4 loads).
    timeline = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    last_export = max(i for i, r in enumerate(timeline) if r["stage"] == "export")
    resumed_run = timeline[last_export:]
    assert [(r["stage"], r["loads"]) for r in resumed_run if r["loads"]] == [("export", 1), ("evaluation", 1)]
    assert resumed_run[0]["loaded"] == [str(loop_inputs[0] / "theta0")]


def _stale_engine(overrides: list, theta_next: str, out_dir: str) -> dict:
    """Iteration 0's y', generated by vLLM from theta_0's export, scored by theta_1 as the trainer of iteration 1
    would score them: the engine ran the previous iterate's weights. The agreement check must fail."""
    from spin_mcore import loop
    from spin_mcore.generation.agreement import AgreementError
    from spin_mcore.platform import init_distributed
    from spin_mcore.run_dir import RunDir

    cfg = load_config(overrides=overrides)
    pstate = init_distributed(cfg.parallel, seed=0, platform=cfg.platform)
    run = RunDir(cfg.run.dir)
    model = loop.load_policy(cfg, pstate, theta_next)
    loop.score_pairs(cfg, pstate, model, theta_next, [run.iteration(0) / "heldout_generation"], Path(out_dir))
    try:
        loop.check_engine_agreement(cfg, pstate, run, 0, "stale_heldout", Path(out_dir))
    except AgreementError as exc:
        return {"error": str(exc)}
    return {"error": None}


def test_agreement_check_fails_when_the_engine_ran_the_previous_iterate(loop_inputs, vllm_iteration, tmp_path):
    rows, run_dir, _ = vllm_iteration
    theta_next = json.loads((run_dir / "iter_0" / "eval.json").read_text())["theta_next"]
    (r,) = run_local(_stale_engine, 1, _loop_overrides(loop_inputs, run_dir), theta_next, str(tmp_path / "scores"))
    msg = r["error"]
    assert msg is not None and msg.startswith("trainer-engine agreement failed for iteration 0 stale_heldout: median"), r
    assert "generation.agreement_threshold=0.001" in msg and "stale or mis-converted" in msg
    stats = json.loads((run_dir / "iter_0" / "stale_heldout_agreement.json").read_text())
    assert not stats["passed"] and stats["median"] > 1e-3, stats


# ----------------------------------------------------------------------------- pure parts (no vLLM needed)


def test_agreement_stats_and_threshold_message():
    from spin_mcore.generation.agreement import AgreementError, agreement_stats, check_agreement, default_threshold

    recs = [{"prompt_id": f"p{i}", "iteration": 1, "generated_ids": [5] * 4, "engine_logp": -4.0 - 0.004 * i,
             "ref_logp_generated": -4.0} for i in range(5)]
    recs.append({"prompt_id": "old", "iteration": 0, "generated_ids": [5], "engine_logp": 0.0, "ref_logp_generated": -9.0})
    stats = agreement_stats(recs, iteration=1)  # per-token gaps 0, 1e-3, 2e-3, 3e-3, 4e-3; iteration 0 left out
    assert stats["sequences"] == 5 and math.isclose(stats["median"], 2e-3) and math.isclose(stats["max"], 4e-3)
    assert math.isclose(stats["p90"], 3.6e-3) and stats["worst"] == "p4#0"
    check_agreement(stats, 0.05)
    with pytest.raises(AgreementError, match=r"median \|engine - reference\| log-prob gap 0.002 nats/token > "
                                             r"generation.agreement_threshold=0.001"):
        check_agreement(stats, default_threshold("fp32"))
    assert default_threshold("auto", "cpu") == 1e-3 and default_threshold("bf16", "cuda") == 0.05


def test_eos_convention_refuses_a_dropped_stop_token():
    assert protocol.normalise_eos([4, 7, 2], [-1.0] * 3, "stop", 2, [2]) == ([4, 7, 2], [-1.0] * 3)
    assert protocol.normalise_eos([4, 7], [-1.0] * 2, "length", None, [2])[0] == [4, 7]
    with pytest.raises(RuntimeError, match="left it out"):
        protocol.normalise_eos([4, 7], [-1.0] * 2, "stop", 2, [2])


def test_engine_wait_stops_the_worker_on_preemption():
    """A stop signal while rank 0 waits for the engine: its process group is stopped, Preempted is raised."""
    import signal
    import subprocess

    from spin_mcore.generation import external
    from spin_mcore.platform import preemption

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    newly = preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(preemption.Preempted, match="generation engine"):
            external._wait(proc)
        assert proc.poll() == -signal.SIGTERM
    finally:
        preemption.reset()
        if newly:
            preemption.uninstall()


def test_engine_python_missing_names_the_setup_command(tmp_path):
    from spin_mcore.config import ConfigError
    from spin_mcore.generation.external import engine_python

    cfg = load_config(overrides=["generation.backend=vllm", f"generation.python={tmp_path / 'nope' / 'python'}"])
    with pytest.raises(ConfigError, match="generation.python=.*bash launch/setup_vllm.sh"):
        engine_python(cfg.generation)
    cfg = load_config(overrides=["generation.backend=trtllm"])  # the default interpreter is per engine
    with pytest.raises(ConfigError, match=r"generation.python=.venv-trtllm/bin/python: .*bash launch/setup_trtllm.sh"):
        engine_python(cfg.generation)


def test_engine_check_vllm_in_the_real_environment():
    """`<.venv-vllm python> -m ...engine_check vllm`: one JSON line, ok, the installed version (no engine start)."""
    import subprocess

    _need_vllm_env()
    proc = subprocess.run([str(VENV_PYTHON), "-m", "spin_mcore.generation.workers.engine_check", "vllm"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout + proc.stderr[-2000:]
    assert json.loads(lines[0]) == {"backend": "vllm", "ok": True, "version": "0.32.0", "problems": []}
    bad = subprocess.run([str(VENV_PYTHON), "-m", "spin_mcore.generation.workers.engine_check", "sglang"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "usage: python -m spin_mcore.generation.workers.engine_check {vllm|trtllm}")


# ----------------------------------------------------------------------------- data-parallel instances (issue 21)


def _many_prompts(n: int = 16) -> list[list[int]]:
    """Prompts of mixed lengths (3..20 tokens), so responses finish at different steps."""
    g = torch.Generator().manual_seed(11)
    return [[BOS] + torch.randint(3, VOCAB, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _dp_job(tmp: Path, hf_dir: str, stop: int) -> Path:
    """Two prompt sets of 16 prompts in shards of 2 (8 shards each): greedy, and 2 samples at T=0.7.

    The feed window is 4 sequences, so an instance holds about one shard at a time and the two
    instances really share the queue."""
    keys = [f"q{i}" for i in range(16)]
    sets = []
    for name in ("greedy", "sampled"):
        protocol.write_prompts(tmp / f"{name}.jsonl", keys, _many_prompts())
        sets.append(protocol.PromptSet(name, str(tmp / f"{name}.jsonl"), str(tmp / name), "fp", 2, list(range(8))))
    sets[1].sampling = {"temperature": 0.7, "num_samples": 2}
    base = {"top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_NEW, "seed": 3, "stop_ids": [stop],
            "vocab_size": VOCAB, "model_vocab_size": VOCAB, "temperature": 0.0, "num_samples": 1}
    job = protocol.Job(model=hf_dir, dtype="float32", max_model_len=64,
                       engine={"max_num_seqs": 4, "memory_fraction": None, "tensor_parallel_size": 1, "seed": 0,
                               "device": "cpu", "window": 4},
                       sampling=base, sets=sets, status=str(tmp / "job" / "status.json"))
    (tmp / "job").mkdir(parents=True, exist_ok=True)
    return job.save(tmp / "job" / "job.json")


def _samples(tmp: Path) -> dict:
    """{(set, key, sample index): (generated ids, finish reason)} of every finished shard."""
    out = {}
    for name in ("greedy", "sampled"):
        for k in sorted(protocol.done_shards(tmp / name)):
            for r in protocol.read_engine_shard(tmp / name, k):
                out[(name, r["key"], r["sample_index"])] = (r["generated_ids"], r["finish_reason"])
    return out


def _dp_cfg(instances: int):
    return load_config(overrides=["generation.backend=vllm", f"generation.engine_instances={instances}"])


@pytest.fixture(scope="module")
def dp_runs(hf_model, tmp_path_factory):
    """One instance; then two instances of which the one that finishes greedy shard 3 is SIGKILLed before
    writing it, and a rerun of two instances serving what is missing."""
    _need_vllm_env()
    from spin_mcore.generation.external import instance_layout, run_engine
    from spin_mcore.launcher import WorkerError

    model, hf_dir = hf_model
    stop = hf_greedy_until(model, _many_prompts()[:1], -1, MAX_NEW)[0][3]  # q0 stops after 4 tokens
    one = tmp_path_factory.mktemp("dp1")
    status_one = run_engine(_dp_cfg(1), _dp_job(one, hf_dir, stop), "cpu")
    two = tmp_path_factory.mktemp("dp2")
    job = _dp_job(two, hf_dir, stop)
    layout = instance_layout(_dp_cfg(2).generation, "cpu", ["localhost"])
    os.environ["SPIN_VLLM_WORKER_KILL_AT"] = "greedy:3"
    try:
        with pytest.raises(WorkerError) as err:
            run_engine(_dp_cfg(2), job, "cpu", layout)
    finally:
        del os.environ["SPIN_VLLM_WORKER_KILL_AT"]
    claims = {(name, int(f.name[6:11])): json.loads(f.read_text())["instance"] for name in ("greedy", "sampled")
              for f in (two / name / "claims").glob("*.claim")}
    killed = {"message": str(err.value), "samples": _samples(two), "claims": claims,
              "done": {n: protocol.done_shards(two / n) for n in ("greedy", "sampled")},
              "bytes": {f: f.read_bytes() for n in ("greedy", "sampled") for f in (two / n).glob("shard-*.jsonl")}}
    status_two = run_engine(_dp_cfg(2), job, "cpu", layout)
    return {"one": _samples(one), "status_one": status_one, "two": _samples(two), "status_two": status_two,
            "killed": killed, "dir": two}


def test_two_instances_give_the_same_samples_as_one_for_every_prompt(dp_runs):
    """Greedy identical; sampled identical too: each prompt's seed is sample_seed(seed, key, 0), whichever
    instance served it and whatever else was in its batch."""
    one, two = dp_runs["one"], dp_runs["two"]
    assert len(one) == 16 + 32 and set(one) == set(two)
    assert one == two
    sampled = [one[("sampled", f"q{i}", s)][0] for i in range(16) for s in (0, 1)]
    assert any(a != b for a, b in zip(sampled[::2], sampled[1::2]))  # a prompt's 2 samples are not copies
    assert one[("greedy", "q0", 0)][1] == "stop" and len(one[("greedy", "q0", 0)][0]) == 4  # the EOS path
    assert any(one[("greedy", f"q{i}", 0)][1] == "length" for i in range(16))
    assert dp_runs["status_one"]["engine_starts"] == 1 and dp_runs["status_one"]["shards"] == 16


def test_a_killed_instance_leaves_only_its_shards_and_the_rerun_serves_just_those(dp_runs):
    killed, two = dp_runs["killed"], dp_runs["dir"]
    victim = int(killed["message"].split(" instance ")[1].split()[0])
    assert killed["message"].startswith(f"vllm worker instance {victim} of 2 on localhost exited with -9")
    assert killed["message"].splitlines()[0].endswith("; 1 of 2 failed):")
    assert 3 not in killed["done"]["greedy"]  # killed before it was written
    # Every unfinished shard was claimed by the killed instance; the survivor finished the rest of the queue.
    missing = {(n, k) for n in ("greedy", "sampled") for k in range(8) if k not in killed["done"][n]}
    assert ("greedy", 3) in missing and all(killed["claims"][m] == victim for m in missing)
    status = dp_runs["status_two"]
    assert status["shards"] == len(missing) and status["engine_starts"] == 2
    assert sorted(i["instance"] for i in status["instances"]) == [0, 1]
    assert sum(i["shards"] for i in status["instances"]) == len(missing)
    for f, data in killed["bytes"].items():  # nothing finished was redone
        assert f.read_bytes() == data
    assert all(protocol.done_shards(two / n) == set(range(8)) for n in ("greedy", "sampled"))
