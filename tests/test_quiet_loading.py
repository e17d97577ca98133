"""Loading the project's models prints no warning caused by the project's own calls: the
deprecated torch_dtype and gradient_checkpointing_enable, peft's read of
is_gradient_checkpointing, and the pipeline LoRA loader's text-encoder notice."""

import warnings

import pytest

from spatialrl.config import PolicyModelConfig
from spatialrl.flux.loading import load_flux_pipeline, load_flux_transformer
from spatialrl.generation import FluxCandidates
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.service.config import FluxGeneratorConfig


def future_warnings(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("load", [load_flux_pipeline, load_flux_transformer])
def test_flux_loads_without_deprecation_warnings(tiny_flux_path, load):
    cfg = PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32")
    assert future_warnings(lambda: load(cfg)) == []


def test_a_policy_lora_loads_without_the_text_encoder_notice(
        tiny_flux_path, tiny_flux_lora_path, capfd):
    model = PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32",
                              gradient_checkpointing=False)
    FluxCandidates(FluxGeneratorConfig(model=model, lora_path=str(tiny_flux_lora_path)))
    assert "No LoRA keys" not in capfd.readouterr().err


def test_spatialscore_builds_without_deprecation_warnings(tiny_models_dir):
    cfg = SpatialScoreConfig(base_model=str(tiny_models_dir / "qwen2.5-vl"), dtype="float32",
                             gradient_checkpointing=True)
    assert future_warnings(lambda: SpatialScore.from_config(cfg)) == []
