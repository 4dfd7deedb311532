"""vLLM plugins of this project."""
