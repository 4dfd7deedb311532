"""One engine: its config and rendering to vLLM's arguments and environment, the embedded
server, offline generation, the server process and the shared command-line flags."""
