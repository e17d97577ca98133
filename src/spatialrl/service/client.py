"""A Python client of the SpatialScore HTTP service (requests, typed answers).

    client = SpatialScoreClient("http://127.0.0.1:8000", token=os.environ.get("TOKEN"))
    client.score([("a red circle left of a blue square", "image.png")]).scores[0].mu
    client.compare(prompt, image_a, image_b).preferred
    client.best_of_n(prompt, n=8).candidates

An image is a PIL image or a uint8 HxWx3 array (sent as PNG), PNG or JPEG file bytes, a
path to such a file (read here and sent as base64), or an ImageRef (e.g. a file:// URL that
the server reads itself, when it allows local files).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import requests
from PIL import Image
from pydantic import BaseModel

from spatialrl.service.api import (
    BestOfNResponse,
    CompareResponse,
    ImageRef,
    Score,
    ScoreResponse,
)

ImageInput = Image.Image | np.ndarray | bytes | str | Path | ImageRef
Answer = TypeVar("Answer", bound=BaseModel)


class ServiceError(Exception):
    """The service refused a request: HTTP status, its reason tag and message. (A service
    that cannot be reached raises requests' ConnectionError, an OSError.)"""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(f"HTTP {status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


class SpatialScoreClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", token: str | None = None,
        timeout_s: float = 120.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def score(self, items: Sequence[tuple[str, ImageInput]]) -> ScoreResponse:
        body = {"items": [{"prompt": p, "image": image_ref(im)} for p, im in items]}
        return self._post("/v1/score", body, ScoreResponse)

    def score_one(self, prompt: str, image: ImageInput) -> Score:
        return self.score([(prompt, image)]).scores[0]

    def compare(self, prompt: str, image_a: ImageInput, image_b: ImageInput) -> CompareResponse:
        body = {"prompt": prompt, "image_a": image_ref(image_a), "image_b": image_ref(image_b)}
        return self._post("/v1/compare", body, CompareResponse)

    def best_of_n(
        self, prompt: str, n: int, seed: int = 0, return_all_images: bool = False
    ) -> BestOfNResponse:
        body = {"prompt": prompt, "n": n, "seed": seed, "return_all_images": return_all_images}
        return self._post("/v1/best-of-n", body, BestOfNResponse)

    def health(self) -> dict:
        return self._request("GET", "/healthz")

    def ready(self) -> dict:
        return self._request("GET", "/readyz")

    def _post(self, path: str, body: dict, answer: type[Answer]) -> Answer:
        return answer.model_validate(self._request("POST", path, body))

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        response = requests.request(method, self.base_url + path, json=body, headers=headers,
                                    timeout=self.timeout_s)
        if not response.ok:
            raise _service_error(response)
        return response.json()


def _service_error(response: requests.Response) -> ServiceError:
    try:
        problem = response.json()
        return ServiceError(response.status_code, problem["error"], problem["message"])
    except (ValueError, KeyError, TypeError):  # not the service's own answer (e.g. a proxy)
        return ServiceError(response.status_code, "http_error",
                            response.text[:500] or response.reason)


def image_ref(image: ImageInput) -> dict:
    """The JSON form of one image."""
    if isinstance(image, ImageRef):
        return image.model_dump(exclude_none=True)
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return {"base64": base64.b64encode(image).decode("ascii")}
