"""One request pipeline: a route's parsed body -> the checked body the engine gets.

The server's middleware (and through it the Ray ingress) and ``skingpt4 batch`` call
:func:`prepare_request`, so a request gets the same contract, photo checks and SkinGPT-4
defaults whichever way it arrives.
"""

from __future__ import annotations

from typing import Any

from serving.api.admission import Admission
from serving.api.chat import prepare_chat_request, prepare_completion_request
from serving.api.errors import NotFound
from serving.api.policy import ServePolicy
from serving.api.responses import prepare_responses_request
from serving.api.routes import CHAT, COMPLETIONS, RESPONSES


async def prepare_request(route: str, body: Any, policy: ServePolicy,
                          admission: Admission | None = None) -> dict:
    """``body`` checked for ``route`` with SkinGPT-4's defaults, each photo replaced by the small
    image the engine gets. ``admission`` bounds the memory and photo decodes (None: a private
    one, for callers outside the server)."""
    if route == CHAT:
        return await prepare_chat_request(body, policy, admission)
    if route == COMPLETIONS:
        return prepare_completion_request(body, policy)
    if route == RESPONSES:
        return await prepare_responses_request(body, policy, admission)
    raise NotFound(f"{route} is not served here; see {CHAT}")
