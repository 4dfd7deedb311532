"""``ServePolicy``: the request limits and access rules of a server, typed and validated once.

The server process hands it to its middleware through one environment variable
(``SKINGPT4_SERVE_POLICY``, JSON), read only in :func:`policy_from_env`: vLLM builds the
middleware itself, with no arguments, possibly in another process.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

POLICY_ENV = "SKINGPT4_SERVE_POLICY"


class ServePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: str | None = Field(
        default=None, description="Bearer key needed on every route but /health; None: open."
    )
    max_images_per_request: int = Field(default=4, ge=1, description="Images in one request.")
    allowed_media_domains: tuple[str, ...] = Field(
        default=(),
        description="Hosts that remote image URLs may name; empty: only data URLs are accepted.",
    )
    max_image_pixels: int = Field(
        default=25_000_000, ge=1, description="Width x height above which an image is refused."
    )
    min_image_side_px: int = Field(default=8, ge=1, description="Smallest accepted image side.")
    max_image_bytes: int = Field(default=20 * 2**20, ge=1, description="Encoded size of one image.")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1, description="Request body size.")
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, description="All request headers.")
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request).")
    media_fetch_timeout_s: float = Field(default=5.0, gt=0)
    default_stop: tuple[str, ...] = Field(
        default=("###",), description="SkinGPT-4's turn separator; always a stop string."
    )

    def to_env(self) -> dict[str, str]:
        return {POLICY_ENV: self.model_dump_json()}


def policy_from_env() -> ServePolicy:
    raw = os.environ.get(POLICY_ENV)
    return ServePolicy.model_validate_json(raw) if raw else ServePolicy()
