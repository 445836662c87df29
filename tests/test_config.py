"""Config loading: precedence, presets, HF config import and the errors that name the field."""

import json

import pytest

from spin_mcore.config import ConfigError, load_config, per_iteration
from spin_mcore.models.gpt import padded_vocab_size
from spin_mcore.presets import PRESETS


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  micro_batch_size: 2\n  global_batch_size: 8\nspin:\n  beta: [0.5]\n")
    cfg = load_config(path, ["train.micro_batch_size=4", "spin.loss=hinge"])
    assert cfg.train.micro_batch_size == 4  # CLI beats file
    assert cfg.train.global_batch_size == 8  # file beats default
    assert cfg.train.optimizer == "rmsprop"  # default
    assert cfg.spin.beta == [0.5] and cfg.spin.loss == "hinge"


def test_per_iteration_repeats_last_value():
    cfg = load_config()
    assert [per_iteration(cfg.spin.beta, t) for t in range(6)] == [0.1, 0.1, 0.1, 5.0, 5.0, 5.0]
    assert [per_iteration(cfg.train.lr, t) for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve_and_explicit_fields_win(name):
    cfg = load_config(overrides=[f"model.preset={name}"])
    for key, value in PRESETS[name].items():
        assert getattr(cfg.model, key) == value
    cfg = load_config(overrides=[f"model.preset={name}", "model.seq_length=1024"])
    assert cfg.model.seq_length == 1024


def test_llama3_70b_shapes():
    m = load_config(overrides=["model.preset=llama3-70b", "parallel.tp=8", "parallel.pp=4"]).model
    assert (m.num_layers, m.hidden_size, m.num_query_groups, m.ffn_hidden_size) == (80, 8192, 8, 28672)
    assert padded_vocab_size(m.vocab_size, 128, 8) == 129024  # 128256 -> multiple of 1024


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.preset=gpt5"], r"model.preset='gpt5': unknown preset"),
        (["parallel.tp=3"], r"num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.tp=4"], r"num_query_groups=2 is not divisible by parallel.tp=4"),
        (["parallel.pp=3"], r"num_layers=2 is not divisible by parallel.pp=3"),
        (["train.micro_batch_size=3"], r"global_batch_size=64 is not divisible by train.micro_batch_size=3"),
        (["spin.loss=sigmoidal"], r"spin.loss='sigmoidal': must be one of"),
        (["train.optimizer=lion"], r"train.optimizer='lion'"),
        (["train.bogus=1"], r"train.bogus: unknown field"),
        (["train.epochs=two"], r"train.epochs='two': expected an integer"),
        (["nonsense"], r"expected key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=["model.preset=tiny", *overrides])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)


def _hf_config(tmp_path, **kw):
    cfg = dict(architectures=["MistralForCausalLM"], hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, num_hidden_layers=2, vocab_size=300, max_position_embeddings=512,
               rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
    cfg.update(kw)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_model_from_hf_config(tmp_path):
    m = load_config(overrides=[f"model.hf_config={_hf_config(tmp_path)}"]).model
    assert (m.family, m.hidden_size, m.ffn_hidden_size, m.num_query_groups, m.vocab_size) == ("mistral", 64, 128, 2, 300)
    assert m.rope_theta == 1e6 and m.norm_eps == 1e-6 and m.seq_length == 512


def test_unsupported_hf_architecture(tmp_path):
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported"):
        load_config(overrides=[f"model.hf_config={_hf_config(tmp_path, architectures=['GPT2LMHeadModel'])}"])
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_config(overrides=[f"model.hf_config={_hf_config(tmp_path, tie_word_embeddings=True)}"])


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; per-iteration LR lists must still be numbers.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: [5e-7, 1e-7]\n")
    assert load_config(path).train.lr == [5e-7, 1e-7]
    assert load_config(overrides=["train.lr=[1e-4]", "spin.beta=[1e-1,5]"]).spin.beta == [0.1, 5.0]


def test_shipped_paper_config_matches_the_paper():
    from pathlib import Path

    import spin_mcore

    cfg = load_config(Path(spin_mcore.__file__).parent / "configs" / "spin_mistral_7b.yaml")
    assert cfg.model.num_layers == 32 and cfg.model.num_query_groups == 8
    assert cfg.spin.beta == [0.1, 0.1, 0.1, 5.0] and cfg.train.lr == [5e-7, 5e-7, 1e-7, 1e-7]
    assert (cfg.train.optimizer, cfg.train.weight_decay, cfg.train.global_batch_size, cfg.train.epochs) == ("rmsprop", 0.0, 64, 2)
    assert cfg.data.num_prompts == 50000 and cfg.run.iterations == 4
