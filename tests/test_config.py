import json

import pytest

from attnrl_core.__main__ import build_parser
from attnrl_core.__main__ import config_from_args
from attnrl_core.config import EMBEDDED_MODEL, PRESETS, TrainConfig


def test_defaults_follow_spec():
    cfg = TrainConfig()
    assert (cfg.tokens_per_key, cfg.tokens_per_value, cfg.tokens_per_query) == (20, 20, 20)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert (cfg.learning_rate, cfg.max_grad_norm, cfg.kl_beta) == (2e-4, 1.0, 0.1)
    assert (cfg.warmup_trajectories, cfg.filter_num_sd, cfg.subset_fraction) == (15, 1.0, 0.25)
    assert (cfg.generation_batch_size, cfg.training_batch_size, cfg.checkpoint_every) == (64, 16, 100)
    assert cfg.model_name == "meta-llama/Llama-3.2-3B"
    assert (cfg.dataset_name, cfg.dataset_config) == ("wikimedia/wikipedia", "20231101.en")
    assert cfg.min_article_tokens == 40 * cfg.num_kv_pairs


def test_presets():
    emb = TrainConfig.from_preset("embedded")
    assert emb.model_name == EMBEDDED_MODEL and emb.preset == "embedded" and emb.device == "cpu"
    spec = TrainConfig.from_preset("llama-3.2-3b", dataset_name="wikipedia", dataset_config="20220301.en")
    assert spec.dataset_name == "wikipedia"
    assert set(PRESETS) == {"embedded", "llama-3.2-3b"}


@pytest.mark.parametrize("field,value", [
    ("learning_rate", -1e-4), ("kl_beta", -0.1), ("subset_fraction", 0.0), ("subset_fraction", 1.5),
    ("tokens_per_key", 0), ("tokens_per_query", 0), ("generation_batch_size", 0), ("num_kv_pairs", 1),
    ("training_batch_size", 65), ("lora_dropout", 1.0), ("temperature", 0.0), ("device", "tpu"),
    ("dtype", "int8"), ("preset", "nope"), ("num_episodes", 0), ("tokens_per_value", 2.5), ("seed", "x"),
    ("max_grad_norm", float("nan")),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_pool_size_is_ceil_and_excludes_the_example_pair():
    assert TrainConfig(num_kv_pairs=16, subset_fraction=0.25).pool_size == 4
    assert TrainConfig(num_kv_pairs=10, subset_fraction=0.25).pool_size == 3
    assert TrainConfig(num_kv_pairs=4, subset_fraction=1.0).pool_size == 3


def test_every_field_is_a_flag_and_overrides_the_preset():
    parser = build_parser()
    args = parser.parse_args(["train", "--preset", "embedded", "--num_episodes", "3", "--learning_rate", "1e-3",
                              "--lora_target_modules", "q_proj,k_proj"])
    cfg = config_from_args(args)
    assert (cfg.preset, cfg.num_episodes, cfg.learning_rate) == ("embedded", 3, 1e-3)
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert cfg.generation_batch_size == TrainConfig.from_preset("embedded").generation_batch_size
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in help_text


def test_config_file_json_and_yaml(tmp_path):
    cfg = TrainConfig.from_preset("embedded", num_episodes=7)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("preset: embedded\nnum_episodes: 5\n")
    assert TrainConfig.from_file(tmp_path / "c.yaml", seed=3).num_episodes == 5
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_preset("embedded", not_a_field=1)
