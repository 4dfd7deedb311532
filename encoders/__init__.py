"""The SkinGPT-4 vision stack as plain torch modules (no vLLM, no Ray).

photo -> :class:`ImagePreprocessor` -> (B, 3, 224, 224)
      -> :class:`VisionStack` (EVA ViT-g/14 -> ln_vision -> Q-Former -> llm_proj) -> (B, 32, H)

The same modules run inside the vLLM plugin and inside the Hugging Face reference pipeline.
"""

from encoders.preprocess import ImageError, ImagePreprocessor
from encoders.presets import PRESETS, LLM_FAMILIES, Preset, get_preset
from encoders.vision import VisionStack, build_eva_vit

__all__ = [
    "ImageError",
    "ImagePreprocessor",
    "PRESETS",
    "LLM_FAMILIES",
    "Preset",
    "get_preset",
    "VisionStack",
    "build_eva_vit",
]
