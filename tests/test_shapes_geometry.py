"""The evaluator's relation rules on hand-drawn images, independent of the renderer."""

import math

import pytest
from PIL import Image, ImageDraw

from spatialrl.data.grammar import COLOURS
from spatialrl.data.rule_evaluator import evaluate

SIZE = 100


def _draw(*shapes):
    """shapes: (kind, colour, cx, cy, half) in percent of the image, drawn in order."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    painter = ImageDraw.Draw(image)
    for kind, colour, cx, cy, half in shapes:
        box = [cx - half, cy - half, cx + half, cy + half]
        if kind == "circle":
            painter.ellipse(box, fill=COLOURS[colour])
        elif kind == "square":
            painter.rectangle(box, fill=COLOURS[colour])
        else:  # star
            points = [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for k in range(10)
                for a, r in [(-math.pi / 2 + k * math.pi / 5, half if k % 2 == 0 else half / 2)]
            ]
            painter.polygon(points, fill=COLOURS[colour])
    return image


def _holds(image, prompt):
    return evaluate(image, prompt).per_relation[0]


@pytest.mark.parametrize(
    "red_centre, blue_centre, relations",
    [
        ((25, 50), (75, 50), {"to the left of"}),
        ((44, 50), (56, 50), {"to the left of"}),  # close, but 12 % apart
        ((75, 50), (25, 50), {"to the right of"}),
        ((50, 20), (50, 80), {"above"}),
        ((50, 80), (50, 20), {"below"}),
        ((30, 30), (70, 70), {"to the left of", "above"}),  # diagonal: both hold
        ((50, 20), (52, 80), {"above"}),  # 2 % to the side is not "left of"
        ((20, 45), (80, 50), {"to the left of"}),  # 5 % higher is not "above"
        ((15, 15), (25, 85), {"above"}),  # outside the cone around "left of"
    ],
)
def test_directions(red_centre, blue_centre, relations):
    image = _draw(("circle", "red", *red_centre, 5), ("square", "blue", *blue_centre, 5))
    for phrase in ("to the left of", "to the right of", "above", "below"):
        expected = phrase in relations
        assert _holds(image, f"a red circle {phrase} a blue square") == expected, phrase


def test_on_needs_contact_and_horizontal_overlap():
    touching = _draw(("circle", "red", 50, 40, 10), ("square", "blue", 55, 65, 15))
    assert _holds(touching, "a red circle on a blue square")
    assert _holds(touching, "a blue square under a red circle")
    assert not _holds(touching, "a blue square on a red circle")
    floating = _draw(("circle", "red", 50, 25, 10), ("square", "blue", 55, 65, 15))
    assert not _holds(floating, "a red circle on a blue square")
    beside = _draw(("circle", "red", 20, 40, 10), ("square", "blue", 60, 65, 15))
    assert not _holds(beside, "a red circle on a blue square")


def test_next_to_needs_a_small_gap():
    near = _draw(("circle", "red", 30, 50, 12), ("square", "blue", 55, 50, 10))
    far = _draw(("circle", "red", 15, 50, 12), ("square", "blue", 85, 50, 10))
    assert _holds(near, "a red circle next to a blue square")
    assert _holds(near, "a blue square next to a red circle")
    assert not _holds(far, "a red circle next to a blue square")


def test_occlusion_by_a_corner_or_curve_is_read():
    circle_over_square = _draw(("square", "blue", 40, 40, 18), ("circle", "red", 62, 62, 15))
    assert _holds(circle_over_square, "a red circle in front of a blue square")
    assert _holds(circle_over_square, "a blue square behind a red circle")
    assert not _holds(circle_over_square, "a blue square in front of a red circle")
    square_over_circle = _draw(("circle", "red", 62, 62, 15), ("square", "blue", 40, 40, 18))
    assert _holds(square_over_circle, "a blue square in front of a red circle")
    assert not _holds(square_over_circle, "a red circle in front of a blue square")


def test_apart_or_straight_edge_cut_objects_have_no_depth_order():
    apart = _draw(("square", "blue", 25, 50, 15), ("circle", "red", 75, 50, 15))
    assert not _holds(apart, "a red circle in front of a blue square")
    assert not _holds(apart, "a blue square in front of a red circle")
    # A square covering another's side leaves two whole-looking rectangles: no evidence.
    straight = _draw(("square", "blue", 35, 50, 15), ("square", "red", 55, 50, 15))
    assert not _holds(straight, "a red square in front of a blue square")
    assert not _holds(straight, "a blue square in front of a red square")


def test_occlusion_with_a_star():
    star_over_square = _draw(("square", "blue", 40, 40, 18), ("star", "red", 55, 57, 18))
    assert _holds(star_over_square, "a red star in front of a blue square")
    assert not _holds(star_over_square, "a blue square in front of a red star")
    square_over_star = _draw(("star", "red", 55, 57, 18), ("square", "blue", 40, 40, 18))
    assert _holds(square_over_star, "a blue square in front of a red star")
    assert not _holds(square_over_star, "a red star in front of a blue square")
