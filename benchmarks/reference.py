"""The original SkinGPT-4 demo's generation, on Hugging Face ``generate``: the parity oracle.

Follows MiniGPT-4 / SkinGPT-4 ``Chat.answer`` with the same ``encoders`` modules that the vLLM
plugin runs:

1. the prompt is split at each ``<ImageHere>``; each text segment is tokenized on its own, with
   the tokenizer's special tokens (Llama's BOS) on the first segment only. A folder converted
   from Llama-2 carries the release's ``tokenizer.model``, and segments are encoded with
   ``SentencePieceProcessor.encode``, as the original's ``LlamaTokenizer`` does (each starts
   with the dummy prefix "▁"); otherwise with the folder's tokenizer;
2. the segments' token embeddings and each image's (32, H) embeddings are concatenated in order;
3. ``generate(inputs_embeds=...)``, batch 1, stopping at ``###``; the answer is the text before
   ``###``.

No vLLM import: this module is also the baseline of the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.initialization import no_init_weights

from encoders import ImagePreprocessor, VisionStack
from plugins.skingpt4.checkpoint import SENTENCEPIECE_MODEL, VISION_WEIGHTS
from plugins.skingpt4.config import IMAGE_PLACEHOLDER, SkinGPT4Config, register_config
from plugins.skingpt4.template import SEP


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    text: str
    prompt_len: int
    """Positions fed to the LM: text tokens plus 32 per image."""


class _StopOnSeparator(StoppingCriteria):
    """Stop once the decoded new text contains ``###`` (MiniGPT-4 ``StoppingCriteriaSub``)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> bool:
        return SEP in self.tokenizer.decode(input_ids[0], skip_special_tokens=True)


def _lm_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if name != VISION_WEIGHTS:
            state.update(load_file(str(folder / name)))
    return state


class ReferencePipeline:
    """One SkinGPT-4 model folder on Hugging Face ``generate`` (float32, CPU by default)."""

    def __init__(self, model: str | Path, device: str = "cpu", dtype=torch.float32) -> None:
        folder = Path(model)
        self.device = torch.device(device)
        register_config()
        self.config = AutoConfig.from_pretrained(folder)
        if not isinstance(self.config, SkinGPT4Config):
            raise ValueError(f"{folder} is not a SkinGPT-4 model folder (model_type skingpt4)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.sentencepiece = None
        if (folder / SENTENCEPIECE_MODEL).is_file():
            import sentencepiece

            self.sentencepiece = sentencepiece.SentencePieceProcessor(
                model_file=str(folder / SENTENCEPIECE_MODEL)
            )
        self.preprocess = ImagePreprocessor(self.config.vision_config.image_size)

        self.vision = VisionStack.for_loading(
            self.config.vision_config, self.config.qformer_config,
            self.config.num_query_tokens, self.config.text_config.hidden_size, device="cpu",
        )
        vision_state = {
            k.removeprefix("vision."): v for k, v in load_file(str(folder / VISION_WEIGHTS)).items()
        }
        self.vision.load_state_dict(vision_state, strict=True)
        self.vision.to(self.device, dtype).eval()

        with no_init_weights():  # every weight comes from the folder (checked below)
            self.lm = AutoModelForCausalLM.from_config(self.config.text_config, dtype=dtype)
        state = _lm_state_dict(folder)
        if getattr(self.config.text_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        missing, unexpected = self.lm.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.lm.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"language model weights: missing {missing}, unexpected {unexpected}")
        self.lm.to(self.device).eval()

    def segment_token_ids(self, prompt: str) -> list[list[int]]:
        """The token ids of each text segment between ``<ImageHere>`` (special tokens first)."""
        segments = prompt.split(IMAGE_PLACEHOLDER)
        if self.sentencepiece is None:
            return [
                self.tokenizer(seg, add_special_tokens=i == 0).input_ids
                for i, seg in enumerate(segments)
            ]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return [(bos if i == 0 else []) + self.sentencepiece.encode(seg)
                for i, seg in enumerate(segments)]

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """The prompt's ids as the engine carries them: each image as its 32 positions of
        ``image_position_token_id``."""
        image = [self.config.image_position_token_id] * self.config.num_query_tokens
        segments = self.segment_token_ids(prompt)
        return [t for i, ids in enumerate(segments) for t in (image if i else []) + ids]

    @torch.inference_mode()
    def embed_prompt(self, prompt: str, images: list[Image.Image]) -> torch.Tensor:
        """(1, T, H) input embeddings: text segments and 32 image positions per image."""
        segments = self.segment_token_ids(prompt)
        if len(segments) - 1 != len(images):
            raise ValueError(
                f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} but {len(images)} images were given"
            )
        embed = self.lm.get_input_embeddings()
        image_embeds = (
            self.vision(self.preprocess(images).to(self.device)) if images else None
        )  # (N, 32, H)
        parts = []
        for i, ids in enumerate(segments):
            tokens = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, t_i)
            parts.append(embed(tokens)[0])  # (t_i, H)
            if i < len(images):
                parts.append(image_embeds[i])  # (32, H)
        return torch.cat(parts, dim=0).unsqueeze(0)  # (1, T, H)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        images: list[Image.Image],
        *,
        max_new_tokens: int = 300,
        temperature: float = 1.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        stop_at_separator: bool = True,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> ReferenceOutput:
        """Greedy when ``temperature == 0``; otherwise the demo's sampling."""
        embeds = self.embed_prompt(prompt, images)
        if seed is not None:
            torch.manual_seed(seed)
        greedy = temperature == 0
        kwargs = dict(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            repetition_penalty=repetition_penalty,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if not greedy:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_at_separator:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnSeparator(self.tokenizer)])
        if ignore_eos:
            kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
        out = self.lm.generate(**kwargs)[0].tolist()  # new tokens only (inputs_embeds given)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        text = text.split(SEP)[0].split("Assistant:")[-1].strip()
        return ReferenceOutput(token_ids=out, text=text, prompt_len=embeds.shape[1])
