"""Reward actors: a Ray Serve deployment around the core's build_reward, batching items
dynamically across every caller.

A request is one group of (prompt, uint8 HxWx3 image) items, or for edits (instruction, edited
image, source image) items; the answer is plain lists: mu,
sigma and, per item, the number of items in the batch that scored it, with the reward version
of the replica that scored them. Items are batched one by one, so `serving.max_batch_size`
counts images whatever the group size, and one caller's items share batches with other
callers'. The trainer calls the deployment through a handle with score_on_deployment; the HTTP
service (spatialrl.actors.service) binds reward_application as its child deployment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from spatialrl.config import RewardConfig, TrainConfig
from spatialrl.reward_functions import (
    apply_reward,
    build_reward,
    reward_input_pixels,
    reward_version,
)

APP_NAME = "spatialrl-reward"

# A replica that died or is not reachable yet; Serve replaces it, so the same call succeeds
# once it is back. Anything else (bad input, a reward that raises) fails the same way again.
RETRYABLE_ERRORS = (RayActorError, ReplicaUnavailableError, BackPressureError)


def parse_group(items: Sequence) -> tuple[list[str], list[Image.Image], list[Image.Image] | None]:
    """(prompt, image) or (instruction, edited image, source image) items -> prompts, RGB
    images and sources (None for text-to-image); a ValueError names the first bad item."""
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise ValueError("reward request: expected a non-empty list of (prompt, image) items")
    width = len(items[0]) if isinstance(items[0], Sequence) else 0
    prompts, images, sources = [], [], []
    for index, item in enumerate(items):
        if not isinstance(item, Sequence) or len(item) not in (2, 3) or len(item) != width:
            raise ValueError(f"reward request item {index}: expected a (prompt, image) pair or "
                             "an (instruction, edited image, source image) triple, all alike")
        prompt, *pictures = item
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"reward request item {index}: prompt must be a non-empty string")
        image, *source = (_image(picture, index) for picture in pictures)
        prompts.append(prompt)
        images.append(image)
        sources.extend(source)
    return prompts, images, sources or None


def _image(image: object, index: int) -> Image.Image:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"reward request item {index}: image must be a uint8 array, got {kind}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(
            f"reward request item {index}: image must have shape HxWx3, got {image.shape}")
    return Image.fromarray(image)


@serve.deployment
class RewardDeployment:
    """One reward replica: build_reward(cfg) behind a batch queue sized by cfg.serving."""

    def __init__(self, cfg: RewardConfig):
        serving = cfg.serving
        self._reward = build_reward(cfg, "cuda" if serving.gpus_per_replica > 0 else "cpu")
        self._version = reward_version(cfg)
        self._input_pixels = reward_input_pixels(cfg)
        self._score_batch.set_max_batch_size(serving.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)

    def version(self) -> str:
        """The reward version (spatialrl.reward_functions.reward_version) this replica loaded."""
        return self._version

    def input_pixels(self) -> int | None:
        """The most pixels of an image the reward reads (reward_input_pixels in
        spatialrl.reward_functions): callers may downscale larger images to this first."""
        return self._input_pixels

    async def score(self, items: Sequence) -> dict[str, list | str]:
        """mu, sigma and batch_sizes per item, in item order, and the version. Non-finite
        rewards come back as they are: dropping those groups is the caller's decision."""
        prompts, images, sources = parse_group(items)
        scored = await asyncio.gather(*map(self._score_batch, prompts, images,
                                           sources or [None] * len(images)))
        for index, result in enumerate(scored):
            if isinstance(result, Exception):
                raise RuntimeError(f"reward request item {index}: {result!r}") from result
        mu, sigma, batch_sizes = (list(column) for column in zip(*scored, strict=True))
        return {"mu": mu, "sigma": sigma, "batch_sizes": batch_sizes, "version": self._version}

    @serve.batch
    async def _score_batch(
        self, prompts: list[str], images: list[Image.Image], sources: list[Image.Image | None]
    ) -> list[tuple[float, float, int] | Exception]:
        return await self._run(prompts, images, sources)

    async def _run(
        self, prompts: list[str], images: list[Image.Image], sources: list[Image.Image | None]
    ) -> list[tuple[float, float, int] | Exception]:
        # A batch may mix text-to-image items and edits: only a batch of edits has sources.
        edits = None if any(source is None for source in sources) else sources
        try:
            # A worker thread keeps the replica's event loop taking requests for the next batch.
            out = await asyncio.to_thread(apply_reward, self._reward, images, prompts, edits)
        except Exception as error:
            if len(prompts) == 1:
                return [error]
            # An item that breaks the reward must not fail the other callers' items with it.
            alone = [await self._run([p], [im], [s])
                     for p, im, s in zip(prompts, images, sources, strict=True)]
            return [result for (result,) in alone]
        size = len(prompts)
        return [(m, s, size) for m, s in zip(out.mu.tolist(), out.sigma.tolist(), strict=True)]


def reward_application(cfg: RewardConfig) -> serve.Application:
    """The deployment with replicas (fixed or autoscaled) and resources from cfg.serving."""
    serving = cfg.serving
    if serving.autoscaling is not None:
        scaling = {"autoscaling_config": serving.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": serving.replicas}
    return RewardDeployment.options(
        max_ongoing_requests=serving.max_ongoing_requests,
        # One access-log line per group scored would drown the trainer's own log.
        logging_config={"enable_access_log": False},
        ray_actor_options={
            "num_cpus": serving.cpus_per_replica,
            "num_gpus": serving.gpus_per_replica,
            "resources": dict(serving.custom_resources),
        },
        **scaling,
    ).bind(cfg)


def start_reward_deployment(
    cfg: TrainConfig | RewardConfig, name: str = APP_NAME
) -> DeploymentHandle:
    """Run the reward application `name` on the connected Ray cluster and wait until its
    replicas are up. Starts Serve without HTTP proxies when it is not running yet (the
    trainer only needs handles); a Serve instance already running keeps its own options."""
    reward = cfg.reward if isinstance(cfg, TrainConfig) else cfg
    serve.start(proxy_location="Disabled")
    return serve.run(reward_application(reward), name=name, route_prefix=None)


def stop_reward_deployment(name: str = APP_NAME) -> None:
    """Delete the application and its replicas; Serve itself keeps running for others."""
    serve.delete(name)


@dataclass
class GroupScore:
    mu: torch.Tensor  # [G] float32
    sigma: torch.Tensor  # [G] float32
    batch_sizes: list[int]  # per item: items in the batch that scored it
    retries: int  # times the group was sent again after a replica died or was unavailable


def score_on_deployment(
    handle: DeploymentHandle,
    groups: Sequence[tuple[Sequence[str], Sequence[np.ndarray]]
                     | tuple[Sequence[str], Sequence[np.ndarray], Sequence[np.ndarray]]],
    retries: int = 4,
    backoff_s: float = 0.5,
) -> list[GroupScore]:
    """Score (prompts, images) groups, or (instructions, edited images, source images) groups
    of edits, all sent at once so that they batch together.

    A group whose call fails on a dead or unavailable replica is sent again after
    backoff_s * 2**attempt, at most `retries` times; scores are a pure function of the items,
    so a repeat is safe, and each group is answered whole or not at all. Bad input and reward
    errors are raised at once, not retried.
    """
    requests = [list(zip(*columns, strict=True)) for columns in groups]
    first = [handle.score.remote(items) for items in requests]
    return [_answer(handle, index, items, response, retries, backoff_s)
            for index, (items, response) in enumerate(zip(requests, first, strict=True))]


def _answer(handle: DeploymentHandle, index: int, items: list, response, retries: int,
            backoff_s: float) -> GroupScore:
    """The group's first response, or that of a repeat after a retryable error."""
    retrying = Retrying(retry=retry_if_exception_type(RETRYABLE_ERRORS),
                        stop=stop_after_attempt(retries + 1),
                        wait=wait_exponential(multiplier=backoff_s))
    try:
        for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    response = handle.score.remote(items)
                answer = response.result()
    except RetryError as error:
        raise RuntimeError(f"reward group {index}: no replica answered after {retries} "
                           "retries") from error.last_attempt.exception()
    return GroupScore(
        mu=torch.tensor(answer["mu"], dtype=torch.float32),
        sigma=torch.tensor(answer["sigma"], dtype=torch.float32),
        batch_sizes=answer["batch_sizes"],
        retries=attempt.retry_state.attempt_number - 1,
    )


def score_group(
    handle: DeploymentHandle, prompts: Sequence[str], images: Sequence[np.ndarray], **retry
) -> GroupScore:
    """One group through score_on_deployment (same retries)."""
    return score_on_deployment(handle, [(prompts, images)], **retry)[0]
