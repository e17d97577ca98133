"""Prompt embeddings through the pipeline's own `encode_prompt`, each prompt encoded once.

GRPO samples G images per prompt, and prompts recur across iterations; the text encoders are
frozen, so an embedding never goes stale. Prompts are encoded one at a time so that a prompt's
embedding does not depend on which other prompts share its batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # [B, max_sequence_length, T5 dim]: the transformer's context
    pooled_prompt_embeds: torch.Tensor  # [B, CLIP dim]: pooled CLIP, conditions the modulation
    text_ids: torch.Tensor  # [max_sequence_length, 3]: RoPE positions of the text tokens (zeros)


class PromptEmbeddingCache:
    """Least-recently-used (prompt, max_sequence_length) -> embeddings of one pipeline."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], PromptEmbeddings] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int]) -> PromptEmbeddings | None:
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key: tuple[str, int], value: PromptEmbeddings) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def encode_prompts(
    pipeline: FluxPipeline,
    prompts: list[str],
    max_sequence_length: int,
    cache: PromptEmbeddingCache | None = None,
) -> PromptEmbeddings:
    """Embeddings of `prompts` (repeats allowed), in order. Without a cache, repeats within the
    call are still encoded once."""
    if not prompts:
        raise ValueError("encode_prompts: no prompts given")
    cache = PromptEmbeddingCache() if cache is None else cache
    rows = []
    for prompt in prompts:
        key = (prompt, max_sequence_length)
        row = cache.get(key)
        if row is None:
            row = _encode_one(pipeline, prompt, max_sequence_length)
            cache.put(key, row)
        rows.append(row)
    return PromptEmbeddings(
        prompt_embeds=torch.cat([row.prompt_embeds for row in rows]),
        pooled_prompt_embeds=torch.cat([row.pooled_prompt_embeds for row in rows]),
        text_ids=rows[0].text_ids,
    )


@torch.no_grad()
def _encode_one(pipeline: FluxPipeline, prompt: str, max_sequence_length: int) -> PromptEmbeddings:
    prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
        prompt=[prompt], prompt_2=None, max_sequence_length=max_sequence_length
    )
    return PromptEmbeddings(prompt_embeds, pooled_prompt_embeds, text_ids)
