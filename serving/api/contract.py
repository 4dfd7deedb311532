"""The request contract: which fields each route accepts, with their types and ranges.

Every field a request may carry on ``/v1/chat/completions`` and ``/v1/completions`` is listed
here; any other field is refused with a 400 that names it (and says why, for the fields vLLM or
OpenAI know). A refused field sent with a value that asks for nothing (``null``, an empty list,
``false``, vLLM's own default: :class:`Refused`'s ``neutral`` values) is accepted and dropped
before vLLM sees the request, so clients that send defaults get the answer they would get
without the field. Values are checked strictly (no ``"1"`` for ``1``, no ``true`` for ``1``, no
``NaN``) before vLLM sees the request. Messages, content parts and photos are checked by
:mod:`serving.api.chat`; this module checks the top level of a body (:func:`check_body` serves
the Responses route too, with its own tables).

``MODELS`` and ``EXCLUDED`` are what docs/api.md's contract tables list (a test holds them equal).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.api.errors import InvalidRequest
from serving.api.routes import CHAT, COMPLETIONS


# Beyond the model's context vLLM refuses max_tokens itself (its message names max_model_len);
# this bound only keeps values inside the engine's 32-bit counters.
MAX_NEW_TOKENS = 2**31 - 1
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 128
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_PROMPTS = 8
INT64 = (-(2**63), 2**63 - 1)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(StrictModel):
    model_config = ConfigDict(populate_by_name=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = Field(default=None, max_length=4096)


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only with it")
        return self


class _Common(StrictModel):
    """Fields both routes accept."""

    model: str | None = Field(default=None, min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_NEW_TOKENS)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _common_rules(self) -> _Common:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} sequences")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: each sequence must have 1 to {MAX_STOP_CHARS} characters")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream set to true")
        return self


class ChatRequest(_Common):
    messages: list[Any] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs_rules(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only with logprobs set to true")
        return self


class CompletionRequest(_Common):
    prompt: str | list[str] = Field()
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _prompt_rules(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt: a list of 1 to {MAX_PROMPTS} strings")
        return self


MODELS = {CHAT: ChatRequest, COMPLETIONS: CompletionRequest}
ROUTE_NAMES = {CHAT: "chat", COMPLETIONS: "completions"}


@dataclass(frozen=True)
class Refused:
    """A field a route refuses, with the reason given to the client, and the values that ask for
    nothing: ``null``, an empty list or object, ``false`` where ``true`` asks for something, or
    the value vLLM and OpenAI take when the field is left out. A neutral value is accepted and
    the field dropped before vLLM sees the request (the answer is the one without it); any other
    value gets the 400 with the reason. ``neutral_on``: more neutral values on one route only
    (a field whose default differs between routes)."""

    reason: str
    neutral: tuple[Any, ...] = (None,)
    neutral_on: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def neutral_values(self, route: str) -> tuple[Any, ...]:
        return (*self.neutral, *self.neutral_on.get(route, ()))

    def is_neutral(self, value: Any, route: str) -> bool:
        return any(same_json(value, neutral) for neutral in self.neutral_values(route))

    def accepted_as(self) -> str:
        """The values this field is accepted as, as docs/api.md and docs/responses.md list them:
        ``null``, ``false``; with a route's own values after its name."""
        def listed(values: tuple[Any, ...]) -> str:
            return ", ".join(f"`{json.dumps(v)}`" for v in values)

        on_routes = [f"{ROUTE_NAMES.get(route, route)}: {listed(values)}"
                     for route, values in self.neutral_on.items()]
        return "; ".join([listed(self.neutral), *on_routes])


def same_json(value: Any, neutral: Any) -> bool:
    """``value`` is ``neutral`` as JSON, strictly: ``0`` is not ``false``, ``1.0`` is not the
    integer ``1`` (a float is matched by an integer of the same value, as pydantic's strict
    floats accept integers)."""
    if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    if isinstance(neutral, int):
        return type(value) is int and value == neutral
    if isinstance(neutral, float):
        return type(value) in (int, float) and value == neutral
    if isinstance(neutral, str):
        return isinstance(value, str) and value == neutral
    if isinstance(neutral, list):
        return (isinstance(value, list) and len(value) == len(neutral)
                and all(same_json(v, n) for v, n in zip(value, neutral)))
    if isinstance(neutral, dict):
        return (isinstance(value, dict) and value.keys() == neutral.keys()
                and all(same_json(value[k], neutral[k]) for k in neutral))
    raise TypeError(f"not a JSON value: {neutral!r}")


NULL = (None,)
NO_TOOLS = "the model does not call tools"
NOT_SERVED = "not served"
TOKEN_IDS = "token ids are internal to the model; not served"
TEMPLATE = "the model folder's SkinGPT-4 template is always used"
NO_REASONING = "the model has no reasoning mode"
TEXT_ONLY = "the model answers in text only"
NOT_STORED_CHAT = "conversations are not stored"
CACHED = "prefix caching is automatic"

# Fields that vLLM's or OpenAI's chat and completions APIs know and this product refuses, with
# the reason given to the client and the values that ask for nothing (docs/api.md lists both).
# No tool can be given (tools only empty), so tool_choice "auto" and any parallel_tool_calls ask
# for nothing. Any other unknown field is refused without a specific reason.
EXCLUDED: dict[str, Refused] = {
    "echo": Refused("it returns the prompt with its logprobs, which are not served", (None, False)),
    "prompt_logprobs": Refused("logprobs over the prompt (photo positions included) are not "
                               "served"),
    "logit_bias": Refused(TOKEN_IDS, (None, {})),
    "allowed_token_ids": Refused(TOKEN_IDS),
    "bad_words": Refused("not served; use the response schema to constrain answers", (None, [])),
    "structured_outputs": Refused("use response_format with json_schema or json_object"),
    "guided_json": Refused("use response_format with json_schema"),
    "guided_regex": Refused("regex-constrained output is not served; use response_format"),
    "guided_choice": Refused("choice-constrained output is not served; use response_format"),
    "guided_grammar": Refused("grammar-constrained output is not served; use response_format"),
    "tools": Refused(NO_TOOLS, (None, [])),
    "tool_choice": Refused(NO_TOOLS, (None, "none", "auto")),
    "functions": Refused(NO_TOOLS, (None, [])),
    "function_call": Refused(NO_TOOLS, (None, "none", "auto")),
    "parallel_tool_calls": Refused(NO_TOOLS, (None, False, True)),
    "chat_template": Refused(TEMPLATE),
    "chat_template_kwargs": Refused(TEMPLATE, (None, {})),
    "add_generation_prompt": Refused("the SkinGPT-4 template always asks for the answer",
                                     (None, True)),
    "continue_final_message": Refused("the SkinGPT-4 template always asks for a new answer",
                                      (None, False)),
    "add_special_tokens": Refused("the SkinGPT-4 template places special tokens itself", NULL,
                                  {CHAT: (False,), COMPLETIONS: (True,)}),
    "documents": Refused(NOT_SERVED, (None, [])),
    "truncate_prompt_tokens": Refused("truncating the prompt could cut a photo apart; send a "
                                      "shorter conversation"),
    "mm_processor_kwargs": Refused("photos are preprocessed exactly as the model was trained",
                                   (None, {})),
    "media_io_kwargs": Refused("photos are decoded by the server's own checks", (None, {})),
    "best_of": Refused("not served; use n", (None, 1)),
    "use_beam_search": Refused(NOT_SERVED, (None, False)),
    "length_penalty": Refused(NOT_SERVED, (None, 1.0)),
    "include_stop_str_in_output": Refused("answers end before SkinGPT-4's turn separator",
                                          (None, False)),
    "skip_special_tokens": Refused(NOT_SERVED, (None, True)),
    "spaces_between_special_tokens": Refused(NOT_SERVED, (None, True)),
    "return_tokens_as_token_ids": Refused(TOKEN_IDS, (None, False)),
    "return_token_ids": Refused(TOKEN_IDS, (None, False)),
    "prompt_embeds": Refused(NOT_SERVED),
    "suffix": Refused(NOT_SERVED),
    "priority": Refused("scheduling priority is set by the server", (None, 0)),
    "request_id": Refused("send the request id as the X-Request-Id header"),
    "cache_salt": Refused(NOT_SERVED),
    "kv_transfer_params": Refused(NOT_SERVED, (None, {})),
    "vllm_xargs": Refused(NOT_SERVED, (None, {})),
    "logits_processors": Refused(NOT_SERVED, (None, [])),
    "reasoning_effort": Refused(NO_REASONING, (None, "none")),
    "include_reasoning": Refused(NO_REASONING, (None, False, True)),
    "verbosity": Refused("not served; max_tokens bounds the answer's length"),
    "modalities": Refused(TEXT_ONLY, (None, ["text"])),
    "audio": Refused(TEXT_ONLY),
    "prediction": Refused(NOT_SERVED),
    "service_tier": Refused(NOT_SERVED, (None, "auto", "default")),
    "store": Refused(NOT_STORED_CHAT, (None, False)),
    "metadata": Refused(NOT_STORED_CHAT, (None, {})),
    "prompt_cache_key": Refused(CACHED),
    "prompt_cache_retention": Refused(f"{CACHED}, in memory", (None, "in_memory")),
    "prompt_cache_options": Refused(CACHED),
    "safety_identifier": Refused("not served; use user"),
    "web_search_options": Refused(NOT_SERVED),
    "return_logprobs": Refused(NOT_SERVED, (None, False)),
    "stop_token_ids": Refused(TOKEN_IDS, (None, [])),
    "logprob_token_ids": Refused(TOKEN_IDS, (None, [])),
    "truncation_side": Refused("the prompt is never truncated (that could cut a photo apart)"),
    "thinking_token_budget": Refused(NO_REASONING),
    "repetition_detection": Refused(NOT_SERVED),
    "stream_interval": Refused("the server sets how answers stream"),
    "return_prompt_text": Refused("the rendered prompt is internal; not served", (None, False)),
    "return_token_offsets": Refused(NOT_SERVED, (None, False)),
    "routed_experts_prompt_start": Refused(NOT_SERVED, (None, 0)),
    "mm_payload": Refused(NOT_SERVED, (None, "tensors")),
    "return_mm_kwargs": Refused(NOT_SERVED),
    "watermarking": Refused(NOT_SERVED, (None, False)),
    "session_id": Refused("send the x-session-id header instead"),
    "ec_transfer_params": Refused(NOT_SERVED, (None, {})),
}


Checked = TypeVar("Checked", bound=BaseModel)


def check_body(route: str, body: dict, model: type[Checked],
               refused: Mapping[str, Refused]) -> Checked:
    """Drop from ``body`` the refused fields sent with a neutral value; refuse the others and
    every field outside ``model``, then values of the wrong type or range. Returns the body as
    ``model`` reads it."""
    known = {info.alias or name for name, info in model.model_fields.items()}
    for name in [name for name in body if name not in known]:
        rule = refused.get(name)
        if rule is not None and rule.is_neutral(body[name], route):
            del body[name]
            continue
        reason = rule.reason if rule is not None else "it is not part of this API"
        raise InvalidRequest(f"unknown or unsupported field {name!r} on {route}: {reason}"
                             + _neutral_hint(rule, route), param=str(name))
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_message(exc), param=_param(exc)) from None


def _neutral_hint(rule: Refused | None, route: str) -> str:
    """What the field is accepted as on ``route``, when that is more than ``null``."""
    values = () if rule is None else rule.neutral_values(route)
    if values in ((), NULL):
        return ""
    return f" (accepted only as {_either(values)}, which ask for nothing)"


def _either(values: tuple[Any, ...]) -> str:
    words = [json.dumps(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_fields(route: str, body: dict) -> None:
    """Refuse fields outside ``route``'s contract and values of the wrong type or range; drop
    the refused fields sent with a neutral value."""
    check_body(route, body, MODELS[route], EXCLUDED)


# Fields whose type is a union: pydantic reports each alternative; the client gets one line.
UNION_HINTS = {
    "stop": "a string or a list of strings",
    "prompt": "a string or a list of strings; token-id prompts are not accepted",
    "input": "a string or a list of messages",
}
BOUND_WORDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
               "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _param(exc: ValidationError) -> str | None:
    error = exc.errors()[0]
    loc = [p for p in error["loc"] if not isinstance(p, str) or p.isidentifier()]
    if loc and loc[0] in UNION_HINTS:
        loc = loc[:1]
    if not loc:  # a rule across fields names its field first: "stop: ..."
        head = error["msg"].removeprefix("Value error, ").split(":", 1)[0]
        return head if head.isidentifier() else None
    return ".".join(str(p) for p in loc)


def _message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = _param(exc)
    text = error["msg"].removeprefix("Value error, ")
    if where and text.startswith(f"{where}:"):
        return text  # a rule's own message already names the field
    if where in UNION_HINTS and len(error["loc"]) > 1:
        return f"{where}: must be {UNION_HINTS[where]}"
    if error["type"] in BOUND_WORDS:
        key, words = BOUND_WORDS[error["type"]]
        return f"{where}: must be {words} {error['ctx'][key]} (got {error.get('input')!r})"
    if error["type"] in ("int_type", "float_type", "bool_type", "string_type", "dict_type",
                         "list_type", "model_type", "literal_error"):
        text = f"{text} (got {type(error.get('input')).__name__})"
    return f"{where}: {text}" if where else text
