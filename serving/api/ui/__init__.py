"""The consult page (``skingpt4 serve --ui``): static files of this package, served at ``/`` by
the request policy's middleware on the server's own port, embedded and on Ray. The page is
public (it holds no data); every API call it makes carries the key a person enters, and goes
through the same policy as any client's. Nothing is built at install time."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

# The page's files by path; nothing else is served from this folder.
PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/consult.css": ("consult.css", "text/css; charset=utf-8"),
    "/ui/consult.js": ("consult.js", "text/javascript; charset=utf-8"),
}

# Only this origin's own files and API; photos are shown from blob: and data: URLs made in
# the page. No inline script, no frames, no form posts elsewhere.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def is_page_path(path: str) -> bool:
    return path in PAGE


@lru_cache(maxsize=None)
def _file(path: str) -> tuple[bytes, bytes]:
    name, _ = PAGE[path]
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:16].encode()


async def serve_page(scope, send) -> None:
    """One of :data:`PAGE`'s files (GET or HEAD), revalidated by its ETag."""
    path = scope["path"]
    data, tag = _file(path)
    etag = b'"' + tag + b'"'
    sent_tag = dict((k.lower(), v) for k, v in scope.get("headers", [])).get(b"if-none-match")
    headers = [(b"content-type", PAGE[path][1].encode()), (b"etag", etag),
               (b"cache-control", b"no-cache"), *SECURITY_HEADERS]
    if sent_tag == etag:
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})
