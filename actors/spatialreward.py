"""SpatialReward as an HTTP service on Ray Serve.

    HTTP (Serve's proxy, 127.0.0.1 unless asked otherwise)
      -> SpatialRewardService: FastAPI ingress with the project's hardening
         (spatialrl.actors.ingress: token, limits, 4xx in JSON, no pickle on the wire)
           -> SpatialRewardDeployment: batched generation (serve.batch) on an engine
              (spatialrl.spatialreward.engines: transformers here, vLLM on GPU clusters)

Endpoints: POST /v1/edit-reward ({source, edited, instruction} items, images base64 PNG or
JPEG), GET /v1/metrics (each model replica's figures), /healthz, /readyz, /openapi.json.

Routing affinity: the ingress hashes each item's source pixels and instruction
(`affinity_key`) and calls the model deployment with that hash as the handle's session_id;
the deployment routes with Ray Serve's ConsistentHashRouter (request_router_config), which
maps a session id to one replica on a hash ring. Items with the same source and instruction
therefore reach the replica that holds their prefix in its cache. Serve's prefix-aware LLM
router (ray.serve.llm PrefixCacheAffinityRouter) matches on prompt text of OpenAI-style
requests and trades affinity for load; the edit prompts here share images, not text, and
the point is a deterministic key -> replica map. `serving.fallback_replicas` lets a key
spill to the next replicas on the ring when its own is full (0: strict affinity).

Metrics, per model replica: on Ray's Prometheus endpoint (tagged with the replica by Serve)
spatialrl_spatialreward_items, _requests, _repeat_keys, _prefix_cache (outcome hit or miss)
and the gauge _distinct_keys; as JSON from GET /v1/metrics, and per item in each answer
(replica, prefix_cache_hit, batch_size).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import contextvars
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from fastapi import Request
from PIL import Image
from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponse

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
from spatialrl.actors.reward import RETRYABLE_ERRORS
from spatialrl.service.api import (
    EditAnswers,
    EditReward,
    EditRewardRequest,
    EditRewardResponse,
    InvalidAnswer,
    ProblemResponse,
    ReplicaStats,
    RequestError,
    ServiceMetricsResponse,
    check_item_count,
    check_prompt,
)
from spatialrl.service.config import LimitsConfig
from spatialrl.service.spatialreward_config import (
    SpatialRewardServiceConfig,
    SpatialRewardServingConfig,
    model_version,
)
from spatialrl.spatialreward.engines import EditItem, ScoredEdit, affinity_key, build_engine

APP_NAME = "spatialreward"
# Serve's consistent-hash router on the handle's session_id (Ray 2.60: experimental module).
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


class ReplicaMetrics:
    def __init__(self):
        self.items = metrics.Counter("spatialrl_spatialreward_items",
                                     description="items judged by this replica")
        self.requests = metrics.Counter(
            "spatialrl_spatialreward_requests",
            description="calls (one per affinity key of an HTTP request) this replica served")
        self.repeat_keys = metrics.Counter(
            "spatialrl_spatialreward_repeat_keys",
            description="calls whose affinity key this replica had served before")
        self.distinct_keys = metrics.Gauge(
            "spatialrl_spatialreward_distinct_keys",
            description="affinity keys this replica has served")
        self.prefix_cache = metrics.Counter(
            "spatialrl_spatialreward_prefix_cache",
            description="prefix cache lookups by outcome (hit, miss)", tag_keys=("outcome",))


def judgement(scored: ScoredEdit, key: str, replica: str, batch_size: int) -> EditReward:
    result = scored.result
    answer = invalid = None
    if result.valid:
        answer = EditAnswers(edit=result.edit_answer.answer, quality=result.quality_answer.answer)
    else:
        failed = result.edit_answer if result.reason.startswith("edit:") else \
            result.quality_answer
        invalid = InvalidAnswer(reason=result.reason, detail=failed.detail)
    return EditReward(reward=result.reward, answer=answer, invalid=invalid, affinity_key=key,
                      replica=replica, prefix_cache_hit=scored.prefix_hit,
                      batch_size=batch_size)


@serve.deployment
class SpatialRewardDeployment:
    """One judge replica: the engine behind a batch queue; items of every caller share
    generate calls (up to serving.max_batch_size, padded)."""

    def __init__(self, cfg: SpatialRewardServiceConfig):
        serving = cfg.serving
        device = "cuda" if serving.gpus_per_replica > 0 else "cpu"
        self._engine = build_engine(serving.engine, cfg.model, device, serving.prefix_cache_size)
        self._version = model_version(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._metrics = ReplicaMetrics()
        self._keys: set[str] = set()
        self._requests = self._items = self._repeat_keys = 0
        self._judge_batch.set_max_batch_size(serving.max_batch_size)
        self._judge_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)

    def version(self) -> str:
        return self._version

    def input_pixels(self) -> int | None:
        return self._engine.input_pixels

    async def judge(
        self, key: str, source: np.ndarray, instruction: str, edited: list[np.ndarray]
    ) -> dict:
        """The judgements of the edits of one (source, instruction), whose affinity key is
        `key`, in order, and this replica's stats after them."""
        self._count_call(key, len(edited))
        source_image = Image.fromarray(source)
        items = [EditItem(source_image, Image.fromarray(image), instruction, key)
                 for image in edited]
        judged = await asyncio.gather(*map(self._judge_batch, items))
        for index, outcome in enumerate(judged):
            if isinstance(outcome, Exception):
                raise RuntimeError(f"edit {index}: {outcome!r}") from outcome
        self._count_cache(judged)
        return {"results": [judgement(scored, key, self._replica, size)
                            for scored, size in judged],
                "stats": self.stats(), "version": self._version}

    def stats(self) -> ReplicaStats:
        cache = self._engine.prefix_cache
        return ReplicaStats(
            replica=self._replica, requests=self._requests, items=self._items,
            distinct_keys=len(self._keys), repeat_keys=self._repeat_keys,
            prefix_cache_hits=cache.hits if cache else 0,
            prefix_cache_misses=cache.misses if cache else 0,
            prefix_cache_entries=len(cache) if cache else 0,
        )

    def _count_call(self, key: str, items: int) -> None:
        self._requests += 1
        self._items += items
        if key in self._keys:
            self._repeat_keys += 1
            self._metrics.repeat_keys.inc()
        self._keys.add(key)
        self._metrics.requests.inc()
        self._metrics.items.inc(items)
        self._metrics.distinct_keys.set(len(self._keys))

    def _count_cache(self, judged: list[tuple[ScoredEdit, int]]) -> None:
        for scored, _ in judged:
            self._metrics.prefix_cache.inc(tags={"outcome": "hit" if scored.prefix_hit
                                                 else "miss"})

    @serve.batch
    async def _judge_batch(
        self, items: list[EditItem]
    ) -> list[tuple[ScoredEdit, int] | Exception]:
        return await self._run(items)

    async def _run(self, items: list[EditItem]) -> list[tuple[ScoredEdit, int] | Exception]:
        try:
            # A worker thread keeps the event loop filling the next batch meanwhile.
            scored = await asyncio.to_thread(self._engine.score, items)
        except Exception as error:
            if len(items) == 1:
                return [error]
            # One item that breaks generation must not fail the other callers' items.
            return [(await self._run([item]))[0] for item in items]
        return [(one, len(items)) for one in scored]


def progress(stats: ReplicaStats) -> tuple[int, int]:
    return stats.requests, stats.prefix_cache_hits + stats.prefix_cache_misses


app = hardened_app(
    "SpatialReward",
    "Judges image edits: where the edit is, how well it follows the instruction, and its "
    "quality, as the SpatialReward model answers them, with the scalar reward.",
)


# serve.ingress pickles the app with its routes when it decorates the class, and a route
# keeps only the module globals defined by then: everything the methods use comes first.
@serve.deployment
@serve.ingress(app)
class SpatialRewardService(HardenedIngress):
    def __init__(
        self, model: DeploymentHandle, limits: LimitsConfig, local_files_root: str | None,
        token_digest: str | None,
    ):
        super().__init__(model, limits, local_files_root, token_digest)
        self._replica_stats: dict[str, ReplicaStats] = {}

    @app.get("/readyz", responses={503: {"model": ProblemResponse}})
    async def readyz(self) -> dict[str, str]:
        """The model deployment answers: the judge is loaded."""
        try:
            version = await asyncio.wait_for(self._model.version.remote(), READY_TIMEOUT_S)
        except Exception as err:
            raise RequestError(503, "not_ready", f"not ready: {cause_of(err)!r}") from None
        return {"status": "ready", "model_version": version}

    @app.get("/v1/metrics", dependencies=BEARER)
    async def replica_metrics(self) -> ServiceMetricsResponse:
        """Each model replica's figures, as of its latest answer to this ingress."""
        return ServiceMetricsResponse(
            replicas=[self._replica_stats[r] for r in sorted(self._replica_stats)])

    @app.post("/v1/edit-reward", responses=PROBLEMS, dependencies=BEARER)
    async def edit_reward(self, body: EditRewardRequest, request: Request) -> EditRewardResponse:
        """The judgement of each (source, edited, instruction) item, in order: the parsed
        answers and the reward, or `invalid` with its reason."""
        check_item_count(len(body.items), self.limits)
        for index, item in enumerate(body.items):
            check_prompt(item.instruction, f"items.{index}.instruction", self.limits)
        refs = [ref for i, item in enumerate(body.items)
                for ref in ((f"items.{i}.source", item.source), (f"items.{i}.edited", item.edited))]
        async with self._decoded(request, refs) as images:
            return await self._judge(request, [item.instruction for item in body.items],
                                     images[0::2], images[1::2])

    async def _judge(
        self, request: Request, instructions: list[str], sources: Sequence[np.ndarray],
        edited: Sequence[np.ndarray],
    ) -> EditRewardResponse:
        """One call per affinity key, routed by it; answers back in item order."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (source, instruction) in enumerate(zip(sources, instructions, strict=True)):
            groups[affinity_key(source, instruction)].append(index)
        request.state.items = len(instructions)
        self._set_in_flight(len(instructions))
        try:
            answers = await asyncio.gather(*[
                self._call(key, sources[indices[0]], instructions[indices[0]],
                           [edited[i] for i in indices])
                for key, indices in groups.items()
            ])
        except RETRYABLE_ERRORS:
            raise RequestError(503, "model_unavailable", "no model replica answered; retry") \
                from None
        except RuntimeError as err:  # generation failed on an item; the message names it
            raise RequestError(500, "judging_failed", str(cause_of(err))) from None
        finally:
            self._set_in_flight(-len(instructions))
        results: list[EditReward | None] = [None] * len(instructions)
        for indices, answer in zip(groups.values(), answers, strict=True):
            self._keep_latest(answer["stats"])
            for index, result in zip(indices, answer["results"], strict=True):
                results[index] = result
        self.metrics.items.inc(len(instructions), tags={"endpoint": endpoint_of(request)})
        return EditRewardResponse(model_version=answers[0]["version"], results=results)

    def _keep_latest(self, stats: ReplicaStats) -> None:
        """A replica's answers to concurrent requests can arrive in any order: keep its
        latest snapshot, the one that has counted the most (its counters only grow)."""
        held = self._replica_stats.get(stats.replica)
        if held is None or progress(stats) >= progress(held):
            self._replica_stats[stats.replica] = stats

    def _call(self, key: str, source: np.ndarray, instruction: str, edited: list[np.ndarray]
              ) -> DeploymentResponse:
        """The judge call of one affinity key, routed by it (the handle's session_id). Made
        in an empty context: calls made in the HTTP request's context share its internal
        request id, and Serve's router (Ray 2.60) matches routing answers by that id, so
        the second of two concurrent calls never got a replica."""
        call = self._model.options(session_id=key).judge.remote
        return contextvars.Context().run(call, key, source, instruction, edited)


def model_application(cfg: SpatialRewardServiceConfig) -> serve.Application:
    """The judge deployment, routed by affinity key (see the module docstring)."""
    serving: SpatialRewardServingConfig = cfg.serving
    router = RequestRouterConfig(
        request_router_class=CONSISTENT_HASH_ROUTER,
        request_router_kwargs={"num_fallback_replicas": serving.fallback_replicas},
    )
    return SpatialRewardDeployment.options(
        **replica_options(serving), request_router_config=router,
        # One access-log line per call would repeat the ingress's own line.
        logging_config={"enable_access_log": False},
    ).bind(cfg)


def service_application(cfg: SpatialRewardServiceConfig, token: str | None = None
                        ) -> serve.Application:
    return SpatialRewardService.options(**replica_options(cfg.ingress)).bind(
        model_application(cfg), cfg.limits, cfg.local_files_root, token_digest(token))


def start_service(cfg: SpatialRewardServiceConfig, name: str = APP_NAME) -> str:
    """Run the service on the connected Ray cluster and return its base URL."""
    return start_http_application(cfg, service_application(cfg, auth_token(cfg)), name)
