"""Prompt token counts for the server's ``max_tokens`` check
(:class:`serving.api.max_tokens.MaxTokensCheck`) where it cannot ask an app's own ``/tokenize``:
``skingpt4 batch`` counts with the in-process engine's vLLM tokenize serving object, a Ray LLM
replica (``SkinGPT4Server``, for ``serve --ray`` and ``batch --ray``) with its engine's.
Both count as the embedded server's ``/tokenize`` route does: the same template, photos as their
image positions."""

from __future__ import annotations


async def count_prompt(tokenize, request: dict) -> tuple[int, int] | None:
    """(prompt tokens, context length) of a ``/tokenize`` request body: ``tokenize`` is an async
    function from vLLM's ``TokenizeRequest`` to its ``TokenizeResponse`` or an error response.
    None if it cannot count it."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest

    try:
        result = await tokenize(TypeAdapter(TokenizeRequest).validate_python(request))
    except (ValidationError, ValueError):
        return None
    count, context = getattr(result, "count", None), getattr(result, "max_model_len", None)
    return None if count is None or context is None else (count, context)
