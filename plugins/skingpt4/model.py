"""SkinGPT-4 for vLLM: EVA ViT-g/14 + Q-Former + projection, spliced into Falcon or Llama.

Follows vLLM's ``blip2.py`` (same data flow) with two differences that SkinGPT-4 needs:
``<ImageHere>`` may stand anywhere in the prompt (a ``PromptReplacement``, not an insertion at the
start), and a prompt may carry several images. The language model is built by vLLM itself
(``init_vllm_registered_model``), so it gets paged attention, continuous batching and tensor
parallelism; the vision stack is the plain torch module of ``encoders``, replicated per rank. Under
tensor parallelism every rank encodes every photo unless the engine runs with
``mm_encoder_tp_mode="data"``: then each rank encodes its share of the photos and the embeddings
are all-gathered (vLLM's encoder data-parallel mode, ``run_dp_sharded_vision_model``).

Data flow per request::

    prompt "...<Img><ImageHere></Img> question###Assistant:"   + N images
      -> tokens; each <ImageHere> id -> 32 image positions      (processor, below)
      -> pixel_values (N, 3, 224, 224) -> VisionStack -> (N, 32, H)
      -> scattered over the pad positions of the LM's input embeddings -> Falcon / Llama

Weights in the model folder: ``vision.*`` (the stack) and the language model's own Hugging Face
names (``transformer.*`` for Falcon, ``model.*`` for Llama, ``lm_head.*``), so the released LM
shards are used unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

import torch
from torch import nn
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.model_executor.models.vision import run_dp_sharded_vision_model
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from encoders import ImagePreprocessor, VisionStack
from plugins.skingpt4.config import IMAGE_PLACEHOLDER, SkinGPT4Config
from plugins.skingpt4.template import IMAGE_SEGMENT


class SkinGPT4ImagePixelInputs(TensorSchema):
    """Dimensions:
    - n: number of images in the batch
    - h, w: image size (224 for every preset)
    """

    type: Literal["pixel_values"]
    data: Annotated[torch.Tensor, TensorShape("n", 3, "h", "w")]


class SkinGPT4ImageProcessor:
    """The multimodal processor's "HF processor": images -> ``pixel_values`` (N, 3, S, S).

    vLLM tokenizes the prompt itself; this callable only sees the images.
    """

    def __init__(self, image_size: int) -> None:
        self.preprocess = ImagePreprocessor(image_size=image_size)

    def __call__(self, images=None, return_tensors: str = "pt", **_: object) -> BatchFeature:
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        return BatchFeature({"pixel_values": self.preprocess(list(images))})


class SkinGPT4ProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> SkinGPT4Config:
        return self.ctx.get_hf_config(SkinGPT4Config)

    def get_hf_processor(self, **kwargs: object) -> SkinGPT4ImageProcessor:
        return SkinGPT4ImageProcessor(self.get_hf_config().vision_config.image_size)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().num_query_tokens


class SkinGPT4DummyInputsBuilder(BaseDummyInputsBuilder[SkinGPT4ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, BaseDummyOptions],
    ) -> MultiModalDataDict:
        size = self.info.get_hf_config().vision_config.image_size
        return {
            "image": self._get_dummy_images(
                width=size,
                height=size,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class SkinGPT4MultiModalProcessor(BaseMultiModalProcessor[SkinGPT4ProcessingInfo]):
    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        # In-vocabulary ids at the image positions (see SkinGPT4Config.image_position_token_id):
        # vLLM tracks which positions hold image embeddings, not which ids they carry.
        positions = [config.image_position_token_id] * config.num_query_tokens
        return [
            PromptReplacement(
                modality="image",
                target=[config.image_token_id],
                replacement=PromptUpdateDetails.from_seq(positions),
            )
        ]


@MULTIMODAL_REGISTRY.register_processor(
    SkinGPT4MultiModalProcessor,
    info=SkinGPT4ProcessingInfo,
    dummy_inputs=SkinGPT4DummyInputsBuilder,
)
class SkinGPT4ForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    # `mm_encoder_tp_mode="data"`: the photos of a batch are split across the tensor-parallel
    # ranks (the vision stack is replicated, never sharded by weights).
    supports_encoder_tp_data = True

    # Folder names -> module names. Vision weights keep their names; the LM's own HF names
    # (as in the released shards) move under `language_model.`.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "transformer.": "language_model.transformer.",
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_SEGMENT
        raise ValueError("SkinGPT-4 accepts images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SkinGPT4Config = vllm_config.model_config.hf_config
        self.config = config
        mm_config = vllm_config.model_config.multimodal_config
        self.use_data_parallel = (
            mm_config is not None
            and mm_config.mm_encoder_tp_mode == "data"
            and vllm_config.parallel_config.tensor_parallel_size > 1
        )

        with self._mark_tower_model(vllm_config, "image"):
            self.vision = VisionStack.for_loading(
                config.vision_config,
                config.qformer_config,
                config.num_query_tokens,
                config.text_config.hidden_size,
            )

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )

        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size,
            mm_token_ids=[config.image_position_token_id],
        )
        self.make_empty_intermediate_tensors = (
            self.language_model.make_empty_intermediate_tensors
        )

    def _parse_image_input(self, **kwargs: object) -> SkinGPT4ImagePixelInputs | None:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return None
        size = self.config.vision_config.image_size
        return SkinGPT4ImagePixelInputs(
            type="pixel_values",
            data=pixel_values,
            resolve_bindings={"h": size, "w": size},
        )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        image_input = self._parse_image_input(**kwargs)
        if image_input is None:
            return []
        pixel_values = image_input["data"]
        if self.use_data_parallel:
            # Rank r encodes photos [r*k, (r+1)*k) (zero-padded to k per rank), then all-gather.
            embeds = run_dp_sharded_vision_model(pixel_values, self.vision)  # (N, 32, H)
        else:
            embeds = self.vision(pixel_values)  # (N, 32, H)
        return list(embeds.unbind(0))  # one (32, H) per image

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
