"""The SkinGPT-4 vision stack as plain torch modules (no vLLM, no Ray).

photo -> :class:`ImagePreprocessor` -> (B, 3, 224, 224)
      -> :class:`VisionStack` (EVA ViT-g/14 -> ln_vision -> Q-Former -> llm_proj) -> (B, 32, H)

The same modules run inside the vLLM plugin and inside the Hugging Face reference pipeline.

Names are loaded on first use (PEP 562): the image resize (:mod:`encoders.resize`, PIL only)
is imported by processes that never load torch, such as the server's photo workers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ImageError": "encoders.preprocess",
    "ImagePreprocessor": "encoders.preprocess",
    "PRESETS": "encoders.presets",
    "LLM_FAMILIES": "encoders.presets",
    "Preset": "encoders.presets",
    "get_preset": "encoders.presets",
    "VisionStack": "encoders.vision",
    "build_eva_vit": "encoders.vision",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
