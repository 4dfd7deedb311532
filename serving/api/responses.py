"""``POST /v1/responses``: OpenAI's Responses API under the same contract as chat.

vLLM 0.32 serves the route itself (``vllm/entrypoints/openai/responses/``). It turns a request
into chat messages (``responses/utils.py: construct_input_messages``): ``instructions`` becomes a
leading system message, ``input`` a user message (a string) or the given messages, and renders
them with the model folder's chat template, exactly as chat does; ``input_text`` parts reach the
template as ``text`` parts and ``input_image`` parts as images (``renderers/chat_utils.py``).
Only the tokenization differs: vLLM would add a second BOS (:data:`TEMPLATE_KWARGS` says why
and how it is avoided), after which the SkinGPT-4 prompt is, token for token, chat's for the same
conversation. Sampling defaults come from the same place as chat's (the folder's
``generation_config.json``: temperature, top_p, up to ``max_new_tokens``), and vLLM's
``ResponsesRequest`` has a ``stop`` field, which carries the ``###`` separator here as it does
on chat.

This module is the route's request policy, called by :mod:`serving.api.middleware` after the body
limits, admission and strict JSON:

- the top-level fields follow :class:`ResponsesRequest` (strict: no ``"1"`` for ``1``); any
  other field is refused with a 400 that names it, with the reason from :data:`EXCLUDED` for
  the fields vLLM or OpenAI know, unless its value asks for nothing (``include: []``,
  ``tools: []``...: dropped, as :func:`serving.api.contract.check_body` does on chat);
- ``input``: a string, or messages ``{role, content, type?}`` with roles ``system`` (or
  ``developer``, forwarded as ``system``), ``user``, ``assistant``; user content holds
  ``input_text`` and ``input_image`` parts (photos in user messages only), system and developer
  content ``input_text``, an assistant's earlier answer a string or ``output_text`` /
  ``input_text`` parts (the shape of a previous response's ``output``). Text is
  checked as on chat (valid Unicode, no reserved image tokens, bounded in size);
- every photo goes through :func:`serving.api.chat.forward_image_url`, as on chat (decoded once
  under the admission's bounds, forwarded small and lossless), at most
  ``max_images_per_request``;
- stateless: vLLM keeps responses in process memory when ``store`` is on (and its default is
  on); here ``store`` is forced off, ``store: true`` and ``previous_response_id`` are refused:
  a client sends the whole conversation every turn, and the prefix cache keeps that cheap;
- ``text.format``: ``text``, ``json_object`` or ``json_schema``; schemas are checked as chat's
  ``response_format`` (valid, compiles to a grammar), and the name ``dermatology_report`` without
  a schema selects the shipped report schema. JSON answers end with the grammar, not at ``###``.

The body handed on to vLLM is rebuilt from the checked fields: messages in one canonical form
(an earlier answer as one string), each photo replaced by the small data URL the engine gets,
``store: false``, the stop and :data:`TEMPLATE_KWARGS`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from serving.api.admission import Admission
from serving.api.chat import (
    IMAGE_DETAILS,
    ROLE_AS,
    ROLES,
    check_keys,
    check_text,
    check_text_size,
    forward_image_url,
    stop_strings,
)
from serving.api.contract import (
    CACHED,
    MAX_NEW_TOKENS,
    NO_REASONING,
    NO_TOOLS,
    NOT_SERVED,
    TEMPLATE,
    TEXT_ONLY,
    TOKEN_IDS,
    Refused,
    StrictModel,
    check_body,
)
from serving.api.errors import InvalidRequest
from serving.api.json_schema import check_json_schema
from serving.api.observe import note_photos
from serving.api.policy import ServePolicy
from serving.api.routes import RESPONSES

MAX_INPUT_ITEMS = 256
# OpenAI's bounds on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# vLLM 0.32 tokenizes a rendered Responses prompt with the tokenizer's special tokens (its
# ResponsesRequest has no add_special_tokens, and TokenizeParams defaults to True), while chat
# does not (ChatCompletionRequest.add_special_tokens defaults to False). The SkinGPT-4 template
# writes the BOS itself, so the Responses prompt would start with two. Rendering straight to token
# ids (transformers' apply_chat_template(tokenize=True) adds no special tokens) gives chat's ids.
TEMPLATE_KWARGS = {"tokenize": True}
NOT_STORED = ("conversations are not stored (privacy); send the whole conversation in input, "
              "earlier answers as assistant messages")


class TextFormat(StrictModel):
    """``text.format``: OpenAI's flat shape (``name`` and ``schema`` beside ``type``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> TextFormat:
        if self.type == "json_schema" and self.name is None:
            raise ValueError("text.format: json_schema needs a name (dermatology_report selects "
                             "the shipped report schema)")
        extra = [f for f in ("name", "schema_", "strict", "description") if getattr(self, f) is not None]
        if self.type != "json_schema" and extra:
            names = ", ".join(f.rstrip("_") for f in extra)
            raise ValueError(f"text.format: {names} only with type json_schema")
        return self


class TextConfig(StrictModel):
    format: TextFormat | None = None


class ResponsesRequest(StrictModel):
    """Every field ``/v1/responses`` accepts (``input`` is checked item by item in
    :func:`prepare_responses_request`)."""

    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: str | list[Any] = Field()
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    stream: bool | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _rules(self) -> ResponsesRequest:
        if self.store:
            raise ValueError(f"store: {NOT_STORED}; leave store out or set it to false")
        if isinstance(self.input, list) and not 1 <= len(self.input) <= MAX_INPUT_ITEMS:
            raise ValueError(f"input: a string or a list of 1 to {MAX_INPUT_ITEMS} messages")
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA_PAIRS:
                raise ValueError(f"metadata: at most {MAX_METADATA_PAIRS} key-value pairs")
            for key, value in self.metadata.items():
                if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
                    raise ValueError(
                        f"metadata: keys of 1 to {MAX_METADATA_KEY_CHARS} characters, values of at "
                        f"most {MAX_METADATA_VALUE_CHARS}"
                    )
        return self


# Fields that vLLM's ResponsesRequest or OpenAI's Responses API know and this route refuses, with
# the reason given to the client and the values that ask for nothing (docs/responses.md lists
# both; :class:`serving.api.contract.Refused` says how they are handled). What the OpenAI Agents
# SDK and LangChain send by default (include: [], tools: [], tool_choice, truncation: "disabled",
# top_logprobs: 0...) is among them. Any other unknown field is refused without a specific reason.
SAMPLING_ON_CHAT = ("not part of the Responses API; /v1/chat/completions serves vLLM's extra "
                    "sampling fields")
LATER = "answers are produced while the request is open; nothing is stored to fetch later"
EXCLUDED: dict[str, Refused] = {
    "previous_response_id": Refused(NOT_STORED),
    "previous_input_messages": Refused(NOT_STORED, (None, [])),
    "conversation": Refused(NOT_STORED),
    "background": Refused(LATER, (None, False)),
    "background_options": Refused(LATER),
    "include": Refused("extra output (logprobs, image URLs, encrypted reasoning) is not served",
                       (None, [])),
    "top_logprobs": Refused("logprobs are not served", (None, 0)),
    "logit_bias": Refused(TOKEN_IDS, (None, {})),
    "stop_token_ids": Refused(TOKEN_IDS, (None, [])),
    "tools": Refused(NO_TOOLS, (None, [])),
    "tool_choice": Refused(NO_TOOLS, (None, "none", "auto")),
    "parallel_tool_calls": Refused(NO_TOOLS, (None, False, True)),
    "max_tool_calls": Refused(NO_TOOLS),
    "prompt": Refused("stored prompt templates are not served; send instructions and input"),
    "reasoning": Refused(NO_REASONING, (None, {}, {"effort": "none"})),
    "include_reasoning": Refused(NO_REASONING, (None, False, True)),
    "service_tier": Refused(NOT_SERVED, (None, "auto", "default")),
    "truncation": Refused("the conversation is never truncated (that could cut a photo apart); "
                          "send a shorter conversation", (None, "disabled")),
    "prompt_cache_key": Refused(CACHED),
    "prompt_cache_retention": Refused(f"{CACHED}, in memory", (None, "in_memory")),
    "prompt_cache_options": Refused(CACHED),
    "stream_options": Refused(NOT_SERVED, (None, {}, {"include_obfuscation": False})),
    "safety_identifier": Refused("not served; use user"),
    "context_management": Refused(NOT_SERVED, (None, [])),
    "moderation": Refused(NOT_SERVED),
    "image": Refused(TEXT_ONLY),
    "access_programs": Refused(NOT_SERVED, (None, {})),
    "top_k": Refused(SAMPLING_ON_CHAT),
    "min_p": Refused(SAMPLING_ON_CHAT),
    "seed": Refused(SAMPLING_ON_CHAT),
    "presence_penalty": Refused(SAMPLING_ON_CHAT),
    "frequency_penalty": Refused(SAMPLING_ON_CHAT),
    "repetition_penalty": Refused(SAMPLING_ON_CHAT),
    "stop": Refused("answers end at SkinGPT-4's turn separator; /v1/chat/completions takes more "
                    "stop strings", (None, [])),
    "ignore_eos": Refused(NOT_SERVED, (None, False)),
    "skip_special_tokens": Refused(NOT_SERVED, (None, True)),
    "include_stop_str_in_output": Refused("answers end before SkinGPT-4's turn separator",
                                          (None, False)),
    "structured_outputs": Refused("use text.format with json_schema or json_object"),
    "chat_template_kwargs": Refused(TEMPLATE, (None, {})),
    "enable_response_messages": Refused("the rendered prompt and its token ids are internal; not "
                                        "served", (None, False)),
    "mm_processor_kwargs": Refused("photos are preprocessed exactly as the model was trained",
                                   (None, {})),
    "media_io_kwargs": Refused("photos are decoded by the server's own checks", (None, {})),
    "mm_payload": Refused(NOT_SERVED, (None, "tensors")),
    "return_mm_kwargs": Refused(NOT_SERVED),
    "watermarking": Refused(NOT_SERVED, (None, False)),
    "request_id": Refused("send the request id as the X-Request-Id header"),
    "session_id": Refused("send the x-session-id header instead"),
    "priority": Refused("scheduling priority is set by the server", (None, 0)),
    "cache_salt": Refused(NOT_SERVED),
    "vllm_xargs": Refused(NOT_SERVED, (None, {})),
    "kv_transfer_params": Refused(NOT_SERVED, (None, {})),
    "ec_transfer_params": Refused(NOT_SERVED, (None, {})),
}

MESSAGE_KEYS = {"type", "role", "content"}
# An earlier answer may come back as it left: a previous response's output message (the SDK
# sends back every field it parsed, ``phase: null`` included).
ASSISTANT_KEYS = {"type", "role", "content", "id", "status", "phase"}
PHASES = (None, "final_answer", "commentary")
PART_KEYS = {
    "input_text": {"type", "text"},
    "input_image": {"type", "image_url", "detail"},
    "output_text": {"type", "text", "annotations", "logprobs"},
}
PARTS_BY_ROLE = {
    "user": ("input_text", "input_image"),
    "system": ("input_text",),
    "developer": ("input_text",),
    "assistant": ("output_text", "input_text"),
}


def check_fields(body: dict) -> ResponsesRequest:
    """Refuse fields outside the route's contract and values of the wrong type or range; drop
    the refused fields sent with a neutral value."""
    return check_body(RESPONSES, body, ResponsesRequest, EXCLUDED)


def _check_part(part: Any, role: str, where: str) -> int:
    """One content part of a ``role`` message; return its text length."""
    kind = part.get("type") if isinstance(part, dict) else None
    accepted = PARTS_BY_ROLE[role]
    if kind not in accepted:
        hint = ("; SkinGPT-4 sees photos only in user messages, so send it in a user message"
                if kind in ("input_image", "image_url") else "")
        raise InvalidRequest(
            f"{where}: part type {kind!r} is not accepted in {role} messages; use "
            f"{' or '.join(repr(k) for k in accepted)}{hint}",
            param=where,
        )
    check_keys(part, PART_KEYS[kind], where)
    if kind != "input_image":
        if kind == "output_text" and not isinstance(part.get("annotations", []), list):
            raise InvalidRequest(f"{where}.annotations must be a list", param=f"{where}.annotations")
        return check_text(part.get("text"), f"{where}.text")
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(
            f"{where}: image_url must be a non-empty string (a data URL or an allowed remote URL; "
            "file_id is not served)",
            param=f"{where}.image_url",
        )
    if part.get("detail") is not None and part["detail"] not in IMAGE_DETAILS:
        raise InvalidRequest(
            f"{where}: detail must be one of {', '.join(IMAGE_DETAILS)}", param=f"{where}.detail"
        )
    return 0


def _message_item(item: Any, where: str) -> tuple[dict, int, list[tuple[str, dict]]]:
    """One ``input`` item: (the message as vLLM gets it, its text length, its photo parts,
    which are parts of the returned message)."""
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be a message object with role and content", param=where)
    kind = item.get("type", "message")
    if kind != "message":
        raise InvalidRequest(
            f"{where}: item type {kind!r} is not accepted; send messages with role and content "
            "(earlier answers as assistant messages)",
            param=f"{where}.type",
        )
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"{where}.role is {role!r}; accepted roles: {', '.join(ROLES)}", param=f"{where}.role"
        )
    check_keys(item, ASSISTANT_KEYS if role == "assistant" else MESSAGE_KEYS, where)
    if role == "assistant" and item.get("status", "completed") != "completed":
        raise InvalidRequest(
            f"{where}.status is {item.get('status')!r}; only completed answers are accepted (the "
            "model always writes a new answer)",
            param=f"{where}.status",
        )
    if not isinstance(item.get("id", ""), str):
        raise InvalidRequest(f"{where}.id must be a string", param=f"{where}.id")
    if item.get("phase") not in PHASES:
        raise InvalidRequest(f"{where}.phase must be null, 'final_answer' or 'commentary'",
                             param=f"{where}.phase")
    content = item.get("content")
    forwarded_role = ROLE_AS.get(role, role)
    if isinstance(content, str):
        message = {"role": forwarded_role, "content": content}
        return message, check_text(content, f"{where}.content"), []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts",
                             param=f"{where}.content")
    parts = [dict(part) if isinstance(part, dict) else part for part in content]
    chars = sum(_check_part(part, role, f"{where}.content[{j}]") for j, part in enumerate(parts))
    if role == "assistant":
        # vLLM keeps only the first part of an answer; the answer as one text keeps all of it.
        return {"role": role, "content": " ".join(p["text"].strip() for p in parts)}, chars, []
    photos = [(f"{where}.content[{j}]", p) for j, p in enumerate(parts) if p["type"] == "input_image"]
    return {"role": forwarded_role, "content": parts}, chars, photos


def _input_messages(body: dict, policy: ServePolicy) -> tuple[str | list[dict], list[tuple[str, dict]]]:
    """The checked ``input`` in the form vLLM gets, and its photo parts (parts of the returned
    messages: replacing their URLs updates what is forwarded)."""
    chars = 0
    if body.get("instructions") is not None:
        chars += check_text(body["instructions"], "instructions")
    given = body["input"]
    if isinstance(given, str):
        chars += check_text(given, "input")
        check_text_size(chars, policy)
        return given, []
    messages, photos = [], []
    for i, item in enumerate(given):
        message, length, found = _message_item(item, f"input[{i}]")
        messages.append(message)
        chars += length
        photos += found
    check_text_size(chars, policy)
    return messages, photos


async def _text_format(fmt: dict | None, admission: Admission) -> dict | None:
    """``text.format`` as vLLM gets it: a json_schema's schema checked as chat's
    ``response_format`` (valid, compiles), the shipped report schema for its name."""
    if fmt is None or fmt["type"] != "json_schema":
        return fmt
    where = "text.format.schema"
    schema = await check_json_schema(fmt["name"], fmt.get("schema"), where, admission, param=where)
    return {**fmt, "schema": schema}


async def prepare_responses_request(
    body: Any, policy: ServePolicy, admission: Admission | None = None
) -> dict:
    """Validate ``body`` (a parsed JSON request) and return the body vLLM gets: the checked
    fields, messages in canonical form, each photo replaced by the small image the engine gets,
    ``store: false``, SkinGPT-4's stop and schema defaults. ``admission`` bounds the photos
    decoded at once (None: a private pool, for callers outside the server)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    request = check_fields(body)
    messages, photos = _input_messages(body, policy)
    note_photos(len(photos))
    if len(photos) > policy.max_images_per_request:
        raise InvalidRequest(
            f"the request has {len(photos)} images; the limit is {policy.max_images_per_request}",
            param="input",
        )
    checked = request.model_dump(mode="json", by_alias=True, exclude_unset=True)
    checked["input"] = messages
    checked["store"] = False
    checked["chat_template_kwargs"] = dict(TEMPLATE_KWARGS)
    private = admission is None
    admission = admission or Admission.from_policy(policy)
    try:
        fmt = await _text_format((checked.get("text") or {}).get("format"), admission)
        if fmt is not None:
            checked["text"]["format"] = fmt
        stops = stop_strings(None, fmt["type"] if fmt is not None else None, policy)
        if stops is not None:
            checked["stop"] = stops
        for where, part in photos:
            part["image_url"] = await forward_image_url(part["image_url"], where, policy, admission)
    finally:
        if private:
            await admission.close()
    return checked


def as_chat_messages(body: dict) -> list[dict]:
    """A checked Responses body's conversation as chat messages (vLLM renders both alike):
    ``instructions`` first as the system message, ``input_text``/``input_image`` parts as
    ``text``/``image_url`` parts."""
    messages = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    for item in given:
        content = item["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": p["image_url"]}}
                       if p.get("type") == "input_image" else {"type": "text", "text": p.get("text", "")}
                       for p in content]
        messages.append({"role": item["role"], "content": content})
    return messages
