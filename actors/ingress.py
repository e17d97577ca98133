"""What every HTTP service of this project shares, on Ray Serve: the bearer token, body and
slot limits checked before a body is read, refusals as JSON with a 4xx (or 5xx) naming the
problem, one log line and the metrics per request, and decoding images within the pixel
budgets. `hardened_app` makes a FastAPI app with all of it; an ingress deployment subclasses
`HardenedIngress` and adds its routes (spatialrl.actors.service: SpatialScore;
spatialrl.actors.spatialreward: SpatialReward).

Metrics (Ray exports them with a ray_ prefix): spatialrl_serve_requests (by endpoint and
outcome: ok or the refusal reason), spatialrl_serve_items, spatialrl_serve_latency_ms (by
endpoint and stage) and the gauge spatialrl_serve_items_in_flight (items sent to the model
deployment and not yet answered).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from spatialrl import __version__
from spatialrl.config import ConfigError
from spatialrl.service.admission import Admission, PixelBudget
from spatialrl.service.api import (
    ImageRef,
    ProblemResponse,
    RequestError,
    check_request_pixels,
    decode_pixels,
    read_image,
)
from spatialrl.service.config import HttpServiceConfig, LimitsConfig, ReplicaConfig

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


async def admitted(request: Request, call_next, service: "HardenedIngress"):
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


async def _refuse(request: Request, err: RequestError) -> JSONResponse:
    return refusal(request, err)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the service's own answer format."""
    reason = HTTPStatus(err.status_code).name.lower()
    return refusal(request, RequestError(err.status_code, reason, str(err.detail)))


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



async def healthz() -> dict[str, str]:
    """The ingress answers."""
    return {"status": "ok"}


def hardened_app(title: str, description: str) -> FastAPI:
    """A FastAPI app with the guard, the refusals in JSON, the request log and /healthz."""
    app = FastAPI(title=title, version=__version__, description=description)
    app.middleware("http")(guard_and_record)
    app.add_exception_handler(RequestError, _refuse)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.get("/healthz")(healthz)
    return app


class HardenedIngress:
    """State that the middleware reads from the replica (guard, admission, metrics) and the
    image decoding within the pixel budgets. `model` is the deployment that reads the
    images: it answers `input_pixels()`, the most pixels it reads of one image."""

    def __init__(
        self,
        model: DeploymentHandle,
        limits: LimitsConfig,
        local_files_root: str | None,
        token_digest: str | None,
    ):
        self._model = model
        self.limits, self._local_files_root = limits, local_files_root
        self.guard = Guard(limits.max_body_bytes, token_digest)
        self.admission = Admission(limits)
        self.metrics = ServiceMetrics()
        self._pixels = PixelBudget(limits.max_pixels_in_flight, limits.pixel_wait_s)
        self._model_input_pixels: list[int | None] = []  # asked once, on first use
        self._items_in_flight = 0

    @asynccontextmanager
    async def _decoded(
        self, request: Request, refs: list[tuple[str, ImageRef]]
    ) -> AsyncIterator[list[np.ndarray]]:
        """The request's images, decoded one by one and downscaled to what the model reads;
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
        if not self._model_input_pixels:
            self._model_input_pixels.append(await self._model.input_pixels.remote())
        return self._model_input_pixels[0]

    def _set_in_flight(self, change: int) -> None:
        self._items_in_flight += change
        self.metrics.items_in_flight.set(self._items_in_flight)

    def _observe(self, request: Request, stage: str, start: float) -> None:
        self.metrics.latency_ms.observe(
            1000 * (time.perf_counter() - start),
            tags={"endpoint": endpoint_of(request), "stage": stage},
        )


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


def auth_token(cfg: HttpServiceConfig) -> str | None:
    """The bearer token from the environment variable the config names."""
    if cfg.auth_token_env is None:
        return None
    token = os.environ.get(cfg.auth_token_env, "")
    if not token.strip():
        raise ConfigError(
            f"auth_token_env: the environment variable {cfg.auth_token_env} is unset or empty"
        )
    return token


def token_digest(token: str | None) -> str | None:
    """What the guard compares against: replicas never hold the token itself."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def start_http_application(
    cfg: HttpServiceConfig, application: serve.Application, name: str
) -> str:
    """Run `application` at "/" on the connected Ray cluster, wait until its replicas are up
    and return its base URL. Serve is started with cfg's host and port; if Serve already runs
    elsewhere this is an error rather than a service on an address nobody asked for."""
    serve.start(http_options={
        "host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
    })
    running = serve.context._get_global_client().http_config
    if (running.host, running.port) != (cfg.host, cfg.port):
        raise ConfigError(
            f"host/port: Serve already runs on {running.host}:{running.port}, not "
            f"{cfg.host}:{cfg.port}"
        )
    serve.run(application, name=name, route_prefix="/")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}"
