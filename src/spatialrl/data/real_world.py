"""Real-world spatial prompts: the shapes world's grammar and perturber over COCO's 80 object
classes, for FLUX-sized policies and a detector-based judge.

    a small brown dog to the left of a red couch, a white cat on the red couch

Classes carry a physical size class ("A on B" needs A no larger in kind than B: no bus on a
cup) and the colours such an object plausibly has (none for a person, a zebra or a pizza:
those are named by their class alone). Class names are GenEval's spelling of COCO's (its
"computer mouse", "tv remote" and "computer keyboard"), so GenEval's position prompts read
with this vocabulary too. Objects of one scene are of different classes: a detector tells
them apart by class.

The test split holds out pairs of classes: about a tenth of all class pairs never meet in a
training prompt, and every test prompt has at least one such pair among its objects.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np

from spatialrl.data.grammar import Scene, Vocabulary, sample_scene
from spatialrl.data.shapes import PromptWorld, split_code

# GenEval's colour words.
ANY_COLOUR = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
              "white")
_ANIMAL = ("black", "white", "brown")
_APPLIANCE = ("white", "black")

# Size classes: 0 hand-held, 1 carried in the arms, 2 furniture-sized, 3 person- to
# horse-sized, 4 vehicles and the largest animals.
OBJECT_CLASSES: dict[str, tuple[int, tuple[str, ...]]] = {
    "person": (3, ()),
    "bicycle": (2, ANY_COLOUR),
    "car": (4, ANY_COLOUR),
    "motorcycle": (3, ANY_COLOUR),
    "airplane": (4, ("white", "blue", "red")),
    "bus": (4, ("yellow", "red", "blue", "white", "green")),
    "train": (4, ("red", "blue", "yellow", "green", "black")),
    "truck": (4, ANY_COLOUR),
    "boat": (4, ("white", "red", "blue", "yellow")),
    "traffic light": (2, ()),
    "fire hydrant": (2, ("red", "yellow")),
    "stop sign": (2, ()),
    "parking meter": (2, ()),
    "bench": (3, ("brown", "green", "black", "white")),
    "bird": (1, ANY_COLOUR),
    "cat": (1, ("black", "white", "brown", "orange")),
    "dog": (2, _ANIMAL),
    "horse": (3, _ANIMAL),
    "sheep": (2, ("white", "black")),
    "cow": (3, _ANIMAL),
    "elephant": (4, ()),
    "bear": (3, _ANIMAL),
    "zebra": (3, ()),
    "giraffe": (4, ()),
    "backpack": (1, ANY_COLOUR),
    "umbrella": (1, ANY_COLOUR),
    "handbag": (1, ANY_COLOUR),
    "tie": (0, ANY_COLOUR),
    "suitcase": (2, ANY_COLOUR),
    "frisbee": (0, ANY_COLOUR),
    "skis": (2, ANY_COLOUR),
    "snowboard": (2, ANY_COLOUR),
    "sports ball": (0, ANY_COLOUR),
    "kite": (1, ANY_COLOUR),
    "baseball bat": (1, ("brown", "black")),
    "baseball glove": (0, ("brown", "black")),
    "skateboard": (1, ANY_COLOUR),
    "surfboard": (2, ANY_COLOUR),
    "tennis racket": (1, ANY_COLOUR),
    "bottle": (0, ("green", "brown", "blue", "white")),
    "wine glass": (0, ()),
    "cup": (0, ANY_COLOUR),
    "fork": (0, ()),
    "knife": (0, ()),
    "spoon": (0, ()),
    "bowl": (0, ANY_COLOUR),
    "banana": (0, ("yellow", "green")),
    "apple": (0, ("red", "green", "yellow")),
    "sandwich": (0, ()),
    "orange": (0, ("orange",)),
    "broccoli": (0, ("green",)),
    "carrot": (0, ("orange",)),
    "hot dog": (0, ()),
    "pizza": (1, ()),
    "donut": (0, ("pink", "brown")),
    "cake": (1, ("white", "pink", "brown")),
    "chair": (2, ANY_COLOUR),
    "couch": (3, ANY_COLOUR),
    "potted plant": (1, ()),
    "bed": (3, ("white", "blue", "pink", "brown")),
    "dining table": (3, ("brown", "white", "black")),
    "toilet": (2, ("white",)),
    "tv": (2, ("black",)),
    "laptop": (1, _APPLIANCE),
    "computer mouse": (0, _APPLIANCE),
    "tv remote": (0, ("black",)),
    "computer keyboard": (1, _APPLIANCE),
    "cell phone": (0, ("black", "white", "pink", "blue")),
    "microwave": (1, _APPLIANCE),
    "oven": (2, _APPLIANCE),
    "toaster": (1, ("white", "black", "red")),
    "sink": (2, ("white",)),
    "refrigerator": (3, _APPLIANCE),
    "book": (0, ANY_COLOUR),
    "clock": (1, ("white", "black", "brown")),
    "vase": (1, ANY_COLOUR),
    "scissors": (0, ("red", "blue", "black")),
    "teddy bear": (1, ("brown", "white", "pink")),
    "hair drier": (0, ("black", "white", "pink")),
    "toothbrush": (0, ("blue", "green", "pink", "white")),
}
OBJECT_NAMES = tuple(OBJECT_CLASSES)

REAL_VOCABULARY = Vocabulary(
    name="real",
    colours=ANY_COLOUR,
    nouns=OBJECT_NAMES,
    noun_kind="object",
    combos=tuple((colour, name) for name, (_, colours) in OBJECT_CLASSES.items()
                 for colour in (None, *colours)),
    distinct_by="noun",
    convex_nouns=frozenset(OBJECT_NAMES),  # the dent rule is for drawn stars only
    size_class={name: size for name, (size, _) in OBJECT_CLASSES.items()},
    # A size word for one object in four: "a small dog", "a large cup" (relative to its kind).
    size_choices=(None, None, None, None, None, None, "small", "large"),
)

# Half the objects are named by their class alone, the others with a plausible colour.
UNCOLOURED_SHARE = 0.5
HELD_OUT_SHARE = 10  # one class pair in this many is held out


def is_held_out(first: str, second: str) -> bool:
    """Whether the unordered class pair belongs to the test split (a fixed hash, so the
    split never changes with the seed)."""
    key = "|".join(sorted((first, second))).encode()
    return zlib.crc32(key) % HELD_OUT_SHARE == 0


HELD_OUT_PAIRS = frozenset(
    frozenset(pair) for pair in itertools.combinations(OBJECT_NAMES, 2) if is_held_out(*pair)
)


def held_out_pairs_in(scene: Scene) -> set[frozenset[str]]:
    """The scene's held-out class pairs: none in a train scene, some in a test scene."""
    nouns = [o.shape for o in scene.objects]
    return {frozenset(p) for p in itertools.combinations(nouns, 2) if is_held_out(*p)}


def sample_real_split_scene(
    rng: np.random.Generator,
    split: str,
    num_relations: int | tuple[int, int] = (2, 3),
    num_objects: int | tuple[int, int] = 3,
) -> Scene:
    """A random real-object scene that belongs to `split`."""
    want_held_out = split_code(split) == split_code("test")
    while True:
        scene = sample_scene(rng, num_objects, num_relations, _one_combo_per_class(rng),
                             vocabulary=REAL_VOCABULARY)
        if bool(held_out_pairs_in(scene)) == want_held_out:
            return scene


def _one_combo_per_class(rng: np.random.Generator) -> list[tuple[str | None, str]]:
    """One (colour, class) per class, so every class is drawn equally often whatever the
    number of colours it comes in."""
    combos = []
    for name, (_, colours) in OBJECT_CLASSES.items():
        uncoloured = not colours or rng.random() < UNCOLOURED_SHARE
        combos.append((None if uncoloured else str(rng.choice(colours)), name))
    return combos


# 2-3 clauses per prompt: three objects, two or three relations among them.
REAL_WORLD = PromptWorld(REAL_VOCABULARY, sample_real_split_scene, (2, 3), (3, 3))
