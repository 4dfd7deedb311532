"""The ``skingpt4`` command line: checkpoints and the parser (errors and ``generate``:
test_cli_errors.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_choices_agree_with_the_presets():
    """The CLI spells them out so that it starts without torch; they must stay the presets'."""
    from encoders.presets import LLM_FAMILIES, PRESETS
    from serving.cli import LLM_CHOICES, TINY_PRESETS

    assert LLM_CHOICES == LLM_FAMILIES
    assert set(TINY_PRESETS) == PRESETS.keys() - {"skingpt4"}


def test_errors_and_help_come_before_heavy_imports():
    """``--help`` and the one-line errors must not wait for torch, timm or vLLM."""
    code = ("import sys; from serving.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "main(['serve', '/nonexistent/model'])\n"
            "print(sorted(m for m in ('torch', 'timm', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow  # a fresh interpreter imports the whole stack
def test_convert_reports_errors_without_a_traceback(tmp_path):
    missing = tmp_path / "nope.pth"
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "checkpoint", "convert", "--vit", str(missing),
         "--qformer", str(missing), "--proj", str(missing), "--llm", str(tmp_path), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "no config.json" in out.stderr

# `skingpt4 generate` on a real checkpoint: tests/serving/cli/test_cli_errors.py.
