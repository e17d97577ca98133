"""SpatialScore: Qwen2.5-VL with LoRA, a trainable `<|Reward|>` token and an (mu, log_sigma) head.

A training loop calls `prepare_inputs(images, prompts)` (CPU preprocessing, e.g. in a data
loader) and then `model(**inputs) -> HeadOutput(mu, log_sigma)`; scoring calls `score`.

Only the `<|Reward|>` row of the input embeddings is trained: it lives in its own fp32
parameter that is spliced into the embedded sequence, so the embedding matrix stays frozen
and no optimizer or weight decay can touch its other rows.

A checkpoint folder holds safetensors only, never pickles:
- spatialscore.json: the SpatialScoreConfig (naming the base model) and the reward token,
- adapter_config.json + adapter_model.safetensors: the peft LoRA adapter (and the vision tower
  when it is trained),
- reward_head.safetensors: the head and the reward-token embedding,
- backbone.safetensors (finetune full only): every other backbone weight.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BatchFeature, Qwen2_5_VLForConditionalGeneration

from spatialrl.reward.config import RewardLoraConfig, SpatialScoreConfig
from spatialrl.reward.inputs import REWARD_TOKEN, SpatialScoreProcessor

CONFIG_FILE = "spatialscore.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
HEAD_FILE = "reward_head.safetensors"
BACKBONE_FILE = "backbone.safetensors"


class HeadOutput(NamedTuple):
    mu: torch.Tensor  # [B] fp32
    log_sigma: torch.Tensor  # [B] fp32


@dataclass
class ScoreOutput:
    mu: torch.Tensor  # [B] fp32, the score
    sigma: torch.Tensor  # [B] fp32, its uncertainty


class SpatialScore(nn.Module):
    def __init__(
        self, backbone: PeftModel, processor: SpatialScoreProcessor, config: SpatialScoreConfig
    ):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.config = config
        embeddings = self._vision_language_model.get_input_embeddings().weight
        # Starts at the mean embedding, as transformers initialises added tokens.
        self.reward_embedding = nn.Parameter(embeddings.detach().float().mean(0))
        hidden_size = embeddings.shape[1]
        self.head = nn.Sequential(
            nn.Linear(hidden_size, config.head_hidden_size),
            nn.GELU(),
            nn.Linear(config.head_hidden_size, 2),
        ).float()
        if config.finetune == "full":
            self.requires_grad_(True)

    @classmethod
    def from_config(cls, config: SpatialScoreConfig) -> SpatialScore:
        """A new reward model on `config.base_model`: fresh LoRA adapter, head and reward
        token, initialised from torch's global generator. Trainable: LoRA, head, reward-token
        embedding, and the vision tower if configured."""
        processor = SpatialScoreProcessor.from_config(config)
        backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            config.base_model,
            revision=config.revision,
            dtype=getattr(torch, config.dtype),
            attn_implementation=config.attn_implementation,
            use_safetensors=True,  # never a pickled checkpoint
        )
        return cls.from_backbone(backbone, processor, config)

    @classmethod
    def from_backbone(
        cls,
        backbone: Qwen2_5_VLForConditionalGeneration,
        processor: SpatialScoreProcessor,
        config: SpatialScoreConfig,
    ) -> SpatialScore:
        """A new reward model on a backbone already built (e.g. random weights of a config,
        for benchmarks): what from_config does after loading it."""
        # Qwen pads its embedding matrix (152064 rows for 151665 tokens), so the new token
        # usually fits already; never shrink.
        rows = backbone.get_input_embeddings().weight.shape[0]
        backbone.resize_token_embeddings(max(rows, len(processor.tokenizer)), mean_resizing=False)
        if config.gradient_checkpointing:
            backbone.activation_checkpointing_enable({"use_reentrant": False})
        with warnings.catch_warnings():  # peft reads transformers' deprecated property
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            backbone = get_peft_model(
                backbone, lora_config(config.lora, config.train_vision_tower))
        return cls(backbone, processor, config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base_model: str | None = None, trainable: bool = False
    ) -> SpatialScore:
        """Load a checkpoint folder (or hub repo) written by `save_pretrained`.

        `base_model` replaces the base model the checkpoint names (e.g. a local copy of it).
        The model comes back in eval mode, frozen unless `trainable`.
        """
        folder = checkpoint_folder(path)
        config = read_checkpoint_config(folder)
        if base_model is not None:
            config = config.model_copy(update={"base_model": base_model})
        model = cls.from_config(config)
        model.load_weights(folder)
        if not trainable:
            model.requires_grad_(False)
        return model.eval()

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = {
            "config": self.config.model_dump(mode="json"),
            "reward_token": REWARD_TOKEN,
            "reward_token_id": self.processor.reward_token_id,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        self.backbone.peft_config["default"].save_pretrained(out_dir)
        adapter = get_peft_model_state_dict(self.backbone, save_embedding_layers=False)
        save_file(_contiguous(adapter), out_dir / ADAPTER_FILE)
        save_file(_contiguous(self._reward_state()), out_dir / HEAD_FILE)
        if self.config.finetune == "full":
            save_file(_contiguous(self._backbone_state()), out_dir / BACKBONE_FILE)
        return out_dir

    def _reward_state(self) -> dict[str, torch.Tensor]:
        state = {f"head.{name}": value for name, value in self.head.state_dict().items()}
        return {**state, "reward_embedding": self.reward_embedding.detach()}

    def _backbone_state(self) -> dict[str, torch.Tensor]:
        """The base model's weights as peft wraps them, the LoRA matrices left out."""
        state = self.backbone.get_base_model().state_dict()
        return {name: value for name, value in state.items() if ".lora_" not in name}

    def load_weights(self, path: str | Path) -> None:
        """Load a checkpoint's trained weights (adapter, head, reward token, and with finetune
        full the backbone) into this model, whose config must build the same shapes."""
        folder = checkpoint_folder(path)
        saved = read_checkpoint_config(folder)
        if saved.finetune == "full":  # a LoRA checkpoint may start a full fine-tune
            if self.config.finetune != "full":
                raise ValueError(
                    f"{folder / CONFIG_FILE}: a finetune full checkpoint, but this model has "
                    f"finetune {self.config.finetune}, which would drop its backbone weights"
                )
            backbone = load_file(folder / BACKBONE_FILE)
            _check_tensor_names(folder / BACKBONE_FILE, backbone, self._backbone_state())
            self.backbone.get_base_model().load_state_dict(backbone, strict=False)
        reward_token_id = json.loads((folder / CONFIG_FILE).read_text())["reward_token_id"]
        if reward_token_id != self.processor.reward_token_id:
            raise ValueError(
                f"{folder / CONFIG_FILE}: {REWARD_TOKEN} had id {reward_token_id} but has "
                f"{self.processor.reward_token_id} with the tokenizer of {self.config.base_model}"
            )
        adapter = load_file(folder / ADAPTER_FILE)
        _check_tensor_names(folder / ADAPTER_FILE, adapter, get_peft_model_state_dict(
            self.backbone, save_embedding_layers=False))
        set_peft_model_state_dict(self.backbone, adapter)
        state = load_file(folder / HEAD_FILE)
        with torch.no_grad():
            self.reward_embedding.copy_(state.pop("reward_embedding"))
        self.head.load_state_dict(
            {name.removeprefix("head."): value for name, value in state.items()}
        )

    @property
    def device(self) -> torch.device:
        return self.reward_embedding.device

    @property
    def _vision_language_model(self) -> nn.Module:
        """The Qwen2_5_VLModel inside (LoRA layers are injected in place); calling it
        directly skips the LM head, which a reward never needs."""
        return self.backbone.get_base_model().model

    def prepare_inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> BatchFeature:
        return self.processor(images, prompts)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> HeadOutput:
        is_reward = input_ids == self.processor.reward_token_id
        if not (is_reward.sum(1) == 1).all():
            raise ValueError(f"every row needs exactly one {REWARD_TOKEN} token")
        vl_model = self._vision_language_model
        embeds = vl_model.get_input_embeddings()(input_ids)
        embeds = torch.where(is_reward[..., None], self.reward_embedding.to(embeds.dtype), embeds)
        hidden = vl_model(
            input_ids=input_ids,  # still needed to place image features and 3D positions
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            # Marks image tokens; without it the model falls back to 1D positions that
            # ignore padding, and a score would depend on its batch.
            mm_token_type_ids=(input_ids == vl_model.config.image_token_id).int(),
            use_cache=False,
        ).last_hidden_state
        # One position per row wherever padding put it; boolean indexing keeps row order.
        mu, log_sigma = self.head(hidden[is_reward].float()).unbind(-1)
        return HeadOutput(mu=mu, log_sigma=log_sigma)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> ScoreOutput:
        inputs = self.prepare_inputs(images, prompts).to(self.device)
        with _eval_mode(self):
            mu, log_sigma = self(**inputs)
        return ScoreOutput(mu=mu, sigma=log_sigma.exp())


def lora_config(lora: RewardLoraConfig, train_vision_tower: bool = False) -> LoraConfig:
    """LoRA on a Qwen-VL language model's decoder projections only (the vision tower has
    layers with the same names); the whole vision tower trains beside it when asked."""
    names = "|".join(map(re.escape, lora.target_modules))
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=rf"model\.language_model\.layers\.\d+\.\w+\.(?:{names})",
        modules_to_save=["visual"] if train_vision_tower else None,
    )


def checkpoint_files(folder: Path) -> list[Path]:
    """The files `from_pretrained` reads from a checkpoint folder."""
    names = [CONFIG_FILE, ADAPTER_FILE, HEAD_FILE]
    if read_checkpoint_config(folder).finetune == "full":
        names.append(BACKBONE_FILE)
    return [folder / name for name in names]


def read_checkpoint_config(folder: Path) -> SpatialScoreConfig:
    """The config a checkpoint folder was saved with; every file it needs must be there."""
    for name in (CONFIG_FILE, ADAPTER_FILE, HEAD_FILE):
        _required(folder / name)
    config = SpatialScoreConfig.model_validate(
        json.loads((folder / CONFIG_FILE).read_text())["config"])
    if config.finetune == "full":
        _required(folder / BACKBONE_FILE)
    bundled = folder / config.base_model
    if not Path(config.base_model).is_absolute() and bundled.is_dir():
        # A packaged checkpoint carries its base model in a subfolder (package_checkpoint).
        config = config.model_copy(update={"base_model": str(bundled)})
    return config


BUNDLED_BASE_DIR = "base"


def package_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A self-contained copy of a checkpoint: its files plus the base model it names (a
    local folder) in `out_dir/base`, so the folder loads anywhere, e.g. shipped in a repo."""
    folder = checkpoint_folder(checkpoint)
    config = read_checkpoint_config(folder)
    base = Path(config.base_model)
    if not base.is_dir():
        raise FileNotFoundError(f"{folder}: its base model {base} is not a local folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [CONFIG_FILE, ADAPTER_FILE, HEAD_FILE, "adapter_config.json"]
    for name in names + ([BACKBONE_FILE] if config.finetune == "full" else []):
        shutil.copy2(folder / name, out_dir / name)
    shutil.copytree(base, out_dir / BUNDLED_BASE_DIR, dirs_exist_ok=True)
    saved = json.loads((out_dir / CONFIG_FILE).read_text())
    saved["config"]["base_model"] = BUNDLED_BASE_DIR
    (out_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    return out_dir


def _required(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"SpatialScore checkpoint is missing {path}")
    return path


def _check_tensor_names(path: Path, loaded: dict, expected: dict) -> None:
    if missing := sorted(expected.keys() - loaded.keys()):
        raise ValueError(f"{path}: missing tensors {missing[:5]}")
    if unexpected := sorted(loaded.keys() - expected.keys()):
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}")


def checkpoint_folder(path: str | Path) -> Path:
    """A local folder as is; anything else that is not a path is a hub repo id."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"SpatialScore checkpoint folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
    except OSError as err:  # no such repo, or the hub cannot be reached: one line, not hub's
        first_line = str(err).strip().splitlines()[0]
        raise FileNotFoundError(f"SpatialScore checkpoint {path!r}: not a local folder, nor a "
                                f"hub repo that can be loaded here ({first_line})") from None


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}
