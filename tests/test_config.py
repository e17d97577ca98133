import pytest

from spatialrl.config import ConfigError, TrainConfig, flatten, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "grpo:\n  group_size: 8\n  top_k: 2\nsampling:\n  height: 64\n")
    cfg = load_config(path, ["sampling.noise_level=0.5", "lora.target_modules=[a, b]"])
    assert cfg.grpo.group_size == 8 and cfg.sampling.height == 64
    assert cfg.sampling.noise_level == 0.5 and cfg.lora.target_modules == ["a", "b"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["grpo.topk=3"], "grpo.topk"),  # unknown key
        (["sampling.height=tall"], "sampling.height"),  # wrong type
        (["grpo.group_size=8", "grpo.top_k=5"], "top_k"),  # k > G/2
        (["grpo.group_size=1", "grpo.top_k=null"], "group_size"),  # G < 2
        (["sampling.noise_level=-0.1"], "sampling.noise_level"),  # negative noise
        (["sampling.sde_window=[3, 2]"], "sde_window"),
        (["sampling.sde_type=cps", "sampling.noise_level=1.5"], "noise_level"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["grpo.top_k"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ must ship at least one config"
    for path in configs:
        assert isinstance(load_config(path), TrainConfig)


def test_shipped_reward_configs_validate():
    from pathlib import Path

    from spatialrl.reward.train_config import RewardTrainConfig

    configs = sorted(Path(__file__).parents[1].joinpath("configs", "reward").glob("*.yaml"))
    assert len(configs) >= 2, "configs/reward/ ships a local and a cluster config"
    for path in configs:
        assert isinstance(load_config(path, model=RewardTrainConfig), RewardTrainConfig)


def test_flatten_gives_dotted_keys():
    flat = flatten(TrainConfig())
    assert flat["grpo.top_k"] == 6 and flat["model.pretrained"] == "black-forest-labs/FLUX.1-dev"


def test_exponent_numbers_without_a_dot_are_floats_in_files_and_sets(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-3 as a string, which the strict config refuses.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-4\n  weight_decay: 1E-6\n")
    cfg = load_config(path, ["grpo.clip_range=1e-3", "grpo.kl_beta=+4e-3"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (2e-4, 1e-6)
    assert (cfg.grpo.clip_range, cfg.grpo.kl_beta) == (1e-3, 4e-3)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(path, ["optim.lr=1e"])  # not a number: still refused, by name
