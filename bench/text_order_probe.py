"""Can the generator's text conditioning tell "A left of B" from "B left of A"?

FLUX gives every text token the same position id, so the transformer attends to the prompt
embeddings as a set: which object is the subject of a relation reaches it only through the
text encoders' contextual embeddings. This probe swaps subject and object in held-out
two-object prompts and measures, for each pipeline's encoders:

- T5 (the token embeddings the transformer attends to): the cosine between a word's embedding
  as the subject and the same word's as the object. 1 means the embedding carries no role.
  Beside it, the cosine between that word's embeddings in two unrelated prompts where it is
  the subject both times: how much context moves an embedding at all.
- CLIP's pooled embedding (the modulation input): cosine of the prompt and its swap, beside
  the cosine of the prompt and an unrelated one.

    .venv/bin/python bench/text_order_probe.py [--model models/shapes-flux ...] [--prompts 200]

Results: bench/results/text_order_probe.json.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch
from diffusers import FluxPipeline
from results_file import write_result

from spatialrl.data.grammar import Predicate
from spatialrl.data.shapes import sample_prompts

RELATIONS = sorted((predicate.phrase for predicate in Predicate), key=len, reverse=True)
TWO_OBJECTS = re.compile(rf"^(an? [a-z ]+?) ({'|'.join(RELATIONS)}) (an? [a-z ]+)$")


def swapped_pairs(count: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(prompt, its subject/object swap, the subject's words) for held-out prompts of two
    objects and one relation whose objects share no word."""
    pairs = []
    for prompt in sample_prompts(20 * count, seed=seed, split="test"):
        match = TWO_OBJECTS.match(prompt)
        if match is None:
            continue
        subject, relation, obj = match.groups()
        subject_words, object_words = subject.split()[1:], obj.split()[1:]
        if set(subject_words) & set(object_words):
            continue
        pairs.append((prompt, f"{obj} {relation} {subject}", subject_words))
        if len(pairs) == count:
            break
    return pairs


class Encoders:
    def __init__(self, pipeline: FluxPipeline, max_sequence_length: int):
        self.pipeline = pipeline
        self.length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """T5 token embeddings [L, D], CLIP's pooled embedding [D], the T5 tokens."""
        t5, pooled, _ = self.pipeline.encode_prompt(prompt=prompt, prompt_2=prompt,
                                                    max_sequence_length=self.length)
        ids = self.pipeline.tokenizer_2(prompt, max_length=self.length, truncation=True,
                                        padding="max_length").input_ids
        return t5[0], pooled[0], self.pipeline.tokenizer_2.convert_ids_to_tokens(ids)

    def word_vector(self, prompt: str, word: str) -> torch.Tensor:
        t5, _, tokens = self.encode(prompt)
        return t5[next(i for i, token in enumerate(tokens) if token.strip("▁") == word)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def probe(encoders: Encoders, pairs: list[tuple[str, str, list[str]]]) -> dict:
    role, context, pooled_swap, pooled_other = [], [], [], []
    for n, (prompt, swap, words) in enumerate(pairs):
        other_prompt, _, other_words = pairs[(n + 1) % len(pairs)]
        for word in words:
            role.append(cosine(encoders.word_vector(prompt, word),
                               encoders.word_vector(swap, word)))
        # the same word as the subject of another prompt, where there is one
        shared = [w for w in words if w in other_words]
        context += [cosine(encoders.word_vector(prompt, w), encoders.word_vector(other_prompt, w))
                    for w in shared]
        pooled = encoders.encode(prompt)[1]
        pooled_swap.append(cosine(pooled, encoders.encode(swap)[1]))
        pooled_other.append(cosine(pooled, encoders.encode(other_prompt)[1]))

    def summary(values: list[float]) -> dict:
        return {"mean": round(float(np.mean(values)), 5), "min": round(float(np.min(values)), 5),
                "n": len(values)} if values else {"n": 0}

    return {"t5_word_subject_vs_object": summary(role),
            "t5_word_subject_in_two_prompts": summary(context),
            "clip_pooled_prompt_vs_swap": summary(pooled_swap),
            "clip_pooled_prompt_vs_other_prompt": summary(pooled_other)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["models/shapes-flux"])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-sequence-length", type=int, default=40)
    parser.add_argument("--out", default="bench/results/text_order_probe.json")
    args = parser.parse_args()
    pairs = swapped_pairs(args.prompts, args.seed)
    result = {"prompts": len(pairs), "example": pairs[0][:2],
              "models": {model: probe(Encoders(FluxPipeline.from_pretrained(
                  model, torch_dtype=torch.float32), args.max_sequence_length), pairs)
                         for model in args.model}}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
