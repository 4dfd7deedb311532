"""Checks and SkinGPT-4 defaults applied to an OpenAI chat request before vLLM sees it.

- ``messages`` must be a non-empty list; text may not contain the reserved image tokens.
- every ``image_url`` part: a data URL decoded and checked in memory, or an allowed remote URL
  fetched from a public address and inlined as a data URL; at most ``max_images_per_request``.
- ``n`` is bounded; SkinGPT-4's ``###`` separator is a stop string (except for JSON output).
- ``response_format`` ``json_schema``: the schema must be valid; the name
  ``dermatology_report`` without a schema selects the report schema shipped here.
"""

from __future__ import annotations

import asyncio
import base64
import json
from functools import lru_cache
from importlib import resources
from typing import Any

from serving.errors import InvalidRequest, TooManyImages
from serving.media import check_image_bytes, decode_data_url, fetch_remote_image
from serving.policy import ServePolicy

RESERVED_TOKENS = ("<ImageHere>", "<ImagePad>")
REPORT_SCHEMA_NAME = "dermatology_report"


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    text = resources.files("serving").joinpath("schemas/dermatology_report.json").read_text()
    return json.loads(text)


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}: text must be a string", param=where)
    for token in RESERVED_TOKENS:
        if token in text:
            raise InvalidRequest(
                f"{where}: text contains the reserved token {token!r}; send photos as image_url "
                "parts and the server places them",
                param=where,
            )


def _image_parts(messages: list) -> list[tuple[str, dict]]:
    """Check every message; return the image parts. Only ``text`` and ``image_url`` parts are
    accepted: vLLM would also take typeless or ``input_image``/``input_text`` parts, which
    would bypass these checks."""
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            _check_text(content, f"messages[{i}].content")
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                _check_text(part.get("text"), where)
            elif kind == "image_url":
                found.append((where, part))
            else:
                raise InvalidRequest(
                    f"{where}: part type {kind!r} is not accepted; use 'text' or 'image_url'",
                    param=where,
                )
    return found


async def _inline_image(where: str, part: dict, policy: ServePolicy) -> None:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}: image_url.url must be a non-empty string", param=where)
    if url[:5].lower() == "data:":
        data = decode_data_url(url, policy, where)
        # Decoding a large photo takes milliseconds: off the server's event loop.
        await asyncio.to_thread(check_image_bytes, data, policy, where)
        return
    data = await fetch_remote_image(url, policy, where)
    mime = await asyncio.to_thread(check_image_bytes, data, policy, where)
    encoded = base64.b64encode(data).decode()
    part["image_url"] = {"url": f"data:{mime};base64,{encoded}"}


async def _check_response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object with name and schema")
    if spec.get("schema") is None and spec.get("name") == REPORT_SCHEMA_NAME:
        spec["schema"] = report_schema()
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON schema object (or use the name "
            f"{REPORT_SCHEMA_NAME!r} for the built-in report schema)"
        )
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequest(
            f"response_format.json_schema.schema is not a valid JSON schema at {path}: "
            f"{exc.message}"
        ) from None
    reason = await asyncio.to_thread(_grammar_error, json.dumps(schema, sort_keys=True))
    if reason:
        raise InvalidRequest(
            "response_format.json_schema.schema is valid JSON Schema but the structured-output "
            f"engine cannot compile it ({reason}); simplify it, e.g. keep pattern repetition "
            "bounds at or below 128"
        )


@lru_cache(maxsize=256)
def _grammar_error(schema_json: str) -> str | None:
    """Compile the schema's grammar against a toy vocabulary (milliseconds): xgrammar failures
    that would otherwise surface as a 500 from the engine become a 400 here."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(schema_json, any_whitespace=False)
        info = xgr.TokenizerInfo(['"', "{", "}", "[", "]", ":", ",", " ", "a", "0"])
        xgr.GrammarCompiler(info, max_threads=1).compile_grammar(grammar)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with C++ detail
        return str(exc).splitlines()[0][-160:] or type(exc).__name__
    return None


def _apply_stop(body: dict, policy: ServePolicy) -> None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        return  # the grammar ends the answer; a separator inside a JSON string must not cut it
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    body["stop"] = list(dict.fromkeys([*stop, *policy.default_stop]))


async def prepare_chat_request(body: Any, policy: ServePolicy) -> dict:
    """Validate ``body`` (a parsed JSON request) and return it with SkinGPT-4 defaults."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of chat messages", param="messages")
    images = _image_parts(messages)
    if len(images) > policy.max_images_per_request:
        raise TooManyImages(
            f"the request has {len(images)} images; the limit is {policy.max_images_per_request}",
            param="messages",
        )
    for where, part in images:
        await _inline_image(where, part, policy)
    _check_n(body, policy)
    await _check_response_format(body)
    _apply_stop(body, policy)
    return body


def _check_n(body: dict, policy: ServePolicy) -> None:
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= policy.max_n):
        raise InvalidRequest(f"n is {n!r}; it must be an integer from 1 to {policy.max_n}", param="n")


def prepare_completion_request(body: Any, policy: ServePolicy) -> dict:
    """``/v1/completions``: text prompts only (token ids could carry the image tokens, which
    lie outside the language model's vocabulary), no reserved tokens, bounded ``n``, ``###``."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest(
            "prompt must be a string or a list of strings; token-id prompts are not accepted",
            param="prompt",
        )
    for i, text in enumerate(prompts):
        _check_text(text, f"prompt[{i}]" if isinstance(prompt, list) else "prompt")
    _check_n(body, policy)
    _apply_stop(body, policy)
    return body
