"""Opponent generation: the in-process KV-cache engine against transformers and against
recomputation, seeded sampling, the resumable stage and bad input (the external engines:
tests/test_vllm_engine.py, tests/test_engine_launch.py).

Multi-process checks are batched: one 1-process run (TP=1) and one 2-process run
(TP=2, then TP=1 x DP=2) carry all engine and stage checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The model, prompts and lengths of the one-GPU acceptance run's engine check (it runs them on CUDA);
# VOCAB = 500 is not a multiple of 128: TP padding columns exist.
from spin_mcore.acceptance.checks_engine import BOS, EOS, MAX_NEW, PROMPT_LENS, VOCAB, tiny_hf_llama
from spin_mcore.acceptance.checks_engine import prompts as _prompts
from spin_mcore.config import ConfigError, load_config
from spin_mcore.generation import SamplingParams
from spin_mcore.generation.sampling import filter_logits, sample_tokens
from spin_mcore.generation.stage import prepare_prompts
from spin_mcore.launcher import run_local
from tests.helpers import hf_greedy_until


@dataclass
class Prompt:  # duck-types spin_mcore.data.tokenize.TokenizedPrompt
    id: str
    prompt_ids: list
    response_ids: list


class FakeTokenizer:
    bos_id, eos_id = BOS, EOS

    def __init__(self, vocab_size: int = VOCAB):
        self.vocab_size = vocab_size

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids if i not in (BOS, EOS))


def _overrides(tp: int = 1) -> list[str]:
    return ["model.preset=tiny", f"model.vocab_size={VOCAB}", f"parallel.tp={tp}", "model.seq_length=64",
            f"generation.max_new_tokens={MAX_NEW}", "generation.batch_size=3"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random LlamaForCausalLM (peaked logits so greedy has clear winners), saved as safetensors."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    return tiny_hf_llama(path), str(path)


# ----------------------------------------------------------------------------- workers


def _setup(tp: int, hf_dir: str, extra=()):
    import warnings

    warnings.filterwarnings("ignore")
    # Tiny matmuls: one thread is ~100x faster than two on a shared 2-core machine (no spin-wait contention).
    torch.set_num_threads(1)
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.models.hf_convert import load_hf_weights
    from spin_mcore.platform import init_distributed

    cfg = load_config(overrides=_overrides(tp) + list(extra))
    pstate = init_distributed(cfg.parallel, seed=1)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    load_hf_weights(model, pstate, hf_dir, cfg.model)
    return cfg, pstate, model.eval()


def _recompute_check(model, pstate) -> dict:
    """KV-cache engine vs. full recomputation through GPTModel.forward, greedy, 3 rows of different lengths."""
    from spin_mcore.generation.engine import MegatronEngine
    from spin_mcore.generation.sampling import gather_vocab_parallel

    prompts = _prompts()[:3]
    eng = MegatronEngine(model, pstate, slots=3, max_len=40, vocab_size=VOCAB)
    max_diff, max_abs, seqs = 0.0, 0.0, [list(p) for p in prompts]
    with torch.inference_mode():
        logits = eng.prefill(prompts, 0)
        for step in range(8):
            ref = []
            for s in seqs:
                x = torch.tensor([s])
                full = model(x, torch.arange(len(s))[None], None)[0, -1:]  # [1, V/tp] no cache
                ref.append(gather_vocab_parallel(full, VOCAB, pstate.tp_group)[0])
            ref = torch.stack(ref)
            max_diff = max(max_diff, float((logits - ref).abs().max()))
            max_abs = max(max_abs, float(ref.abs().max()))
            nxt = logits.argmax(-1)
            assert torch.equal(nxt, ref.argmax(-1)), f"step {step}: greedy tokens differ"
            for s, t in zip(seqs, nxt.tolist()):
                s.append(t)
            logits = eng.decode_one_token(nxt.tolist(), [len(s) - 1 for s in seqs])
    return {"max_logit_diff": max_diff, "max_logit": max_abs}


def _stage_run(cfg, model, pstate, out_dir: str, prompts, fail_after=None):
    """generate_opponent, counting (and optionally failing after) engine calls."""
    from spin_mcore.generation import stage

    calls = {"n": 0}
    real = stage.generate_with_stats

    def counting(*args, **kw):
        if fail_after is not None and calls["n"] >= fail_after:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real(*args, **kw)

    stage.generate_with_stats = counting
    try:
        summary = stage.generate_opponent(cfg, model, pstate, prompts, FakeTokenizer(), out_dir, iteration=1)
    finally:
        stage.generate_with_stats = real
    return summary, calls["n"]


def _stage_prompts() -> list[Prompt]:
    ps = [Prompt(f"p{i}", p, [5, 6, EOS]) for i, p in enumerate(_prompts())]
    ps.append(Prompt("long", [BOS] + list(range(3, 3 + 60)), [7, EOS]))  # 61 > 64 - 12 context: truncated
    return ps


def _worker_tp1(hf_dir: str, tmp: str) -> dict:
    from spin_mcore.generation import generate_tokens

    cfg, pstate, model = _setup(1, hf_dir, ["generation.shard_size=2", "generation.seed=5"])
    out = {"greedy": generate_tokens(model, pstate, _prompts(), SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                                            stop_ids=(EOS,)),
                                     batch_size=2, progress=False, vocab_size=VOCAB)}
    out.update(_recompute_check(model, pstate))

    # Seeded sampling: same output across runs, batch sizes and batch composition.
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=10, seed=3, num_samples=2)
    keys = [f"k{i}" for i in range(len(PROMPT_LENS))]
    a = generate_tokens(model, pstate, _prompts(), sp, keys, batch_size=3, progress=False, vocab_size=VOCAB)
    b = generate_tokens(model, pstate, _prompts()[::-1], sp, keys[::-1], batch_size=1, progress=False, vocab_size=VOCAB)
    c = generate_tokens(model, pstate, _prompts()[1:3], sp, keys[1:3], batch_size=16, progress=False, vocab_size=VOCAB)
    d = generate_tokens(model, pstate, _prompts(), sp, keys, batch_size=3, progress=False, vocab_size=VOCAB)
    out["sampled"] = [a, b[::-1], c, d]

    # Stage: full run; a killed run resumed; a second run on a complete directory.
    full, n_full = _stage_run(cfg, model, pstate, f"{tmp}/full", _stage_prompts())
    try:
        _stage_run(cfg, model, pstate, f"{tmp}/killed", _stage_prompts(), fail_after=2)
        raise AssertionError("the simulated kill did not happen")
    except KeyboardInterrupt:
        pass
    partial = json.loads(Path(f"{tmp}/killed/manifest.json").read_text())
    resumed, n_resumed = _stage_run(cfg, model, pstate, f"{tmp}/killed", _stage_prompts())
    again, n_again = _stage_run(cfg, model, pstate, f"{tmp}/killed", _stage_prompts())
    out.update(full=full, n_full=n_full, partial_shards=sorted(partial["shards"]), partial_complete=partial["complete"],
               resumed=resumed, n_resumed=n_resumed, n_again=n_again)
    # A different sampling seed is a different stage: refused without force.
    from spin_mcore.utils.shards import StageMismatchError

    cfg.generation.seed = 6
    try:
        _stage_run(cfg, model, pstate, f"{tmp}/full", _stage_prompts())
        out["mismatch_refused"] = False
    except StageMismatchError:
        out["mismatch_refused"] = True
    return out


def _worker_tp2(hf_dir: str, tmp: str) -> dict:
    from spin_mcore.generation import generate_tokens

    cfg, pstate, model = _setup(2, hf_dir)
    greedy = generate_tokens(model, pstate, _prompts(), SamplingParams(temperature=0, max_new_tokens=MAX_NEW,
                                                                     stop_ids=(EOS,)),
                             batch_size=4, progress=False, vocab_size=VOCAB)
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=10, seed=3, num_samples=2)
    keys = [f"k{i}" for i in range(len(PROMPT_LENS))]
    sampled = generate_tokens(model, pstate, _prompts(), sp, keys, batch_size=3, progress=False, vocab_size=VOCAB)
    # Re-initialise as TP=1 x DP=2: each DP rank generates its own shards.
    cfg, pstate, model = _setup(1, hf_dir, ["generation.shard_size=2", "generation.seed=5"])
    summary, _ = _stage_run(cfg, model, pstate, f"{tmp}/dp2", _stage_prompts())
    return {"greedy": greedy, "sampled": sampled, "dp": pstate.dp, "summary": summary}


# ----------------------------------------------------------------------------- engine + stage tests


@pytest.fixture(scope="module")
def tp1(hf_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen1")
    (r,) = run_local(_worker_tp1, 1, hf_model[1], str(tmp))
    return r, tmp


@pytest.fixture(scope="module")
def tp2(hf_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen2")
    return run_local(_worker_tp2, 2, hf_model[1], str(tmp)), tmp


def test_greedy_matches_transformers_tp1_and_tp2(hf_model, tp1, tp2):
    expected = hf_greedy_until(hf_model[0], _prompts(), EOS, MAX_NEW)
    assert any(len(e) == MAX_NEW for e in expected)
    assert [o[0] for o in tp1[0]["greedy"]] == expected
    for rank in tp2[0]:
        assert [o[0] for o in rank["greedy"]] == expected


def test_kv_cache_equals_recomputation(tp1):
    # fp32 reassociation only: 1e-5 on the logit scale (|logit| up to ~7 here; measured ~8e-6 absolute).
    r = tp1[0]
    assert r["max_logit_diff"] < 1e-5 * max(1.0, r["max_logit"])


def test_seeded_sampling_is_reproducible_and_batch_independent(tp1, tp2):
    a, b, c, d = tp1[0]["sampled"]
    assert a == d and a == b
    assert c == a[1:3]
    assert a[0][0] != a[0][1], "two samples of one prompt should differ"
    # TP=2 ranks pick identical tokens; TP=2 equals TP=1 on these weights.
    assert tp2[0][0]["sampled"] == tp2[0][1]["sampled"] == a


def _records(directory) -> list[dict]:
    from spin_mcore.utils.shards import read_stage

    return list(read_stage(directory))


def test_stage_writes_records_and_resumes_without_recomputation(tp1):
    r, tmp = tp1
    full = _records(tmp / "full")
    assert len(full) == len(_stage_prompts())  # num_samples = 1
    rec = full[0]
    assert set(rec) == {"prompt_id", "prompt", "real", "generated", "iteration", "sample_index", "sampling",
                        "prompt_ids", "real_ids", "generated_ids"}
    assert rec["iteration"] == 1 and rec["sampling"]["seed"] == 5 and rec["sampling"]["stop_ids"] == [EOS]
    assert rec["generated"] == FakeTokenizer().decode(rec["generated_ids"])
    assert r["full"]["prompts_truncated"] == 1 and r["full"]["truncated_ids"] == ["long"]
    long = next(x for x in full if x["prompt_id"] == "long")
    assert len(long["prompt_ids"]) == 64 - MAX_NEW and long["prompt_ids"][0] == BOS and long["prompt_ids"][-1] == 62
    # 6 prompts / shard_size 2 = 3 shards: one engine call each.
    assert r["n_full"] == 3 and r["full"]["shards"] == 3
    # Killed after 2 shards: the manifest lists exactly those, incomplete; the resume computes only the third.
    assert r["partial_shards"] == ["00000", "00001"] and not r["partial_complete"]
    assert r["n_resumed"] == 1 and r["resumed"]["shards_resumed"] == 2
    assert r["n_again"] == 0
    resumed = _records(tmp / "killed")
    assert resumed == full
    keys = [(x["prompt_id"], x["sample_index"]) for x in resumed]
    assert len(keys) == len(set(keys))
    assert r["mismatch_refused"]


def test_stage_data_parallel_matches_single_process(tp1, tp2):
    results, tmp = tp2
    assert results[0]["dp"] == 2
    assert _records(tmp / "dp2") == _records(tp1[1] / "full")
    assert results[0]["summary"]["generated_tokens_this_run"] == tp1[0]["full"]["generated_tokens_this_run"]


# ----------------------------------------------------------------------------- sampling units


def test_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 301, generator=g) * 3
    for t, k, p in [(0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 50, 0.5), (0.5, 5, 0.99)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = filter_logits(logits, t, k, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (t, k, p)
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[kept], ref[kept])


def test_inverse_cdf_sampling_hits_the_distribution_exactly():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    params = SamplingParams(temperature=1.0, top_k=4)
    probs = torch.softmax(filter_logits(logits, 1.0, 4, 1.0).double(), -1)[0]
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # a uniform grid: frequencies = probs up to 1/n
    toks = sample_tokens(logits.expand(n, 5), params, u)
    freq = torch.bincount(toks, minlength=5).double() / n
    assert freq[3] == 0  # removed by top-k
    assert torch.allclose(freq, probs, atol=1.5 / n)
    assert torch.equal(sample_tokens(logits, SamplingParams(temperature=0), None), torch.tensor([0]))


# ----------------------------------------------------------------------------- bad input


def test_empty_prompt_is_rejected_with_its_id():
    with pytest.raises(ValueError, match="'p-empty'"):
        prepare_prompts([Prompt("a", [1, 5], []), Prompt("p-empty", [], [])], 10, "truncate", BOS)


def test_overlong_prompts_truncate_or_reject_and_are_counted():
    ps = [Prompt("short", [BOS, 5, 6], []), Prompt("long", [BOS] + list(range(10, 30)), [])]
    kept, rep = prepare_prompts(ps, 8, "truncate", BOS)
    assert [ids for _, ids in kept][1] == [BOS] + list(range(23, 30))
    assert rep["prompts_truncated"] == 1 and rep["truncated_ids"] == ["long"] and rep["prompts_rejected"] == 0
    kept, rep = prepare_prompts(ps, 8, "reject", BOS)
    assert [p.id for p, _ in kept] == ["short"]
    assert rep["prompts_rejected"] == 1 and rep["rejected_ids"] == ["long"] and rep["prompts_truncated"] == 0
    with pytest.raises(ConfigError, match="no room"):
        prepare_prompts(ps, 0, "truncate", BOS)


def _sample_with_small_tokenizer(tmp: str) -> dict:
    """A random model of 777 ids with a 100-piece tokenizer: the stage samples only real pieces."""
    from spin_mcore.config import load_config
    from spin_mcore.generation import generate_tokens
    from spin_mcore.generation.stage import generate_opponent
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from spin_mcore.utils.shards import read_stage

    cfg = load_config(overrides=["model.preset=tiny", "model.vocab_size=777", "model.seq_length=64",
                                 "model.init_std=0.5", "generation.max_new_tokens=12", "generation.temperature=1.0"])
    pstate = init_distributed(cfg.parallel, seed=3)
    model = build_gpt_model(cfg.model, pstate, cfg.precision).eval()
    prompts = [Prompt(f"p{i}", p, [5, EOS]) for i, p in enumerate(_prompts())]
    generate_opponent(cfg, model, pstate, prompts, FakeTokenizer(vocab_size=100), tmp, iteration=0)
    staged = max(i for r in read_stage(tmp) for i in r["generated_ids"])
    # The same model sampling from all of its 777 rows reaches past the tokenizer: the cap matters.
    free = generate_tokens(model, pstate, _prompts(), SamplingParams(temperature=1.0, max_new_tokens=12),
                           vocab_size=777)
    return {"staged_max": staged, "free_max": max(i for rows in free for s in rows for i in s)}


def test_stage_samples_only_ids_the_tokenizer_has(tmp_path):
    (r,) = run_local(_sample_with_small_tokenizer, 1, str(tmp_path / "gen"))
    assert r["staged_max"] < 100 <= r["free_max"], r
