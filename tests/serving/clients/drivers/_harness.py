"""What every driver shares (run by a client's own interpreter, so only the standard library).

A driver reads one job from stdin as JSON (``base_url`` ending in /v1, ``api_key``, ``model``,
``photo`` a data URL, ``question``, ``max_tokens``, ``schema`` with ``schema_name``, ``work`` a
folder it may write to) and prints one JSON object on its last line of stdout: for each interface
it tried, ``{"text": ...}`` (and ``"parsed"`` for a structured answer) or ``{"error": "Type:
message"}``, so that one broken interface does not hide the others.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import traceback


def job() -> dict:
    return json.loads(sys.stdin.read())


def run(cases: dict) -> None:
    """Runs each ``name: callable`` (plain or async: all in one event loop, as an application's
    clients live in one) and prints the results as one JSON line."""
    results = {}
    loop = asyncio.new_event_loop()
    for name, case in cases.items():
        try:
            out = case()
            if inspect.isawaitable(out):
                out = loop.run_until_complete(out)
            results[name] = out if isinstance(out, dict) else {"text": out}
        except Exception as exc:  # noqa: BLE001 - every failure is a result
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print("\n" + json.dumps(results))
