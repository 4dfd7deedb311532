"""The request contract's refused fields without an engine: on every route (chat, completions,
Responses) each value a refused field is accepted as (its neutral values) passes and leaves the
body vLLM gets exactly as without the field; every other value gets the 400 that names the
field and gives its reason; the default requests of the OpenAI Agents SDK and LangChain pass;
a ``developer`` message is forwarded as the ``system`` message it is. The answers themselves are
compared on the engine by tests/serving/api/test_fuzz.py and test_responses.py."""

from __future__ import annotations

import asyncio
import copy
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.api import contract, responses
from serving.api.contract import Refused, same_json
from serving.api.errors import InvalidRequest, ServingError
from serving.api.pipeline import prepare_request
from serving.api.policy import ServePolicy
from serving.api.routes import CHAT, COMPLETIONS, RESPONSES

POLICY = ServePolicy()
BASES = {
    CHAT: {"model": "skingpt4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    COMPLETIONS: {"model": "skingpt4", "prompt": "Hi", "max_tokens": 4},
    RESPONSES: {"model": "skingpt4", "input": "Hi", "max_output_tokens": 4},
}
TABLES: dict[str, dict[str, Refused]] = {CHAT: contract.EXCLUDED,
                                         COMPLETIONS: contract.EXCLUDED,
                                         RESPONSES: responses.EXCLUDED}
NEUTRAL = [(route, name, value) for route, table in TABLES.items() for name, rule in table.items()
           for value in rule.neutral_values(route)]


def prepare(route: str, body: dict) -> dict:
    return asyncio.run(prepare_request(route, copy.deepcopy(body), POLICY))


def refusal(route: str, body: dict) -> ServingError:
    with pytest.raises(ServingError) as info:
        prepare(route, body)
    return info.value


def assert_refused_naming(route: str, name: str, value) -> None:
    error = refusal(route, {**BASES[route], name: value})
    assert isinstance(error, InvalidRequest) and error.status == 400, error
    assert error.param == name
    reason = TABLES[route][name].reason
    assert f"unknown or unsupported field {name!r} on {route}: {reason}" in error.message


@functools.cache
def forwarded(route: str) -> dict:
    """The body vLLM gets for the route's plain request."""
    return prepare(route, BASES[route])


@pytest.mark.parametrize("route, name, value", NEUTRAL,
                         ids=[f"{r.rsplit('/', 1)[1]}-{n}-{v!r}" for r, n, v in NEUTRAL])
def test_a_neutral_value_is_dropped_before_vllm(route, name, value):
    assert prepare(route, {**BASES[route], name: value}) == forwarded(route)


def test_every_vllm_field_is_accepted_or_refused_with_its_neutral_values():
    """Every field vLLM's chat and completions requests know is in the contract or in the table
    (so it gets a reason and its neutral values, not 'it is not part of this API')."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    accepted = {info.alias or name for model in contract.MODELS.values()
                for name, info in model.model_fields.items()}
    for theirs in (ChatCompletionRequest, CompletionRequest):
        names = {info.alias or name for name, info in theirs.model_fields.items()}
        assert names - accepted - set(contract.EXCLUDED) == set(), theirs.__name__
    assert accepted & set(contract.EXCLUDED) == set()


def test_every_refused_field_is_accepted_as_null():
    assert all(rule.neutral[0] is None for table in TABLES.values() for rule in table.values())


# Values next to a neutral one that ask for something (or are not the same JSON value).
NOT_NEUTRAL = [
    (CHAT, "echo", True), (CHAT, "echo", 0), (COMPLETIONS, "echo", "false"),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "tools", {}), (CHAT, "tool_choice", "required"),
    (CHAT, "tool_choice", {"type": "function", "function": {"name": "f"}}),
    (CHAT, "parallel_tool_calls", 1), (CHAT, "best_of", 2),
    (COMPLETIONS, "best_of", 1.0), (CHAT, "length_penalty", 1.5),
    (CHAT, "add_special_tokens", True), (COMPLETIONS, "add_special_tokens", False),
    (CHAT, "store", True), (CHAT, "metadata", {"k": "v"}),
    (CHAT, "modalities", ["text", "audio"]), (CHAT, "modalities", []),
    (CHAT, "service_tier", "flex"), (CHAT, "reasoning_effort", "low"),
    (CHAT, "logit_bias", {"50": 10}), (CHAT, "skip_special_tokens", False),
    (CHAT, "priority", 0.0), (CHAT, "priority", -1),
    (CHAT, "prompt_cache_retention", "24h"), (CHAT, "truncate_prompt_tokens", -1),
    (RESPONSES, "include", ["message.output_text.logprobs"]), (RESPONSES, "include", [None]),
    (RESPONSES, "tools", [{"type": "function", "name": "f", "parameters": {}}]),
    (RESPONSES, "tool_choice", "required"), (RESPONSES, "truncation", "auto"),
    (RESPONSES, "top_logprobs", 1), (RESPONSES, "top_logprobs", False),
    (RESPONSES, "reasoning", {"effort": "low"}), (RESPONSES, "reasoning", {"effort": None}),
    (RESPONSES, "background", True), (RESPONSES, "previous_response_id", "resp_1"),
    (RESPONSES, "stream_options", {"include_obfuscation": True}),
    (RESPONSES, "stop", ["x"]), (RESPONSES, "stop", ""),
    (RESPONSES, "seed", 0), (RESPONSES, "mm_payload", "none"),
]


@pytest.mark.parametrize("route, name, value", NOT_NEUTRAL,
                         ids=[f"{r.rsplit('/', 1)[1]}-{n}-{v!r}" for r, n, v in NOT_NEUTRAL])
def test_a_value_that_asks_for_something_is_refused_naming_the_field(route, name, value):
    assert_refused_naming(route, name, value)


def test_the_refusal_lists_what_the_field_is_accepted_as():
    error = refusal(RESPONSES, {**BASES[RESPONSES], "include": ["reasoning.encrypted_content"]})
    assert error.message.endswith("(accepted only as null or [], which ask for nothing)")
    error = refusal(COMPLETIONS, {**BASES[COMPLETIONS], "add_special_tokens": False})
    assert error.message.endswith("(accepted only as null or true, which ask for nothing)")
    error = refusal(CHAT, {**BASES[CHAT], "prompt_logprobs": 1})  # null only: no list
    assert error.message.endswith("are not served")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, 1.0, -1.5]),
              st.sampled_from(["", "none", "auto", "default", "text", "disabled", "in_memory",
                               "tensors", "required", "x"])),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
        st.sampled_from(["effort", "include_obfuscation", "type", "k"]), inner, max_size=2),
    max_leaves=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(list(TABLES)), data=st.data(), value=json_values)
def test_any_value_is_accepted_exactly_when_it_is_neutral(route, data, value):
    name = data.draw(st.sampled_from(sorted(TABLES[route])))
    rule = TABLES[route][name]
    if any(same_json(value, n) for n in rule.neutral_values(route)):
        assert prepare(route, {**BASES[route], name: value}) == forwarded(route)
    else:
        assert_refused_naming(route, name, value)


@pytest.mark.parametrize("value, neutral, same", [
    (False, False, True), (0, False, False), (None, False, False), (1, True, False),
    (1, 1, True), (1.0, 1, False), (True, 1, False), (1, 1.0, True), (1.0, 1.0, True),
    ([], [], True), ({}, [], False), ([None], [], False), (["text"], ["text"], True),
    ({"effort": "none"}, {"effort": "none"}, True), ({"effort": "none", "x": 1}, {"effort": "none"}, False),
    ({"include_obfuscation": 0}, {"include_obfuscation": False}, False), ("null", None, False),
])
def test_same_json_is_strict(value, neutral, same):
    assert same_json(value, neutral) is same


# --------------------------------------------------------------------------- clients' defaults

# openai-agents 0.24, OpenAIResponsesModel._build_response_create_kwargs with default model
# settings and no tools: include and tools always, empty; the rest omitted.
AGENTS_SDK_DEFAULT = {"model": "skingpt4", "instructions": "You are a dermatologist.",
                      "input": [{"content": "What's wrong with my skin?", "role": "user"}],
                      "include": [], "tools": []}
# The same with the model settings an agent may set that ask for nothing here (tool_choice is
# sent whenever set; parallel_tool_calls only with tools, but a client may send it anyway).
AGENTS_SDK_SETTINGS = {"tool_choice": "auto", "parallel_tool_calls": False, "store": False,
                       "truncation": "disabled", "metadata": {}, "reasoning": {"effort": "none"},
                       "prompt_cache_retention": "in_memory", "context_management": [],
                       "top_logprobs": 0, "service_tier": "auto", "stream": False}


def test_the_agents_sdk_default_request_is_answered_as_without_its_empty_fields():
    plain = {"model": "skingpt4", "instructions": "You are a dermatologist.",
             "input": [{"content": "What's wrong with my skin?", "role": "user"}]}
    assert prepare(RESPONSES, AGENTS_SDK_DEFAULT) == prepare(RESPONSES, plain)
    with_settings = prepare(RESPONSES, {**AGENTS_SDK_DEFAULT, **AGENTS_SDK_SETTINGS})
    assert with_settings == {**prepare(RESPONSES, plain), "store": False, "stream": False,
                             "metadata": {}}
    # The Agents SDK's chat model and LangChain's ChatOpenAI (chat and Responses) send only
    # accepted fields by default; tool_choice "none" and store false when a client sets them.
    langchain = {"model": "skingpt4", "stream": False,
                 "messages": [{"role": "user", "content": "Hi"}]}
    assert prepare(CHAT, {**langchain, "tool_choice": "none", "store": False}) == prepare(
        CHAT, langchain)


def test_tools_are_still_refused_for_an_agent_with_tools():
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object"}, "strict": True}
    error = refusal(RESPONSES, {**AGENTS_SDK_DEFAULT, "tools": [tool]})
    assert error.param == "tools" and "the model does not call tools" in error.message


# --------------------------------------------------------------------------- developer = system


@pytest.mark.parametrize("content", ["Answer briefly.", [{"type": "text", "text": "Answer briefly."}]])
def test_a_developer_message_reaches_chat_as_the_system_message(content):
    def body(role):
        return {**BASES[CHAT], "messages": [{"role": role, "content": content},
                                                  {"role": "user", "content": "Hi"}]}

    forwarded = prepare(CHAT, body("developer"))
    assert forwarded == prepare(CHAT, body("system"))
    assert forwarded["messages"][0] == {"role": "system", "content": content}


@pytest.mark.parametrize("content", ["Answer briefly.", [{"type": "input_text", "text": "Answer briefly."}]])
def test_a_developer_message_reaches_responses_as_the_system_message(content):
    def body(role):
        return {**BASES[RESPONSES], "input": [{"role": role, "content": content},
                                                    {"role": "user", "content": "Hi"}]}

    forwarded = prepare(RESPONSES, body("developer"))
    assert forwarded == prepare(RESPONSES, body("system"))
    assert forwarded["input"][0] == {"role": "system", "content": content}


def test_a_developer_message_renders_as_the_system_prompt():
    """The SkinGPT-4 template (which knows only system) gets the forwarded messages: the
    developer's text replaces the default system prompt, as a system message's does."""
    from plugins.skingpt4.template import render_chat

    forwarded = prepare(CHAT, {**BASES[CHAT], "messages": [
        {"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]})
    assert render_chat(forwarded["messages"]) == "Answer briefly.###Human: Hi###Assistant:"


@pytest.mark.parametrize("route, messages, where", [
    (CHAT, [{"role": "developer", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}, {"role": "user", "content": "Hi"}],
     "messages[0].content[0]"),
    (RESPONSES, [{"role": "developer", "content": [
        {"type": "input_image", "image_url": "data:,"}]}, {"role": "user", "content": "Hi"}],
     "input[0].content[0]"),
])
def test_a_photo_in_a_developer_message_is_refused_as_in_a_system_one(route, messages, where):
    field = "messages" if route == CHAT else "input"
    error = refusal(route, {**BASES[route], field: messages})
    assert error.status == 400 and error.param == where
    assert "developer" in error.message and "user message" in error.message


@pytest.mark.parametrize("route, field", [(CHAT, "messages"), (RESPONSES, "input")])
def test_other_roles_are_still_refused_naming_the_accepted_ones(route, field):
    error = refusal(route, {**BASES[route], field: [{"role": "tool", "content": "x"}]})
    assert error.param == f"{field}[0].role"
    assert "accepted roles: system, developer, user, assistant" in error.message
