"""Image inputs of chat requests: data URLs decoded and checked in memory, remote URLs refused
unless allowed, and then fetched only from public addresses, without redirects. Each photo is
decoded once and forwarded to the engine small (see :func:`forward_photo`).

Nothing here writes an image to disk or to a log. Checks run before vLLM sees the request, so
bad photos get a 4xx that names the problem instead of an engine-side failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import warnings
from collections.abc import Callable
from urllib.parse import urlsplit

from PIL import Image, ImageOps

from encoders.resize import resize_rgb
from serving.api.errors import (
    InvalidImage,
    PayloadTooLarge,
    RemoteImageFailed,
    RemoteImageRefused,
)
from serving.api.policy import PhotoLimits, ServePolicy

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}

Resolver = Callable[[str, int], list[str]]


def data_url_payload_start(url: str, limits: PhotoLimits, where: str) -> int:
    """Check a ``data:image/...;base64,...`` URL's header and size; return where its base64
    payload starts (no copy of the payload is made here)."""
    comma = url.find(",", 0, 256)
    header = url[:comma].lower() if comma > 0 else ""
    if not header.startswith("data:"):
        raise InvalidImage(f"{where}: malformed data URL; expected data:image/<type>;base64,<data>")
    if not header.endswith(";base64"):
        raise InvalidImage(f"{where}: data URL must be base64-encoded (data:image/<type>;base64,...)")
    approx = (len(url) - comma - 1) * 3 // 4
    if approx > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"{where}: image is about {approx // 2**20} MiB; "
            f"the limit is {limits.max_image_bytes // 2**20} MiB"
        )
    return comma + 1


def data_url_bytes(url: str, limits: PhotoLimits, where: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL, size-checked before decoding."""
    start = data_url_payload_start(url, limits, where)
    try:
        return base64.b64decode(url[start:], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{where}: invalid base64 in the image data URL") from None


def photo_from_data_url(url: str, limits: PhotoLimits, where: str) -> str:
    """A data URL -> the data URL of the photo as the engine gets it (see
    :func:`forward_photo`). CPU-bound: run it off the event loop, one decode slot each."""
    return forward_photo(data_url_bytes(url, limits, where), limits, where)


def forward_photo(data: bytes, limits: PhotoLimits, where: str) -> str:
    """Decode a photo once, check it, and return what the engine receives: a lossless PNG data
    URL of the photo turned upright (EXIF orientation), RGB and resized to the model's input
    size with the model's own resize, so the engine's preprocessing leaves it unchanged. The
    full-size pixels are dropped before this returns."""
    image = decode_photo(data, limits, where)
    del data
    small = resize_rgb(image, limits.image_size)
    image.close()
    del image
    buf = io.BytesIO()
    small.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getbuffer()).decode("ascii")


def jpeg_scan_count(data: bytes, stop_after: int) -> int:
    """How many scans (SOS segments) the JPEG in ``data`` has before its first EOI, counting at
    most ``stop_after + 1``; 0 for data that is not a JPEG. Progressive JPEGs decode once per
    scan: cameras write 1 to about 12, a crafted file 100,000 (minutes of CPU). Walks the
    marker segments and skips entropy-coded data, so a thumbnail inside EXIF is not counted."""
    if data[:2] != b"\xff\xd8":
        return 0
    scans, pos, end = 0, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)  # stray bytes: resynchronise on the next marker
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers, TEM: no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        if scans > stop_after:
            break
        # Entropy-coded data runs to the next marker that is not a stuffed 0xFF00 or a restart.
        while True:
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= end:
                return scans
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                pos += 1 if following == 0xFF else 2
                continue
            break
    return scans


def decode_photo(data: bytes, limits: PhotoLimits, where: str) -> Image.Image:
    """Open, bound and fully decode a photo in memory, upright (EXIF orientation applied)."""
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"{where}: image is {len(data) // 2**20} MiB; the limit is "
            f"{limits.max_image_bytes // 2**20} MiB"
        )
    scans = jpeg_scan_count(data, limits.max_jpeg_scans)
    if scans > limits.max_jpeg_scans:
        raise InvalidImage(
            f"{where}: the JPEG has more than {limits.max_jpeg_scans} progressive scans (cameras "
            "write at most a few dozen); re-encode it, e.g. as a baseline JPEG"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLarge(  # PIL's own bound: twice Image.MAX_IMAGE_PIXELS
            f"{where}: image is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; the limit "
            f"is {limits.max_image_pixels / 1e6:.0f} megapixels"
        ) from None
    except Exception:
        raise InvalidImage(f"{where}: the data is not an image PIL can read (JPEG, PNG, WebP...)") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"{where}: image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the limit is "
            f"{limits.max_image_pixels / 1e6:.0f} megapixels"
        )
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidImage(f"{where}: image format {image.format} is not accepted")
    if min(w, h) < limits.min_image_side_px:
        raise InvalidImage(
            f"{where}: image is {w}x{h} pixels; each side must be at least "
            f"{limits.min_image_side_px} pixels"
        )
    try:
        image.load()  # decodes everything: truncated or corrupt files fail here
        upright = ImageOps.exif_transpose(image)
    except Exception:
        raise InvalidImage(f"{where}: image data is truncated or corrupt") from None
    if upright is not image:
        image.close()
    return upright


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64), which routers
    may deliver to: each must be public too."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found += list(ip.teredo)
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        candidates += _embedded_ipv4(ip)
    return all(
        not (a.is_loopback or a.is_private or a.is_link_local or a.is_multicast
             or a.is_reserved or a.is_unspecified) and a.is_global
        for a in candidates
    )


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Exact host or a subdomain of an allowed domain (``cdn.example.com`` under ``example.com``)."""
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower().lstrip(".")) for d in allowed)


def check_remote_url(
    url: str, policy: ServePolicy, where: str, resolver: Resolver = _system_resolver
) -> tuple[str, str, int]:
    """Refuse what policy forbids; return (scheme, pinned address, port) to fetch from."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname or "", parts.port
    except ValueError:
        raise InvalidImage(f"{where}: the image URL is malformed") from None
    if scheme not in ("http", "https"):
        raise RemoteImageRefused(
            f"{where}: image URLs must be data URLs (data:image/...;base64,...) or http(s); "
            f"got scheme {scheme!r}"
        )
    if not policy.allowed_media_domains:
        raise RemoteImageRefused(
            f"{where}: remote image URLs are disabled on this server; send the photo as a "
            "base64 data URL"
        )
    if not host_allowed(host, policy.allowed_media_domains):
        raise RemoteImageRefused(f"{where}: host {host!r} is not in the allowed media domains")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError, ValueError):
        raise RemoteImageFailed(f"{where}: cannot resolve host {host!r}") from None
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise RemoteImageRefused(
            f"{where}: host {host!r} resolves to a loopback, private or link-local address; "
            "such addresses are never fetched"
        )
    return scheme, addresses[0], port


async def fetch_remote_image(
    url: str, policy: ServePolicy, where: str, resolver: Resolver = _system_resolver
) -> bytes:
    """GET an allowed image URL from the address just checked (no re-resolution, no redirects)."""
    import httpx

    # Resolution blocks: off the server's event loop.
    scheme, address, port = await asyncio.to_thread(check_remote_url, url, policy, where, resolver)
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{literal}:{port}").geturl()
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": parts.hostname} if scheme == "https" else {}
    try:
        async with asyncio.timeout(policy.media_fetch_timeout_s), httpx.AsyncClient(
            follow_redirects=False, timeout=policy.media_fetch_timeout_s, trust_env=False
        ) as client:
            async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                if resp.is_redirect:
                    raise RemoteImageRefused(f"{where}: the image URL redirects; redirects are not followed")
                if resp.status_code != 200:
                    raise RemoteImageFailed(f"{where}: fetching the image returned HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > policy.max_image_bytes:
                        raise PayloadTooLarge(
                            f"{where}: remote image exceeds {policy.max_image_bytes // 2**20} MiB"
                        )
                return bytes(body)
    except TimeoutError:
        raise RemoteImageFailed(
            f"{where}: fetching the image took longer than {policy.media_fetch_timeout_s:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise RemoteImageFailed(f"{where}: fetching the image failed ({type(exc).__name__})") from None
