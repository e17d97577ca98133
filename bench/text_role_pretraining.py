"""Can the generator's tiny T5 learn to carry who is the subject of a relation?

bench/text_order_probe.py finds that the shipped generator's T5 embeds a word alike as the
subject and as the object (cosine 0.9996), so its transformer, which sees the text tokens as a
set (FLUX gives them one position id), cannot learn relations. Real FLUX.1 conditions on a
frozen T5 pretrained on language. This probe trains the shipped T5 on train-split prompts with
a stand-in for that pretraining: a set decoder (learned queries cross-attending to the T5
token embeddings, with no positions, as the transformer sees them) must name the first
relation's subject colour and shape, its predicate and its object colour and shape. Two arms:
the decoder alone on the T5 as shipped (what its embeddings already carry), and the T5 trained
with it. Each reports the decoder's accuracy on held-out prompts (unseen colour/shape
combinations) and text_order_probe's figures for its T5.

    OMP_NUM_THREADS=1 .venv/bin/python bench/text_role_pretraining.py [--steps 1500]

Results: bench/results/text_role_pretraining.json. A probe: the generator is not rebuilt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import FluxPipeline
from results_file import write_result
from text_order_probe import Encoders, probe, swapped_pairs
from torch import nn

from spatialrl.data.grammar import SHAPES_VOCABULARY, Predicate, scene_to_prompt
from spatialrl.data.shapes import sample_split_scene

COLOURS, SHAPES = sorted(SHAPES_VOCABULARY.colours), sorted(SHAPES_VOCABULARY.nouns)
SLOTS = {"subject_colour": COLOURS, "subject_shape": SHAPES, "predicate": list(Predicate),
         "object_colour": COLOURS, "object_shape": SHAPES}


def labelled_prompts(rng: np.random.Generator, split: str, count: int
                     ) -> tuple[list[str], torch.Tensor]:
    prompts, labels = [], []
    for _ in range(count):
        scene = sample_split_scene(rng, split)
        relation = scene.relations[0]
        subject, obj = scene.objects[relation.subject_index], scene.objects[relation.object_index]
        values = (subject.colour, subject.shape, relation.predicate, obj.colour, obj.shape)
        prompts.append(scene_to_prompt(scene))
        labels.append([vocab.index(v) for vocab, v in zip(SLOTS.values(), values, strict=True)])
    return prompts, torch.tensor(labels)


class SetDecoder(nn.Module):
    """One learned query per slot, attending to the token embeddings without positions."""

    def __init__(self, width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(SLOTS), width) * 0.02)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.heads = nn.ModuleList([nn.Linear(width, len(v)) for v in SLOTS.values()])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        slots, _ = self.attention(queries, tokens, tokens, key_padding_mask=~mask.bool())
        return [head(slots[:, i]) for i, head in enumerate(self.heads)]


def train_arm(args: argparse.Namespace, train_t5: bool, held_out) -> dict:
    """Train the set decoder, and the T5 with it when `train_t5`; held-out accuracy per
    slot as it goes, and text_order_probe's figures for the T5 at the end."""
    torch.manual_seed(0)
    pipeline = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    t5, tokenizer = pipeline.text_encoder_2, pipeline.tokenizer_2
    t5.requires_grad_(train_t5)
    decoder = SetDecoder(t5.config.d_model)
    trained = [*decoder.parameters(), *(t5.parameters() if train_t5 else [])]
    optimizer = torch.optim.AdamW(trained, lr=args.lr)

    def predict(prompts: list[str]) -> list[torch.Tensor]:
        tokens = tokenizer(prompts, max_length=args.max_sequence_length, padding="max_length",
                           truncation=True, return_tensors="pt")
        return decoder(t5(tokens.input_ids, attention_mask=tokens.attention_mask)[0],
                       tokens.attention_mask)

    @torch.no_grad()
    def accuracy() -> dict[str, float]:
        t5.eval()
        outputs = predict(held_out[0])
        t5.train(train_t5)
        return {slot: round(float((out.argmax(-1) == held_out[1][:, i]).float().mean()), 3)
                for i, (slot, out) in enumerate(zip(SLOTS, outputs, strict=True))}

    rng, start, curve = np.random.default_rng(0), time.perf_counter(), []
    t5.train(train_t5)
    for step in range(1, args.steps + 1):
        prompts, labels = labelled_prompts(rng, "train", args.batch_size)
        loss = sum(nn.functional.cross_entropy(out, labels[:, i])
                   for i, out in enumerate(predict(prompts)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            curve.append({"step": step, "loss": round(loss.item(), 3), **accuracy()})
            print(train_t5, curve[-1], flush=True)
    seconds = time.perf_counter() - start
    t5.eval()
    encoders = Encoders(pipeline, args.max_sequence_length)
    return {"slot_accuracy": curve, "train_seconds": round(seconds, 1),
            "text_order_probe": probe(encoders, swapped_pairs(200, seed=3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/shapes-flux")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-sequence-length", type=int, default=40)
    parser.add_argument("--out", default="bench/results/text_role_pretraining.json")
    args = parser.parse_args()
    held_out = labelled_prompts(np.random.default_rng(123), "test", 500)
    write_result({"held_out_prompts": len(held_out[0]),
                  "decoder_only_t5_as_shipped": train_arm(args, False, held_out),
                  "t5_and_decoder": train_arm(args, True, held_out)}, args.out)


if __name__ == "__main__":
    main()
