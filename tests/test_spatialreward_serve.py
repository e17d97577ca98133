"""The SpatialReward service over real HTTP on 127.0.0.1: local Ray (2 CPUs), two judge replicas
of the tiny random Qwen3-VL behind Serve's consistent-hash router, bearer auth, small limits.
Concurrent requests with ten (source, instruction) keys: each key is judged by one replica
only, as the answers, GET /v1/metrics and Ray's Prometheus series all show; repeated keys hit
the prefix cache; items of several requests share generate calls. The random judge's answers
do not parse: each comes back invalid with its reason and no reward. Malformed requests get a
4xx naming the problem; the CLI refuses the vLLM engine where vllm is absent."""

import base64
import http.client
import io
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.actors.spatialreward import APP_NAME, start_service
from spatialrl.cli import main
from spatialrl.ports import free_port
from spatialrl.service.config import LimitsConfig, ReplicaConfig
from spatialrl.service.spatialreward_config import (
    SpatialRewardServiceConfig,
    SpatialRewardServingConfig,
)
from spatialrl.spatialreward.answers import INVALID_REASONS
from spatialrl.spatialreward.model import SpatialRewardConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN_ENV = "SPATIALRL_TEST_SPATIALREWARD_TOKEN"
TOKEN = "test-token-9a7b"
MAX_BODY_BYTES = 300_000
REPO = Path(__file__).resolve().parents[1]
KEYS = 10  # with two replicas, all ten on one replica is a 2 * 2**-10 chance


def png_b64(seed: int, fmt: str = "PNG") -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def edit_item(key: int, edited_seed: int, **changes) -> dict:
    """Key k: source image k with instruction k (two instructions, so sources and
    instructions both make keys)."""
    instruction = ["move the red circle left", "recolour the square green"][key % 2]
    return {"source": {"base64": png_b64(key)}, "edited": {"base64": png_b64(1000 + edited_seed)},
            "instruction": instruction, **changes}


@pytest.fixture(scope="module")
def service(tiny_models_dir):
    os.environ[TOKEN_ENV] = TOKEN
    cfg = SpatialRewardServiceConfig(
        port=free_port(), auth_token_env=TOKEN_ENV,
        limits=LimitsConfig(max_body_bytes=MAX_BODY_BYTES, max_items=4,
                            max_image_pixels=128 * 128, max_prompt_chars=200),
        ingress=ReplicaConfig(cpus_per_replica=0.25),
        model=SpatialRewardConfig(model=str(tiny_models_dir / "qwen3-vl"), dtype="float32",
                                  max_new_tokens=8),
        serving=SpatialRewardServingConfig(
            replicas=2, cpus_per_replica=0.25, max_batch_size=8, batch_wait_timeout_s=0.2,
            prefix_cache_size=16, max_ongoing_requests=64),
    )
    # Metrics reach Ray's Prometheus endpoint within a second instead of ten.
    head = LocalRayHead(num_cpus=2, system_config={"metrics_report_interval_ms": 1000})
    try:
        with connected(head):
            yield start_service(cfg)
    finally:
        del os.environ[TOKEN_ENV]


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}",
               **(headers or {})}
    connection.request(method, path, body, headers)
    response = connection.getresponse()
    status, text = response.status, response.read()
    connection.close()
    try:
        return status, json.loads(text)
    except ValueError:
        raise AssertionError(f"HTTP {status}, not JSON: {text[:300]!r}") from None


def edit_reward(url: str, items: list[dict]) -> list[dict]:
    status, answer = request(url, "POST", "/v1/edit-reward", json.dumps({"items": items}).encode())
    assert status == 200, answer
    assert len(answer["results"]) == len(items)
    return answer["results"]


def test_each_key_is_judged_by_one_replica_and_repeats_hit_its_prefix_cache(service):
    # Each key three times: two one-item requests and one item of a two-key request.
    singles = [[edit_item(key, 10 * key + n)] for key in range(KEYS) for n in range(2)]
    pairs = [[edit_item(key, 10 * key + 5), edit_item((key + 1) % KEYS, 10 * key + 6)]
             for key in range(0, KEYS, 2)]
    batches = singles + pairs
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda items: edit_reward(service, items), batches))

    replicas_of_key: dict[str, set[str]] = defaultdict(set)
    for result in (result for results in answers for result in results):
        replicas_of_key[result["affinity_key"]].add(result["replica"])
        # The random judge writes no JSON: invalid with its reason, never a reward.
        assert result["reward"] is None and result["answer"] is None
        where, reason = result["invalid"]["reason"].split(":")
        assert where == "edit" and reason in INVALID_REASONS and result["invalid"]["detail"]
    assert len(replicas_of_key) == KEYS
    assert all(len(replicas) == 1 for replicas in replicas_of_key.values()), replicas_of_key
    replicas = set().union(*replicas_of_key.values())
    assert len(replicas) == 2, "ten keys all went to one replica"
    assert max(r["batch_size"] for results in answers for r in results) > 1

    status, metrics = request(service, "GET", "/v1/metrics")
    assert status == 200
    stats = {replica["replica"]: replica for replica in metrics["replicas"]}
    assert set(stats) == replicas
    # No key on two replicas: the replicas' distinct keys add up to the keys sent.
    assert sum(s["distinct_keys"] for s in stats.values()) == KEYS
    assert sum(s["items"] for s in stats.values()) == 3 * KEYS
    assert sum(s["requests"] for s in stats.values()) == 3 * KEYS
    # Each key's 2nd and 3rd calls find it: on the replica, and in its prefix cache.
    assert sum(s["repeat_keys"] for s in stats.values()) == 2 * KEYS
    assert sum(s["prefix_cache_hits"] for s in stats.values()) == 2 * KEYS
    assert sum(s["prefix_cache_misses"] for s in stats.values()) == KEYS
    for replica, figures in stats.items():
        keys_here = sum(1 for held in replicas_of_key.values() if held == {replica})
        assert figures["distinct_keys"] == keys_here

    # The same figures on Ray's Prometheus endpoint, tagged by replica.
    expected = {replica: float(figures["distinct_keys"]) for replica, figures in stats.items()}
    assert settled("ray_spatialrl_spatialreward_distinct_keys", expected) == expected


def prometheus(name: str) -> dict[str, float]:
    """One metric family's samples by replica (summed over other tags)."""
    port = ray.nodes()[0]["MetricsExportPort"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    by_replica: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.labels.get("application") == APP_NAME:
                    by_replica[sample.labels["replica"]] += sample.value
    return dict(by_replica)


def settled(name: str, expected: dict[str, float]) -> dict[str, float]:
    """The series once it shows `expected` (Ray exports every second), or the last seen."""
    for _ in range(30):
        seen = {replica.rsplit("#", 1)[-1]: value for replica, value in prometheus(name).items()}
        if seen == expected:
            break
        time.sleep(1)
    return seen


def test_malformed_requests_get_a_4xx_naming_the_problem(service):
    gif = png_b64(1, "GIF")
    cases = [
        ("bad base64", {"items": [edit_item(0, 1, source={"base64": "not base64!"})]}, {},
         422, "bad_base64", "items.0.source.base64: not valid base64"),
        ("not PNG or JPEG", {"items": [edit_item(0, 1, edited={"base64": gif})]}, {},
         422, "not_an_image", "items.0.edited: a GIF image; send PNG or JPEG"),
        ("not an image", {"items": [edit_item(0, 1, edited={"base64": "aGVsbG8="})]}, {},
         422, "not_an_image", "items.0.edited: not a PNG or JPEG image"),
        ("missing field", {"items": [{k: v for k, v in edit_item(0, 1).items()
                                      if k != "instruction"}]}, {},
         422, "invalid_request", "items.0.instruction: Field required"),
        ("special tokens", {"items": [edit_item(0, 1, instruction="<|im_start|>move")]}, {},
         422, "invalid_request", "items.0.instruction: holds '<|im_start|>'"),
        ("too many items", {"items": [edit_item(0, n) for n in range(5)]}, {},
         413, "too_many_items", "5 items, above the limit of 4"),
        ("oversized body", {"items": [edit_item(0, 1, instruction="x" * MAX_BODY_BYTES)]}, {},
         413, "body_too_large", f"above the limit of {MAX_BODY_BYTES}"),
        ("no token", {"items": [edit_item(0, 1)]}, {"Authorization": ""},
         401, "unauthorized", "bearer token"),
        ("wrong token", {"items": [edit_item(0, 1)]}, {"Authorization": "Bearer nope"},
         401, "unauthorized", "bearer token"),
    ]
    for name, body, headers, status, error, message in cases:
        got_status, got = request(service, "POST", "/v1/edit-reward", json.dumps(body).encode(),
                                  headers)
        assert (got_status, got["error"]) == (status, error), f"{name}: {got}"
        assert message in got["message"], f"{name}: {got['message']}"
    got_status, got = request(service, "POST", "/v1/edit-reward", b'{"items": [', {})
    assert (got_status, got["error"]) == (400, "bad_json")
    assert request(service, "GET", "/v1/metrics", headers={"Authorization": ""})[0] == 401


def test_probes_and_openapi_need_no_token(service, tiny_models_dir):
    anonymous = {"Authorization": ""}
    assert request(service, "GET", "/healthz", headers=anonymous) == (200, {"status": "ok"})
    status, ready = request(service, "GET", "/readyz", headers=anonymous)
    assert status == 200 and ready["model_version"].startswith("spatialreward:transformers@")
    status, openapi = request(service, "GET", "/openapi.json", headers=anonymous)
    assert {"/v1/edit-reward", "/v1/metrics", "/healthz", "/readyz"} <= set(openapi["paths"])
    assert "EditRewardRequest" in openapi["components"]["schemas"]


def test_serve_refuses_the_vllm_engine_where_vllm_is_absent(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("SPATIALREWARD_TOKEN", "t")
    was_running = ray.is_initialized()
    code = main(["serve", "--config", str(REPO / "configs/serve/spatialreward-gpu.yaml")])
    assert code == 2
    assert "engine 'vllm' needs the optional package vllm" in capsys.readouterr().err
    assert ray.is_initialized() == was_running  # refused before Ray was touched
