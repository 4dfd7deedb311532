"""LiteLLM (pinned in requirements/clients/litellm.txt) against the server, two ways: as a library
(``completion``, ``responses``, ``create_file``/``create_batch``) and as its proxy server
(``litellm --config``, on a loopback port in front of the server) driven by the plain ``openai``
SDK: chat and Responses, streamed and not, structured answers, and the Files and Batch API."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
from openai import OpenAI

from serving.engine.process import ServerProcess, ServerStartError, free_port
from tests.serving.clients.helpers import (
    CLIENTS,
    MAX_TOKENS,
    SCHEMA,
    SCHEMA_NAME,
    check_interface,
    client_env,
    python_driver,
    python_of,
)
from tests.serving.helpers import batch_final

pytestmark = pytest.mark.clients

INTERFACES = ["chat", "chat_stream", "chat_structured",
              "responses", "responses_stream", "responses_structured", "batch"]
# LiteLLM downloads its model price list at import unless told to use the copy it ships.
LOCAL_COST_MAP = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@pytest.fixture(scope="module")
def library_results(job):
    return python_driver("litellm", "drive_litellm.py", job, **LOCAL_COST_MAP)


@pytest.mark.parametrize("interface", INTERFACES)
def test_library_greedy_answer_is_the_plain_sdks(library_results, reference, interface):
    check_interface(library_results, reference, interface)


# --------------------------------------------------------------------------- the proxy


@pytest.fixture(scope="module")
def proxy(clients_server, tmp_path_factory):
    """``litellm --config`` on a loopback port: the server as model ``skingpt4`` (and as the
    Files/Batch provider), and a master key of its own that clients use."""
    python_of("litellm")
    root = tmp_path_factory.mktemp("litellm-proxy")
    upstream = {"api_base": f"{clients_server.base_url}/v1", "api_key": clients_server.api_key}
    master_key = f"sk-{secrets.token_hex(8)}"
    config = root / "config.yaml"  # JSON is YAML
    config.write_text(json.dumps({
        "model_list": [{"model_name": clients_server.model,
                        "litellm_params": {"model": f"openai/{clients_server.model}", **upstream}}],
        "files_settings": [{"custom_llm_provider": "openai", **upstream}],
        "general_settings": {"master_key": master_key},
    }))
    port = free_port()
    root_url = f"http://127.0.0.1:{port}"
    process = ServerProcess(
        [CLIENTS / "litellm" / "bin" / "litellm", "--config", config, "--host", "127.0.0.1",
         "--port", str(port)],
        root_url=root_url, log_path=root / "proxy.log", cwd=root,
        env=client_env(**LOCAL_COST_MAP), name="the LiteLLM proxy")
    process.launch()
    try:
        deadline = time.monotonic() + 180
        while True:  # its /health asks for the master key; /health/liveliness does not
            if process.poll() is not None:
                raise ServerStartError(f"the LiteLLM proxy exited {process.poll()}", process.log_tail())
            try:
                if httpx.get(f"{root_url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError("the LiteLLM proxy did not start in 180 s", process.log_tail())
            time.sleep(0.5)
        yield OpenAI(base_url=f"{root_url}/v1", api_key=master_key, max_retries=0, timeout=120)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxy_results(proxy, job, clients_server):
    """Each interface through the proxy with the plain ``openai`` SDK (.venv's)."""
    model, photo, question = clients_server.model, job["photo"], job["question"]
    greedy = {"temperature": 0, "max_tokens": MAX_TOKENS}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo}},
                                             {"type": "text", "text": question}]}]
    consult = [{"role": "user", "content": [{"type": "input_image", "image_url": photo},
                                            {"type": "input_text", "text": question}]}]
    chat_format = {"type": "json_schema",
                   "json_schema": {"name": SCHEMA_NAME, "schema": SCHEMA, "strict": True}}
    text_format = {"format": {"type": "json_schema", "name": SCHEMA_NAME, "schema": SCHEMA,
                              "strict": True}}

    def chat(**kw):
        return proxy.chat.completions.create(model=model, messages=messages, **greedy, **kw)

    def responses(**kw):
        return proxy.responses.create(model=model, input=consult, temperature=0,
                                      max_output_tokens=MAX_TOKENS, **kw)

    def structured(text):
        return {"text": text, "parsed": json.loads(text)}

    def batch():
        line = {"custom_id": "consult-1", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": messages, **greedy}}
        upload = proxy.files.create(file=("consults.jsonl", json.dumps(line).encode() + b"\n"),
                                    purpose="batch")
        batch = proxy.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        batch = batch_final(proxy, batch.id, timeout_s=120, every_s=0.3)
        assert batch.status == "completed", batch
        record = json.loads(proxy.files.content(batch.output_file_id).text)
        return {"text": record["response"]["body"]["choices"][0]["message"]["content"],
                "status_code": record["response"]["status_code"]}

    cases = {
        "chat": lambda: {"text": chat().choices[0].message.content},
        "chat_stream": lambda: {"text": "".join(c.choices[0].delta.content or ""
                                                for c in chat(stream=True) if c.choices)},
        "chat_structured": lambda: structured(chat(response_format=chat_format).choices[0].message.content),
        "responses": lambda: {"text": responses().output_text},
        "responses_stream": lambda: {"text": "".join(e.delta for e in responses(stream=True)
                                                     if e.type == "response.output_text.delta")},
        "responses_structured": lambda: structured(responses(text=text_format).output_text),
        "batch": batch,
    }
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as exc:  # noqa: BLE001 - each interface is its own test
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.mark.parametrize("interface", INTERFACES)
def test_proxy_greedy_answer_is_the_plain_sdks(proxy_results, reference, interface):
    check_interface(proxy_results, reference, interface)
