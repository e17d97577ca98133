"""Shared fixtures. No test may reach a model hub: offline mode is set before anything imports
huggingface_hub, and every model comes from the tiny folders built here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """Root with the tiny models, built once per session by the `spatialrl tiny-models` code:
    root/"flux" always, root/"qwen2.5-vl" once spatialrl.tiny.qwen_vl exists."""
    from spatialrl.commands.tiny_models import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def tiny_flux_path(tiny_models_dir) -> Path:
    return tiny_models_dir / "flux"
