"""The request policy: the contract, photo checks, admission, worker processes, the request
pipeline and the ASGI middleware in front of the engine. Imports neither vLLM nor Ray."""
