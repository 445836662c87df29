"""Preemption: SIGUSR1/SIGTERM stop every rank at the same step or shard boundary, state saved, and the
re-run resumes to the same result as an uninterrupted run (bitwise on CPU fp32).

References: uninterrupted runs in the same processes (trainer weights and metrics, reference and
generation records). In the 2-rank runs only rank 1 receives the signal (it sends it to itself
at a chosen call), so agreement comes from the all-reduced flag. The CLI test signals only the
parent `spin-mcore train` process, which forwards to its ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

from spin_mcore.platform import preemption
from spin_mcore.training.train_checkpoint import latest_checkpoint

SEQ = 24
STEPS = 12  # 12 pairs / global batch 4 = 3 steps per epoch: 4 epochs
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]"]
TRAIN = ["run.nproc=2", "train.micro_batch_size=1", "train.global_batch_size=4", f"train.max_steps={STEPS}",
         "train.save_interval=100"]  # no interval checkpoint before the end: a preempted run saves its own


# ----------------------------------------------------------------------------- in-process (no ranks)


@pytest.fixture
def clean_state():
    yield
    preemption.uninstall()
    preemption.reset()


def test_exit_code_and_exception_kind():
    assert preemption.REQUEUE_EXIT_CODE == 75  # EX_TEMPFAIL; launch/*.sh requeue on it
    assert issubclass(preemption.Preempted, BaseException) and not issubclass(preemption.Preempted, Exception)
    exc = preemption.Preempted(signal.SIGUSR1, "training step 3/12")
    assert exc.signal_name == "SIGUSR1" and str(exc) == "preempted by SIGUSR1 after training step 3/12"


def test_handlers_only_record_and_restore_the_previous_ones(clean_state):
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old_usr1 = signal.signal(signal.SIGUSR1, previous)
    try:
        assert preemption.install() is True and preemption.install() is False  # idempotent
        assert not preemption.stop_requested()  # no process group: the local flag
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing (and does not terminate)
        assert preemption.received() == signal.SIGUSR1 and preemption.stop_requested()
        assert preemption.preempted("x").signum == signal.SIGUSR1 and seen == []
        preemption.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)


def test_install_only_in_the_main_thread(clean_state):
    errors = []

    def body():
        try:
            preemption.install()
        except RuntimeError as exc:
            errors.append(str(exc))
        with preemption.handled():  # the context manager installs nothing off the main thread
            errors.append(preemption.installed())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert "main thread" in errors[0] and errors[1] is False


def test_a_child_started_blocked_keeps_an_early_signal_pending():
    code = ("import signal, time; time.sleep(0.3); "
            "print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))")
    with preemption.blocked():
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child.send_signal(signal.SIGTERM)  # before it could install a handler: pending, not fatal
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and json.loads(out) == sorted([signal.SIGUSR1, signal.SIGTERM])
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is back


# ----------------------------------------------------------------------------- 2 ranks (DP=2), one spawn


@dataclass
class _Prompt:  # duck-types spin_mcore.data.tokenize.TokenizedPrompt
    id: str
    prompt_ids: list
    response_ids: list


def _cfg(overrides):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _signal_self_on_call(module, name: str, call: int, signum: int, rank: int, pstate):
    """Wrap ``module.name`` so that on ``rank`` its ``call``-th call first sends ``signum`` to this process."""
    real, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if pstate.rank == rank and calls[0] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    setattr(module, name, wrapped)
    return lambda: setattr(module, name, real)


def _preempt(fn, *args, **kwargs) -> dict:
    """Run a stage that must stop with Preempted; return what it said, and forget the request."""
    try:
        fn(*args, **kwargs)
    except preemption.Preempted as exc:
        preemption.reset()
        return {"signum": exc.signum, "where": exc.where}
    raise AssertionError(f"{fn.__name__} was not preempted")


def _stage_files(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {"manifest": sorted(manifest["shards"]), "complete": manifest["complete"],
            "files": sorted(p.name for p in directory.iterdir() if p.name.startswith("shard-"))}


def _dp2_worker(tmp: str) -> dict:
    """Reference pass, generation stage and trainer, each uninterrupted and preempted + resumed."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from spin_mcore.generation import stage as gen_stage
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training import reference, trainer
    from spin_mcore.utils.shards import read_stage

    tmp = Path(tmp)
    cfg = _cfg(TRAIN + ["generation.shard_size=4"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    assert pstate.dp == 2
    records = random_pair_records(12)
    if pstate.rank == 0:
        write_pair_stage(tmp / "gen", records)
    dist.barrier()
    model = trainer.setup_model(cfg, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
    res: dict = {}

    # Reference pass, 3 shards; SIGTERM reaches rank 1 while it scores shard 1 of 3.
    reference.compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref")
    undo = _signal_self_on_call(reference, "_score_records", 1, signal.SIGTERM, 1, pstate)
    res["ref_stop"] = _preempt(reference.compute_reference_logprobs, cfg, model, pstate, [tmp / "gen"], tmp / "ref_b")
    undo()
    res["ref_partial"] = _stage_files(tmp / "ref_b")
    res["ref_resumed"] = reference.compute_reference_logprobs(cfg, model, pstate, [tmp / "gen"], tmp / "ref_b")
    res["ref_equal"] = list(read_stage(tmp / "ref")) == list(read_stage(tmp / "ref_b"))

    # Generation, 12 prompts / shard 2 = 6 shards in 3 rounds of 2 (one per DP rank); SIGUSR1 in round 1.
    gcfg = _cfg(TRAIN + ["generation.shard_size=2", "generation.max_new_tokens=6", "generation.temperature=1.0"])
    prompts = [_Prompt(f"p{i}", r["prompt_ids"], r["real_ids"]) for i, r in enumerate(records)]
    gen_stage.generate_opponent(gcfg, model, pstate, prompts, None, tmp / "opp", 0, checkpoint_id="init")
    undo = _signal_self_on_call(gen_stage, "generate_with_stats", 1, signal.SIGUSR1, 1, pstate)
    res["gen_stop"] = _preempt(gen_stage.generate_opponent, gcfg, model, pstate, prompts, None, tmp / "opp_b", 0,
                               checkpoint_id="init")
    undo()
    res["gen_partial"] = _stage_files(tmp / "opp_b")
    res["gen_resumed"] = gen_stage.generate_opponent(gcfg, model, pstate, prompts, None, tmp / "opp_b", 0,
                                                     checkpoint_id="init")
    res["gen_equal"] = list(read_stage(tmp / "opp")) == list(read_stage(tmp / "opp_b"))
    del model

    # Trainer: SIGUSR1 reaches rank 1 during step 3 of 12.
    trainer.train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "full")
    undo = _signal_self_on_call(trainer, "train_step", 3, signal.SIGUSR1, 1, pstate)
    res["train_stop"] = _preempt(trainer.train, cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "stopped")
    undo()
    at_stop = latest_checkpoint(tmp / "stopped" / "train_state")
    res["train_at_stop"] = (at_stop.name if at_stop else None, (tmp / "stopped" / "model").exists())
    res["train_resumed"] = trainer.train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "stopped")
    return res


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("preempt")
    return tmp, run_local(_dp2_worker, 2, str(tmp))


def test_reference_pass_stops_after_the_current_shard_and_resumes(dp2):
    _, ranks = dp2
    for r in ranks:  # both ranks stopped at the same shard, although only rank 1 got the signal
        assert r["ref_stop"] == {"signum": signal.SIGTERM, "where": "reference shard 1/3"}
    r = ranks[0]
    assert r["ref_partial"] == {"manifest": ["00000"], "complete": False, "files": ["shard-00000.jsonl"]}
    assert r["ref_resumed"]["scored_now"] == 8  # shards 1 and 2 only
    assert r["ref_equal"]


def test_generation_stops_after_the_current_round_and_resumes(dp2):
    _, ranks = dp2
    for r in ranks:
        assert r["gen_stop"] == {"signum": signal.SIGUSR1, "where": "generation shards 1-2/6"}
    r = ranks[0]
    assert r["gen_partial"] == {"manifest": ["00000", "00001"], "complete": False,
                                "files": ["shard-00000.jsonl", "shard-00001.jsonl"]}
    assert r["gen_resumed"]["shards_resumed"] == 2 and r["gen_resumed"]["shards"] == 6
    assert r["gen_equal"]


def test_trainer_saves_at_the_signalled_step_and_resumes_bitwise(dp2):
    tmp, ranks = dp2
    for r in ranks:
        assert r["train_stop"] == {"signum": signal.SIGUSR1, "where": f"training step 3/{STEPS}"}
        assert r["train_at_stop"] == ("step_00000003", False)  # saved by the stop, no final model
        assert r["train_resumed"]["resumed_from"].endswith("step_00000003")
    a, b = checkpoint_weights(tmp / "full" / "model"), checkpoint_weights(tmp / "stopped" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU fp32
    la = [json.loads(x) for x in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, STEPS + 1))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


# ----------------------------------------------------------------------------- CLI: signal to the parent only


def _cli(tmp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "spin_mcore.cli", "train", *BASE, *TRAIN,
            "--data", str(tmp / "ref"), "--out", str(out), "--init", str(tmp / "init")]


def test_cli_exits_for_requeue_on_sigusr1_and_the_rerun_matches(dp2):
    tmp, _ = dp2
    out = tmp / "cli"
    env = dict(os.environ, SPIN_MCORE_NO_PROGRESS="1")
    proc = subprocess.Popen(_cli(tmp, out), env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # the parent only: it forwards to its two ranks
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == preemption.REQUEUE_EXIT_CODE, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("spin-mcore")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("spin-mcore train: preempted (SIGUSR1 after training step ")
    assert lines[0].endswith("); state saved, re-run the same command to resume")
    at_stop = latest_checkpoint(out / "train_state")
    assert at_stop is not None and not (out / "model").exists()
    assert f"step {int(at_stop.name.split('_')[1])}/{STEPS}" in lines[0]

    rerun = subprocess.run(_cli(tmp, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["resumed_from"] == str(at_stop)
    a, b = checkpoint_weights(tmp / "full" / "model"), checkpoint_weights(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same as the uninterrupted in-process run
