"""Preprocessing equals LAVIS ``Blip2ImageEvalProcessor`` (torchvision Resize/ToTensor/Normalize)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from encoders import ImageError, ImagePreprocessor
from encoders.preprocess import CLIP_MEAN, CLIP_STD
from encoders.samples import synthetic_skin_photo


def blip2_eval_processor(size: int = 224):
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


@pytest.mark.parametrize("size,mode", [((512, 384), "RGB"), ((300, 420), "RGBA"), ((224, 224), "L")])
def test_matches_the_blip2_eval_processor(size, mode):
    photo = synthetic_skin_photo(seed=7, size=size).convert(mode)
    ours = ImagePreprocessor()(photo)
    want = blip2_eval_processor()(photo.convert("RGB")).unsqueeze(0)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def test_batches_keep_order():
    photos = [synthetic_skin_photo(seed=s) for s in range(3)]
    batch = ImagePreprocessor()(photos)
    assert batch.shape == (3, 3, 224, 224)
    torch.testing.assert_close(batch[2], ImagePreprocessor()(photos[2])[0])


def test_unusable_images_are_named():
    with pytest.raises(ImageError, match="1x1 pixels"):
        ImagePreprocessor()(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageError, match="no images"):
        ImagePreprocessor()([])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_resized_photo_preprocesses_like_the_original(mode):
    """The server forwards ``resize(photo)`` (losslessly) instead of the photo: preprocessing it
    again must give the very tensor the full-size photo gives."""
    import io

    photo = synthetic_skin_photo(seed=11, size=(1600, 1200)).convert(mode)
    pre = ImagePreprocessor()
    small = pre.resize(photo)
    assert small.size == (224, 224) and small.mode == "RGB"
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert torch.equal(pre(again), pre(photo))
