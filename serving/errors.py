"""One exception tree for request failures, mapped to HTTP status codes at the edge.

Messages name the offending value and say what to change; they never echo image bytes.
The JSON body follows the OpenAI error shape that the ``openai`` SDK parses.
"""

from __future__ import annotations

import json


class ServingError(Exception):
    status = 400
    type = "BadRequestError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        return json.dumps({"error": err}).encode()


class InvalidRequest(ServingError):
    """Malformed JSON or a field with a value the server cannot use."""


class InvalidImage(ServingError):
    """Image data that is not a usable photo (bad base64, not an image, truncated, too small)."""


class TooManyImages(ServingError):
    pass


class RemoteImageRefused(ServingError):
    """A remote image URL that policy does not allow the server to fetch."""

    status = 403
    type = "PermissionDeniedError"


class RemoteImageFailed(ServingError):
    """An allowed remote image could not be fetched."""

    status = 422
    type = "UnprocessableEntityError"


class ImageTooLarge(ServingError):
    status = 413
    type = "PayloadTooLargeError"


class PayloadTooLarge(ServingError):
    status = 413
    type = "PayloadTooLargeError"


class RouteNotFound(ServingError):
    status = 404
    type = "NotFoundError"


class ModelNotFound(ServingError):
    status = 404
    type = "NotFoundError"


class InternalError(ServingError):
    status = 500
    type = "InternalServerError"


class HeadersTooLarge(ServingError):
    status = 431
    type = "RequestHeaderFieldsTooLargeError"


class Unauthorized(ServingError):
    status = 401
    type = "AuthenticationError"
