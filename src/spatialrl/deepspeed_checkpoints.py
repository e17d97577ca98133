"""DeepSpeed checkpoint files read as data, never run as code.

DeepSpeed's own loader calls torch.load(weights_only=False), so a pickle planted in a
checkpoint folder (a shared disk, an s3:// bucket) would run code on --resume or on a learner
restart. The engine here loads weights-only, allowing just the few DeepSpeed types its ZeRO
checkpoints hold; a file that names any other global is refused with an error naming it.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from spatialrl.checkpoint_digests import CheckpointError

# What ZeRO 1-3 optimiser files hold besides tensors and containers (model-state files hold
# none): found with torch.serialization.get_unsafe_globals_in_checkpoint.
ALLOWED_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line for line in str(err).splitlines() if "global" in line.lower()),
                          str(err).splitlines()[0])
            raise CheckpointError(
                f"{path}: refused, not plain checkpoint data ({reason})") from None


def load_weights_only(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with WeightsOnlyCheckpointEngine."""
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
