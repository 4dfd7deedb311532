"""Image preprocessing of BLIP-2 / SkinGPT-4 (LAVIS ``Blip2ImageEvalProcessor``).

RGB -> resize to (S, S) with bicubic interpolation (no crop, the aspect ratio is not kept) ->
[0, 1] -> normalise with the CLIP mean and std. Output: float32 (B, 3, S, S).

torchvision's ``Resize`` on a PIL image calls PIL's own bicubic resize, so PIL is used directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from encoders.resize import resize_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An input image that cannot be used (too small, wrong type)."""


@dataclass(frozen=True)
class ImagePreprocessor:
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    min_side: int = 2
    """Images with a side below this many pixels carry no usable lesion detail."""

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ImageError("no images given")
        return torch.stack([self.one(im) for im in images])  # (B, 3, S, S)

    def resize(self, image: Image.Image) -> Image.Image:
        """RGB at (S, S), bicubic: the one resize of the pipeline. An image already RGB at
        (S, S) comes back unchanged (PIL copies it), so resizing twice equals resizing once."""
        return resize_rgb(image, self.image_size)

    def one(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ImageError(f"expected a PIL image, got {type(image).__name__}")
        w, h = image.size
        if min(w, h) < self.min_side:
            raise ImageError(
                f"image is {w}x{h} pixels; each side must be at least {self.min_side} pixels"
            )
        rgb = self.resize(image)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # (S, S, 3)
        x = x.permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
