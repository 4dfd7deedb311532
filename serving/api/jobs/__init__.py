"""The OpenAI Batch and Files API (:mod:`serving.api.jobs.service`, which puts together its
HTTP routes in :mod:`serving.api.jobs.routes` and the upload reading in
:mod:`serving.api.jobs.form`; the batch worker in :mod:`serving.api.jobs.worker`, what a batch's
files hold in :mod:`serving.api.jobs.records`, the tenants' fair share of its places in
:mod:`serving.api.jobs.share`; its store in :mod:`serving.api.jobs.store`, awaited through
:mod:`serving.api.jobs.async_store`, its files sealed by :mod:`serving.api.jobs.sealed`) and the
batch-file pass it shares with ``skingpt4 batch`` (:mod:`serving.api.jobs.runner`)."""
