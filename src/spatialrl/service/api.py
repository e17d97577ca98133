"""The HTTP API of the SpatialScore and SpatialReward services: request and answer schemas
(they make their OpenAPI descriptions) and the checks that turn a request into text and RGB
arrays.

Everything a client sends is JSON; images are PNG or JPEG bytes in base64, or file:// URLs
under a folder the server names. Every refusal is a RequestError carrying its HTTP status, a
short reason (the metrics tag) and a message that names the item and the problem, and never
echoes the payload.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from spatialrl.images import upright_rgb
from spatialrl.prompts import prompt_problem
from spatialrl.service.config import LimitsConfig
from spatialrl.spatialreward.answers import EditAnswer, QualityAnswer

# MPO is how PIL names a multi-frame camera JPEG; its first frame is the picture.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
# Candidate i is sampled with seed + i; torch.Generator.manual_seed takes at most 64 bits.
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A request the service refuses: HTTP status, reason tag and a message for the client."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRef(ApiModel):
    """Exactly one of `base64` and `url`."""

    base64: str | None = Field(
        None, description="PNG or JPEG file bytes in standard base64 (no data: URL prefix)"
    )
    url: str | None = Field(
        None, description="file:// URL of a PNG or JPEG under the server's local_files_root; "
        "refused unless the server enables it",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.base64 is None) == (self.url is None):
            raise ValueError("give exactly one of 'base64' and 'url'")
        return self


def _plain_text(text: str) -> str:
    if problem := prompt_problem(text):
        raise ValueError(problem)
    return text


# A prompt or an instruction: plain text, refused with the reason prompt_problem gives.
PlainText = Annotated[str, AfterValidator(_plain_text)]
PLAIN_TEXT = "plain text, not empty, without special tokens such as <|im_start|>"


class Prompted(ApiModel):
    prompt: PlainText = Field(description=f"the text the image is judged against: {PLAIN_TEXT}")


class ScoreItem(Prompted):
    image: ImageRef


class ScoreRequest(ApiModel):
    items: list[ScoreItem] = Field(min_length=1)


class Score(ApiModel):
    mu: float = Field(description="the score: higher is more spatially correct")
    sigma: float = Field(description="the model's uncertainty about mu (a standard deviation)")
    batch_size: int = Field(description="items in the reward batch that scored this one")


class ScoreResponse(ApiModel):
    model_version: str
    scores: list[Score]


class CompareRequest(Prompted):
    image_a: ImageRef
    image_b: ImageRef


class CompareResponse(ApiModel):
    model_version: str
    a: Score
    b: Score
    preferred: Literal["a", "b", "tie"] = Field(description="the image with the higher mu")
    probability_a_preferred: float = Field(
        description="E[sigmoid(s_a - s_b)] for s ~ N(mu, sigma^2), the model's training "
        "objective read as a probability"
    )


class BestOfNRequest(Prompted):
    n: int = Field(ge=1, description="candidates to sample (at most the server's max_best_of)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="candidate i is sampled with seed + i")
    return_all_images: bool = False


class Candidate(ApiModel):
    seed: int
    mu: float
    sigma: float
    png_base64: str | None = Field(None, description="the image, for the best or if asked")


class BestOfNResponse(ApiModel):
    model_version: str
    generator: str = Field(description="what sampled the candidates (model and LoRA checksum)")
    best_index: int
    candidates: list[Candidate]


class EditRewardItem(ApiModel):
    source: ImageRef = Field(description="the image before the edit")
    edited: ImageRef = Field(description="the image after the edit")
    instruction: PlainText = Field(description=f"the editing instruction: {PLAIN_TEXT}")


class EditRewardRequest(ApiModel):
    items: list[EditRewardItem] = Field(min_length=1)


class EditAnswers(ApiModel):
    edit: EditAnswer = Field(description="edit_region, reasoning, score [success, over_editing]")
    quality: QualityAnswer = Field(description="reasoning, score [naturalness, artifacts]")


class InvalidAnswer(ApiModel):
    reason: str = Field(description="which answer failed and why, e.g. edit:truncated")
    detail: str


class EditReward(ApiModel):
    """One item's judgement: `answer` and `reward` when both answers parsed, else `invalid`
    (and no reward: an unreadable answer is never a score)."""

    reward: float | None = Field(description="edit^0.8 * quality^0.2 / 10 (default weights)")
    answer: EditAnswers | None
    invalid: InvalidAnswer | None
    affinity_key: str = Field(description="hash of the source pixels and the instruction")
    replica: str = Field(description="the model replica that judged it")
    prefix_cache_hit: bool
    batch_size: int = Field(description="items in the generate call that judged this one")


class EditRewardResponse(ApiModel):
    model_version: str
    results: list[EditReward]


class ReplicaStats(ApiModel):
    """What one SpatialReward replica has served: affinity routing works when every key is
    served by one replica, so the replicas' distinct_keys add up to the keys sent."""

    replica: str
    requests: int = Field(description="calls, one per affinity key of an HTTP request")
    items: int
    distinct_keys: int = Field(description="affinity keys this replica has served")
    repeat_keys: int = Field(description="calls whose key this replica had served before")
    prefix_cache_hits: int
    prefix_cache_misses: int
    prefix_cache_entries: int


class ServiceMetricsResponse(ApiModel):
    replicas: list[ReplicaStats] = Field(
        description="the latest figures of each replica that has answered this ingress"
    )


class ProblemResponse(ApiModel):
    """Every refusal: a reason tag and a message naming the problem."""

    error: str
    message: str


def check_prompt(prompt: str, where: str, limits: LimitsConfig) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            422, "prompt_too_long",
            f"{where}: prompt has {len(prompt)} characters, above the limit of "
            f"{limits.max_prompt_chars}",
        )


def check_item_count(count: int, limits: LimitsConfig) -> None:
    if count > limits.max_items:
        raise RequestError(
            413, "too_many_items",
            f"items: {count} items, above the limit of {limits.max_items} per request",
        )


@dataclass(frozen=True)
class EncodedImage:
    """An image's file bytes whose header passed every check, with its size from the header."""

    where: str
    data: bytes
    size: tuple[int, int]  # width, height

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def read_image(
    ref: ImageRef, where: str, limits: LimitsConfig, local_files_root: str | None
) -> EncodedImage:
    """The image's bytes after the checks its header allows (format, size, aspect ratio), so
    that an oversized image is refused before anything is decoded; RequestError otherwise."""
    data = _image_bytes(ref, where, limits, local_files_root)
    with _opened(data, where) as image:
        _check_size(image.size, where, limits)
        return EncodedImage(where, data, image.size)


def check_request_pixels(images: list[EncodedImage], limits: LimitsConfig) -> int:
    """The pixels a request's images decode to, in all; 413 above the limit."""
    pixels = sum(image.pixels for image in images)
    if pixels > limits.max_request_pixels:
        raise RequestError(
            413, "too_many_pixels",
            f"the images hold {pixels} pixels in all, above the limit of "
            f"{limits.max_request_pixels} per request",
        )
    return pixels


def decode_pixels(image: EncodedImage, fit_pixels: int | None = None) -> np.ndarray:
    """The image as a uint8 HxWx3 RGB array, upright, downscaled (aspect kept) to at most
    `fit_pixels` when it is larger: the reward model reads no more, and a large image is
    never held at full size past its own decoding. A JPEG is decoded at the smallest
    1/2, 1/4 or 1/8 scale that still holds that many pixels."""
    with _opened(image.data, image.where) as opened:
        if fit_pixels is not None and image.pixels > fit_pixels:
            opened.draft(None, fitted_size(image.size, fit_pixels))
        upright = upright_rgb(opened)
    if fit_pixels is not None and upright.width * upright.height > fit_pixels:
        upright = upright.resize(fitted_size(upright.size, fit_pixels), Image.Resampling.BICUBIC)
    return np.asarray(upright)


def fitted_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most max_pixels pixels."""
    scale = math.sqrt(max_pixels / (size[0] * size[1]))
    return max(1, math.floor(size[0] * scale)), max(1, math.floor(size[1] * scale))


@contextmanager
def _opened(data: bytes, where: str) -> Iterator[Image.Image]:
    """The image file, open; RequestError for anything that is not a readable PNG or JPEG,
    whether its header or its pixels (read inside the block) are at fault."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise RequestError(
                    422, "not_an_image", f"{where}: a {image.format} image; send PNG or JPEG"
                )
            yield image
    except Image.DecompressionBombError as err:  # sizes far above any sane limit
        raise RequestError(413, "image_too_large", f"{where}: {err}") from None
    except UnidentifiedImageError:
        raise RequestError(422, "not_an_image", f"{where}: not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as err:  # a truncated or corrupt file
        raise RequestError(422, "not_an_image", f"{where}: unreadable image ({err})") from None


def _image_bytes(
    ref: ImageRef, where: str, limits: LimitsConfig, local_files_root: str | None
) -> bytes:
    if ref.base64 is not None:
        try:
            return base64.b64decode(ref.base64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(
                422, "bad_base64", f"{where}.base64: not valid base64 ({err}); send the file "
                "bytes in standard base64 without a data: prefix",
            ) from None
    path = _local_file(ref.url, f"{where}.url", local_files_root)
    try:
        size = path.stat().st_size
        if size > limits.max_body_bytes:
            raise RequestError(
                413, "image_too_large",
                f"{where}.url: the file has {size} bytes, above the limit of "
                f"{limits.max_body_bytes}",
            )
        return path.read_bytes()
    except OSError as err:  # no read permission, removed meanwhile
        raise RequestError(
            422, "file_unreadable", f"{where}.url: cannot read the file ({_reason(err)})"
        ) from None


def _local_file(url: str, where: str, local_files_root: str | None) -> Path:
    """The file a file:// URL names, if it lies under local_files_root (links resolved)."""
    if local_files_root is None:
        raise RequestError(
            403, "local_files_disabled",
            f"{where}: file URLs are disabled on this server; send the image as base64",
        )
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise RequestError(
            422, "bad_url", f"{where}: only file:// URLs of this machine are accepted"
        )
    try:
        path = Path(unquote(parsed.path)).resolve()
        inside = path.is_relative_to(Path(local_files_root).resolve())
        found = inside and path.is_file()
    except (OSError, ValueError) as err:  # a NUL byte, a name too long for the filesystem
        raise RequestError(
            422, "bad_url", f"{where}: not a usable file path ({_reason(err)})"
        ) from None
    if not inside:
        raise RequestError(
            403, "outside_local_files_root", f"{where}: the file is outside the served folder"
        )
    if not found:
        raise RequestError(422, "file_not_found", f"{where}: no such file")
    return path


def _reason(err: Exception) -> str:
    """The error without the path an OSError carries (the message never echoes input)."""
    return getattr(err, "strerror", None) or str(err)


def _check_size(size: tuple[int, int], where: str, limits: LimitsConfig) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise RequestError(
            413, "image_too_large",
            f"{where}: {width}x{height} = {width * height} pixels, above the limit of "
            f"{limits.max_image_pixels}",
        )
    if max(size) > limits.max_aspect_ratio * min(size):
        raise RequestError(
            422, "bad_aspect_ratio",
            f"{where}: {width}x{height} has an aspect ratio above {limits.max_aspect_ratio:g}",
        )


# Probabilists' Gauss-Hermite rule: E[f(x)] for x ~ N(0, 1) = sum(w f(x)) / sqrt(2 pi).
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)


def probability_preferred(mu_a: float, sigma_a: float, mu_b: float, sigma_b: float) -> float:
    """E[sigmoid(z)] for z ~ N(mu_a - mu_b, sigma_a^2 + sigma_b^2): how likely the model
    holds a better than b, as its Bradley-Terry loss on Gaussian scores defines it (64-point
    Gauss-Hermite quadrature; sigmoid(mu_a - mu_b) to rounding when both sigmas are 0)."""
    margin = mu_a - mu_b + math.hypot(sigma_a, sigma_b) * _NODES
    values = 0.5 * (1 + np.tanh(margin / 2))  # sigmoid without overflow
    return float(np.dot(_WEIGHTS, values) / math.sqrt(2 * math.pi))
