"""SkinGPT-4's vision stack: EVA-CLIP ViT-g/14 -> ln_vision -> Q-Former -> llm_proj.

Follows BLIP-2 (LAVIS ``blip2.py`` / ``eva_vit.py``) and MiniGPT-4 / SkinGPT-4, built from
timm's ``Eva`` and transformers' ``Blip2QFormerModel`` rather than copies of them.

Shapes (full size)::

    pixel_values (B, 3, 224, 224)
      -> vit        (B, 257, 1408)   39 pre-norm blocks, q/v bias, no final norm
      -> ln_vision  (B, 257, 1408)   LayerNorm eps 1e-5
      -> qformer    (B, 32, 768)     32 learned queries, cross-attention every 2nd layer
      -> llm_proj   (B, 32, H)       H = 8192 (Falcon-40B) or 5120 (Llama-2-13B)

Fidelity notes: timm's Eva normally ends with a LayerNorm; LAVIS has none there (``ln_vision``
takes its place), so it is built with ``use_post_transformer_norm=False``. The EVA blocks use
LayerNorm eps 1e-6 while ``ln_vision`` is a plain ``nn.LayerNorm`` (eps 1e-5).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.models.eva import Eva
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig


def build_eva_vit(cfg: Blip2VisionConfig) -> Eva:
    """timm EVA ViT laid out like LAVIS ``eva_vit_g`` (all tokens out, no head, no final norm)."""
    return Eva(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        qkv_bias=cfg.qkv_bias,
        qkv_fused=True,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )


class VisionStack(nn.Module):
    """pixel_values (B, 3, S, S) -> image embeddings (B, num_query_tokens, llm_hidden_size)."""

    def __init__(
        self,
        vision_config: Blip2VisionConfig,
        qformer_config: Blip2QFormerConfig,
        num_query_tokens: int,
        llm_hidden_size: int,
    ) -> None:
        super().__init__()
        self.vit = build_eva_vit(vision_config)
        self.ln_vision = nn.LayerNorm(vision_config.hidden_size)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, num_query_tokens, qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        self.llm_proj = nn.Linear(qformer_config.hidden_size, llm_hidden_size)

    @classmethod
    def for_loading(cls, *args, device: torch.device | str | None = None) -> VisionStack:
        """The stack with its weights allocated but not initialized, to load a checkpoint into.

        timm's random init of a full-size ViT takes about a minute on a CPU, and every weight is
        overwritten by the checkpoint anyway (load it strictly). Only the non-persistent buffers
        are set here: EVA's fixed zero ``k_bias``; any other would be an error.
        """
        with torch.device("meta"):
            stack = cls(*args)
        stack.to_empty(device=device if device is not None else torch.get_default_device())
        saved = set(stack.state_dict())
        for name, buffer in stack.named_buffers():
            if name in saved:
                continue
            if not name.endswith(".attn.k_bias"):
                raise RuntimeError(f"VisionStack has a buffer this loader does not know: {name}")
            buffer.zero_()
        return stack

    @property
    def dtype(self) -> torch.dtype:
        return self.llm_proj.weight.dtype

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_features(pixel_values.to(self.dtype))  # (B, 257, C_vit)
        return self.ln_vision(x)  # (B, 257, C_vit)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.encode_patches(pixel_values)  # (B, 257, C_vit)
        queries = self.query_tokens.expand(patches.shape[0], -1, -1)  # (B, Q, C_qf)
        # Every patch is valid, so no encoder mask (the same as an all-ones mask).
        out = self.qformer(query_embeds=queries, encoder_hidden_states=patches).last_hidden_state
        # (B, Q, C_qf)
        return self.llm_proj(out)  # (B, Q, H)
