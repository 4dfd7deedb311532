"""One exception tree for request failures, mapped to HTTP status codes at the edge.

Messages name the offending value and say what to change; they never echo image bytes.
The JSON body follows the OpenAI error shape that the ``openai`` SDK parses:
``{"error": {"message", "type", "param", "code"}}`` with ``code`` a string.
A class exists only where the status, type or headers differ.
"""

from __future__ import annotations

import json

from serving.api.observe import current


class ServingError(Exception):
    """A request the server refuses; subclasses set the HTTP status, type and code."""

    status = 400
    type = "BadRequestError"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``, and the
        ``request_id`` of the request being served, if any (:mod:`serving.api.observe`)."""
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}
        exchange = current.get()
        if exchange is not None:
            error["request_id"] = exchange.request_id
        return {"error": error}

    def body(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []


class InvalidRequest(ServingError):
    """Malformed JSON, an unknown field, or a value the server cannot use (400)."""


class ContextLengthExceeded(ServingError):
    """A prompt, or a prompt and ``max_tokens``, beyond the model's context (400)."""

    code = "context_length_exceeded"


class InvalidImage(ServingError):
    """Image data that is not a usable photo: bad base64, not an image, truncated, too small (400)."""

    code = "invalid_image"


class RemoteImageRefused(ServingError):
    """A remote image URL that policy does not allow the server to fetch (403)."""

    status = 403
    type = "PermissionDeniedError"
    code = "remote_image_refused"


class RemoteImageFailed(ServingError):
    """An allowed remote image that could not be fetched (422)."""

    status = 422
    type = "UnprocessableEntityError"
    code = "remote_image_failed"


class QuotaExceeded(ServingError):
    """A file beyond what one API key may hold, or what the server's disk can take (400)."""

    code = "quota_exceeded"


class Conflict(ServingError):
    """What the resource's state does not allow now, e.g. cancelling a finished batch (409)."""

    status = 409
    type = "ConflictError"
    code = "conflict"


class PayloadTooLarge(ServingError):
    """A body, an image or an image's pixel count over its limit (413)."""

    status = 413
    type = "PayloadTooLargeError"
    code = "payload_too_large"


class NotFound(ServingError):
    """A route or model this server does not serve (404)."""

    status = 404
    type = "NotFoundError"
    code = "not_found"


class RequestTimeout(ServingError):
    """A request body that did not arrive in time or fast enough (408; the connection closes)."""

    status = 408
    type = "RequestTimeoutError"
    code = "request_timeout"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


class UnsupportedMediaType(ServingError):
    """A POST body that is not declared as JSON (415)."""

    status = 415
    type = "UnsupportedMediaTypeError"
    code = "unsupported_media_type"


class UnprocessableEntity(ServingError):
    """A request the server understood but cannot act on (422)."""

    status = 422
    type = "UnprocessableEntityError"
    code = "unprocessable_entity"


class InternalError(ServingError):
    """A failure on the server's side, reported without its internals (500)."""

    status = 500
    type = "InternalServerError"
    code = "internal_error"


class HeadersTooLarge(ServingError):
    """Request headers over the limit (431)."""

    status = 431
    type = "RequestHeaderFieldsTooLargeError"
    code = "headers_too_large"


class Unauthorized(ServingError):
    """A missing or wrong API key (401, with ``WWW-Authenticate: Bearer``)."""

    status = 401
    type = "AuthenticationError"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer")]


class ServerBusy(ServingError):
    """More work than the server admits at once (503, with ``Retry-After``)."""

    status = 503
    type = "ServiceUnavailableError"
    code = "server_busy"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after_s).encode())]


class MethodNotAllowed(ServingError):
    """A route served here, asked with another method (405)."""

    status = 405
    type = "MethodNotAllowedError"
    code = "method_not_allowed"


class RateLimited(ServingError):
    """Too many requests (429)."""

    status = 429
    type = "RateLimitError"
    code = "rate_limit_exceeded"


class NotImplementedByServer(ServingError):
    """A feature the server does not implement (501)."""

    status = 501
    type = "NotImplementedError"
    code = "not_implemented"


BY_STATUS: dict[int, type[ServingError]] = {
    cls.status: cls
    for cls in (InvalidRequest, Unauthorized, RemoteImageRefused, NotFound, MethodNotAllowed,
                RequestTimeout, Conflict, PayloadTooLarge, UnsupportedMediaType, UnprocessableEntity,
                RateLimited, HeadersTooLarge, InternalError, NotImplementedByServer, ServerBusy)
}


def error_for_status(status: int, message: str, param: str | None = None) -> ServingError:
    """The project's error for an HTTP status that another layer (vLLM, Starlette) chose: the
    same status, OpenAI's shape, the project's ``type`` and a string ``code``."""
    if status == 400 and "context length" in message.lower():
        error: ServingError = ContextLengthExceeded(message, param=param)
    elif status == 404 and "model" in message.lower():
        error = NotFound(message, param=param or "model")
        error.code = "model_not_found"
    else:
        cls = BY_STATUS.get(status) or (InternalError if status >= 500 else InvalidRequest)
        error = cls(message, param=param)
    error.status = status  # kept as the other layer chose it (e.g. 502 as an InternalError)
    return error
