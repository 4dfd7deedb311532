"""``SkinGPT4Config``: the Hugging Face config of a SkinGPT-4 model folder (``model_type: skingpt4``).

Holds the EVA ViT (``Blip2VisionConfig``), the Q-Former (``Blip2QFormerConfig``) and the language
model (``text_config``: ``falcon`` or ``llama``) plus the two special tokens of the prompt:
``<ImageHere>`` (where an image goes) and the pad token that fills its 32 embedding positions.
No vLLM import here: the reference pipeline and the checkpoint tools read it too.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    PreTrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_PAD = "<ImagePad>"
SUPPORTED_TEXT_MODELS = ("falcon", "llama")


class SkinGPT4Config(PreTrainedConfig):
    model_type = "skingpt4"
    sub_configs = {
        "text_config": AutoConfig,
        "qformer_config": Blip2QFormerConfig,
        "vision_config": Blip2VisionConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_id: int | None = None
    """Token id of ``<ImageHere>``; replaced by ``num_query_tokens`` pad ids before the model."""
    image_pad_token_id: int | None = None
    """Token id of the ``<ImagePad>`` text token (outside the LM vocabulary): reserved, so that
    no text can name an image position."""
    image_position_token_id: int | None = None
    """Token id that the ``num_query_tokens`` positions of each image carry in the engine (their
    embeddings are replaced by the image's). It lies inside the LM vocabulary, so that every
    engine path indexing the logits with prompt ids (prompt logprobs, echo, repetition penalty)
    stays in range. Written as the tokenizer's unknown token where it has one; ``None`` (folders
    written before this field existed): 0."""

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = Blip2VisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = Blip2VisionConfig(**self.vision_config)
        if self.qformer_config is None:
            self.qformer_config = Blip2QFormerConfig()
        elif isinstance(self.qformer_config, dict):
            self.qformer_config = Blip2QFormerConfig(**self.qformer_config)
        if self.text_config is None:
            self.text_config = CONFIG_MAPPING["falcon"]()
        elif isinstance(self.text_config, dict):
            kind = self.text_config.get("model_type", "falcon")
            if kind not in SUPPORTED_TEXT_MODELS:
                raise ValueError(
                    f"text_config.model_type is {kind!r}; SkinGPT-4 supports {SUPPORTED_TEXT_MODELS}"
                )
            self.text_config = CONFIG_MAPPING[kind](**self.text_config)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.image_position_token_id is None:
            self.image_position_token_id = 0
        vocab = getattr(self.text_config, "vocab_size", None)
        if vocab is not None and not 0 <= self.image_position_token_id < vocab:
            raise ValueError(
                f"image_position_token_id {self.image_position_token_id} must lie inside the "
                f"language model's vocabulary (0..{vocab - 1})"
            )
        super().__post_init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config


_registered = False


def register_config() -> None:
    """Make ``AutoConfig`` know ``model_type: skingpt4`` (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        AutoConfig.register(SkinGPT4Config.model_type, SkinGPT4Config)
    except ValueError:
        pass  # already registered by an earlier import in this process
    _registered = True
