"""The OpenAI Batch and Files API (:mod:`serving.api.jobs.service`, its store in
:mod:`serving.api.jobs.store`, the tenants' fair share of its places in
:mod:`serving.api.jobs.share`) and the batch-file pass it shares with ``skingpt4 batch``
(:mod:`serving.api.jobs.runner`)."""

FILES = "/v1/files"
BATCHES = "/v1/batches"


def is_jobs_path(path: str) -> bool:
    """Whether ``path`` is one of the Files or Batch API's routes."""
    return path in (FILES, BATCHES) or path.startswith((FILES + "/", BATCHES + "/"))
