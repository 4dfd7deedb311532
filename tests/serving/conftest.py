"""Fixtures of the serving tests: one embedded server per test session (an engine start costs
~40 s on 2 cores). The helpers they use live in tests/serving/helpers.py.
"""

from __future__ import annotations

import pytest

from tests.serving.helpers import (
    ALLOWED_DOMAINS,
    API_KEY,
    MAX_IMAGES,
    SERVER_DECODES,
    SERVER_INFLIGHT_BYTES,
    data_url,
    start_server,
)


@pytest.fixture(scope="session")
def server(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    srv = start_server(
        tiny_checkpoints["llama"], root, "--api-key", API_KEY,
        "--max-images-per-request", str(MAX_IMAGES), "--allowed-media-domains", *ALLOWED_DOMAINS,
        "--max-inflight-mb", str(SERVER_INFLIGHT_BYTES // 2**20),
        "--max-concurrent-decodes", str(SERVER_DECODES),
    )
    yield srv
    srv.process.stop()


@pytest.fixture(scope="session")
def photo_urls(photos):
    from encoders.samples import encode_image

    return [data_url(encode_image(p)) for p in photos]
