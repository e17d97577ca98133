"""SpatialScoreClient against a plain local HTTP server standing in for the service: what it
sends, how it reads answers and refusals (the real service: tests/test_service_http.py)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from spatialrl.service.client import ServiceError, SpatialScoreClient

ANSWER = {"model_version": "v1", "scores": [{"mu": 0.5, "sigma": 0.1, "batch_size": 1}]}


@pytest.fixture
def server():
    """Answers POST /v1/score with ANSWER, POST /v1/compare with the service's error JSON and
    GET /healthz with a proxy's plain text; records each POST's headers and body."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((dict(self.headers), body))
            status, payload, kind = {
                "/v1/score": (200, json.dumps(ANSWER), "application/json"),
                "/v1/compare": (422, json.dumps({"error": "bad_image", "message": "image_a"}),
                                "application/json"),
            }[self.path]
            self.answer(status, payload, kind)

        def do_GET(self):
            self.answer(502, "upstream down", "text/plain")

        def answer(self, status: int, payload: str, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()


def test_a_score_request_carries_the_token_and_the_image(server):
    url, seen = server
    answer = SpatialScoreClient(url, token="s3cret").score_one(
        "a red circle", np.zeros((4, 4, 3), np.uint8))
    assert answer.mu == 0.5 and answer.sigma == 0.1
    headers, body = seen[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert body["items"][0]["prompt"] == "a red circle" and body["items"][0]["image"]["base64"]


def test_a_refusal_is_a_service_error_with_its_reason(server):
    url, _ = server
    client = SpatialScoreClient(url)
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ServiceError) as refused:
        client.compare("a red circle", image, image)
    assert (refused.value.status, refused.value.error, refused.value.message) == (
        422, "bad_image", "image_a")
    with pytest.raises(ServiceError, match="HTTP 502 http_error: upstream down"):
        client.health()


def test_a_service_not_listening_is_an_os_error():
    with pytest.raises(OSError):
        SpatialScoreClient("http://127.0.0.1:9", timeout_s=5).health()
