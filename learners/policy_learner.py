"""The DeepSpeed learner group: N Ray actors, one torch.distributed rank each, each running the
core's grpo_update on its shard of a train batch; the driver holds a LearnerGroup.

Shards: the driver shuffles the K kept samples and cuts them into N contiguous shards of
floor(K / N); the K mod N left over are not trained on in that update (reported as
`dropped_samples`). Equal shards give every rank the same number of micro-batches, so every
rank runs the same sequence of collectives (ZeRO reduces gradients inside each backward).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import deepspeed
import ray
import torch
import torch.distributed as dist
from ray.exceptions import ObjectLostError

from spatialrl import storage
from spatialrl.actors.placement_groups import in_bundle, release, reserve
from spatialrl.broadcast import broadcast_tensors, open_group, weights_fingerprint
from spatialrl.config import PolicyModelConfig, TrainConfig
from spatialrl.deepspeed_checkpoints import load_weights_only
from spatialrl.flux.loading import load_flux_transformer, resolve_device
from spatialrl.flux.lora import add_initial_adapter, lora_checksum, lora_state_dict, save_lora
from spatialrl.flux.sampler import Trajectory
from spatialrl.grpo.loss import sample_train_steps
from spatialrl.grpo.update import grpo_update
from spatialrl.ports import free_port
from spatialrl.recovery import SamplesLost
from spatialrl.role_resources import role_bundles
from spatialrl.train_batch import TrainBatch, gather_trajectory

CHECKPOINT_TAG = "learner"
SHUFFLE_STREAM = -1  # update_generator stream of the driver's shard shuffle; ranks use >= 0


def update_generator(seed: int, version: int, stream: int) -> torch.Generator:
    """The randomness of one update (shuffles, trained timesteps) as a function of the run seed,
    the policy version it produces from and the rank: a restored checkpoint replays it."""
    return torch.Generator().manual_seed(hash((seed, version, stream)) & (2**63 - 1))


class DeepSpeedOptimization:
    """spatialrl.grpo.update.Optimization over a DeepSpeed engine.

    grpo_update calls backward once per trained timestep, with the loss already divided by their
    number, then step once per micro-batch. The engine's gradient_accumulation_steps is that
    number, so DeepSpeed's accumulation boundary is the end of a micro-batch: backward skips
    DeepSpeed's own 1/gas scaling and advances its micro-step counter between timesteps, and
    step() takes the optimiser step at the boundary.
    """

    def __init__(self, engine: deepspeed.DeepSpeedEngine):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step: nothing is applied

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "a micro-batch ended before gradient_accumulation_steps backward passes: "
                "the engine's accumulation does not match the trained timesteps"
            )
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


def set_timesteps_per_micro_batch(engine: deepspeed.DeepSpeedEngine, timesteps: int) -> None:
    engine.set_train_batch_size(
        engine.train_micro_batch_size_per_gpu() * engine.dp_world_size * timesteps
    )


def learner_model_config(cfg: TrainConfig, device: str) -> PolicyModelConfig:
    """bf16 weights (DeepSpeed keeps fp32 master weights) on GPU when the policy runs in bf16;
    fp32 otherwise: CPU training is fp32, and fp16 would need loss scaling."""
    bf16 = device.startswith("cuda") and cfg.model.dtype == "bfloat16"
    return cfg.model.model_copy(update={"dtype": "bfloat16" if bf16 else "float32"})


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": 1,  # set per update to the trained timesteps
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no CPU-Adam op to build
        "steps_per_print": 2**31 - 1,
    }


def fetch_trajectory(source: ray.ObjectRef) -> Trajectory:
    """A sample source (spatialrl.train_batch.ScoredGroup) on Ray: a reference to a rollout
    actor's packed trajectories (spatialrl.actors.rollout.packed)."""
    return Trajectory.from_tensors(**ray.get(source))


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for name, param in module.named_parameters() if "lora_" in name]


@ray.remote
class PolicyLearner:
    """One rank: the FLUX transformer (LoRA or full) inside a DeepSpeed engine."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = resolve_device(cfg.device)

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group (blocks until every rank has) and build the engine."""
        cfg = self.cfg
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(0)  # Ray shows each worker only its own GPU(s)
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank, world_size=self.world_size,
        )
        model_cfg = learner_model_config(cfg, self.device)
        transformer = load_flux_transformer(model_cfg, self.device)
        add_initial_adapter(transformer, cfg)
        optimizer = torch.optim.AdamW(
            [p for p in transformer.parameters() if p.requires_grad], lr=cfg.optim.lr,
            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
        )
        self.engine, *_ = deepspeed.initialize(
            model=transformer, optimizer=optimizer,
            config=deepspeed_config(cfg, bf16=model_cfg.dtype == "bfloat16"),
        )
        load_weights_only(self.engine)  # a planted pickle must not run on resume
        self.optimization = DeepSpeedOptimization(self.engine)

    def stage(self, samples: list[tuple[Any, int]], advantages: torch.Tensor) -> None:
        """Fetch this rank's shard of the kept samples from the rollout actors' object stores.
        No collective runs here, so a sample lost with its node fails this call alone, not
        the other ranks in the middle of an update."""
        self.staged = (gather_trajectory(samples, resolve=fetch_trajectory), advantages)

    def update(self, version: int) -> dict[str, float]:
        """grpo_update on the staged shard; `version` is the policy version trained from."""
        cfg = self.cfg
        trajectory, advantages = self.staged
        self.staged = None
        trajectory = trajectory.to(self.device)
        # The core draws the timesteps; only their count is needed here, for the accumulation.
        timesteps = len(sample_train_steps(
            trajectory.sde_mask.cpu(), cfg.grpo.timestep_fraction, torch.Generator()))
        set_timesteps_per_micro_batch(self.engine, timesteps)
        module = self.engine.module
        module.train()
        try:
            return grpo_update(
                module, trajectory, advantages, cfg.grpo, cfg.optim, self.optimization,
                update_generator(cfg.seed, version, self.rank),
            )
        finally:
            module.eval()

    @ray.method(num_returns=2)
    def policy_state(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """(the LoRA weights on rank 0, None elsewhere; their checksum on every rank).

        Every rank must call this: under ZeRO-3 the gather is a collective."""
        if not self.cfg.lora.enabled:
            raise ValueError("full weights are broadcast with send_full_weights, not published")
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(lora_parameters(module)):
            state = lora_state_dict(module)
        return (state if self.rank == 0 else None), lora_checksum(state)

    def join_weight_group(self, address: str, port: int, world_size: int) -> None:
        """Host the full-weight broadcast group as its rank 0 (learner rank 0 only)."""
        self.weight_group = open_group(address, port, 0, world_size, self.device,
                                       self.cfg.cluster.weight_sync_timeout_s)

    def send_full_weights(self) -> str | None:
        """Broadcast the full transformer, in the rollout dtype, to the rollout actors; returns
        rank 0's fingerprint of what it sent. Every rank must call this: under ZeRO-3 the
        gather is a collective."""
        module = self.engine.module
        dtype = getattr(torch, self.cfg.model.dtype)
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if self.rank != 0:
                return None
            named = [(name, param.detach().to(dtype)) for name, param in module.named_parameters()]
            broadcast_tensors(self.weight_group, [t for _, t in named], is_source=True)
            return weights_fingerprint(iter(named))

    def save_checkpoint(self, location: str, version: int) -> None:
        """The engine's checkpoint (optimiser state; only trainable weights with LoRA) on every
        rank, and on rank 0 the adapter in diffusers' format under location/lora. `location` is
        a local path (written in place) or a URI (this rank's files are staged locally, then
        uploaded)."""
        lora = self.cfg.lora.enabled
        with storage.staged_upload(location) as local:
            self.engine.save_checkpoint(
                str(local), tag=CHECKPOINT_TAG, client_state={"version": version},
                exclude_frozen_parameters=lora,
            )
            if lora:
                module = self.engine.module
                with deepspeed.zero.GatheredParameters(lora_parameters(module)):
                    if self.rank == 0:
                        save_lora(module, Path(local) / "lora")
        dist.barrier()  # the checkpoint is complete (uploaded) when any rank returns

    def load_checkpoint(self, location: str) -> int:
        """Restore weights and optimiser state; returns the saved policy version. A URI is
        downloaded whole first: DeepSpeed reads every rank's optimiser shard."""
        with storage.staged_download(location) as local:
            _, client_state = self.engine.load_checkpoint(
                str(local), tag=CHECKPOINT_TAG, load_module_strict=not self.cfg.lora.enabled,
                load_lr_scheduler_states=False,
            )
        if client_state is None:
            raise FileNotFoundError(f"no learner checkpoint at {location}")
        return int(client_state["version"])


class LearnerGroup:
    """Driver side of the learner: N PolicyLearner ranks in one placement group."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.version = 0  # policy version = number of updates applied
        bundles = role_bundles(cfg)["learner"]
        self.min_update_samples = len(bundles)  # a shard of at least one sample per rank
        self.placement_group = reserve("learner", bundles, cfg.cluster.placement_timeout_s)
        # CPU workers must not let DeepSpeed probe for an accelerator.
        env = {} if cfg.learner.gpus_per_worker else {"DS_ACCELERATOR": "cpu"}
        self.workers = [
            PolicyLearner.options(
                runtime_env={"env_vars": env},
                **in_bundle(self.placement_group, rank, one),
            ).remote(cfg, rank, len(bundles))
            for rank, one in enumerate(bundles)
        ]
        try:
            addr, port = ray.get(self.workers[0].master_address.remote())
            ray.get([worker.setup.remote(addr, port) for worker in self.workers])
        except Exception:
            self.shutdown()
            raise

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One grpo_update across the ranks; metrics averaged over ranks, plus the bytes the
        driver sent (references, rows and advantages: the ranks fetch the trajectories)."""
        num_workers = len(self.workers)
        shard_size = len(batch.samples) // num_workers
        if shard_size == 0:
            raise ValueError(
                f"{len(batch.samples)} kept samples cannot be shared by {num_workers} workers")
        order = torch.randperm(
            len(batch.samples), generator=update_generator(self.cfg.seed, self.version,
                                                           SHUFFLE_STREAM))
        staged, sent_bytes = [], 0
        for rank, worker in enumerate(self.workers):
            shard = order[rank * shard_size : (rank + 1) * shard_size]
            shard_args = ([batch.samples[i] for i in shard.tolist()], batch.advantages[shard].cpu())
            sent_bytes += len(pickle.dumps(shard_args))
            staged.append(worker.stage.remote(*shard_args))
        try:
            ray.get(staged)
        except ObjectLostError as lost:
            raise SamplesLost(f"a learner could not fetch its samples: {lost}") from lost
        per_rank = ray.get([worker.update.remote(self.version) for worker in self.workers])
        self.version += 1
        metrics = {name: sum(m[name] for m in per_rank) / num_workers for name in per_rank[0]}
        metrics["dropped_samples"] = float(len(batch.samples) - shard_size * num_workers)
        metrics["driver_bytes"] = float(sent_bytes)
        return metrics

    def publish(self) -> tuple[int, ray.ObjectRef, str]:
        """(version, ObjectRef of the LoRA state dict, its checksum). The state is rank 0's
        return value, kept in the object store and owned by the driver; the ranks' checksums
        must agree."""
        refs = [worker.policy_state.remote() for worker in self.workers]
        checksums = ray.get([checksum for _, checksum in refs])
        if len(set(checksums)) != 1:
            raise RuntimeError(f"learner ranks hold different weights: {checksums}")
        return self.version, refs[0][0], checksums[0]

    def open_weight_group(self, rollout_actors: list) -> None:
        """Form the full-weight broadcast group: learner rank 0, then the rollout actors."""
        address, port = ray.get(self.workers[0].master_address.remote())
        world_size = 1 + len(rollout_actors)
        ray.get([self.workers[0].join_weight_group.remote(address, port, world_size)] + [
            actor.join_weight_group.remote(address, port, rank, world_size)
            for rank, actor in enumerate(rollout_actors, start=1)
        ])

    def send_full_weights(self) -> list[ray.ObjectRef]:
        """Start the broadcast of the current weights on every rank; the first ref is rank 0's
        fingerprint of what it sent."""
        return [worker.send_full_weights.remote() for worker in self.workers]

    def save_checkpoint(self, location: str | Path) -> None:
        """Every rank writes its part: `location` is a URI (each rank uploads its files) or a
        local path, absolute and on storage that all learner nodes share."""
        ray.get([worker.save_checkpoint.remote(str(location), self.version)
                 for worker in self.workers])

    def load_checkpoint(self, location: str | Path) -> None:
        versions = ray.get([worker.load_checkpoint.remote(str(location))
                            for worker in self.workers])
        self.version = versions[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        release(self.placement_group)
