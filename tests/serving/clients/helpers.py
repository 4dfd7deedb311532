"""Helpers of the real-clients suite: where each client's environment is, how a driver runs in it,
and the comparison every client's answers get (no fixtures here: those live in conftest.py).

Each client is installed by scripts/setup-clients.sh in an environment of its own (.clients/NAME,
or node_modules beside the Node driver) and runs as a subprocess: a driver in drivers/ (node/ for
Node) reads the job as JSON on stdin and prints its results as one JSON line (drivers/_harness.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CLIENTS = REPO / ".clients"
DRIVERS = Path(__file__).resolve().parent / "drivers"
NODE_DIR = Path(__file__).resolve().parent / "node"
SETUP_HINT = "install the clients with `make setup` (scripts/setup-clients.sh)"

MAX_TOKENS = 64
# A small schema whose greedy answers always end well within MAX_TOKENS (enums and a boolean).
SCHEMA_NAME = "finding"
SCHEMA = {
    "type": "object",
    "properties": {"condition": {"type": "string", "enum": ["eczema", "psoriasis", "melanoma", "acne"]},
                   "see_a_doctor": {"type": "boolean"}},
    "required": ["condition", "see_a_doctor"],
    "additionalProperties": False,
}
# Interfaces a driver may report, and the plain SDK's answer each is compared with.
REFERENCE_OF = {
    "chat": "chat", "chat_stream": "chat", "chat_structured": "chat_structured",
    "responses": "responses", "responses_stream": "responses",
    "responses_structured": "responses_structured", "batch": "chat",
}


def python_of(client: str) -> Path:
    python = CLIENTS / client / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: {SETUP_HINT}")
    return python


# Settings the clients read from the environment (an account's key, a base URL, tracing that
# sends runs elsewhere) and .venv's own: a test sets what it means to.
FOREIGN_SETTINGS = ("PYTHON", "VIRTUAL_ENV", "OPENAI_", "LANGCHAIN_", "LANGSMITH_", "LITELLM_",
                    "GUIDELLM__", "NODE_OPTIONS")


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment without FOREIGN_SETTINGS, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_SETTINGS)} | extra


def run_driver(argv: list[str | Path], job: dict, env: dict[str, str] | None = None,
               timeout_s: float = 300.0) -> dict:
    """Runs a driver with ``job`` on stdin; its results (the last line of its stdout)."""
    done = subprocess.run([str(a) for a in argv], input=json.dumps(job), capture_output=True,
                          text=True, timeout=timeout_s, env=env or client_env(), cwd=job["work"])
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        pytest.fail(f"{argv[-1]} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def python_driver(client: str, script: str, job: dict, **env: str) -> dict:
    return run_driver([python_of(client), DRIVERS / script], job, client_env(**env))


def check_interface(results: dict, reference: dict, interface: str) -> None:
    """The client's answer on ``interface`` is the plain SDK's greedy answer: the same text, and
    for a structured answer the same parsed object."""
    assert interface in results, f"the driver did not try {interface}: {sorted(results)}"
    got = results[interface]
    assert "error" not in got, f"{interface}: {got['error']}"
    expected = reference[REFERENCE_OF[interface]]
    if interface.endswith("_structured"):
        assert got["parsed"] == json.loads(expected)
    if "text" in got:
        assert got["text"] == expected
    if interface == "batch":
        assert got["status_code"] == 200
