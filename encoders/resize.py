"""The one resize of the pipeline, PIL only (no torch): RGB at (S, S), bicubic, the aspect
ratio not kept (LAVIS ``Blip2ImageEvalProcessor``). :class:`encoders.preprocess.ImagePreprocessor`
and the server's photo checks both call it."""

from __future__ import annotations

from PIL import Image


def resize_rgb(image: Image.Image, size: int) -> Image.Image:
    """An image already RGB at (S, S) comes back unchanged (PIL copies it), so resizing twice
    equals resizing once."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((size, size), Image.Resampling.BICUBIC)
