"""The OpenAI Batch and Files API (:mod:`serving.api.batch_api.service`, which puts together its
HTTP routes in :mod:`serving.api.batch_api.routes` and the upload reading in
:mod:`serving.api.batch_api.form`; the batch worker in :mod:`serving.api.batch_api.worker`, what a batch's
files hold in :mod:`serving.api.batch_api.records`, the tenants' fair share of its places in
:mod:`serving.api.batch_api.share`; its store in :mod:`serving.api.batch_api.store`, awaited through
:mod:`serving.api.batch_api.async_store`, its files sealed by :mod:`serving.api.batch_api.sealed`) and the
batch-file pass it shares with ``skingpt4 batch`` (:mod:`serving.api.batch_api.runner`)."""
