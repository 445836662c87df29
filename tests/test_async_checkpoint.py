"""Training checkpoints that do not stall training (issue 21, part 4), on 2 CPU ranks (DP=2, gloo).

* Megatron's asynchronous save: the steps after a save go on while a (deliberately slowed) writer
  stores it; the save is published (renamed, done.json) only after every rank's writer finished.
* A SIGUSR1 with a save in flight publishes it (and the stop's own save) before ``Preempted``.
* A SIGKILL while a save is in flight resumes from the last published checkpoint, bitwise equal.
* ``train.save_interval_minutes``: rank 0's clock decides, so both ranks save after the same steps.
* No train_state at the last step (the model save follows); a run killed between its last step and
  the model save retrains from the newest published checkpoint to the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records, write_pair_stage

from spin_mcore.training.train_checkpoint import latest_checkpoint, prune_train_state

STEPS = 8
BASE = ["model.preset=tiny", "model.seq_length=24", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]", "run.nproc=2",
        "train.micro_batch_size=1", "train.global_batch_size=4", f"train.max_steps={STEPS}",
        "train.save_interval=3", "train.async_save=true"]
WRITE_DELAY = 1.5  # seconds the slowed writer sleeps before it writes


def _cfg(overrides=()):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _slow_writer(delay: float, stamp_dir: Path):
    """Slow Megatron's async file writer (it runs in the forked save process); it stamps when it is done.

    Returns the undo function. The stamp (``written-<pid>``: CLOCK_MONOTONIC, shared by all processes)
    is the moment this rank's files were complete.
    """
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    real = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow(*args, **kwargs):
        time.sleep(delay)
        out = real(*args, **kwargs)
        (stamp_dir / f"written-{os.getpid()}").write_text(repr(time.monotonic()))
        return out

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow)
    return lambda: setattr(FileSystemWriterAsync, "write_preloaded_data_multiproc", staticmethod(real))


def _record_calls(module, name: str, log: list, label: str, before=None):
    """Wrap ``module.name`` to append (label, monotonic time at return, first int arg) to ``log``."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before()
        out = real(*args, **kwargs)
        step = next((a for a in args if isinstance(a, int) and not isinstance(a, bool)), None)
        log.append((label, time.monotonic(), step))
        return out

    setattr(module, name, wrapped)
    return lambda: setattr(module, name, real)


def _setup(tmp: Path):
    """Rank worker set-up: DP=2, 12 pairs, a saved theta_0 (each run starts from the same weights)."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training import trainer

    cfg = _cfg()
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    assert pstate.dp == 2
    if not (tmp / "init").exists():
        if pstate.rank == 0:
            write_pair_stage(tmp / "ref", [dict(r, ref_logp_real=-3.0 - 0.1 * i, ref_logp_generated=-2.5 - 0.05 * i)
                                           for i, r in enumerate(random_pair_records(12))])
        dist.barrier()
        model = trainer.setup_model(cfg, pstate, None, wrap_ddp=False)
        save_model_checkpoint(model, pstate, tmp / "init", cfg.model)
        del model
    return cfg, pstate


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _dp2_worker(tmp: str) -> dict:
    """Uninterrupted, slow-writer, preempted + resumed, and save_interval_minutes runs."""
    import torch.distributed as dist

    from spin_mcore.platform import preemption
    from spin_mcore.training import train_checkpoint, trainer

    tmp = Path(tmp)
    cfg, pstate = _setup(tmp)
    res: dict = {}
    data, init = [tmp / "ref"], str(tmp / "init")

    # Uninterrupted, synchronous: the reference weights.
    res["sync"] = trainer.train(_cfg(["train.async_save=false"]), pstate, data, init, tmp / "sync")
    res["sync_state"] = _steps(tmp / "sync" / "train_state")

    # Asynchronous with a slowed writer: when did each step end, each save start, each publish happen?
    log: list = []
    stamps = tmp / f"stamps-{pstate.rank}"
    stamps.mkdir(exist_ok=True)
    undo = [_slow_writer(WRITE_DELAY, stamps),
            _record_calls(trainer, "train_step", log, "step"),
            _record_calls(train_checkpoint, "_publish", log, "published"),
            _record_calls(train_checkpoint.CheckpointWriter, "save", log, "save_started")]
    res["async"] = trainer.train(cfg, pstate, data, init, tmp / "async")
    for u in undo:
        u()
    res["log"] = log
    res["written"] = sorted(float(p.read_text()) for p in stamps.iterdir())
    res["async_state"] = _steps(tmp / "async" / "train_state")

    # SIGUSR1 on rank 1 during step 5, while the step-3 save is still being written (slowed).
    undo = [_slow_writer(WRITE_DELAY, stamps)]
    calls = [0]
    real_step = trainer.train_step

    def signalling(*args, **kwargs):
        calls[0] += 1
        if pstate.rank == 1 and calls[0] == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    trainer.train_step = signalling
    try:
        trainer.train(cfg, pstate, data, init, tmp / "stopped")
        res["stop"] = None
    except preemption.Preempted as exc:
        preemption.reset()
        res["stop"] = {"signum": exc.signum, "where": exc.where}
    trainer.train_step = real_step
    for u in undo:
        u()
    res["stopped_state"] = _steps(tmp / "stopped" / "train_state")
    res["stopped_model"] = (tmp / "stopped" / "model").exists()
    res["resumed"] = trainer.train(cfg, pstate, data, init, tmp / "stopped")

    # save_interval_minutes: rank 1's clock runs 100x fast; alone it would save after every step.
    class FastClock:
        perf_counter = staticmethod(time.perf_counter)
        sleep = staticmethod(time.sleep)

        @staticmethod
        def monotonic():
            return time.monotonic() * (100.0 if pstate.rank == 1 else 1.0)

    saves: list = []
    undo = [_record_calls(train_checkpoint.CheckpointWriter, "save", saves, "save",),
            _record_calls(trainer, "train_step", [], "step", before=lambda: time.sleep(0.35))]
    trainer.time = FastClock
    try:
        trainer.train(_cfg(["train.save_interval=100", "train.save_interval_minutes=0.015"]), pstate, data, init,
                      tmp / "minutes")
    finally:
        trainer.time = time
        for u in undo:
            u()
    res["minute_saves"] = [s for _, _, s in saves]
    dist.barrier()
    return res


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("async_ckpt")
    return tmp, run_local(_dp2_worker, 2, str(tmp))


def _same_weights(a_dir: Path, b_dir: Path) -> bool:
    a, b = checkpoint_weights(a_dir), checkpoint_weights(b_dir)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU fp32


def test_async_save_matches_sync_and_skips_the_last_step(dp2):
    tmp, ranks = dp2
    for r in ranks:
        # Saves after steps 3 and 6; none after step 8, whose model checkpoint follows.
        assert r["sync_state"] == r["async_state"] == ["step_00000003", "step_00000006"]
        assert r["async"]["steps"] == STEPS and r["async"]["final"]["loss"] == r["sync"]["final"]["loss"]
    assert _same_weights(tmp / "sync" / "model", tmp / "async" / "model")
    # data_reader: the default loader (data.loader=auto) is DALI here, whose reader state is saved too
    assert json.loads((tmp / "async" / "train_state" / "step_00000006" / "done.json").read_text()) == \
        {"step": 6, "world_size": 2, "data_reader": True}


def test_training_continues_while_the_save_is_written(dp2):
    _, ranks = dp2
    for r in ranks:
        log = r["log"]
        started = [t for label, t, _ in log if label == "save_started"]
        published = [t for label, t, _ in log if label == "published"]
        steps = [t for label, t, _ in log if label == "step"]
        # Two train_state saves (a later write is the final model save: synchronous, same writer,
        # on the ranks that hold a main replica of some model tensor).
        assert len(started) == len(published) == 2 and len(r["written"]) >= 2
        for begin, written, done in zip(started, r["written"], published):
            # The step after the save started ended before this rank's writer finished writing,
            # and the save was published only after that.
            after = [t for t in steps if t > begin]
            assert after and after[0] < written < done, (begin, after[:1], written, done)
            assert written - begin >= WRITE_DELAY


def test_sigusr1_with_a_save_in_flight_publishes_it_then_stops(dp2):
    # The CLI's exit status 75 for Preempted: tests/test_preemption.py (async save on by default).
    tmp, ranks = dp2
    for r in ranks:
        assert r["stop"] == {"signum": signal.SIGUSR1, "where": f"training step 5/{STEPS}"}
        # The in-flight step-3 save and the stop's step-5 save, both published; no model yet.
        assert r["stopped_state"] == ["step_00000003", "step_00000005"] and not r["stopped_model"]
        assert r["resumed"]["resumed_from"].endswith("step_00000005")
    assert _same_weights(tmp / "sync" / "model", tmp / "stopped" / "model")


def test_save_interval_minutes_saves_after_the_same_steps_on_every_rank(dp2):
    _, ranks = dp2
    saves = [r["minute_saves"] for r in ranks]
    assert saves[0] == saves[1], saves
    # Rank 0's clock (~0.35 s a step, 0.9 s interval): some steps, not every one (rank 1's clock alone
    # would have saved after each of steps 1-7), never the last.
    assert 1 <= len(saves[0]) <= 4 and STEPS not in saves[0], saves


def test_a_rerun_of_a_finished_run_trains_nothing(dp2):
    from spin_mcore.launcher import run_local

    tmp, ranks = dp2
    again = run_local(_rerun_worker, 2, str(tmp))
    for r in again:
        assert r["steps"] == STEPS and r["resumed_from"] is None and r["seconds"] == 0.0
        assert r["final"] == ranks[0]["async"]["final"]


def _rerun_worker(tmp: str) -> dict:
    from spin_mcore.training import trainer

    tmp = Path(tmp)
    cfg, pstate = _setup(tmp)
    return trainer.train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "async")


# ----------------------------------------------------------------------------- SIGKILL (a real one)


def _killed_worker(tmp: str, out: str, delay: float, hold_model_save: bool) -> None:
    """The async run, with a writer slowed by ``delay`` seconds (and the model save held): killed by the test."""
    from spin_mcore.models import checkpoint
    from spin_mcore.training import trainer

    tmp, out = Path(tmp), Path(out)
    cfg, pstate = _setup(tmp)
    stamps = out.parent / f"{out.name}-stamps-{pstate.rank}"
    stamps.mkdir(parents=True, exist_ok=True)
    if delay:
        _slow_writer(delay, stamps)
    if hold_model_save:
        def held(*args, **kwargs):
            (out / "model-save-reached").write_text("")
            time.sleep(600)  # the kill comes first

        checkpoint.save_model_checkpoint = held
    trainer.train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), out)


def _run_killed(tmp: Path, out: Path, delay: float, hold_model_save: bool = False) -> subprocess.Popen:
    code = ("import sys; from spin_mcore.launcher import run_local; from tests.test_async_checkpoint import "
            "_killed_worker; run_local(_killed_worker, 2, sys.argv[1], sys.argv[2], float(sys.argv[3]), "
            "sys.argv[4] == '1')")
    return subprocess.Popen([sys.executable, "-c", code, str(tmp), str(out), str(delay), str(int(hold_model_save))],
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parent.parent)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its two ranks and their forked writers
    proc.wait()


def test_sigkill_during_an_in_flight_save_resumes_from_the_last_published_one_bitwise(dp2):
    from spin_mcore.launcher import run_local

    tmp, _ = dp2
    out = tmp / "killed"
    # The step-3 save is published (after 3 s of writing), the step-6 save is being written: kill.
    proc = _run_killed(tmp, out, 3.0)
    root = out / "train_state"
    _kill_when(proc, lambda: (root / "step_00000006.tmp").exists() and latest_checkpoint(root) is not None)
    assert latest_checkpoint(root).name == "step_00000003"
    assert (root / "step_00000006.tmp").exists() and not (root / "step_00000006").exists()
    assert not (out / "model").exists()
    resumed = run_local(_rerun_worker_at, 2, str(tmp), str(out))
    assert resumed[0]["resumed_from"].endswith("step_00000003")
    assert _same_weights(tmp / "sync" / "model", out / "model")
    assert _steps(root) == ["step_00000003", "step_00000006"]  # the stale temporary was cleared


def test_sigkill_between_the_last_step_and_the_model_save_retrains_to_the_same_weights(dp2):
    from spin_mcore.launcher import run_local

    tmp, _ = dp2
    out = tmp / "killed_at_end"
    proc = _run_killed(tmp, out, 0.0, hold_model_save=True)
    _kill_when(proc, lambda: (out / "model-save-reached").exists())  # after step 8, before the model
    assert (out / "model-save-reached").exists() and not (out / "model").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert _steps(out / "train_state") == ["step_00000003", "step_00000006"]  # none for step 8
    resumed = run_local(_rerun_worker_at, 2, str(tmp), str(out))
    assert resumed[0]["resumed_from"].endswith("step_00000006") and resumed[0]["steps"] == STEPS
    assert _same_weights(tmp / "sync" / "model", out / "model")


def _rerun_worker_at(tmp: str, out: str) -> dict:
    from spin_mcore.training import trainer

    tmp = Path(tmp)
    cfg, pstate = _setup(tmp)
    return trainer.train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), Path(out))


# ----------------------------------------------------------------------------- prune_train_state


def test_prune_train_state_keeps_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "iter_0" / "train" / "train_state"
    for name in ("step_00000002", "step_00000004", "step_00000006.tmp"):
        (root / name).mkdir(parents=True)
    for name in ("step_00000002", "step_00000004"):
        (root / name / "done.json").write_text("{}")
    deleted = prune_train_state(tmp_path / "iter_0")
    assert [p.name for p in deleted] == ["step_00000002", "step_00000006.tmp"]
    assert _steps(root) == ["step_00000004"]
    assert [p.name for p in prune_train_state(tmp_path / "iter_0" / "train", keep_newest=False)] == ["step_00000004"]
    assert not root.exists() and prune_train_state(tmp_path / "iter_0") == []
