"""Fixtures of the real-clients suite: one live server for every client (with a data folder, for
the Files and Batch API), the consult they all send, and the plain ``openai`` SDK's greedy
answers they are compared with."""

from __future__ import annotations

import pytest

from tests.serving.api.batch_api.test_batches_server import BatchServer
from tests.serving.clients.helpers import MAX_TOKENS, SCHEMA, SCHEMA_NAME
from tests.serving.helpers import data_url

QUESTIONS = ("What's wrong with my skin?", "Should I see a doctor?")
PHOTO_SEEDS = (2, 0, 1, 3, 4, 5)


@pytest.fixture(scope="package")
def clients_server(tiny_checkpoints, tmp_path_factory):
    """The server every client talks to: the session's shared server has no data folder, so this
    one is ``test_batches_server``'s kind (API key, ``--data-dir``), started once for the suite
    and stopped after its last test."""
    root = tmp_path_factory.mktemp("clients-server")
    holder = BatchServer(tiny_checkpoints["llama"], root, root / "data")
    server = holder.start()
    yield server
    server.process.stop()


def _plain_greedy(client, model: str, photo: str, question: str, image_first: bool = True):
    image = {"type": "image_url", "image_url": {"url": photo}}
    text = {"type": "text", "text": question}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [image, text] if image_first else [text, image]}],
        temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="package")
def consult(clients_server):
    """A photo and a question whose greedy answer ends (``###`` or EOS) before MAX_TOKENS: the
    Agents SDK treats an answer cut at ``max_output_tokens`` as an error, as it should, so every
    client gets an answer that ends by itself. The tiny random model decides which one that is."""
    from encoders.samples import encode_image, synthetic_skin_photo

    client = clients_server.client(timeout=120)
    for seed in PHOTO_SEEDS:
        photo = data_url(encode_image(synthetic_skin_photo(seed=seed)))
        for question in QUESTIONS:
            answer = _plain_greedy(client, clients_server.model, photo, question)
            if answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content:
                return {"photo": photo, "question": question}
    pytest.fail(f"no photo (seeds {PHOTO_SEEDS}) and question {QUESTIONS} has a greedy answer "
                f"that ends within {MAX_TOKENS} tokens on this checkpoint")


@pytest.fixture(scope="package")
def reference(clients_server, consult):
    """The plain ``openai`` SDK's (.venv's) greedy answers to the consult, per interface; the
    ``text_first`` ones put the question before the photo (as guidellm does)."""
    client, model = clients_server.client(timeout=120), clients_server.model
    photo, question = consult["photo"], consult["question"]
    fmt = {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": SCHEMA, "strict": True}}
    image, text = ({"type": "input_image", "image_url": photo},
                   {"type": "input_text", "text": question})

    def responses(parts, **kw):
        r = client.responses.create(model=model, input=[{"role": "user", "content": parts}],
                                    temperature=0, max_output_tokens=MAX_TOKENS, **kw)
        return r.output_text

    chat = _plain_greedy(client, model, photo, question).choices[0].message.content
    structured = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": question}]}],
        temperature=0, max_tokens=MAX_TOKENS, response_format=fmt).choices[0].message.content
    return {
        "chat": chat,
        "chat_structured": structured,
        "responses": responses([image, text]),
        "responses_structured": responses([image, text], text={"format": {
            "type": "json_schema", "name": SCHEMA_NAME, "schema": SCHEMA, "strict": True}}),
        "text_first": {
            "chat": _plain_greedy(client, model, photo, question, image_first=False).choices[0].message.content,
            "responses": responses([text, image]),
        },
    }


@pytest.fixture(scope="package")
def job(clients_server, consult, tmp_path_factory):
    """What every driver gets on stdin (drivers/_harness.py)."""
    return {"base_url": f"{clients_server.base_url}/v1", "api_key": clients_server.api_key,
            "model": clients_server.model, **consult, "max_tokens": MAX_TOKENS,
            "schema": SCHEMA, "schema_name": SCHEMA_NAME,
            "work": str(tmp_path_factory.mktemp("clients-work"))}
