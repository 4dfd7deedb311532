"""Plugin registration: idempotent, lazy, and visible through the installed entry point."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_entry_point_is_installed():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "skingpt4"]
    assert len(eps) == 1 and eps[0].value == "plugins.skingpt4:register"


def test_register_is_idempotent_and_lazy():

    from vllm import ModelRegistry

    from plugins.skingpt4 import ARCHITECTURE, register

    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    from transformers import AutoConfig

    from plugins.skingpt4.config import SkinGPT4Config

    assert AutoConfig.for_model("skingpt4").__class__ is SkinGPT4Config


def test_config_round_trip(tmp_path, tiny_checkpoints):
    from transformers import AutoConfig

    from plugins.skingpt4.config import SkinGPT4Config, register_config

    register_config()
    cfg = AutoConfig.from_pretrained(tiny_checkpoints["falcon"])
    assert isinstance(cfg, SkinGPT4Config)
    assert cfg.text_config.model_type == "falcon"
    assert cfg.image_pad_token_id >= cfg.text_config.vocab_size  # outside the LM vocabulary
    assert 0 <= cfg.image_position_token_id < cfg.text_config.vocab_size
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(again) == strip(cfg)


def test_unsupported_text_model_is_named():
    import pytest

    from plugins.skingpt4.config import SkinGPT4Config

    with pytest.raises(ValueError, match="'gpt2'"):
        SkinGPT4Config(text_config={"model_type": "gpt2"})


def test_chat_template_renders_the_skingpt4_prompt(tiny_checkpoints):
    """The shipped Jinja template and build_prompt agree, parts or strings, answers stripped."""
    from transformers import AutoTokenizer

    from plugins.skingpt4.template import build_prompt, image_question

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["falcon"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " A red plaque. "}]},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "  Dry skin.\n"},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = build_prompt([
        ("user", image_question("What is it?")), ("assistant", " A red plaque. "), ("user", "Why?"),
        ("assistant", "  Dry skin.\n"), ("user", "And this one? <Img><ImageHere></Img>"),
    ])
    assert rendered == want
    assert rendered.endswith("###Human: And this one? <Img><ImageHere></Img>###Assistant:")
    assert "###Assistant: A red plaque.###Human: Why?###Assistant: Dry skin.###" in rendered
