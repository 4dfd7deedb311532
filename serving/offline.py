"""One offline answer through vLLM (``skingpt4 generate``): the plugin's end-to-end path without
a server. Sampling follows the model folder's ``generation_config.json`` (the demo's defaults)
unless ``temperature`` is given; generation stops at SkinGPT-4's ``###`` separator.

The engine runs from a plain shell: :func:`engine_environment` gives it the same CPU KV-cache
default as ``skingpt4 serve`` and sends vLLM's logs to stderr (quiet unless ``verbose``), so that
stdout holds the answer only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from plugins.skingpt4.template import build_prompt, image_question
from serving import settings
from serving.settings import SEP


def engine_environment(verbose: bool = False, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables to set before vLLM is imported (its engine processes inherit them).

    vLLM logs to stdout by default; here its logs go to stderr, at ``INFO`` with ``verbose`` and
    ``ERROR`` otherwise. Values the user set (KV-cache size, log level) are kept.
    """
    return {
        settings.KVCACHE_ENV: settings.cpu_kvcache_gib(environ),
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        "VLLM_LOGGING_LEVEL": environ.get("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR"),
    }


def generate_answer(
    model: str | Path,
    images: list[Image.Image],
    question: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    verbose: bool = False,
) -> str:
    """The answer to ``question`` about ``images``. Sets :func:`engine_environment` first; it
    takes effect when vLLM is not imported yet in this process (as in ``skingpt4 generate``)."""
    os.environ.update(engine_environment(verbose))
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
