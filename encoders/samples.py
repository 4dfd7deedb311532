"""Deterministic synthetic skin photos for the demo, tests and benchmarks (no binary files in
the repository, no patient data). A skin-toned background with noise and a reddish, irregular
lesion whose position, size and colour follow the seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def synthetic_skin_photo(seed: int = 0, size: tuple[int, int] = (512, 384)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    skin = np.array([224, 172, 140], dtype=np.float32) * rng.uniform(0.6, 1.05)
    img = np.broadcast_to(skin, (h, w, 3)).copy()
    img += rng.normal(0.0, 6.0, (h, w, 3))  # texture
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    r = rng.uniform(0.12, 0.3) * min(w, h)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1.0 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6.28)) + 0.1 * np.sin(7 * angle)
    inside = np.hypot(xx - cx, yy - cy) < r * wobble
    lesion = np.array([rng.uniform(120, 200), rng.uniform(40, 90), rng.uniform(40, 90)])
    img[inside] = 0.25 * img[inside] + 0.75 * lesion + rng.normal(0.0, 10.0, (int(inside.sum()), 3))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(1.2))


def encode_image(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


def phone_photo_jpeg(seed: int = 0, size: tuple[int, int] = (4000, 3000), quality: int = 95) -> bytes:
    """A JPEG the size of a phone camera's (12 MP, several MB by default): a synthetic photo
    scaled up, with sensor-like noise so it compresses like a real one. For load tests."""
    rng = np.random.default_rng(seed)
    base = synthetic_skin_photo(seed, (512, 384)).resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(base, dtype=np.int16)
    pixels += rng.integers(-24, 25, pixels.shape, dtype=np.int16)
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
