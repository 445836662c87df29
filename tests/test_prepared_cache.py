"""The run's tokenised prompts are made once per run, by rank 0, and read by every rank (issue 21 part 5).

Independent reference: ``prepare_sft_data`` called directly. The cache must give back exactly its
prompts (ids, prompt and response tokens, order, train/held-out split and stats); a second call
must not tokenise again; changed data, settings or tokenizer, or a cache without its manifest, must
be rebuilt; at two ranks only rank 0 tokenises and both ranks get the same prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest

from tests.helpers import make_tiny_data


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("prepared"), 80)


def _data_cfg(inputs, **changes):
    from spin_mcore.config import DataConfig

    root, tok = inputs
    cfg = DataConfig(path=str(root / "arith.jsonl"), tokenizer=str(tok), max_prompt_length=20,
                     max_response_length=12, heldout_fraction=0.1)
    return dataclasses.replace(cfg, **changes)


def _as_tuples(data) -> tuple:
    return ([(p.id, p.prompt_ids, p.response_ids) for p in data.train],
            [(p.id, p.prompt_ids, p.response_ids) for p in data.heldout])


def test_cache_gives_back_what_prepare_made_and_is_made_once(inputs, tmp_path, monkeypatch):
    from spin_mcore.data import prepared_cache
    from spin_mcore.data.prepare import prepare_sft_data
    from spin_mcore.data.tokenizer import load_tokenizer

    cfg = _data_cfg(inputs)
    tok = load_tokenizer(cfg.tokenizer)
    direct = prepare_sft_data(cfg, tok)
    assert len(direct.train) == 72 and len(direct.heldout) == 8
    assert direct.stats["train"]["prompts_truncated"] + direct.stats["train"]["responses_truncated"] > 0

    calls = []
    real = prepared_cache.prepare_sft_data
    monkeypatch.setattr(prepared_cache, "prepare_sft_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "data"
    first = prepared_cache.prepared_once(cfg, tok, cache, rank=0)
    again = prepared_cache.prepared_once(cfg, tok, cache, rank=0)
    assert len(calls) == 1
    assert _as_tuples(first) == _as_tuples(again) == _as_tuples(direct)
    assert first.stats == json.loads(json.dumps(direct.stats))  # the stats survive as JSON

    # The loader setting does not change the prompts: reused.
    prepared_cache.prepared_once(_data_cfg(inputs, loader="torch"), tok, cache, rank=0)
    assert len(calls) == 1
    # What the prompts depend on changes: rebuilt, never reused.
    prepared_cache.prepared_once(_data_cfg(inputs, max_prompt_length=16), tok, cache, rank=0)
    assert len(calls) == 2
    data_file = Path(cfg.path)
    st = data_file.stat()
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    rebuilt = prepared_cache.prepared_once(cfg, tok, cache, rank=0)
    assert len(calls) == 3 and _as_tuples(rebuilt) == _as_tuples(direct)
    # A cache killed before its manifest was written is not used.
    (cache / "prepared.json").unlink()
    prepared_cache.prepared_once(cfg, tok, cache, rank=0)
    assert len(calls) == 4


def _two_rank_worker(data_cfg, cache: str) -> dict:
    warnings.filterwarnings("ignore")
    from spin_mcore.config import ParallelConfig
    from spin_mcore.data import prepared_cache
    from spin_mcore.data.tokenizer import load_tokenizer
    from spin_mcore.platform import init_distributed

    pstate = init_distributed(ParallelConfig(), seed=0)
    calls = []
    real = prepared_cache.prepare_sft_data
    prepared_cache.prepare_sft_data = lambda *a, **k: calls.append(1) or real(*a, **k)
    data = prepared_cache.prepared_once(data_cfg, load_tokenizer(data_cfg.tokenizer), cache, pstate.rank)
    return {"calls": len(calls), "data": _as_tuples(data)}


def test_two_ranks_tokenise_once(inputs, tmp_path):
    from spin_mcore.data.prepare import prepare_sft_data
    from spin_mcore.launcher import run_local

    cfg = _data_cfg(inputs)
    ranks = run_local(_two_rank_worker, 2, cfg, str(tmp_path / "data"))
    assert [r["calls"] for r in ranks] == [1, 0]
    direct = _as_tuples(prepare_sft_data(cfg))
    assert [tuple(map(list, r["data"])) for r in ranks] == [tuple(map(list, direct))] * 2
