"""``skingpt4 batch`` (its command line: :mod:`serving.cli.batch`): an OpenAI Batch file
answered without a server, by an engine in this process (:mod:`serving.batch.run`) or by the
LLM replicas of ``serve --ray`` (:mod:`serving.batch.ray_serve`). Lines are read, checked and
recorded by the pass the Batch API shares (:mod:`serving.api.batch_api.runner`)."""
