"""One offline answer through vLLM (``skingpt4 generate``): the plugin's end-to-end path without
a server. Sampling follows the model folder's ``generation_config.json`` (the demo's defaults)
unless ``temperature`` is given; generation stops at SkinGPT-4's ``###`` separator.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from plugins.skingpt4.template import SEP, build_prompt, image_question


def generate_answer(
    model: str | Path,
    images: list[Image.Image],
    question: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> str:
    from vllm import LLM

    engine_args = dict(
        model=str(model),
        enforce_eager=True,
        max_model_len=2048,
        limit_mm_per_prompt={"image": max(1, len(images))},
    )
    if seed is not None:
        engine_args["seed"] = seed
    llm = LLM(**engine_args)
    params = llm.get_default_sampling_params()
    params.stop = [SEP]
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    prompt = build_prompt([("user", image_question(question, num_images=len(images)))])
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    out = llm.generate([request], params, use_tqdm=False)[0]
    return out.outputs[0].text.strip()
