"""A zero-shot detector as an `ObjectLocator` (spatialrl.data.judge): OWLv2 through
transformers finds each scene object by its class name and gives its box.

Each object is the box that matches its class best, if that box scores at least the
threshold (GenEval reads its detector the same way: the most confident box of the class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Owlv2ForObjectDetection, Owlv2Processor

from spatialrl.data.geometry import ObjectFeatures, work_shape
from spatialrl.data.grammar import Scene, SceneObject
from spatialrl.data.judge import BOX_PREDICATES
from spatialrl.data.rule_evaluator import ImageLike

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_THRESHOLD = 0.2


class OwlDetector:
    """Objects by class with OWLv2; 2-D relations only (boxes tell no depth or contact)."""

    checkable = BOX_PREDICATES

    def __init__(self, model: Owlv2ForObjectDetection, processor: Owlv2Processor,
                 threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.threshold = threshold
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_DETECTOR, device: str = "cpu",
                        threshold: float = DEFAULT_THRESHOLD) -> OwlDetector:
        try:
            model = Owlv2ForObjectDetection.from_pretrained(name)
            processor = Owlv2Processor.from_pretrained(name)
        except OSError as err:  # no such folder, or a hub id that cannot be reached
            raise FileNotFoundError(f"detector {name!r}: no OWLv2 model there ({err})") from None
        return cls(model.to(device).eval(), processor, threshold)

    def locate(
        self, images: Sequence[ImageLike], scenes: Sequence[Scene]
    ) -> list[list[ObjectFeatures | None]]:
        found = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            found += self._locate_batch([_rgb(i) for i in images[start:end]], scenes[start:end])
        return found

    @torch.no_grad()
    def _locate_batch(
        self, images: list[Image.Image], scenes: Sequence[Scene]
    ) -> list[list[ObjectFeatures | None]]:
        queries = [[f"a photo of {SceneObject(None, o.shape).noun_phrase(first_mention=True)}"
                    for o in scene.objects] for scene in scenes]
        inputs = self.processor(text=queries, images=images, return_tensors="pt")
        outputs = self.model(**inputs.to(self.model.device))
        scores = outputs.logits.sigmoid().float().cpu().numpy()  # (image, box, query)
        boxes = outputs.pred_boxes.float().cpu().numpy()  # (image, box, cx cy w h)
        found = []
        for index, (image, scene) in enumerate(zip(images, scenes, strict=True)):
            best = scores[index].argmax(axis=0)
            found.append([
                _box_features(boxes[index, best[q]], image.size)
                if scores[index, best[q], q] >= self.threshold else None
                for q in range(len(scene.objects))
            ])
        return found


def _rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.asarray(image, dtype=np.uint8))
    return image.convert("RGB")


def _box_features(box: np.ndarray, size: tuple[int, int]) -> ObjectFeatures:
    """A box as object geometry. OWLv2 pads images to a square at the bottom and right and
    gives (centre x, centre y, width, height) as fractions of that square."""
    width, height = size
    side = max(width, height)
    cx, cy, w, h = box
    x0, x1 = np.clip([(cx - w / 2) * side / width, (cx + w / 2) * side / width], 0, 1)
    y0, y1 = np.clip([(cy - h / 2) * side / height, (cy + h / 2) * side / height], 0, 1)
    mask_width, mask_height = work_shape(width, height)
    mask = np.zeros((mask_height, mask_width), dtype=bool)
    mask[_span(y0, y1, mask_height), _span(x0, x1, mask_width)] = True
    return ObjectFeatures(mask=mask, convex=True, centroid=((x0 + x1) / 2, (y0 + y1) / 2),
                          bbox=(float(x0), float(y0), float(x1), float(y1)))


def _span(low: float, high: float, pixels: int) -> slice:
    """The pixels a [low, high] fraction covers, at least one."""
    first = min(int(low * pixels), pixels - 1)
    return slice(first, max(int(np.ceil(high * pixels)), first + 1))
