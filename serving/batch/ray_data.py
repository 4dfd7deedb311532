"""``skingpt4 batch --ray``: the accepted lines of a batch file answered on Ray Data.

:mod:`serving.api.jobs.runner` reads, checks, refuses and records every line, and resumes, exactly as
without ``--ray``; this module is the step that differs, the answering of the requests that
passed the checks. :class:`RayDataEngine` is a :class:`serving.api.jobs.runner.AnswerEngine` (``submit`` a
checked body, ``flush`` when the file is read, ``dead``, ``policy``) like the in-process
:class:`serving.batch.run.BatchEngine`; instead of one engine in this process it runs one Ray Data
pipeline over all the accepted requests:

    checked body --(driver: vLLM's own chat parsing, the model folder's chat template,
                    vLLM's tokenizer and sampling parameters, as the server renders it)-->
    row {key, tokenized_prompt, multimodal_data (PIL photos), sampling_params}
      --ray.data.from_items--> build_processor(vLLMEngineProcessorConfig): the vLLM engine
      stage, ``--replicas`` engine actors spread over the cluster's nodes
      --iter_rows--> (driver) an OpenAI body built with vLLM's own response classes

The engine actors get the embedded server's engine options
(:meth:`serving.engine.server.EmbeddedServerConfig.engine_options`, those that are ``EngineArgs``
fields: :func:`serving.engine.server.engine_arguments`; the others shape the server's response bodies,
which :func:`answer_body` builds here, and the stage never logs requests) and the replicas'
environment of ``serve --ray`` (:func:`serving.cluster.app.engine_environment`: vLLM's image
limits, the CPU KV cache size). The plugin model loads in them through its ``vllm.general_plugins`` entry point, so the
project must be installed in the Python environment of every node (docs/ray-cluster.md).

Why the prompt is rendered here rather than by Ray's chat-template and tokenize stages: Ray's
tokenize stage calls the tokenizer with its default ``add_special_tokens=True``, so a Llama
prompt, whose chat template already starts with BOS, would get a second BOS (the server
tokenizes chat prompts without special tokens), and its chat-template stage continues a final
assistant message instead of asking for a new answer. The prompt the engine gets here is token
for token the server's.

CPU engines: Ray Data's vLLM stage asks for ``tensor_parallel_size`` GPUs per engine actor unless
it is given a placement group config, whatever ``accelerator_type`` is (``accelerator_type=None``
alone leaves the actor waiting for a GPU on a CPU cluster). A CPU engine therefore gets
``placement_group_config={"bundles": [{"CPU": 1}] * (1 + tensor_parallel_size)}``, which the stage
turns into that many logical CPUs for the actor: one for the actor and one per tensor-parallel
rank, as a CPU replica of ``serve --ray`` takes.

What the stage does not return, and so what differs from the in-process answer body: the
``finish_reason`` and ``stop_reason`` are derived from the generated tokens (a stop string in
them, or an end-of-sequence token last, is ``stop``; otherwise ``length``), and
``usage.prompt_tokens_details.cached_tokens`` is null (the stage drops vLLM's
``num_cached_tokens``). ``n`` above 1, ``logprobs`` and several prompts in one completion request
are refused with a 400 (the stage returns one sequence per request and no OpenAI logprobs).

Photos travel from the driver to the engine actors through Ray's object store (in memory; Ray
spills objects to disk only when that store is full), never through a file of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from serving.api.jobs.runner import Answer
from serving.engine.errors import engine_error
from serving.api.contract import CHAT_ROUTE
from serving.api.errors import InternalError
from serving.api.policy import ServePolicy
from serving.engine.server import EmbeddedServerConfig, engine_arguments

# Sampling fields a row carries to the engine stage (which builds ``vllm.SamplingParams`` from
# them): every row has all of them, so Ray Data's Arrow blocks get one schema.
SAMPLING_FIELDS = (
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
)
# A failed row reports "<exception type>: <message>"; these types are the request's fault (the
# server answers them with a 400), anything else is a server error, retried by a rerun.
CLIENT_ERRORS = ("ValueError", "TypeError", "OverflowError", "VLLMValidationError")


@dataclass(frozen=True)
class RayBatchSettings:
    """Where and how many engines run."""

    replicas: int = 1  # engine actors (Ray Data's actor pool size)
    accelerator: Literal["cpu", "gpu"] | None = None  # None: gpu when the cluster has GPUs
    accelerator_type: str | None = None  # GPU kind (A100, H100...) when the cluster mixes kinds
    batch_size: int | None = None  # rows per engine call; None: spread over the replicas
    verbose: bool = False  # the engine actors' logs on the driver's stderr


# --- the driver: requests as the server renders them ------------------------------------------


@dataclass
class Rendered:
    """What the engine stage needs for one request, and what answering it needs afterwards."""

    route: str
    row: dict[str, Any]
    stops: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    image_tokens: int  # prompt positions of the photos


class Renderer:
    """Prompt token ids, photos and sampling parameters of a checked body, as vLLM's server
    computes them (``OpenAIServingChat`` / ``OpenAIServingCompletion`` over the same engine
    options): vLLM's chat parsing and template application, its tokenizer, the model folder's
    generation defaults, ``get_max_tokens`` and the protocol's ``to_sampling_params``."""

    def __init__(self, config: EmbeddedServerConfig) -> None:
        from vllm import AsyncEngineArgs
        from vllm.plugins import load_general_plugins
        from vllm.renderers.hf import resolve_chat_template_content_format
        from vllm.tokenizers.registry import cached_tokenizer_from_config

        load_general_plugins()  # the skingpt4 config and model, through the entry point
        options = engine_arguments(config.engine_options(on_gpu=False))
        # Only parsing and templating happen here: the engine's dtype does not matter, and
        # vLLM's dtype detection may not work on a driver without the engines' devices.
        options["dtype"] = "float32"
        self.model_config = AsyncEngineArgs(model=config.model, **options).create_model_config()
        self.model_name = config.model_name
        self.tokenizer = cached_tokenizer_from_config(self.model_config)
        self.content_format = resolve_chat_template_content_format(
            None, None, "auto", self.tokenizer, model_config=self.model_config)
        self.defaults = self.model_config.get_diff_sampling_param()
        hf = self.model_config.hf_config
        self.image_token_id = hf.image_token_id
        self.positions_per_image = hf.num_query_tokens
        self.eos_ids = frozenset(
            i for i in (self.tokenizer.eos_token_id, *self._generation_eos()) if i is not None)

    def _generation_eos(self) -> tuple[int, ...]:
        """End-of-sequence ids of the folder's generation config (the engine stops at them)."""
        eos = self.model_config.try_get_generation_config().get("eos_token_id")
        return tuple(eos if isinstance(eos, list) else [eos])

    async def render(self, route: str, body: dict) -> Rendered:
        """Raises what vLLM's server raises for the same body (turned into its error body by
        :func:`error_answer`)."""
        from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

        if body.get("model") not in (None, self.model_name):
            raise VLLMNotFoundError(f"The model `{body['model']}` does not exist.")
        if (body.get("n") or 1) > 1:
            raise VLLMValidationError(
                "n: skingpt4 batch --ray returns one answer per request; send n copies of the "
                "line with their own custom_id, or run without --ray", parameter="n")
        if body.get("logprobs"):
            raise VLLMValidationError(
                "logprobs: not available with skingpt4 batch --ray (Ray Data's vLLM stage "
                "returns no OpenAI logprobs); run without --ray", parameter="logprobs")
        if route == CHAT_ROUTE:
            request, token_ids, images = await self._chat(body)
        else:
            request, token_ids, images = self._completion(body)
        return self._rendered(route, request, token_ids, images)

    async def _chat(self, body: dict):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.renderers.chat_utils import parse_chat_messages_async
        from vllm.renderers.hf import safe_apply_chat_template

        request = ChatCompletionRequest.model_validate(body)
        conversation, mm_data, _ = await parse_chat_messages_async(
            request.messages, self.model_config, content_format=self.content_format)
        prompt = safe_apply_chat_template(
            self.model_config, self.tokenizer, conversation, tools=None, chat_template=None,
            tokenize=False, add_generation_prompt=True, continue_final_message=False)
        # Chat prompts are tokenized without special tokens: the template places BOS itself.
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return request, token_ids, mm_data

    def _completion(self, body: dict):
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.exceptions import VLLMValidationError

        request = CompletionRequest.model_validate(body)
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise VLLMValidationError(
                    "prompt: skingpt4 batch --ray takes one prompt per request; put each prompt "
                    "on its own line", parameter="prompt")
            prompt = prompt[0]
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
        return request, token_ids, None

    def _rendered(self, route: str, request, token_ids: list[int], images) -> Rendered:
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        photos = sum(1 for t in token_ids if t == self.image_token_id)
        image_tokens = photos * self.positions_per_image
        requested = getattr(request, "max_completion_tokens", None) or request.max_tokens
        override = (self.defaults.get("max_tokens")
                    if self.model_config.generation_config not in ("auto", "vllm")
                    else getattr(self.model_config, "override_generation_config", {})
                    .get("max_new_tokens"))
        # The prompt's length in the engine: each <ImageHere> becomes the photo's positions.
        max_tokens = get_max_tokens(self.model_config.max_model_len, requested,
                                    len(token_ids) - photos + image_tokens, self.defaults,
                                    override)
        params = request.to_sampling_params(max_tokens, self.defaults)
        row = {
            "tokenized_prompt": list(token_ids),
            "sampling_params": sampling_row(params),
        }
        if images:
            row["multimodal_data"] = images
        return Rendered(route, row, tuple(params.stop or ()),
                        frozenset(params.stop_token_ids or ()) | self.eos_ids,
                        bool(params.ignore_eos), image_tokens)


def sampling_row(params) -> dict[str, Any]:
    """``vllm.SamplingParams`` as the engine stage's ``sampling_params`` column."""
    row = {name: getattr(params, name) for name in SAMPLING_FIELDS}
    row["stop"] = list(row["stop"] or [])
    row["stop_token_ids"] = list(row["stop_token_ids"] or [])
    so = params.structured_outputs
    if so is not None:  # JSON output: the stage builds StructuredOutputsParams from this dict
        fields = {f.name: getattr(so, f.name) for f in dataclasses.fields(so)
                  if not f.name.startswith("_") and getattr(so, f.name) not in (None, False)}
        if isinstance(fields.get("json"), dict):  # a schema as text: one Arrow type for all
            fields["json"] = json.dumps(fields["json"])
        row["structured_outputs"] = fields
    else:
        row["structured_outputs"] = None
    return row


# --- answers from the engine stage's rows ------------------------------------------------------


def error_answer(exc: Exception) -> Answer:
    """The status and error body the server sends for ``exc``."""
    return *engine_error(exc), None


def failed_row_answer(message: str) -> Answer | None:
    """A row the engine failed: a 400 for what the server refuses too, None for a server error."""
    kind, _, text = message.partition(": ")
    if kind not in CLIENT_ERRORS:
        return None
    return *engine_error(text or message), None


def finish(rendered: Rendered, tokens: list[int], text: str, tokenizer) -> tuple[str, Any]:
    """(finish_reason, stop_reason) of a finished sequence, in the order vLLM's scheduler and
    detokenizer decide them: a stop string, an end-of-sequence or stop token, else the length."""
    if rendered.stops:
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        found = [(full.find(s), s) for s in rendered.stops if s in full]
        if found and not any(s in text for s in rendered.stops):  # cut off at the stop string
            return "stop", min(found)[1]
    if tokens and tokens[-1] in rendered.stop_token_ids and not rendered.ignore_eos:
        last = tokens[-1]
        return "stop", None if last == tokenizer.eos_token_id else last
    return "length", None


def answer_body(rendered: Rendered, out: dict, model_name: str, tokenizer) -> Answer:
    """The OpenAI body for an answered row, built with vLLM's own response classes."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponse,
        CompletionResponseChoice,
    )
    from vllm.entrypoints.serve.engine.protocol import PromptTokenUsageInfo, UsageInfo

    tokens = [int(t) for t in out["generated_tokens"]]
    text = out["generated_text"]
    finish_reason, stop_reason = finish(rendered, tokens, text, tokenizer)
    prompt_tokens = int(out["num_input_tokens"])
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                      total_tokens=prompt_tokens + len(tokens))
    if rendered.image_tokens:  # as the server's details, but without cached_tokens
        usage.prompt_tokens_details = PromptTokenUsageInfo(
            cached_tokens=None, multimodal_tokens={"image": rendered.image_tokens})
    if rendered.route == CHAT_ROUTE:
        response = ChatCompletionResponse(
            model=model_name, usage=usage,
            choices=[ChatCompletionResponseChoice(
                index=0, message=ChatMessage(role="assistant", content=text),
                finish_reason=finish_reason, stop_reason=stop_reason)])
    else:
        response = CompletionResponse(
            model=model_name, usage=usage,
            choices=[CompletionResponseChoice(
                index=0, text=text, finish_reason=finish_reason, stop_reason=stop_reason)])
    body = response.model_dump()
    return 200, body, body["id"]


# --- the engine --------------------------------------------------------------------------------


class RayDataEngine:
    """The answering step of :class:`serving.api.jobs.runner.BatchRun` on Ray Data: requests are rendered
    as they are submitted, answered together by one pipeline run when the file has been read
    (:meth:`flush`), and each answer reaches its request as its row comes back."""

    bulk = True  # answers come only after every request is submitted

    def __init__(self, config: EmbeddedServerConfig, ray_settings: RayBatchSettings) -> None:
        self.config = config
        self.settings = ray_settings
        self.policy: ServePolicy = config.served_policy()
        self.renderer = Renderer(config)
        self.dead = False
        self._pending: list[tuple[Rendered, asyncio.Future]] = []

    async def submit(self, route: str, body: dict) -> Awaitable[Answer]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            rendered = await self.renderer.render(route, body)
        except Exception as exc:  # as the server: the failure becomes its error body
            future.set_result(error_answer(exc))
            return future
        rendered.row["key"] = len(self._pending)
        self._pending.append((rendered, future))
        return future

    async def flush(self) -> None:
        """Answer every submitted request in one Ray Data run."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future = loop.create_future()

        def deliver(out: dict) -> None:
            rendered, future = pending[int(out["key"])]
            if not future.done():
                future.set_result(self._answer(rendered, out))

        def work() -> None:
            try:
                try:
                    rows = [r.row for r, _ in pending]
                    for out in run_pipeline(rows, self.config, self.settings):
                        loop.call_soon_threadsafe(deliver, out)
                except BaseException as exc:  # noqa: BLE001 - reported to the run
                    loop.call_soon_threadsafe(_settle, ended, exc)
                else:
                    loop.call_soon_threadsafe(_settle, ended, None)
            except RuntimeError:  # the run was stopped and its loop closed: nobody to tell
                pass

        # A daemon thread: a stopped run (SIGTERM, Ctrl-C) does not wait for Ray to finish.
        threading.Thread(target=work, name="skingpt4-ray-data", daemon=True).start()
        error = await ended
        if error is not None:
            self.dead = True
        reason = (f"the Ray Data run stopped ({type(error).__name__}: {str(error)[:300]})"
                  if error is not None else "the Ray Data run returned no row for it")
        for _, future in pending:
            if not future.done():  # a server error: not written, retried by a rerun
                future.set_exception(InternalError(reason))

    def _answer(self, rendered: Rendered, out: dict) -> Answer:
        error = out.get("__inference_error__") or ""
        if error:
            answer = failed_row_answer(error)
            if answer is None:  # a server error: not written, retried by a rerun
                return 500, {"error": {"message": f"the engine failed ({error[:300]})"}}, None
            return answer
        return answer_body(rendered, out, self.config.model_name, self.renderer.tokenizer)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)


def _postprocess(row: dict) -> dict:
    """What the driver reads of an answered row (photos and prompts stay behind)."""
    return {"key": row["key"], "generated_text": row["generated_text"],
            "generated_tokens": row["generated_tokens"],
            "num_input_tokens": row["num_input_tokens"]}


def processor_config(config: EmbeddedServerConfig, ray_settings: RayBatchSettings,
                     rows: int):
    """The ``vLLMEngineProcessorConfig`` of a run over ``rows`` requests."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from serving.cluster.app import engine_environment, model_path

    on_gpu = ray_settings.accelerator == "gpu"
    engine_kwargs = engine_arguments(config.engine_options(on_gpu=on_gpu))
    tp = config.tensor_parallel_size
    options: dict[str, Any] = {}
    if on_gpu:
        options["accelerator_type"] = ray_settings.accelerator_type
    else:
        # Without a placement group config the stage asks for tp GPUs (see the module doc).
        options["placement_group_config"] = {"bundles": [{"CPU": 1}] * (1 + tp)}
        if tp > 1:  # ranks as processes of the actor's node, as the embedded server runs them
            engine_kwargs["distributed_executor_backend"] = "mp"
    replicas = ray_settings.replicas
    # Small enough batches that every engine gets some of the rows.
    batch_size = ray_settings.batch_size or max(1, min(64, -(-rows // (2 * replicas))))
    return vLLMEngineProcessorConfig(
        model_source=model_path(config.model),
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": engine_environment(config, ray_settings.accelerator)},
        concurrency=(replicas, replicas),
        batch_size=batch_size,
        max_concurrent_batches=max(1, -(-config.max_num_seqs // batch_size)),
        chat_template_stage=False,  # rendered by the driver, as the server renders it
        tokenize_stage=False,
        detokenize_stage=False,  # the engine's text already ends before a stop string
        prepare_multimodal_stage=False,
        should_continue_on_error=True,  # one bad row becomes its error record, not a crash
        log_engine_metrics=True,
        **options,
    )


def run_pipeline(rows: list[dict], config: EmbeddedServerConfig,
                 ray_settings: RayBatchSettings) -> Iterator[dict]:
    """The engine stage's output rows, as they finish (Ray must be initialised)."""
    import ray.data
    from ray.data.llm import build_processor

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # skingpt4 batch has its own
    context.print_on_execution_start = ray_settings.verbose
    processor = build_processor(processor_config(config, ray_settings, len(rows)),
                                    postprocess=_postprocess)
    dataset = processor(ray.data.from_items(rows))
    yield from dataset.iter_rows()


# --- Ray's lifecycle ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_ray_engine(config: EmbeddedServerConfig,
                          ray_settings: RayBatchSettings) -> AsyncIterator[RayDataEngine]:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray instance, and leave it on exit
    (a local instance stops; a joined cluster keeps running). The accelerator, when not given,
    is gpu if the cluster has GPUs."""
    from serving.cluster.session import cluster_has_gpus, local_num_cpus, ray_session

    # The engines' logs stay in Ray's log files unless asked for (vLLM logs every batch).
    num_cpus = local_num_cpus(config.tensor_parallel_size, ray_settings.replicas)
    with ray_session(num_cpus, log_to_driver=ray_settings.verbose):
        if ray_settings.accelerator is None:
            kind = "gpu" if cluster_has_gpus() else "cpu"
            ray_settings = dataclasses.replace(ray_settings, accelerator=kind)
        yield RayDataEngine(config, ray_settings)
