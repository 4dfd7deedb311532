"""The server's routes, in one table: what each path is, who may call it, and what the request
policy does with it. Everything else reads this module (the middleware's route check, the
request pipeline, the ``max_tokens`` check, the Batch API's endpoints, the metrics' route
templates, Ray's ingress and replicas), so a route is added or made batchable here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MODELS = "/v1/models"
FILES = "/v1/files"
BATCHES = "/v1/batches"
HEALTH = "/health"
PING = "/ping"
METRICS = "/metrics"
VERSION = "/version"


@dataclass(frozen=True)
class AnswerRoute:
    """A POST route the engine answers: its body goes through the request pipeline
    (:func:`serving.api.pipeline.prepare_request`) and the ``max_tokens`` check."""

    path: str
    # The fields that bound the answer's length, in the order the server reads them (the first
    # one a request sets counts).
    max_tokens_fields: tuple[str, ...]
    # A line of a Batch API file may name it as its ``url`` (and a batch its ``endpoint``).
    batchable: bool


ANSWER_ROUTES: dict[str, AnswerRoute] = {r.path: r for r in (
    AnswerRoute(CHAT, ("max_completion_tokens", "max_tokens"), batchable=True),
    AnswerRoute(COMPLETIONS, ("max_tokens",), batchable=True),
    AnswerRoute(RESPONSES, ("max_output_tokens",), batchable=False),
)}
BATCH_ROUTES = tuple(path for path, route in ANSWER_ROUTES.items() if route.batchable)
# GET (and HEAD) routes the app serves; every other path but the Batch API's is a 404.
GET_ROUTES = (HEALTH, PING, MODELS, METRICS, VERSION)
# Served without an API key (a load balancer's health check has none).
OPEN_PATHS = (HEALTH,)
# Probes: their successful answers stay out of the access log (a scrape a second).
PROBES = (HEALTH, PING, METRICS)


def is_batch_api_path(path: str) -> bool:
    """Whether ``path`` is one of the Files or Batch API's routes."""
    return path in (FILES, BATCHES) or path.startswith((FILES + "/", BATCHES + "/"))


def route_template(path: str, page_paths: tuple[str, ...] = ()) -> str:
    """The route ``path`` is an instance of, its ids replaced (``/v1/files/{file_id}``), for
    metrics and the access log; ``other`` for a path this server does not serve, so that a scan
    of random paths cannot grow the metrics. ``page_paths``: the consult page's files."""
    if path in ANSWER_ROUTES or path in GET_ROUTES or path in page_paths:
        return path
    if is_batch_api_path(path):
        parts = path.rstrip("/").split("/")  # "", "v1", "files" | "batches", id, action
        base, name = "/".join(parts[:3]), "{file_id}" if parts[2] == "files" else "{batch_id}"
        action = {FILES: "content", BATCHES: "cancel"}[base]
        if len(parts) == 3:
            return base
        if len(parts) == 4:
            return f"{base}/{name}"
        if len(parts) == 5 and parts[4] == action:
            return f"{base}/{name}/{action}"
    return "other"
