"""The ``skingpt4`` command line: checkpoints and one offline answer through vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from encoders.samples import synthetic_skin_photo
from serving.cli import main


def test_checkpoint_tiny_writes_a_complete_folder(tmp_path, capsys):
    out = tmp_path / "tiny-falcon"
    assert main(["checkpoint", "tiny", str(out), "--llm", "falcon", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "vision.safetensors", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "skingpt4" and config["text_config"]["model_type"] == "falcon"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["max_new_tokens"]) == (1.0, 0.9, 300)


def test_checkpoint_seed_changes_weights(tmp_path):
    from safetensors.torch import load_file

    for seed in (1, 2):
        main(["checkpoint", "tiny", str(tmp_path / f"s{seed}"), "--seed", str(seed)])
    a, b = (load_file(str(tmp_path / f"s{s}" / "vision.safetensors")) for s in (1, 2))
    assert not all((a[k] == b[k]).all() for k in a if a[k].dim() >= 2)


def test_bad_choices_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["checkpoint", "tiny", str(tmp_path / "x"), "--llm", "gpt2"])


def test_convert_reports_errors_without_a_traceback(tmp_path):
    missing = tmp_path / "nope.pth"
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "checkpoint", "convert", "--vit", str(missing),
         "--qformer", str(missing), "--proj", str(missing), "--llm", str(tmp_path), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "no config.json" in out.stderr


def test_generate_answers_about_a_photo(tiny_checkpoints, tmp_path):
    photos = []
    for seed in (0, 1):
        path = tmp_path / f"photo{seed}.png"
        synthetic_skin_photo(seed=seed).save(path)
        photos.append(path)
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", str(tiny_checkpoints["falcon"]),
         "--image", str(photos[0]), "--image", str(photos[1]), "--question", "Compare them.",
         "--max-tokens", "12", "--temperature", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
