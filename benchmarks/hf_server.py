"""The two baselines of the benchmarks behind an OpenAI-compatible endpoint, on Hugging Face ``generate``.

    python -m benchmarks.hf_server MODEL --mode reference  --host 127.0.0.1 --port 8001
    python -m benchmarks.hf_server MODEL --mode hf-batched --host 127.0.0.1 --port 8002

- ``reference``: the original SkinGPT-4 demo's behaviour (MiniGPT-4 ``Chat.answer``): one request
  at a time, batch 1, ``generate(inputs_embeds=...)``, stop at ``###``. Requests queue in arrival
  order, as behind the demo's Gradio queue.
- ``hf-batched``: static batching, what a careful engineer builds without vLLM. A worker takes the
  waiting requests (up to ``--max-batch-size``, waiting at most ``--batch-wait-ms`` for more), left-pads
  their ``(T_i, H)`` input embeddings into one ``(B, T_max, H)`` batch with an attention mask and runs
  one ``generate`` over it. A request that arrives meanwhile waits for the next batch; a row that
  finishes early is answered at once, but its slot stays idle until the whole batch is done.

Both modes run :class:`benchmarks.hf_engine.HFEngine` over :class:`benchmarks.reference.ReferencePipeline`
(the parity oracle) and stream one token at a time from a per-step hook, so time to first token is
real. Routes: ``/health``,
``/v1/models``, ``/v1/chat/completions`` (data-URL ``image_url`` parts, multi-turn, streaming SSE with
``usage`` in the last chunk when ``stream_options.include_usage``). Messages render to the prompt
through SkinGPT-4's chat template itself (``plugins.skingpt4.template.render_chat``, the template vLLM
renders); responses are the ``openai`` package's own types. Sampling defaults are the model folder's
``generation_config.json`` (``transformers.GenerationConfig``).
"""

from __future__ import annotations

import argparse
import asyncio
import string
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig

from benchmarks.hf_engine import HFEngine, Job, Sampling
from benchmarks.reference import ReferencePipeline
from plugins.skingpt4.template import SEP, render_chat
from serving.api.errors import InternalError, InvalidRequest, NotFound, ServingError
from serving.api.media import data_url_bytes, decode_photo
from serving.api.policy import ServePolicy

_POLICY = ServePolicy()  # the product server's image limits

Mode = Literal["reference", "hf-batched"]


# --------------------------------------------------------------------------- errors


# The product's error tree (serving.api.errors): the same OpenAI error bodies as the vLLM server.


# --------------------------------------------------------------------------- request schema


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request these baselines honour; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


# --------------------------------------------------------------------------- prompt rendering


def decode_data_url(url: str) -> Image.Image:
    """An RGB image from a ``data:image/...;base64,...`` URL (these servers fetch nothing),
    checked like the product server checks it."""
    if not url.startswith("data:"):
        raise InvalidRequest(
            f"image_url {url[:40]!r} is not a data URL; send the photo inline as data:image/jpeg;base64,..."
        )
    limits = _POLICY.photo_limits()
    with decode_photo(data_url_bytes(url, limits, "image_url"), limits, "image_url") as im:
        return im.convert("RGB")


def _message_images(message: ChatMessage) -> list[Image.Image]:
    """The decoded photos of one message's image parts, in order; only user messages carry them."""
    if isinstance(message.content, str):
        return []
    parts = [part for part in message.content if isinstance(part, ImagePart)]
    if parts and message.role != "user":
        raise InvalidRequest(f"an image part in a {message.role!r} message; images go in user messages")
    return [decode_data_url(part.image_url.url) for part in parts]


def render_messages(messages: list[ChatMessage]) -> tuple[str, list[Image.Image]]:
    """The SkinGPT-4 prompt (``CHAT_TEMPLATE`` rendered, without BOS) and the images in order."""
    if messages[-1].role != "user":
        raise InvalidRequest("the last message must come from the user")
    images = [image for message in messages for image in _message_images(message)]
    prompt = render_chat([m.model_dump(exclude_none=True) for m in messages], add_generation_prompt=True)
    return prompt, images


# --------------------------------------------------------------------------- text and responses

_HELD_BACK = SEP[:1] + "\ufffd" + string.whitespace  # the start of ``###``, half a character


def visible_text(decoded: str, final: bool) -> str:
    """The answer text so far: what precedes ``###``, trimmed as the demo's ``.strip()`` does.

    Until the end, trailing ``#`` (maybe the start of ``###``), an incomplete UTF-8 character and
    whitespace are held back, so streamed deltas concatenate to the final text.
    """
    text = decoded.split(SEP)[0].lstrip()
    return text.rstrip() if final else text.rstrip(_HELD_BACK)


class TextAssembler:
    """Token ids in, text deltas out."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = ""

    def _delta(self, final: bool) -> str:
        text = visible_text(self.tokenizer.decode(self.token_ids, skip_special_tokens=True), final)
        if not text.startswith(self.sent):
            return ""  # decoding rewrote sent text (rare); never retract what the client has
        delta, self.sent = text[len(self.sent):], text
        return delta

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)


@dataclass
class GenerationDefaults:
    """The model folder's ``generation_config.json`` (the demo's sampling defaults)."""

    max_tokens: int = 300
    temperature: float = 1.0
    top_p: float = 0.9

    @classmethod
    def from_folder(cls, folder: Path) -> GenerationDefaults:
        """Unset fields (or no file at all) keep the class defaults; ``do_sample: false`` is greedy."""
        try:
            cfg = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json
            return cls()
        temperature = cls.temperature if cfg.temperature is None else cfg.temperature
        return cls(
            max_tokens=cls.max_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens,
            temperature=0.0 if cfg.do_sample is False else temperature,
            top_p=cls.top_p if cfg.top_p is None else cfg.top_p,
        )

    def sampling(self, req: ChatCompletionRequest) -> Sampling:
        return Sampling(
            max_tokens=req.max_completion_tokens or req.max_tokens or self.max_tokens,
            temperature=self.temperature if req.temperature is None else req.temperature,
            top_p=self.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
        )


@dataclass
class Completion:
    """What the handler collected from a job's events."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def usage(self) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


@dataclass(frozen=True)
class ResponseHead:
    """The fields every chunk and completion of one response share."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> ResponseHead:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _json(body: BaseModel) -> str:
    # exclude_unset: fields never set (``usage`` of a plain chunk, ``refusal``...) stay off the wire;
    # fields set to None on purpose (``finish_reason: null``, ``logprobs: null``) stay on it.
    return body.model_dump_json(exclude_unset=True)


async def _job_stream(job: Job, assembler: TextAssembler, done: Completion) -> AsyncIterator[str]:
    """Text deltas until the job ends; fills ``done``. Marks the job cancelled if abandoned."""
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "start":
                done.prompt_tokens = value
            elif kind == "token":
                done.completion_tokens += 1
                if delta := assembler.push(value):
                    yield delta
            elif kind == "error":
                raise InternalError(value)
            else:
                done.finish_reason = value
                if delta := assembler.finish():
                    yield delta
                return
    finally:
        if not job.finished:
            job.cancelled = True


def _chunk(head: ResponseHead, delta: ChoiceDelta | None, finish_reason: str | None = None,
           usage: CompletionUsage | None = None) -> str:
    choices = [] if delta is None else [
        ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)
    ]
    extra = {} if usage is None else {"usage": usage}
    chunk = ChatCompletionChunk(
        id=head.id, created=head.created, model=head.model, object="chat.completion.chunk",
        choices=choices, **extra,
    )
    return f"data: {_json(chunk)}\n\n"


async def _sse(job: Job, assembler: TextAssembler, head: ResponseHead, include_usage: bool) -> AsyncIterator[str]:
    done = Completion()
    yield _chunk(head, ChoiceDelta(role="assistant", content=""))
    try:
        async for delta in _job_stream(job, assembler, done):
            yield _chunk(head, ChoiceDelta(content=delta))
    except ServingError as exc:  # headers are sent: report in-band as OpenAI does
        yield f"data: {exc.body().decode()}\n\n"
        return
    yield _chunk(head, ChoiceDelta(), finish_reason=done.finish_reason)
    if include_usage:
        yield _chunk(head, None, usage=done.usage())
    yield "data: [DONE]\n\n"


async def _complete(job: Job, assembler: TextAssembler, head: ResponseHead) -> ChatCompletion:
    # ``finish_reason`` "abort" (a client gone) never gets here: only an abandoned stream cancels a job.
    done = Completion()
    text = "".join([delta async for delta in _job_stream(job, assembler, done)])
    return ChatCompletion(
        id=head.id, created=head.created, model=head.model, object="chat.completion",
        choices=[Choice(
            index=0,
            message=ChatCompletionMessage(role="assistant", content=text),
            logprobs=None,
            finish_reason=done.finish_reason,
        )],
        usage=done.usage(),
    )


# --------------------------------------------------------------------------- app


def create_app(engine: HFEngine, model_name: str, defaults: GenerationDefaults) -> FastAPI:
    """The app over ``engine``; the app owns it and closes it (stops its worker) at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)  # waits out the running batch's next step

    app = FastAPI(title="skingpt4 HF baseline", lifespan=lifespan)
    tokenizer = engine.pipeline.tokenizer

    @app.exception_handler(ServingError)
    async def _server_error(request: Request, exc: ServingError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return await _server_error(request, InvalidRequest(str(exc.errors())))

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        card = Model(id=model_name, object="model", created=0, owned_by="skingpt4-serve")
        return {"object": "list", "data": [card.model_dump(exclude_unset=True)]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        if req.model != model_name:
            raise NotFound(f"model {req.model!r} is not served here; this server serves {model_name!r}")
        if req.n != 1:
            raise InvalidRequest(f"n is {req.n}; these baselines answer one choice (n=1)")
        prompt, images = render_messages(req.messages)
        job = Job(prompt, images, defaults.sampling(req), asyncio.get_running_loop())
        engine.submit(job)
        head = ResponseHead.new(model_name)
        assembler = TextAssembler(tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, assembler, head, include_usage), media_type="text/event-stream")
        completion = await _complete(job, assembler, head)
        return Response(_json(completion), media_type="application/json")

    return app


def build_engine(model: Path, mode: Mode, max_batch_size: int, batch_wait_s: float) -> HFEngine:
    pipeline = ReferencePipeline(model)
    if mode == "reference":
        return HFEngine(pipeline, max_batch_size=1, batch_wait_s=0.0)
    return HFEngine(pipeline, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_server", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a SkinGPT-4 model folder")
    parser.add_argument("--mode", choices=["reference", "hf-batched"], default="reference")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="default: MODEL as given (as vLLM does)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="hf-batched only")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="hf-batched only: wait for more requests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    engine = build_engine(args.model, args.mode, args.max_batch_size, args.batch_wait_ms / 1000)
    app = create_app(engine, args.served_model_name or str(args.model), GenerationDefaults.from_folder(args.model))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
