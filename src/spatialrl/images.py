"""Image files as a viewer shows them."""

from __future__ import annotations

from PIL import Image, ImageOps


def upright_rgb(image: Image.Image) -> Image.Image:
    """The open image's current frame (the first, for a multi-frame camera JPEG) as RGB, in
    the orientation its EXIF Orientation tag asks for: a camera stores the raw sensor pixels
    and tags the turn or mirror a viewer applies, and a score of the raw pixels would read
    left as right."""
    return ImageOps.exif_transpose(image).convert("RGB")
