"""One trainer for every reward model: N workers with Ray Train's TorchTrainer, each rank a
DeepSpeed ZeRO engine (stage 1 or 2) around a model's TrainTask (spatialrl.reward.train_task:
its data, loss, evaluation and checkpoint format). `spatialrl reward train` (SpatialScore,
learners/spatialscore_trainer.py) and `spatialrl spatialreward train` (SpatialReward SFT,
learners/spatialreward_trainer.py) both run it.

    driver: MLflow run (params = the whole config), TorchTrainer.fit()
    worker r of N: items r, r + N, ... of data.train -> batches drawn from (seed, step) ->
        DeepSpeed forward/backward/step (gradients all-reduced, optimiser state partitioned)
        -> rank 0 logs to MLflow -> every eval_every steps the test split, scored by shard
        and gathered -> every checkpoint_every steps a Ray Train checkpoint

A checkpoint folder (output_dir/ray-train/checkpoint_*) holds
    engine/            DeepSpeed's checkpoint (tag: the task's kind): trainable weights,
                       every rank's optimiser shard, the LR schedule (each rank writes its
                       own files)
    model/             the model's save_pretrained folder (safetensors only)
    train_state.json   the number of steps done, the world size and the MLflow run id
    checksums/rank-N.json  the sha256 of every file rank N wrote (rank 0 never sees the
                       others' files): a resume, and init_from, check every file of the
                       checkpoint against them before loading any, and stop with an error
                       naming a changed, missing or unlisted file. Ray Train picks the
                       checkpoint it restores, so there is no falling back to an older one;
                       each rank reads the whole checkpoint once to check it.
The MLflow run id is also kept in output_dir/mlflow_run.json, so `--resume` continues the same
run: Ray Train restores the newest checkpoint of output_dir/ray-train, training goes on at the
next step, and metrics keep their step numbers. Every random draw of a step is a function of
(seed, step, rank, micro-batch), so the resumed steps are the ones the uninterrupted run would
have taken. Steps after the last checkpoint of a crashed run are retrained and logged again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchConfig, TorchTrainer

from spatialrl import checkpoint_digests, storage
from spatialrl.checkpoint_digests import CheckpointError
from spatialrl.config import ConfigError
from spatialrl.deepspeed_checkpoints import load_weights_only
from spatialrl.errors import InputError
from spatialrl.reward.train_config import TrainRunConfig
from spatialrl.reward.train_task import TaskData, TrainTask
from spatialrl.reward.training import batch_at, make_optimizer, step_seed
from spatialrl.tracking import Tracker, run_name

log = logging.getLogger(__name__)

RAY_RUN_NAME = "ray-train"
RUN_FILE = "mlflow_run.json"
ENGINE_DIR = "engine"
MODEL_DIR = "model"
STATE_FILE = "train_state.json"
CHECKSUMS_DIR = "checksums"


@dataclass
class TrainResult:
    mlflow_run_id: str
    steps_done: int
    checkpoint: str  # the newest checkpoint folder


# ---------------------------------------------------------------------------------- driver


def train_model(task: TrainTask, cfg: TrainRunConfig, resume: bool = False) -> TrainResult:
    """Train (or with `resume`, continue) the run whose files live in cfg.output_dir, on the
    Ray cluster in reach (a local instance if none)."""
    cfg = with_absolute_paths(cfg)
    task.check_data(cfg)
    if cfg.init_from:
        cfg = cfg.model_copy(update={"init_from": init_model_folder(task, cfg.init_from, cfg)})
    run_file = storage.join(cfg.output_dir, RUN_FILE)
    if resume:
        if not storage.exists(run_file):
            raise ConfigError(f"--resume: no run to continue in output_dir {cfg.output_dir}")
        tracker = Tracker(cfg.mlflow, run_id=json.loads(storage.read_bytes(run_file))["run_id"])
    else:
        if storage.exists(run_file):
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds a run: continue it with --resume "
                "or choose another output_dir"
            )
        tracker = Tracker(cfg.mlflow, tags={"kind": task.kind},
                          name=run_name(task.kind, cfg.model.base_model))
        tracker.log_config(cfg)
        storage.write_bytes(run_file, json.dumps({"run_id": tracker.run_id}).encode())
    with tracker:
        if not ray.is_initialized():
            ray.init(address=cfg.distributed.ray_address or os.environ.get("RAY_ADDRESS", "local"))
        result = _fit(_trainer(task, cfg, tracker.run_id))
        # The newest checkpoint, also when this attempt had nothing left to train.
        with result.checkpoint.as_directory() as folder:
            steps_done = json.loads((Path(folder) / STATE_FILE).read_text())["steps_done"]
        # A run stopped by `stop_after` is not finished: --resume sets it RUNNING again.
        tracker.finish("FINISHED" if steps_done >= cfg.optim.steps else "KILLED")
    return TrainResult(tracker.run_id, steps_done, result.checkpoint.path)


def with_absolute_paths(cfg: TrainRunConfig) -> TrainRunConfig:
    """Workers do not share the driver's working directory: resolve local paths here."""

    def absolute(location: str | None) -> str | None:
        return location if location is None or storage.is_uri(location) else str(
            Path(location).resolve())

    updates = {
        "output_dir": absolute(cfg.output_dir),
        "data": cfg.data.model_copy(
            update={"train": [absolute(path) for path in cfg.data.train],
                    "test": absolute(cfg.data.test)}),
    }
    if Path(cfg.model.base_model).is_dir():  # otherwise a hub id
        updates["model"] = cfg.model.model_copy(
            update={"base_model": absolute(cfg.model.base_model)})
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        updates["mlflow"] = cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{db}"})
    return cfg.model_copy(update=updates)


def init_model_folder(task: TrainTask, location: str, cfg: TrainRunConfig) -> str:
    """init_from as a model folder or hub id that `cfg.model` can start from: an earlier
    run's output_dir stands for the model of its newest checkpoint."""
    if (Path(location) / RAY_RUN_NAME).is_dir():
        location = str(newest_model(location))
    task.check_init_from(location, cfg)
    return str(Path(location).resolve()) if Path(location).is_dir() else location


def newest_model(output_dir: str | Path) -> Path:
    """The model folder of the newest checkpoint of the run in `output_dir`, once that
    checkpoint's files are checked."""
    models = sorted((Path(output_dir) / RAY_RUN_NAME).glob(f"checkpoint_*/{MODEL_DIR}"))
    if not models:
        raise ConfigError(f"init_from: {output_dir} holds no checkpoint with a model yet")
    verify_checkpoint(models[-1].parent)
    return models[-1]


def _fit(trainer: TorchTrainer):
    """trainer.fit(), with a worker's ConfigError or InputError (a damaged checkpoint, a
    changed world size) raised as it is, so that the CLI prints it as one line."""
    try:
        return trainer.fit()
    except WorkerGroupError as err:
        named = [e for e in err.worker_failures.values() if isinstance(e, ConfigError | InputError)]
        if named:
            raise named[0] from None
        raise


def _trainer(task: TrainTask, cfg: TrainRunConfig, mlflow_run_id: str) -> TorchTrainer:
    spec = cfg.distributed
    # CPU workers must not let DeepSpeed probe for an accelerator.
    env = {} if spec.use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "task": task,  # a plain object of a module-level class: pickled by reference
            "config": cfg.model_dump(mode="json"),
            "mlflow_run_id": mlflow_run_id,
        },
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.cpus_per_worker},  # and 1 GPU with use_gpu
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=cfg.output_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )


# ---------------------------------------------------------------------------------- workers


def deepspeed_config(cfg: TrainRunConfig, world_size: int) -> dict:
    """fp32 optimiser over fp32 trainable weights (LoRA, a head, a full tiny model); a bf16
    backbone stays frozen, so DeepSpeed's bf16 mode, which would cast an fp32 head, is not
    used."""
    optim = cfg.optim
    return {
        "train_batch_size": optim.batch_size * world_size,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size or optim.batch_size,
        "gradient_accumulation_steps": optim.accumulation_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no CPU-Adam op to build
        "steps_per_print": 2**31 - 1,
    }


def train_worker(loop_config: dict) -> None:
    """One rank of the TorchTrainer (the process group is already set up)."""
    task: TrainTask = loop_config["task"]
    cfg = task.config_type.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The driver's tracker samples system metrics; this one only logs rank 0's numbers.
    tracker = Tracker(cfg.mlflow, run_id=loop_config["mlflow_run_id"], system_metrics=False
                      ) if rank == 0 else None

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = task.build_model(cfg).to(ray.train.torch.get_device())
    _check_trainable_fp32(model)
    optimizer, scheduler = make_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
    )
    load_weights_only(engine)  # a planted pickle must not run on --resume
    steps_done = _restore(engine, task.kind, world_size)

    train = task.load_data(cfg, "train", rank, world_size)
    test = task.load_data(cfg, "test", rank, world_size) if cfg.data.test else None
    if tracker:
        tracker.log_metrics({**_data_metrics("train", train, task.unit),
                             **(_data_metrics("test", test, task.unit) if test else {})},
                            step=steps_done)

    last_step = min(cfg.optim.steps, cfg.stop_after or cfg.optim.steps)
    checkpoint_every = cfg.checkpoint_every or cfg.optim.steps
    eval_every = cfg.eval_every or cfg.optim.steps
    # Ray's progress bar: drawn by the driver, with steps, total and ETA.
    progress = None
    if tracker:
        progress = tqdm_ray.tqdm(desc=f"{task.kind} train", total=last_step, unit="step")
        progress.update(steps_done)
    engine.train()
    while steps_done < last_step:
        batch = batch_at(train.items, cfg.optim.batch_size, cfg.seed, steps_done)
        metrics = _train_step(task, engine, cfg, batch, steps_done, rank, world_size)
        steps_done += 1
        evaluated = test and (steps_done % eval_every == 0 or steps_done == cfg.optim.steps)
        if evaluated:
            metrics.update(evaluate(task, engine.module, test, cfg, world_size))
        if tracker and (steps_done % cfg.log_every == 0 or evaluated):
            tracker.log_metrics(metrics, step=steps_done)
            print(step_line(steps_done, last_step, metrics, task.shown_metrics), flush=True)
        if progress:
            progress.update()
        if steps_done % checkpoint_every == 0 or steps_done == last_step:
            _save_checkpoint(task, engine, steps_done, world_size, loop_config["mlflow_run_id"],
                             tracker if steps_done == cfg.optim.steps else None)
    if progress:
        progress.close()


def _train_step(
    task: TrainTask, engine: deepspeed.DeepSpeedEngine, cfg: TrainRunConfig, batch: list,
    step: int, rank: int, world_size: int,
) -> dict[str, float]:
    """One optimiser step over `batch` in micro-batches; metrics averaged over the ranks."""
    start = time.perf_counter()
    lr = float(engine.get_lr()[0])  # the rate this step applies; the scheduler moves after it
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size
    sums: dict[str, torch.Tensor] = {}
    for index in range(cfg.optim.accumulation_steps):
        torch.manual_seed(step_seed(cfg.seed, step, rank, index))  # dropout and MC noise
        loss, stats = task.micro_batch_loss(
            engine, engine.module, batch[index * micro : (index + 1) * micro], cfg)
        engine.backward(loss)
        engine.step()  # applies the update only at the accumulation boundary
        for name, value in stats.items():  # stay on the device: NCCL reduces GPU tensors
            sums[name] = sums.get(name, 0) + value.float()
    names = sorted(sums)
    averaged = torch.stack([sums[n] for n in names]) / cfg.optim.accumulation_steps
    dist.all_reduce(averaged)
    seconds = time.perf_counter() - start
    metrics = {f"train/{n}": v / world_size for n, v in zip(names, averaged.tolist(), strict=True)}
    return {
        **metrics,
        "train/lr": lr,
        "train/grad_norm": float(engine.get_global_grad_norm()),
        f"train/{task.unit}_per_s": cfg.optim.batch_size * world_size / seconds,
        "train/step_s": seconds,
    }


def step_line(step: int, total: int, metrics: dict[str, float], shown: tuple[str, ...]) -> str:
    """The line rank 0 prints every log_every steps (and at each evaluation)."""
    return f"step {step}/{total}: " + " ".join(
        f"{key}={metrics[key]:.4g}" for key in shown if key in metrics)


def evaluate(
    task: TrainTask, model: torch.nn.Module, test: TaskData, cfg: TrainRunConfig,
    world_size: int,
) -> dict[str, float]:
    """Held-out metrics: each rank scores its shard, rank 0's summary covers them all."""
    was_training = model.training
    model.eval()
    records = task.eval_records(model, test.items, cfg)
    model.train(was_training)
    gathered: list[list] = [None] * world_size
    dist.all_gather_object(gathered, records)
    return task.eval_metrics([record for shard in gathered for record in shard])


def _data_metrics(split: str, data: TaskData, unit: str) -> dict[str, float]:
    """Rank 0's share of the valid items, and the file's skipped rows by reason."""
    metrics = {
        f"data/{split}_{unit}_per_rank": len(data.items),
        f"data/{split}_skipped_rows": sum(data.skipped.values()),
    }
    for reason, count in data.skipped.items():
        metrics[f"data/{split}_skipped_{reason}"] = count
    return metrics


def _check_trainable_fp32(model: torch.nn.Module) -> None:
    if wrong := [n for n, p in model.named_parameters() if p.requires_grad and
                 p.dtype != torch.float32]:
        raise ConfigError(
            f"trainable parameters must be fp32 for the fp32 optimiser, got {wrong[:3]}: "
            "with model.dtype bfloat16/float16, train LoRA only (model.finetune lora, and "
            "for SpatialScore model.train_vision_tower false)"
        )


def _save_checkpoint(
    task: TrainTask, engine: deepspeed.DeepSpeedEngine, steps_done: int, world_size: int,
    mlflow_run_id: str, final_tracker: Tracker | None,
) -> None:
    """Every rank writes its DeepSpeed files into its own folder; Ray Train gathers them
    into one checkpoint folder. Rank 0 adds the model and, at the end, logs it to MLflow."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(
            str(Path(folder) / ENGINE_DIR), tag=task.kind, exclude_frozen_parameters=True)
        if rank == 0:
            model_dir = task.save_model(engine.module, Path(folder) / MODEL_DIR)
            state = {"steps_done": steps_done, "world_size": world_size,
                     "mlflow_run_id": mlflow_run_id}
            (Path(folder) / STATE_FILE).write_text(json.dumps(state) + "\n")
            if final_tracker:
                final_tracker.log_artifacts(model_dir, MODEL_DIR)
        _write_checksums(Path(folder), rank)
        ray.train.report(
            {"steps_done": steps_done},
            checkpoint=Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_{steps_done:07d}",
        )


def _restore(engine: deepspeed.DeepSpeedEngine, tag: str, world_size: int) -> int:
    """Load the newest checkpoint Ray Train hands over (on --resume); returns steps done."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = verify_checkpoint(Path(folder))
        if state["world_size"] != world_size:
            raise ConfigError(
                f"distributed.num_workers: the checkpoint was written by {state['world_size']} "
                f"workers (their optimiser shards), this run has {world_size}"
            )
        engine.load_checkpoint(
            str(Path(folder) / ENGINE_DIR), tag=tag, load_module_strict=False)
    log.info("resumed from %s after step %d", checkpoint.path, state["steps_done"])
    return int(state["steps_done"])


def _write_checksums(folder: Path, rank: int) -> None:
    """List the sha256 of every file this rank wrote into `folder`; write it last."""
    listing = folder / CHECKSUMS_DIR / f"rank-{rank}.json"
    files = checkpoint_digests.digests(folder, storage.list_files(folder))
    listing.parent.mkdir()
    listing.write_text(json.dumps(files, indent=2) + "\n")


def verify_checkpoint(folder: Path) -> dict:
    """Every file of a checkpoint against its ranks' lists, one list per rank of the world
    size it records; its train_state.json. CheckpointError naming the file otherwise."""
    lists = sorted((folder / CHECKSUMS_DIR).glob("*"))
    if not lists:
        log.warning("%s: written before checksums were recorded; files not verified", folder)
        return _read_json(folder / STATE_FILE)
    recorded = {}
    for listing in lists:
        recorded |= _read_json(listing)
    found = [name for name in storage.list_files(folder)
             if not name.startswith(f"{CHECKSUMS_DIR}/")]
    checkpoint_digests.verify(folder, recorded, found, f"{CHECKSUMS_DIR}/rank-*.json")
    state = _read_json(folder / STATE_FILE)
    expected = {folder / CHECKSUMS_DIR / f"rank-{rank}.json" for rank in range(
        state["world_size"])}
    if odd := sorted(expected.symmetric_difference(lists)):
        why = "missing" if odd[0] in expected else f"not a rank of {state['world_size']}"
        raise CheckpointError(f"{odd[0]}: {why} (one list per rank that wrote the checkpoint)")
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON ({err})") from None
