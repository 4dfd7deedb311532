"""The multipart upload of ``POST /v1/files``, read as it streams in: :class:`UploadForm` finds
the form's fields and seals the file's bytes as they arrive (never holding it whole);
:func:`read_form` feeds it the body within the upload clock's deadlines, and refuses a body
that was cut short."""

from __future__ import annotations

from serving.api.errors import InvalidRequest, PayloadTooLarge, QuotaExceeded, ServingError
from serving.api.http import next_message
from serving.api.batch_api import sealed

MAX_FORM_FIELD = 1024


class UploadForm:
    """The fields of a file upload as a streaming multipart parser finds them: ``purpose``,
    ``file`` (sealed as it arrives), ``expires_after[anchor]`` and ``expires_after[seconds]``;
    and how far the body got (``ended``: its closing boundary was read; ``in_headers``,
    ``_name``: inside a part's headers, or a part's data)."""

    TEXT_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")

    def __init__(self, max_bytes: int, quota_bytes: int, writer: sealed.SealedWriter) -> None:
        self.max_bytes, self.quota_bytes, self.writer = max_bytes, quota_bytes, writer
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.size = 0
        self._buffer = bytearray()
        self._name: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.ended = False
        self.in_headers = False
        self.parts = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._finished}

    def _begin(self) -> None:
        self._headers, self._name = {}, None
        self.in_headers = True
        self.parts += 1

    def _finished(self) -> None:
        self.ended = True

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        self.in_headers = False
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name != "file" and name not in self.TEXT_FIELDS:
            raise InvalidRequest(f"unknown form field {name[:64]!r}; an upload has purpose and "
                                 "file (and optionally expires_after)", param=name[:64] or None)
        if name in self.fields or (name == "file" and self.filename is not None):
            raise InvalidRequest(f"the form field {name!r} is given twice", param=name)
        self._name = name
        if name == "file":
            raw = params.get(b"filename", b"upload.jsonl")
            self.filename = raw.decode("utf-8", "replace")[:255] or "upload.jsonl"
        else:
            self.fields[name] = bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.size += end - start
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the file exceeds the limit of {self.max_bytes} bytes "
                                      f"({self.max_bytes // 2**20} MiB)")
            if self.size > self.quota_bytes:
                raise QuotaExceeded("this file would take the API key past its storage limit; "
                                    "delete some files first")
            self._buffer += data[start:end]
            while len(self._buffer) >= sealed.FRAME_BYTES:
                self.writer.write(self._buffer[:sealed.FRAME_BYTES])
                del self._buffer[:sealed.FRAME_BYTES]
        elif self._name is not None:
            field = self.fields[self._name]
            field += data[start:end]
            if len(field) > MAX_FORM_FIELD:
                raise InvalidRequest(f"the form field {self._name!r} is too long",
                                     param=self._name)

    def _end(self) -> None:
        if self._name == "file" and self._buffer:
            self.writer.write(self._buffer)
            self._buffer = bytearray()
        self._name = None

    def cut_short(self, boundary: bytes) -> InvalidRequest:
        """Why a body that ended without its closing boundary is refused."""
        closing = "--" + boundary[:70].decode("latin-1") + "--"
        if self.in_headers:
            where = "inside the headers of a form part"
        elif self._name == "file":
            where = f"inside the file part, after {self.size} bytes of the file,"
        elif self._name is not None:
            where = f"inside the form field {self._name!r}"
        elif self.parts:
            where = "between form parts"
        else:
            where = "before its first form part"
        return InvalidRequest(f"the upload ends {where} without the closing boundary "
                              f"{closing}: it was cut short, and nothing of it was stored; "
                              "send the whole file again")

    def result(self, retention_s: float) -> tuple[str, str, int]:
        """(purpose, filename, seconds until it expires) of a whole upload."""
        purpose = bytes(self.fields.get("purpose", b"")).decode("utf-8", "replace")
        if purpose != "batch":
            raise InvalidRequest(f"purpose must be 'batch' (got {purpose[:32]!r}); this server "
                                 "stores files for the Batch API only", param="purpose")
        if self.filename is None:
            raise InvalidRequest("the upload has no file field", param="file")
        expires = int(retention_s)
        if "expires_after[seconds]" in self.fields:
            anchor = bytes(self.fields.get("expires_after[anchor]", b"created_at")).decode()
            seconds = bytes(self.fields["expires_after[seconds]"]).decode()
            if anchor != "created_at" or not seconds.isdigit() or not 3600 <= int(seconds) <= 2592000:
                raise InvalidRequest("expires_after takes anchor created_at and seconds from "
                                     "3600 to 2592000", param="expires_after")
            expires = min(expires, int(seconds))
        return purpose, self.filename, expires


async def read_form(receive, boundary: bytes, clock, form: UploadForm) -> None:
    """Feed the upload's body to a streaming multipart parser as it arrives, within the
    clock's deadlines."""
    from python_multipart.multipart import MultipartParser

    parser = MultipartParser(boundary, form.callbacks())
    while True:
        message = await next_message(receive, clock)
        chunk = message.get("body", b"")
        clock.received += len(chunk)
        received = clock.received
        try:
            parser.write(chunk)
        except ServingError:
            raise
        except Exception as exc:  # the parser's own errors: a malformed form
            raise InvalidRequest(f"the upload is not valid multipart/form-data ({exc})") from None
        if not message.get("more_body", False):
            clock.complete = True
            break
    if clock.declared is not None and received != clock.declared:
        short = ": it was cut short" if received < clock.declared else ""
        raise InvalidRequest(f"the upload has {received} bytes; its Content-Length declares "
                             f"{clock.declared}{short}, and nothing of it was stored")
    try:
        parser.finalize()
    except Exception as exc:
        raise InvalidRequest(f"the upload is not valid multipart/form-data ({exc})") from None
    if not form.ended:  # the parser takes a body that stops anywhere as a whole one
        raise form.cut_short(boundary)
