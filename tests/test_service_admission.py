"""What the service lets in, without Ray: requests in flight in all and per client, decoded
pixels per request and in flight, images downscaled to what the reward reads, and the config
that keeps refusals answerable (issue 26, items 5 and 6)."""

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from spatialrl.config import RewardConfig
from spatialrl.reward import SpatialScoreConfig
from spatialrl.reward.inputs import max_input_pixels
from spatialrl.reward_functions import reward_input_pixels
from spatialrl.service.admission import Admission, PixelBudget
from spatialrl.service.api import (
    ImageRef,
    RequestError,
    check_request_pixels,
    decode_pixels,
    fitted_size,
    read_image,
)
from spatialrl.service.config import LimitsConfig, ReplicaConfig, ServiceConfig

LIMITS = LimitsConfig(max_request_pixels=100 * 100, max_pixels_in_flight=100 * 100,
                      max_requests_in_flight=3, max_requests_per_client=2)


def image_file(width: int, height: int, fmt: str = "PNG", **save) -> ImageRef:
    """A left-white, right-black picture: which side is which survives any downscale."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return ImageRef(base64=base64.b64encode(buffer.getvalue()).decode())


def read(ref: ImageRef):
    return read_image(ref, "items.0.image", LimitsConfig(), None)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_above_the_models_input_is_downscaled_with_its_aspect_ratio(fmt):
    pixels = decode_pixels(read(image_file(800, 400, fmt)), fit_pixels=12544)
    height, width, _ = pixels.shape
    assert width * height <= 12544 and (width, height) == fitted_size((800, 400), 12544)
    assert abs(width / height - 2) < 0.02
    assert pixels[:, : width // 2 - 2].min() > 200 and pixels[:, width // 2 + 2:].max() < 50


def test_an_image_within_the_models_input_keeps_every_pixel():
    small = read(image_file(100, 100))
    assert np.array_equal(decode_pixels(small, fit_pixels=12544), decode_pixels(small))


def test_a_turned_jpeg_is_downscaled_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    pixels = decode_pixels(read(image_file(800, 400, "JPEG", exif=exif)), fit_pixels=12544)
    height, width, _ = pixels.shape
    assert height > width  # shown upright: taller than wide
    assert pixels[: height // 2 - 2].min() > 200 and pixels[height // 2 + 2:].max() < 50


def test_the_pixels_of_a_request_are_counted_from_headers_and_capped():
    images = [read(image_file(60, 60)), read(image_file(60, 60))]
    assert check_request_pixels(images[:1], LIMITS) == 3600
    with pytest.raises(RequestError) as refused:
        check_request_pixels(images * 2, LIMITS)
    assert (refused.value.status, refused.value.reason) == (413, "too_many_pixels")
    assert refused.value.message == (
        "the images hold 14400 pixels in all, above the limit of 10000 per request")


def refusal(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as refused:
        call()
    return refused.value.status, refused.value.reason


def test_requests_beyond_a_clients_share_get_429_and_beyond_the_replicas_503():
    admission = Admission(LIMITS)
    with admission.admit("10.0.0.1"), admission.admit("10.0.0.1"):
        assert refusal(lambda: admission.admit("10.0.0.1").__enter__()) == (
            429, "too_many_requests")
        with admission.admit("10.0.0.2"):
            assert refusal(lambda: admission.admit("10.0.0.3").__enter__()) == (
                503, "overloaded")
            assert admission.in_flight == 3
    assert admission.in_flight == 0
    with admission.admit("10.0.0.1"), admission.admit("10.0.0.1"):
        pass  # the client's slots came back


def test_a_request_waits_for_pixels_in_flight_then_runs_or_gets_429():
    async def scenario():
        budget = PixelBudget(capacity=100, wait_s=0.5)
        order = []

        async def request(name: str, pixels: int, hold_s: float):
            async with budget.hold(pixels):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(request("first", 80, 0.2))
        await asyncio.sleep(0.05)
        await request("second", 30, 0)  # waits until the first ends
        await first
        assert order == ["first", "second"] and budget.held == 0

        held = asyncio.create_task(request("long", 80, 1.0))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as refused:
            await request("refused", 30, 0)
        await held
        return refused.value, budget.held

    refused, held = asyncio.run(scenario())
    assert (refused.status, refused.reason) == (429, "busy")
    assert "80 decoded pixels in flight; 30 more would pass the limit of 100" in refused.message
    assert held == 0


def test_limits_that_could_not_be_met_are_config_errors():
    with pytest.raises(ValidationError, match="max_pixels_in_flight: 10 is below"):
        LimitsConfig(max_request_pixels=20, max_pixels_in_flight=10)
    with pytest.raises(ValidationError, match=r"limits.max_requests_in_flight: 64 must be below "
                       r"ingress.max_ongoing_requests \(64\)"):
        ServiceConfig(limits=LimitsConfig(max_requests_in_flight=64),
                      ingress=ReplicaConfig(max_ongoing_requests=64))


def test_the_reward_input_size_is_the_processors_pixel_budget(tiny_models_dir,
                                                              tiny_spatialscore_path):
    base = str(tiny_models_dir / "qwen2.5-vl")
    assert max_input_pixels(SpatialScoreConfig(base_model=base, max_pixels=5000)) == 5000
    served = reward_input_pixels(
        RewardConfig(kind="spatialscore", spatialscore_path=str(tiny_spatialscore_path)))
    assert served == max_input_pixels(SpatialScoreConfig(base_model=base)) == 112 * 112
    assert reward_input_pixels(RewardConfig(kind="shapes_rule")) is None
