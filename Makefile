# Every target sets up .venv from nothing when needed (scripts/setup.sh is quick once done).
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup test demo bench clean

setup:
	@./scripts/setup-system.sh
	@./scripts/setup.sh
	@./scripts/setup-clients.sh

test: setup
	$(PY) -m pytest -x -q tests

demo: setup
	$(PY) -m serving.cli demo

bench: setup
	$(PY) -m benchmarks sweep --out bench-results

clean:
	rm -rf artifacts bench-results .pytest_cache
