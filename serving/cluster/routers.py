"""Ray Serve: the request routers of the LLM deployment (``ReplicaSettings.routing``).

:class:`SessionAffinityRouter` (``session``, the default) sends every turn of a consult sent with
an ``x-session-id`` header to the replica holding its prefix, and a request without one follows
prefix affinity; :class:`PrefixAffinityRouter` (``prefix``) is prefix affinity only. Both read
Responses requests and see photos; a request that reaches them as HTTP, not as a parsed body
(replicas that are their own ingress), goes by its session id, else to the less loaded of two
random replicas. Ray Serve imports them by path: :data:`ROUTERS`, the paths of
``request_router_config``, computed from the classes themselves.
"""

from __future__ import annotations

import hashlib

from ray.serve.llm.request_router import PrefixCacheAffinityRouter

from serving.api.metrics import metrics
from serving.api.responses import as_chat_messages
from serving.cluster.routing import ConsultRing

# The consult header (Ray Serve's RAY_SERVE_SESSION_ID_HEADER_KEY, default x-session-id): the proxy
# and OpenAiIngress read it and hand it to the LLM deployment's router as the request's session_id.
SESSION_HEADER = "x-session-id"


def photo_marker(url: str) -> str:
    """A photo's place in the prefix router's text of a request: a digest of its URL (for a data
    URL, of the photo's bytes), where the photo stands in the conversation."""
    return f"<img {hashlib.blake2b(url.encode(), digest_size=12).hexdigest()}>"


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    """Ray Serve LLM's :class:`PrefixCacheAffinityRouter` (the replica that already saw the
    longest prefix of a request's text, else the least loaded), which also reads Responses
    requests and sees photos.

    Ray's text of a request holds only its text parts, so consults that open with the same
    question (an app's canned first question) look alike whatever their photos, while vLLM's
    prefix cache holds a consult's photo as image positions keyed by the photo's hash: a
    follow-up turn could be sent to a replica that holds another consult. Here each photo adds
    :func:`photo_marker` to the text where it stands, so the longest prefix is that of the same
    photo and the same conversation."""

    def _coerce_to_text(self, value) -> str:
        # A message part's text for the prefix router (a private hook of
        # PrefixCacheAffinityRouter; serving.cluster.app.PRIVATE_RAY_NAMES says why): Ray's gives
        # photos none.
        if isinstance(value, dict) and value.get("type") in ("image_url", "input_image"):
            url = value.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str):
                return photo_marker(url)
        return super()._coerce_to_text(value)

    def _extract_text_from_request(self, pending_request) -> str:
        # The prefix router's text of a request (a private hook of PrefixCacheAffinityRouter:
        # serving.cluster.app.PRIVATE_RAY_NAMES says why it is overridden). Ray's reads `messages`
        # (chat) or `prompt` (completions); vLLM's ResponsesRequest has no messages, and its
        # `prompt` is a stored-prompt reference (always None here), on which Ray's raises. Its
        # text is chat's for the same conversation: the policy's one Responses -> chat
        # translation (`as_chat_messages`, which the max_tokens check also counts by).
        # A request whose body the router cannot read (Serve's proxy routing an HTTP request to
        # a replica that is its own ingress, ReplicaSettings.ingress "replica") has no text: None,
        # which Ray's on_request_routed skips.
        if not has_body(pending_request):
            return None
        for arg in pending_request.args:
            if hasattr(arg, "input") and hasattr(arg, "instructions"):
                body = {"instructions": arg.instructions, "input": arg.input}
                return self._normalize_prompt_to_string(as_chat_messages(body))
        return super()._extract_text_from_request(pending_request)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None and not has_body(pending_request):
            # Nothing to match a prefix on: the less loaded of two random replicas, as Ray's
            # router does for a request without one.
            return await super().choose_replicas(candidate_replicas, None)
        return await super().choose_replicas(candidate_replicas, pending_request)


def has_body(pending_request) -> bool:
    """Whether a request reaches the router as a parsed body the prefix router reads (chat's
    ``messages``, completions' ``prompt``, a Responses request's ``input``), not as HTTP."""
    return any(hasattr(arg, name) for arg in pending_request.args or ()
               for name in ("messages", "prompt", "input"))


class SessionAffinityRouter(PrefixAffinityRouter):
    """Request router of the LLM deployment: a request with a session id (header
    ``x-session-id``) goes to the replica a consistent hash of that id picks
    (:class:`serving.cluster.routing.ConsultRing`: the same replica for every turn of a consult,
    up to ``num_fallback_replicas`` successors when it refuses under back-pressure); a request without
    one follows :class:`PrefixAffinityRouter` (the replica that already saw the longest prefix
    of its prompt, else the least loaded). Both keep a consult's photo and history in one
    replica's prefix cache. ``request_router_kwargs``: ``num_virtual_nodes``,
    ``num_fallback_replicas``, and the prefix router's own."""

    def __init__(self, *args, **kwargs):
        self.ring = ConsultRing()
        super().__init__(*args, **kwargs)

    def initialize_state(self, num_virtual_nodes: int = 100, num_fallback_replicas: int = 2,
                         **prefix_kwargs) -> None:
        self.ring = ConsultRing(num_virtual_nodes, num_fallback_replicas)
        super().initialize_state(**prefix_kwargs)

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self.ring.update(r.replica_id for r in replicas)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session or not candidate_replicas:
            metrics().router_affinity.inc(("none",))
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in candidate_replicas}
        order = self.ring.ranked(session)
        # hit: the consult's own replica (the ring's first) is among those that can take it
        hit = bool(order) and order[0] in by_id
        metrics().router_affinity.inc(("hit" if hit else "miss",))
        return [[by_id[r]] for r in order if r in by_id]


def class_path(cls: type) -> str:
    """The dotted path Ray Serve imports a class by."""
    return f"{cls.__module__}.{cls.__qualname__}"


ROUTERS = {
    "session": class_path(SessionAffinityRouter),
    "prefix": class_path(PrefixAffinityRouter),
    "pow2": None,  # Ray Serve's default: the less loaded of two random replicas
}
