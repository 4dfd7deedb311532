"""LiteLLM as a library (.clients/litellm) against the server; see _harness.py.

The server is an OpenAI-compatible endpoint to LiteLLM: model ``openai/<name>`` with ``api_base``
and ``api_key``. Chat (``completion``, streamed and not), structured output (``response_format``),
the Responses API (``responses``) and the Files and Batch API (``create_file``, ``create_batch``,
``retrieve_batch``, ``file_content``). The test sets LITELLM_LOCAL_MODEL_COST_MAP=True: LiteLLM
otherwise downloads its model price list at import.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import litellm
from _harness import job, run

JOB = job()
SERVER = {"api_base": JOB["base_url"], "api_key": JOB["api_key"]}
MODEL = f"openai/{JOB['model']}"
GREEDY = {"temperature": 0, "max_tokens": JOB["max_tokens"]}
MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": JOB["photo"]}},
    {"type": "text", "text": JOB["question"]}]}]
CONSULT = [{"role": "user", "content": [
    {"type": "input_image", "image_url": JOB["photo"]},
    {"type": "input_text", "text": JOB["question"]}]}]
FORMAT = {"type": "json_schema",
          "json_schema": {"name": JOB["schema_name"], "schema": JOB["schema"], "strict": True}}


def chat(**kw) -> str:
    return litellm.completion(model=MODEL, messages=MESSAGES, **GREEDY, **SERVER, **kw) \
        .choices[0].message.content


def chat_stream() -> str:
    stream = litellm.completion(model=MODEL, messages=MESSAGES, stream=True, **GREEDY, **SERVER)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def chat_structured() -> dict:
    text = chat(response_format=FORMAT)
    return {"text": text, "parsed": json.loads(text)}


def responses(**kw):
    return litellm.responses(model=MODEL, input=CONSULT, temperature=0,
                             max_output_tokens=JOB["max_tokens"], **SERVER, **kw)


def responses_stream() -> str:
    deltas = [event.delta for event in responses(stream=True)
              if event.type == "response.output_text.delta"]
    return "".join(deltas)


def responses_structured() -> dict:
    fmt = {"format": {"type": "json_schema", "name": JOB["schema_name"], "schema": JOB["schema"],
                      "strict": True}}
    text = responses(text=fmt).output_text
    return {"text": text, "parsed": json.loads(text)}


def batch() -> dict:
    lines = Path(JOB["work"]) / "litellm-batch.jsonl"
    lines.write_text(json.dumps({"custom_id": "consult-1", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"model": JOB["model"], "messages": MESSAGES, **GREEDY}}) + "\n")
    on = {"custom_llm_provider": "openai", **SERVER}
    upload = litellm.create_file(file=lines.open("rb"), purpose="batch", **on)
    created = litellm.create_batch(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", **on)
    deadline = time.monotonic() + 120
    while (done := litellm.retrieve_batch(batch_id=created.id, **on)).status not in (
            "completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch still {done.status}"
        time.sleep(0.3)
    assert done.status == "completed", f"batch {done.status}: {done.errors}"
    record = json.loads(litellm.file_content(file_id=done.output_file_id, **on).content)
    return {"text": record["response"]["body"]["choices"][0]["message"]["content"],
            "status_code": record["response"]["status_code"]}


run({
    "chat": chat,
    "chat_stream": chat_stream,
    "chat_structured": chat_structured,
    "responses": lambda: responses().output_text,
    "responses_stream": responses_stream,
    "responses_structured": responses_structured,
    "batch": batch,
})
