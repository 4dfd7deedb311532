"""One offline answer through vLLM (``skingpt4 generate``): the plugin's end-to-end path without
a server. Sampling follows the model folder's ``generation_config.json`` (the demo's defaults)
unless ``temperature`` is given; generation stops at SkinGPT-4's ``###`` separator.

The engine is ``skingpt4 serve``'s: ``vllm.LLM`` gets the server's engine options
(:meth:`serving.engine.server.EngineConfig.engine_options`, those ``vllm.LLM`` takes:
:func:`generate_engine_kwargs`) and the server's engine environment
(:meth:`serving.engine.server.EngineConfig.environment`: the same CPU KV-cache default), with
vLLM's logs on stderr (quiet unless ``verbose``), so that stdout holds the answer only.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from plugins.skingpt4.template import build_prompt, image_question
from serving.engine.server import EngineConfig, cuda_available, engine_arguments
from serving.settings import SEP


def generate_engine_kwargs(
    config: EngineConfig, num_images: int, on_gpu: bool, seed: int | None = None
) -> dict[str, Any]:
    """``vllm.LLM``'s arguments: the model and the server's engine options that are
    ``EngineArgs`` fields, with room for ``num_images`` photos in the prompt (a local run is
    not held to the server's per-request limit). Imports vLLM: set the environment first."""
    kwargs = {"model": config.model, **engine_arguments(config.engine_options(on_gpu))}
    limit = max(num_images, config.policy.max_images_per_request)
    kwargs["limit_mm_per_prompt"] = {"image": limit}
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


def generate_answer(
    config: EngineConfig,
    images: list[Image.Image],
    question: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    verbose: bool = False,
) -> str:
    """The answer to ``question`` about ``images`` from the model and engine of ``config``.
    Sets the engine environment first; it takes effect when vLLM is not imported yet in this
    process (as in ``skingpt4 generate``)."""
    on_gpu = cuda_available()
    os.environ.update(config.environment(
        on_gpu, policy=False, logs="stderr", verbose=verbose, loopback=True))
    from vllm import LLM

    llm = LLM(**generate_engine_kwargs(config, len(images), on_gpu, seed))
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
