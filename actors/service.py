"""SpatialScore as an HTTP service on Ray Serve.

    HTTP (Serve's proxy, 127.0.0.1 unless asked otherwise)
      -> SpatialScoreService: FastAPI ingress; auth, body and image limits, decoding, metrics
           -> RewardDeployment (spatialrl.actors.reward): dynamic batching across requests
           -> GeneratorDeployment (optional): best-of-N candidates from FLUX (+ LoRA) or the
              shapes world

Endpoints: POST /v1/score, /v1/compare, /v1/best-of-n; GET /healthz, /readyz; the OpenAPI
description at /openapi.json (and /docs). The wire carries JSON only; images are base64 PNG or
JPEG, or file:// URLs under local_files_root when the config sets one.

A bad request is refused in the ingress with a 4xx naming the problem, so it never reaches a
reward batch; an item the model itself fails on fails only its own request (the reward
deployment rescores its batch without it). Each request is logged in one line without prompts
or images.

Slow and heavy clients (limits.*; docs/security.md): a /v1 request holds a slot of the ingress
from its headers to its answer. Beyond max_requests_in_flight the replica answers 503, beyond
max_requests_per_client from one address 429, at once and before the body is read; a body that
has not arrived within body_timeout_s gets 408. Images are checked by their headers, their
pixels counted against max_request_pixels (413) and the replica's max_pixels_in_flight (a wait
of pixel_wait_s, then 429), then decoded one by one and downscaled to what the reward model
reads. Serve's proxy has no timeout for headers: a client that never finishes them holds a
connection of the proxy, not a slot.

Metrics, on Ray's Prometheus endpoint: Ray Serve's own series for the reward batches
(ray_serve_actual_batch_size, ray_serve_batch_queue_length, ray_serve_batch_wait_time_ms) and
for HTTP (ray_serve_num_http_requests_total by status code, ray_serve_http_request_latency_ms),
and this service's, which Ray exports with a ray_ prefix: spatialrl_serve_requests (by
endpoint and outcome: ok or the refusal reason), spatialrl_serve_items,
spatialrl_serve_latency_ms (by endpoint and stage: decode, generate, reward, total) and the
gauge spatialrl_serve_items_in_flight (items sent to the reward deployment and not yet scored:
the queue this replica sees). Read histograms by their buckets: Ray exports their _sum from
bucket midpoints.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime,
# from methods that Serve's ingress re-wraps outside this module's namespace.
import asyncio
import base64
import math
import time
from collections.abc import Sequence

import numpy as np
from fastapi import Request
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from spatialrl.actors.ingress import (
    BEARER,
    PROBLEMS,
    READY_TIMEOUT_S,
    HardenedIngress,
    auth_token,
    cause_of,
    endpoint_of,
    hardened_app,
    replica_options,
    start_http_application,
    token_digest,
)
from spatialrl.actors.reward import RETRYABLE_ERRORS, reward_application
from spatialrl.data.pairs import png_bytes
from spatialrl.errors import InputError
from spatialrl.generation import best_index, build_sampler, candidate_seeds
from spatialrl.service.api import (
    BestOfNRequest,
    BestOfNResponse,
    Candidate,
    CompareRequest,
    CompareResponse,
    ProblemResponse,
    RequestError,
    Score,
    ScoreRequest,
    ScoreResponse,
    check_item_count,
    check_prompt,
    probability_preferred,
)
from spatialrl.service.config import (
    FluxGeneratorConfig,
    LimitsConfig,
    ServiceConfig,
    ShapesGeneratorConfig,
)

APP_NAME = "spatialscore"

app = hardened_app(
    "SpatialScore",
    "Scores images for spatial correctness against their prompts (mu, sigma), compares two "
    "images, and picks the best of N generated candidates.",
)


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(Image.fromarray(image))).decode("ascii")


# serve.ingress pickles the app with its routes when it decorates the class, and a route
# keeps only the module globals defined by then: everything the methods use comes first.
@serve.deployment
@serve.ingress(app)
class SpatialScoreService(HardenedIngress):
    def __init__(
        self,
        reward: DeploymentHandle,
        generator: DeploymentHandle | None,
        limits: LimitsConfig,
        local_files_root: str | None,
        token_digest: str | None,
    ):
        super().__init__(reward, limits, local_files_root, token_digest)
        self._reward, self._generator = reward, generator

    @app.get("/readyz", responses={503: {"model": ProblemResponse}})
    async def readyz(self) -> dict[str, str]:
        """The reward deployment (and the generator, if any) answers: the model is loaded."""
        try:
            return await asyncio.wait_for(self._versions(), READY_TIMEOUT_S)
        except Exception as err:
            raise RequestError(503, "not_ready", f"not ready: {cause_of(err)!r}") from None

    async def _versions(self) -> dict[str, str]:
        ready = {"status": "ready", "model_version": await self._reward.version.remote()}
        if self._generator is not None:
            ready["generator"] = await self._generator.describe.remote()
        return ready

    @app.post("/v1/score", responses=PROBLEMS, dependencies=BEARER)
    async def score(self, body: ScoreRequest, request: Request) -> ScoreResponse:
        """mu and sigma of each (prompt, image) item, in order."""
        check_item_count(len(body.items), self.limits)
        for index, item in enumerate(body.items):
            check_prompt(item.prompt, f"items.{index}", self.limits)
        refs = [(f"items.{i}.image", item.image) for i, item in enumerate(body.items)]
        async with self._decoded(request, refs) as images:
            prompts = [item.prompt for item in body.items]
            scores, version = await self._score(request, prompts, images)
        return ScoreResponse(model_version=version, scores=scores)

    @app.post("/v1/compare", responses=PROBLEMS, dependencies=BEARER)
    async def compare(self, body: CompareRequest, request: Request) -> CompareResponse:
        """Which of two images fits the prompt better."""
        check_prompt(body.prompt, "prompt", self.limits)
        refs = [("image_a", body.image_a), ("image_b", body.image_b)]
        async with self._decoded(request, refs) as images:
            (a, b), version = await self._score(request, [body.prompt] * 2, images)
        preferred = "a" if a.mu > b.mu else "b" if b.mu > a.mu else "tie"
        return CompareResponse(
            model_version=version, a=a, b=b, preferred=preferred,
            probability_a_preferred=probability_preferred(a.mu, a.sigma, b.mu, b.sigma),
        )

    @app.post(
        "/v1/best-of-n", responses={**PROBLEMS, 404: {"model": ProblemResponse}},
        dependencies=BEARER,
    )
    async def best_of_n(self, body: BestOfNRequest, request: Request) -> BestOfNResponse:
        """Sample n candidates for the prompt, score them, and return the best (and all
        scores)."""
        if self._generator is None:
            raise RequestError(
                404, "best_of_n_disabled", "best-of-N is off: the server has no generator"
            )
        if body.n > self.limits.max_best_of:
            raise RequestError(
                422, "too_many_candidates",
                f"n: {body.n} candidates, above the limit of {self.limits.max_best_of}",
            )
        check_prompt(body.prompt, "prompt", self.limits)
        seeds = candidate_seeds(body.seed, body.n)
        start = time.perf_counter()
        try:
            images = await self._generator.generate.remote(body.prompt, seeds)
        except InputError as err:
            raise RequestError(422, "bad_prompt", str(cause_of(err))) from None
        self._observe(request, "generate", start)
        generator = await self._generator.describe.remote()
        scores, version = await self._score(request, [body.prompt] * body.n, images)
        best = best_index([score.mu for score in scores])
        return BestOfNResponse(
            model_version=version, generator=generator, best_index=best,
            candidates=[
                Candidate(
                    seed=seed, mu=score.mu, sigma=score.sigma,
                    png_base64=png_base64(image) if body.return_all_images or i == best
                    else None,
                )
                for i, (seed, score, image) in enumerate(zip(seeds, scores, images, strict=True))
            ],
        )

    async def _score(
        self, request: Request, prompts: list[str], images: Sequence[np.ndarray]
    ) -> tuple[list[Score], str]:
        start = time.perf_counter()
        request.state.items = len(prompts)
        self._set_in_flight(len(prompts))
        try:
            answer = await self._reward.score.remote(list(zip(prompts, images, strict=True)))
        except RETRYABLE_ERRORS:
            raise RequestError(
                503, "reward_unavailable", "no reward replica answered; retry"
            ) from None
        except RuntimeError as err:  # the model failed on an item; the message names it
            raise RequestError(500, "scoring_failed", str(cause_of(err))) from None
        finally:
            self._set_in_flight(-len(prompts))
        self._observe(request, "reward", start)
        scores = [Score(mu=m, sigma=s, batch_size=b) for m, s, b in
                  zip(answer["mu"], answer["sigma"], answer["batch_sizes"], strict=True)]
        if bad := [i for i, s in enumerate(scores) if not math.isfinite(s.mu + s.sigma)]:
            raise RequestError(500, "non_finite_score", f"items {bad}: the reward is not finite")
        self.metrics.items.inc(len(prompts), tags={"endpoint": endpoint_of(request)})
        return scores, answer["version"]


@serve.deployment
class GeneratorDeployment:
    """One best-of-N sampler; its requests run one at a time (a diffusers pipeline keeps
    per-call state), off the replica's event loop."""

    def __init__(self, cfg: FluxGeneratorConfig | ShapesGeneratorConfig):
        device = "cuda" if cfg.serving.gpus_per_replica > 0 else "cpu"
        self._sampler = build_sampler(cfg, device)
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return self._sampler.name

    async def generate(self, prompt: str, seeds: list[int]) -> list[np.ndarray]:
        """uint8 HxWx3 images, one per seed; InputError for a prompt it cannot draw."""
        async with self._lock:
            images = await asyncio.to_thread(self._sampler, prompt, seeds)
        return [np.asarray(image.convert("RGB")) for image in images]


def service_application(cfg: ServiceConfig, token: str | None = None) -> serve.Application:
    """The ingress bound to the reward application (and the generator, if configured)."""
    generator = None
    if cfg.generator is not None:
        generator = GeneratorDeployment.options(**replica_options(cfg.generator.serving)).bind(
            cfg.generator
        )
    return SpatialScoreService.options(**replica_options(cfg.ingress)).bind(
        reward_application(cfg.reward), generator, cfg.limits, cfg.local_files_root,
        token_digest(token),
    )


def start_service(cfg: ServiceConfig, name: str = APP_NAME) -> str:
    """Run the service on the connected Ray cluster (see start_http_application) and return
    its base URL."""
    return start_http_application(cfg, service_application(cfg, auth_token(cfg)), name)
