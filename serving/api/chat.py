"""Checks and SkinGPT-4 defaults applied to an OpenAI request before vLLM sees it.

- the top-level fields follow the route's contract (:mod:`serving.api.contract`);
- ``messages``: roles ``system`` (or ``developer``, OpenAI's newer name for it, forwarded as
  ``system``), ``user``, ``assistant``; ``text`` and ``image_url`` parts, photos in user messages
  only; text is valid Unicode without the reserved image tokens, and bounded in size;
- every photo: a data URL, or an allowed remote URL fetched from a public address, decoded once
  and forwarded to vLLM as a small lossless image (:func:`serving.api.media.forward_photo`); at most
  ``max_images_per_request``;
- ``n`` is bounded; SkinGPT-4's ``###`` separator is a stop string (except for JSON output);
- ``response_format`` ``json_schema``: the schema is checked by :mod:`serving.api.json_schema`
  (valid, compiles to a grammar; ``dermatology_report`` names the shipped report schema).
  ``json_object`` uses the grammar engine's built-in JSON grammar; other structured-output kinds
  are outside the contract.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from serving.api.admission import Admission
from serving.api.contract import check_fields
from serving.api.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServingError
from serving.api.json_schema import check_json_schema
from serving.api.media import data_url_payload_start, fetch_remote_image
from serving.api.observe import note_photos
from serving.api.policy import ServePolicy
from serving.api.routes import CHAT, COMPLETIONS
from serving.settings import RESERVED_TOKENS
from serving.api.workers import JobError, JobFailed, JobTimeout

MESSAGE_KEYS = {"role", "content", "name"}
ROLES = ("system", "developer", "user", "assistant")
# OpenAI's current name for the instructions message is ``developer``; the SkinGPT-4 template (and
# vLLM's Responses conversion) know ``system``, so a developer message is forwarded as one.
ROLE_AS = {"developer": "system"}
PART_KEYS = {"text": {"type", "text"}, "image_url": {"type", "image_url"}}
IMAGE_URL_KEYS = {"url", "detail"}
IMAGE_DETAILS = ("auto", "low", "high")


def check_text(text: Any, where: str) -> int:
    """Refuse non-strings, text that is not valid Unicode and the reserved image tokens;
    return the text's length."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}: text must be a string", param=where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{where}: text is not valid Unicode (it holds a lone UTF-16 surrogate)", param=where
        ) from None
    for token in RESERVED_TOKENS:
        if token in text:
            raise InvalidRequest(
                f"{where}: text contains the reserved token {token!r}; send photos as image "
                "parts (image_url, input_image) and the server places them",
                param=where,
            )
    return len(text)


def check_keys(obj: dict, allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidRequest(
                f"{where}: unknown field {key!r}; accepted: {', '.join(sorted(allowed))}",
                param=f"{where}.{key}",
            )


def _check_part(part: Any, role: str, where: str) -> tuple[int, bool]:
    """One content part; return (its text length, whether it is a photo)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PART_KEYS:
        # vLLM would also take typeless or input_image/input_text parts past these checks.
        raise InvalidRequest(
            f"{where}: part type {kind!r} is not accepted; use 'text' or 'image_url'", param=where
        )
    check_keys(part, PART_KEYS[kind], where)
    if kind == "text":
        return check_text(part.get("text"), f"{where}.text"), False
    if role != "user":
        raise InvalidRequest(
            f"{where}: a photo in a message with role {role!r}; SkinGPT-4 sees photos only in user "
            "messages, so send it in a user message",
            param=where,
        )
    spec = part.get("image_url")
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{where}.image_url must be an object with a url", param=where)
    check_keys(spec, IMAGE_URL_KEYS, f"{where}.image_url")
    if not isinstance(spec.get("url"), str) or not spec["url"]:
        raise InvalidRequest(f"{where}: image_url.url must be a non-empty string", param=where)
    if spec.get("detail") is not None and spec["detail"] not in IMAGE_DETAILS:
        raise InvalidRequest(
            f"{where}: image_url.detail must be one of {', '.join(IMAGE_DETAILS)}", param=where
        )
    return 0, True


def _image_parts(messages: list, policy: ServePolicy) -> list[tuple[str, dict]]:
    """Check every message; return the image parts. Roles are those the SkinGPT-4 template
    renders, photos go in user messages, and only ``text`` and ``image_url`` parts exist."""
    found, chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        check_keys(message, MESSAGE_KEYS, where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role is {role!r}; accepted roles: {', '.join(ROLES)}", param=f"{where}.role"
            )
        if "name" in message and not (isinstance(message["name"], str) and len(message["name"]) <= 64):
            raise InvalidRequest(f"{where}.name must be a string of at most 64 characters",
                                 param=f"{where}.name")
        content = message.get("content")
        if isinstance(content, str):
            chars += check_text(content, f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                length, is_photo = _check_part(part, role, f"{where}.content[{j}]")
                chars += length
                if is_photo:
                    found.append((f"{where}.content[{j}]", part))
        else:
            raise InvalidRequest(f"{where}.content must be a string or a list of parts",
                                 param=f"{where}.content")
    check_text_size(chars, policy)
    return found


def check_text_size(chars: int, policy: ServePolicy) -> None:
    if chars > policy.max_text_chars:
        raise InvalidRequest(
            f"the request holds {chars} characters of text; the limit is {policy.max_text_chars}"
        )


async def forward_image_url(url: str, where: str, policy: ServePolicy, admission: Admission) -> str:
    """The small lossless data URL the engine gets for the photo at ``url`` (a data URL, or an
    allowed remote URL), decoded in one of the admission's photo workers under a decode slot.
    Every route that takes photos goes through here."""
    limits = policy.photo_limits()
    if url[:5].lower() == "data:":
        # Size and header checks need no decode slot: refuse oversized photos at once.
        data_url_payload_start(url, limits, where)
        header, data = {"data_url": True}, url.encode("ascii", "replace")
    else:
        header, data = {"data_url": False}, await fetch_remote_image(url, policy, where)
    header |= {"where": where, "limits": asdict(limits)}
    async with admission.decode_slot(admission.deadline()):
        try:
            _, out = await admission.photo_workers.run(header, data)
        except JobTimeout:
            raise InvalidImage(
                f"{where}: decoding the photo took longer than {policy.decode_timeout_s:g} s; "
                "send an ordinary camera photo (e.g. a baseline JPEG)"
            ) from None
        except JobFailed:
            raise InvalidImage(f"{where}: the photo could not be decoded") from None
        except JobError as exc:
            raise job_error(exc) from None
    return out.decode("ascii")


def job_error(exc: JobError) -> ServingError:
    """The error a photo worker reported, as the class it raised (messages are the checks' own)."""
    cls = {"PayloadTooLarge": PayloadTooLarge, "InvalidImage": InvalidImage}.get(exc.kind)
    if cls is None:
        return InvalidImage("the photo could not be decoded")
    return cls(exc.message, param=exc.param)


async def _check_response_format(body: dict, admission: Admission) -> None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object with name and schema")
    spec["schema"] = await check_json_schema(
        spec.get("name"), spec.get("schema"), "response_format.json_schema.schema", admission,
        compile_param="response_format")


def stop_strings(stop: Any, format_type: str | None, policy: ServePolicy) -> list[str] | None:
    """The stop strings a request runs with: its own ``stop`` and SkinGPT-4's separator; None
    under a JSON output format (``format_type``), whose grammar ends the answer (a separator
    inside a JSON string must not cut it)."""
    if format_type in ("json_schema", "json_object"):
        return None
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    return list(dict.fromkeys([*stop, *policy.default_stop]))


def _apply_stop(body: dict, policy: ServePolicy) -> None:
    fmt = body.get("response_format")
    stops = stop_strings(body.get("stop"), fmt.get("type") if isinstance(fmt, dict) else None,
                         policy)
    if stops is not None:
        body["stop"] = stops


async def prepare_chat_request(
    body: Any, policy: ServePolicy, admission: Admission | None = None
) -> dict:
    """Validate ``body`` (a parsed JSON request) and return it with SkinGPT-4 defaults and each
    photo replaced by the small image the engine gets. ``admission`` bounds the photos decoded
    at once (None: a private pool, for callers outside the server)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of chat messages", param="messages")
    check_fields(CHAT, body)
    images = _image_parts(body["messages"], policy)
    for message in body["messages"]:
        message["role"] = ROLE_AS.get(message["role"], message["role"])
    note_photos(len(images))
    if len(images) > policy.max_images_per_request:
        raise InvalidRequest(
            f"the request has {len(images)} images; the limit is {policy.max_images_per_request}",
            param="messages",
        )
    _check_n(body, policy)
    private = admission is None
    admission = admission or Admission.from_policy(policy)
    try:
        await _check_response_format(body, admission)
        _apply_stop(body, policy)
        for where, part in images:
            spec = part["image_url"]
            spec["url"] = await forward_image_url(spec["url"], where, policy, admission)
    finally:
        if private:
            await admission.close()
    return body


def _check_n(body: dict, policy: ServePolicy) -> None:
    n = body.get("n")
    if n is not None and n > policy.max_n:
        raise InvalidRequest(f"n is {n}; it must be an integer from 1 to {policy.max_n}", param="n")


def prepare_completion_request(body: Any, policy: ServePolicy) -> dict:
    """``/v1/completions``: text prompts only (token ids could carry the image tokens), no
    reserved tokens, bounded text and ``n``, the ``###`` stop."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_fields(COMPLETIONS, body)
    prompt = body["prompt"]
    prompts = prompt if isinstance(prompt, list) else [prompt]
    chars = 0
    for i, text in enumerate(prompts):
        chars += check_text(text, f"prompt[{i}]" if isinstance(prompt, list) else "prompt")
    check_text_size(chars, policy)
    _check_n(body, policy)
    _apply_stop(body, policy)
    return body
