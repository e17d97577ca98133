"""The SpatialScore service over real HTTP on 127.0.0.1: one Serve application for the module
(tiny random SpatialScore, tiny FLUX + a LoRA as the best-of-N generator, bearer auth, small
limits). Scores equal the in-process scorer, concurrent requests share reward batches (seen in
the answers and in Ray Serve's batch-size metric), every bad input gets a 4xx naming it while
good requests in flight succeed and no replica restarts, logs carry no payloads."""

import base64
import http.client
import io
import json
import os
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import ray
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.actors.service import APP_NAME, GeneratorDeployment, start_service
from spatialrl.config import PolicyModelConfig, RewardConfig
from spatialrl.data.grammar import sample_scene, scene_to_prompt
from spatialrl.data.perturb import perturb, perturbable_indices
from spatialrl.data.render import render
from spatialrl.errors import InputError
from spatialrl.generation import LORA_WEIGHTS_FILE, FluxCandidates
from spatialrl.model_checksum import files_checksum
from spatialrl.ports import free_port
from spatialrl.reward_functions import build_reward, reward_version
from spatialrl.service.api import ImageRef, decode_pixels, probability_preferred, read_image
from spatialrl.service.client import ServiceError, SpatialScoreClient
from spatialrl.service.config import (
    FluxGeneratorConfig,
    LimitsConfig,
    ReplicaConfig,
    ServiceConfig,
    ShapesGeneratorConfig,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN_ENV = "SPATIALRL_TEST_SERVICE_TOKEN"
TOKEN = "test-token-5c1e"
LIMITS = LimitsConfig(
    max_body_bytes=1_500_000, max_items=8, max_image_pixels=128 * 128, max_prompt_chars=300,
    max_best_of=4,
    # Above Qwen2.5-VL's own limit (200), so that an image the model refuses gets through.
    max_aspect_ratio=1000,
    # One request of 3 images of 128x128 fills the pixels in flight; 16 of 64x64 fit.
    max_request_pixels=72 * 32 * 32, max_pixels_in_flight=72 * 32 * 32, pixel_wait_s=0.2,
    body_timeout_s=5.0, max_requests_per_client=48, max_requests_in_flight=100,
)
TINY_INPUT_PIXELS = 112 * 112  # the tiny Qwen2.5-VL's image processor reads no more
BATCH_WAIT_S = 0.5  # long enough for concurrent requests to meet in one batch


def png(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def files_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("served-files")


@pytest.fixture(scope="module")
def service_config(tiny_spatialscore_path, tiny_flux_lora_path, tiny_flux_path,
                   files_root) -> ServiceConfig:
    return ServiceConfig(
        port=free_port(), auth_token_env=TOKEN_ENV, local_files_root=str(files_root),
        limits=LIMITS, ingress=ReplicaConfig(max_ongoing_requests=160),
        reward=RewardConfig(
            kind="spatialscore", spatialscore_path=str(tiny_spatialscore_path), serving={
                "max_batch_size": 8, "batch_wait_timeout_s": BATCH_WAIT_S,
                "gpus_per_replica": 0, "cpus_per_replica": 0.25}),
        generator=FluxGeneratorConfig(
            model=PolicyModelConfig(pretrained=str(tiny_flux_path), dtype="float32",
                                    gradient_checkpointing=False),
            lora_path=str(tiny_flux_lora_path), height=64, width=64, num_steps=4,
            max_sequence_length=32,
            serving={"cpus_per_replica": 0.25}),
    )


@pytest.fixture(scope="module")
def service(service_config):
    os.environ[TOKEN_ENV] = TOKEN
    # Metrics reach Ray's Prometheus endpoint within a second instead of ten.
    head = LocalRayHead(num_cpus=2, system_config={"metrics_report_interval_ms": 1000})
    try:
        with connected(head):
            yield start_service(service_config)
    finally:
        del os.environ[TOKEN_ENV]


@pytest.fixture(scope="module")
def client(service) -> SpatialScoreClient:
    return SpatialScoreClient(service, token=TOKEN)


@pytest.fixture(scope="module")
def reward(service_config):
    return build_reward(service_config.reward)


@pytest.fixture(scope="module")
def scenes():
    """Eight (prompt, correct render, render with one relation reversed)."""
    rng = np.random.default_rng(0)
    out = []
    while len(out) < 8:
        scene = sample_scene(rng, num_objects=3, num_relations=2)
        if perturbable_indices(scene):
            out.append((scene_to_prompt(scene), render(scene, 64, rng),
                        render(perturb(scene, 1, rng)[0], 64, rng)))
    return out


def post(url: str, path: str, body: bytes, headers: dict | None = None,
         chunked: bool = False) -> tuple[int, dict]:
    """A raw POST (the client never sends malformed bodies); the answer's status and JSON."""
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}",
               **(headers or {})}
    if chunked:
        connection.request("POST", path, iter([body]), headers, encode_chunked=True)
    else:
        connection.request("POST", path, body, headers)
    response = connection.getresponse()
    status, text = response.status, response.read()
    connection.close()
    return status, json.loads(text)


def score_body(prompt, image: dict, **extra) -> bytes:
    return json.dumps({"items": [{"prompt": prompt, "image": image}], **extra}).encode()


def test_scores_equal_the_in_process_scorer_exactly(client, scenes, reward, service_config):
    prompts = [prompt for prompt, _, _ in scenes]
    # PNG everywhere but one JPEG item: the server must see the pixels a JPEG decoder gives.
    files = [png(good) for _, good, _ in scenes]
    files[3] = png(scenes[3][1], "JPEG")
    answer = client.score(list(zip(prompts, files, strict=True)))

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    expected = reward(decoded, prompts)  # the same 8 items, one batch, in the same order
    assert [s.mu for s in answer.scores] == expected.mu.tolist()
    assert [s.sigma for s in answer.scores] == expected.sigma.tolist()
    assert [s.batch_size for s in answer.scores] == [8] * 8
    assert answer.model_version == reward_version(service_config.reward)
    assert answer.model_version.startswith("spatialscore@")


def test_compare_answers_both_scores_and_the_preference(client, scenes, reward):
    prompt, good, bad = scenes[0]
    answer = client.compare(prompt, good, bad)
    expected = reward([good, bad], [prompt, prompt])
    assert [answer.a.mu, answer.b.mu] == expected.mu.tolist()
    assert answer.preferred == ("a" if answer.a.mu > answer.b.mu else "b")
    assert answer.probability_a_preferred == probability_preferred(
        answer.a.mu, answer.a.sigma, answer.b.mu, answer.b.sigma)


def test_a_file_url_under_the_served_folder_scores_like_base64(client, scenes, files_root):
    prompt, good, _ = scenes[1]
    path = files_root / "good.png"
    good.save(path)
    by_url = client.score_one(prompt, ImageRef(url=path.as_uri()))
    by_bytes = client.score_one(prompt, path)  # the client reads the file and sends base64
    assert by_url.mu == by_bytes.mu and by_url.sigma == by_bytes.sigma


def test_exif_orientation_and_camera_jpegs_are_scored_as_a_viewer_shows_them(client, scenes):
    """A JPEG stored mirrored with EXIF orientation 2, and a two-frame MPO, score exactly as
    the upright picture (the MPO's first frame) does."""
    prompt, good, _ = scenes[4]
    upright = png(good, "JPEG")
    shown = np.asarray(Image.open(io.BytesIO(upright)))  # what the server decodes upright
    exif = Image.Exif()
    exif[0x0112] = 2  # Orientation: mirrored horizontally
    mirrored = io.BytesIO()
    Image.fromarray(shown[:, ::-1]).save(mirrored, "JPEG", quality=100, exif=exif)
    camera = io.BytesIO()
    Image.fromarray(shown).save(camera, "MPO", quality=100, save_all=True,
                                append_images=[Image.new("RGB", good.size)])
    expected = client.score_one(prompt, png(shown)).mu
    raw_pixels = client.score_one(prompt, png(shown[:, ::-1])).mu
    assert raw_pixels != expected  # the test can tell the orientations apart
    assert client.score_one(prompt, mirrored.getvalue()).mu == pytest.approx(expected, abs=1e-3)
    assert client.score_one(prompt, camera.getvalue()).mu == pytest.approx(expected, abs=1e-3)


def scrape(name: str, labels: dict[str, str]) -> dict[str, float]:
    """Samples of one metric family from Ray's Prometheus endpoint, by sample name (+ le)."""
    port = ray.nodes()[0]["MetricsExportPort"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                key = sample.name + (f"[le={sample.labels['le']}]" if "le" in sample.labels else "")
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def settled(name: str, labels: dict[str, str], keys: list[str], until=None) -> dict[str, float]:
    """Scrape until `until(samples)` holds, or (without it) two scrapes agree."""
    previous = None
    for _ in range(40):
        samples = scrape(name, labels)
        values = [samples.get(k, 0.0) for k in keys]
        if (until(samples) if until else values == previous):
            return samples
        previous = values
        time.sleep(1.5)
    raise AssertionError(f"{name} {labels} did not settle: {samples}")


BATCH_SIZES = ("ray_serve_actual_batch_size",
               {"application": APP_NAME, "deployment": "RewardDeployment"})
BATCH_COUNT = "ray_serve_actual_batch_size_count"


def test_concurrent_requests_share_batches_and_the_batch_size_metric_shows_it(
        client, scenes, reward):
    before = settled(*BATCH_SIZES, [BATCH_COUNT])
    requests = [(prompt, good) for prompt, good, _ in scenes] * 2  # 16 one-item requests
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda item: client.score_one(*item), requests))
    sizes = [answer.batch_size for answer in answers]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    for (prompt, image), answer in zip(requests, answers, strict=True):
        alone = reward([image], [prompt])  # other batch mates may pad differently
        assert answer.mu == pytest.approx(alone.mu.item(), abs=1e-5)

    # A batch of size s answered s one-item requests: the metric must count the same batches.
    batches = round(sum(1 / size for size in sizes))
    after = settled(*BATCH_SIZES, [BATCH_COUNT],
                    until=lambda s: s.get(BATCH_COUNT, 0) >= before[BATCH_COUNT] + batches)
    assert after[BATCH_COUNT] - before[BATCH_COUNT] == batches < len(requests)
    for le in ("1.0", "2.0", "4.0", "8.0"):
        key = f"ray_serve_actual_batch_size_bucket[le={le}]"
        at_most = round(sum(1 / size for size in sizes if size <= float(le)))
        assert after.get(key, 0) - before.get(key, 0) == at_most, key
    settled("ray_spatialrl_serve_items", {"endpoint": "/v1/score"}, [],
            until=lambda s: s.get("ray_spatialrl_serve_items_total", 0) >= len(requests))
    # The gauge reaches Prometheus a report interval after it changes: a scrape right after
    # the answers may still show requests in flight. Every request answered, it must fall to
    # 0 (a leaked count never does, and settled() then fails naming the last value).
    settled("ray_spatialrl_serve_items_in_flight", {}, [],
            until=lambda s: s.get("ray_spatialrl_serve_items_in_flight", -1) == 0)


def bad_cases(scenes, files_root) -> list[tuple]:
    """(name, path, body, raw-post options, status, error, message regex)."""
    prompt, good, _ = scenes[0]
    image = {"base64": b64(png(good))}
    noise = np.random.default_rng(0).integers(0, 256, (130, 130, 3), dtype=np.uint8)
    flat = {"prompt": prompt, "image": {"base64": b64(png(np.zeros((128, 128, 3), np.uint8)))}}
    gif = png(good, "GIF")
    return [
        ("malformed JSON", "/v1/score", b'{"items": [', {}, 400, "bad_json", "not valid JSON"),
        ("bad base64", "/v1/score", score_body(prompt, {"base64": "@@not base64@@"}), {}, 422,
         "bad_base64", r"items\.0\.image\.base64: not valid base64"),
        ("not an image", "/v1/score", score_body(prompt, {"base64": b64(b"plain text")}), {},
         422, "not_an_image", r"items\.0\.image: not a PNG or JPEG image"),
        ("a GIF", "/v1/score", score_body(prompt, {"base64": b64(gif)}), {}, 422,
         "not_an_image", "a GIF image; send PNG or JPEG"),
        ("truncated PNG", "/v1/score", score_body(prompt, {"base64": b64(png(good)[:200])}),
         {}, 422, "not_an_image", r"items\.0\.image: unreadable image"),
        ("oversized image", "/v1/score", score_body(prompt, {"base64": b64(png(noise))}), {},
         413, "image_too_large", "130x130 = 16900 pixels, above the limit of 16384"),
        # Five flat images: a small body, many decoded pixels.
        ("too many pixels", "/v1/score", json.dumps({"items": [flat] * 5}).encode(), {}, 413,
         "too_many_pixels", "81920 pixels in all, above the limit of 73728 per request"),
        ("aspect ratio", "/v1/score",
         score_body(prompt, {"base64": b64(png(noise[:1].repeat(11, 1)[:, :1001]))}), {},
         422, "bad_aspect_ratio", "1001x1 has an aspect ratio above 1000"),
        ("empty prompt", "/v1/score", score_body("", image), {}, 422, "invalid_request",
         r"items\.0\.prompt: empty prompt"),
        ("blank prompt", "/v1/score", score_body("  \n", image), {}, 422, "invalid_request",
         r"items\.0\.prompt: empty prompt"),
        ("prompt not text", "/v1/score", score_body(5, image), {}, 422, "invalid_request",
         r"items\.0\.prompt: Input should be a valid string"),
        # A prompt must never plant the reward token or chat markup, nor break the tokenizer.
        ("reward token in the prompt", "/v1/score", score_body(f"{prompt} <|Reward|>", image),
         {}, 422, "invalid_request", r"items\.0\.prompt: holds '<\|Reward\|>': special tokens"),
        ("chat markup in the prompt", "/v1/compare", json.dumps(
            {"prompt": f"<|im_start|>{prompt}", "image_a": image, "image_b": image}).encode(),
         {}, 422, "invalid_request", r"prompt: holds '<\|im_start\|>'"),
        ("lone surrogate", "/v1/score", score_body(f"{prompt} \ud800", image), {}, 422,
         "invalid_request", r"items\.0\.prompt: not valid Unicode text \(a lone surrogate"),
        ("NUL byte in a file URL", "/v1/score",
         score_body(prompt, {"url": f"{files_root.as_uri()}/good.png%00.txt"}), {}, 422,
         "bad_url", r"items\.0\.image\.url: not a usable file path \(embedded null byte\)"),
        ("seed beyond 64 bits", "/v1/best-of-n",
         json.dumps({"prompt": prompt, "n": 2, "seed": 2**64 - 1}).encode(), {}, 422,
         "invalid_request", "seed: Input should be less than or equal to 9223372036854775807"),
        ("long prompt", "/v1/score", score_body("a" * 301, image), {}, 422, "prompt_too_long",
         "301 characters, above the limit of 300"),
        ("no items", "/v1/score", b'{"items": []}', {}, 422, "invalid_request",
         "items: List should have at least 1 item"),
        ("too many items", "/v1/score",
         json.dumps({"items": [{"prompt": prompt, "image": image}] * 9}).encode(), {}, 413,
         "too_many_items", "9 items, above the limit of 8"),
        ("unknown key", "/v1/score", score_body(prompt, image, mode="fast"), {}, 422,
         "invalid_request", "mode: Extra inputs are not permitted"),
        ("two image sources", "/v1/score",
         score_body(prompt, {**image, "url": (files_root / "x.png").as_uri()}), {}, 422,
         "invalid_request", "give exactly one of 'base64' and 'url'"),
        ("file outside the folder", "/v1/score", score_body(prompt, {"url": "file:///etc/hosts"}),
         {}, 403, "outside_local_files_root", "outside the served folder"),
        ("missing file", "/v1/score",
         score_body(prompt, {"url": (files_root / "missing.png").as_uri()}), {}, 422,
         "file_not_found", "no such file"),
        ("http URL", "/v1/score", score_body(prompt, {"url": "http://127.0.0.1:9/x.png"}), {},
         422, "bad_url", "only file:// URLs"),
        ("body too large", "/v1/score", score_body(prompt, image, pad=" " * 1_500_000), {}, 413,
         "body_too_large", "above the limit of 1500000"),
        ("no Content-Length", "/v1/score", score_body(prompt, image), {"chunked": True}, 411,
         "length_required", "Content-Length"),
        ("not JSON content", "/v1/score", score_body(prompt, image),
         {"headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type",
         "Content-Type: application/json"),
        ("unknown path", "/v1/scores", score_body(prompt, image), {}, 404, "not_found",
         "Not Found"),
        ("no token", "/v1/score", score_body(prompt, image),
         {"headers": {"Authorization": ""}}, 401, "unauthorized", "bearer token"),
        ("wrong token", "/v1/score", score_body(prompt, image),
         {"headers": {"Authorization": "Bearer nope"}}, 401, "unauthorized", "bearer token"),
        ("compare without image_b", "/v1/compare",
         json.dumps({"prompt": prompt, "image_a": image}).encode(), {}, 422, "invalid_request",
         "image_b: Field required"),
        ("best of too many", "/v1/best-of-n", json.dumps({"prompt": prompt, "n": 5}).encode(), {},
         422, "too_many_candidates", "n: 5 candidates, above the limit of 4"),
        # Valid for the API, refused by Qwen2.5-VL (aspect ratio above 200): fails alone.
        ("image the model refuses", "/v1/score",
         score_body(prompt, {"base64": b64(png(noise[:1, :1].repeat(300, 1)))}), {}, 500,
         "scoring_failed", "item 0: .*aspect ratio"),
    ]


def replica_names() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")}


def test_bad_requests_get_a_clear_4xx_while_good_ones_in_flight_succeed(
        service, client, scenes, files_root, reward):
    replicas = replica_names()
    cases = bad_cases(scenes, files_root)
    good = [(prompt, image) for prompt, image, _ in scenes[:4]]
    with ThreadPoolExecutor(len(cases) + len(good)) as pool:
        bad_answers = [pool.submit(post, service, path, body, **options)
                       for _, path, body, options, *_ in cases]
        good_answers = [pool.submit(client.score_one, *item) for item in good]
        answers = [future.result() for future in bad_answers]
        good_scores = [future.result() for future in good_answers]

    for (name, _, _, _, status, error, message), (got_status, got) in zip(cases, answers,
                                                                             strict=True):
        assert (got_status, got["error"]) == (status, error), f"{name}: {got}"
        assert re.search(message, got["message"]), f"{name}: {got['message']}"
    for (prompt, image), score in zip(good, good_scores, strict=True):
        assert score.mu == pytest.approx(reward([image], [prompt]).mu.item(), abs=1e-5)
    assert replica_names() == replicas, "a replica restarted"
    assert client.health() == {"status": "ok"}

    # Each refusal is counted under its reason.
    for outcome in ("bad_base64", "image_too_large", "unauthorized", "scoring_failed"):
        settled("ray_spatialrl_serve_requests", {"endpoint": "/v1/score", "outcome": outcome},
                [], until=lambda s: s.get("ray_spatialrl_serve_requests_total", 0) >= 1)


def test_the_client_raises_the_services_refusal(client, scenes):
    prompt, good, _ = scenes[0]
    with pytest.raises(ServiceError) as refused:
        client.score_one(" ", good)
    assert refused.value.status == 422 and refused.value.error == "invalid_request"
    with pytest.raises(ServiceError, match="HTTP 401 unauthorized"):
        SpatialScoreClient(client.base_url).score_one(prompt, good)


def test_request_logs_name_each_request_without_payloads(client, scenes):
    canary_prompt = "canary 3f9d a red circle to the left of a blue square"
    image = png(scenes[2][1])
    client.score_one(canary_prompt, image)
    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    text = "\n".join(path.read_text(errors="replace") for path in logs_dir.rglob("*")
                     if path.is_file() and path.suffix in (".log", ".out", ".err"))
    assert re.search(r"POST /v1/score status=200 outcome=ok items=1 pixels=4096", text)
    assert re.search(r"POST /v1/score status=422 outcome=bad_base64", text)
    for secret in ("canary 3f9d", b64(image)[100:160], TOKEN):
        assert secret not in text


def test_health_readiness_and_openapi_need_no_token(service, service_config,
                                                     tiny_flux_lora_path):
    anonymous = SpatialScoreClient(service)
    assert anonymous.health() == {"status": "ok"}
    ready = anonymous.ready()
    assert ready["model_version"] == reward_version(service_config.reward)
    lora_checksum = files_checksum([tiny_flux_lora_path / LORA_WEIGHTS_FILE])
    assert ready["generator"] == f"flux:{service_config.generator.model.pretrained}" \
        f"+lora@{lora_checksum}"
    openapi = anonymous._request("GET", "/openapi.json")
    assert {"/v1/score", "/v1/compare", "/v1/best-of-n", "/healthz", "/readyz"} <= set(
        openapi["paths"])
    assert "ScoreRequest" in openapi["components"]["schemas"]
    assert openapi["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_best_of_n_returns_the_best_policy_candidate_with_every_score(
        client, service_config, reward):
    prompt = "a red circle to the left of a blue square"
    answer = client.best_of_n(prompt, n=4, seed=7, return_all_images=True)
    assert [c.seed for c in answer.candidates] == [7, 8, 9, 10]
    mu = [c.mu for c in answer.candidates]
    assert answer.best_index == int(np.argmax(mu))

    expected_images = FluxCandidates(service_config.generator)(prompt, [7, 8, 9, 10])
    served = [Image.open(io.BytesIO(base64.b64decode(c.png_base64))) for c in answer.candidates]
    for got, expected in zip(served, expected_images, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert mu == reward(expected_images, [prompt] * 4).mu.tolist()

    only_best = client.best_of_n(prompt, n=4, seed=7)
    assert [c.png_base64 is not None for c in only_best.candidates] == [
        i == answer.best_index for i in range(4)]


def test_a_generator_refusing_a_prompt_reaches_the_caller_as_input_error(service):
    """The ingress answers 422 for an InputError of the generator: Ray must deliver it as one."""
    handle = serve.run(GeneratorDeployment.options(ray_actor_options={"num_cpus": 0.1}).bind(
        ShapesGeneratorConfig()), name="test-shapes-generator", route_prefix=None)
    try:
        with pytest.raises(InputError, match="not a shapes-world prompt"):
            handle.generate.remote("a cat on a sofa", [0]).result()
        (image,) = handle.generate.remote("a red circle above a blue square", [3]).result()
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    finally:
        serve.delete("test-shapes-generator")


def test_an_image_above_the_models_input_is_scored_downscaled_and_pixels_in_flight_bounded(
        service, client, scenes, reward):
    """A 120x120 image is scored as the ingress downscales it (to the tiny model's 112x112
    budget); requests beyond the pixels in flight wait, then get 429 in the JSON format."""
    prompt, good, _ = scenes[5]
    big = good.resize((120, 120), Image.Resampling.BICUBIC)
    sent = decode_pixels(read_image(ImageRef(base64=b64(png(big))), "x", LIMITS, None),
                         TINY_INPUT_PIXELS)
    assert sent.shape[0] * sent.shape[1] <= TINY_INPUT_PIXELS < 120 * 120
    served = client.score_one(prompt, big)
    assert served.mu == pytest.approx(reward([Image.fromarray(sent)], [prompt]).mu.item(),
                                      abs=1e-5)

    # Each request fills the budget and holds it at least a batch wait (0.5 s): of six sent at
    # once, some must wait past pixel_wait_s (0.2 s).
    body = json.dumps({"items": [{"prompt": prompt, "image": {"base64": b64(png(
        big.resize((128, 128))))}}] * 3}).encode()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(service, "/v1/score", body), range(6)))
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) == {200, 429} and statuses[200] >= 1, statuses
    for status, answer in answers:
        if status == 429:
            assert answer["error"] == "busy" and "decoded pixels in flight" in answer["message"]
    assert client.score_one(prompt, good).mu == pytest.approx(
        reward([good], [prompt]).mu.item(), abs=1e-5)


def slow_client(url: str, source: str, finish_headers: bool = True) -> socket.socket:
    """A connection from `source` (any 127/8 address is this machine) that sends its headers,
    or only part of them, and 100 bytes of a 100 kB body, then stalls."""
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60,
                                    source_address=(source, 0))
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {TOKEN}"
            "\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    sock.sendall(head.encode() + b'{"items": [' + b" " * 89 if finish_headers else
                 head[:60].encode())
    return sock


def answer_of(sock: socket.socket) -> tuple[int, dict, float]:
    """Status, JSON body and Retry-After of the answer a stalled client gets."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    retry = float(response.getheader("Retry-After", "nan"))
    answer = (response.status, json.loads(response.read()), retry)
    sock.close()
    return answer


def test_a_slow_client_flood_is_refused_in_json_while_good_requests_succeed(
        service, client, scenes, reward):
    """Stalled clients hold a slot for body_timeout_s at most (then 408); one address's excess
    is refused at once (429) and the replica's (503), all in the JSON format; clients that
    never finish their headers hold only proxy connections. Good requests from another
    address are answered meanwhile, well before the flood times out."""
    never_done = [slow_client(service, "127.0.0.3", finish_headers=False) for _ in range(40)]
    flood = [slow_client(service, "127.0.0.2") for _ in range(LIMITS.max_requests_per_client + 12)]
    start = time.monotonic()
    good = [(prompt, image) for prompt, image, _ in scenes[:4]]
    with ThreadPoolExecutor(len(good)) as pool:
        scores = list(pool.map(lambda item: client.score_one(*item), good))
    good_s = time.monotonic() - start
    answers = [answer_of(sock) for sock in flood]

    assert good_s < LIMITS.body_timeout_s, f"good requests waited {good_s:.1f} s"
    for (prompt, image), score in zip(good, scores, strict=True):
        assert score.mu == pytest.approx(reward([image], [prompt]).mu.item(), abs=1e-5)
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) == {408, 429} and statuses[408] >= LIMITS.max_requests_per_client
    for status, answer, retry in answers:
        error = {408: "body_timeout", 429: "too_many_requests"}[status]
        assert answer["error"] == error and answer["message"], answer
        assert (retry == 1) == (status == 429)

    # Stalled clients from three addresses: beyond the replica's 100 slots, 503 in JSON.
    crowd = [slow_client(service, f"127.0.0.{4 + i // 40}") for i in range(120)]
    answers = [answer_of(sock) for sock in crowd]
    statuses = Counter(status for status, _, _ in answers)
    assert statuses[503] >= 20 and set(statuses) <= {408, 503}, statuses
    assert {answer["error"] for status, answer, _ in answers if status == 503} == {"overloaded"}
    assert client.health() == {"status": "ok"}
    assert client.score_one(*good[0]).mu == pytest.approx(scores[0].mu, abs=1e-5)
    for sock in never_done:
        sock.close()
