"""``skingpt4`` in a plain shell: what a newcomer can get wrong is one line on stderr and exit
code 2 (no traceback, no engine started), and ``generate`` prints the answer alone on stdout.

Every command runs as ``python -m serving.cli`` in a subprocess. The error cases use a stand-in
model folder (a ``config.json`` with ``model_type: skingpt4``): each check fails before vLLM
would load it. One real ``generate`` run on the tiny Falcon checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from encoders.samples import synthetic_skin_photo

ROOT = Path(__file__).resolve().parents[3]
LOG_LINE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR)\b|EngineCore|Worker pid|Traceback")


def run_cli(*args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **env},
    )


def assert_usage_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, nothing on stdout, one line on stderr holding every fragment."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def stand_in_model(tmp_path) -> Path:
    folder = tmp_path / "skingpt4-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "skingpt4"}))
    return folder


@pytest.fixture
def llama_folder(tmp_path) -> Path:
    """A language model's own Hugging Face folder: what a user may pass before converting."""
    folder = tmp_path / "Llama-2-13b-chat-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    synthetic_skin_photo(seed=0).save(path)
    return path


# --- generate --------------------------------------------------------------------------------


def test_generate_missing_model_folder(tmp_path, photo):
    out = run_cli("generate", tmp_path / "nope", "--image", photo)
    assert_usage_error(out, "skingpt4 generate:", "nope", "no such model folder")


def test_generate_language_model_folder_asks_to_convert(llama_folder, photo):
    out = run_cli("generate", llama_folder, "--image", photo)
    assert_usage_error(out, "not a SkinGPT-4 model folder", "'llama'", "skingpt4 checkpoint convert")


def test_generate_folder_without_config(tmp_path, photo):
    out = run_cli("generate", tmp_path, "--image", photo)
    assert_usage_error(out, "not a SkinGPT-4 model folder", "no config.json",
                       "skingpt4 checkpoint convert")


def test_generate_missing_photo(stand_in_model, tmp_path):
    out = run_cli("generate", stand_in_model, "--image", tmp_path / "missing.jpg")
    assert_usage_error(out, "missing.jpg", "no such file")


@pytest.mark.parametrize("kind", ["not an image", "truncated", "folder"])
def test_generate_unreadable_photo(kind, stand_in_model, photo, tmp_path):
    bad = tmp_path / "bad.png"
    if kind == "not an image":
        bad.write_text("these are not pixels")
    elif kind == "truncated":
        bad.write_bytes(photo.read_bytes()[:2000])
    else:
        bad.mkdir()
    out = run_cli("generate", stand_in_model, "--image", photo, "--image", bad)
    assert_usage_error(out, "photo", "bad.png", "cannot be read as an image")


def test_generate_help_documents_the_kv_cache_default():
    out = run_cli("generate", "--help")
    assert out.returncode == 0
    assert "VLLM_CPU_KVCACHE_SPACE" in out.stdout and "--verbose" in out.stdout


# --- serve -----------------------------------------------------------------------------------


def test_serve_missing_model_folder(tmp_path):
    out = run_cli("serve", tmp_path / "nope", "--port", "0")
    assert_usage_error(out, "skingpt4 serve:", "no such model folder")


def test_serve_language_model_folder_asks_to_convert(llama_folder):
    out = run_cli("serve", llama_folder, "--port", "0")
    assert_usage_error(out, "not a SkinGPT-4 model folder", "skingpt4 checkpoint convert")


def test_serve_port_in_use(stand_in_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli("serve", stand_in_model, "--host", "127.0.0.1", "--port", port)
    assert_usage_error(out, f"port {port}", "127.0.0.1", "already in use", "--port")


# --- one real answer -------------------------------------------------------------------------


@pytest.mark.engine
def test_generate_prints_only_the_answer(tiny_checkpoints, tmp_path):
    """From a plain shell (no KV-cache or logging variables): stdout is the reference
    pipeline's greedy answer, and nothing else."""
    from benchmarks.reference import ReferencePipeline
    from plugins.skingpt4.template import build_prompt, image_question

    folder, question = tiny_checkpoints["falcon"], "Compare them."
    photos = []
    for seed in (0, 1):
        path = tmp_path / f"photo{seed}.png"
        synthetic_skin_photo(seed=seed).save(path)
        photos.append(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", str(folder), "--image", str(photos[0]),
         "--image", str(photos[1]), "--question", question, "--max-tokens", "12",
         "--temperature", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not LOG_LINE.search(out.stdout), out.stdout
    assert "Traceback" not in out.stderr

    from PIL import Image

    prompt = build_prompt([("user", image_question(question, num_images=2))])
    images = [Image.open(p).convert("RGB") for p in photos]
    want = ReferencePipeline(folder).generate(prompt, images, max_new_tokens=12, temperature=0)
    # Random weights answer in byte soup. A trailing incomplete UTF-8 sequence is U+FFFD in
    # Hugging Face's decode and withheld by vLLM's incremental detokenizer.
    answer = want.text.rstrip("\ufffd").strip()
    assert answer and out.stdout == answer + "\n"


def test_joining_a_ray_cluster_skips_the_local_checks(monkeypatch):
    """With RAY_ADDRESS the model folder lives on the cluster's nodes and its Serve proxy may hold
    the port already (a redeploy): the local checks would refuse a valid command."""
    import argparse
    import socket

    import pytest

    from serving.cli import UsageError, _check_serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = argparse.Namespace(ray=True, model="/srv/models/on-the-nodes", host="127.0.0.1",
                                  port=busy.getsockname()[1])
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
        _check_serve(args)
        monkeypatch.delenv("RAY_ADDRESS")
        with pytest.raises(UsageError, match="no such model folder"):
            _check_serve(args)
