"""``skingpt4 batch --ray``: the same batch file answered by the LLM replicas of ``serve --ray``
(deployed for the run) across Ray's multi-node test cluster (a head with 1 logical CPU and two
workers with 3; a CPU replica takes 2, its actor and its engine, so replicas can only run on the
workers).

One file of good lines (photo consults, a text-only chat, a text completion) and bad lines (not
JSON, a broken photo, an unknown url, a field outside the contract, an unknown model, a prompt
beyond the context) runs three times, each as a user would run it, in its own process: once
through the in-process engine (the reference), once with ``--ray --replicas 2`` on the cluster,
and once more with ``--ray`` after some records of the Ray run were removed (the resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from encoders.samples import encode_image
from tests.serving.helpers import comparable, data_url, image_message, ray_test_cluster

pytestmark = [pytest.mark.ray, pytest.mark.engine]

MODEL = "skingpt4"
GREEDY = {"temperature": 0, "max_tokens": 8}
REPO = Path(__file__).resolve().parents[3]
ENGINE_FLAGS = ("--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8")
GOOD = ("photo-0", "photo-1", "photo-2", "photo-3", "two-photos", "text-only", "completion",
        "two-choices")


def chat(custom_id: str, body: dict, **envelope) -> dict:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return {**line, **envelope}


def batch_file(photos) -> tuple[str, dict]:
    """The input file and what each line must get: {custom_id or line number: expectation}."""
    urls = [data_url(encode_image(p)) for p in photos]
    lines = [
        chat("photo-0", {"model": MODEL, "messages": [image_message([urls[0]])], **GREEDY}),
        chat("photo-1", {"model": MODEL, "messages": [image_message([urls[1]])], **GREEDY}),
        '{"custom_id": "not-json", "method": "POST",',
        chat("photo-2", {"model": MODEL, "messages": [image_message([urls[2]])], **GREEDY}),
        chat("bad-photo", {"model": MODEL, "messages": [
            image_message(["data:image/jpeg;base64,@@not-base64@@"])], **GREEDY}),
        chat("photo-3", {"messages": [
            {"role": "system", "content": "You are a careful dermatologist."},
            image_message([urls[0]], "Is it eczema?")], **GREEDY}),
        chat("wrong-url", {"model": MODEL, "messages": [image_message([urls[0]])]},
             url="/v1/embeddings"),
        chat("two-photos", {"model": MODEL, "messages": [image_message(urls[1:3])], **GREEDY}),
        chat("outside-contract", {"model": MODEL, "messages": [image_message([urls[0]])],
                                  "echo": True}),
        chat("unknown-model", {"model": "gpt-4o", "messages": [image_message([urls[0]])]}),
        chat("text-only", {"model": MODEL, "messages": [
            {"role": "user", "content": "Is a ring-shaped rash contagious?"}], **GREEDY}),
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "Describe eczema.", **GREEDY}},
        chat("two-choices", {"model": MODEL, "n": 2, "logprobs": True, "top_logprobs": 2,
                             "seed": 7, "max_tokens": 6, "messages": [
                                 {"role": "user", "content": "Is this eczema?"}]}),
        {"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "itchy red patch " * 2000, **GREEDY}},
        chat("too-many-tokens", {"model": MODEL, "max_tokens": 1000, "messages": [
            {"role": "user", "content": "Describe eczema."}]}),
    ]
    expect = {
        **{custom_id: (200,) for custom_id in GOOD},
        "bad-photo": (400, "invalid base64", "messages[0].content[0]"),
        "wrong-url": (404, "/v1/embeddings"),
        "outside-contract": (400, "echo"),
        "unknown-model": (404, "gpt-4o"),
        "too-long": (400, "1024"),
        "too-many-tokens": (400, "max_tokens", "tokens are left"),
        3: ("invalid_json_line", "line 3", "not valid JSON"),
    }
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return text, expect


def run_batch(model: Path, input_path: Path, output: Path, *extra: str,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m serving.cli batch`` from a short private folder (zmq's IPC paths under TMPDIR
    must fit in 107 characters)."""
    with tempfile.TemporaryDirectory(prefix="sk-br-") as folder:
        env = dict(os.environ, **(env or {}), TMPDIR=folder, PYTHONPATH=str(REPO))
        done = subprocess.run(
            [sys.executable, "-m", "serving.cli", "batch", str(model), str(input_path), str(output),
             *ENGINE_FLAGS, "--no-progress", *extra],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return done


def read_records(path: Path) -> dict:
    """{custom_id, or the line number of an unattributable line: record}; one record per key."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    records = {}
    for line in raw.splitlines():
        record = json.loads(line)
        key = record["custom_id"] if record["custom_id"] is not None else record["error"]["line"]
        assert key not in records, f"two records for {key!r}"
        records[key] = record
    return records


@pytest.fixture(scope="module")
def files(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-ray")
    text, expect = batch_file(photos)
    (root / "in.jsonl").write_text(text)
    return root, expect


@pytest.fixture(scope="module")
def reference(files, tiny_checkpoints):
    """The in-process run (``skingpt4 batch`` without --ray) of the file."""
    root, _ = files
    run_batch(tiny_checkpoints["llama"], root / "in.jsonl", root / "reference.jsonl")
    return read_records(root / "reference.jsonl")


@pytest.fixture(scope="module")
def cluster(reference):  # after the reference run: its engine has stopped by then
    with ray_test_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def ray_run(files, tiny_checkpoints, cluster):
    """The file through ``skingpt4 batch --ray --replicas 2`` joined to the test cluster."""
    root, _ = files
    done = run_batch(tiny_checkpoints["llama"], root / "in.jsonl", root / "ray.jsonl",
                     "--ray", "--replicas", "2", "--accelerator", "cpu",
                     env={"RAY_ADDRESS": cluster.address})
    return read_records(root / "ray.jsonl"), done.stderr


def test_every_line_gets_one_record(files, ray_run):
    _, expect = files
    records, stderr = ray_run
    assert set(records) == set(expect)
    for r in records.values():
        assert set(r) == {"id", "custom_id", "response", "error"}
        assert r["id"].startswith("batch_req_")
    assert f"{len(expect)} lines: {len(GOOD)} answered, {len(expect) - len(GOOD)} refused" in stderr


def test_bad_lines_name_their_problem(files, ray_run):
    _, expect = files
    records, _ = ray_run
    for key, (head, *words) in expect.items():
        r = records[key]
        if isinstance(key, int):
            assert r["response"] is None and r["error"]["code"] == head
            message = r["error"]["message"]
        elif head == 200:
            continue
        else:
            assert r["error"] is None and r["response"]["status_code"] == head, r
            message = r["response"]["body"]["error"]["message"]
        for word in words:
            assert word.lower() in message.lower(), (key, message)


def test_answers_equal_the_in_process_ones(ray_run, reference):
    """The body the server sends: the chat template (32 positions per photo), the same tokens,
    finish reason, usage, both choices of ``n: 2`` and their logprobs; only ids, times and what
    the prefix cache held differ."""
    records, _ = ray_run
    for custom_id in GOOD:
        ray_response, local_response = (records[custom_id]["response"],
                                        reference[custom_id]["response"])
        assert ray_response["status_code"] == local_response["status_code"] == 200
        ray_body, local_body = ray_response["body"], local_response["body"]
        assert ray_response["request_id"] == ray_body["id"]
        assert comparable(ray_body) == comparable(local_body), custom_id
        assert ray_body["usage"]["prompt_tokens_details"]["cached_tokens"] is not None
    # The server's max_tokens check, counted on a replica as in-process: the same 400.
    # (each record's error carries its own request id)
    ray_refusal, local_refusal = (r["too-many-tokens"]["response"] for r in (records, reference))
    for refusal in (ray_refusal, local_refusal):
        assert refusal["body"]["error"].pop("request_id") == refusal["request_id"]
    assert (ray_refusal["status_code"], ray_refusal["body"]) == \
        (local_refusal["status_code"], local_refusal["body"]) == (400, ray_refusal["body"])
    two = records["two-choices"]["response"]["body"]["choices"]
    assert len(two) == 2 and all(c["logprobs"]["content"] for c in two)
    answers = {records[i]["response"]["body"]["choices"][0]["message"]["content"]
               for i in ("photo-0", "photo-1", "photo-2")}
    assert len(answers) > 1  # the answers depend on the photo: the photos reached the engines
    photo = records["photo-0"]["response"]["body"]["usage"]
    assert photo["prompt_tokens_details"]["multimodal_tokens"] == {"image": 32}


def replica_actors(cluster) -> list[dict]:
    """The LLM replicas of the runs' Serve applications (they end with their run). Read from
    the GCS actor table: Ray's state API needs the cluster's dashboard, which does not start
    when another Ray instance on this machine holds the dashboard port."""
    import ray
    from ray._private import state

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        return [a for a in state.actors().values()
                if a["ActorClassName"].startswith("ServeReplica:skingpt4-batch-")
                and ":SkinGPT4Server:" in a["ActorClassName"]]
    finally:
        ray.shutdown()


def test_replicas_ran_on_two_worker_nodes(cluster, ray_run):
    replicas = replica_actors(cluster)
    nodes = {a["Address"]["NodeID"] for a in replicas}
    assert len(replicas) == 2, [a["ActorClassName"] for a in replicas]
    assert nodes <= cluster.worker_node_ids
    assert len(nodes) == 2, f"both replicas on one node: {nodes}"
    assert all(a["State"] == "DEAD" for a in replicas)  # the run's application was deleted


def test_a_rerun_adds_exactly_the_missing_records(files, tiny_checkpoints, cluster, ray_run):
    root, expect = files
    complete = ray_run[0]
    output = root / "ray.jsonl"
    lines = output.read_bytes().splitlines(keepends=True)
    gone = {"photo-1", "completion", "bad-photo", 3}
    kept = [raw for raw in lines if _key(raw) not in gone]
    resumed_path = root / "resumed.jsonl"
    resumed_path.write_bytes(b"".join(kept))

    done = run_batch(tiny_checkpoints["llama"], root / "in.jsonl", resumed_path,
                     "--ray", "--accelerator", "cpu", env={"RAY_ADDRESS": cluster.address})

    assert f"resuming; {len(kept)} records already in" in done.stderr
    assert f"{len(expect) - len(gone)} already in OUTPUT" in done.stderr
    assert resumed_path.read_bytes().startswith(b"".join(kept))
    added = [_key(raw) for raw in resumed_path.read_bytes().splitlines()[len(kept):]]
    assert sorted(map(str, added)) == sorted(map(str, gone))
    resumed = read_records(resumed_path)
    assert set(resumed) == set(complete)
    for key in ("photo-1", "completion"):  # greedy: the same answer again
        assert (resumed[key]["response"]["body"]["choices"][0]
                == complete[key]["response"]["body"]["choices"][0])


def _key(raw: bytes):
    record = json.loads(raw)
    return record["custom_id"] if record["custom_id"] is not None else record["error"]["line"]
