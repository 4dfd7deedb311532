"""The OpenAI Agents SDK (.clients/openai-agents) against the server; see _harness.py.

Configured as a user would point it at another server: OPENAI_BASE_URL and OPENAI_API_KEY in the
environment, nothing else (the test also sets OPENAI_AGENTS_DISABLE_TRACING=1: traces are
exported to OpenAI's platform, not to the server). The default model path is the Responses API;
``OpenAIChatCompletionsModel`` is the SDK's chat path.
"""

from __future__ import annotations

from typing import Literal

from _harness import job, run
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent
from pydantic import BaseModel, ConfigDict

JOB = job()
SETTINGS = ModelSettings(temperature=0, max_tokens=JOB["max_tokens"])
CONSULT = [{"role": "user", "content": [
    {"type": "input_image", "image_url": JOB["photo"], "detail": "auto"},
    {"type": "input_text", "text": JOB["question"]}]}]


class Finding(BaseModel):
    """The test's schema (``JOB["schema"]``) as the SDK's users write it: a pydantic model."""

    model_config = ConfigDict(extra="forbid")
    condition: Literal[tuple(JOB["schema"]["properties"]["condition"]["enum"])]  # type: ignore[valid-type]
    see_a_doctor: bool


def chat_model():
    return OpenAIChatCompletionsModel(model=JOB["model"], openai_client=AsyncOpenAI())


def agent(model=None, output_type=None) -> Agent:
    return Agent(name="dermatology", model=model or JOB["model"], model_settings=SETTINGS,
                 output_type=output_type)


async def plain(model=None) -> str:
    return (await Runner.run(agent(model), CONSULT)).final_output


async def streamed(model=None) -> dict:
    result = Runner.run_streamed(agent(model), CONSULT)
    deltas = []
    async for event in result.stream_events():
        if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
            deltas.append(event.data.delta)
    return {"text": "".join(deltas), "final_output": result.final_output}


async def structured(model=None) -> dict:
    result = await Runner.run(agent(model, Finding), CONSULT)
    raw = [part.text for item in result.raw_responses[-1].output
           for part in getattr(item, "content", None) or () if part.type == "output_text"]
    return {"text": "".join(raw), "parsed": result.final_output.model_dump()}


run({
    "responses": plain,
    "responses_stream": streamed,
    "responses_structured": structured,
    "chat": lambda: plain(chat_model()),
    "chat_stream": lambda: streamed(chat_model()),
    "chat_structured": lambda: structured(chat_model()),
})
