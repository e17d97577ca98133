"""Shared fixtures. No test may reach a model hub: offline mode is set before anything imports
huggingface_hub, and every model comes from the tiny folders built here."""

import os
import shutil
import sys
import tempfile

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


@pytest.fixture(scope="session")
def tiny_owlv2_path(tiny_models_dir) -> Path:
    return tiny_models_dir / "owlv2"


@pytest.fixture(scope="session")
def tiny_spatialscore_path(tiny_models_dir, tmp_path_factory) -> Path:
    """A random SpatialScore checkpoint (save_pretrained folder) on the tiny Qwen2.5-VL."""
    import torch

    from spatialrl.reward import SpatialScore, SpatialScoreConfig

    torch.manual_seed(0)
    model = SpatialScore.from_config(SpatialScoreConfig(
        base_model=str(tiny_models_dir / "qwen2.5-vl"), dtype="float32", head_hidden_size=32))
    return model.save_pretrained(tmp_path_factory.mktemp("spatialscore"))


@pytest.fixture(scope="session")
def tiny_flux_lora_path(tiny_flux_path, tmp_path_factory) -> Path:
    """A save_lora folder for the tiny FLUX whose adapter changes the images (B != 0)."""
    return _random_lora(tiny_flux_path, tmp_path_factory.mktemp("flux-lora"), scale=0.5)


@pytest.fixture(scope="session")
def shapes_flux_lora_path(tmp_path_factory) -> Path:
    """A random LoRA for the shipped models/shapes-flux, small enough that its objects stay
    mostly readable."""
    generator = Path(__file__).resolve().parents[1] / "models" / "shapes-flux"
    return _random_lora(generator, tmp_path_factory.mktemp("shapes-flux-lora"), scale=0.05)


def _random_lora(model: Path, out: Path, scale: float) -> Path:
    import torch

    from spatialrl.config import LoraConfig, PolicyModelConfig
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.flux.lora import add_lora, save_lora

    pipeline = load_flux_pipeline(PolicyModelConfig(
        pretrained=str(model), dtype="float32", gradient_checkpointing=False))
    add_lora(pipeline.transformer, LoraConfig(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipeline.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_lora(pipeline, out)


# The longest files, started first (in this order) so that no long file starts last.
FIRST_FILES = ("test_autoscaling_cluster.py", "test_ray_trainer.py", "test_reward_training.py")


def pytest_collection_modifyitems(config, items):
    """FIRST_FILES first, then the other files with slow tests, then the rest, each file's
    tests in their own order. `make test` runs files whole on pytest-xdist workers in this
    order (--no-loadscope-reorder): the long files start at once and short ones fill the end."""
    slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        name = item.path.name
        if name in FIRST_FILES:
            return FIRST_FILES.index(name)
        return len(FIRST_FILES) + (0 if name in slow_files else 1)

    items.sort(key=rank)  # stable: files keep their order within a rank


# Test files go to memory (tmpfs) where the machine has it: SQLite, MLflow's store, syncs to
# disk on every commit, and creating one fresh store took 6.1 s on this machine's disk against
# 1.4 s on /dev/shm; dozens of tests make one. Each run gets its own folder (two runs at once
# must not clear each other's), removed at the end; pytest-xdist workers get theirs inside it.
TMPFS = Path("/dev/shm")
_run_tmp: list[Path] = []


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads basetemp
def pytest_configure(config):
    is_xdist_worker = hasattr(config, "workerinput")
    if config.option.basetemp is None and not is_xdist_worker and TMPFS.is_dir():
        _run_tmp.append(Path(tempfile.mkdtemp(prefix="spatialrl-tests-", dir=TMPFS)))
        config.option.basetemp = str(_run_tmp[0] / "basetemp")


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported everything: one clean-clone
    run segfaulted there after all tests passed (native threads of torch/Ray/gRPC being torn
    down), which turned a green run red. The exit status stays pytest's own."""
    for folder in _run_tmp:
        shutil.rmtree(folder, ignore_errors=True)
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
