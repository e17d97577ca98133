"""SpatialScore on the tiny random Qwen2.5-VL: wiring, batching, training, checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
)

from spatialrl.config import ConfigError, validate_config
from spatialrl.reward import REWARD_TOKEN, SpatialScore, SpatialScoreConfig, gaussian_bt_loss
from spatialrl.reward.model import (
    ADAPTER_FILE,
    BACKBONE_FILE,
    CONFIG_FILE,
    HEAD_FILE,
    checkpoint_files,
    package_checkpoint,
)
from spatialrl.tiny.qwen_vl import REWARD_BACKBONE, write_tiny_qwen_vl

PROMPTS = [
    "a red circle to the left of a blue square",
    "a cat",
    "a green triangle above a yellow star, the star to the right of a small purple box",
]


@pytest.fixture(scope="module")
def tiny_qwen_path(tiny_models_dir):
    return tiny_models_dir / "qwen2.5-vl"


@pytest.fixture
def make_model(tiny_qwen_path):
    def make(**overrides) -> SpatialScore:
        torch.manual_seed(0)
        config = SpatialScoreConfig(
            base_model=str(tiny_qwen_path), dtype="float32", head_hidden_size=32, **overrides
        )
        return SpatialScore.from_config(config)

    return make


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def shape_image(colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
    return image


# Mixed sizes: 64x64 is 4 image tokens, 40x120 is 6, 200x150 is downscaled to 12.
IMAGES = [noise_image(64, 64, 0), noise_image(40, 120, 1), noise_image(200, 150, 2)]


def test_tiny_qwen_vl_loads_like_the_hub_model(tiny_qwen_path):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_path)
    image_processor = AutoImageProcessor.from_pretrained(tiny_qwen_path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    ids = tokenizer.convert_tokens_to_ids
    assert model.config.image_token_id == ids("<|image_pad|>")
    assert model.config.vision_start_token_id == ids("<|vision_start|>")
    assert model.config.vision_config.patch_size == 14
    assert model.config.vision_config.spatial_merge_size == 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # Every byte is in the vocabulary: unknown words still tokenize without <unk>.
    assert tokenizer.decode(tokenizer("a zebra-like qux")["input_ids"]) == "a zebra-like qux"
    grid = image_processor(images=[IMAGES[0]], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # 16 patches, merged 2x2 into 4 LLM tokens


def test_tiny_qwen_vl_is_reproducible(tmp_path):
    first = write_tiny_qwen_vl(tmp_path / "a", seed=0)
    again = write_tiny_qwen_vl(tmp_path / "b", seed=0)
    other = write_tiny_qwen_vl(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tiny_qwen_vl_weights_are_drawn_at_one_over_root_width(tiny_qwen_path):
    """Each tower's square projections have std 1/sqrt(its width), not the 7B's 0.02 (which
    left the tiny model on a long plateau before it bound prompt words to pixels)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_path)
    text, vision = model.config.text_config, model.config.vision_config
    weights = dict(model.named_parameters())
    for name, width in (
        ("model.language_model.layers.0.self_attn.q_proj.weight", text.hidden_size),
        ("model.visual.blocks.0.attn.proj.weight", vision.hidden_size),
    ):
        assert weights[name].std().item() == pytest.approx(width**-0.5, rel=0.1), name


def test_inputs_follow_the_chat_format(make_model):
    model = make_model()
    batch = model.prepare_inputs(IMAGES[:2], PROMPTS[:2])
    tokenizer = model.processor.tokenizer
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    user_turn = "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    assert user_turn in text
    assert f"Prompt: {PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n{REWARD_TOKEN}" in text
    assert text.endswith(REWARD_TOKEN)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 2]]


def test_score_is_the_same_alone_or_in_a_batch(make_model):
    model = make_model()
    alone = torch.cat([model.score([im], [p]).mu for im, p in zip(IMAGES, PROMPTS, strict=True)])
    assert alone.unique().numel() == len(IMAGES)
    for side in ("right", "left"):
        model.processor.tokenizer.padding_side = side
        batched = model.score(IMAGES, PROMPTS)
        torch.testing.assert_close(batched.mu, alone, rtol=1e-4, atol=1e-4)
        assert (batched.sigma > 0).all()
    reversed_batch = model.score(IMAGES[::-1], PROMPTS[::-1]).mu
    torch.testing.assert_close(reversed_batch.flip(0), alone, rtol=1e-4, atol=1e-4)


def test_head_reads_the_reward_token_under_left_and_right_padding(make_model):
    """One batch holds the same (image, prompt) right-padded and left-padded, beside a
    longer prompt that forces the padding."""
    model = make_model()
    model.processor.tokenizer.padding_side = "right"
    batch = model.prepare_inputs(
        [IMAGES[0], IMAGES[0], IMAGES[2]], [PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    )
    padding = int((batch["attention_mask"][1] == 0).sum())
    assert padding > 0
    for key in ("input_ids", "attention_mask"):  # make row 1 left-padded
        batch[key][1] = batch[key][1].roll(padding)
    reward_positions = (batch["input_ids"] == model.processor.reward_token_id).int().argmax(1)
    length = batch["input_ids"].shape[1]
    assert reward_positions.tolist()[:2] == [length - 1 - padding, length - 1]

    model.eval()
    with torch.no_grad():
        mu, _ = model(**batch)
    torch.testing.assert_close(mu[0], mu[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu[:1], model.score([IMAGES[0]], [PROMPTS[1]]).mu)


def test_forward_matches_the_plain_transformers_call(make_model):
    """The spliced reward embedding and our call of the backbone give what transformers gives
    for the same tokens with that embedding row, with Qwen's 3D (image) positions."""
    model = make_model().eval()
    batch = model.prepare_inputs(IMAGES, PROMPTS)
    vl_model = model.backbone.get_base_model().model
    with torch.no_grad():
        mu, log_sigma = model(**batch)
        vl_model.get_input_embeddings().weight[model.processor.reward_token_id] = (
            model.reward_embedding
        )
        hidden = vl_model(
            **batch, mm_token_type_ids=(batch["input_ids"] == vl_model.config.image_token_id)
        ).last_hidden_state
    is_reward = batch["input_ids"] == model.processor.reward_token_id
    expected = model.head(hidden[is_reward])
    torch.testing.assert_close(torch.stack([mu, log_sigma], -1), expected)


def test_only_the_reward_row_of_the_embeddings_trains(make_model):
    model = make_model()
    model.processor.tokenizer.padding_side = "left"  # fully masked pad rows stay harmless
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    embeddings = model.backbone.get_input_embeddings().weight
    assert not embeddings.requires_grad

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    mu, log_sigma = model(**model.prepare_inputs(IMAGES[:2], PROMPTS[:2]))
    gaussian_bt_loss(mu[:1], log_sigma[:1], mu[1:], log_sigma[1:], 1000).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()

    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed == (name in trainable), name
    assert embeddings.data_ptr() == model.backbone.get_input_embeddings().weight.data_ptr()
    assert "reward_embedding" in trainable


@pytest.mark.parametrize("train_vision_tower", [False, True])
def test_trainable_parts(make_model, train_vision_tower):
    model = make_model(train_vision_tower=train_vision_tower)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(".language_model.layers." in name for name in lora)
    # 2 layers x 7 projections x (A, B)
    assert len(lora) == 2 * 7 * 2
    vision = [name for name, p in model.named_parameters() if ".visual." in name]
    vision_trainable = [name for name in vision if name in trainable]
    assert bool(vision_trainable) == train_vision_tower
    assert {name for name in trainable if "lora_" not in name and ".visual." not in name} == {
        "reward_embedding", "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"
    }


RED_BLUE_PROMPTS = ["a red circle", "a red ball in the middle", "one red disk", "a red dot"]
REDS = [shape_image("red", size) for size in (64, 56, 72, 64)]
BLUES = [shape_image("blue", size) for size in (64, 56, 72, 64)]


def train_steps(
    model: SpatialScore, steps: int, lr: float = 1e-2, preferred=REDS, rejected=BLUES
) -> list[float]:
    """Adam on 4 pairs: for each prompt, a disc of `preferred` over one of `rejected`."""
    batch = model.prepare_inputs(preferred + rejected, RED_BLUE_PROMPTS * 2)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(steps):
        mu, log_sigma = model(**batch)
        loss = gaussian_bt_loss(
            mu[:4], log_sigma[:4], mu[4:], log_sigma[4:], model.config.mc_samples, generator
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_learn_a_preference(make_model):
    model = make_model()
    before = model.score(REDS + BLUES, RED_BLUE_PROMPTS * 2).mu
    # Teach the colour that the random model does not already prefer for every prompt.
    preferred, rejected = (BLUES, REDS) if (before[:4] > before[4:]).all() else (REDS, BLUES)
    losses = train_steps(model, 8, preferred=preferred, rejected=rejected)
    assert losses[-1] < 0.5 * losses[0]
    after = model.score(preferred + rejected, RED_BLUE_PROMPTS * 2).mu
    assert (after[:4] > after[4:]).all()


@pytest.mark.parametrize("train_vision_tower", [False, True])
def test_checkpoint_round_trip(make_model, tmp_path, tiny_qwen_path, train_vision_tower):
    model = make_model(train_vision_tower=train_vision_tower)
    train_steps(model, steps=1)  # LoRA B, head, reward token (and vision) leave their init
    expected = model.score(IMAGES, PROMPTS)
    folder = model.save_pretrained(tmp_path / "spatialscore")

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_config.json", ADAPTER_FILE, CONFIG_FILE, HEAD_FILE]
    )
    assert json.loads((folder / CONFIG_FILE).read_text())["config"]["base_model"] == str(
        tiny_qwen_path
    )
    adapter = load_file(folder / ADAPTER_FILE)
    assert any(".visual." in name for name in adapter) == train_vision_tower
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)

    loaded = SpatialScore.from_pretrained(folder)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    actual = loaded.score(IMAGES, PROMPTS)
    assert torch.equal(actual.mu, expected.mu) and torch.equal(actual.sigma, expected.sigma)

    # The base model may be given elsewhere, e.g. a local copy of the hub checkpoint.
    copy = shutil.copytree(tiny_qwen_path, tmp_path / "base-copy")
    moved = SpatialScore.from_pretrained(folder, base_model=str(copy), trainable=True)
    assert moved.config.base_model == str(copy)
    assert any(p.requires_grad for p in moved.parameters())
    assert torch.equal(moved.score(IMAGES, PROMPTS).mu, expected.mu)


def test_full_finetune_trains_saves_and_loads_the_whole_backbone(make_model, tmp_path,
                                                                  tiny_qwen_path):
    model = make_model(finetune="full")
    assert all(p.requires_grad for p in model.parameters())
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_path).state_dict()
    train_steps(model, steps=1)
    expected = model.score(IMAGES, PROMPTS)
    folder = model.save_pretrained(tmp_path / "full")
    assert checkpoint_files(folder) == [folder / n for n in
                                        (CONFIG_FILE, ADAPTER_FILE, HEAD_FILE, BACKBONE_FILE)]
    backbone = load_file(folder / BACKBONE_FILE)
    assert not any(".lora_" in name for name in backbone)
    key = "model.language_model.layers.0.mlp.down_proj"
    assert not torch.equal(backbone[f"{key}.base_layer.weight"], base[f"{key}.weight"])

    loaded = SpatialScore.from_pretrained(folder)
    assert torch.equal(loaded.score(IMAGES, PROMPTS).mu, expected.mu)
    # Its backbone weights cannot go into a LoRA model, nor load when missing.
    with pytest.raises(ValueError, match="would drop its backbone weights"):
        make_model().load_weights(folder)
    broken = shutil.copytree(folder, tmp_path / "without-backbone")
    (broken / BACKBONE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=BACKBONE_FILE):
        SpatialScore.from_pretrained(broken)
    truncated = shutil.copytree(folder, tmp_path / "truncated")
    save_file({k: v for k, v in backbone.items() if ".visual." not in k},
              truncated / BACKBONE_FILE)
    with pytest.raises(ValueError, match="missing tensors"):
        SpatialScore.from_pretrained(truncated)


def test_a_lora_checkpoint_starts_a_full_finetune(make_model, tmp_path):
    lora = make_model()
    train_steps(lora, steps=1)
    folder = lora.save_pretrained(tmp_path / "lora")
    full = make_model(finetune="full")
    full.load_weights(folder)
    assert torch.equal(full.score(IMAGES, PROMPTS).mu, lora.score(IMAGES, PROMPTS).mu)


def test_reward_backbone_is_deeper_with_a_small_rotary_theta(tiny_models_dir):
    text = AutoConfig.from_pretrained(tiny_models_dir / "qwen2.5-vl-reward").text_config
    assert text.num_hidden_layers == REWARD_BACKBONE["layers"] == 4
    assert text.rope_parameters["rope_theta"] == REWARD_BACKBONE["rope_theta"] == 2.0
    assert AutoConfig.from_pretrained(tiny_models_dir / "qwen2.5-vl").text_config \
        .num_hidden_layers == 2


def test_missing_checkpoint_files_are_named(make_model, tmp_path):
    folder = make_model().save_pretrained(tmp_path / "spatialscore")
    for name in (CONFIG_FILE, ADAPTER_FILE, HEAD_FILE):
        broken = shutil.copytree(folder, tmp_path / f"without-{name}")
        (broken / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            SpatialScore.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not found"):
        SpatialScore.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_are_rejected(make_model):
    model = make_model()
    image = IMAGES[0]
    cases = [
        ([image], [""], r"prompts\[0\]: empty"),
        ([image, image], ["a cat", "   "], r"prompts\[1\]: empty"),
        ([image], [None], r"prompts\[0\]: empty"),
        ([np.zeros((8, 8, 3))], ["a cat"], r"images\[0\]: expected a PIL image"),
        ([Image.new("RGB", (0, 0))], ["a cat"], r"images\[0\]: zero-size"),
        ([image, image], ["a cat"], "2 images but 1 prompts"),
        ([], [], "at least one image"),
        ([image], [f"a cat {REWARD_TOKEN}"], "special tokens"),
    ]
    for images, prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            model.score(images, prompts)


def test_config_validation():
    def load(**tree):
        return validate_config(SpatialScoreConfig, tree, "<test>")

    assert load().mc_samples == 1000
    with pytest.raises(ConfigError, match="instruction"):
        load(instruction="Rate this image.")
    with pytest.raises(ConfigError, match="min_pixels"):
        load(min_pixels=10_000, max_pixels=1_000)
    with pytest.raises(ConfigError, match="lora.ranks"):
        load(lora={"ranks": 8})
    with pytest.raises(ConfigError, match="mc_samples"):
        load(mc_samples=-1)
    with pytest.raises(ConfigError, match="train_vision_tower: finetune full already"):
        load(finetune="full", train_vision_tower=True)
    with pytest.raises(ConfigError, match="finetune"):
        load(finetune="partial")


def test_a_packaged_checkpoint_carries_its_base_model(tmp_path, tiny_qwen_path, monkeypatch):
    base = shutil.copytree(tiny_qwen_path, tmp_path / "base-elsewhere")
    torch.manual_seed(0)
    model = SpatialScore.from_config(SpatialScoreConfig(
        base_model=str(base), dtype="float32", head_hidden_size=32, finetune="full"))
    train_steps(model, steps=1)
    expected = model.score(IMAGES, PROMPTS).mu
    packaged = package_checkpoint(model.save_pretrained(tmp_path / "ckpt"), tmp_path / "shipped")
    shutil.rmtree(base)  # the package must not need the folder it was trained on
    monkeypatch.chdir(tmp_path / "ckpt")  # nor the working directory
    assert json.loads((packaged / CONFIG_FILE).read_text())["config"]["base_model"] == "base"
    loaded = SpatialScore.from_pretrained(packaged)
    assert torch.equal(loaded.score(IMAGES, PROMPTS).mu, expected)


def test_packaging_needs_a_local_base_model(make_model, tmp_path):
    folder = make_model().save_pretrained(tmp_path / "ckpt")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    saved["config"]["base_model"] = "Qwen/Qwen2.5-VL-7B-Instruct"
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        package_checkpoint(folder, tmp_path / "shipped")
