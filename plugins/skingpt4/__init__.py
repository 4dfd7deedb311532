"""vLLM out-of-tree plugin ``skingpt4`` (entry point ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), so it
is idempotent and lazy: the model class is named by string and imported only when used.
"""

from __future__ import annotations

ARCHITECTURE = "SkinGPT4ForConditionalGeneration"


def register() -> None:
    from plugins.skingpt4.config import register_config

    register_config()

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "plugins.skingpt4.model:SkinGPT4ForConditionalGeneration"
        )
