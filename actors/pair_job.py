"""`spatialrl data pairs --ray`: the shards of a pair set (spatialrl.data.pair_shards) made
by a Ray Data job over many GPUs.

One row per shard still to do goes through `map_batches` to a pool of `ShardWorker`s, each
holding a pipeline and a verifier; a worker writes its shard's files itself (to storage that
every node mounts) and returns the shard's report, which the driver logs as it arrives.
Ray Data's own checkpointing (CheckpointConfig) is not used: it filters rows of a file read
by an id column and names its output files itself, while a shard here must be written and
committed as a unit under a name that the plan, and an in-process run, can find.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import ray

from spatialrl.data.pair_shards import PairSetSpec, ShardMaker, ShardReport, ShardRunner


@dataclass(frozen=True)
class PairWorkers:
    """The actor pool of the job: how many workers, and what each one holds."""

    count: int = 1
    gpus: float = 1.0
    cpus: float = 1.0


class ShardWorker:
    """A `map_batches` callable: loads the pipeline and verifier once, then makes the shards
    whose indices it is given."""

    def __init__(self, spec: dict, out: str, device: str | None, dtype: str | None):
        self.maker = ShardMaker(PairSetSpec(**spec), Path(out), device, dtype)

    def __call__(self, batch: dict) -> dict[str, list[str]]:
        reports = [self.maker.make(int(index)) for index in batch["shard"]]
        # JSON: the drop reasons differ from shard to shard, and Arrow wants one struct type.
        return {"report": [json.dumps(asdict(report)) for report in reports]}


def run_shards(spec: PairSetSpec, out: Path, workers: PairWorkers, device: str | None,
               dtype: str | None, todo: Sequence[int]) -> Iterator[ShardReport]:
    """Reports of the shards in `todo` as they finish."""
    if not todo:
        return
    # One block per shard, so that every idle worker can take the next shard.
    shards = ray.data.from_items([{"shard": index} for index in todo],
                                 override_num_blocks=len(todo))
    reports = shards.map_batches(
        ShardWorker, batch_size=1, concurrency=workers.count, num_gpus=workers.gpus,
        num_cpus=workers.cpus,
        fn_constructor_kwargs={"spec": asdict(spec), "out": str(out), "device": device,
                               "dtype": dtype},
    )
    for row in reports.iter_rows():
        yield ShardReport(**json.loads(row["report"]))


@contextmanager
def ray_shard_runner(spec: PairSetSpec, out: Path, workers: PairWorkers, address: str | None,
                     device: str | None = None, dtype: str | None = None
                     ) -> Iterator[ShardRunner]:
    """A shard runner on the Ray cluster at `address` (None: RAY_ADDRESS, else a new local
    instance), connected for the duration of the block."""
    ray.init(address=address)
    try:
        yield partial(run_shards, spec, Path(out).resolve(), workers, device, dtype)
    finally:
        ray.shutdown()
