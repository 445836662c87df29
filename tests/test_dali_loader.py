"""NVIDIA DALI over the binary token store vs the torch path over the JSON shards (data.loader).

Independent references: the JSON shards parsed record by record (``example_from_record``) for
the store's contents; the plan's per-rank item indices (``StepPlan.rank_microbatches``) for which
records each DP rank must see; the torch loader's training run for the DALI run (bitwise on CPU
fp32); strace's ``openat`` log for the files a rank opens.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import checkpoint_weights, random_pair_records

pytest.importorskip("nvidia.dali", reason="launch/setup_local.sh installs nvidia-dali-cuda120")

SEQ = 24
BASE = ["model.preset=tiny", f"model.seq_length={SEQ}", "train.lr=[0.001]", "train.warmup_fraction=0.0",
        "train.optimizer=rmsprop", "train.clip_grad=1.0", "train.eps=0.01", "spin.beta=[0.5]"]


def _scored_records(n: int, seed: int = 0) -> list[dict]:
    """Reference-stage records: random pairs with float64 log-probs that fp32 cannot hold exactly."""
    rng = random.Random(seed)
    return [dict(r, ref_logp_real=-rng.uniform(1, 40), ref_logp_generated=-rng.uniform(1, 40))
            for r in random_pair_records(n, seed)]


def _write_stage(path: Path, records: list[dict], shard: int = 5) -> Path:
    from spin_mcore.utils.shards import ShardedStage

    stage = ShardedStage(path, "reference", "test")
    for k in range(0, len(records), shard):
        stage.write_shard(k // shard, records[k:k + shard])
    stage.finalize()
    return path


def _strip_store(path: Path) -> None:
    """Make ``path`` look like a stage written before the token store existed."""
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["shards"].values():
        shutil.rmtree(path / entry.pop("tokens"))
    (path / "manifest.json").write_text(json.dumps(manifest))


def _pstate(rank: int, dp: int):
    return SimpleNamespace(dp_rank=rank, dp=dp, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- the store


def test_store_holds_every_field_bitwise_and_old_stages_convert(tmp_path):
    from spin_mcore.data.token_store import convert_stage, decode_record, record_files
    from spin_mcore.training.batches import example_from_record
    from spin_mcore.utils.shards import read_stage

    records = _scored_records(12)
    records[3]["generated_ids"] = []  # an empty y' is a record too
    stage = _write_stage(tmp_path / "ref", records)
    sft = [{"prompt_id": i, "prompt_ids": r["prompt_ids"], "response_ids": r["real_ids"]} for i, r in enumerate(records)]
    sft_stage = _write_stage(tmp_path / "sft", sft)

    def check(path, need_generated, need_refs):
        files = record_files(path)
        parsed = list(read_stage(path))
        assert len(files) == len(parsed)
        for f, rec in zip(files, parsed):
            prompt, real, gen, ref_real, ref_gen = decode_record(np.load(f), f)
            want = example_from_record(rec, f, need_generated, need_refs)
            assert (prompt, real, gen, ref_real, ref_gen) == (want.prompt_ids, want.real_ids, want.generated_ids,
                                                             want.ref_real, want.ref_gen)  # float64: == is bitwise

    check(stage, True, True)
    check(sft_stage, False, False)

    _strip_store(stage)
    assert record_files(stage) is None
    assert convert_stage(stage) is True  # the torch path's JSON becomes the store on first read
    check(stage, True, True)
    assert convert_stage(stage) is False  # nothing left to convert


# ----------------------------------------------------------------------------- same batches, same order


def _batches(reader, plan, total, packed: bool, mb: int, dp_rank: int):
    from spin_mcore.training.batches import collate, step_microbatches
    from spin_mcore.training.packed import pack_microbatches

    out = []
    for step in range(total):
        exs = reader.step_examples(step)
        if packed:
            out.append(pack_microbatches(exs, SEQ, mb)[0])
        else:
            out.append([collate(g, SEQ, "spin", multiple=16) for g in step_microbatches(exs, mb)])
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_dali_and_torch_give_the_same_batches_token_for_token(tmp_path, dp, packed):
    from spin_mcore.training.batches import make_plan, open_training_data
    from spin_mcore.training.loader import open_steps

    records = _scored_records(22)
    stage = _write_stage(tmp_path / "ref", records)
    mb, gb = 2, 4 * dp
    plan, total = make_plan(len(records), 3, 7, gb, mb, dp)  # 3 epochs: two epoch boundaries mid-run
    dali = open_training_data("dali", [stage], "spin")
    torch_data = open_training_data("torch", [stage], "spin")
    assert (dali.loader, torch_data.loader) == ("dali", "torch") and dali.n_items == torch_data.n_items == 22
    for rank in range(dp):
        d_reader = open_steps(dali, plan, total, _pstate(rank, dp))
        t_reader = open_steps(torch_data, plan, total, _pstate(rank, dp))
        got = _batches(d_reader, plan, total, packed, mb, rank)
        want = _batches(t_reader, plan, total, packed, mb, rank)
        d_reader.close()
        assert len(got) == len(want) == total
        for step, (g, w) in enumerate(zip(got, want)):
            assert len(g) == len(w) and all(_same(x, y) for x, y in zip(g, w)), (rank, step)
        # and the torch path itself is the plan over the JSON records
        first = [records[i]["real_ids"] for i in torch.cat(plan.rank_microbatches(0, rank)).tolist()]
        assert [e.real_ids for e in t_reader.step_examples(0)] == first


# ----------------------------------------------------------------------------- each rank opens its own records


def _rank_files(files, plan, total, rank) -> list[str]:
    return [files[i] for s in range(total) for i in torch.cat(plan.rank_microbatches(s, rank)).tolist()]


def test_each_dp_rank_opens_only_its_records(tmp_path):
    from spin_mcore.data.token_store import record_files
    from spin_mcore.training.loader import DaliSteps
    from spin_mcore.training.batches import make_plan

    records = _scored_records(40)
    stage = _write_stage(tmp_path / "ref", records)
    plan, total = make_plan(len(records), 1, 3, 8, 2, 2)  # one epoch: each record belongs to one rank
    for rank in range(2):
        # A copy of the stage holding only this rank's record files: the reader never misses another's.
        own = tmp_path / f"rank{rank}"
        shutil.copytree(stage, own)
        files = record_files(own)
        mine = set(_rank_files(files, plan, total, rank))
        for f in set(files) - mine:
            Path(f).unlink()
        reader = DaliSteps(files, plan, total, rank, 2)
        seen = [e.real_ids for s in range(total) for e in reader.step_examples(s)]
        reader.close()
        assert len(mine) == 20 and len(seen) == 20  # half the records each
        assert seen == [records[files.index(f)]["real_ids"] for f in _rank_files(files, plan, total, rank)]

    if shutil.which("strace") is None:
        pytest.skip("strace not installed: the open() count needs it")
    files = record_files(stage)
    script = ("import sys, torch; from spin_mcore.training.loader import DaliSteps; "
              "from spin_mcore.data.token_store import record_files; from spin_mcore.training.batches import make_plan; "
              "plan, total = make_plan(40, 1, 3, 8, 2, 2); files = record_files(sys.argv[1]); "
              "r = DaliSteps(files, plan, total, 1, 2); [r.step_examples(s) for s in range(total)]; r.close()")
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log), sys.executable, "-c", script, str(stage)],
                   check=True, cwd=Path(__file__).resolve().parent.parent)
    opened = {line.split('"')[1] for line in log.read_text().splitlines() if '.npy"' in line and "ENOENT" not in line}
    assert opened == set(_rank_files(files, plan, total, 1))  # rank 1 of 2: its 20 records, no other


# ----------------------------------------------------------------------------- auto / dali / a missing DALI


def test_auto_picks_dali_and_a_missing_dali_is_refused_in_one_line(tmp_path, monkeypatch):
    from spin_mcore.config import ConfigError, load_config
    from spin_mcore.data.dali_loader import resolve_loader
    from spin_mcore.data.preflight import check_data

    stage = _write_stage(tmp_path / "ref", _scored_records(4))
    assert resolve_loader("auto", [stage]) == ("dali", "data.loader=auto: NVIDIA DALI imports")
    assert resolve_loader("auto", [{"prompt_ids": [1]}])[0] == "torch"  # in-memory records: torch only
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # the stand-in: `import nvidia.dali` fails
    name, why = resolve_loader("auto", [stage])
    assert name == "torch" and "NVIDIA DALI does not import" in why
    with pytest.raises(ConfigError) as err:
        check_data(load_config(overrides=["data.loader=dali"]), records=False)
    assert "\n" not in str(err.value) and str(err.value).startswith("data.loader=dali: NVIDIA DALI does not import")
    assert "nvidia-dali-cuda120" in str(err.value)

    # The CLI: exit 1, one line, before any rank starts.
    code = ("import sys; sys.modules['nvidia.dali'] = None; from spin_mcore.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "train", "data.loader=dali", "--data", str(stage),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.loader=dali: NVIDIA DALI does not import" in lines[0], out.stderr


# ----------------------------------------------------------------------------- training: DP 2, bitwise


def _cfg(overrides):
    from spin_mcore.config import load_config

    return load_config(overrides=BASE + list(overrides))


def _train_worker(tmp: str) -> dict:
    """DP=2: the same short SPIN runs under data.loader=dali and torch (padded and packed); resumes across loaders."""
    warnings.filterwarnings("ignore")
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    common = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.save_interval=2",
              "train.keep_checkpoints=3", "train.async_save=false"]
    cfg = _cfg(common + ["train.max_steps=6"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed)
    if pstate.rank == 0:
        _write_stage(tmp / "ref", _scored_records(10))  # 10 pairs, 4 per step: epochs end mid-step
    torch.distributed.barrier()
    save_model_checkpoint(setup_model(cfg, pstate, None, wrap_ddp=False), pstate, tmp / "init", cfg.model)
    out = {}
    for loader in ("dali", "torch"):
        out[loader] = train(_cfg(common + ["train.max_steps=6", f"data.loader={loader}"]), pstate, [tmp / "ref"],
                            str(tmp / "init"), tmp / f"run_{loader}")
        out[f"packed_{loader}"] = train(_cfg(common + ["train.max_steps=3", "train.pack_sequences=true",
                                                       "train.micro_batch_size=2", f"data.loader={loader}"]),
                                        pstate, [tmp / "ref"], str(tmp / "init"), tmp / f"packed_{loader}")
    # Cross-loader resumes: torch from DALI's step-2 checkpoint; DALI (no reader state) from torch's step 4.
    for src, dst, step, loader in (("run_dali", "torch_from_dali", 2, "torch"), ("run_torch", "dali_from_torch", 4, "dali")):
        if pstate.rank == 0:
            (tmp / dst / "train_state").mkdir(parents=True)
            name = f"step_{step:08d}"
            shutil.copytree(tmp / src / "train_state" / name, tmp / dst / "train_state" / name)
        torch.distributed.barrier()
        out[dst] = train(_cfg(common + ["train.max_steps=6", f"data.loader={loader}"]), pstate, [tmp / "ref"],
                         str(tmp / "init"), tmp / dst)
    # A stage written before the token store: converted on first read (rank 0, the others wait), then DALI.
    if pstate.rank == 0:
        shutil.copytree(tmp / "ref", tmp / "ref_old")
        _strip_store(tmp / "ref_old")
    torch.distributed.barrier()
    out["converted"] = train(_cfg(common + ["train.max_steps=6", "data.loader=dali"]), pstate, [tmp / "ref_old"],
                             str(tmp / "init"), tmp / "converted")
    done = json.loads((tmp / "run_dali" / "train_state" / "step_00000004" / "done.json").read_text())
    out["dali_done"] = done
    return out


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory):
    from spin_mcore.launcher import run_local

    tmp = tmp_path_factory.mktemp("dali_train")
    return tmp, run_local(_train_worker, 2, str(tmp))[0]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = checkpoint_weights(a / "model"), checkpoint_weights(b / "model")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_spin_loss_and_weights_are_bitwise_equal_between_loaders_at_dp2(dp2_runs):
    tmp, res = dp2_runs
    assert res["dali"]["steps"] == 6 and res["packed_dali"]["packed"]
    for a, b in (("run_dali", "run_torch"), ("packed_dali", "packed_torch")):
        la, lb = _metrics(tmp / a), _metrics(tmp / b)
        assert [x["loss"] for x in la] == [x["loss"] for x in lb] and len(la) == (6 if a == "run_dali" else 3)
        assert [x["grad_norm"] for x in la] == [x["grad_norm"] for x in lb]
        assert _weights_equal(tmp / a, tmp / b)  # bitwise on CPU fp32
    assert res["dali_done"]["data_reader"] is True  # the DALI reader checkpoint went into the train_state
    assert _weights_equal(tmp / "converted", tmp / "run_torch")  # an old stage, converted on first read
    assert (tmp / "ref_old" / "tokens-00000").is_dir()


def test_a_run_resumes_across_loaders_to_the_same_weights(dp2_runs):
    tmp, res = dp2_runs
    for name, at in (("torch_from_dali", 2), ("dali_from_torch", 4)):
        assert res[name]["resumed_from"].endswith(f"step_{at:08d}")
        assert [x["step"] for x in _metrics(tmp / name)] == list(range(at + 1, 7))
        assert [x["loss"] for x in _metrics(tmp / name)] == [x["loss"] for x in _metrics(tmp / "run_dali")][at:]
        assert _weights_equal(tmp / name, tmp / "run_dali")
