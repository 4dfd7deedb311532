"""The vision stack: full-size shapes on the meta device, fidelity to BLIP-2, preset sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Blip2QFormerConfig, Blip2VisionConfig

from encoders import VisionStack, get_preset


def _stack(preset: str, hidden: int) -> VisionStack:
    p = get_preset(preset)
    return VisionStack(Blip2VisionConfig(**p.vision), Blip2QFormerConfig(**p.qformer), p.num_query_tokens, hidden)


@pytest.mark.slow  # full-size ViT-g and Q-Former modules, built on the meta device
@pytest.mark.parametrize("family,hidden", [("falcon", 8192), ("llama", 5120)])
def test_full_size_data_flow_shapes(family, hidden):
    assert get_preset("skingpt4").text[family]["hidden_size"] == hidden
    with torch.device("meta"):
        stack = _stack("skingpt4", hidden)
        pixels = torch.empty(2, 3, 224, 224)
        vit_out = stack.vit.forward_features(pixels)
        assert vit_out.shape == (2, 257, 1408)
        patches = stack.encode_patches(pixels)
        assert patches.shape == (2, 257, 1408)
        queries = stack.query_tokens.expand(2, -1, -1)
        assert queries.shape == (2, 32, 768)
        q_out = stack.qformer(query_embeds=queries, encoder_hidden_states=patches).last_hidden_state
        assert q_out.shape == (2, 32, 768)
        assert stack(pixels).shape == (2, 32, hidden)
    assert len(stack.vit.blocks) == 39
    assert stack.vit.embed_dim == 1408
    assert stack.vit.blocks[0].mlp.fc1.out_features == 6144
    assert stack.vit.blocks[0].attn.num_heads == 16
    layers = stack.qformer.encoder.layer
    assert len(layers) == 12
    # cross-attention on every 2nd layer, from 1408-wide patches
    assert [hasattr(layer, "crossattention") for layer in layers] == [i % 2 == 0 for i in range(12)]
    assert layers[0].crossattention.attention.key.in_features == 1408
    n_vit = sum(p.numel() for p in stack.vit.parameters())
    assert 0.95e9 < n_vit < 1.05e9  # ViT-g/14 truncated to 39 blocks: about 1.0B


def test_fidelity_to_blip2_layout():
    stack = _stack("tiny", 64)
    assert isinstance(stack.vit.norm, nn.Identity)  # LAVIS has no final norm; ln_vision replaces it
    assert stack.ln_vision.eps == 1e-5
    assert stack.vit.blocks[0].norm1.eps == 1e-6
    names = set(stack.state_dict())
    assert "vit.blocks.0.attn.q_bias" in names and "vit.blocks.0.attn.v_bias" in names
    assert not any("k_bias" in n for n in names)  # EVA has no key bias
    assert not any(n.startswith("vit.norm.") or n.startswith("vit.head") for n in names)
    # only the query branch of the Q-Former exists
    assert not any(".intermediate.dense" in n or ".output.dense" in n and "query" not in n and "attention" not in n for n in names)


def test_tiny_stack_runs_and_depends_on_the_image():
    torch.manual_seed(0)
    stack = _stack("tiny", 64).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = stack(x)
    assert out.shape == (2, 32, 64)
    assert not torch.allclose(out[0], out[1])


def test_stack_for_loading_computes_like_the_initialized_one_once_loaded():
    """No random init, and the one fixed buffer (EVA's zero k_bias) is set, not left empty."""
    torch.manual_seed(0)
    stack = _stack("tiny", 64).eval()
    p = get_preset("tiny")
    loaded = VisionStack.for_loading(
        Blip2VisionConfig(**p.vision), Blip2QFormerConfig(**p.qformer), p.num_query_tokens, 64,
        device="cpu",
    ).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    loaded.load_state_dict(stack.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), stack(x))
    assert all(torch.count_nonzero(b.attn.k_bias) == 0 for b in loaded.vit.blocks)


def _lm_params(text: dict) -> int:
    cfg = AutoConfig.for_model(**{**text, "vocab_size": text["vocab_size"] or 1024})
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in lm.parameters())


@pytest.mark.parametrize("family", ["falcon", "llama"])
def test_bench_preset_is_decoder_heavy_like_production(family):
    p = get_preset("bench")
    with torch.device("meta"):
        stack = _stack("bench", p.text[family]["hidden_size"])
    vision = sum(t.numel() for t in stack.parameters())
    ratio = _lm_params(p.text[family]) / vision
    assert 30 <= ratio <= 50, f"language model is {ratio:.1f}x the vision stack; want about 40x"


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
