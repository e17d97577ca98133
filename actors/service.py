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
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from PIL import Image
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from spatialrl import __version__
from spatialrl.actors.reward import RETRYABLE_ERRORS, reward_application
from spatialrl.config import ConfigError
from spatialrl.data.pairs import png_bytes
from spatialrl.errors import InputError
from spatialrl.generation import best_index, build_sampler, candidate_seeds
from spatialrl.service.admission import Admission, PixelBudget
from spatialrl.service.api import (
    BestOfNRequest,
    BestOfNResponse,
    Candidate,
    CompareRequest,
    CompareResponse,
    ImageRef,
    ProblemResponse,
    RequestError,
    Score,
    ScoreRequest,
    ScoreResponse,
    check_item_count,
    check_prompt,
    check_request_pixels,
    decode_pixels,
    probability_preferred,
    read_image,
)
from spatialrl.service.config import (
    FluxGeneratorConfig,
    LimitsConfig,
    ReplicaConfig,
    ServiceConfig,
    ShapesGeneratorConfig,
)

APP_NAME = "spatialscore"
log = logging.getLogger("ray.serve")

# Every /v1 route needs the bearer token when auth is on; probes and the OpenAPI description
# stay open.
PROTECTED_PREFIX = "/v1/"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
READY_TIMEOUT_S = 10.0
PROBLEMS = {status: {"model": ProblemResponse}
            for status in (400, 401, 403, 408, 411, 413, 415, 422, 429, 500, 503)}
# Describes the bearer token in the OpenAPI document; Guard checks it before the body is read.
BEARER = [Depends(HTTPBearer(auto_error=False))]

app = FastAPI(
    title="SpatialScore",
    version=__version__,
    description="Scores images for spatial correctness against their prompts (mu, sigma), "
    "compares two images, and picks the best of N generated candidates.",
)


@dataclass
class Guard:
    """What every request is checked against before its body is read."""

    max_body_bytes: int
    token_digest: str | None  # sha256 hex of the bearer token; None: no auth

    def check(self, request: Request) -> None:
        if self.token_digest is not None and request.url.path.startswith(PROTECTED_PREFIX):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            presented = hashlib.sha256(token.encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.token_digest):
                raise RequestError(401, "unauthorized", "missing or wrong bearer token")
        if request.method == "POST":
            if not request.headers.get("content-type", "").startswith("application/json"):
                raise RequestError(
                    415, "unsupported_media_type", "send JSON with Content-Type: application/json"
                )
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                raise RequestError(411, "length_required", "send a Content-Length header")
            if int(length) > self.max_body_bytes:
                raise RequestError(
                    413, "body_too_large",
                    f"body of {length} bytes, above the limit of {self.max_body_bytes}",
                )


class ServiceMetrics:
    def __init__(self):
        self.requests = metrics.Counter(
            "spatialrl_serve_requests", description="HTTP requests by endpoint and outcome "
            "(ok or the reason of the refusal)", tag_keys=("endpoint", "outcome"),
        )
        self.items = metrics.Counter(
            "spatialrl_serve_items", description="(prompt, image) items scored",
            tag_keys=("endpoint",),
        )
        self.latency_ms = metrics.Histogram(
            "spatialrl_serve_latency_ms", description="milliseconds per request stage",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("endpoint", "stage"),
        )
        self.items_in_flight = metrics.Gauge(
            "spatialrl_serve_items_in_flight",
            description="items sent to the reward deployment and not yet scored",
        )


def endpoint_of(request: Request) -> str:
    """The route path, or "other": one tag value per route keeps the metrics bounded."""
    path = request.url.path
    return path if path in request.app.openapi()["paths"] else "other"  # a cached schema


@app.middleware("http")
async def guard_and_record(request: Request, call_next):
    start = time.perf_counter()
    request.state.outcome, request.state.items, request.state.pixels = "ok", 0, 0
    service = serve.get_replica_context().servable_object
    try:
        service.guard.check(request)
        response = await admitted(request, call_next, service)
    except RequestError as err:  # refused before the route ran
        response = refusal(request, err)
    except Exception:
        log.exception("%s %s failed", request.method, request.url.path)
        response = refusal(request, RequestError(500, "internal_error", "see the server log"))
    elapsed_ms = 1000 * (time.perf_counter() - start)
    endpoint = endpoint_of(request)
    service.metrics.requests.inc(tags={"endpoint": endpoint, "outcome": request.state.outcome})
    service.metrics.latency_ms.observe(elapsed_ms, tags={"endpoint": endpoint, "stage": "total"})
    # Counts and sizes only: never a prompt, an image or a token.
    log.info(
        "%s %s status=%d outcome=%s items=%d pixels=%d body_bytes=%s ms=%.1f",
        request.method, endpoint, response.status_code, request.state.outcome,
        request.state.items, request.state.pixels, request.headers.get("content-length", "-"),
        elapsed_ms,
    )
    return response


async def admitted(request: Request, call_next, service: "SpatialScoreService"):
    """The route's answer once the request has a slot (Admission) and its whole body has
    arrived within limits.body_timeout_s: a slow client holds a slot for that long at most,
    and one client's excess is refused before it takes one."""
    if not request.url.path.startswith(PROTECTED_PREFIX):
        return await call_next(request)  # probes stay answerable under any load
    with service.admission.admit(request.client.host if request.client else "unknown"):
        if request.method == "POST":
            await read_body(request, service.limits.body_timeout_s)
        return await call_next(request)


async def read_body(request: Request, timeout_s: float) -> None:
    """Read the body (Starlette keeps it for the route) or refuse the request."""
    try:
        await asyncio.wait_for(request.body(), timeout_s)
    except TimeoutError:
        raise RequestError(
            408, "body_timeout", f"the body did not arrive within {timeout_s:g} s"
        ) from None
    except ClientDisconnect:
        raise RequestError(
            400, "client_disconnected", "the connection closed before the body arrived"
        ) from None


# Statuses that say "come back later", and when.
RETRY_AFTER_S = {429: 1, 503: 1}


def refusal(request: Request, err: RequestError) -> JSONResponse:
    request.state.outcome = err.reason
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.status in RETRY_AFTER_S:
        headers["Retry-After"] = str(RETRY_AFTER_S[err.status])
    body = ProblemResponse(error=err.reason, message=err.message).model_dump()
    return JSONResponse(body, status_code=err.status, headers=headers)


@app.exception_handler(RequestError)
async def _refuse(request: Request, err: RequestError) -> JSONResponse:
    return refusal(request, err)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the service's own answer format."""
    reason = HTTPStatus(err.status_code).name.lower()
    return refusal(request, RequestError(err.status_code, reason, str(err.detail)))


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's schema errors, worded without echoing the input (it may be an image)."""
    errors = err.errors()
    if bad_json := [e for e in errors if e["type"] == "json_invalid"]:
        where = bad_json[0]["loc"][-1]
        detail = bad_json[0].get("ctx", {}).get("error", "")
        problem = RequestError(400, "bad_json", f"the body is not valid JSON: {detail} at {where}")
    else:
        problem = RequestError(422, "invalid_request", "; ".join(map(_describe, errors)))
    return refusal(request, problem)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def cause_of(err: Exception) -> Exception:
    """The exception a deployment raised, without Ray's remote traceback around it."""
    return getattr(err, "cause", None) or err


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(Image.fromarray(image))).decode("ascii")


# serve.ingress pickles the app with its routes when it decorates the class, and a route
# keeps only the module globals defined by then: everything the methods use comes first.
@serve.deployment
@serve.ingress(app)
class SpatialScoreService:
    def __init__(
        self,
        reward: DeploymentHandle,
        generator: DeploymentHandle | None,
        limits: LimitsConfig,
        local_files_root: str | None,
        token_digest: str | None,
    ):
        self._reward, self._generator = reward, generator
        self.limits, self._local_files_root = limits, local_files_root
        # Read by the middleware through the replica context.
        self.guard = Guard(limits.max_body_bytes, token_digest)
        self.admission = Admission(limits)
        self.metrics = ServiceMetrics()
        self._pixels = PixelBudget(limits.max_pixels_in_flight, limits.pixel_wait_s)
        self._reward_input_pixels: list[int | None] = []  # asked once, on first use
        self._items_in_flight = 0

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The ingress answers."""
        return {"status": "ok"}

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

    @asynccontextmanager
    async def _decoded(
        self, request: Request, refs: list[tuple[str, ImageRef]]
    ) -> AsyncIterator[list[np.ndarray]]:
        """The request's images, decoded one by one and downscaled to what the reward reads;
        their pixels (as sent) count against the replica's budget until the block ends."""
        start = time.perf_counter()
        encoded = await asyncio.to_thread(
            lambda: [read_image(ref, where, self.limits, self._local_files_root)
                     for where, ref in refs]
        )
        request.state.pixels = check_request_pixels(encoded, self.limits)
        fit_pixels = await self._input_pixels()
        async with self._pixels.hold(request.state.pixels):
            images = await asyncio.to_thread(
                lambda: [decode_pixels(image, fit_pixels) for image in encoded]
            )
            self._observe(request, "decode", start)
            yield images

    async def _input_pixels(self) -> int | None:
        if not self._reward_input_pixels:
            self._reward_input_pixels.append(await self._reward.input_pixels.remote())
        return self._reward_input_pixels[0]

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

    def _set_in_flight(self, change: int) -> None:
        self._items_in_flight += change
        self.metrics.items_in_flight.set(self._items_in_flight)

    def _observe(self, request: Request, stage: str, start: float) -> None:
        self.metrics.latency_ms.observe(
            1000 * (time.perf_counter() - start),
            tags={"endpoint": endpoint_of(request), "stage": stage},
        )


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


def replica_options(cfg: ReplicaConfig) -> dict:
    return {
        "num_replicas": cfg.replicas,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": cfg.cpus_per_replica,
            "num_gpus": cfg.gpus_per_replica,
            "resources": dict(cfg.custom_resources),
        },
    }


def service_application(cfg: ServiceConfig, token: str | None = None) -> serve.Application:
    """The ingress bound to the reward application (and the generator, if configured)."""
    generator = None
    if cfg.generator is not None:
        generator = GeneratorDeployment.options(**replica_options(cfg.generator.serving)).bind(
            cfg.generator
        )
    token_digest = None if token is None else hashlib.sha256(token.encode()).hexdigest()
    return SpatialScoreService.options(**replica_options(cfg.ingress)).bind(
        reward_application(cfg.reward), generator, cfg.limits, cfg.local_files_root,
        token_digest,
    )


def auth_token(cfg: ServiceConfig) -> str | None:
    """The bearer token from the environment variable the config names."""
    if cfg.auth_token_env is None:
        return None
    token = os.environ.get(cfg.auth_token_env, "")
    if not token.strip():
        raise ConfigError(
            f"auth_token_env: the environment variable {cfg.auth_token_env} is unset or empty"
        )
    return token


def start_service(cfg: ServiceConfig, name: str = APP_NAME) -> str:
    """Run the service on the connected Ray cluster, wait until its replicas are up and
    return its base URL. Serve is started with cfg's host and port; if Serve already runs
    elsewhere this is an error rather than a service on an address nobody asked for."""
    token = auth_token(cfg)
    serve.start(http_options={
        "host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
    })
    running = serve.context._get_global_client().http_config
    if (running.host, running.port) != (cfg.host, cfg.port):
        raise ConfigError(
            f"host/port: Serve already runs on {running.host}:{running.port}, not "
            f"{cfg.host}:{cfg.port}"
        )
    serve.run(service_application(cfg, token), name=name, route_prefix="/")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}"
