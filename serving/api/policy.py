"""``ServePolicy``: the request limits and access rules of a server, typed and validated once.

The server process hands it to its middleware through one environment variable
(``SKINGPT4_SERVE_POLICY``, JSON), read only in :func:`policy_from_env`: vLLM builds the
middleware itself, with no arguments, possibly in another process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.settings import POLICY_ENV, SEP, serve_policy_json

BODY_LIMIT = 64 * 2**20
# While a body is read and parsed it exists three times: the raw bytes, their decoded text and
# the parsed strings (photos are base64 text inside the JSON).
BODY_COST_FACTOR = 3


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_inflight_bytes() -> int:
    """1/16 of the machine's memory, at least what the largest body needs, at most 8 GiB."""
    return int(min(max(machine_memory_bytes() // 16, BODY_COST_FACTOR * BODY_LIMIT), 8 * 2**30))


def default_decodes() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class PhotoLimits:
    """The limits a photo is decoded and shrunk under: all that a photo worker is given
    (:meth:`ServePolicy.photo_limits`; the fields are the policy's, by the same names)."""

    max_image_bytes: int
    max_image_pixels: int
    max_jpeg_scans: int
    min_image_side_px: int
    image_size: int


class ServePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: tuple[str, ...] = Field(
        default=(),
        description="Bearer keys accepted on every route but /health (none: open). Each key is "
        "a tenant of the Batch API: its files and batches are its own.",
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
    max_body_bytes: int = Field(default=BODY_LIMIT, ge=1, description="Request body size.")
    max_text_chars: int = Field(
        default=100_000, ge=1, description="Characters of text (all messages or prompts) in one request."
    )
    image_size: int = Field(
        default=224, ge=1,
        description="Side the model's preprocessing resizes photos to (the model folder's "
        "vision_config.image_size); photos are forwarded to the engine at this size.",
    )
    max_inflight_bytes: int = Field(
        default_factory=default_inflight_bytes, ge=1,
        description="Memory budget for request bodies being read and checked at once "
        "(each costs BODY_COST_FACTOR times its size); default: 1/16 of the machine's memory.",
    )
    max_concurrent_decodes: int = Field(
        default_factory=default_decodes, ge=1,
        description="Photos decoded at once; default: the CPU count, at most 8.",
    )
    admission_queue_size: int = Field(
        default=256, ge=0, description="Requests that may wait for admission; more get a 503."
    )
    admission_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for admission before a 503."
    )
    upload_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest time a request body may take to arrive; "
        "longer: 408. A 12 MP photo (about 8 MB as base64) takes about 170 s at 384 kbit/s.",
    )
    min_upload_rate: int = Field(
        default=8 * 1024, ge=1, description="Bytes per second a body must average after its "
        "first upload_idle_timeout_s; slower: 408.",
    )
    upload_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest pause in a body; then a body shorter than its "
        "Content-Length is a 400, and one with nothing sent a 408.",
    )
    decode_timeout_s: float = Field(
        default=10.0, gt=0, description="CPU time one photo's decode may take (a 25 MP photo "
        "takes under 1 s); longer: 400, and its worker is replaced.",
    )
    max_jpeg_scans: int = Field(
        default=100, ge=1, description="Progressive scans a JPEG may have (each costs a full "
        "decode pass); more: 400 before any decoding.",
    )
    schema_compile_timeout_s: float = Field(
        default=2.0, gt=0, description="Time a response_format schema may take to compile to "
        "a grammar; longer: 400. vLLM compiles it again on the API server's event loop.",
    )
    schema_compile_memory_mb: int = Field(
        default=512, ge=64, description="Memory a schema's grammar may take to compile.",
    )
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, description="All request headers.")
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request).")
    media_fetch_timeout_s: float = Field(default=5.0, gt=0)
    data_dir: str | None = Field(
        default=None,
        description="Folder of the Batch and Files API's store (SQLite and encrypted files); "
        "None: /v1/files and /v1/batches are off.",
    )
    data_key_file: str | None = Field(
        default=None,
        description="Master key file of the store (created, mode 0600, if missing); None: "
        "SKINGPT4_DATA_KEY, else data.key in the data folder.",
    )
    file_retention_hours: float = Field(
        default=168.0, gt=0, description="Hours a batch input or output file is kept, then "
        "deleted (bytes and record).",
    )
    max_file_bytes: int = Field(default=200 * 2**20, ge=1, description="Size of one upload.")
    max_batch_lines: int = Field(default=50_000, ge=1, description="Requests in one batch.")
    max_files_per_tenant: int = Field(default=1000, ge=1, description="Files one API key holds.")
    max_tenant_bytes: int = Field(
        default=20 * 2**30, ge=1, description="Bytes of files one API key holds."
    )
    min_free_disk_bytes: int = Field(
        default=2**30, ge=0, description="Free space the data folder's disk keeps; an upload "
        "that would leave less is refused.",
    )
    batch_max_inflight: int = Field(
        default=8, ge=1, description="Batch requests in the engine at once; they run at a "
        "lower priority than live requests.",
    )
    ui: bool = Field(
        default=False, description="Serve the consult page at / (static files of the package; "
        "the page calls this server's API with the key a person enters).",
    )
    access_log: bool = Field(
        default=True, description="One JSON line per request on the skingpt4.access logger "
        "(never a question, answer, photo, file name or body).",
    )
    default_stop: tuple[str, ...] = Field(
        default=(SEP,), description="SkinGPT-4's turn separator; always a stop string."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data):
        """``api_key`` (one key, or None) is taken for ``api_keys``."""
        if isinstance(data, dict) and "api_key" in data:
            data = dict(data)
            key = data.pop("api_key")
            data.setdefault("api_keys", () if key is None else (key,))
        return data

    @model_validator(mode="after")
    def _largest_body_fits(self) -> ServePolicy:
        if any(not key for key in self.api_keys):
            raise ValueError("an API key may not be empty")
        need = BODY_COST_FACTOR * self.max_body_bytes
        if need > self.max_inflight_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must hold at least one largest "
                f"body, {BODY_COST_FACTOR} x max_body_bytes ({need})"
            )
        return self

    def photo_limits(self) -> PhotoLimits:
        return PhotoLimits(**{f.name: getattr(self, f.name) for f in fields(PhotoLimits)})

    def to_env(self) -> dict[str, str]:
        return {POLICY_ENV: self.model_dump_json()}


def policy_from_env(environ: Mapping[str, str] = os.environ) -> ServePolicy:
    raw = serve_policy_json(environ)
    return ServePolicy.model_validate_json(raw) if raw else ServePolicy()
