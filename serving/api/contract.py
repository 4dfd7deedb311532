"""The request contract: which fields each route accepts, with their types and ranges.

Every field a request may carry on ``/v1/chat/completions`` and ``/v1/completions`` is listed
here; any other field is refused with a 400 that names it (and says why, for the fields vLLM
would otherwise act on). Values are checked strictly (no ``"1"`` for ``1``, no ``true`` for
``1``, no ``NaN``) before vLLM sees the request. Messages, content parts and photos are checked
by :mod:`serving.api.chat`; this module checks the top level of a body.

``MODELS`` and ``EXCLUDED`` are what the README's contract table lists (a test holds them equal).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.api.errors import InvalidRequest

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"

# Beyond the model's context vLLM refuses max_tokens itself (its message names max_model_len);
# this bound only keeps values inside the engine's 32-bit counters.
MAX_NEW_TOKENS = 2**31 - 1
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 128
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_PROMPTS = 8
INT64 = (-(2**63), 2**63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(populate_by_name=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = Field(default=None, max_length=4096)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only with it")
        return self


class _Common(_Strict):
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


MODELS = {CHAT_ROUTE: ChatRequest, COMPLETIONS_ROUTE: CompletionRequest}

# Fields that vLLM's OpenAI routes know and this product refuses, with the reason given to the
# client (and in the README). Any other unknown field is refused without a specific reason.
EXCLUDED: dict[str, str] = {
    "echo": "it returns the prompt with its logprobs, which are not served",
    "prompt_logprobs": "logprobs over the prompt (photo positions included) are not served",
    "logit_bias": "token ids are internal to the model; not served",
    "allowed_token_ids": "token ids are internal to the model; not served",
    "bad_words": "not served; use the response schema to constrain answers",
    "structured_outputs": "use response_format with json_schema or json_object",
    "guided_json": "use response_format with json_schema",
    "guided_regex": "regex-constrained output is not served; use response_format",
    "guided_choice": "choice-constrained output is not served; use response_format",
    "guided_grammar": "grammar-constrained output is not served; use response_format",
    "tools": "the model does not call tools",
    "tool_choice": "the model does not call tools",
    "functions": "the model does not call tools",
    "function_call": "the model does not call tools",
    "parallel_tool_calls": "the model does not call tools",
    "chat_template": "the model folder's SkinGPT-4 template is always used",
    "chat_template_kwargs": "the model folder's SkinGPT-4 template is always used",
    "add_generation_prompt": "the SkinGPT-4 template always asks for the answer",
    "continue_final_message": "the SkinGPT-4 template always asks for a new answer",
    "add_special_tokens": "the SkinGPT-4 template places special tokens itself",
    "documents": "not served",
    "truncate_prompt_tokens": "truncating the prompt could cut a photo apart; send a shorter "
    "conversation",
    "mm_processor_kwargs": "photos are preprocessed exactly as the model was trained",
    "media_io_kwargs": "photos are decoded by the server's own checks",
    "best_of": "not served; use n",
    "use_beam_search": "not served",
    "length_penalty": "not served",
    "include_stop_str_in_output": "answers end before SkinGPT-4's turn separator",
    "skip_special_tokens": "not served",
    "spaces_between_special_tokens": "not served",
    "return_tokens_as_token_ids": "token ids are internal to the model; not served",
    "return_token_ids": "token ids are internal to the model; not served",
    "prompt_embeds": "not served",
    "suffix": "not served",
    "priority": "scheduling priority is set by the server",
    "request_id": "the server assigns request ids",
    "cache_salt": "not served",
    "kv_transfer_params": "not served",
    "vllm_xargs": "not served",
    "logits_processors": "not served",
    "reasoning_effort": "the model has no reasoning mode",
    "include_reasoning": "the model has no reasoning mode",
    "modalities": "the model answers in text only",
    "audio": "the model answers in text only",
    "prediction": "not served",
    "service_tier": "not served",
    "store": "conversations are not stored",
    "metadata": "conversations are not stored",
    "web_search_options": "not served",
    "return_logprobs": "not served",
}


def check_fields(route: str, body: dict) -> None:
    """Refuse fields outside ``route``'s contract and values of the wrong type or range."""
    model = MODELS[route]
    known = {info.alias or name for name, info in model.model_fields.items()}
    for field in body:
        if field not in known:
            reason = EXCLUDED.get(field, "it is not part of this API")
            raise InvalidRequest(
                f"unknown or unsupported field {field!r} on {route}: {reason}", param=str(field)
            )
    try:
        model.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_message(exc), param=_param(exc)) from None


# Fields whose type is a union: pydantic reports each alternative; the client gets one line.
UNION_HINTS = {
    "stop": "a string or a list of strings",
    "prompt": "a string or a list of strings; token-id prompts are not accepted",
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
