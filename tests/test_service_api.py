"""The service's pure parts, without Ray: image checks and limits, the request schemas, the
typed config, reward versions, the preference probability, the client's image encoding, and
safetensors-only loading."""

import base64
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from spatialrl.config import ConfigError, PolicyModelConfig, RewardConfig, load_config
from spatialrl.flux.loading import load_flux_pipeline
from spatialrl.model_checksum import files_checksum
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward_functions import reward_version
from spatialrl.service.api import (
    ImageRef,
    RequestError,
    ScoreRequest,
    decode_pixels,
    probability_preferred,
    read_image,
)
from spatialrl.service.client import image_ref
from spatialrl.service.config import (
    FluxGeneratorConfig,
    LimitsConfig,
    ServiceConfig,
    resolve_local_paths,
)

LIMITS = LimitsConfig(max_image_pixels=64 * 64, max_aspect_ratio=10, max_body_bytes=100_000)
PIXELS = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def ref(data: bytes) -> ImageRef:
    return ImageRef(base64=base64.b64encode(data).decode())


def decode_image(image: ImageRef, where: str, limits: LimitsConfig, root: str | None):
    """What the ingress does with a request's image: checks from the header, then pixels."""
    return decode_pixels(read_image(image, where, limits, root))


def refused(call) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call()
    return caught.value


def test_png_and_jpeg_decode_to_the_pixels_pil_reads():
    assert np.array_equal(decode_image(ref(encoded(PIXELS, "PNG")), "x", LIMITS, None), PIXELS)
    jpeg = encoded(PIXELS, "JPEG")
    expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert np.array_equal(decode_image(ref(jpeg), "x", LIMITS, None), expected)
    rgba = decode_image(ref(encoded(PIXELS, "PNG", "RGBA")), "x", LIMITS, None)
    assert rgba.shape == (32, 48, 3) and rgba.dtype == np.uint8


@pytest.mark.parametrize("data, status, reason, message", [
    (b"not an image at all", 422, "not_an_image", "items.0.image: not a PNG or JPEG image"),
    (encoded(PIXELS, "GIF"), 422, "not_an_image", "a GIF image; send PNG or JPEG"),
    (encoded(PIXELS, "BMP"), 422, "not_an_image", "a BMP image; send PNG or JPEG"),
    (encoded(PIXELS, "PNG")[:120], 422, "not_an_image", "unreadable image"),
    (b"", 422, "not_an_image", "not a PNG or JPEG image"),
    (encoded(np.zeros((65, 64, 3), np.uint8), "PNG"), 413, "image_too_large",
     "64x65 = 4160 pixels, above the limit of 4096"),
    (encoded(np.zeros((2, 21, 3), np.uint8), "PNG"), 422, "bad_aspect_ratio",
     "21x2 has an aspect ratio above 10"),
])
def test_a_bad_image_is_refused_with_its_reason(data, status, reason, message):
    error = refused(lambda: decode_image(ref(data), "items.0.image", LIMITS, None))
    assert (error.status, error.reason) == (status, reason)
    assert message in error.message


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: huge on paper, a few bytes on the wire."""
    data = bytearray(encoded(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize("width, message", [
    (5000, "5000x5000 = 25000000 pixels, above the limit of 4096"),  # our limit
    (20000, "exceeds limit"),  # PIL's decompression-bomb check, at open
])
def test_an_image_too_large_is_refused_from_its_header_before_decoding(width, message):
    error = refused(lambda: decode_image(ref(png_claiming(width, width)), "x", LIMITS, None))
    assert (error.status, error.reason) == (413, "image_too_large")
    assert message in error.message


@pytest.mark.parametrize("text", ["@@@", "aGVsbG8", "data:image/png;base64,aGVsbG8="])
def test_bad_base64_names_the_field(text):
    error = refused(lambda: decode_image(ImageRef(base64=text), "items.2.image", LIMITS, None))
    assert (error.status, error.reason) == (422, "bad_base64")
    assert error.message.startswith("items.2.image.base64: not valid base64")


def test_file_urls_only_when_enabled_and_only_under_the_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "a.png").write_bytes(encoded(PIXELS, "PNG"))
    (tmp_path / "secret.png").write_bytes(encoded(PIXELS, "PNG"))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    inside = ImageRef(url=(root / "a.png").as_uri())

    assert np.array_equal(decode_image(inside, "x", LIMITS, str(root)), PIXELS)
    cases = [
        (inside, None, 403, "local_files_disabled"),
        (ImageRef(url=(tmp_path / "secret.png").as_uri()), str(root), 403,
         "outside_local_files_root"),
        (ImageRef(url=(root / "link.png").as_uri()), str(root), 403,
         "outside_local_files_root"),
        (ImageRef(url=f"{root.as_uri()}/../secret.png"), str(root), 403,
         "outside_local_files_root"),
        (ImageRef(url=(root / "none.png").as_uri()), str(root), 422, "file_not_found"),
        (ImageRef(url="https://example.com/a.png"), str(root), 422, "bad_url"),
        (ImageRef(url=f"file://otherhost{root}/a.png"), str(root), 422, "bad_url"),
    ]
    for image, allowed, status, reason in cases:
        error = refused(lambda image=image, allowed=allowed: decode_image(
            image, "x", LIMITS, allowed))
        assert (error.status, error.reason) == (status, reason), image


def test_a_file_larger_than_the_body_limit_is_refused(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(LIMITS.max_body_bytes))
    error = refused(lambda: decode_image(ImageRef(url=big.as_uri()), "x", LIMITS, str(tmp_path)))
    assert (error.status, error.reason) == (413, "image_too_large")


@pytest.mark.parametrize("body, message", [
    ({"items": [{"prompt": " ", "image": {"base64": "AA=="}}]}, "empty prompt"),
    ({"items": [{"prompt": "a", "image": {}}]}, "exactly one of 'base64' and 'url'"),
    ({"items": [{"prompt": "a", "image": {"base64": "AA==", "url": "file:///a"}}]},
     "exactly one of 'base64' and 'url'"),
    ({"items": []}, "at least 1 item"),
    ({"items": [{"prompt": "a", "image": {"base64": "AA=="}, "weight": 2}]}, "Extra inputs"),
])
def test_request_schema_refuses_malformed_requests(body, message):
    with pytest.raises(ValidationError, match=message):
        ScoreRequest.model_validate(body)


def test_service_config_errors_name_the_key(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("limits:\n  max_itemz: 3\n")
    with pytest.raises(ConfigError, match="limits.max_itemz: Extra inputs"):
        load_config(path, model=ServiceConfig)
    with pytest.raises(ConfigError, match="generator: .*tag 'diffusion'"):
        load_config(None, ["generator.kind=diffusion"], model=ServiceConfig)
    with pytest.raises(ConfigError, match="limits.max_image_pixels: Input should be greater"):
        load_config(None, ["limits.max_image_pixels=0"], model=ServiceConfig)
    cfg = load_config(None, ["generator.kind=shapes", "port=9000"], model=ServiceConfig)
    assert cfg.host == "127.0.0.1" and cfg.port == 9000
    assert cfg.generator.relation_error_rate == 0.5


def test_local_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "lora").mkdir()
    cfg = ServiceConfig(
        reward=RewardConfig(spatialscore_path="ckpt"),
        generator=FluxGeneratorConfig(model=PolicyModelConfig(
            pretrained="black-forest-labs/FLUX.1-dev"), lora_path="lora"),
    )
    resolve_local_paths(cfg)
    assert cfg.reward.spatialscore_path == str(tmp_path / "ckpt")
    assert cfg.generator.lora_path == str(tmp_path / "lora")
    assert cfg.generator.model.pretrained == "black-forest-labs/FLUX.1-dev"


def test_probability_preferred_is_the_gaussian_bradley_terry_probability():
    assert probability_preferred(1.0, 0.0, -0.5, 0.0) == pytest.approx(
        1 / (1 + math.exp(-1.5)), abs=1e-12)
    assert probability_preferred(0.3, 0.7, 0.3, 0.2) == pytest.approx(0.5, abs=1e-12)
    p = probability_preferred(0.8, 1.5, -0.4, 2.0)
    assert p + probability_preferred(-0.4, 2.0, 0.8, 1.5) == pytest.approx(1.0, abs=1e-12)
    margin = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monte_carlo = torch.sigmoid(1.2 + math.hypot(1.5, 2.0) * margin).mean().item()
    assert p == pytest.approx(monte_carlo, abs=1e-3)
    # Uncertainty pulls the probability towards 1/2.
    assert 0.5 < p < probability_preferred(0.8, 0.0, -0.4, 0.0)


def test_the_client_sends_every_image_kind_as_png_or_jpeg_bytes(tmp_path):
    png = encoded(PIXELS, "PNG")
    (tmp_path / "a.png").write_bytes(png)
    path = tmp_path / "a.png"
    for image in (Image.fromarray(PIXELS), PIXELS, png, path, str(path)):
        sent = image_ref(image)
        assert np.array_equal(decode_image(ImageRef(**sent), "x", LIMITS, None), PIXELS)
    assert image_ref(ImageRef(url="file:///a.png")) == {"url": "file:///a.png"}


def test_the_reward_version_follows_the_checkpoint_files(tiny_spatialscore_path, tmp_path):
    checkpoint = tiny_spatialscore_path
    cfg = RewardConfig(kind="spatialscore", spatialscore_path=str(checkpoint))
    version = reward_version(cfg)
    assert version.startswith("spatialscore@") and len(version) == len("spatialscore@") + 16

    moved = tmp_path / "moved"
    moved.mkdir()
    for path in checkpoint.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    assert reward_version(cfg.model_copy(update={"spatialscore_path": str(moved)})) == version
    head = moved / "reward_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    assert reward_version(cfg.model_copy(update={"spatialscore_path": str(moved)})) != version

    assert reward_version(RewardConfig(kind="shapes_rule")) == "shapes_rule"
    weighted = RewardConfig(kind="weighted", spatialscore_path=str(checkpoint),
                            weights={"spatialscore": 1.0, "shapes_rule": 0.5})
    assert reward_version(weighted) == f"weighted(shapes_rule*0.5+{version}*1.0)"


def test_files_checksum_reads_names_and_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"12")
    (tmp_path / "b").write_bytes(b"3")
    first = files_checksum([tmp_path / "a", tmp_path / "b"])
    assert files_checksum([tmp_path / "b", tmp_path / "a"]) == first
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"23")
    assert files_checksum([tmp_path / "a", tmp_path / "b"]) != first


TRAP_PICKLE = b"cbuiltins\nint\n(Vx\ntR."


def test_models_load_from_safetensors_only_never_from_a_pickle(tiny_models_dir, tmp_path):
    """A folder whose weights are a pickle fails to load, and the pickle is never opened."""
    import shutil

    flux = shutil.copytree(tiny_models_dir / "flux", tmp_path / "flux")
    weights = next((flux / "transformer").glob("*.safetensors"))
    weights.unlink()
    # Unpickling this would call int("x") and raise a ValueError, not the expected OSError.
    (flux / "transformer" / "diffusion_pytorch_model.bin").write_bytes(TRAP_PICKLE)
    with pytest.raises(OSError, match="safetensors"):
        load_flux_pipeline(PolicyModelConfig(pretrained=str(flux), dtype="float32"))

    qwen = shutil.copytree(tiny_models_dir / "qwen2.5-vl", tmp_path / "qwen")
    (qwen / "model.safetensors").unlink()
    (qwen / "pytorch_model.bin").write_bytes(TRAP_PICKLE)
    with pytest.raises(OSError, match="safetensors"):
        SpatialScore.from_config(SpatialScoreConfig(base_model=str(qwen), dtype="float32"))
