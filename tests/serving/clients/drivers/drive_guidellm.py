"""guidellm (.clients/guidellm) against the server; see _harness.py.

Each interface is one ``guidellm run`` (the CLI, with a scenario file): one request, synchronous
profile, the photo and the question as a one-row JSON dataset, greedy (``temperature: 0`` as a
body extra) with ``max_tokens``, on ``/v1/chat/completions`` and ``/v1/responses``, streamed
and not. The answer and the request guidellm sent are read from its JSON report. guidellm has
no structured-output or Files/Batch interface.

guidellm puts a row's text before its image in the user message, and re-encodes a photo given
as a path or data URL as a JPEG (changing its pixels); a photo given as its own encoded-image
record (``{"type": "image_base64", "image": <data URL>}``) is sent as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import job, run

JOB = job()
WORK = Path(JOB["work"]) / "guidellm"
WORK.mkdir(parents=True, exist_ok=True)
DATA = WORK / "consult.jsonl"
# Three requests per run, each the same consult: guidellm 0.8.1 sometimes fails to compile the
# metrics of a one-request run ("No measurement start or end times available").
REQUESTS = 3
DATA.write_text(REQUESTS * (json.dumps({"prompt": JOB["question"], "image": {
    "type": "image_base64", "image": JOB["photo"]}}) + "\n"))
TARGET = JOB["base_url"].removesuffix("/v1")


def benchmark(route: str, stream: bool) -> dict:
    name = f"{route.rsplit('/', 1)[-1]}-{'stream' if stream else 'plain'}"
    report = WORK / f"{name}.json"
    scenario = WORK / f"{name}-scenario.json"
    scenario.write_text(json.dumps({"spec": {
        "backend": {"kind": "openai_http", "target": TARGET, "model": JOB["model"],
                    "api_key": JOB["api_key"], "request_format": route, "stream": stream,
                    "max_tokens": JOB["max_tokens"], "extras": {"body": {"temperature": 0}}},
        "profile": {"kind": "synchronous"},
        "data": [{"kind": "json_file", "path": str(DATA)}],
        "constraints": [{"kind": "max_requests", "count": REQUESTS}],
        "outputs": [{"kind": "json", "path": str(report)}],
    }}))
    done = subprocess.run([sys.executable, "-m", "guidellm", "run", "-c", str(scenario),
                           "--disable-console"], capture_output=True, text=True, timeout=300)
    (WORK / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm run exited {done.returncode}: {done.stderr[-2000:]}")
    requests = json.loads(report.read_text())["benchmarks"][0]["requests"]
    if not requests["successful"]:
        failed = requests["errored"] + requests["incomplete"]
        raise RuntimeError(f"no successful request: {[r['info'].get('error') for r in failed]}")
    answers = requests["successful"]
    sent = json.loads(answers[0]["request_args"])["body"]
    return {"text": answers[0]["output"], "texts": [a["output"] for a in answers],
            "errored": len(requests["errored"]), "incomplete": len(requests["incomplete"]),
            "sent": json.loads(json.dumps(sent).replace(JOB["photo"], "<photo>"))}


CASES = {"chat": ("/v1/chat/completions", False), "chat_stream": ("/v1/chat/completions", True),
         "responses": ("/v1/responses", False), "responses_stream": ("/v1/responses", True)}
# The four runs at once: each spends most of its time starting guidellm's worker processes.
with ThreadPoolExecutor(len(CASES)) as pool:
    futures = {name: pool.submit(benchmark, *args) for name, args in CASES.items()}
    run({name: future.result for name, future in futures.items()})
