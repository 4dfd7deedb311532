"""The ``max_tokens`` check: a request's answer must fit beside its prompt in the model's
context (vLLM would shorten it silently). Used by the request policy
(:mod:`serving.api.middleware`), ``skingpt4 batch`` and the Ray LLM replica."""

from __future__ import annotations

import json

from serving.api.errors import ContextLengthExceeded
from serving.api.http import call_app
from serving.api.responses import as_chat_messages
from serving.api.routes import ANSWER_ROUTES, CHAT, COMPLETIONS, RESPONSES


class MaxTokensCheck:
    """``max_tokens`` must fit beside the prompt in the model's context (vLLM would shorten it
    silently): a 400 that says how many tokens are left, as OpenAI answers. The prompt is
    counted by the app's own ``/tokenize`` (the same template, photos as their image positions),
    only when a cheap upper bound on the prompt (one token per byte of text, a bound per photo
    and per message) does not already show that it fits."""

    PER_PHOTO = 64  # image positions and their text markers (SkinGPT-4: 32 query tokens)
    PER_PART = 16
    TEMPLATE = 1024  # the template's own text: the system prompt, separators, BOS

    def __init__(self, app=None, counter=None) -> None:
        """``app``: the app whose ``/tokenize`` counts a prompt; or ``counter``, an async
        function from a ``/tokenize`` request body to ``(count, max_model_len)`` or None
        (``skingpt4 batch``, which has vLLM's serving objects but no app, and a Ray LLM
        replica, ``SkinGPT4Server``, which has its engine's: :mod:`serving.engine.tokens`)."""
        self.app = app
        self.counter = counter
        self.max_model_len: int | None = None  # learned from the first count

    async def check(self, scope, route: str, body: dict) -> None:
        fields = ANSWER_ROUTES[route].max_tokens_fields if route in ANSWER_ROUTES else ()
        field = next((f for f in fields if body.get(f) is not None), None)
        if field is None:
            return
        wanted = body[field]
        if route == RESPONSES:  # counted as the chat conversation it renders to
            route, body = CHAT, {"model": body.get("model"), "messages": as_chat_messages(body)}
        if self.max_model_len is not None and wanted + self._bound(route, body) <= self.max_model_len:
            return
        counts = [await self._count(scope, req) for req in self._tokenize_requests(route, body)]
        if not counts or None in counts:
            return  # the app could not count it: it answers the request itself
        prompt = max(c for c, _ in counts)
        context = counts[0][1]
        self.max_model_len = context
        if prompt + wanted > context:
            left = max(context - prompt, 0)
            where = {COMPLETIONS: "prompt"}.get(route, "messages")
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt + wanted} tokens ({prompt} in the {where}, {wanted} in the "
                f"completion): at most {left} tokens are left for the completion. Lower "
                f"{field} or shorten the {where}.",
                param=field,
            )

    def _bound(self, route: str, body: dict) -> int:
        if route == COMPLETIONS:
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            return self.TEMPLATE + max(len(p.encode("utf-8")) + self.PER_PART for p in prompts)
        total = self.TEMPLATE
        for message in body["messages"]:
            content = message.get("content")
            parts = [content] if isinstance(content, str) else content or []
            for part in parts:
                total += self.PER_PART
                if isinstance(part, str):
                    total += len(part.encode("utf-8"))
                elif part.get("type") == "text":
                    total += len(part.get("text", "").encode("utf-8"))
                else:
                    total += self.PER_PHOTO
        return total

    @staticmethod
    def _tokenize_requests(route: str, body: dict) -> list[dict]:
        model = {"model": body["model"]} if body.get("model") else {}
        if route == CHAT:
            return [model | {"messages": body["messages"]}]
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return [model | {"prompt": p} for p in prompts]

    async def _count(self, scope, request: dict) -> tuple[int, int] | None:
        if self.counter is not None:
            try:
                return await self.counter(request)
            except Exception:  # it could not count (a replica gone...): the app decides alone
                return None
        raw = json.dumps(request, ensure_ascii=False).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        sub = dict(scope, path="/tokenize", raw_path=b"/tokenize", query_string=b"", headers=headers)
        try:
            status, out = await call_app(self.app, sub, raw)
            data = json.loads(out) if status == 200 else None
            return (int(data["count"]), int(data["max_model_len"])) if data else None
        except Exception:  # no /tokenize here (or an odd answer): the app decides alone
            return None
