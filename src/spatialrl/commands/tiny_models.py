"""`spatialrl tiny-models OUT`: write the tiny random models that tests and CPU runs load.

OUT/flux is a FluxPipeline folder, OUT/owlv2 an OWLv2 detector, OUT/qwen2.5-vl a Qwen2.5-VL
folder, OUT/qwen2.5-vl-reward a deeper one that a tiny SpatialScore learns spatial
relations on, OUT/qwen3-vl a Qwen3-VL folder (SpatialReward's backbone class) and
OUT/qwen3-vl-judge a wider one that a tiny SpatialReward is trained on; all load
through the same from_pretrained code as the production checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)

FLUX_DIR = "flux"
QWEN_VL_DIR = "qwen2.5-vl"
QWEN_VL_REWARD_DIR = "qwen2.5-vl-reward"  # deeper, for SpatialScore training (configs/reward)
QWEN3_VL_DIR = "qwen3-vl"  # SpatialReward's backbone class
QWEN3_VL_JUDGE_DIR = "qwen3-vl-judge"  # wider, for SpatialReward training (configs/spatialreward)
OWLV2_DIR = "owlv2"  # the zero-shot detector that verifies pairs and judges real-object images


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tiny-models",
                                   help="write tiny random FLUX, OWLv2, Qwen2.5-VL and Qwen3-VL")
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for path in write_tiny_models(args.out, seed=args.seed, force=args.force).values():
        print(path)
    return 0


def write_tiny_models(out: Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write every tiny model under `out` that is missing (all of them with `force`).

    Returns name -> folder for the models present afterwards. Qwen2.5-VL is skipped, with a
    warning, while `spatialrl.tiny.qwen_vl` is not available.
    """
    from spatialrl.tiny.flux import write_tiny_flux
    from spatialrl.tiny.owlv2 import write_tiny_owlv2
    from spatialrl.tiny.qwen3_vl import JUDGE_BACKBONE, write_tiny_qwen3_vl

    writers = {FLUX_DIR: write_tiny_flux, OWLV2_DIR: write_tiny_owlv2,
               QWEN3_VL_DIR: write_tiny_qwen3_vl,
               QWEN3_VL_JUDGE_DIR: partial(write_tiny_qwen3_vl, size=JUDGE_BACKBONE)}
    try:
        from spatialrl.tiny.qwen_vl import REWARD_BACKBONE, write_tiny_qwen_vl
    except ModuleNotFoundError as err:
        if err.name != "spatialrl.tiny.qwen_vl":
            raise
        log.warning("spatialrl.tiny.qwen_vl is not available; not writing %s", QWEN_VL_DIR)
    else:
        writers[QWEN_VL_DIR] = write_tiny_qwen_vl
        writers[QWEN_VL_REWARD_DIR] = partial(write_tiny_qwen_vl, **REWARD_BACKBONE)

    written = {}
    for name, write in writers.items():
        folder = Path(out) / name
        if force or not is_complete(folder):
            log.info("writing tiny %s to %s", name, folder)
            write(folder, seed=seed)
        written[name] = folder
    return written


def is_complete(folder: Path) -> bool:
    """A pipeline folder whose model_index.json names only components that exist, or a
    model folder with its config.json."""
    index = folder / "model_index.json"
    if index.is_file():
        components = [
            name for name, spec in json.loads(index.read_text()).items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None
        ]
        return all((folder / name).is_dir() for name in components)
    return (folder / "config.json").is_file()
