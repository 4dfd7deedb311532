"""The route table (serving/api/routes.py): the route templates of metrics and the access log,
and the table's routes as the parts of the server that read it see them."""

from __future__ import annotations

import asyncio

import pytest

from serving.api.errors import NotFound, ServingError
from serving.api.pipeline import prepare_request
from serving.api.policy import ServePolicy
from serving.api.routes import (
    ANSWER_ROUTES,
    BATCH_ROUTES,
    CHAT,
    COMPLETIONS,
    RESPONSES,
    is_batch_api_path,
    route_template,
)
from serving.api.ui import PAGE


@pytest.mark.parametrize("path,template", [
    (CHAT, CHAT), (RESPONSES, RESPONSES), ("/metrics", "/metrics"),
    ("/v1/files", "/v1/files"), ("/v1/files/file-9f3a", "/v1/files/{file_id}"),
    ("/v1/files/file-9f3a/content", "/v1/files/{file_id}/content"),
    ("/v1/batches/batch_77", "/v1/batches/{batch_id}"),
    ("/v1/batches/batch_77/cancel", "/v1/batches/{batch_id}/cancel"),
    ("/v1/batches/", "/v1/batches"),
    # no such routes: one template for all of them, whatever a scan tries
    ("/v1/files/file-9f3a/cancel", "other"), ("/v1/batches/batch_77/content", "other"),
    ("/v1/files/a/b/c", "other"), ("/v1/embeddings", "other"), ("/.env", "other"),
    ("/v1/filesystem", "other"), ("/", "other"),
])
def test_route_templates_hold_no_ids_and_are_bounded(path, template):
    assert route_template(path) == template


def test_the_consult_page_is_a_route_only_where_it_is_served():
    assert all(route_template(p, tuple(PAGE)) == p for p in PAGE)
    assert route_template("/ui/other.js", tuple(PAGE)) == "other"


def test_jobs_paths():
    assert is_batch_api_path("/v1/files") and is_batch_api_path("/v1/batches/batch_1/cancel")
    assert not is_batch_api_path("/v1/filesystem") and not is_batch_api_path(CHAT)


def test_every_answer_route_goes_through_the_pipeline_and_only_those_batch():
    assert BATCH_ROUTES == (CHAT, COMPLETIONS)
    policy = ServePolicy()
    for route in ANSWER_ROUTES:
        with pytest.raises(ServingError) as refused:  # an empty body: refused by its checks
            asyncio.run(prepare_request(route, {}, policy))
        assert not isinstance(refused.value, NotFound), route
    with pytest.raises(NotFound):
        asyncio.run(prepare_request("/v1/embeddings", {}, policy))
