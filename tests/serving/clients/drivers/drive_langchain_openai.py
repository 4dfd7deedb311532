"""langchain-openai's ChatOpenAI (.clients/langchain-openai) against the server; see _harness.py.

Chat (``invoke`` and ``stream``), structured output (``with_structured_output``, OpenAI's
json_schema method) and the Responses API (``use_responses_api=True``). langchain-openai has no
Files or Batch API interface (``batch`` runs requests concurrently).
"""

from __future__ import annotations

from typing import Literal

from _harness import job, run
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict

JOB = job()
CONSULT = [HumanMessage(content=[
    {"type": "image_url", "image_url": {"url": JOB["photo"]}},
    {"type": "text", "text": JOB["question"]}])]


class Finding(BaseModel):
    """The test's schema (``JOB["schema"]``) as LangChain's users write it: a pydantic model."""

    model_config = ConfigDict(extra="forbid")
    condition: Literal[tuple(JOB["schema"]["properties"]["condition"]["enum"])]  # type: ignore[valid-type]
    see_a_doctor: bool


def model(**kw) -> ChatOpenAI:
    return ChatOpenAI(model=JOB["model"], base_url=JOB["base_url"], api_key=JOB["api_key"],
                      temperature=0, max_tokens=JOB["max_tokens"], max_retries=0, **kw)


def text_of(message) -> str:
    """The answer's text: a string on chat, a list of content blocks on Responses."""
    return message.text if isinstance(message.text, str) else message.text()


def streamed(**kw) -> str:
    return "".join(text_of(chunk) for chunk in model(**kw).stream(CONSULT))


def structured(**kw) -> dict:
    out = model(**kw).with_structured_output(Finding, method="json_schema", strict=True,
                                             include_raw=True).invoke(CONSULT)
    if out["parsing_error"] is not None:
        raise out["parsing_error"]
    return {"text": text_of(out["raw"]), "parsed": out["parsed"].model_dump()}


run({
    "chat": lambda: text_of(model().invoke(CONSULT)),
    "chat_stream": streamed,
    "chat_structured": structured,
    "responses": lambda: text_of(model(use_responses_api=True).invoke(CONSULT)),
    "responses_stream": lambda: streamed(use_responses_api=True),
    "responses_structured": lambda: structured(use_responses_api=True),
})
