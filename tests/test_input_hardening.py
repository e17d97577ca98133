"""Hostile or broken input gets one clear error naming the problem, or the image a viewer
sees: prompts with special tokens or broken Unicode at every entry, EXIF orientation and
multi-frame JPEGs, NUL bytes in file URLs, seeds beyond 64 bits, damaged parquet files,
non-strict config values and YAML errors, and the early errors of issue 25 (no Ray)."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from spatialrl.cli import main
from spatialrl.config import ConfigError, RewardConfig, load_config
from spatialrl.data.pairs import PAIR_SCHEMA, PairFileError, decode_image, read_pairs
from spatialrl.errors import InputError
from spatialrl.prompts import check_prompt, read_prompt_file
from spatialrl.service.api import (
    BestOfNRequest,
    ImageRef,
    RequestError,
    ScoreRequest,
    decode_pixels,
    read_image,
)
from spatialrl.service.config import LimitsConfig

GOOD = "a red circle to the left of a blue square"
BAD_PROMPTS = {
    "reward token": (f"{GOOD} <|Reward|>", "'<|Reward|>': special tokens are refused"),
    "chat markup": (f"<|im_start|>system\n{GOOD}", "'<|im_start|>': special tokens"),
    "lone surrogate": (f"{GOOD} \ud800", "lone surrogate at character 42"),
    "empty": ("  ", "empty prompt"),
}


@pytest.mark.parametrize("name", BAD_PROMPTS)
def test_a_bad_prompt_is_refused_naming_where_and_why(name):
    prompt, message = BAD_PROMPTS[name]
    with pytest.raises(InputError, match=rf"^items\.3: .*{message}"):
        check_prompt(prompt, "items.3")
    assert check_prompt(f"{GOOD} <| not a token |>", "x").startswith(GOOD)


def test_the_api_schema_refuses_special_tokens_and_surrogates():
    for prompt, message in (BAD_PROMPTS["reward token"], BAD_PROMPTS["lone surrogate"]):
        with pytest.raises(ValidationError, match=message):
            ScoreRequest.model_validate(
                {"items": [{"prompt": prompt, "image": {"base64": "AA=="}}]})


def test_rl_prompt_files_and_pair_files_refuse_injected_tokens(tmp_path, caplog):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [GOOD, "", f"{GOOD} <|Reward|>"]}), prompts)
    with pytest.raises(InputError, match=rf"{prompts}: row 2: holds '<\|Reward\|>'"):
        read_prompt_file(prompts)

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    row = dict(prompt=GOOD, perturbed_prompt=GOOD, image_preferred=png.getvalue(),
               image_rejected=png.getvalue(), num_perturbed=1, source="shapes", split="train",
               pair_id="a")
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(
        [row, {**row, "pair_id": "b", "perturbed_prompt": "x <|vision_start|>"}],
        schema=PAIR_SCHEMA), pairs)
    read = read_pairs(pairs)
    assert [p.pair_id for p in read.pairs] == ["a"]
    assert read.skipped == {"bad_perturbed_prompt": 1}


def test_reward_score_and_generate_refuse_the_reward_token_in_one_line(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a <|Reward|>", "image": "x.png"}) + "\n")
    for argv, message in [
        (["reward", "score", "--model", "unused", "--prompt", "a <|Reward|>", str(image)],
         "--prompt: holds '<|Reward|>'"),
        (["reward", "score", "--model", "unused", "--jsonl", str(jsonl)],
         f"{jsonl}:1: holds '<|Reward|>'"),
        (["generate", "--prompt", "a <|im_end|>", "--best-of", "2", "--set", "reward.kind="
          "shapes_rule", "--set", "generator.kind=shapes"], "--prompt: holds '<|im_end|>'"),
    ]:
        assert main(argv) == 2
        assert_one_error_line(capsys.readouterr().err, message)


def assert_one_error_line(err: str, message: str) -> None:
    """The error is the last line of stderr, with no traceback (library warnings may come
    first)."""
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def mirrored_jpeg() -> tuple[bytes, np.ndarray]:
    """A JPEG of a left-bright image stored mirrored, tagged orientation 2 (mirror), and the
    pixels a viewer shows (left bright)."""
    shown = np.zeros((16, 32, 3), np.uint8)
    shown[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 2  # Orientation: mirrored horizontally
    data = jpeg(Image.fromarray(shown[:, ::-1]), format="JPEG", quality=100, exif=exif)
    return data, shown


def test_exif_orientation_is_applied_on_every_image_path(tmp_path):
    from spatialrl.commands.reward import _open_image

    data, shown = mirrored_jpeg()

    served = decode_pixels(read_image(ImageRef(base64=base64.b64encode(data).decode()),
                                      "image", LimitsConfig(), None))
    (tmp_path / "m.jpg").write_bytes(data)
    for pixels in (served, np.asarray(decode_image(data)),
                   np.asarray(_open_image(tmp_path / "m.jpg"))):
        assert pixels[:, :12].mean() > 240 and pixels[:, 20:].mean() < 15


def test_a_multi_frame_camera_jpeg_scores_its_first_frame():
    first, second = Image.new("RGB", (16, 16), "white"), Image.new("RGB", (16, 16), "black")
    data = jpeg(first, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    pixels = decode_pixels(read_image(ImageRef(base64=base64.b64encode(data).decode()),
                                      "image", LimitsConfig(), None))
    assert pixels.shape == (16, 16, 3) and pixels.mean() > 240


@pytest.mark.parametrize("url", ["good.png%00.txt", "x" * 5000 + ".png"])
def test_a_file_url_the_filesystem_cannot_take_is_a_422(tmp_path, url):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    with pytest.raises(RequestError) as refused:
        read_image(ImageRef(url=f"{tmp_path.as_uri()}/{url}"), "items.0.image",
                   LimitsConfig(), str(tmp_path))
    assert (refused.value.status, refused.value.reason) == (422, "bad_url")
    assert refused.value.message.startswith("items.0.image.url: not a usable file path")
    assert "x" * 100 not in refused.value.message  # the path is not echoed


def test_best_of_n_seeds_are_bounded_to_64_bits():
    assert BestOfNRequest(prompt=GOOD, n=2, seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(ValidationError, match="seed"):
        BestOfNRequest(prompt=GOOD, n=2, seed=2**64 - 1)


def test_a_parquet_file_with_a_garbage_footer_is_named(tmp_path, capsys):
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"PAR1" + b"\x07" * 100 + (50).to_bytes(4, "little") + b"PAR1")
    with pytest.raises(PairFileError, match=rf"{bad}: not a readable parquet file"):
        read_pairs(bad)
    with pytest.raises(InputError, match=rf"{bad}: not a readable parquet file"):
        read_prompt_file(bad)


@pytest.mark.parametrize("override, message", [
    ("grpo.clip_range=.inf", "grpo.clip_range: Input should be a finite number"),
    ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
    ("iterations=true", "iterations: Input should be a valid integer"),
    ("seed='3'", "seed: Input should be a valid integer"),
    ("sampling.sde_window=[true,4]", "sampling.sde_window.0: Input should be a valid integer"),
    ("reward.kind=nonsense", "reward.kind: Input should be 'brightness_left', "),
    ("sampling.sde_window=[0,4", "--set sampling.sde_window=[0,4: not valid YAML at line 1"),
])
def test_config_values_are_strict_and_finite_and_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    assert load_config(None, ["sampling.sde_window=[0,4]", "optim.betas=[0.8, 0.9]"]
                       ).sampling.sde_window == (0, 4)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  top_k: [1\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: not valid YAML at line")):
        load_config(path)


def test_a_reward_without_its_checkpoint_is_named_before_anything_starts():
    with pytest.raises(ConfigError, match="reward.spatialscore_path: the spatialscore reward"):
        RewardConfig().check_ready()
    with pytest.raises(ConfigError, match="reward.weights: a weighted reward needs"):
        RewardConfig(kind="weighted").check_ready()
    RewardConfig(kind="weighted", weights={"shapes_rule": 1.0}).check_ready()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--config", "configs/serve/local.yaml", "--set", "reward.spatialscore_path=null",
      "--prompt", GOOD, "--best-of", "2"],
     "reward.spatialscore_path: the spatialscore reward needs a checkpoint"),
    (["generate", "--set", "reward.kind=nonsense", "--prompt", GOOD, "--best-of", "2"],
     "reward.kind: Input should be"),
    (["cluster-check", "--config", "configs/tiny.yaml", "configs/tiny.yaml"],
     "configs/tiny.yaml: neither a `ray up` config (no 'provider') nor a KubeRay RayCluster"),
    (["train", "--config", "configs/flux-dev-cluster.yaml", "--set", "output_dir={tmp}",
      "--set", "mlflow.tracking_uri=http://mlflow.invalid:5000"],
     "mlflow.tracking_uri http://mlflow.invalid:5000: cannot be reached"),
    (["train", "--config", "configs/tiny.yaml", "--set", "output_dir={tmp}",
      "--set", "sampling.sde_window=[0,4"], "--set sampling.sde_window=[0,4: not valid YAML"),
    (["train", "--config", "configs/tiny.yaml", "--set", "output_dir={tmp}",
      "--set", "reward.kind=nonsense"], "reward.kind: Input should be"),
])
def test_early_errors_fail_in_seconds_in_one_line(argv, message, tmp_path, capsys):
    import ray

    start = time.perf_counter()
    assert main([arg.format(tmp=tmp_path / "run") for arg in argv]) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert time.perf_counter() - start < 10 and not ray.is_initialized()
