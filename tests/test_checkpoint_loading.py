"""DeepSpeed checkpoint files are read as data: a planted pickle is refused, not run, and a
real ZeRO checkpoint still loads through the weights-only engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spatialrl.deepspeed_checkpoints import WeightsOnlyCheckpointEngine, load_weights_only
from spatialrl.run_state import CheckpointError


class Planted:
    """Unpickling this runs Path.touch on `marker`: code execution, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}, "hook": Planted(marker)}, path)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    planted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ran"
    plant(planted, marker)
    with pytest.raises(CheckpointError, match=rf"{planted}: refused, not plain checkpoint data"):
        WeightsOnlyCheckpointEngine().load(str(planted))
    assert not marker.exists()
    # The file is live: DeepSpeed's own engine would have run it.
    torch.load(planted, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group for DeepSpeed in this process, gone after the module (DeepSpeed
    keeps the group it first sees, so one per module)."""
    import deepspeed

    with pytest.MonkeyPatch.context() as patch:
        for name, value in dict(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT="29517", RANK="0", WORLD_SIZE="1",
                                LOCAL_RANK="0").items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        yield
        torch.distributed.destroy_process_group()


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_round_trips_and_a_planted_one_does_not_run(tmp_path, process_group,
                                                                      stage):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config={
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1})
    load_weights_only(engine)
    engine.backward(engine(torch.randn(2, 4)).sum())
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t", client_state={"version": 7})

    _, client_state = engine.load_checkpoint(str(tmp_path), tag="t")
    assert client_state["version"] == 7

    model_file = next(p for p in (tmp_path / "t").iterdir() if p.name.endswith(
        "model_states.pt"))
    plant(model_file, tmp_path / "ran")
    with pytest.raises(CheckpointError, match=f"{model_file.name}: refused"):
        engine.load_checkpoint(str(tmp_path), tag="t")
    assert not (tmp_path / "ran").exists()
