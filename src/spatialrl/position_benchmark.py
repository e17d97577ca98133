"""Position benchmarks for a policy: prompts, the scenes they state, and the rule that judges
relations.

- shapes: held-out shapes-world prompts, judged by the rule evaluator;
- real: held-out real-object prompts (or a prompt file of them), judged by a detector and the
  shapes evaluator's rules for the 2-D relations;
- geneval: GenEval's prompt metadata (evaluation_metadata.jsonl), its "position" lines, judged
  by a detector and GenEval's own position rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spatialrl.data.geometry import relation_holds
from spatialrl.data.grammar import Predicate, Relation, Scene, SceneObject, parse_prompt
from spatialrl.data.judge import RelationRule, geneval_relation_holds
from spatialrl.data.real_world import REAL_VOCABULARY
from spatialrl.data.shapes import sample_prompts
from spatialrl.data.worlds import WORLDS
from spatialrl.errors import InputError
from spatialrl.prompts import check_prompt, read_prompt_file

GENEVAL_POSITIONS = {p.value: p for p in
                     (Predicate.LEFT_OF, Predicate.RIGHT_OF, Predicate.ABOVE, Predicate.BELOW)}


@dataclass(frozen=True)
class PositionBenchmark:
    name: str  # "shapes", "real" or "geneval"
    prompts: list[str]  # what the policy is asked for
    scenes: list[Scene]  # what each prompt states
    rule: RelationRule = relation_holds

    @property
    def needs_detector(self) -> bool:
        return self.name != "shapes"


def held_out_benchmark(world: str, count: int, seed: int) -> PositionBenchmark:
    """`count` test-split prompts of a world, drawn from `seed`."""
    prompts = sample_prompts(count, seed=seed, split="test", world=WORLDS[world])
    return prompt_benchmark(world, prompts)


def prompt_benchmark(world: str, prompts: list[str]) -> PositionBenchmark:
    vocabulary = WORLDS[world].vocabulary
    return PositionBenchmark(world, prompts, [parse_prompt(p, vocabulary) for p in prompts])


def read_benchmark(path: Path, world: str, count: int) -> PositionBenchmark:
    """The first `count` prompts of a file: GenEval metadata (.jsonl) or a prompt file of
    `world` (.parquet, as `spatialrl data prompts` writes)."""
    if path.suffix == ".jsonl":
        prompts, scenes = read_geneval_positions(path)
        return PositionBenchmark("geneval", prompts[:count], scenes[:count],
                                 geneval_relation_holds)
    prompts = read_prompt_file(path)[:count]
    try:
        return prompt_benchmark(world, prompts)
    except ValueError as err:
        raise InputError(f"{path}: not a prompt file of the {world} world ({err})") from None


def read_geneval_positions(path: Path) -> tuple[list[str], list[Scene]]:
    """The prompts and scenes of a GenEval metadata file's "position" lines: each includes
    two objects, the second placed relative to the first ({"position": [relation, 0]})."""
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata not found: {path}")
    prompts, scenes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["tag"] != "position":
                continue
            scene = _geneval_scene(record["include"])
            prompts.append(check_prompt(record["prompt"], f"{path}: line {number}"))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise InputError(f"{path}: line {number}: not a GenEval position line "
                             f"({type(err).__name__}: {err})") from None
        scenes.append(scene)
    if not scenes:
        raise InputError(f"{path}: no GenEval line tagged 'position'")
    return prompts, scenes


def _geneval_scene(include: list[dict]) -> Scene:
    objects, relations = [], []
    for index, item in enumerate(include):
        if item["class"] not in REAL_VOCABULARY.nouns:
            raise ValueError(f"unknown class {item['class']!r}")
        if item.get("count", 1) != 1:
            raise ValueError(f"count {item['count']} (position lines count one of each)")
        objects.append(SceneObject(None, item["class"]))
        if "position" in item:
            relation, target = item["position"]
            if relation not in GENEVAL_POSITIONS:
                raise ValueError(f"unknown position {relation!r}")
            relations.append(Relation(index, GENEVAL_POSITIONS[relation], int(target)))
    return Scene(tuple(objects), tuple(relations), REAL_VOCABULARY)
